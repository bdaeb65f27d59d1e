-- Importing the published checkpoints, embedding cells, gene embeddings, prediction.
\getenv root EXCEIVER_ROOT
\set VERBOSITY default
-- The published checkpoints do not say which gene each embedding row is: name them G0..G19066.
SELECT * FROM exceiver.import_checkpoint('ts', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt',
                                         ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
SELECT * FROM exceiver.import_checkpoint('ts_clf', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver_classifier.ckpt',
                                         ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
SELECT name, kind, n_genes, embedding_dim, has_scaler, config->>'num_layers' AS layers, config->>'num_classes' AS classes
FROM exceiver.models ORDER BY name;
-- models are extension configuration tables, so pg_dump keeps them
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'exceiver';

-- embeddings into a pgvector column
CREATE TABLE cells (cell_id text PRIMARY KEY, genes text[], counts real[]);
INSERT INTO cells VALUES
  ('a', ARRAY['G1','G5','G100','G7000'], ARRAY[3,1,7,2]),
  ('b', ARRAY['G2','G5','NOT_A_GENE'], ARRAY[1,2,5]),
  ('c', ARRAY['G1','G5','G100','G7000'], ARRAY[30,10,70,20]);  -- same profile as 'a', 10x depth
ALTER TABLE cells ADD COLUMN emb vector(512);
UPDATE cells SET emb = exceiver.embed('ts', genes, counts);
SELECT cell_id, vector_dims(emb) AS dims,
       (SELECT array_agg(round(x::numeric, 3)) FROM unnest((emb::real[])[1:4]) x) AS first4
FROM cells ORDER BY cell_id;
-- library-size normalisation: 'a' and 'c' have the same embedding
SELECT round((a.emb <-> c.emb)::numeric, 5) AS a_c_distance FROM cells a, cells c WHERE a.cell_id = 'a' AND c.cell_id = 'c';
SELECT c.cell_id FROM cells c ORDER BY c.emb <-> (SELECT emb FROM cells WHERE cell_id = 'a'), c.cell_id LIMIT 2;
-- most genes unknown: a NOTICE
SELECT vector_dims(exceiver.embed('ts', ARRAY['G1','X1','X2'], ARRAY[1,1,1]::real[]));
-- ... once per statement, not once per row (three such cells, one NOTICE)
SELECT count(exceiver.embed('ts', ARRAY['G1','X1','X2'], ARRAY[i,1,1]::real[])) AS embedded
FROM generate_series(1, 3) i;
-- STRICT: NULL in, NULL out
SELECT exceiver.embed('ts', NULL, ARRAY[1]::real[]) IS NULL AS is_null;

-- gene embeddings (rows of the gene embedding matrix)
SELECT count(*), min(vector_dims(embedding)) FROM exceiver.gene_embeddings('ts');
SELECT gene FROM exceiver.gene_embeddings('ts') ORDER BY embedding <-> (SELECT embedding FROM exceiver.gene_embeddings('ts') WHERE gene = 'G42'), gene LIMIT 1;

-- predicted expression of chosen genes given the cell's context
SELECT (SELECT array_agg(round(x::numeric, 3)) FROM unnest(
  exceiver.predict_expression('ts', ARRAY['G1','G5','G100'], ARRAY[3,1,7]::real[], ARRAY['G1','G7','G100'])) x) AS model_scale;
SELECT cardinality(exceiver.predict_expression('ts', ARRAY['G1'], ARRAY[3]::real[], ARRAY['G1','G2'], scale => 'log1p')) AS n;

-- which genes each latent attends to (head-averaged encoder attention), top 2 per latent
SELECT latent, rank, gene, round((weight * 1e6)::numeric, 1) AS weight_ppm, round((expressed_mass * 1e6)::numeric, 1) AS expressed_mass_ppm
FROM exceiver.encoder_attention('ts', ARRAY['G1','G5','G100'], ARRAY[3,1,7]::real[], top_k => 2)
WHERE latent < 2 ORDER BY latent, rank;
SELECT count(*) FROM exceiver.encoder_attention('ts', ARRAY['G1','G5','G100'], ARRAY[3,1,7]::real[]);
SELECT * FROM exceiver.encoder_attention('ts', ARRAY['G1'], ARRAY[3]::real[], top_k => 0); \echo :SQLSTATE
-- a huge top_k is refused before any allocation (it used to abort the backend) ...
SELECT * FROM exceiver.encoder_attention('ts', ARRAY['G1'], ARRAY[3]::real[], top_k => 2147483647); \echo :SQLSTATE
-- ... and a large valid one returns at most the cell's genes per latent
SELECT count(*) AS rows, count(DISTINCT latent) AS latents FROM exceiver.encoder_attention('ts', ARRAY['G1','G2'], ARRAY[3,1]::real[], top_k => 1000000);

-- the published classifier (24 tissue classes, names unpublished: class_0..class_23)
SELECT exceiver.classify('ts_clf', ARRAY['G1','G5','G100'], ARRAY[3,1,7]::real[]) LIKE 'class_%' AS is_label;
SELECT count(*), round(sum(probability)::numeric, 4) AS total FROM exceiver.classify_proba('ts_clf', ARRAY['G1','G5','G100'], ARRAY[3,1,7]::real[]);

-- bad input: each a clear error
SELECT exceiver.embed('ts', ARRAY['G1','G2'], ARRAY[1]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1',NULL], ARRAY[1,2]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1','G2'], ARRAY[1,NULL]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1'], ARRAY[-1]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1'], ARRAY['NaN']::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1'], ARRAY['Infinity']::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['X1','X2'], ARRAY[1,2]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1','G1'], ARRAY[1,2]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('ts', ARRAY['G1'], ARRAY[0]::real[]); \echo :SQLSTATE
SELECT exceiver.embed('nope', ARRAY['G1'], ARRAY[1]::real[]); \echo :SQLSTATE
SELECT exceiver.predict_expression('ts', ARRAY['G1'], ARRAY[1]::real[], ARRAY['NOPE']); \echo :SQLSTATE
SELECT exceiver.predict_expression('ts', ARRAY['G1'], ARRAY[1]::real[], ARRAY['G1'], scale => 'linear'); \echo :SQLSTATE
SELECT exceiver.classify('ts', ARRAY['G1'], ARRAY[1]::real[]); \echo :SQLSTATE
SELECT * FROM exceiver.import_checkpoint('x', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt', ARRAY['a','b','c']); \echo :SQLSTATE
SELECT * FROM exceiver.import_checkpoint('x', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt',
                                         ARRAY(SELECT 'G' || (i % 19000) FROM generate_series(0, 19066) i)); \echo :SQLSTATE
SELECT * FROM exceiver.import_checkpoint('x', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt',
                                         ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i), ARRAY[1,2]::real[], ARRAY[1,2]::real[]); \echo :SQLSTATE
SELECT * FROM exceiver.import_checkpoint('ts', :'root' || '/fixtures/checkpoints/pretrained_TS_exceiver.ckpt', ARRAY['a']); \echo :SQLSTATE
SELECT * FROM exceiver.import_checkpoint('x', '/nonexistent/model.ckpt', ARRAY['a']); \echo :SQLSTATE
COPY (SELECT 'not a checkpoint') TO '/tmp/exceiver_regress_bad.ckpt';
SELECT * FROM exceiver.import_checkpoint('x', '/tmp/exceiver_regress_bad.ckpt', ARRAY['a']); \echo :SQLSTATE
COPY (SELECT 'not safetensors') TO '/tmp/exceiver_regress_bad.safetensors';
SELECT * FROM exceiver.import_checkpoint('x', '/tmp/exceiver_regress_bad.safetensors', ARRAY['a']); \echo :SQLSTATE

CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
SELECT q AS call, pg_temp.sqlstate_of(q) AS sqlstate FROM (VALUES
  ($$SELECT exceiver.embed('ts', ARRAY['G1','G2'], ARRAY[1]::real[])$$),
  ($$SELECT exceiver.embed('ts', ARRAY['G1',NULL], ARRAY[1,2]::real[])$$),
  ($$SELECT exceiver.embed('ts', ARRAY['G1'], ARRAY[-1]::real[])$$),
  ($$SELECT exceiver.embed('ts', ARRAY['X1'], ARRAY[1]::real[])$$),
  ($$SELECT exceiver.embed('nope', ARRAY['G1'], ARRAY[1]::real[])$$),
  ($$SELECT exceiver.import_checkpoint('ts', '/nonexistent/model.ckpt', ARRAY['a'])$$),
  ($$SELECT exceiver.import_checkpoint('x', '/nonexistent/model.ckpt', ARRAY['a'])$$),
  ($$SELECT exceiver.import_checkpoint('x', '/tmp/exceiver_regress_bad.ckpt', ARRAY['a'])$$)
) v(q);

SELECT exceiver.drop_model('ts_clf'); \echo :SQLSTATE
SELECT name FROM exceiver.models ORDER BY name;
SELECT exceiver.drop_model('ts_clf');
