-- exceiver end-to-end demo on real data (run by `make demo`).
\set ON_ERROR_STOP 1
\pset footer off
\echo '== 1. Load the data: 10x PBMC 3k (Cell Ranger folder) and Kang IFN-beta PBMCs (.h5ad)'
DROP TABLE IF EXISTS pbmc3k, kang;
\timing on
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'pbmc3k');
SELECT * FROM exceiver.load_h5ad(:'data' || '/kang_ifnb/kang_ifnb.h5ad', 'kang');
\timing off
\echo '-- pbmc3k labels (louvain_scanpy)'
SELECT coalesce(louvain_scanpy, '(unlabelled)') AS louvain_scanpy, count(*) AS cells FROM pbmc3k GROUP BY 1 ORDER BY 2 DESC;
\echo '-- kang labels (stim, seurat_annotations)'
SELECT stim, count(*) AS cells FROM kang GROUP BY 1 ORDER BY 1;
SELECT seurat_annotations, count(*) AS cells FROM kang GROUP BY 1 ORDER BY 2 DESC;
