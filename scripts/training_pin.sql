-- Training pin: short runs with fixed seeds covering every branch of the training
-- session (small preset with contrastive views and a projection head; published preset
-- with a fitted scaler and the most variable genes; continued training; a classifier
-- from pretrained and from random weights with a label fraction; max_cells and no
-- validation cells). Prints each run's history (losses to 9 digits) and the md5 of its
-- stored weights: run it before and after a change to training and diff the outputs.
-- Losses depend on the CPU's kernels and exceiver.threads: compare on one machine.
--   psql -X -h /tmp -p 5488 -U postgres -d exceiver -f scripts/training_pin.sql
\set ON_ERROR_STOP 1
\getenv data EXCEIVER_DATA
SET client_min_messages = warning;
SET exceiver.threads = 2;
DROP TABLE IF EXISTS pin_kang, pin_kang_src, pin_kang_src_genes;
SELECT count(*) FROM exceiver.load_h5ad(:'data' || '/kang_ifnb/kang_ifnb.h5ad', 'public.pin_kang_src');
CREATE TABLE pin_kang AS SELECT * FROM pin_kang_src ORDER BY cell_id LIMIT 600;
DROP TABLE pin_kang_src, pin_kang_src_genes;
SELECT exceiver.drop_model(name) FROM exceiver.models WHERE name LIKE 'pin\_%';
SELECT model FROM exceiver.train('pin_small', 'pin_kang', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
  "dim_feedforward": 32, "epochs": 3, "batch_size": 32, "min_cells": 20, "n_top_genes": 400}');
SELECT model FROM exceiver.train('pin_pub', 'pin_kang', '{"seq_dim": 8, "query_len": 8, "num_layers": 1, "nhead": 2,
  "dim_feedforward": 16, "epochs": 2, "batch_size": 48, "min_cells": 30, "n_top_genes": 300, "seed": 7, "warmup_steps": 5}');
SELECT model FROM exceiver.train('pin_cont', 'pin_kang', '{"parent": "pin_small", "epochs": 1, "batch_size": 32, "seed": 3}');
SELECT model FROM exceiver.finetune('pin_small', 'pin_cls', 'pin_kang', 'stim', '{"epochs": 2, "batch_size": 32, "label_fraction": 0.7}');
SELECT model FROM exceiver.finetune('pin_small', 'pin_cls_rand', 'pin_kang', 'stim', '{"epochs": 1, "batch_size": 32, "init": "random", "seed": 5}');
SELECT model FROM exceiver.train('pin_noval', 'pin_kang', '{"preset": "small", "seq_dim": 8, "query_len": 16, "num_layers": 1,
  "dim_feedforward": 32, "epochs": 2, "batch_size": 64, "min_cells": 20, "val_fraction": 0, "max_cells": 200, "contrastive": 0}');
SELECT name, md5(weights) AS weights, genes[1:3] AS first_genes, cardinality(genes) AS n_genes, md5(scaler_std::text) AS scaler,
       metrics->'train_cells' AS train_cells, metrics->'n_mask' AS n_mask, metrics->'steps' AS steps,
       round((metrics->>'best_val_mse')::numeric, 9) AS best_val, round((metrics->>'baseline_val_mse')::numeric, 9) AS baseline
FROM exceiver.model_catalog WHERE name LIKE 'pin\_%' ORDER BY name;
SELECT name, (h->>'epoch')::int AS epoch, h->'step' AS step, round((h->>'train_loss')::numeric, 9) AS train_loss,
       round((h->>'train_contrastive')::numeric, 9) AS train_contrastive, round((h->>'val_mse')::numeric, 9) AS val_mse,
       round((h->>'val_ce')::numeric, 9) AS val_ce, round((h->>'val_contrastive')::numeric, 9) AS val_contrastive
FROM exceiver.model_catalog, jsonb_array_elements(history) h WHERE name LIKE 'pin\_%' ORDER BY name, epoch;
SELECT name, metrics - 'seconds' - 'train_cells_per_s' AS metrics FROM exceiver.model_catalog WHERE name LIKE 'pin\_%' ORDER BY name;
SELECT exceiver.drop_model(name) FROM exceiver.models WHERE name LIKE 'pin\_%';
DROP TABLE pin_kang;
