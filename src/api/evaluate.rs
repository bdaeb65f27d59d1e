//! `exceiver.evaluate_embeddings`: how well an embedding column agrees with labels,
//! by leave-one-out k-nearest-neighbour label prediction with pgvector distances.

use pgrx::prelude::*;

extension_sql!(
    r#"
CREATE FUNCTION evaluate_embeddings(source regclass, embedding_column text, label_column text, k integer DEFAULT 15)
RETURNS TABLE(cells bigint, classes integer, neighbours integer, accuracy double precision, macro_f1 double precision)
LANGUAGE plpgsql VOLATILE
-- immune to the caller's search_path; pgvector's type and operator are named with
-- their schema, found from the catalog
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  vs text := (SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE t.typname = 'vector' AND t.typtype = 'b' ORDER BY n.oid LIMIT 1);
  emb_type text;
  n_skipped bigint;
  n_classes integer;
BEGIN
  IF k IS NULL OR k < 1 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('k must be at least 1, not %s', k);
  END IF;
  SELECT t.typname INTO emb_type FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
   WHERE a.attrelid = source AND a.attname = embedding_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF emb_type IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '42703', MESSAGE = format('column "%s" of %s does not exist', embedding_column, source);
  END IF;
  IF emb_type <> 'vector' THEN
    RAISE EXCEPTION USING ERRCODE = '42804', MESSAGE = format('column "%s" of %s is %s, not a pgvector vector', embedding_column, source,
      (SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = source AND attname = embedding_column));
  END IF;
  PERFORM 1 FROM pg_attribute WHERE attrelid = source AND attname = label_column AND attnum > 0 AND NOT attisdropped;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = '42703', MESSAGE = format('column "%s" of %s does not exist', label_column, source);
  END IF;
  EXECUTE format('SELECT count(*) FILTER (WHERE %1$I IS NULL OR %2$I IS NULL), count(DISTINCT %2$I) FILTER (WHERE %1$I IS NOT NULL) FROM %3$s',
                 embedding_column, label_column, source) INTO n_skipped, n_classes;
  IF n_classes < 2 THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = format('label column "%s" of %s has %s distinct labels; kNN evaluation needs at least 2', label_column, source, n_classes);
  END IF;
  IF n_skipped > 0 THEN
    RAISE NOTICE '% cells with a NULL label or embedding were skipped', n_skipped;
  END IF;
  -- The embeddings are copied into a temporary table stored PLAIN (not TOASTed): the
  -- all-pairs scan below reads every vector once per cell, and detoasting each read
  -- made it 4-7x slower.
  IF to_regclass('pg_temp.exceiver_eval') IS NOT NULL THEN
    DROP TABLE pg_temp.exceiver_eval;
  END IF;
  EXECUTE format('CREATE TEMP TABLE exceiver_eval (id bigint, e %I.vector, y text)', vs);
  ALTER TABLE pg_temp.exceiver_eval ALTER COLUMN e SET STORAGE PLAIN;
  EXECUTE format('INSERT INTO pg_temp.exceiver_eval SELECT row_number() OVER (), %1$I, %2$I::text FROM %3$s
                  WHERE %1$I IS NOT NULL AND %2$I IS NOT NULL', embedding_column, label_column, source);
  -- Each cell's label is predicted by the majority label of its k nearest other cells
  -- (cosine distance; ties go to the label that sorts first). Accuracy over all cells,
  -- macro-F1 over the labels present.
  RETURN QUERY EXECUTE format($q$
    WITH pred AS (
      SELECT c.y,
             (SELECT mode() WITHIN GROUP (ORDER BY nn.y)
                FROM (SELECT o.y FROM pg_temp.exceiver_eval o WHERE o.id <> c.id
                       ORDER BY o.e OPERATOR(%2$I.<=>) c.e LIMIT %1$s) nn) AS yhat
        FROM pg_temp.exceiver_eval c),
    per AS (
      SELECT l.lbl,
             count(*) FILTER (WHERE p.y = l.lbl AND p.yhat = l.lbl) AS tp,
             count(*) FILTER (WHERE p.y <> l.lbl AND p.yhat = l.lbl) AS fp,
             count(*) FILTER (WHERE p.y = l.lbl AND p.yhat IS DISTINCT FROM l.lbl) AS fn
        FROM (SELECT DISTINCT y AS lbl FROM pred) l CROSS JOIN pred p GROUP BY l.lbl)
    SELECT (SELECT count(*) FROM pred), (SELECT count(*)::int FROM per), %1$s,
           (SELECT avg((y = yhat)::int)::float8 FROM pred),
           (SELECT avg(CASE WHEN 2 * tp + fp + fn = 0 THEN 0 ELSE 2.0 * tp / (2 * tp + fp + fn) END)::float8 FROM per)
  $q$, k, vs);
  DROP TABLE pg_temp.exceiver_eval;
END
$fn$;
COMMENT ON FUNCTION evaluate_embeddings(regclass, text, text, integer) IS
  'leave-one-out kNN label accuracy and macro-F1 of an embedding column (cosine distance)';
"#,
    name = "evaluate_embeddings",
    requires = ["catalog"]
);
