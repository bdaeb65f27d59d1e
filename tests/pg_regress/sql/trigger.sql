-- Embed on insert (exceiver.embed_trigger) and half-precision embeddings (halfvec).
-- Uses the model 'ts' made by model.sql.
\set VERBOSITY default
CREATE TABLE live_cells (cell_id text PRIMARY KEY, genes text[], counts real[], label text,
                         emb vector(512), half halfvec(512));
CREATE TRIGGER live_emb BEFORE INSERT OR UPDATE OF genes, counts ON live_cells
  FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
CREATE TRIGGER live_half BEFORE INSERT OR UPDATE OF genes, counts ON live_cells
  FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'half');
INSERT INTO live_cells (cell_id, genes, counts, label) VALUES
  ('a', ARRAY['G1','G5','G100','G7000'], ARRAY[3,1,7,2], 'x'),
  ('b', ARRAY['G2','G5','NOT_A_GENE'], ARRAY[1,2,5], 'y'),
  ('none', ARRAY['NOT_A_GENE'], ARRAY[4], 'y'),     -- no counts on the model's genes: NULL
  ('null', NULL, NULL, 'y');                        -- NULL arrays: NULL
COPY live_cells (cell_id, genes, counts, label) FROM STDIN;
c	{G1,G5,G100,G7000}	{30,10,70,20}	x
d	{G3,G8,G13}	{2,2,9}	y
\.
-- each embedding is exceiver.embed's, the halfvec one its half-precision rounding
SELECT cell_id, emb IS NOT NULL AS embedded, half IS NOT NULL AS half_embedded,
       CASE WHEN emb IS NOT NULL THEN emb = exceiver.embed('ts', genes, counts) END AS same_as_embed,
       CASE WHEN half IS NOT NULL THEN half = exceiver.embed('ts', genes, counts)::halfvec END AS half_same_as_cast,
       round((half::vector <=> emb)::numeric, 6) AS half_cosine_distance
FROM live_cells ORDER BY cell_id;
-- an UPDATE of other columns keeps the embedding; a changed cell gets a new one
CREATE TEMP TABLE before_update AS SELECT cell_id, emb FROM live_cells;
UPDATE live_cells SET label = 'z' WHERE cell_id = 'a';
UPDATE live_cells SET counts = ARRAY[1,1,1,1] WHERE cell_id = 'c';
SELECT l.cell_id, l.emb = b.emb AS unchanged, l.emb = exceiver.embed('ts', l.genes, l.counts) AS current
FROM live_cells l JOIN before_update b USING (cell_id) WHERE l.emb IS NOT NULL ORDER BY cell_id;
-- a column the trigger was added after: UPDATE … SET genes = genes fills it
ALTER TABLE live_cells ADD COLUMN late vector(512);
CREATE TRIGGER live_late BEFORE INSERT OR UPDATE ON live_cells
  FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'late');
UPDATE live_cells SET genes = genes;
SELECT count(late) AS late_filled, count(*) FILTER (WHERE late = emb) AS late_equal FROM live_cells;
DROP TRIGGER live_late ON live_cells;

-- halfvec end to end: embed_table fills a halfvec column, HNSW indexes it, the
-- evaluation and mapping functions read it
ALTER TABLE live_cells ADD COLUMN half2 halfvec(512);
SELECT cells, skipped FROM exceiver.embed_table('ts', 'live_cells', 'half2');
SELECT count(*) FILTER (WHERE half2 = half) AS equal, count(half2) AS filled FROM live_cells;
CREATE INDEX live_half_hnsw ON live_cells USING hnsw (half halfvec_cosine_ops);
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT cell_id FROM live_cells ORDER BY half <=> (SELECT half FROM live_cells WHERE cell_id = 'a') LIMIT 2;
-- a and c (the same four genes) lie close together: which of them HNSW returns
-- first is not fixed, so the two nearest are shown in name order
SELECT cell_id FROM (SELECT cell_id FROM live_cells ORDER BY half <=> (SELECT half FROM live_cells WHERE cell_id = 'a') LIMIT 2) nn ORDER BY cell_id;
RESET enable_seqscan;
SELECT cells, classes, neighbours FROM exceiver.evaluate_embeddings('live_cells', 'half', 'label', 1);
ALTER TABLE live_cells ADD COLUMN half3 halfvec(3);
SELECT * FROM exceiver.embed_table('ts', 'live_cells', 'half3'); \echo :SQLSTATE
ALTER TABLE live_cells DROP COLUMN half3;

-- bad uses, each with its SQLSTATE at the first row it sees
CREATE TABLE bad_cells (cell_id text, genes text[], counts real[], emb vector(512), small vector(3), note text);
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('no_such_model', 'emb');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'no_such_column');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'note');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'small');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t AFTER INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH STATEMENT EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
CREATE TRIGGER t BEFORE DELETE ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]);
DELETE FROM bad_cells; \echo :SQLSTATE
DROP TRIGGER t ON bad_cells;
TRUNCATE bad_cells;
CREATE TRIGGER t BEFORE INSERT ON bad_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1','G2'], ARRAY[1]); \echo :SQLSTATE
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1','G2'], ARRAY[1,-1]); \echo :SQLSTATE
INSERT INTO bad_cells (genes, counts) VALUES (ARRAY['G1',NULL], ARRAY[1,1]); \echo :SQLSTATE
SELECT count(*) AS bad_rows_written FROM bad_cells;
CREATE TABLE double_cells (genes text[], counts double precision[], emb vector(512));
CREATE TRIGGER t BEFORE INSERT ON double_cells FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('ts', 'emb');
INSERT INTO double_cells (genes, counts) VALUES (ARRAY['G1'], ARRAY[1]); \echo :SQLSTATE
DROP TABLE bad_cells, double_cells;
SELECT 'alive' AS session;
