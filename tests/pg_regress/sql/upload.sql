-- Loading files uploaded as large objects (\lo_import, lo_import in drivers): a role with
-- no server-file privilege loads its own files, and only files it may read.
\getenv data EXCEIVER_DATA
\set VERBOSITY default
CREATE ROLE exceiver_uploader;
GRANT USAGE ON SCHEMA exceiver TO exceiver_uploader;
CREATE SCHEMA uploads AUTHORIZATION exceiver_uploader;
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'large object \d+', 'large object N', 'g'); END $$;
-- the superuser's upload, which the analyst may not read
\set QUIET on
\set f :data/pbmc3k/barcodes.tsv.gz
\lo_import :f
\set theirs :LASTOID
SET ROLE exceiver_uploader;
SELECT pg_has_role('pg_read_server_files', 'USAGE') AS may_read_server_files;
\set f :data/pbmc3k/matrix.mtx.gz
\lo_import :f
\set m :LASTOID
\set f :data/pbmc3k/genes.tsv.gz
\lo_import :f
\set g :LASTOID
\set f :data/pbmc3k/barcodes.tsv.gz
\lo_import :f
\set b :LASTOID
\set f :data/pbmc3k/annotations.tsv
\lo_import :f
\set a :LASTOID
\set f :data/kang_ifnb/kang_ifnb.h5ad
\lo_import :f
\set k :LASTOID
\set QUIET off
SELECT * FROM exceiver.load_10x_lo(:m, :g, :b, 'uploads.pbmc3k', :a);
SELECT table_name, cells, genes, nonzeros FROM exceiver.load_10x_lo(:m, :g, :b, 'uploads.pbmc3k_plain');
SELECT * FROM exceiver.load_h5ad_lo(:k, 'uploads.kang');
-- the server-side loaders stay closed to this role
SELECT pg_temp.err(format('SELECT * FROM exceiver.load_10x(%L, %L)', :'data' || '/pbmc3k', 'uploads.nope')) AS server_file;
-- errors: someone else's large object, one that does not exist, one that is not the file
-- it should be (named by its large object, not by a temporary path)
SELECT what, pg_temp.err(q) AS error FROM (VALUES
  ('not mine', format('SELECT * FROM exceiver.load_10x_lo(%s, %s, %s, %L)', :m, :g, :theirs, 'uploads.bad')),
  ('missing', format('SELECT * FROM exceiver.load_h5ad_lo(%s, %L)', 4000000000, 'uploads.bad')),
  ('genes as matrix', format('SELECT * FROM exceiver.load_10x_lo(%s, %s, %s, %L)', :g, :g, :b, 'uploads.bad')),
  ('matrix as h5ad', format('SELECT * FROM exceiver.load_h5ad_lo(%s, %L)', :m, 'uploads.bad')),
  ('barcodes as .h5', format('SELECT * FROM exceiver.load_10x_lo(%s, %L)', :b, 'uploads.bad')),
  ('NULL (strict: no row)', format('SELECT count(*) FROM exceiver.load_h5ad_lo(NULL, %L)', 'uploads.bad'))
) v(what, q);
SELECT to_regclass('uploads.bad') IS NULL AS nothing_left_behind;
-- the copy honours temp_file_limit as PostgreSQL's own temporary files do
RESET ROLE;
SET temp_file_limit = '1MB';
SET ROLE exceiver_uploader;
SELECT pg_temp.err(format('SELECT * FROM exceiver.load_10x_lo(%s, %s, %s, %L)', :m, :g, :b, 'uploads.big')) AS over_temp_file_limit;
RESET ROLE;
RESET temp_file_limit;
SELECT count(*) AS temporary_folders_left FROM pg_ls_dir('base/pgsql_tmp') f WHERE f LIKE 'pgsql_tmp_exceiver%';
-- the same tables as the server-side loaders made
SELECT (SELECT count(*) FROM (SELECT * FROM uploads.pbmc3k EXCEPT SELECT * FROM public.pbmc3k) d) AS pbmc3k_differences,
       (SELECT count(*) FROM (SELECT cell_id, genes, counts FROM uploads.pbmc3k_plain EXCEPT SELECT cell_id, genes, counts FROM public.pbmc3k) d) AS plain_differences,
       (SELECT count(*) FROM (SELECT * FROM uploads.kang EXCEPT SELECT * FROM public.kang) d) AS kang_differences,
       (SELECT count(*) FROM (SELECT * FROM uploads.pbmc3k_genes EXCEPT SELECT * FROM public.pbmc3k_genes) d) AS gene_id_differences;
SELECT lo_unlink(:theirs);
DROP SCHEMA uploads CASCADE;
SELECT count(*) AS uploads_left FROM pg_largeobject_metadata WHERE lomowner = 'exceiver_uploader'::regrole;
DROP OWNED BY exceiver_uploader;
DROP ROLE exceiver_uploader;
