-- Embedding throughput through SQL (run by `make bench`): the published 8-layer
-- Exceiver (19,067 genes, d = 4, 128 latents, feed-forward 2048) on 2,000 cells of
-- ~1,500 expressed genes, the shape the PyTorch reference was timed on (19.7 cells/s,
-- 2 threads, same machine; 55 cells/s with the same maths in O(expressed genes)).
\set ON_ERROR_STOP 1
\getenv root EXCEIVER_ROOT
\if :{?cells}
\else
  \set cells 2000
\endif
SET client_min_messages = warning;
SELECT exceiver.drop_model('bench_ts') FROM exceiver.models WHERE name = 'bench_ts';
SELECT name, num_layers, embedding_dim FROM exceiver.import_checkpoint('bench_ts',
  :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt', ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
DROP TABLE IF EXISTS bench_cells;
SELECT setseed(0.42);
-- ~1,500 distinct genes per cell (1,560 draws from 19,067), geometric-ish counts
CREATE TABLE bench_cells AS
SELECT c AS cell_id, array_agg('G' || g ORDER BY g) AS genes, array_agg(n ORDER BY g) AS counts
FROM generate_series(1, :cells) c
CROSS JOIN LATERAL (SELECT g, (1 + floor(-ln(1 - random()) * 3))::real AS n
                    FROM (SELECT DISTINCT floor(random() * 19067)::int + 0 * c AS g FROM generate_series(1, 1560)) d) s
GROUP BY c;
ALTER TABLE bench_cells SET (parallel_workers = 2);
ANALYZE bench_cells;
SELECT count(*) AS cells, round(avg(cardinality(genes))) AS mean_genes_per_cell FROM bench_cells;

-- warm-up: load the model into this backend
SELECT vector_dims(exceiver.embed('bench_ts', genes, counts)) FROM bench_cells LIMIT 1;

\echo '-- one backend (no parallel query)'
SET max_parallel_workers_per_gather = 0;
SELECT clock_timestamp() AS t0 \gset
SELECT count(exceiver.embed('bench_ts', genes, counts)) AS n FROM bench_cells \gset
SELECT :n AS cells, round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 2) AS seconds,
       round(:n / extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 1) AS cells_per_s,
       19.7 AS pytorch_reference_cells_per_s;

\echo '-- parallel query (leader + 2 workers on the 2 cores)'
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
EXPLAIN (COSTS OFF) SELECT count(exceiver.embed('bench_ts', genes, counts)) FROM bench_cells;
SELECT clock_timestamp() AS t0 \gset
SELECT count(exceiver.embed('bench_ts', genes, counts)) AS n FROM bench_cells \gset
SELECT :n AS cells, round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 2) AS seconds,
       round(:n / extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 1) AS cells_per_s,
       19.7 AS pytorch_reference_cells_per_s;
DROP TABLE bench_cells;
SELECT exceiver.drop_model('bench_ts');
