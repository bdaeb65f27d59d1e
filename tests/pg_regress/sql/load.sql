-- Loading 10x Cell Ranger folders and AnnData .h5ad files into cell tables.
\getenv data EXCEIVER_DATA
\set VERBOSITY default
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'pbmc3k');
\d pbmc3k
SELECT louvain_scanpy, count(*) FROM pbmc3k GROUP BY 1 ORDER BY 1;
-- one known cell, checked against an independent read of matrix.mtx.gz
SELECT cell_id, cardinality(genes) AS n_genes, sum(c) AS total,
       counts[array_position(genes, 'MALAT1')] AS malat1
FROM pbmc3k, unnest(counts) c WHERE cell_id = 'AAACATACAACCAC-1' GROUP BY cell_id, genes, counts;
-- the file's Ensembl ids beside the symbols, for matching a model named by ids
SELECT count(*) AS genes, count(*) FILTER (WHERE gene_id LIKE 'ENSG%') AS ensembl FROM pbmc3k_genes;
SELECT * FROM pbmc3k_genes WHERE gene IN ('CD3E', 'MS4A1') ORDER BY gene;
-- the cells' genes renamed to ids through it (what a model trained on ids would need)
SELECT (SELECT array_agg(coalesce(m.gene_id, g) ORDER BY i) FROM unnest(genes) WITH ORDINALITY u(g, i)
          LEFT JOIN pbmc3k_genes m ON m.gene = g)[1:3] AS first_ids
FROM pbmc3k WHERE cell_id = 'AAACATACAACCAC-1';
SELECT * FROM exceiver.load_h5ad(:'data' || '/kang_ifnb/kang_ifnb.h5ad', 'public.kang');
SELECT stim, count(*) FROM kang GROUP BY 1 ORDER BY 1;
SELECT seurat_annotations, count(*) FROM kang GROUP BY 1 ORDER BY 1;
SELECT sum(cardinality(genes)) AS nonzeros, bool_and(cardinality(genes) = cardinality(counts)) AS same_length,
       min(c) > 0 AS all_positive
FROM kang, LATERAL (SELECT min(x) AS c FROM unnest(counts) x) m;

-- errors: each a clear message, and nothing left behind
SELECT * FROM exceiver.load_h5ad('/nonexistent/file.h5ad', 'nope'); \echo :SQLSTATE
SELECT * FROM exceiver.load_10x('/nonexistent/folder', 'nope'); \echo :SQLSTATE
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'pbmc3k'); \echo :SQLSTATE
COPY (SELECT 'this is not an HDF5 file') TO '/tmp/exceiver_regress_bad.h5ad';
SELECT * FROM exceiver.load_h5ad('/tmp/exceiver_regress_bad.h5ad', 'bad'); \echo :SQLSTATE
-- a tiny Cell Ranger folder whose matrix is damaged in several ways
COPY (SELECT g FROM unnest(ARRAY['A','B','C']) g) TO '/tmp/exceiver_regress_10x/genes.tsv';
COPY (SELECT b FROM unnest(ARRAY['c1','c2']) b) TO '/tmp/exceiver_regress_10x/barcodes.tsv';
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate integer general', '3 2 3', '1 1 5', '2 2 1']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'bad'); \echo :SQLSTATE
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '3 2 2', '1 1 5', '2 2 NaN']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'bad'); \echo :SQLSTATE
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '3 2 2', '1 1 5', '2 2 -1']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'bad'); \echo :SQLSTATE
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '4 2 1', '1 1 5']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'bad'); \echo :SQLSTATE
COPY (SELECT b FROM unnest(ARRAY['c1','c1']) b) TO '/tmp/exceiver_regress_10x/barcodes.tsv';
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '3 2 1', '1 1 0.5']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'bad'); \echo :SQLSTATE
-- non-integer counts are valid (ambient-corrected data)
COPY (SELECT b FROM unnest(ARRAY['c1','c2']) b) TO '/tmp/exceiver_regress_10x/barcodes.tsv';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'ok_small');
SELECT * FROM ok_small ORDER BY cell_id;
-- entries not grouped by cell (Cell Ranger groups them; other writers may not): read
-- whole instead of streamed, with a NOTICE, to the same table
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '3 2 3', '2 2 1', '1 1 5', '3 1 2']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'ungrouped');
SELECT * FROM ungrouped ORDER BY cell_id;
SELECT obj_description('ungrouped'::regclass, 'pg_class') AS comment;
DROP TABLE ungrouped;
COPY (SELECT l FROM unnest(ARRAY['%%MatrixMarket matrix coordinate real general', '3 2 1', '1 1 0.5']) l)
  TO '/tmp/exceiver_regress_10x/matrix.mtx';
SELECT to_regclass('bad') IS NULL AS nothing_left_behind;
-- reading server files needs superuser or pg_read_server_files
CREATE ROLE exceiver_regress_user;
GRANT USAGE ON SCHEMA exceiver TO exceiver_regress_user;
SET ROLE exceiver_regress_user;
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'mine'); \echo :SQLSTATE
RESET ROLE;
DROP OWNED BY exceiver_regress_user;
DROP ROLE exceiver_regress_user;

-- the SQLSTATE of each error case
CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
SELECT q AS call, pg_temp.sqlstate_of(q) AS sqlstate FROM (VALUES
  ($$SELECT * FROM exceiver.load_h5ad('/nonexistent/file.h5ad', 'nope')$$),
  ($$SELECT * FROM exceiver.load_h5ad('/tmp/exceiver_regress_bad.h5ad', 'bad')$$),
  ($$SELECT * FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'ok_small')$$)
) v(q);
