#!/usr/bin/env bash
# make test-cluster: exceiver on a coordinator and two shards (scripts/cluster.sh), PBMC 3k
# hash-partitioned over the shards with postgres_fdw. Checks that each shard holds its part,
# that a model trained on the coordinator (over the sharded table) reaches both shards by
# logical replication, that embedding and classifying run on the shards (EXPLAIN VERBOSE:
# the whole UPDATE is the remote SQL), that embeddings, top-10 neighbours (each shard's own
# HNSW index, merged on the coordinator), labels and evaluate_embeddings equal a
# single-server run over the same cells, and that a shard that is down is a clear error
# with nothing half-written. Prints the replication delay. Fails on the first difference.
set -euo pipefail
cd "$(dirname "$0")/../.."

PGBIN=$(${PG_CONFIG:-/usr/bin/pg_config} --bindir)
HOST=${CLUSTER_HOST:-/tmp}
PORT=${CLUSTER_PORT:-5491}
S1=$((PORT + 1))
S2=$((PORT + 2))
q() { local p=$1; shift; "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$p" -U postgres -d exceiver -tA "$@"; }
export PGOPTIONS="-c client_min_messages=warning"
fail() { echo "test-cluster FAILED: $*" >&2; exit 1; }
expect() { # expect WHAT GOT WANT (never empty)
  [ -n "$2" ] && [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
  echo "ok - $1"
}
contains() { # contains WHAT TEXT PATTERN
  grep -qF -- "$3" <<<"$2" || { echo "$2" >&2; fail "$1: no '$3'"; }
  echo "ok - $1"
}

bash scripts/cluster.sh start

# A clean start: the models and columns of an earlier run go (and a subscription an
# interrupted run left disabled is enabled).
q "$S1" -c "ALTER SUBSCRIPTION exceiver_models_shard1 ENABLE"
q "$S2" -c "ALTER SUBSCRIPTION exceiver_models_shard2 ENABLE"
q "$PORT" -c "DELETE FROM exceiver.model_catalog WHERE name LIKE 'cl\_%'"
for t in "$S1 pbmc3k_p0" "$S2 pbmc3k_p1" "$PORT pbmc3k" "$PORT pbmc3k_local"; do
  set -- $t
  q "$1" -c "ALTER TABLE $2 DROP COLUMN IF EXISTS embedding, DROP COLUMN IF EXISTS predicted"
done

# 1. Each shard holds its part, and only its part.
n1=$(q "$S1" -c "SELECT count(*) FROM pbmc3k_p0")
n2=$(q "$S2" -c "SELECT count(*) FROM pbmc3k_p1")
expect "shards hold every cell once ($n1 + $n2)" "$((n1 + n2))" "$(q "$PORT" -c "SELECT count(*) FROM pbmc3k_local")"
[ "$n1" -gt 1000 ] && [ "$n2" -gt 1000 ] || fail "uneven shards: $n1, $n2"
expect "each row on the shard its hash names" \
  "$(q "$PORT" -c "SELECT count(*) FROM (SELECT cell_id FROM pbmc3k_p0 OFFSET 0) t WHERE NOT satisfies_hash_partition('pbmc3k'::regclass, 2, 0, cell_id)")+$(q "$PORT" -c "SELECT count(*) FROM (SELECT cell_id FROM pbmc3k_p1 OFFSET 0) t WHERE NOT satisfies_hash_partition('pbmc3k'::regclass, 2, 1, cell_id)")" "0+0"
expect "shards equal the local table cell for cell" \
  "$(q "$PORT" -c "SELECT count(*) FROM pbmc3k s JOIN pbmc3k_local l USING (cell_id) WHERE s.genes = l.genes AND s.counts = l.counts")" "2700"

# 2. Train on the coordinator over the sharded table; the model reaches both shards.
q "$PORT" -c "SET client_min_messages = warning" -c "SELECT model FROM exceiver.train('cl_tiny', 'pbmc3k', '{\"preset\": \"small\", \"seq_dim\": 8, \"query_len\": 8, \"num_layers\": 1, \"dim_feedforward\": 16, \"epochs\": 1, \"batch_size\": 64, \"min_cells\": 10, \"n_top_genes\": 2000, \"seed\": 1}')" >/dev/null
v=$(q "$PORT" -c "SELECT exceiver.model_version('cl_tiny')")
t0=$(date +%s%N)
for i in $(seq 1 3000); do
  a=$(q "$S1" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_tiny'")
  b=$(q "$S2" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_tiny'")
  [ "$a" = "$v" ] && [ "$b" = "$v" ] && break
  sleep 0.01
done
lag=$((($(date +%s%N) - t0) / 1000000))
expect "model cl_tiny (version $v) replicated to both shards, seen $lag ms after train returned" "$a/$b" "$v/$v"
expect "weights identical on the shards" "$(q "$S1" -c "SELECT md5(weights) FROM exceiver.model_catalog WHERE name = 'cl_tiny'")" \
  "$(q "$PORT" -c "SELECT md5(weights) FROM exceiver.model_catalog WHERE name = 'cl_tiny'")"

# 3. Embedding runs on the shards: the whole UPDATE is shipped (no counts leave a shard).
dim=$(q "$PORT" -c "SELECT embedding_dim FROM exceiver.models WHERE name = 'cl_tiny'")
q "$S1" -c "ALTER TABLE pbmc3k_p0 ADD COLUMN embedding vector($dim), ADD COLUMN predicted text"
q "$S2" -c "ALTER TABLE pbmc3k_p1 ADD COLUMN embedding vector($dim), ADD COLUMN predicted text"
q "$PORT" -c "ALTER TABLE pbmc3k ADD COLUMN embedding vector($dim), ADD COLUMN predicted text"
plan=$(q "$PORT" -c "EXPLAIN (VERBOSE, COSTS OFF) UPDATE pbmc3k SET embedding = exceiver.embed_at('cl_tiny', $v, genes, counts)")
contains "UPDATE is a direct modification on shard1" "$plan" "Remote SQL: UPDATE public.pbmc3k_p0 SET embedding = exceiver.embed_at_array('cl_tiny'::text, $v::bigint, genes, counts)::public.vector"
contains "UPDATE is a direct modification on shard2" "$plan" "Remote SQL: UPDATE public.pbmc3k_p1 SET embedding = exceiver.embed_at_array('cl_tiny'::text, $v::bigint, genes, counts)::public.vector"
grep -q "Remote SQL: SELECT" <<<"$plan" && { echo "$plan"; fail "the UPDATE reads rows to the coordinator"; }
out=$(q "$PORT" -c "SELECT cells || '/' || skipped FROM exceiver.embed_table('cl_tiny', 'pbmc3k', 'embedding')" 2>&1)
contains "embed_table on the sharded table embeds every cell on its shard" "$out" "2700/0"
q "$PORT" -c "SET client_min_messages = warning" -c "SELECT FROM exceiver.embed_table('cl_tiny', 'pbmc3k_local', 'embedding')"
expect "sharded embeddings equal the single-server ones bit for bit" \
  "$(q "$PORT" -c "SELECT count(*) FROM pbmc3k s JOIN pbmc3k_local l USING (cell_id) WHERE s.embedding = l.embedding")" "2700"
expect "a stale version is refused on the shards (55000)" \
  "$(q "$PORT" -c "\\set VERBOSITY sqlstate" -c "UPDATE pbmc3k SET embedding = exceiver.embed_at('cl_tiny', $v - 1, genes, counts)" 2>&1 | head -1)" "ERROR:  55000"

# 4. k nearest neighbours: each shard searches its own HNSW index, the coordinator merges.
for t in "$S1 pbmc3k_p0" "$S2 pbmc3k_p1"; do
  set -- $t
  q "$1" -c "CREATE INDEX IF NOT EXISTS ${2}_embedding_hnsw ON $2 USING hnsw (embedding vector_cosine_ops)" \
         -c "ALTER DATABASE exceiver SET hnsw.ef_search = 1000" \
         -c "ALTER DATABASE exceiver SET hnsw.iterative_scan = strict_order" \
         -c "ALTER DATABASE exceiver SET enable_seqscan = off"
done
# (enable_seqscan off: 1,350 cells a shard are so few that a sort beats the index, and
# the test wants to see the index answer; tables of realistic size choose it themselves)
plan=$(q "$PORT" -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT cell_id FROM pbmc3k ORDER BY embedding <=> (SELECT embedding FROM pbmc3k_local WHERE cell_id = 'AAACATACAACCAC-1') LIMIT 10")
contains "kNN ordered on shard1" "$plan" "Remote SQL: SELECT cell_id, embedding FROM public.pbmc3k_p0 ORDER BY (embedding OPERATOR(public.<=>) \$1::public.vector($dim)) ASC NULLS LAST"
contains "kNN merged on the coordinator" "$plan" "Merge Append"
before=$(q "$S1" -c "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'pbmc3k_p0_embedding_hnsw'")
same=$(q "$PORT" <<'SQL'
SELECT count(*) FILTER (WHERE sharded = single)
FROM (SELECT l.cell_id,
             (SELECT array_agg(d ORDER BY d) FROM (SELECT round((embedding <=> l.embedding)::numeric, 6) AS d FROM pbmc3k ORDER BY embedding <=> l.embedding LIMIT 10) s) AS sharded,
             (SELECT array_agg(d ORDER BY d) FROM (SELECT round((embedding <=> l.embedding)::numeric, 6) AS d FROM pbmc3k_local ORDER BY embedding <=> l.embedding LIMIT 10) s) AS single
      FROM pbmc3k_local l ORDER BY cell_id LIMIT 50) t
SQL
)
# compared by distance: cells at the same distance (ties) may come in either order
expect "top-10 neighbours of 50 cells equal a single-server exact search (their distances)" "$same" "50"
sleep 1
after=$(q "$S1" -c "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'pbmc3k_p0_embedding_hnsw'")
[ "$after" -gt "$before" ] || fail "shard1's HNSW index was not used ($before -> $after scans)"
echo "ok - shard1's HNSW index answered ($before -> $after scans)"
for p in "$S1" "$S2"; do q "$p" -c "ALTER DATABASE exceiver RESET enable_seqscan"; done

# 5. A classifier fine-tuned through the coordinator; labels computed on the shards.
q "$PORT" -c "SET client_min_messages = warning" -c "SELECT model FROM exceiver.finetune('cl_tiny', 'cl_cls', 'pbmc3k', 'seurat_annotations', '{\"epochs\": 1, \"batch_size\": 64, \"seed\": 1}')" >/dev/null
vc=$(q "$PORT" -c "SELECT exceiver.model_version('cl_cls')")
for i in $(seq 1 3000); do
  [ "$(q "$S1" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_cls'")/$(q "$S2" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_cls'")" = "$vc/$vc" ] && break
  sleep 0.01
done
plan=$(q "$PORT" -c "EXPLAIN (VERBOSE, COSTS OFF) UPDATE pbmc3k SET predicted = exceiver.classify_at('cl_cls', $vc, genes, counts)")
contains "classify_at is shipped" "$plan" "Remote SQL: UPDATE public.pbmc3k_p1 SET predicted = exceiver.classify_at('cl_cls'::text, $vc::bigint, genes, counts)"
q "$PORT" -c "UPDATE pbmc3k SET predicted = exceiver.classify_at('cl_cls', $vc, genes, counts)"
expect "labels computed on the shards equal exceiver.classify on one server" \
  "$(q "$PORT" -c "SELECT count(*) FROM pbmc3k s JOIN pbmc3k_local l USING (cell_id) WHERE s.predicted = exceiver.classify('cl_cls', l.genes, l.counts)")" "2700"
lbl=$(q "$PORT" -c "SELECT exceiver.classify('cl_cls', genes, counts) FROM pbmc3k_local GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
plan=$(q "$PORT" -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT cell_id FROM pbmc3k WHERE exceiver.classify_at('cl_cls', $vc, genes, counts) = '$lbl'")
contains "a filter on a predicted label runs on the shards" "$plan" "Remote SQL: SELECT cell_id FROM public.pbmc3k_p0 WHERE ((exceiver.classify_at('cl_cls'::text, $vc::bigint, genes, counts) = '$lbl'::text))"
nb=$(q "$PORT" -c "SELECT count(*) FROM pbmc3k_local WHERE exceiver.classify('cl_cls', genes, counts) = '$lbl'")
expect "cells the shards call $lbl equal one server's ($nb)" \
  "$(q "$PORT" -c "SELECT count(*) FROM pbmc3k WHERE exceiver.classify_at('cl_cls', $vc, genes, counts) = '$lbl'")" "$nb"
expect "evaluate_embeddings over the shards equals one server" \
  "$(q "$PORT" -c "SELECT cells, accuracy FROM exceiver.evaluate_embeddings('pbmc3k', 'embedding', 'seurat_annotations')" 2>/dev/null)" \
  "$(q "$PORT" -c "SELECT cells, accuracy FROM exceiver.evaluate_embeddings('pbmc3k_local', 'embedding', 'seurat_annotations')" 2>/dev/null)"

# 6. A model not yet on one shard: that shard refuses it (42704, with the remote SQL), and
#    the shard that did its part first is rolled back with the statement.
q "$PORT" -c "UPDATE pbmc3k SET embedding = NULL"
q "$S2" -c "ALTER SUBSCRIPTION exceiver_models_shard2 DISABLE"
q "$PORT" -c "SELECT model FROM exceiver.train('cl_late', 'pbmc3k', '{\"preset\": \"small\", \"seq_dim\": 8, \"query_len\": 8, \"num_layers\": 1, \"dim_feedforward\": 16, \"epochs\": 1, \"batch_size\": 64, \"min_cells\": 10, \"n_top_genes\": 2000, \"seed\": 2}')" >/dev/null
vl=$(q "$PORT" -c "SELECT exceiver.model_version('cl_late')")
until [ "$(q "$S1" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_late'")" = "$vl" ]; do sleep 0.01; done
err=$(q "$PORT" -c "\\set VERBOSITY verbose" -c "SELECT cells FROM exceiver.embed_table('cl_late', 'pbmc3k', 'embedding')" 2>&1 || true)
contains "a model missing on shard2: 42704 from the shard" "$err" 'ERROR:  42704: model "cl_late" does not exist'
err=$(q "$PORT" -c "UPDATE pbmc3k SET embedding = exceiver.embed_at('cl_late', $vl, genes, counts)" 2>&1 || true)
contains "a plain UPDATE shows the shard's remote SQL" "$err" "remote SQL command: UPDATE public.pbmc3k_p1"
expect "shard1's part rolled back with the statement" "$(q "$S1" -c "SELECT count(embedding) FROM pbmc3k_p0")" "0"
q "$S2" -c "ALTER SUBSCRIPTION exceiver_models_shard2 ENABLE"
until [ "$(q "$S2" -c "SELECT version FROM exceiver.model_catalog WHERE name = 'cl_late'")" = "$vl" ]; do sleep 0.01; done
contains "once it arrives, every cell is embedded" "$(q "$PORT" -c "SELECT cells || '/' || skipped FROM exceiver.embed_table('cl_late', 'pbmc3k', 'embedding')")" "2700/0"

# 7. A shard down: a clear error naming it, nothing half-written anywhere.
q "$PORT" -c "UPDATE pbmc3k SET embedding = NULL"
sudo -u postgres "$PGBIN/pg_ctl" -D "$PWD/.cluster/shard2" -m fast stop >/dev/null
err=$(q "$PORT" -c "\\set VERBOSITY verbose" -c "SELECT cells FROM exceiver.embed_table('cl_tiny', 'pbmc3k', 'embedding')" 2>&1 || true)
contains "shard2 down: error 08001" "$err" "ERROR:  08001"
contains "the error names the shard" "$err" 'server "shard2"'
bash scripts/cluster.sh start >/dev/null
expect "nothing written on shard1 by the failed embed_table" "$(q "$S1" -c "SELECT count(embedding) FROM pbmc3k_p0")" "0"

# 8. A model dropped on the coordinator is gone from the shards.
q "$PORT" -c "DELETE FROM exceiver.model_catalog WHERE name LIKE 'cl\_%'"
for i in $(seq 1 3000); do
  [ "$(q "$S1" -c "SELECT count(*) FROM exceiver.model_catalog WHERE name LIKE 'cl\_%'")$(q "$S2" -c "SELECT count(*) FROM exceiver.model_catalog WHERE name LIKE 'cl\_%'")" = "00" ] && break
  sleep 0.01
done
expect "dropped models gone from the shards" "$(q "$S1" -c "SELECT count(*) FROM exceiver.model_catalog WHERE name LIKE 'cl\_%'")" "0"
echo "test-cluster passed (model replication delay $lag ms)"
