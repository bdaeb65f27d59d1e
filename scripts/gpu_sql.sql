-- The extension's device path through SQL (run by scripts/gpu_pg.sh on a throwaway
-- cluster; README, section GPU): embed_table, train and finetune with
-- exceiver.device = :'device', each checked against the same work on the backend's
-- CPU, and embed_table timed on both. Fails (psql exit 3) on the first wrong result.
--   :device  cuda, cuda:N (the cuda build) or cpu (any build: checks the script itself)
--   :files   a folder the server can read with pretrained_TS_exceiver.safetensors and pbmc3k/
--   :cells   synthetic cells for the published model's timing (default 20000)
\set ON_ERROR_STOP 1
\if :{?cells}
\else
  \set cells 20000
\endif
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS exceiver;
SELECT extversion AS exceiver_version FROM pg_extension WHERE extname = 'exceiver';

\echo '== the device setting'
SET exceiver.device = :'device';
SHOW exceiver.device;
RESET exceiver.device;

-- The worst per-cell normwise relative error between two embedding columns of a
-- table; raises when it is past tol or a cell has one and not the other.
CREATE FUNCTION pg_temp.check(tab regclass, a text, b text, tol float8) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE n bigint; nulls bigint; worst float8;
BEGIN
  EXECUTE format('SELECT count(*), count(*) FILTER (WHERE %1$I IS NULL OR %2$I IS NULL),
                         max(l2_distance(%1$I, %2$I) / greatest(vector_norm(%2$I), 1e-30)) FROM %3$s', a, b, tab)
    INTO n, nulls, worst;
  IF nulls > 0 OR worst IS NULL OR worst > tol THEN
    RAISE EXCEPTION '%: % of % cells differ: % missing, worst normwise relative error % (tolerance %)',
      tab, a, n, nulls, worst, tol;
  END IF;
  RETURN format('%s cells, worst normwise relative error %s (tolerance %s): ok', n, to_char(worst, '9.9EEEE'), tol);
END $$;

\echo '== 1. the published Exceiver (19,067 genes, 8 layers) on synthetic cells of ~1,500 genes'
SELECT name, num_layers, embedding_dim FROM exceiver.import_checkpoint('gpu_ts',
  :'files' || '/pretrained_TS_exceiver.safetensors', ARRAY(SELECT 'G' || i FROM generate_series(0, 19066) i));
SELECT setseed(0.42);
CREATE TEMP TABLE gpu_cells AS
SELECT c AS cell_id, array_agg('G' || g ORDER BY g) AS genes, array_agg(n ORDER BY g) AS counts
FROM generate_series(1, :cells) c
CROSS JOIN LATERAL (SELECT g, (1 + floor(-ln(1 - random()) * 3))::real AS n
                    FROM (SELECT DISTINCT floor(random() * 19067)::int + 0 * c AS g FROM generate_series(1, 1560)) d) s
GROUP BY c;
SELECT count(*) AS cells, round(avg(cardinality(genes))) AS mean_genes_per_cell FROM gpu_cells;
ALTER TABLE gpu_cells ADD PRIMARY KEY (cell_id), ADD COLUMN e_dev vector(512), ADD COLUMN e_cpu vector(512);
SET exceiver.device = :'device';
SELECT 'device' AS run, * FROM exceiver.embed_table('gpu_ts', 'gpu_cells', 'e_dev', 256);
SELECT 'device, again' AS run, * FROM exceiver.embed_table('gpu_ts', 'gpu_cells', 'e_dev', 1024);
RESET exceiver.device;
SELECT 'cpu' AS run, * FROM exceiver.embed_table('gpu_ts', 'gpu_cells', 'e_cpu');
SELECT pg_temp.check('gpu_cells', 'e_dev', 'e_cpu', 1e-4) AS published_embedding_parity;

\echo '== 2. train and fine-tune on the device (real cells: 10x PBMC 3k), checked against the CPU'
SELECT table_name, cells, genes FROM exceiver.load_10x(:'files' || '/pbmc3k', 'pbmc3k');
SET exceiver.device = :'device';
SELECT 'device' AS run, * FROM exceiver.train('gpu_small', 'pbmc3k', '{"preset": "small", "epochs": 2, "seed": 1}');
RESET exceiver.device;
SELECT 'cpu' AS run, * FROM exceiver.train('cpu_small', 'pbmc3k', '{"preset": "small", "epochs": 2, "seed": 1}');
DO $$
DECLARE dev jsonb; cpu jsonb;
BEGIN
  SELECT metrics INTO dev FROM exceiver.models WHERE name = 'gpu_small';
  SELECT metrics INTO cpu FROM exceiver.models WHERE name = 'cpu_small';
  IF dev->>'best_val_mse' IS NULL OR (dev->>'best_val_mse')::float8 = 'NaN' THEN
    RAISE EXCEPTION 'device training gave no validation MSE: %', dev;
  END IF;
  IF abs((dev->>'best_val_mse')::float8 / (cpu->>'best_val_mse')::float8 - 1) > 0.05 THEN
    RAISE EXCEPTION 'device and CPU training differ: validation MSE % against %',
      dev->>'best_val_mse', cpu->>'best_val_mse';
  END IF;
END $$;
SELECT embedding_dim AS small_dim FROM exceiver.models WHERE name = 'gpu_small' \gset
ALTER TABLE pbmc3k ADD COLUMN e_dev vector(:small_dim), ADD COLUMN e_cpu vector(:small_dim);
SET exceiver.device = :'device';
SELECT 'device' AS run, cells, skipped FROM exceiver.embed_table('gpu_small', 'pbmc3k', 'e_dev');
RESET exceiver.device;
SELECT 'cpu' AS run, cells, skipped FROM exceiver.embed_table('gpu_small', 'pbmc3k', 'e_cpu');
SELECT pg_temp.check('pbmc3k', 'e_dev', 'e_cpu', 1e-4) AS trained_embedding_parity;
SET exceiver.device = :'device';
SELECT 'device' AS run, model, classes, epochs FROM exceiver.finetune('gpu_small', 'gpu_clf', 'pbmc3k',
  'seurat_annotations', '{"epochs": 5, "seed": 1}');
RESET exceiver.device;
SELECT cells, round(accuracy::numeric, 3) AS accuracy, round(macro_f1::numeric, 3) AS macro_f1
FROM exceiver.evaluate_classifier('gpu_clf', 'pbmc3k', 'seurat_annotations') \gset
\echo 'device fine-tuned classifier on its own cells: accuracy' :accuracy 'macro-F1' :macro_f1
SELECT (:accuracy > 0.6) AS classifier_ok \gset
\if :classifier_ok
\else
  DO $$ BEGIN RAISE EXCEPTION 'the device fine-tuned classifier is at chance'; END $$;
\endif
\echo 'gpu_sql: every check passed'
