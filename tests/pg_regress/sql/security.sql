-- Security: server-file privileges exactly as COPY checks them, SQL immune to the
-- caller's search_path, models owned by the role that made them.
-- Uses the table kang loaded by load.sql.
\getenv data EXCEIVER_DATA
\getenv root EXCEIVER_ROOT
\set VERBOSITY default
-- Every error case runs through this helper, which shows its SQLSTATE and message.
CREATE FUNCTION public.exceiver_try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$;
GRANT EXECUTE ON FUNCTION public.exceiver_try(text) TO PUBLIC;

-- Roles: plain, a member of both server-file roles, a NOINHERIT member of them, and two
-- analysts; each with the GRANTs the README recommends for using and training models.
CREATE ROLE exceiver_plain;
CREATE ROLE exceiver_member;
CREATE ROLE exceiver_noinherit NOINHERIT;
CREATE ROLE exceiver_alice;
CREATE ROLE exceiver_bob;
GRANT pg_read_server_files, pg_write_server_files TO exceiver_member, exceiver_noinherit;
GRANT USAGE ON SCHEMA exceiver TO exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
GRANT SELECT, INSERT, UPDATE, DELETE ON exceiver.model_catalog
  TO exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
GRANT SELECT ON exceiver.models TO exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
GRANT USAGE ON SEQUENCE exceiver.model_version_seq
  TO exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
CREATE SCHEMA exceiver_sec;
GRANT USAGE, CREATE ON SCHEMA exceiver_sec TO exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;

-- The four functions that touch server files. Paths that do not exist: a role that
-- passes the privilege check gets 58P01 (no such file) or 22023 (not a PNG), a role
-- that does not gets 42501 before anything is read or written.
CREATE TEMP TABLE file_calls (fn text, q text);
INSERT INTO file_calls VALUES
  ('load_10x', $$SELECT * FROM exceiver.load_10x('/nonexistent/exceiver_sec', 'exceiver_sec.t')$$),
  ('load_h5ad', $$SELECT * FROM exceiver.load_h5ad('/nonexistent/exceiver_sec.h5ad', 'exceiver_sec.t')$$),
  ('import_checkpoint', $$SELECT * FROM exceiver.import_checkpoint('sec_x', '/nonexistent/exceiver_sec.ckpt', ARRAY['a'])$$),
  ('save_png', $$SELECT exceiver.save_png('\x00'::bytea, '/tmp/exceiver_sec.png')$$);
GRANT SELECT ON file_calls TO PUBLIC;
CREATE TEMP TABLE file_results (who text, fn text, result text);
GRANT INSERT ON file_results TO PUBLIC;

-- superuser
INSERT INTO file_results SELECT 'superuser', fn, exceiver_try(q) FROM file_calls;
-- a member (INHERIT) of pg_read_server_files / pg_write_server_files
SET ROLE exceiver_member;
INSERT INTO file_results SELECT 'member', fn, exceiver_try(q) FROM file_calls;
RESET ROLE;
-- a NOINHERIT member: refused, as COPY refuses it, until it takes the role
SET ROLE exceiver_noinherit;
INSERT INTO file_results SELECT 'noinherit member', fn, exceiver_try(q) FROM file_calls;
RESET ROLE;
GRANT USAGE ON SCHEMA exceiver TO pg_read_server_files;
GRANT SELECT ON exceiver.model_catalog TO pg_read_server_files;
SET ROLE exceiver_noinherit;
SET ROLE pg_read_server_files;
INSERT INTO file_results SELECT 'noinherit member, SET ROLE pg_read_server_files', fn, exceiver_try(q)
FROM file_calls WHERE fn IN ('load_10x', 'load_h5ad', 'import_checkpoint');
RESET ROLE;
REVOKE USAGE ON SCHEMA exceiver FROM pg_read_server_files;
REVOKE SELECT ON exceiver.model_catalog FROM pg_read_server_files;
-- a plain role
SET ROLE exceiver_plain;
INSERT INTO file_results SELECT 'plain', fn, exceiver_try(q) FROM file_calls;
-- the attack: a temporary view that shadows pg_roles and says everyone is superuser,
-- and a temporary table that shadows pg_auth_members
CREATE TEMP VIEW pg_roles AS SELECT oid, rolname, true AS rolsuper FROM pg_catalog.pg_roles;
CREATE TEMP TABLE pg_auth_members (roleid oid, member oid, grantor oid, admin_option bool);
SELECT count(*) > 0 AS shadow_view_in_place FROM pg_roles WHERE rolsuper AND rolname = current_user;
INSERT INTO file_results SELECT 'plain, pg_roles shadowed', fn, exceiver_try(q) FROM file_calls;
-- and with a search_path that puts pg_catalog last
SET search_path = pg_temp, public, pg_catalog;
INSERT INTO file_results SELECT 'plain, pg_catalog last on search_path', fn, exceiver_try(q) FROM file_calls;
RESET search_path;
DROP VIEW pg_temp.pg_roles;
DROP TABLE pg_temp.pg_auth_members;
RESET ROLE;
SELECT who, fn, result FROM file_results ORDER BY who, fn;
-- nothing was written by anyone refused
SELECT pg_stat_file('/tmp/exceiver_sec.png', true) IS NULL AS no_png_written;

CREATE TABLE exceiver_sec.cells AS SELECT * FROM kang ORDER BY cell_id LIMIT 120;
GRANT SELECT ON exceiver_sec.cells TO exceiver_alice, exceiver_bob;

-- Models: anyone with the GRANTs above may use any model; a role's models are its own.
SET client_min_messages = warning;
SET ROLE exceiver_alice;
SELECT model FROM exceiver.train('sec_alice', 'exceiver_sec.cells', '{"preset": "small", "seq_dim": 8, "query_len": 8,
  "num_layers": 1, "dim_feedforward": 16, "epochs": 1, "batch_size": 32, "min_cells": 10, "n_top_genes": 200}');
RESET ROLE;
RESET client_min_messages;
SELECT name, owner FROM exceiver.models WHERE name = 'sec_alice';
SET ROLE exceiver_bob;
-- bob uses alice's model
SELECT vector_dims(exceiver.embed('sec_alice', genes, counts)) AS dims
FROM (SELECT * FROM exceiver_sec.cells ORDER BY cell_id LIMIT 1) c;
-- ... but cannot drop, change, replace or forge it
SELECT exceiver_try($$SELECT exceiver.drop_model('sec_alice')$$) AS drop_alices;
SELECT exceiver_try($$SELECT * FROM exceiver.train('sec_alice', 'exceiver_sec.cells', '{"epochs": 0}')$$) AS train_over_alices;
UPDATE exceiver.model_catalog SET weights = '\x00' WHERE name = 'sec_alice';
DELETE FROM exceiver.model_catalog WHERE name = 'sec_alice';
SELECT exceiver_try($$INSERT INTO exceiver.model_catalog (name, kind, config, genes, weights, owner)
  SELECT 'sec_forged', kind, config, genes, weights, 'exceiver_alice' FROM exceiver.model_catalog WHERE name = 'sec_alice'$$) AS forge_as_alice;
RESET ROLE;
SELECT name, owner, octet_length(weights) > 1 AS weights_intact FROM exceiver.model_catalog WHERE name LIKE 'sec\_%' ORDER BY name;
-- alice drops her own model
SET client_min_messages = warning;
SET ROLE exceiver_alice;
SELECT model FROM exceiver.train('sec_alice2', 'exceiver_sec.cells', '{"preset": "small", "seq_dim": 8, "query_len": 8,
  "num_layers": 1, "dim_feedforward": 16, "epochs": 0, "min_cells": 10, "n_top_genes": 200}');
RESET client_min_messages;
SELECT exceiver.drop_model('sec_alice2');
RESET ROLE;

-- Cancel: statement_timeout stops long work promptly, file parsing included (the
-- streamed load of PBMC 3k takes about 300 ms, so it is stopped at 60 ms), and leaves
-- nothing behind.
-- (Progress NOTICEs are hidden: how far the work got in 300 ms depends on the machine.)
SET client_min_messages = warning;
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '60ms';
SELECT * FROM exceiver.load_10x(:'data' || '/pbmc3k', 'exceiver_sec.cancelled'); \echo :SQLSTATE
RESET statement_timeout;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '1.5 s' AS load_stopped_within_a_second,
       to_regclass('exceiver_sec.cancelled') IS NULL AND to_regclass('exceiver_sec.cancelled_genes') IS NULL AS nothing_left;
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '100ms';
SELECT * FROM exceiver.embed_table('sec_alice', 'public.kang', 'emb_cancelled', 64); \echo :SQLSTATE
RESET statement_timeout;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '1.5 s' AS embed_stopped_within_a_second,
       NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.kang'::regclass AND attname = 'emb_cancelled') AS no_column_left;

-- the PCA baseline (12 s for Kang), the embedding metrics and the UMAP map (seconds for
-- 30,000 embeddings) stop as promptly and write nothing
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '300ms';
SELECT * FROM exceiver.pca_embed('public.kang', 'pca_cancelled'); \echo :SQLSTATE
RESET statement_timeout;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '1.5 s' AS pca_stopped_within_a_second,
       NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.kang'::regclass AND attname = 'pca_cancelled') AS no_column_left;
CREATE TEMP TABLE many_embeddings AS
SELECT 'm' || i AS cell_id, (i % 7)::text AS label,
       ARRAY(SELECT sin(i * 0.37 + j * 1.3) + (i % 7) * 0.1 FROM generate_series(1, 32) j)::real[] AS emb
FROM generate_series(1, 30000) i;
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '300ms';
SELECT * FROM exceiver.evaluate_embeddings('many_embeddings', 'emb', 'label'); \echo :SQLSTATE
RESET statement_timeout;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '1.5 s' AS evaluate_stopped_within_a_second;
SELECT clock_timestamp() AS t0 \gset
SET statement_timeout = '300ms';
SELECT count(*) FROM exceiver.embedding_map('many_embeddings', 'emb'); \echo :SQLSTATE
RESET statement_timeout;
SELECT clock_timestamp() - :'t0'::timestamptz < interval '1.5 s' AS map_stopped_within_a_second;
RESET client_min_messages;

-- SQL inside exceiver ignores the caller's objects: a temporary view named like a
-- catalog, and a schema early on the search_path whose text = text says every name
-- matches, change nothing in loading, embedding, evaluating and dropping.
CREATE SCHEMA exceiver_hostile;
CREATE FUNCTION exceiver_hostile.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR exceiver_hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = exceiver_hostile.always);
CREATE TEMP VIEW pg_attribute AS
  SELECT attrelid, attname, atttypid, atttypmod, attnum, attisdropped FROM pg_catalog.pg_attribute WHERE false;
SET search_path = exceiver_sec, exceiver_hostile, pg_catalog, public;
SELECT 'a'::text = 'b'::text AS hostile_operator_in_force;
-- the small folder load.sql leaves behind; unqualified, so it goes to exceiver_sec
SELECT table_name, cells FROM exceiver.load_10x('/tmp/exceiver_regress_10x', 'small_sec');
SELECT cells, skipped FROM exceiver.embed_table('sec_alice', 'cells', 'emb');
SELECT count(emb) AS embedded FROM exceiver_sec.cells;
SELECT cells, classes FROM exceiver.evaluate_embeddings('cells', 'emb', 'seurat_annotations', 5);
SELECT exceiver.drop_model('sec_alice') AS dropped_by_superuser;
SELECT count(*) AS sec_models_left FROM exceiver.models WHERE name LIKE 'sec\_%';
RESET search_path;
DROP VIEW pg_temp.pg_attribute;
DROP SCHEMA exceiver_hostile CASCADE;
SELECT count(*) AS small_sec_cells FROM exceiver_sec.small_sec;

-- A second train of a name that another session is creating fails at its start (42710):
-- this session holds the name's advisory lock, as a running train does, and a second
-- session (dblink) asks for the same name.
CREATE EXTENSION IF NOT EXISTS dblink;
BEGIN;
SELECT pg_try_advisory_xact_lock(x'45584345'::int, hashtext('sec_busy')) AS holding_the_name;
SELECT exceiver_try(format('SELECT * FROM dblink(%L, %L) AS t(m text)',
  format('dbname=%s port=%s host=%s', current_database(), current_setting('port'),
         split_part(current_setting('unix_socket_directories'), ',', 1)),
  $$SELECT model FROM exceiver.train('sec_busy', 'exceiver_sec.cells', '{"epochs": 0}')$$)) AS second_session;
COMMIT;
DROP EXTENSION dblink;

-- the backend survived every case above
SELECT 'alive' AS backend;
DROP SCHEMA exceiver_sec CASCADE;
REVOKE ALL ON exceiver.model_catalog, exceiver.models FROM exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
REVOKE ALL ON SEQUENCE exceiver.model_version_seq FROM exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
REVOKE ALL ON SCHEMA exceiver FROM exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
DROP FUNCTION public.exceiver_try(text);
DROP ROLE exceiver_plain, exceiver_member, exceiver_noinherit, exceiver_alice, exceiver_bob;
