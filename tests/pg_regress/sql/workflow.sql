-- Bulk embedding into a vector column, settings, and judging embeddings against labels.
-- Uses the model 'ts' and table 'cells' made by model.sql.
\set VERBOSITY default

-- settings live under the reserved prefix exceiver. (registered when the library loads)
LOAD 'exceiver';
SHOW exceiver.threads;
SET exceiver.threads = 1;
SET exceiver.no_such_setting = 1; \echo :SQLSTATE
SET exceiver.threads = -1; \echo :SQLSTATE
RESET exceiver.threads;
SHOW exceiver.device;
SET exceiver.device = 'banana'; \echo :SQLSTATE
SET exceiver.device = 'cuda:99999'; \echo :SQLSTATE
SET exceiver.device = 'cuda:1';
SELECT * FROM exceiver.embed_table('ts', 'cells', 'emb_gpu'); \echo :SQLSTATE
SELECT * FROM exceiver.train('gpu_model', 'cells'); \echo :SQLSTATE
RESET exceiver.device;
-- TF32 matrix products on a GPU: off by default; a boolean
SHOW exceiver.gpu_tf32;
SET exceiver.gpu_tf32 = 'sometimes'; \echo :SQLSTATE
SET exceiver.gpu_tf32 = on;
SHOW exceiver.gpu_tf32;
RESET exceiver.gpu_tf32;

-- bulk path: the whole table in batches, into a new vector(512) column
INSERT INTO cells VALUES ('d', ARRAY['X1','X2'], ARRAY[1,1]), ('e', NULL, NULL);
-- (progress NOTICEs carry timings, so they are silenced here)
SET client_min_messages = warning;
SELECT cells, skipped FROM exceiver.embed_table('ts', 'cells', 'emb2', batch_size => 2);
RESET client_min_messages;
\d cells
-- the bulk path gives exactly what embed() gives
SELECT cell_id, CASE WHEN emb2 IS NOT NULL THEN emb2 <-> exceiver.embed('ts', genes, counts) END AS distance_to_embed
FROM cells ORDER BY cell_id;
CREATE INDEX ON cells USING hnsw (emb2 vector_cosine_ops);
SET enable_seqscan = off;
-- 'a' and 'c' have the same embedding: both are the nearest to 'a'
SELECT array_agg(cell_id ORDER BY cell_id) FROM (
  SELECT cell_id FROM cells WHERE emb2 IS NOT NULL ORDER BY emb2 <=> (SELECT emb2 FROM cells WHERE cell_id = 'a') LIMIT 2) nn;
RESET enable_seqscan;
-- bad input
ALTER TABLE cells ADD COLUMN small vector(3);
SELECT * FROM exceiver.embed_table('ts', 'cells', 'small'); \echo :SQLSTATE
SELECT * FROM exceiver.embed_table('ts', 'cells', 'genes'); \echo :SQLSTATE
SELECT * FROM exceiver.embed_table('ts', 'no_such_table'); \echo :SQLSTATE
CREATE TABLE not_cells (x int);
SELECT * FROM exceiver.embed_table('ts', 'not_cells'); \echo :SQLSTATE
SELECT * FROM exceiver.embed_table('ts', 'cells', 'emb3', batch_size => 0); \echo :SQLSTATE
SELECT * FROM exceiver.embed_table('nope', 'cells'); \echo :SQLSTATE

-- vocabulary coverage: how much of the model's vocabulary a table expresses
SELECT cells, model_genes, expressed_model_genes, round(vocabulary_coverage::numeric, 4) AS vocabulary_coverage,
       table_genes, round(count_fraction::numeric, 4) AS count_fraction, cells_without_model_genes, unmatched_examples
FROM exceiver.vocabulary_coverage('ts', 'cells');
-- a table named by other identifiers (Ensembl-like ids): a WARNING, and embed_table warns too
CREATE TABLE ensembl_cells AS
SELECT 'e' || i AS cell_id, ARRAY['ENSG0000000000' || i, 'ENSG0000000001' || i, 'X1'] AS genes, ARRAY[5, 3, 1]::real[] AS counts
FROM generate_series(1, 3) i;
SELECT cells, expressed_model_genes, round(count_fraction::numeric, 4) AS count_fraction, unmatched_examples
FROM exceiver.vocabulary_coverage('ts', 'ensembl_cells');
SET client_min_messages = warning;
SELECT cells FROM exceiver.embed_table('ts', 'ensembl_cells', 'emb');
RESET client_min_messages;
SELECT * FROM exceiver.vocabulary_coverage('no_such_model', 'cells'); \echo :SQLSTATE
SELECT * FROM exceiver.vocabulary_coverage('ts', 'not_cells'); \echo :SQLSTATE
INSERT INTO ensembl_cells VALUES ('bad', ARRAY['X1', NULL], ARRAY[1, 1]::real[]);
SELECT * FROM exceiver.vocabulary_coverage('ts', 'ensembl_cells'); \echo :SQLSTATE

-- evaluate_embeddings on vectors whose answer is known by hand: with k = 3, every
-- point but 7 (a B lying among the As) is predicted right: accuracy 6/7, and
-- F1 6/7 for both A (tp 3, fp 1) and B (tp 3, fn 1).
CREATE TABLE toy (id int, emb vector(2), label text);
INSERT INTO toy VALUES (1, '[1,0]', 'A'), (2, '[1,0.1]', 'A'), (3, '[1,0.2]', 'A'),
  (4, '[0,1]', 'B'), (5, '[0.1,1]', 'B'), (6, '[0.2,1]', 'B'), (7, '[0.9,0.1]', 'B'),
  (8, NULL, 'A'), (9, '[1,1]', NULL);
SELECT cells, classes, neighbours, round(accuracy::numeric, 4) AS accuracy, round(macro_f1::numeric, 4) AS macro_f1
FROM exceiver.evaluate_embeddings('toy', 'emb', 'label', k => 3);
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'no_such_column'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_embeddings('toy', 'label', 'id'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'label', k => 0); \echo :SQLSTATE
UPDATE toy SET label = 'A';
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'label'); \echo :SQLSTATE

-- the field's metrics on three well-separated cell types of 30 cells each, in two
-- batches: the clustering finds the types (NMI = ARI = 1, 3 clusters), every type is one
-- connected piece of the neighbour graph; batches interleaved within each type mix well
-- (batch ASW near 1) in "mixed", and are pulled apart (batch ASW lower) in "split"
CREATE TABLE wells AS
SELECT 'c' || lpad(i::text, 3, '0') AS cell_id, 'type' || (i % 3) AS label, 'b' || (i / 3) % 2 AS batch,
       (SELECT array_agg(CASE WHEN j = i % 3 THEN 5 ELSE 0 END + 0.3 * sin(i * 7 + j * 13) ORDER BY j)
          FROM generate_series(0, 3) j)::real[]::vector(4) AS mixed,
       (SELECT array_agg(CASE WHEN j = i % 3 THEN 5 ELSE 0 END + 0.3 * sin(i * 7 + j * 13)
                         + CASE WHEN j = 3 THEN 2.0 * ((i / 3) % 2) ELSE 0 END ORDER BY j)
          FROM generate_series(0, 3) j)::real[]::vector(4) AS split
FROM generate_series(1, 90) i;
SELECT round(accuracy::numeric, 4) AS accuracy, round(nmi::numeric, 4) AS nmi, round(ari::numeric, 4) AS ari,
       round(asw::numeric, 2) AS asw, round(avg_bio::numeric, 2) AS avg_bio, round(batch_asw::numeric, 2) AS batch_asw,
       graph_connectivity, clusters
FROM exceiver.evaluate_embeddings('wells', 'mixed', 'label', batch_column => 'batch');
SELECT round(batch_asw::numeric, 2) AS batch_asw_split, round(nmi::numeric, 2) AS nmi, graph_connectivity
FROM exceiver.evaluate_embeddings('wells', 'split', 'label', batch_column => 'batch');
-- without a batch column, no batch metrics
SELECT batch_asw IS NULL AND graph_connectivity IS NULL AS no_batch_metrics
FROM exceiver.evaluate_embeddings('wells', 'mixed', 'label');
SELECT * FROM exceiver.evaluate_embeddings('wells', 'mixed', 'label', batch_column => 'no_such_column'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_embeddings('wells', 'mixed', 'label', k => 90); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_embeddings('no_such_table', 'mixed', 'label'); \echo :SQLSTATE
INSERT INTO wells VALUES ('z', 'type0', 'b0', '[0,0,0,0]', '[0,0,0,0]');
SELECT * FROM exceiver.evaluate_embeddings('wells', 'mixed', 'label'); \echo :SQLSTATE

-- pca_embed: the standard baseline on 60 cells of three kinds, each with its own 10 of
-- 30 genes highly expressed (counts from a deterministic wobble); the kinds separate
CREATE TABLE programmes AS
SELECT 'k' || lpad(i::text, 3, '0') AS cell_id, 'kind' || (i % 3) AS kind,
       array_agg('G' || lpad(g::text, 2, '0') ORDER BY g) AS genes,
       array_agg((CASE WHEN g / 10 = i % 3 THEN 8 ELSE 1 END * (1.2 + sin(i * 3 + g * 7)))::real ORDER BY g) AS counts
FROM generate_series(1, 60) i, generate_series(0, 29) g GROUP BY i;
INSERT INTO programmes VALUES ('k999', 'kind0', NULL, NULL);
SELECT cells, skipped, genes, components, round(variance_explained::numeric, 2) AS variance_explained
FROM exceiver.pca_embed('programmes', 'pca', '{"n_top_genes": 20, "n_components": 5}');
SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'programmes'::regclass AND attname = 'pca';
SELECT round(accuracy::numeric, 4) AS accuracy, round(nmi::numeric, 4) AS nmi
FROM exceiver.evaluate_embeddings('programmes', 'pca', 'kind', k => 5);
-- the same options give the same vectors; a rerun into the same column replaces them
CREATE TABLE pca_before AS SELECT cell_id, pca FROM programmes;
SELECT cells FROM exceiver.pca_embed('programmes', 'pca', '{"n_top_genes": 20, "n_components": 5}');
SELECT count(*) AS changed FROM programmes p JOIN pca_before b USING (cell_id) WHERE p.pca IS DISTINCT FROM b.pca;
-- linear_probe: logistic regression on the PCA embedding, trained on the odd cells and
-- scored on the even ones (views of one table); the kinds are linearly separable
CREATE VIEW programmes_odd AS SELECT * FROM programmes WHERE right(cell_id, 1)::int % 2 = 1;
CREATE VIEW programmes_even AS SELECT * FROM programmes WHERE right(cell_id, 1)::int % 2 = 0;
SELECT train_cells, test_cells, classes, accuracy, macro_f1, log_loss < 0.2 AS small_log_loss, ece < 0.2 AS calibrated, converged
FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'pca');
-- half of the training labels, chosen by cell_id and seed as finetune chooses them
SELECT train_cells < 30 AS fewer_cells, accuracy FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'pca', '{"label_fraction": 0.5, "seed": 1}');
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'pca', '{"C": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'pca', '{"label_fraction": 2}'); \echo :SQLSTATE
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'pca', '{"penalty": "l1"}'); \echo :SQLSTATE
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'kind', 'genes'); \echo :SQLSTATE
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'no_such_column', 'pca'); \echo :SQLSTATE
CREATE VIEW wells_as_kinds AS SELECT cell_id, label AS kind, mixed AS pca FROM wells;
SELECT * FROM exceiver.linear_probe('programmes_odd', 'wells_as_kinds', 'kind', 'pca'); \echo :SQLSTATE
SELECT * FROM exceiver.linear_probe('programmes_odd', 'programmes_even', 'cell_id', 'pca', '{"label_fraction": 0.01}'); \echo :SQLSTATE
-- bad input
SELECT * FROM exceiver.pca_embed('programmes', 'pca', '{"n_components": 7, "n_top_genes": 20}'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('programmes', 'kind'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('programmes', 'p2', '{"n_components": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('programmes', 'p2', '{"max_value": -1}'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('programmes', 'p2', '{"n_top_genes": "many"}'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('programmes', 'p2', '{"components": 5}'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('not_cells'); \echo :SQLSTATE
SELECT * FROM exceiver.pca_embed('no_such_table'); \echo :SQLSTATE
INSERT INTO programmes VALUES ('bad', 'kind0', ARRAY['G01'], ARRAY[-1]::real[]);
SELECT * FROM exceiver.pca_embed('programmes', 'p2'); \echo :SQLSTATE
DELETE FROM programmes WHERE cell_id = 'bad';

-- embedding_map: UMAP of two clusters of 40 points in 8-D (antipodal centres plus a
-- deterministic wobble); each point's nearest neighbour in the 2-D map has its label
CREATE TABLE blobs AS
SELECT 'p' || lpad(i::text, 3, '0') AS cell_id, CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END AS label,
       (SELECT array_agg((CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END) * (j % 2 * 2 - 1) + 0.3 * sin(i * 7 + j * 13) ORDER BY j)
          FROM generate_series(1, 8) j)::real[]::vector(8) AS emb
FROM generate_series(1, 80) i;
INSERT INTO blobs VALUES ('p999', 'odd', NULL);
SET client_min_messages = warning;
CREATE TABLE blob_map AS
SELECT m.cell_id, m.x, m.y, b.label FROM exceiver.embedding_map('blobs', 'emb', '{"n_neighbors": 10, "seed": 1}') m JOIN blobs b USING (cell_id);
RESET client_min_messages;
SELECT count(*) AS mapped, count(*) FILTER (WHERE same) AS nearest_has_same_label FROM (
  SELECT a.label = (SELECT b.label FROM blob_map b WHERE b.cell_id <> a.cell_id
                    ORDER BY (a.x - b.x) ^ 2 + (a.y - b.y) ^ 2 LIMIT 1) AS same
  FROM blob_map a) s;
-- the same seed gives the same map
SET client_min_messages = warning;
SELECT count(*) AS moved FROM exceiver.embedding_map('blobs', 'emb', '{"n_neighbors": 10, "seed": 1}') m
JOIN blob_map b USING (cell_id) WHERE m.x <> b.x OR m.y <> b.y;
RESET client_min_messages;
-- a PNG of the map, coloured by label
SELECT substring(png FROM 1 FOR 8) = '\x89504e470d0a1a0a'::bytea AS is_png, length(png) > 5000 AS has_content
FROM (SELECT exceiver.map_png('blob_map', 'label', 'two blobs', width => 400, height => 300) AS png) p;
SELECT exceiver.save_png(exceiver.map_png('blob_map', 'label'), '/tmp/exceiver_regress_map.png') > 5000 AS written;
-- bad input
SELECT * FROM exceiver.embedding_map('blobs', 'label'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'no_such_column'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'emb', '{"neighbours": 10}'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'emb', '{"n_neighbors": 1}'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'emb', '{"n_neighbors": 100}'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'emb', '{"metric": "manhattan"}'); \echo :SQLSTATE
SELECT * FROM exceiver.embedding_map('blobs', 'emb', '{"min_dist": "small"}'); \echo :SQLSTATE
UPDATE blobs SET emb = '[0,0,0,0,0,0,0,0]' WHERE cell_id = 'p001';
SELECT * FROM exceiver.embedding_map('blobs', 'emb'); \echo :SQLSTATE
SELECT exceiver.map_png('blob_map', 'no_such_column'); \echo :SQLSTATE
SELECT exceiver.map_png('blob_map', 'label', width => 0); \echo :SQLSTATE
SELECT exceiver.save_png('\x0001'::bytea, '/tmp/exceiver_regress_map.png'); \echo :SQLSTATE
SELECT exceiver.save_png(exceiver.map_png('blob_map'), 'relative.png'); \echo :SQLSTATE
CREATE ROLE exceiver_regress_writer;
GRANT USAGE ON SCHEMA exceiver TO exceiver_regress_writer;
GRANT SELECT ON blob_map TO exceiver_regress_writer;
SET ROLE exceiver_regress_writer;
SELECT exceiver.save_png(exceiver.map_png('blob_map'), '/tmp/exceiver_regress_map.png'); \echo :SQLSTATE
RESET ROLE;
DROP OWNED BY exceiver_regress_writer;
DROP ROLE exceiver_regress_writer;
