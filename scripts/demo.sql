-- exceiver end-to-end demo on real data (run by `make demo`).
--   Load Kang IFN-beta PBMCs (.h5ad) and PBMC 3k (10x folder); pretrain a small Exceiver on
--   Kang, and one on Kang and PBMC 3k together without labels; embed PBMC 3k (cells the model never saw) and its genes into pgvector columns
--   with HNSW indexes; nearest neighbours; judge the embedding against published labels
--   beside a random-weights baseline; transfer to predicting IFN-beta stimulation with
--   and without pretraining, with 1%, 10% and 100% of the labels, and to PBMC 3k's cell
--   types (a dataset the model never saw), beside PCA-logistic baselines.
--   Map PBMC 3k onto Kang (reference mapping): transfer Kang's cell_type labels with
--   confidence and unknown, and check that a cell type the reference lacks is unknown.
-- Variables (psql -v): data (folder), results (output file), png and png2 (map pictures),
-- train_opts (jsonb). Both outputs are written by the client (psql), never by the server.
\set ON_ERROR_STOP 1
\pset footer off
\if :{?train_opts}
\else
  \set train_opts '{"preset": "small"}'
\endif
\if :{?ft_opts}
\else
  \set ft_opts '{}'
\endif
SET client_min_messages = notice;
DROP TABLE IF EXISTS joint_train, pbmc_train, pbmc_test, pbmc3k, pbmc3k_genes, kang_genes, kang, kang_train, kang_test, pbmc_genes, pbmc_map, demo_results, kang_ref, kang_ref_no_b, label_map, pbmc_transfer, pbmc_transfer_no_b, pbmc_transfer_map;
SELECT exceiver.drop_model(name) FROM exceiver.models WHERE name LIKE 'demo\_%';
CREATE TABLE demo_results (step int, what text, value text);

\echo
\echo '== 1. Load the data'
\timing on
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'pbmc3k');
SELECT * FROM exceiver.load_h5ad(:'data' || '/kang_ifnb/kang_ifnb.h5ad', 'kang');
\timing off
SELECT 'pbmc3k' AS dataset, count(*) AS cells, sum(cardinality(genes)) AS nonzeros,
       count(*) FILTER (WHERE seurat_annotations IS NOT NULL) AS labelled FROM pbmc3k
UNION ALL
SELECT 'kang', count(*), sum(cardinality(genes)), count(*) FILTER (WHERE stim IS NOT NULL) FROM kang;
SELECT coalesce(seurat_annotations, '(unlabelled)') AS pbmc3k_seurat_annotations, count(*) AS cells
FROM pbmc3k GROUP BY 1 ORDER BY 2 DESC;
SELECT stim, count(*) AS cells FROM kang GROUP BY 1 ORDER BY 1;
INSERT INTO demo_results
SELECT 1, 'pbmc3k cells / non-zeros', count(*) || ' / ' || sum(cardinality(genes)) FROM pbmc3k UNION ALL
SELECT 1, 'kang cells / non-zeros', count(*) || ' / ' || sum(cardinality(genes)) FROM kang;

\echo
\echo '== 2. Split Kang 80/20 (hash of cell_id) and pretrain on the 80% (self-supervised)'
CREATE TABLE kang_train AS SELECT * FROM kang WHERE abs(hashtext(cell_id)) % 5 <> 0;
CREATE TABLE kang_test AS SELECT * FROM kang WHERE abs(hashtext(cell_id)) % 5 = 0;
SELECT (SELECT count(*) FROM kang_train) AS train_cells, (SELECT count(*) FROM kang_test) AS test_cells;
\echo 'train options: ' :'train_opts'
\timing on
SELECT model, epochs, steps, round(best_val_mse::numeric, 4) AS best_val_mse,
       round(baseline_val_mse::numeric, 4) AS per_gene_mean_baseline_mse, round(seconds::numeric) AS seconds,
       round(cells_per_s::numeric) AS cells_per_s
FROM exceiver.train('demo_kang', 'kang_train', :'train_opts');
\timing off
-- the same shape with random weights: the baseline embedding
SET client_min_messages = warning;
SELECT model FROM exceiver.train('demo_random', 'kang_train', (:'train_opts'::jsonb || '{"epochs": 0}')::jsonb);
SET client_min_messages = notice;
\echo '-- a second model with the same options on Kang''s 80% and PBMC 3k together, without labels:'
\echo '-- as a user trains on all their cells, those they will query included (as PCA is fit on them)'
CREATE TABLE joint_train AS
SELECT cell_id, genes, counts FROM kang_train UNION ALL SELECT cell_id, genes, counts FROM pbmc3k;
\timing on
SELECT model, epochs, steps, round(best_val_mse::numeric, 4) AS best_val_mse, round(seconds::numeric) AS seconds
FROM exceiver.train('demo_joint', 'joint_train', :'train_opts');
\timing off
INSERT INTO demo_results
SELECT 2, 'pretraining: validation MSE (per-gene-mean baseline)',
       round((metrics->>'best_val_mse')::numeric, 4) || ' (' || round((metrics->>'baseline_val_mse')::numeric, 4) || ')'
FROM exceiver.models WHERE name = 'demo_kang' UNION ALL
SELECT 2, 'pretraining: epochs, seconds, training cells/s',
       (metrics->>'epochs') || ', ' || round((metrics->>'seconds')::numeric) || ', ' || round((metrics->>'train_cells_per_s')::numeric)
FROM exceiver.models WHERE name = 'demo_kang' UNION ALL
SELECT 2, 'pretraining on Kang + PBMC 3k: epochs, seconds, training cells/s',
       (metrics->>'epochs') || ', ' || round((metrics->>'seconds')::numeric) || ', ' || round((metrics->>'train_cells_per_s')::numeric)
FROM exceiver.models WHERE name = 'demo_joint';

\echo
\echo '== 3. Embed PBMC 3k (never seen in training) and its genes into pgvector, HNSW indexes'
\timing on
SELECT * FROM exceiver.embed_table('demo_kang', 'pbmc3k', 'emb');
SELECT * FROM exceiver.embed_table('demo_random', 'pbmc3k', 'emb_random');
SELECT * FROM exceiver.embed_table('demo_joint', 'pbmc3k', 'emb_joint');
CREATE INDEX ON pbmc3k USING hnsw (emb vector_cosine_ops);
CREATE TABLE pbmc_genes AS SELECT * FROM exceiver.gene_embeddings('demo_kang');
-- an index needs the dimension in the column type
SELECT vector_dims(embedding) AS gene_dim FROM pbmc_genes LIMIT 1 \gset
ALTER TABLE pbmc_genes ALTER COLUMN embedding TYPE vector(:gene_dim);
CREATE INDEX ON pbmc_genes USING hnsw (embedding vector_cosine_ops);
\timing off
\echo '-- the 8 cells nearest to one B cell (AAACATTGAGCTAC-1), with their labels'
SELECT cell_id, seurat_annotations, round((emb <=> (SELECT emb FROM pbmc3k WHERE cell_id = 'AAACATTGAGCTAC-1'))::numeric, 4) AS cosine_distance
FROM pbmc3k ORDER BY emb <=> (SELECT emb FROM pbmc3k WHERE cell_id = 'AAACATTGAGCTAC-1') LIMIT 8;
\echo '-- the 8 genes nearest to ISG15 (interferon-stimulated) in the gene embedding'
SELECT gene, round((embedding <=> (SELECT embedding FROM pbmc_genes WHERE gene = 'ISG15'))::numeric, 4) AS cosine_distance
FROM pbmc_genes ORDER BY embedding <=> (SELECT embedding FROM pbmc_genes WHERE gene = 'ISG15') LIMIT 8;

\echo
\echo '== 4. Judge the embeddings against the published labels: kNN-15, and scIB''s NMI/ARI/ASW'
\echo '-- beside the field''s baseline computed in the database (HVG + PCA, exceiver.pca_embed)'
\timing on
SELECT cells, genes, components, round(variance_explained::numeric, 3) AS variance_explained
FROM exceiver.pca_embed('pbmc3k', 'pca');
CREATE TEMP TABLE knn AS
SELECT 'exceiver pretrained on Kang' AS embedding, * FROM exceiver.evaluate_embeddings('pbmc3k', 'emb', 'seurat_annotations', 15)
UNION ALL
SELECT 'exceiver pretrained on Kang + PBMC 3k (no labels)', * FROM exceiver.evaluate_embeddings('pbmc3k', 'emb_joint', 'seurat_annotations', 15)
UNION ALL
SELECT 'same model, random weights', * FROM exceiver.evaluate_embeddings('pbmc3k', 'emb_random', 'seurat_annotations', 15)
UNION ALL
SELECT 'PCA of 2,000 variable genes (pca_embed)', * FROM exceiver.evaluate_embeddings('pbmc3k', 'pca', 'seurat_annotations', 15);
\timing off
SELECT embedding, cells, classes, round(accuracy::numeric, 3) AS accuracy, round(macro_f1::numeric, 3) AS macro_f1,
       round(nmi::numeric, 3) AS nmi, round(ari::numeric, 3) AS ari, round(asw::numeric, 3) AS asw,
       round(avg_bio::numeric, 3) AS avg_bio FROM knn;
INSERT INTO demo_results SELECT 4, 'pbmc3k kNN-15 accuracy / macro-F1, ' || embedding,
       round(accuracy::numeric, 3) || ' / ' || round(macro_f1::numeric, 3) FROM knn
UNION ALL
SELECT 4, 'pbmc3k NMI / ARI / ASW (AvgBIO), ' || embedding,
       round(nmi::numeric, 3) || ' / ' || round(ari::numeric, 3) || ' / ' || round(asw::numeric, 3)
       || ' (' || round(avg_bio::numeric, 3) || ')' FROM knn;

\echo
\echo '== 4b. A 2-D map (UMAP) of the PBMC 3k embedding, as x/y columns and a PNG'
\timing on
CREATE TABLE pbmc_map AS
SELECT m.cell_id, m.x, m.y, p.seurat_annotations
FROM exceiver.embedding_map('pbmc3k', 'emb') m JOIN pbmc3k p USING (cell_id);
\timing off
-- The client writes the picture (\lo_export), not the server: the file belongs to whoever
-- runs the demo, wherever the checkout is, and no server-file privilege is needed.
SELECT lo_from_bytea(0, exceiver.map_png('pbmc_map', 'seurat_annotations',
         'PBMC 3k, embedded by exceiver pretrained on Kang (UMAP)')) AS png_oid \gset
SELECT length(lo_get(:png_oid)) AS png_bytes;
\lo_export :png_oid :png
SELECT lo_unlink(:png_oid) AS png_large_object_removed;
INSERT INTO demo_results SELECT 4, 'pbmc3k UMAP map (x/y table pbmc_map), PNG', :'png';

\echo
\echo '== 5. Transfer: predict IFN-beta stimulation (stim) of held-out Kang cells'
\echo 'finetune options: ' :'ft_opts' ' (finetune''s defaults otherwise: the classifier on whole cells,'
\echo 'up to 100 epochs that early stopping cuts short; the same rule for pretrained and random weights)'
SET client_min_messages = warning;
CREATE TEMP TABLE stim_runs AS
SELECT init, frac, (SELECT model FROM exceiver.finetune('demo_kang', 'demo_stim_' || init || '_' || (frac * 100)::int, 'kang_train', 'stim',
                   (:'ft_opts'::jsonb || jsonb_build_object('init', init, 'label_fraction', frac)))) AS model
FROM (VALUES ('pretrained'), ('random')) i(init), (VALUES (0.01), (0.1), (1.0)) f(frac);
CREATE TEMP TABLE stim_acc AS
SELECT r.init, r.frac, round(e.accuracy::numeric, 3) AS test_accuracy, round(e.ece::numeric, 3) AS ece,
       (SELECT (metrics->>'epochs')::int FROM exceiver.model_catalog WHERE name = r.model) AS epochs
FROM stim_runs r, exceiver.evaluate_classifier(r.model, 'kang_test', 'stim') e;
SET client_min_messages = notice;
\echo '-- the field''s simplest strong baseline: logistic regression on the PCA of all Kang cells'
\echo '-- (exceiver.linear_probe on the same labelled training cells, chosen as finetune chooses them)'
SELECT cells, genes, components FROM exceiver.pca_embed('kang', 'pca');
CREATE TEMP VIEW kang_train_pca AS SELECT t.cell_id, t.stim, k.pca FROM kang_train t JOIN kang k USING (cell_id);
CREATE TEMP VIEW kang_test_pca AS SELECT t.cell_id, t.stim, k.pca FROM kang_test t JOIN kang k USING (cell_id);
SET client_min_messages = warning;
INSERT INTO stim_acc
SELECT 'PCA-logistic', f.frac, round(p.accuracy::numeric, 3), round(p.ece::numeric, 3), NULL
FROM (VALUES (0.01), (0.1), (1.0)) f(frac),
     exceiver.linear_probe('kang_train_pca', 'kang_test_pca', 'stim', 'pca', jsonb_build_object('label_fraction', f.frac)) p;
SET client_min_messages = notice;
SELECT frac * 100 || '%' AS labels_used,
       max(test_accuracy) FILTER (WHERE init = 'pretrained') AS pretrained,
       max(test_accuracy) FILTER (WHERE init = 'random') AS from_scratch,
       max(test_accuracy) FILTER (WHERE init = 'PCA-logistic') AS pca_logistic,
       max(epochs) FILTER (WHERE init = 'pretrained') AS pretrained_epochs,
       max(epochs) FILTER (WHERE init = 'random') AS from_scratch_epochs
FROM stim_acc GROUP BY frac ORDER BY frac;
INSERT INTO demo_results SELECT 5, 'stim test accuracy (ECE), ' || (frac * 100) || '% labels, ' || init,
       test_accuracy || ' (' || ece || ')' || coalesce(', ' || epochs || ' epochs', '')
FROM stim_acc ORDER BY frac, init;

\echo
\echo '== 5b. Fine-tuning on a dataset the model never saw: PBMC 3k cell types, 80/20'
\echo '-- finetune with default options (pretrained on Kang; pretrained on Kang + PBMC 3k without'
\echo '-- labels; from random weights) beside logistic regression on PBMC 3k''s PCA and on each'
\echo '-- pretrained model''s embedding (linear probes)'
CREATE TABLE pbmc_train AS SELECT cell_id, genes, counts, seurat_annotations, pca, emb, emb_joint FROM pbmc3k
 WHERE seurat_annotations IS NOT NULL AND abs(hashtext(cell_id)) % 5 <> 0;
CREATE TABLE pbmc_test AS SELECT cell_id, genes, counts, seurat_annotations, pca, emb, emb_joint FROM pbmc3k
 WHERE seurat_annotations IS NOT NULL AND abs(hashtext(cell_id)) % 5 = 0;
SET client_min_messages = warning;
CREATE TEMP TABLE pbmc_ft AS
SELECT what, (SELECT model FROM exceiver.finetune(base, name, 'pbmc_train', 'seurat_annotations', opts)) AS model
FROM (VALUES ('pretrained on Kang', 'demo_kang', 'demo_pbmc_pretrained', '{}'::jsonb),
             ('pretrained on Kang + PBMC 3k', 'demo_joint', 'demo_pbmc_joint', '{}'::jsonb),
             ('random weights', 'demo_kang', 'demo_pbmc_random', '{"init": "random"}'::jsonb)) v(what, base, name, opts);
CREATE TEMP TABLE pbmc_acc AS
SELECT 'finetune, ' || f.what AS what, e.accuracy, e.macro_f1, e.ece,
       (SELECT (metrics->>'epochs')::int FROM exceiver.model_catalog WHERE name = f.model) AS epochs
FROM pbmc_ft f, exceiver.evaluate_classifier(f.model, 'pbmc_test', 'seurat_annotations') e
UNION ALL
SELECT 'PCA-logistic', accuracy, macro_f1, ece, NULL
FROM exceiver.linear_probe('pbmc_train', 'pbmc_test', 'seurat_annotations', 'pca')
UNION ALL
SELECT 'logistic on the embedding pretrained on Kang', accuracy, macro_f1, ece, NULL
FROM exceiver.linear_probe('pbmc_train', 'pbmc_test', 'seurat_annotations', 'emb')
UNION ALL
SELECT 'logistic on the embedding pretrained on Kang + PBMC 3k', accuracy, macro_f1, ece, NULL
FROM exceiver.linear_probe('pbmc_train', 'pbmc_test', 'seurat_annotations', 'emb_joint');
SET client_min_messages = notice;
SELECT what, round(accuracy::numeric, 3) AS test_accuracy, round(macro_f1::numeric, 3) AS macro_f1,
       round(ece::numeric, 3) AS ece, epochs FROM pbmc_acc ORDER BY accuracy DESC;
INSERT INTO demo_results SELECT 5, 'pbmc3k cell types, 20% held out, accuracy / macro-F1 (ECE), ' || what,
       round(accuracy::numeric, 3) || ' / ' || round(macro_f1::numeric, 3) || ' (' || round(ece::numeric, 3) || ')'
       || coalesce(', ' || epochs || ' epochs', '')
FROM pbmc_acc;

\echo
\echo '== 6. Reference mapping: transfer Kang''s cell_type labels onto PBMC 3k'
-- Kang's cells (training and test) embedded by the same model are the reference.
SET client_min_messages = warning;
SELECT cells FROM exceiver.embed_table('demo_kang', 'kang', 'emb');
SET client_min_messages = notice;
CREATE TABLE kang_ref AS SELECT cell_id, emb, cell_type FROM kang;
SELECT cell_type, count(*) AS reference_cells FROM kang_ref GROUP BY 1 ORDER BY 2 DESC;
-- How the two annotations name the same types (PBMC 3k's Platelet has no Kang
-- counterpart: those cells should come out unknown; Kang's 'T' has no PBMC 3k one).
CREATE TABLE label_map (seurat_annotations text PRIMARY KEY, cell_type text);
INSERT INTO label_map VALUES ('B', 'B'), ('CD14+ Mono', 'CD14+ Monocytes'), ('FCGR3A+ Mono', 'CD16+ Monocytes'),
  ('Naive CD4 T', 'CD4+ T cells'), ('Memory CD4 T', 'CD4+ T cells'), ('CD8 T', 'CD8+ T cells'),
  ('NK', 'NK cells'), ('DC', 'DC'), ('Platelet', NULL);
\timing on
CREATE TABLE pbmc_transfer AS SELECT * FROM exceiver.transfer_labels('pbmc3k', 'kang_ref', 'cell_type', 'emb', 15);
\timing off
CREATE TEMP VIEW transfer_scored AS
SELECT p.seurat_annotations, m.cell_type AS expected, t.*
FROM pbmc_transfer t JOIN pbmc3k p USING (cell_id) LEFT JOIN label_map m USING (seurat_annotations)
WHERE p.seurat_annotations IS NOT NULL;
SELECT seurat_annotations, expected, count(*) AS cells,
       round(avg((label = expected)::int)::numeric, 3) AS right_label,
       round(avg((label = 'unknown')::int)::numeric, 3) AS unknown,
       round(avg((label <> 'unknown' AND label IS DISTINCT FROM expected)::int)::numeric, 3) AS wrong_label,
       round(avg(confidence)::numeric, 3) AS mean_confidence
FROM transfer_scored GROUP BY 1, 2 ORDER BY 1;
INSERT INTO demo_results
SELECT 6, 'transfer Kang cell_type -> pbmc3k: accuracy of assigned cells (types both have)',
       round(avg((label = expected)::int)::numeric, 3) || ' of ' || count(*) || ' cells'
FROM transfer_scored WHERE expected IS NOT NULL AND label <> 'unknown' UNION ALL
SELECT 6, 'transfer Kang cell_type -> pbmc3k: unknown (types both have)',
       round(avg((label = 'unknown')::int)::numeric, 3)::text FROM transfer_scored WHERE expected IS NOT NULL UNION ALL
SELECT 6, 'transfer Kang cell_type -> pbmc3k: unknown (Platelet, not in Kang)',
       round(avg((label = 'unknown')::int)::numeric, 3) || ' of ' || count(*) || ' cells' FROM transfer_scored WHERE seurat_annotations = 'Platelet';
\echo '-- held out: the reference without its B cells; PBMC 3k''s B cells should come out unknown'
CREATE TABLE kang_ref_no_b AS SELECT * FROM kang_ref WHERE cell_type <> 'B';
CREATE TABLE pbmc_transfer_no_b AS SELECT * FROM exceiver.transfer_labels('pbmc3k', 'kang_ref_no_b', 'cell_type', 'emb', 15);
SELECT p.seurat_annotations = 'B' AS pbmc3k_b_cell, t.status, count(*) AS cells
FROM pbmc_transfer_no_b t JOIN pbmc3k p USING (cell_id) WHERE p.seurat_annotations IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2;
INSERT INTO demo_results
SELECT 6, 'transfer without Kang''s B cells: pbmc3k B cells called unknown',
       round(avg((t.label = 'unknown')::int)::numeric, 3) || ' of ' || count(*)
FROM pbmc_transfer_no_b t JOIN pbmc3k p USING (cell_id) WHERE p.seurat_annotations = 'B' UNION ALL
SELECT 6, 'transfer without Kang''s B cells: other pbmc3k cells called unknown',
       round(avg((t.label = 'unknown')::int)::numeric, 3) || ' of ' || count(*)
FROM pbmc_transfer_no_b t JOIN pbmc3k p USING (cell_id) WHERE p.seurat_annotations IS NOT NULL AND p.seurat_annotations <> 'B';
-- the map coloured by transferred label
CREATE TABLE pbmc_transfer_map AS SELECT m.cell_id, m.x, m.y, t.label AS transferred_label
FROM pbmc_map m JOIN pbmc_transfer t USING (cell_id);
SELECT lo_from_bytea(0, exceiver.map_png('pbmc_transfer_map', 'transferred_label',
         'PBMC 3k, cell types transferred from Kang (exceiver.transfer_labels)')) AS png2_oid \gset
\lo_export :png2_oid :png2
SELECT lo_unlink(:png2_oid) AS png_large_object_removed;
INSERT INTO demo_results SELECT 6, 'pbmc3k map coloured by transferred label, PNG', :'png2';

\echo
\echo '== Results'
SELECT step, what, value FROM demo_results ORDER BY step, what;
\o :results
\qecho '# exceiver demo results'
\qecho
\qecho 'Produced by `make demo` (scripts/demo.sql). Training options:' :'train_opts'
\qecho
SELECT step, what, value FROM demo_results ORDER BY step, what;
\o
\echo 'results written to ' :'results'
