#!/usr/bin/env bash
# make scale: N realistic cells (SCALE_CELLS, default 1,000,000) generated from the real
# data in data/ (crates/exceiver-core/examples/scale_cells.rs), then loaded, embedded,
# indexed, searched and trained on in one psql session (scripts/scale.sql). Results:
# out/scale/scale_results.txt, copied to results/scale_results.txt. Idempotent: the
# generated folder is kept (SCALE_DIR) and reused; the tables and models are recreated.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${SCALE_CELLS:-1000000}
Q=${SCALE_QUERIES:-1000}
SUB=${SCALE_SUB_CELLS:-20000}
EXACT=${SCALE_EXACT:-$Q}          # query cells given an exact reference (recall@10)
# HNSW builds are fast while the graph fits maintenance_work_mem (about 8.2 KB a cell for
# vector(1024), 2.7 KB for halfvec): 4GB up to ~400,000 cells, 10GB beyond
MWM=${SCALE_MWM:-$([ "$N" -gt 400000 ] && echo 10GB || echo 4GB)}
DIR=${SCALE_DIR:-/var/tmp/exceiver_scale_$N}
PSQL=${PSQL:-psql -X -h /tmp -p 5488 -U postgres}
DB=${DB:-exceiver}
[ "$SUB" -le "$N" ] || SUB=$N
[ "$EXACT" -le "$Q" ] || EXACT=$Q
cargo build --release -q -p exceiver-core --example scale_cells
if [ ! -s "$DIR/generated.txt" ]; then
  echo "[scale] generating $N cells into $DIR"
  rm -rf "$DIR"; mkdir -p "$DIR"
  target/release/examples/scale_cells --cells "$N" --out "$DIR" --data data > "$DIR/generated.tmp"
  mv "$DIR/generated.tmp" "$DIR/generated.txt"
fi
chmod -R a+rX "$DIR"
cat "$DIR/generated.txt"
val() { sed -n "s/.* $1 \([0-9.]*\).*/\1/p" "$DIR/generated.txt"; }
mkdir -p out/scale
start=$(date +%s)
$PSQL -d "$DB" -v ON_ERROR_STOP=1 -v dir="$DIR" -v n="$N" -v nnz="$(val nonzeros)" \
  -v file_bytes="$(val file_bytes)" -v queries="$Q" -v exact="$EXACT" -v mwm="$MWM" -v pub_cells="$SUB" \
  -v results="$PWD/out/scale/scale_results.txt" -f scripts/scale.sql
echo "[scale] SQL part took $(( $(date +%s) - start )) s"
{ echo; grep -o 'mean_nonzeros.*' "$DIR/generated.txt" | sed 's/^/generator: /'; } >> out/scale/scale_results.txt
cp out/scale/scale_results.txt results/scale_results.txt
echo "[scale] results in results/scale_results.txt"
