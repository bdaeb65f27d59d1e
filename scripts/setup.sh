#!/usr/bin/env bash
# Take a fresh Debian 12 machine (root, rustup Rust, Debian's PostgreSQL 15) to one that
# builds, installs and tests exceiver. Idempotent: each step is skipped when done.
# Uses only package registries (Debian, crates.io).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
PGRX_VERSION=0.18.1
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: run as root (it installs Debian packages)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup first" >&2; exit 1; }

# 1. Debian packages. Server headers are pinned to the installed server's version:
#    unpinned, apt would upgrade the server itself from bookworm-security.
apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { apt-get update -q; apt_updated=1; }; }
if ! dpkg -s postgresql-15 >/dev/null 2>&1; then
  say "installing postgresql-15"; apt_update; apt-get install -y -q postgresql-15
fi
PGV=$(dpkg-query -W -f='${Version}' postgresql-15)
need=()
dpkg -s postgresql-server-dev-15 >/dev/null 2>&1 || need+=("postgresql-server-dev-15=$PGV")
for p in libclang-dev clang build-essential pkg-config libssl-dev sudo libhdf5-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"; apt_update; apt-get install -y -q "${need[@]}"
fi

# 2. pgvector 0.8 from Debian trixie's source package (bookworm has no package).
SHAREDIR=$("$PG_CONFIG" --sharedir)
if [ ! -f "$SHAREDIR/extension/vector.control" ]; then
  say "building pgvector from Debian's source package"
  src=/etc/apt/sources.list.d/exceiver-trixie-src.list
  [ -f "$src" ] || echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$src"
  apt-get update -q; apt_updated=1
  work=$(mktemp -d); (cd "$work" && apt-get source -q pgvector >/dev/null && cd pgvector-*/ \
    && make -s PG_CONFIG="$PG_CONFIG" && make -s PG_CONFIG="$PG_CONFIG" install)
  rm -rf "$work"
fi

# 3. cargo-pgrx at the version pinned in Cargo.toml (its install takes ~16 minutes).
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
  say "installing cargo-pgrx $PGRX_VERSION (about 16 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# 4. Point pgrx at Debian's PostgreSQL 15. Only when missing: rewriting the file makes
#    pgrx-pg-sys regenerate its bindings on the next build.
PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  say "cargo pgrx init --pg15 $PG_CONFIG"
  cargo pgrx init --pg15 "$PG_CONFIG"
fi
say "ready: PostgreSQL $PGV, pgvector $(sed -n "s/default_version = '\(.*\)'/\1/p" "$SHAREDIR/extension/vector.control"), cargo-pgrx $PGRX_VERSION"
