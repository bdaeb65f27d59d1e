#!/usr/bin/env bash
# make soak: many sessions at once for several minutes, against the local cluster of
# `make db`, in a database of its own (exceiver_soak, made afresh each run).
#
#   SOAK_CLIENTS (16) pgbench sessions for SOAK_SECONDS (240) embed cells, classify them
#   and run nearest-neighbour queries on an HNSW index, while one session keeps
#   re-importing a model that some of them use (drop + import in one transaction) and
#   another keeps training and dropping a third model. It asserts: no failed transaction,
#   results before and after identical (embeddings, labels, neighbours), the re-imported
#   model's embeddings identical to the original's; and it samples every backend's memory
#   (RSS) over time and fails if a session's memory keeps growing.
# Results: out/soak/soak_results.txt (and the raw samples beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGPORT=${PGPORT:-5488}
PGHOST=${PGHOST:-/tmp}
CLIENTS=${SOAK_CLIENTS:-16}
SECONDS_RUN=${SOAK_SECONDS:-240}
DB=exceiver_soak
OUT=out/soak
mkdir -p "$OUT"
chmod 755 "$OUT"
psql() { "$PGBIN/psql" -X -q -h "$PGHOST" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
say() { printf '\033[1m[soak]\033[0m %s\n' "$*"; }
ROOT=$(pwd)

say "database $DB afresh: PBMC 3k, a small model, a classifier, embeddings with an HNSW index, the published checkpoint"
psql -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
psql -d $DB <<SQL
SET client_min_messages = warning;
CREATE EXTENSION exceiver CASCADE;
SELECT cells FROM exceiver.load_10x('$ROOT/data/pbmc3k', 'cells');
ALTER TABLE cells ADD COLUMN rid serial;
CREATE UNIQUE INDEX ON cells (rid);
SELECT model FROM exceiver.train('soak_m', 'cells', '{"preset": "small", "epochs": 1, "max_cells": 1500}');
SELECT model FROM exceiver.finetune('soak_m', 'soak_clf', 'cells', 'louvain_scanpy', '{"epochs": 1}');
SELECT cells FROM exceiver.embed_table('soak_m', 'cells', 'emb');
CREATE INDEX ON cells USING hnsw (emb vector_cosine_ops);
-- the published checkpoint under made-up gene names G0..G19066, and cells for it
SELECT name FROM exceiver.import_checkpoint('soak_ts', '$ROOT/fixtures/checkpoints/pretrained_TS_exceiver.ckpt',
  ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
CREATE TABLE ts_cells AS
SELECT rid, ARRAY(SELECT 'G' || ((rid * 7919 + k * 104729) % 19067) FROM generate_series(1, 300) k) AS genes,
       ARRAY(SELECT (1 + (rid + k) % 9)::real FROM generate_series(1, 300) k) AS counts
FROM generate_series(1, 200) rid;
-- the answers every concurrent session must keep getting (a view: asked again after)
CREATE VIEW answers_now AS
SELECT 'embed' AS what, md5(string_agg(exceiver.embed('soak_m', genes, counts)::text, ',' ORDER BY rid)) AS digest
FROM cells WHERE rid <= 100
UNION ALL
SELECT 'classify', md5(string_agg(exceiver.classify('soak_clf', genes, counts), ',' ORDER BY rid)) FROM cells WHERE rid <= 100
UNION ALL
SELECT 'knn', md5(string_agg(nn, ';' ORDER BY q)) FROM (
  SELECT q.rid AS q, (SELECT string_agg(c.cell_id, ',') FROM (SELECT cell_id FROM cells ORDER BY emb <=> q.emb LIMIT 10) c) AS nn
  FROM cells q WHERE q.rid <= 20) t
UNION ALL
SELECT 'embed_ts', md5(string_agg(exceiver.embed('soak_ts', genes, counts)::text, ',' ORDER BY rid)) FROM ts_cells WHERE rid <= 50;
CREATE TABLE answers AS SELECT * FROM answers_now;
SQL

W=$(mktemp -d)
chmod 755 "$W"
cat > "$W/embed.sql" <<'SQL'
\set id random(1, 2700)
SELECT exceiver.embed('soak_m', genes, counts) FROM cells WHERE rid = :id;
SQL
cat > "$W/classify.sql" <<'SQL'
\set id random(1, 2700)
SELECT exceiver.classify('soak_clf', genes, counts) FROM cells WHERE rid = :id;
SQL
cat > "$W/knn.sql" <<'SQL'
\set id random(1, 2700)
SELECT cell_id FROM cells ORDER BY emb <=> (SELECT emb FROM cells WHERE rid = :id) LIMIT 10;
SQL
cat > "$W/embed_ts.sql" <<'SQL'
\set id random(1, 200)
SELECT exceiver.embed('soak_ts', genes, counts) FROM ts_cells WHERE rid = :id;
SQL

# background 1: re-import the published checkpoint over and over (atomically)
(
  end=$((SECONDS + SECONDS_RUN)); n=0
  while [ $SECONDS -lt $end ]; do
    psql -d $DB >/dev/null <<SQL
BEGIN;
SELECT exceiver.drop_model('soak_ts');
SELECT name FROM exceiver.import_checkpoint('soak_ts', '$ROOT/fixtures/checkpoints/pretrained_TS_exceiver.ckpt',
  ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
COMMIT;
SQL
    n=$((n + 1))
  done
  echo "$n" > "$W/reimports"
) &
reimport=$!
# background 2: train and drop another model over and over
(
  end=$((SECONDS + SECONDS_RUN)); n=0
  while [ $SECONDS -lt $end ]; do
    psql -d $DB >/dev/null <<'SQL'
SET client_min_messages = warning;
SELECT model FROM exceiver.train('soak_other', 'cells', '{"preset": "small", "epochs": 1, "max_cells": 300, "min_cells": 5}');
SELECT exceiver.drop_model('soak_other');
SQL
    n=$((n + 1))
  done
  echo "$n" > "$W/trainings"
) &
trainer=$!
# memory sampler: private (anonymous) and shared resident memory of every pgbench
# backend, every 10 s: "seconds pid anon_kB shmem_kB"
(
  end=$((SECONDS + SECONDS_RUN + 5))
  while [ $SECONDS -lt $end ]; do
    t=$SECONDS
    for pid in $(psql -d postgres -tAc "SELECT pid FROM pg_stat_activity WHERE datname = '$DB' AND backend_type = 'client backend' AND application_name = 'pgbench'"); do
      # RssAnon: the backend's own memory (VmRSS also counts the shared buffers it
      # has touched, which grows as it reads more of the table and is not a leak)
      rss=$(awk '/^RssAnon/ {a=$2} /^RssShmem/ {s=$2} END {if (a != "") print a, s}' /proc/$pid/status 2>/dev/null || true)
      [ -n "$rss" ] && echo "$t $pid $rss"
    done
    sleep 10
  done
) > "$OUT/backend_rss.txt" &
sampler=$!

say "$CLIENTS sessions for $SECONDS_RUN s: embed, classify, kNN on HNSW, embed with a model being re-imported; meanwhile re-import and training loops"
"$PGBIN/pgbench" -n -h "$PGHOST" -p "$PGPORT" -U postgres -c "$CLIENTS" -j 2 -T "$SECONDS_RUN" -P 30 \
  -f "$W/embed.sql@3" -f "$W/classify.sql@3" -f "$W/knn.sql@3" -f "$W/embed_ts.sql@1" $DB > "$OUT/pgbench.txt" 2>&1 || {
  cat "$OUT/pgbench.txt"; echo "soak: pgbench failed"; exit 1; }
wait $reimport $trainer $sampler

say "after: the same answers?"
psql -d $DB -tA > "$OUT/after.txt" <<'SQL'
SET client_min_messages = warning;
SELECT a.what, a.digest = b.digest FROM answers a JOIN answers_now b USING (what) ORDER BY 1;
SQL

# memory: per backend, RSS at the first sample after a quarter of the run vs the last
growth=$(awk -v q=$((SECONDS_RUN / 4)) '
  { if (!($2 in first) && $1 >= q) first[$2] = $3; last[$2] = $3; if ($3 > peak) peak = $3 }
  END { n = 0; s = 0; w = 0; for (p in first) { g = last[p] / first[p]; s += g; n++; if (g > w) w = g }
        if (n == 0) { print "0 0 0 0"; exit } printf "%d %.3f %.3f %d\n", n, s / n, w, peak }' "$OUT/backend_rss.txt")
read -r n_backends mean_growth worst_growth peak_kb <<<"$growth"
shmem_kb=$(awk '{ last[$2] = $4 } END { n = 0; s = 0; for (p in last) { s += last[p]; n++ } if (n) printf "%d", s / n; else print 0 }' "$OUT/backend_rss.txt")
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$OUT/pgbench.txt" | head -1)
failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$OUT/pgbench.txt" | head -1)
done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$OUT/pgbench.txt" | head -1)
{
  echo "# exceiver soak results"
  echo
  echo "Produced by \`make soak\` (scripts/soak.sh): $CLIENTS pgbench sessions for $SECONDS_RUN s."
  echo
  echo "- transactions: ${done_tx:-?} (${tps:-?} per second), failed: ${failed:-0}"
  echo "- model re-imports (drop + import in one transaction) during the run: $(cat "$W/reimports")"
  echo "- trainings of another model during the run: $(cat "$W/trainings")"
  echo "- answers identical before and after (embed, classify, kNN, embed with the re-imported model):"
  sed 's/^/    /' "$OUT/after.txt"
  echo "- backend private memory (RssAnon) of $n_backends sessions from a quarter of the run to its end:" \
       "mean growth x$mean_growth, worst x$worst_growth; peak ${peak_kb} kB; shared buffers touched (RssShmem) at the end: ${shmem_kb} kB on average"
} > "$OUT/soak_results.txt"
cat "$OUT/soak_results.txt"
rm -rf "$W"

ok=1
grep -q '|f' "$OUT/after.txt" && { echo "soak: answers changed"; ok=0; }
[ "$(grep -c '|t' "$OUT/after.txt")" = 4 ] || { echo "soak: not every answer was compared"; ok=0; }
[ "${failed:-0}" = 0 ] || { echo "soak: $failed transactions failed"; ok=0; }
awk -v w="$worst_growth" 'BEGIN { exit !(w <= 1.10) }' || { echo "soak: a backend's memory grew by x$worst_growth (limit x1.10)"; ok=0; }
[ $ok = 1 ] && echo "soak: passed" || exit 1
