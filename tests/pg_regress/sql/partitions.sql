-- Partitioned cell tables, and the version-pinned functions that postgres_fdw ships to
-- shards (the cluster itself is tested by make test-cluster). Uses the model 'ts' made by
-- model.sql.
\set VERBOSITY default
CREATE TABLE part_cells (cell_id text, genes text[], counts real[], emb vector(512))
  PARTITION BY HASH (cell_id);
CREATE TABLE part_cells_0 PARTITION OF part_cells FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE part_cells_1 PARTITION OF part_cells FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO part_cells (cell_id, genes, counts)
  SELECT 'c' || i, ARRAY['G' || i, 'G' || (i + 7), 'G' || (i * 3)], ARRAY[i % 5 + 1, 2, 3]
  FROM generate_series(1, 40) i;
-- ctids repeat across partitions; embed_table still writes each row its own cell's embedding
SELECT EXISTS (SELECT 1 FROM part_cells_0 WHERE ctid IN (SELECT ctid FROM part_cells_1)) AS ctids_repeat;
SELECT cells, skipped FROM exceiver.embed_table('ts', 'part_cells', 'emb');
SELECT count(*) AS cells, count(*) FILTER (WHERE emb = exceiver.embed('ts', genes, counts)) AS own_embedding
FROM part_cells;
-- a model pinned at its version: the same embedding as exceiver.embed, NULL for a cell
-- with none of the model's genes
SELECT exceiver.model_version('ts') = (SELECT version FROM exceiver.model_catalog WHERE name = 'ts') AS version_matches;
SELECT count(*) FILTER (WHERE exceiver.embed_at('ts', exceiver.model_version('ts'), genes, counts) = emb) AS embed_at_equal
FROM part_cells;
SELECT exceiver.embed_at('ts', exceiver.model_version('ts'), ARRAY['NOT_A_GENE'], ARRAY[1]::real[]) IS NULL AS no_genes_is_null;
SELECT provolatile FROM pg_proc WHERE oid IN ('exceiver.embed_at'::regproc, 'exceiver.classify_at'::regproc);
-- the version changes with the model's content, never otherwise, and only the sequence sets it
SELECT exceiver.model_version('ts') AS v0 \gset
UPDATE exceiver.model_catalog SET metrics = metrics || '{"note": 1}', source = source WHERE name = 'ts';
SELECT exceiver.model_version('ts') = :v0 AS same_after_metrics;
UPDATE exceiver.model_catalog SET version = 1 WHERE name = 'ts';
SELECT exceiver.model_version('ts') > :v0 AS renumbered_by_the_sequence;
SELECT exceiver.model_version('ts') AS v1 \gset
UPDATE exceiver.model_catalog SET labels = ARRAY['changed'] WHERE name = 'ts';
SELECT exceiver.model_version('ts') > :v1 AS new_after_labels;
UPDATE exceiver.model_catalog SET labels = NULL WHERE name = 'ts';
\set VERBOSITY sqlstate
SELECT exceiver.embed_at('ts', exceiver.model_version('ts') + 1, ARRAY['G1'], ARRAY[1]::real[]); -- another version
SELECT exceiver.embed_at('ts', :v1, ARRAY['G1'], ARRAY[1]::real[]); -- a version the model had
SELECT exceiver.embed_at('nope', 1, ARRAY['G1'], ARRAY[1]::real[]);
SELECT exceiver.model_version('nope');
SELECT exceiver.embed_at('ts', exceiver.model_version('ts'), ARRAY['G1', 'G2'], ARRAY[1]::real[]);
SELECT exceiver.embed_at('ts', exceiver.model_version('ts'), ARRAY['G1'], ARRAY['NaN']::real[]);
SELECT exceiver.classify_at('ts', exceiver.model_version('ts'), ARRAY['G1'], ARRAY[1]::real[]); -- not a classifier
\set VERBOSITY default
-- embed_table on a partitioned table with a missing column adds it to every partition
SELECT cells FROM exceiver.embed_table('ts', 'part_cells', 'emb_new');
SELECT count(emb_new) AS filled FROM part_cells_1;

-- A foreign partition (postgres_fdw back to this database, as a shard would be):
-- embed_table ships one UPDATE with the model pinned at its version, and no row is read here
CREATE EXTENSION postgres_fdw;
DO $$ BEGIN
  EXECUTE format('CREATE SERVER loopback FOREIGN DATA WRAPPER postgres_fdw OPTIONS '
                 '(host %L, port %L, dbname %L, extensions %L)',
                 split_part(current_setting('unix_socket_directories'), ',', 1),
                 current_setting('port'), current_database(), 'vector, exceiver');
END $$;
CREATE USER MAPPING FOR CURRENT_USER SERVER loopback;
CREATE TABLE shard_cells (cell_id text PRIMARY KEY, genes text[], counts real[], emb vector(512), small vector(3));
INSERT INTO shard_cells (cell_id, genes, counts) SELECT cell_id, genes, counts FROM part_cells;
CREATE TABLE sharded (cell_id text, genes text[], counts real[], emb vector(512), small vector(3))
  PARTITION BY HASH (cell_id);
CREATE FOREIGN TABLE sharded_0 PARTITION OF sharded FOR VALUES WITH (MODULUS 1, REMAINDER 0)
  SERVER loopback OPTIONS (table_name 'shard_cells');
CREATE FUNCTION pg_temp.plan(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
  FOR r IN EXECUTE 'EXPLAIN (VERBOSE, COSTS OFF) ' || q LOOP
    RETURN NEXT regexp_replace(r, '\d+::bigint', 'V::bigint');
  END LOOP;
END $$;
SELECT exceiver.model_version('ts') AS v \gset
SELECT * FROM pg_temp.plan(format('UPDATE sharded SET emb = exceiver.embed_at(%L, %s, genes, counts)', 'ts', :v));
SELECT cells, skipped FROM exceiver.embed_table('ts', 'sharded', 'emb');
SELECT count(*) FILTER (WHERE s.emb = p.emb) AS equal_to_local FROM shard_cells s JOIN part_cells p USING (cell_id);
SELECT * FROM exceiver.embed_table('ts', 'sharded', 'not_there'); \echo :SQLSTATE
\set VERBOSITY sqlstate
SELECT * FROM exceiver.embed_table('ts', 'sharded', 'small');
SELECT * FROM exceiver.embed_table('ts', 'sharded', 'genes');
-- a shard that cannot be reached: 08001 naming the server, nothing written
CREATE SERVER nowhere FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '/nonexistent', port '1', dbname 'x', extensions 'vector, exceiver');
CREATE USER MAPPING FOR CURRENT_USER SERVER nowhere;
CREATE TABLE sharded2 (cell_id text, genes text[], counts real[], emb vector(512)) PARTITION BY HASH (cell_id);
CREATE FOREIGN TABLE sharded2_0 PARTITION OF sharded2 FOR VALUES WITH (MODULUS 2, REMAINDER 0)
  SERVER loopback OPTIONS (table_name 'shard_cells');
CREATE FOREIGN TABLE sharded2_1 PARTITION OF sharded2 FOR VALUES WITH (MODULUS 2, REMAINDER 1)
  SERVER nowhere OPTIONS (table_name 'shard_cells');
UPDATE shard_cells SET emb = NULL;
\set VERBOSITY default
SELECT * FROM exceiver.embed_table('ts', 'sharded2', 'emb'); \echo :SQLSTATE
SELECT count(emb) AS written FROM shard_cells;
DROP TABLE sharded, sharded2, shard_cells, part_cells;
DROP EXTENSION postgres_fdw CASCADE;
SELECT 'alive' AS session;
