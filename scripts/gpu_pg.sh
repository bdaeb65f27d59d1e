#!/usr/bin/env bash
# The extension on a GPU machine that has no PostgreSQL and no Rust (README, section
# GPU), from the repository root: unpacks scripts/pg_bundle.sh's bundle
# (target/pgbundle/exceiver-pg15.tar.xz), starts a throwaway cluster in $WORK, runs
# scripts/gpu_sql.sql (embed_table, train, finetune with exceiver.device = $DEVICE,
# each checked against the CPU; embed_table timed on both) and stops the cluster.
# Exit status 0 when every check passed. Not part of `make test`.
#
#   scripts/gpu_pg.sh                    DEVICE=cuda (the bundle's exceiver must be the
#                                        cuda build: make cuda, then make pg-bundle)
#   DEVICE=cpu scripts/gpu_pg.sh         any build, any machine: checks the bundle and
#                                        this script (make pg-bundle-check)
#   CELLS=50000 PORT=5499 WORK=/tmp/x BUNDLE=path/to.tar.xz scripts/gpu_pg.sh
#
# Run as root (the GPU machines' only user), the server runs as `nobody` (PostgreSQL
# refuses root) in $WORK, which then belongs to nobody; the files the server reads
# (the published checkpoint, data/pbmc3k) are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE=${BUNDLE:-target/pgbundle/exceiver-pg15.tar.xz}
DEVICE=${DEVICE:-cuda}
CELLS=${CELLS:-20000}
PORT=${PORT:-5499}
WORK=${WORK:-${TMPDIR:-/tmp}/exceiver-gpu-pg}
say() { echo "gpu_pg: $*"; }
[ -f "$BUNDLE" ] || { say "no $BUNDLE (make pg-bundle, and carry target/pgbundle)"; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK/pg" "$WORK/files"
say "unpacking $BUNDLE into $WORK/pg"
if command -v xz >/dev/null; then tar -C "$WORK/pg" -xJf "$BUNDLE"
else python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE" "$WORK/pg"; fi
cat "$WORK/pg/BUNDLE"
PGBIN=$(find "$WORK/pg" -path '*/postgresql/15/bin' -type d | head -1)
[ -x "$PGBIN/postgres" ] || { say "the bundle has no postgresql/15/bin/postgres"; exit 1; }
LIBS=$WORK/pg/libs
case "$DEVICE" in
  cuda*) LIBS=$LIBS:$(python3 scripts/cuda_libdirs.py) ;;
esac
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# GMT is built into PostgreSQL: no dependence on the machine's zoneinfo
export TZ=GMT PGTZ=GMT
missing=$(for f in "$PGBIN"/* "$PGBIN"/../lib/*.so; do ldd "$f" 2>/dev/null; done | awk '/not found/ {print $1}' | sort -u)
[ -z "$missing" ] || { say "libraries not found: $missing"; exit 1; }

cp fixtures/pretrained_TS_exceiver.safetensors "$WORK/files/"
cp -r data/pbmc3k "$WORK/files/"
chmod -R a+rX "$WORK"
as_server=()
if [ "$(id -u)" = 0 ]; then
  chown -R 65534:65534 "$WORK"
  if command -v setpriv >/dev/null; then as_server=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
  else as_server=(runuser -u nobody --); fi
fi
# the bundle's fresh data directory (initdb needs ICU's data, which the bundle leaves out)
mv "$WORK/pg/data-template" "$WORK/data"
[ -n "${as_server[*]}" ] && chown -R 65534:65534 "$WORK/data"
chmod 700 "$WORK/data"
"${as_server[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w \
  -o "-p $PORT -k $WORK -c listen_addresses='' -c timezone=GMT -c log_timezone=GMT -c shared_buffers=1GB" start >/dev/null || {
  tail -20 "$WORK/server.log"; say "the server did not start"; exit 1; }
trap '"${as_server[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true' EXIT
say "server up: $("$PGBIN/psql" -X -h "$WORK" -p "$PORT" -U postgres -d postgres -tAc 'SELECT version()')"
start=$(date +%s)
status=0
"$PGBIN/psql" -X -h "$WORK" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
  -v device="$DEVICE" -v files="$WORK/files" -v cells="$CELLS" -f scripts/gpu_sql.sql || status=$?
say "$( [ $status = 0 ] && echo passed || echo "FAILED (psql exit $status; server log: $WORK/server.log)" ) in $(( $(date +%s) - start )) s on $DEVICE"
[ $status = 0 ] || tail -20 "$WORK/server.log"
exit $status
