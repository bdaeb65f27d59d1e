-- Bulk embedding into a vector column, settings, and judging embeddings against labels.
-- Uses the model 'ts' and table 'cells' made by model.sql.
\set VERBOSITY default

-- settings live under the reserved prefix exceiver. (registered when the library loads)
LOAD 'exceiver';
SHOW exceiver.threads;
SET exceiver.threads = 1;
SET exceiver.no_such_setting = 1;
SET exceiver.threads = -1;
RESET exceiver.threads;
SHOW exceiver.device;
SET exceiver.device = 'banana';
SET exceiver.device = 'cuda:99999';
SET exceiver.device = 'cuda:1';
SELECT * FROM exceiver.embed_table('ts', 'cells', 'emb_gpu');
SELECT * FROM exceiver.train('gpu_model', 'cells');
RESET exceiver.device;

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
SELECT * FROM exceiver.embed_table('ts', 'cells', 'small');
SELECT * FROM exceiver.embed_table('ts', 'cells', 'genes');
SELECT * FROM exceiver.embed_table('ts', 'no_such_table');
CREATE TABLE not_cells (x int);
SELECT * FROM exceiver.embed_table('ts', 'not_cells');
SELECT * FROM exceiver.embed_table('ts', 'cells', 'emb3', batch_size => 0);
SELECT * FROM exceiver.embed_table('nope', 'cells');

-- evaluate_embeddings on vectors whose answer is known by hand: with k = 3, every
-- point but 7 (a B lying among the As) is predicted right: accuracy 6/7, and
-- F1 6/7 for both A (tp 3, fp 1) and B (tp 3, fn 1).
CREATE TABLE toy (id int, emb vector(2), label text);
INSERT INTO toy VALUES (1, '[1,0]', 'A'), (2, '[1,0.1]', 'A'), (3, '[1,0.2]', 'A'),
  (4, '[0,1]', 'B'), (5, '[0.1,1]', 'B'), (6, '[0.2,1]', 'B'), (7, '[0.9,0.1]', 'B'),
  (8, NULL, 'A'), (9, '[1,1]', NULL);
SELECT cells, classes, neighbours, round(accuracy::numeric, 4) AS accuracy, round(macro_f1::numeric, 4) AS macro_f1
FROM exceiver.evaluate_embeddings('toy', 'emb', 'label', k => 3);
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'no_such_column');
SELECT * FROM exceiver.evaluate_embeddings('toy', 'label', 'id');
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'label', k => 0);
UPDATE toy SET label = 'A';
SELECT * FROM exceiver.evaluate_embeddings('toy', 'emb', 'label');
