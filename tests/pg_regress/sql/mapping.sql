-- Reference mapping: exceiver.transfer_labels on embeddings in pgvector columns.
-- Synthetic, deterministic embeddings: three types (A, B, C) around three axes of a
-- 6-dimensional space in the reference; the query has other cells of those types, a
-- type D the reference lacks, and two cells halfway between A and B.
\set VERBOSITY default
CREATE TABLE map_ref (cell_id text PRIMARY KEY, emb vector(6), cell_type text);
INSERT INTO map_ref
SELECT t || i, (SELECT array_agg((CASE WHEN j = c THEN 1 ELSE 0 END) + 0.15 * sin(i * 7 + j * 3 + c))::real[]
                  FROM generate_series(0, 5) j)::vector, t
FROM (VALUES ('A', 0), ('B', 1), ('C', 2)) ty(t, c), generate_series(1, 60) i;
CREATE TABLE map_query (cell_id text PRIMARY KEY, emb vector(6), truth text);
INSERT INTO map_query
SELECT 'q' || t || i, (SELECT array_agg((CASE WHEN j = c THEN 1 ELSE 0 END) + 0.15 * sin(i * 7 + j * 3 + c))::real[]
                         FROM generate_series(0, 5) j)::vector, t
FROM (VALUES ('A', 0), ('B', 1), ('C', 2), ('D', 3)) ty(t, c), generate_series(61, 70) i;
INSERT INTO map_query VALUES ('qAB1', '[0.5,0.5,0,0,0,0.02]', 'A|B'), ('qAB2', '[0.5,0.5,0.02,0,0,0]', 'A|B');

-- every query cell: known types get their label, D comes out unknown (far from every
-- reference cell), the halfway cells have split votes and a runner-up
CREATE TABLE map_out AS SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15);
SELECT q.truth, o.label, o.status, count(*), round(min(o.confidence)::numeric, 2) AS min_confidence
FROM map_out o JOIN map_query q USING (cell_id) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT cell_id, label, round(confidence::numeric, 2) AS confidence, runner_up,
       round(runner_up_confidence::numeric, 2) AS runner_up_confidence, voted_label, status
FROM map_out WHERE cell_id LIKE 'qAB%' ORDER BY cell_id;
-- the distance test off, the vote test strict
SELECT status, count(*) FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15,
  '{"distance_quantile": 1, "min_confidence": 0.9}') GROUP BY 1 ORDER BY 1;
-- written into a column of the query table
ALTER TABLE map_query ADD COLUMN predicted text;
UPDATE map_query q SET predicted = t.label
FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb') t WHERE q.cell_id = t.cell_id;
SELECT truth, predicted, count(*) FROM map_query GROUP BY 1, 2 ORDER BY 1, 2;
-- real[] embeddings work too, and NULL labels / embeddings are skipped with a NOTICE
CREATE TABLE map_ref2 AS SELECT cell_id, emb::real[] AS emb, cell_type FROM map_ref;
INSERT INTO map_ref2 VALUES ('nolabel', '{1,0,0,0,0,0}', NULL), ('noemb', NULL, 'A');
SELECT count(*) FROM exceiver.transfer_labels('map_query', 'map_ref2', 'cell_type', 'emb');

-- bad input
SELECT * FROM exceiver.transfer_labels('map_query', 'no_such_table', 'cell_type'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'no_such_column', 'emb'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'no_such_column'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'cell_id'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 180); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 0); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15, '{"min_confidence": 1.5}'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15, '{"distance_quantile": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15, '{"min_confidence": "high"}'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15, '{"neighbours": 3}'); \echo :SQLSTATE
SELECT * FROM exceiver.transfer_labels('map_query', 'map_ref', 'cell_type', 'emb', 15, '[1]'); \echo :SQLSTATE
-- a reference without labels
CREATE TABLE map_nolabels AS SELECT cell_id, emb, NULL::text AS cell_type FROM map_ref;
SELECT * FROM exceiver.transfer_labels('map_query', 'map_nolabels', 'cell_type', 'emb'); \echo :SQLSTATE
-- embeddings of different dimension (another model's)
CREATE TABLE map_query8 AS SELECT cell_id, (emb::real[] || ARRAY[0, 0]::real[])::vector AS emb FROM map_query;
SELECT * FROM exceiver.transfer_labels('map_query8', 'map_ref', 'cell_type', 'emb'); \echo :SQLSTATE
-- a zero vector has no cosine distance
INSERT INTO map_query8 VALUES ('zero', '[0,0,0,0,0,0,0,0]');
SELECT * FROM exceiver.transfer_labels('map_query8', 'map_query8', 'cell_id', 'emb'); \echo :SQLSTATE
DROP TABLE map_ref, map_ref2, map_query, map_query8, map_out, map_nolabels;
SELECT 'alive' AS session;
