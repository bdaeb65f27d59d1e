-- Training in SQL: masked value prediction, fine-tuning, classifier transfer, cancel.
-- Uses the tables kang and pbmc3k loaded by load.sql. Losses depend on the CPU's
-- kernels, so this file checks structure and behaviour; learning itself is tested in
-- the core crate (gradient parity with the reference, loss below the baseline).
\set VERBOSITY default
-- progress NOTICEs carry timings
SET client_min_messages = warning;
CREATE TABLE kang_small AS SELECT * FROM kang ORDER BY cell_id LIMIT 300;
SELECT model, epochs, steps, best_val_mse > 0 AS has_val, baseline_val_mse > 0 AS has_baseline
FROM exceiver.train('tiny', 'kang_small', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
                                           "dim_feedforward": 32, "epochs": 2, "batch_size": 32, "min_cells": 20}');
RESET client_min_messages;
SELECT name, kind, n_genes > 100 AS many_genes, embedding_dim, has_scaler, parent, source,
       jsonb_array_length((SELECT history FROM exceiver.model_catalog WHERE name = 'tiny')) AS history_epochs,
       metrics ? 'best_val_mse' AND metrics ? 'n_mask' AS has_metrics
FROM exceiver.models WHERE name = 'tiny';
-- the small preset's choices, recorded in the config: expressed-only attention, value embedding
SELECT config->>'attention' AS attention, config->>'value_embedding' AS value_embedding FROM exceiver.models WHERE name = 'tiny';
-- ... and the contrastive term: recorded in the options, its losses in every epoch's history
SELECT metrics->'options'->>'contrastive' AS contrastive, metrics->'options'->>'contrastive_keep' AS keep,
       metrics->'options'->>'contrastive_depth' AS depth,
       metrics->'options'->>'contrastive_head' AS head,
       (SELECT bool_and(h ? 'train_contrastive' AND h ? 'val_contrastive')
        FROM jsonb_array_elements(history) h) AS history_has_contrastive
FROM exceiver.model_catalog WHERE name = 'tiny';
-- ... and unstandardised values (model value = log1p + 1: every gene's mean 0 and scale 1)
SELECT metrics->'options'->>'standardize' AS standardize,
       (SELECT bool_and(m = 0) FROM unnest(scaler_mean) m) AND (SELECT bool_and(s = 1) FROM unnest(scaler_std) s) AS identity_scaler
FROM exceiver.model_catalog WHERE name = 'tiny';
-- reproducible: the same options, seed and exceiver.threads give the same weights, byte for byte
SET client_min_messages = warning;
SELECT model FROM exceiver.train('tiny_again', 'kang_small', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
                                                 "dim_feedforward": 32, "epochs": 2, "batch_size": 32, "min_cells": 20}');
RESET client_min_messages;
SELECT (SELECT weights FROM exceiver.model_catalog WHERE name = 'tiny')
     = (SELECT weights FROM exceiver.model_catalog WHERE name = 'tiny_again') AS same_weights;
SELECT exceiver.drop_model('tiny_again');
-- max_cells caps the training cells (the same cells in every pass)
SET client_min_messages = warning;
SELECT model FROM exceiver.train('tiny_capped', 'kang_small', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
                                                  "dim_feedforward": 32, "epochs": 1, "max_cells": 100, "min_cells": 5}');
RESET client_min_messages;
SELECT metrics->>'train_cells' AS train_cells FROM exceiver.models WHERE name = 'tiny_capped';
SELECT exceiver.drop_model('tiny_capped');
-- n_top_genes keeps only the most variable genes of the training cells in the vocabulary
SET client_min_messages = warning;
SELECT model FROM exceiver.train('tiny_hvg', 'kang_small', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
                                              "dim_feedforward": 32, "epochs": 0, "n_top_genes": 500, "standardize": true}');
RESET client_min_messages;
SELECT n_genes FROM exceiver.models WHERE name = 'tiny_hvg';
-- standardize: the per-gene mean and std of log1p fitted on the training cells (the published preprocessing)
SELECT metrics->'options'->>'standardize' AS standardize, (SELECT count(*) FROM unnest(scaler_std) s WHERE s <> 1) > 400 AS fitted_scales
FROM exceiver.model_catalog WHERE name = 'tiny_hvg';
SELECT exceiver.drop_model('tiny_hvg');
-- the trained model embeds cells of another dataset
SELECT count(*) AS embedded, min(vector_dims(exceiver.embed('tiny', genes, counts))) AS dims
FROM (SELECT * FROM pbmc3k ORDER BY cell_id LIMIT 20) p;

-- continue training on another table: a new model that records its parent
SET client_min_messages = warning;
SELECT model, epochs FROM exceiver.train('tiny_ft', 'kang_small', '{"parent": "tiny", "epochs": 1, "batch_size": 32}');
-- transfer: a classifier for stim, from the pretrained model and from random weights
SELECT model, classes, epochs FROM exceiver.finetune('tiny', 'tiny_stim', 'kang_small', 'stim', '{"epochs": 1, "batch_size": 32}');
SELECT model, classes FROM exceiver.finetune('tiny', 'tiny_stim_rand', 'kang_small', 'stim', '{"epochs": 1, "batch_size": 32, "init": "random"}');
-- a class head that reads the cell embedding instead of the class token
SELECT model, classes FROM exceiver.finetune('tiny', 'tiny_stim_emb', 'kang_small', 'stim', '{"epochs": 1, "batch_size": 32, "class_readout": "embedding"}');
-- the head alone first (the pretrained model frozen), then the whole model (LP-FT)
SELECT model FROM exceiver.finetune('tiny', 'tiny_stim_hf', 'kang_small', 'stim', '{"epochs": 3, "batch_size": 32, "warmup_steps": 0, "patience": 1, "head_first": true}');
-- the head on the embedding, no gene masked: the head trains alone on embeddings the
-- frozen model computed once (for "epochs" epochs or 3,000 steps), then the whole model
SELECT model FROM exceiver.finetune('tiny', 'tiny_stim_hfe', 'kang_small', 'stim', '{"epochs": 3, "batch_size": 32, "warmup_steps": 0, "patience": 1, "head_first": true, "class_readout": "embedding"}');
RESET client_min_messages;
SELECT name, (metrics->>'head_epochs')::int >= 1 AS head_trained_first, metrics->'options'->>'head_first' AS head_first,
       (SELECT count(*) FROM jsonb_array_elements(history) h WHERE h->>'head_only' = 'true') = (metrics->>'head_epochs')::int AS head_epochs_in_history,
       (metrics->>'epochs')::int - (metrics->>'head_epochs')::int BETWEEN 0 AND 3 AS whole_model_epochs
FROM exceiver.model_catalog WHERE name IN ('tiny_stim_hf', 'tiny_stim_hfe') ORDER BY name;
-- finetune's class head reads the class token unless asked for the embedding
SELECT name, config->>'class_embedding' AS class_embedding FROM exceiver.model_catalog WHERE name IN ('tiny_stim', 'tiny_stim_emb') ORDER BY name;
SELECT exceiver.classify('tiny_stim_emb', genes, counts) IN ('CTRL', 'STIM') AS is_label FROM kang_small LIMIT 1;
SELECT name, kind, parent, labels FROM exceiver.models WHERE name LIKE 'tiny%' ORDER BY name;
-- continued training does not add the contrastive term unless asked
SELECT metrics->'options'->>'contrastive' AS contrastive FROM exceiver.model_catalog WHERE name = 'tiny_ft';
SELECT exceiver.classify('tiny_stim', genes, counts) IN ('CTRL', 'STIM') AS is_label FROM kang_small LIMIT 1;
SELECT count(*) AS labels, round(sum(probability)::numeric, 4) AS total
FROM (SELECT * FROM kang_small LIMIT 1) k, exceiver.classify_proba('tiny_stim', k.genes, k.counts);
-- a classifier's accuracy and calibration on a labelled table: the same accuracy as
-- classify row by row; a label the model never saw counts as wrong; NULL labels skipped
CREATE TABLE stim_eval AS SELECT cell_id, genes, counts, stim FROM kang_small;
UPDATE stim_eval SET stim = 'OTHER' WHERE cell_id IN (SELECT cell_id FROM stim_eval ORDER BY cell_id LIMIT 3);
UPDATE stim_eval SET stim = NULL WHERE cell_id IN (SELECT cell_id FROM stim_eval ORDER BY cell_id DESC LIMIT 2);
SELECT e.cells, e.skipped, e.unknown_labels,
       abs(e.accuracy - (SELECT avg((exceiver.classify('tiny_stim', genes, counts) = stim)::int) FROM stim_eval WHERE stim IS NOT NULL)) < 1e-12 AS accuracy_as_classify,
       e.macro_f1 BETWEEN 0 AND 1 AS f1_in_range, e.log_loss > 0 AS log_loss_positive, e.ece BETWEEN 0 AND 1 AS ece_in_range
FROM exceiver.evaluate_classifier('tiny_stim', 'stim_eval', 'stim') e;
SELECT * FROM exceiver.evaluate_classifier('tiny', 'stim_eval', 'stim'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_classifier('tiny_stim', 'stim_eval', 'no_such_column'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_classifier('tiny_stim', 'no_such_table', 'stim'); \echo :SQLSTATE
SELECT * FROM exceiver.evaluate_classifier('tiny_stim', 'stim_eval WHERE false', 'stim'); \echo :SQLSTATE
DELETE FROM stim_eval WHERE stim IS NOT NULL;
SELECT * FROM exceiver.evaluate_classifier('tiny_stim', 'stim_eval', 'stim'); \echo :SQLSTATE
DROP TABLE stim_eval;

-- bad input
SELECT * FROM exceiver.train('tiny', 'kang_small'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"epochs": "many"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"epoch": 3}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"learning_rate": -1}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"dropout": 0.1}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "huge"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"value_embedding": "yes"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"lr_schedule": "linear"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "contrastive_support": 64, "contrastive_head": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "contrastive_debias": 0.1, "contrastive_head": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive_debias": 0.5}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "reconstruct": 5, "contrastive_head": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"reconstruct": 5}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "reconstruct": 5, "reconstruct_rank": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"profile_path": "yes"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "tiny", "profile_path": true}'); \echo :SQLSTATE
-- one value vector per gene ("per_gene"), a cosine learning-rate schedule,
-- nearest-neighbour positives, debiased negatives, the profile decoder and the profile
-- path: recorded in the config and the options; the model embeds
SET client_min_messages = warning;
SELECT model, epochs FROM exceiver.train('tiny_pg', 'kang_small', '{"preset": "small", "seq_dim": 8, "query_len": 16,
  "num_layers": 1, "dim_feedforward": 32, "epochs": 2, "batch_size": 32, "min_cells": 20, "value_embedding": "per_gene",
  "lr_schedule": "cosine", "contrastive_support": 64, "contrastive_debias": 0.1, "profile_path": true,
  "reconstruct": 5, "reconstruct_rank": 8}');
RESET client_min_messages;
SELECT config->>'value_embedding' AS value_embedding, config->>'value_per_gene' AS per_gene,
       metrics->'options'->>'lr_schedule' AS lr_schedule, metrics->'options'->>'contrastive_support' AS support,
       metrics->'options'->>'contrastive_debias' AS debias, config->>'profile' AS profile,
       metrics->'options'->>'reconstruct' AS reconstruct, metrics->'options'->>'reconstruct_rank' AS rank
FROM exceiver.model_catalog WHERE name = 'tiny_pg';
SELECT count(*) AS embedded, min(vector_dims(exceiver.embed('tiny_pg', genes, counts))) AS dims
FROM (SELECT * FROM pbmc3k ORDER BY cell_id LIMIT 5) p;
SELECT exceiver.drop_model('tiny_pg');
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "tiny", "value_embedding": false}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"standardize": "yes"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "tiny", "standardize": true}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "tiny", "num_layers": 3}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"n_top_genes": -1}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "tiny", "n_top_genes": 100}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive": -1}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive": "yes"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive_temperature": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive_keep": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive_depth": 1.5}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"contrastive_head": -1}'); \echo :SQLSTATE
-- shapes whose memory is past exceiver.max_memory are refused before allocating (54000);
-- a projection head over a very wide embedding used to abort the backend
SET client_min_messages = warning;
SET exceiver.threads = 2;  -- the estimate counts per-thread buffers
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "query_len": 4096, "seq_dim": 1024, "query_dim": 1024, "contrastive_head": 65536, "profile_path": false}'); \echo :SQLSTATE
SET exceiver.max_memory = '64MB';
SELECT * FROM exceiver.train('x', 'kang_small', '{"preset": "small", "batch_size": 65536, "epochs": 1}'); \echo :SQLSTATE
RESET exceiver.max_memory;
RESET exceiver.threads;
RESET client_min_messages;
-- a role that is not superuser cannot raise its own limit
CREATE ROLE exceiver_regress_limits;
SET ROLE exceiver_regress_limits;
SET exceiver.max_memory = '1TB'; \echo :SQLSTATE
RESET ROLE;
DROP ROLE exceiver_regress_limits;
SELECT * FROM exceiver.train('x', 'kang_small', '{"parent": "nope"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '[1, 2]'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'no_such_table'); \echo :SQLSTATE
CREATE TABLE empty_cells (cell_id text, genes text[], counts real[]);
SELECT * FROM exceiver.train('x', 'empty_cells'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"min_cells": 1000000}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'no_such_column'); \echo :SQLSTATE
-- frac 0 (no masked genes) is finetune's default, not a plain model's
SELECT * FROM exceiver.train('x', 'kang_small', '{"frac": 0}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"num_layers": 2}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"value_embedding": true}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"n_top_genes": 2000}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"standardize": false}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"contrastive": 1}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"class_readout": "mean"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"class_readout": "embedding"}'); \echo :SQLSTATE
SELECT * FROM exceiver.train('x', 'kang_small', '{"head_first": true}'); \echo :SQLSTATE
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim', '{"head_first": "yes"}'); \echo :SQLSTATE
-- bad cells stop training, named by the core's cell contract (the same checks and
-- messages as exceiver.embed); nothing is stored
CREATE TABLE bad_cells AS SELECT * FROM kang_small ORDER BY cell_id LIMIT 60;
UPDATE bad_cells SET counts[2] = -1 WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.train('x', 'bad_cells', '{"min_cells": 1, "epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
UPDATE bad_cells SET counts[2] = 'NaN' WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.train('x', 'bad_cells', '{"min_cells": 1, "epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
UPDATE bad_cells SET counts[2] = 1, genes[2] = genes[1] WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.train('x', 'bad_cells', '{"min_cells": 1, "epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
UPDATE bad_cells SET genes[2] = NULL WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.train('x', 'bad_cells', '{"min_cells": 1, "epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
UPDATE bad_cells SET genes[2] = 'X', counts[3] = NULL WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.finetune('tiny', 'x', 'bad_cells', 'stim', '{"epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
UPDATE bad_cells SET counts = counts[1:2] WHERE cell_id = (SELECT min(cell_id) FROM bad_cells);
SELECT * FROM exceiver.train('x', 'bad_cells', '{"min_cells": 1, "epochs": 1, "val_fraction": 0}'); \echo :SQLSTATE
DROP TABLE bad_cells;
UPDATE kang_small SET stim = 'CTRL';
SELECT * FROM exceiver.finetune('tiny', 'x', 'kang_small', 'stim'); \echo :SQLSTATE
SELECT count(*) AS no_model_x FROM exceiver.models WHERE name = 'x';

-- cancel: statement_timeout stops training between steps and leaves no model behind
SET statement_timeout = '1s';
SELECT * FROM exceiver.train('cancelled', 'kang', '{"preset": "small", "epochs": 50}'); \echo :SQLSTATE
RESET statement_timeout;
SELECT count(*) AS no_partial_model FROM exceiver.models WHERE name = 'cancelled';
-- ... and inside one step: a published-shape step over 8,192 cells takes about 18 s on
-- 2 cores; the backend takes the interrupt while the worker threads run and stops them
-- after their current cell (before, the cancel waited for the step's end)
SET client_min_messages = warning;
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '1500ms';
SELECT * FROM exceiver.train('cancelled_step', 'kang', '{"preset": "published", "epochs": 1, "max_cells": 8192, "batch_size": 8192, "val_fraction": 0}'); \echo :SQLSTATE
RESET statement_timeout;
RESET client_min_messages;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '3 s' AS step_stopped_within_a_second,
       count(*) = 0 AS no_partial_model
FROM exceiver.models WHERE name = 'cancelled_step';
