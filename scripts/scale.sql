-- make scale: load, embed, index, search and train at N cells, in one run.
-- Variables (scripts/scale.sh sets them): dir (the generated Cell Ranger folder), n,
-- nnz, file_bytes, queries, exact (query cells given an exact reference), pub_cells, mwm
-- (maintenance_work_mem for the HNSW builds), results (the results file, written client-side).
\set ON_ERROR_STOP 1
\pset footer off
SET client_min_messages = warning;
DROP TABLE IF EXISTS scale_cells, scale_cells_genes, scale_uploaded, scale_uploaded_genes, scale_pub_cells, scale_sub, scale_q, scale_exact, scale_results;
SELECT exceiver.drop_model(name) FROM exceiver.models WHERE name IN ('scale_small', 'scale_pub');
CREATE TABLE scale_results (step int, what text, value text);

-- the backend's memory: current and peak resident set (Linux /proc), and a reset of the
-- peak (clear_refs 5) so that each step reports its own peak
CREATE FUNCTION pg_temp.rss_mb(field text) RETURNS numeric LANGUAGE sql AS $$
  SELECT round((substring(pg_catalog.pg_read_file('/proc/' || pg_catalog.pg_backend_pid() || '/status')
                          FROM field || ':\s*(\d+) kB'))::numeric / 1024) $$;
CREATE FUNCTION pg_temp.reset_peak() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('COPY (SELECT 5) TO %L', '/proc/' || pg_catalog.pg_backend_pid() || '/clear_refs');
EXCEPTION WHEN OTHERS THEN NULL;   -- not Linux, or not allowed: the peak is since start
END $$;
CREATE FUNCTION pg_temp.note(step int, what text, value text) RETURNS void LANGUAGE sql AS $$
  INSERT INTO scale_results VALUES (step, what, value) $$;

\echo '== 1. load' :n 'cells through exceiver.load_10x'
SELECT pg_temp.reset_peak();
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
SELECT cells AS load_cells, nonzeros AS load_nnz FROM exceiver.load_10x(:'dir', 'scale_cells') \gset
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS load_s \gset
SELECT pg_temp.note(1, 'load_10x: cells, non-zeros, seconds',
                    format('%s, %s, %s', :load_cells, :load_nnz, round(:load_s::numeric, 1)));
SELECT pg_temp.note(1, 'load_10x: cells/s, MB/s of gzip files, MB/s of raw non-zeros',
                    format('%s, %s, %s', round(:load_cells / :load_s), round(:file_bytes::numeric / 1e6 / :load_s, 1),
                           round(:load_nnz::numeric * 8 / 1e6 / :load_s, 1)));
SELECT pg_temp.note(1, 'load_10x: backend peak / current RSS (MB)',
                    format('%s / %s', pg_temp.rss_mb('VmHWM'), pg_temp.rss_mb('VmRSS')));
SELECT pg_catalog.pg_table_size('scale_cells') AS bytes_loaded \gset
SELECT pg_temp.note(1, 'table bytes per cell (heap + TOAST) / raw non-zeros (8 bytes each) per cell, ratio',
                    format('%s / %s, %s', round(:bytes_loaded / :load_cells::numeric),
                           round(:load_nnz::numeric * 8 / :load_cells::numeric), round(:bytes_loaded / (:load_nnz::numeric * 8)::numeric, 2)));
SELECT pg_temp.note(1, 'primary key index bytes per cell', round(pg_catalog.pg_relation_size('scale_cells_pkey') / :load_cells::numeric)::text);
-- the client-side path (no server-file privilege): upload as large objects, then load them
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
\set QUIET on
\set f :dir/matrix.mtx.gz
\lo_import :f
\set lo_m :LASTOID
\set f :dir/features.tsv.gz
\lo_import :f
\set lo_f :LASTOID
\set f :dir/barcodes.tsv.gz
\lo_import :f
\set lo_b :LASTOID
\set QUIET off
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS upload_s \gset
SELECT pg_temp.reset_peak();
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
SELECT cells AS lo_cells FROM exceiver.load_10x_lo(:lo_m, :lo_f, :lo_b, 'scale_uploaded') \gset
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS lo_s \gset
SELECT pg_temp.note(1, 'client-side: \lo_import seconds, load_10x_lo seconds, cells/s of both together',
                    format('%s, %s, %s', round(:upload_s::numeric, 1), round(:lo_s::numeric, 1),
                           round(:lo_cells / (:upload_s + :lo_s))));
SELECT pg_temp.note(1, 'load_10x_lo: backend peak / current RSS (MB)',
                    format('%s / %s', pg_temp.rss_mb('VmHWM'), pg_temp.rss_mb('VmRSS')));
SELECT pg_catalog.lo_unlink(lo) FROM (VALUES (:lo_m::oid), (:lo_f::oid), (:lo_b::oid)) v(lo) \g /dev/null
DROP TABLE scale_uploaded, scale_uploaded_genes;

\echo '== 2. one training epoch of the small preset over every cell (streamed)'
SELECT pg_temp.reset_peak();
SELECT seconds AS train_s, cells_per_s AS train_rate FROM exceiver.train('scale_small', 'scale_cells', '{"preset": "small", "epochs": 1}') \gset
SELECT pg_temp.note(2, 'train small, 1 epoch: seconds, training cells/s', format('%s, %s', round(:train_s::numeric), round(:train_rate::numeric)));
SELECT pg_temp.note(2, 'train small: backend peak / current RSS (MB)', format('%s / %s', pg_temp.rss_mb('VmHWM'), pg_temp.rss_mb('VmRSS')));

\echo '== 3. embed_table, small preset, every cell'
SELECT pg_temp.reset_peak();
SELECT cells AS emb_cells, seconds AS emb_s, cells_per_s AS emb_rate FROM exceiver.embed_table('scale_small', 'scale_cells', 'emb') \gset
SELECT pg_temp.note(3, 'embed_table small: cells, seconds, cells/s', format('%s, %s, %s', :emb_cells, round(:emb_s::numeric), round(:emb_rate::numeric)));
SELECT pg_temp.note(3, 'embed_table small: backend peak / current RSS (MB)', format('%s / %s', pg_temp.rss_mb('VmHWM'), pg_temp.rss_mb('VmRSS')));
SELECT embedding_dim AS dim FROM exceiver.models WHERE name = 'scale_small' \gset
ALTER TABLE scale_cells ADD COLUMN emb_half halfvec(:dim);
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
UPDATE scale_cells SET emb_half = emb::halfvec(:dim);
SELECT pg_temp.note(3, 'halfvec copy of the embeddings (UPDATE … emb::halfvec): seconds', round((extract(epoch FROM clock_timestamp()) - :t0)::numeric, 1)::text);
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
VACUUM FULL scale_cells;   -- the UPDATEs left a dead version of each row
SELECT pg_temp.note(3, 'VACUUM FULL after the embedding UPDATEs: seconds', round((extract(epoch FROM clock_timestamp()) - :t0)::numeric)::text);
SELECT pg_temp.note(3, 'table bytes per cell, with vector and halfvec embeddings',
                    round(pg_catalog.pg_table_size('scale_cells') / :load_cells::numeric)::text);

\echo '== 4. embed_table with 1 and 2 worker threads, and the published shape'
CREATE TABLE scale_sub AS SELECT cell_id, genes, counts FROM scale_cells ORDER BY cell_id LIMIT :pub_cells;
SET exceiver.threads = 1;
SELECT cells_per_s AS t1 FROM exceiver.embed_table('scale_small', 'scale_sub', 'e1') \gset
SET exceiver.threads = 2;
SELECT cells_per_s AS t2 FROM exceiver.embed_table('scale_small', 'scale_sub', 'e2') \gset
RESET exceiver.threads;
SELECT pg_temp.note(4, format('embed_table small on %s cells: cells/s with 1 / 2 threads, ratio', :pub_cells),
                    format('%s / %s, %s', round(:t1::numeric), round(:t2::numeric), round((:t2 / :t1)::numeric, 2)));
SELECT seconds AS pub_train_s FROM exceiver.train('scale_pub', 'scale_cells', '{"preset": "published", "epochs": 1, "max_cells": 2000}') \gset
SELECT n_genes AS pub_genes FROM exceiver.models WHERE name = 'scale_pub' \gset
SELECT pg_temp.reset_peak();
SELECT cells_per_s AS pub_rate FROM exceiver.embed_table('scale_pub', 'scale_sub', 'e_pub') \gset
SELECT pg_temp.note(4, format('embed_table published shape (%s genes) on %s cells: cells/s', :pub_genes, :pub_cells), round(:pub_rate::numeric)::text);
SELECT pg_temp.note(4, 'embed_table published: backend peak / current RSS (MB)', format('%s / %s', pg_temp.rss_mb('VmHWM'), pg_temp.rss_mb('VmRSS')));
SELECT round(avg(cardinality(genes))) AS genes_per_cell FROM scale_sub \gset
SELECT pg_temp.note(4, 'expressed genes per cell (mean)', :'genes_per_cell');

\echo '== 5. HNSW indexes: vector and halfvec'
SET maintenance_work_mem = :'mwm';
SET max_parallel_maintenance_workers = 1;
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
CREATE INDEX scale_emb_hnsw ON scale_cells USING hnsw (emb vector_cosine_ops);
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS idx_s \gset
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
CREATE INDEX scale_half_hnsw ON scale_cells USING hnsw (emb_half halfvec_cosine_ops);
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS half_idx_s \gset
SELECT pg_temp.note(5, format('HNSW build seconds (m 16, ef_construction 64, maintenance_work_mem %s, 1 parallel worker): vector / halfvec', :'mwm'),
                    format('%s / %s', round(:idx_s::numeric), round(:half_idx_s::numeric)));
SELECT pg_temp.note(5, 'HNSW index MB: vector / halfvec',
                    format('%s / %s', round(pg_catalog.pg_relation_size('scale_emb_hnsw') / 1e6), round(pg_catalog.pg_relation_size('scale_half_hnsw') / 1e6)));
SELECT pg_temp.note(5, 'table without the vector column + halfvec index, over raw non-zeros (8 bytes) + half-precision embeddings: ratio',
                    round((pg_catalog.pg_table_size('scale_cells') - :load_cells::bigint * (4 * :dim + 8) + pg_catalog.pg_relation_size('scale_half_hnsw'))
                          / (:load_nnz::numeric * 8 + :load_cells::bigint * 2 * :dim)::numeric, 2)::text);

\echo '== 6. nearest neighbours: latency and recall@10 against exact search,' :queries 'query cells'
CREATE TABLE scale_q AS SELECT cell_id, emb, emb_half FROM scale_cells ORDER BY md5(cell_id) LIMIT :queries;
SET enable_indexscan = off;
SET enable_bitmapscan = off;
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
-- the exact reference for the first :exact query cells (a sequential scan each)
CREATE TABLE scale_exact AS
  SELECT q.cell_id AS q, n.cell_id AS n FROM (SELECT * FROM scale_q ORDER BY cell_id LIMIT :exact) q,
         LATERAL (SELECT c.cell_id FROM scale_cells c ORDER BY c.emb <=> q.emb LIMIT 10) n;
SELECT extract(epoch FROM clock_timestamp()) - :t0 AS exact_s \gset
RESET enable_indexscan;
RESET enable_bitmapscan;
SELECT pg_temp.note(6, format('exact search (sequential scan) of %s query cells, ms per query', :exact),
                    round((1000 * :exact_s / :exact)::numeric)::text);
CREATE FUNCTION pg_temp.search(half boolean, ef int) RETURNS TABLE(ms float8, hits int) LANGUAGE plpgsql AS $$
DECLARE r record; t timestamptz; ids text[];
BEGIN
  PERFORM pg_catalog.set_config('hnsw.ef_search', ef::text, true);
  -- the index is what is measured: below ~10^4 rows the planner may prefer a scan
  PERFORM pg_catalog.set_config('enable_seqscan', 'off', true);
  FOR r IN SELECT cell_id, emb, emb_half FROM scale_q LOOP
    t := clock_timestamp();
    IF half THEN
      SELECT array_agg(s.cell_id) INTO ids FROM (SELECT c.cell_id FROM scale_cells c ORDER BY c.emb_half <=> r.emb_half LIMIT 10) s;
    ELSE
      SELECT array_agg(s.cell_id) INTO ids FROM (SELECT c.cell_id FROM scale_cells c ORDER BY c.emb <=> r.emb LIMIT 10) s;
    END IF;
    ms := extract(epoch FROM clock_timestamp() - t) * 1000;
    hits := CASE WHEN EXISTS (SELECT 1 FROM scale_exact e WHERE e.q = r.cell_id)
                 THEN (SELECT count(*) FROM scale_exact e WHERE e.q = r.cell_id AND e.n = ANY (ids)) END;
    RETURN NEXT;
  END LOOP;
END $$;
SELECT pg_temp.note(6, format('HNSW %s, ef_search %s: p50 / p99 ms over %s queries, recall@10 over %s', CASE WHEN h THEN 'halfvec' ELSE 'vector' END, ef, :queries, :exact),
                    (SELECT format('%s / %s, %s', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
                                   round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2),
                                   round(avg(hits) / 10, 4))
                     FROM pg_temp.search(h, ef)))
FROM (VALUES (false, 40), (false, 100), (true, 40), (true, 100)) v(h, ef);

\echo '== 7. what 10^7 and 10^8 cells would need, from these rates (linear; HNSW builds grow faster than linearly)'
SELECT pg_temp.note(7, format('%s cells: disk GB (table + halfvec index), hours to load / embed (small) / build the halfvec index / train one epoch', m),
                    format('%s GB; %s / %s / %s / %s h', round(m * (pg_catalog.pg_table_size('scale_cells') + pg_catalog.pg_relation_size('scale_half_hnsw')) / :load_cells / 1e9),
                           round(m / (:load_cells / :load_s) / 3600, 1), round(m / :emb_rate / 3600, 1),
                           round(m * :half_idx_s / :load_cells / 3600, 1), round(m / :train_rate / 3600, 1)))
FROM (VALUES (1e7), (1e8)) v(m);

\o :results
\qecho '# exceiver scale results'
\qecho
\qecho 'Produced by `make scale` (scripts/scale.sh, scripts/scale.sql) on' `date -u +%Y-%m-%d` 'with' :n 'cells.'
\qecho
SELECT step, what, value FROM scale_results ORDER BY step, ctid;
\o
SELECT step, what, value FROM scale_results ORDER BY step, ctid;
