#!/usr/bin/env bash
# make cluster-bench: the Kang IFN-beta PBMCs (data/kang_ifnb) on one server, on one shard
# and on two shards (scripts/cluster.sh), in one run:
#   - embed_table with a `small` model: on one server (exceiver.threads = 2 and 1), through
#     the coordinator on a table with one foreign partition and on one with two (the UPDATE
#     shipped to the shards), and each shard embedding its own partition in two concurrent
#     sessions;
#   - one training epoch through the coordinator over the sharded table against the local one.
# Results in results/cluster_results.txt. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=$(${PG_CONFIG:-/usr/bin/pg_config} --bindir)
HOST=${CLUSTER_HOST:-/tmp}
PORT=${CLUSTER_PORT:-5491}
S1=$((PORT + 1))
S2=$((PORT + 2))
OUT=${CLUSTER_RESULTS:-results/cluster_results.txt}
export PGOPTIONS="-c client_min_messages=warning"
q() { local p=$1; shift; "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$p" -U postgres -d exceiver -tA "$@"; }
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l | xargs printf '%.2f'; }

bash scripts/cluster.sh start >/dev/null

# Kang on the coordinator (the single-server reference), then spread: `kang` over both
# shards, `kang1` as one foreign partition on shard1.
if [ -z "$(q "$PORT" -c "SELECT 1 FROM pg_class WHERE relname = 'kang_local'")" ]; then
  q "$PORT" -c "SELECT cells FROM exceiver.load_h5ad('$PWD/data/kang_ifnb/kang_ifnb.h5ad', 'kang_local')" >/dev/null
fi
q "$PORT" -c "ALTER TABLE kang_local DROP COLUMN IF EXISTS embedding"
cols=$(q "$PORT" -c "SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum)
                     FROM pg_attribute WHERE attrelid = 'kang_local'::regclass AND attnum > 0 AND NOT attisdropped")
q "$PORT" -c "DROP TABLE IF EXISTS kang, kang1"
q "$S1" -c "DROP TABLE IF EXISTS kang_p0, kang1_p0" -c "CREATE TABLE kang_p0 ($cols, PRIMARY KEY (cell_id))" -c "CREATE TABLE kang1_p0 ($cols, PRIMARY KEY (cell_id))"
q "$S2" -c "DROP TABLE IF EXISTS kang_p1" -c "CREATE TABLE kang_p1 ($cols, PRIMARY KEY (cell_id))"
q "$PORT" \
  -c "CREATE TABLE kang ($cols) PARTITION BY HASH (cell_id)" \
  -c "CREATE FOREIGN TABLE kang_p0 PARTITION OF kang FOR VALUES WITH (MODULUS 2, REMAINDER 0) SERVER shard1 OPTIONS (schema_name 'public', table_name 'kang_p0')" \
  -c "CREATE FOREIGN TABLE kang_p1 PARTITION OF kang FOR VALUES WITH (MODULUS 2, REMAINDER 1) SERVER shard2 OPTIONS (schema_name 'public', table_name 'kang_p1')" \
  -c "CREATE TABLE kang1 ($cols) PARTITION BY HASH (cell_id)" \
  -c "CREATE FOREIGN TABLE kang1_p0 PARTITION OF kang1 FOR VALUES WITH (MODULUS 1, REMAINDER 0) SERVER shard1 OPTIONS (schema_name 'public', table_name 'kang1_p0')"
t0=$(now); q "$PORT" -c "INSERT INTO kang SELECT * FROM kang_local"; t1=$(now)
q "$PORT" -c "INSERT INTO kang1 SELECT * FROM kang_local"
n=$(q "$PORT" -c "SELECT count(*) FROM kang_local")
load_s=$(secs "$t0" "$t1")

# One `small` model, trained on the coordinator: one epoch over the local table and one
# over the sharded table (the same options and seed), timed.
opts='{"preset": "small", "epochs": 1, "seed": 7}'
q "$PORT" -c "DELETE FROM exceiver.model_catalog WHERE name LIKE 'bench\_%'"
train() { q "$PORT" -c "SELECT round(cells_per_s::numeric, 1) || ' cells/s, ' || round(seconds::numeric, 1) || ' s' FROM exceiver.train('$1', '$2', '$opts')"; }
tr_local=$(train bench_local kang_local)
tr_shard=$(train bench_small kang)
v=$(q "$PORT" -c "SELECT exceiver.model_version('bench_small')")
dim=$(q "$PORT" -c "SELECT embedding_dim FROM exceiver.models WHERE name = 'bench_small'")
t0=$(now)
until [ "$(q "$S1" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'bench_small'")/$(q "$S2" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'bench_small'")" = "$v/$v" ]; do sleep 0.01; done
lag_ms=$(echo "($(now) - $t0) * 1000" | bc -l | xargs printf '%.0f')
wbytes=$(q "$PORT" -c "SELECT octet_length(weights) FROM exceiver.model_catalog WHERE name = 'bench_small'")

for t in "$S1 kang_p0" "$S1 kang1_p0" "$S2 kang_p1"; do set -- $t; q "$1" -c "ALTER TABLE $2 ADD COLUMN embedding vector($dim)"; done
q "$PORT" -c "ALTER TABLE kang ADD COLUMN embedding vector($dim)" -c "ALTER TABLE kang1 ADD COLUMN embedding vector($dim)"

# Each call is a new session: every figure includes loading the model into its cache.
embed() { # embed PORT TABLE [threads]
  local th=${3:-2}
  q "$1" -c "SET exceiver.threads = $th" -c "SELECT round(seconds::numeric, 2) FROM exceiver.embed_table('bench_small', '$2', 'embedding')"
}
e_local2=$(embed "$PORT" kang_local 2)
e_local1=$(embed "$PORT" kang_local 1)
e_one=$(embed "$PORT" kang1)
e_two=$(embed "$PORT" kang)
t0=$(now)
embed "$S1" kang_p0 1 >/dev/null & p1=$!
embed "$S2" kang_p1 1 >/dev/null & p2=$!
wait $p1 $p2
e_conc=$(secs "$t0" "$(now)")
same=$(q "$PORT" -c "SELECT count(*) FROM kang s JOIN kang_local l USING (cell_id) WHERE s.embedding = l.embedding")
rate() { echo "$n / $1" | bc -l | xargs printf '%.0f'; }
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }

{
  echo "make cluster-bench, $(date -u +%Y-%m-%d), $(nproc) cores, PostgreSQL $(q "$PORT" -c 'SHOW server_version'), coordinator and two shards on this machine"
  echo "Kang IFN-beta PBMCs: $n cells; model bench_small (small preset, $dim dimensions, $wbytes bytes of weights)"
  echo
  echo "load: INSERT INTO kang SELECT * FROM kang_local (coordinator -> two shards, batch_size 100): $load_s s, $(rate "$load_s") cells/s"
  echo "model replication: bench_small on both shards $lag_ms ms after train returned"
  echo
  echo "train, one epoch, same options and seed:"
  echo "  local table:                         $tr_local"
  echo "  sharded table (through coordinator): $tr_shard"
  echo
  echo "embed_table (seconds, cells/s):"
  echo "  one server, exceiver.threads = 2:                      $e_local2 s  $(rate "$e_local2") cells/s"
  echo "  one server, exceiver.threads = 1:                      $e_local1 s  $(rate "$e_local1") cells/s"
  echo "  coordinator, one shard (UPDATE shipped):               $e_one s  $(rate "$e_one") cells/s"
  echo "  coordinator, two shards (UPDATE shipped):              $e_two s  $(rate "$e_two") cells/s  (two vs one shard: x$(ratio "$e_one" "$e_two"))"
  echo "  two shards, each embed_table on its own partition,"
  echo "    two concurrent sessions, threads = 1 each:           $e_conc s  $(rate "$e_conc") cells/s  (vs one shard through the coordinator: x$(ratio "$e_one" "$e_conc"))"
  echo "  embeddings equal to the single-server ones: $same of $n"
} | tee "$OUT"
