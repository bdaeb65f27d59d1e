#!/usr/bin/env bash
# make pg-bundle: PostgreSQL 15 with pgvector and exceiver, packed to run on a machine
# that has neither PostgreSQL nor Rust (the GPU machines: README, section GPU).
#
#   target/pgbundle/exceiver-pg15.tar.xz    what to carry (with the device tool:
#                                           carry ["target/pgbundle"])
#
# Inside, one tree that mirrors this machine's paths, so that PostgreSQL's relocatable
# lookup (share and lib found relative to the running binary) finds everything:
#   usr/lib/postgresql/15/bin     postgres, initdb, pg_ctl, psql
#   usr/lib/postgresql/15/lib     plpgsql, dict_snowball, vector, exceiver (+ what initdb needs)
#   usr/share/postgresql/15       catalog files, extension scripts and control files
#   data-template/                a fresh data directory (initdb, no locale, trust)
#   libs/                         every shared library those need, except the C library
#                                 itself and the CUDA libraries (the GPU machine's
#                                 driver and Python environment provide those)
#
# Which exceiver: EXCEIVER_SO (default the cuda build, target/cuda/release/libexceiver.so,
# when `make cuda` made it; else the installed CPU build). Its SQL script comes from the
# installed extension (`cargo pgrx install`): both builds have the same SQL functions.
# scripts/gpu_pg.sh unpacks and runs it. Idempotent; about a minute (xz).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PGC=${PG_CONFIG:-/usr/bin/pg_config}
BIN=$($PGC --bindir)
SHARE=$($PGC --sharedir)
PKGLIB=$($PGC --pkglibdir)
OUTDIR=$ROOT/target/pgbundle
OUT=$OUTDIR/exceiver-pg15.tar.xz
SO=${EXCEIVER_SO:-}
if [ -z "$SO" ]; then
  if [ -f target/cuda/release/libexceiver.so ]; then SO=target/cuda/release/libexceiver.so
  else SO=$PKGLIB/exceiver.so; fi
fi
say() { echo "pg_bundle: $*"; }
[ -f "$SO" ] || { say "no $SO (make install, or make cuda for the GPU build)"; exit 1; }
for f in "$PKGLIB/vector.so" "$SHARE/extension/exceiver.control" "$SHARE/extension/vector.control"; do
  [ -f "$f" ] || { say "no $f (make db installs pgvector and exceiver)"; exit 1; }
done

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/pgbundle.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
T=$STAGE/tree
mkdir -p "$T$BIN" "$T$PKGLIB" "$(dirname "$T$SHARE")" "$T/libs"
cp -a "$SHARE" "$T$(dirname "$SHARE")/"
# only the extensions the bundle has libraries for; no manual pages
rm -rf "$T$SHARE/man"
find "$T$SHARE/extension" -type f ! -name 'plpgsql*' ! -name 'vector*' ! -name 'exceiver*' -delete
for b in postgres initdb pg_ctl psql; do cp "$BIN/$b" "$T$BIN/"; done
for m in plpgsql dict_snowball vector; do cp "$PKGLIB/$m.so" "$T$PKGLIB/"; done
cp "$SO" "$T$PKGLIB/exceiver.so"
strip --strip-unneeded "$T$BIN"/* "$T$PKGLIB"/*.so 2>/dev/null || true

# The shared libraries, as ldd resolves them here. Left out: the C library (the target
# must have glibc at least as new as this machine's: $(ldd --version | head -1)) and
# CUDA's (libcuda comes with the driver; cuBLAS, cuRAND, cudart, NVRTC with the
# Python environment's nvidia wheels; here libcuda is build_cuda.sh's stub).
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libresolv\.so|libutil\.so|libcuda\.so|libcublas|libcublasLt|libcurand|libcudart|libnvrtc)'
LDLP=${LD_LIBRARY_PATH:-}
[ -d .cuda/toolkit/nvidia/cu13/lib ] && LDLP=.cuda/toolkit/nvidia/cu13/lib:.cuda/toolkit/nvidia/cu13/lib/stubs${LDLP:+:$LDLP}
missing=$(for f in "$T$BIN"/* "$T$PKGLIB"/*.so; do LD_LIBRARY_PATH=$LDLP ldd "$f"; done | awk '/not found/ {print $1}' | sort -u | grep -vE "$skip" || true)
[ -z "$missing" ] || { say "libraries not found here: $missing"; exit 1; }
for f in "$T$BIN"/* "$T$PKGLIB"/*.so; do LD_LIBRARY_PATH=$LDLP ldd "$f"; done |
  awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r name path; do
    echo "$name" | grep -qE "$skip" && continue
    cp -L "$path" "$T/libs/$name"
  done
# The cluster's initial data directory, made here by the bundle's own initdb with the
# real ICU (initdb imports ICU's collations, which needs ICU's data), so that the GPU
# machine only copies it.
chmod 755 "$STAGE" "$T"
mkdir -p "$T/data-template"
as_nobody=()
if [ "$(id -u)" = 0 ]; then
  chown 65534:65534 "$T/data-template"
  as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
fi
chmod 700 "$T/data-template"
TZ=GMT LD_LIBRARY_PATH="$T/libs" "${as_nobody[@]}" "$T$BIN/initdb" -D "$T/data-template" -U postgres \
  --auth=trust -E UTF8 --no-locale --no-sync >/dev/null
rm -f "$T/data-template/postmaster.opts"
# ICU's data library is 31 MB (7.5 MB packed), a third of the bundle, and nothing here
# needs it once the data directory exists: the cluster has no locale (C) and no ICU
# collation is used. In its place goes the equivalent of ICU's own "stubdata" library: the data entry
# point with an empty table of contents, so that libicuuc loads and any ICU call that
# needs data fails with ICU's missing-data error instead of the process failing to
# start. ICU_STUB=0 keeps the real one.
icudata=$(cd "$T/libs" && ls libicudata.so.* 2>/dev/null | head -1 || true)
if [ -n "$icudata" ] && [ "${ICU_STUB:-1}" = 1 ]; then
  v=${icudata#libicudata.so.}
  v=${v%%.*}
  cat > "$STAGE/icudata_stub.c" <<EOF
/* Stand-in for libicudata.so.$v (ICU $v's data), written by scripts/pg_bundle.sh: the
   entry point icudt${v}_dat holds a common-data header (UDataInfo, format "ToCP") with
   no entries, as ICU's stubdata library does. */
#include <stdint.h>
struct data_info {
  uint16_t size, reserved_word;
  uint8_t big_endian, charset_family, sizeof_uchar, reserved_byte;
  uint8_t format[4], format_version[4], data_version[4];
};
struct data_header {
  uint16_t header_size;
  uint8_t magic1, magic2;
  struct data_info info;
  char padding[8];
  uint32_t count, reserved;
  int entries[4];
};
__attribute__((visibility("default"))) const struct data_header icudt${v}_dat = {
  32, 0xda, 0x27,
  {sizeof(struct data_info), 0, 0, 0, 2, 0, {0x54, 0x6f, 0x43, 0x50}, {1, 0, 0, 0}, {0, 0, 0, 0}},
  {0}, 0, 0, {0, 0, 0, 0}};
EOF
  cc -shared -fPIC -O1 -Wl,-soname,"$icudata" -o "$T/libs/$icudata" "$STAGE/icudata_stub.c"
  say "ICU data ($icudata) replaced by an empty stub"
fi
{
  echo "exceiver PostgreSQL bundle, made $(date -u +%Y-%m-%dT%H:%MZ) by scripts/pg_bundle.sh"
  echo "postgres: $("$BIN/postgres" --version)"
  echo "exceiver: $SO ($(du -h "$SO" | cut -f1)), $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "pgvector: $(grep default_version "$SHARE/extension/vector.control")"
  echo "glibc needed: $(ldd --version | head -1)"
  echo "paths: bin $BIN, share $SHARE, lib $PKGLIB (relative to the unpacked root)"
} > "$T/BUNDLE"
mkdir -p "$OUTDIR"
say "packing $(du -sh "$T" | cut -f1) ($(ls "$T/libs" | wc -l) libraries) with xz"
tar -C "$T" -cf - . | xz -T2 -9 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
say "$OUT: $(du -h "$OUT" | cut -f1) ($(stat -c %s "$OUT") bytes)"
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
say "with the tracked tree ($((tracked / 1048576)) MiB) a device run carries $(((tracked + $(stat -c %s "$OUT")) / 1048576)) MiB of 64"
