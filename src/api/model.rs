//! The model catalog (`exceiver.models`), checkpoint import, and cell embedding.
//!
//! Models live in the extension table `exceiver.model_catalog` (config, gene vocabulary,
//! scaler, weights as safetensors bytes, labels, lineage), which `pg_dump` includes.
//! Each backend loads a model once and caches it; the cache entry is replaced when the
//! stored row changes (its version, its creating transaction, or the catalog table
//! itself after the extension was dropped and created again).

use crate::api::load::check_file_access;
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::{pinned, PinnedSearchPath};
use exceiver_core::model::cell::RawCell;
use exceiver_core::model::forward::Exceiver;
use exceiver_core::model::weights;
use exceiver_core::model::Config;
use exceiver_core::preprocess::{normalize_cell_into, Scaler};
use exceiver_core::Error;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

extension_sql!(
    r#"
CREATE SEQUENCE model_version_seq;
CREATE TABLE model_catalog (
    name        text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('exceiver', 'classifier')),
    version     bigint NOT NULL DEFAULT nextval('model_version_seq'),
    config      jsonb NOT NULL,
    genes       text[] NOT NULL,
    scaler_mean real[],
    scaler_std  real[],
    labels      text[],
    weights     bytea NOT NULL,
    parent      text,
    source      text,
    metrics     jsonb NOT NULL DEFAULT '{}',
    history     jsonb NOT NULL DEFAULT '[]',
    created     timestamptz NOT NULL DEFAULT now(),
    owner       name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE model_catalog IS 'exceiver models: config, gene vocabulary, scaler, safetensors weights, lineage';
-- Models are shared for use and owned for change: every role with SELECT may use any
-- model; a role adds models only as itself and changes or drops only models of roles
-- whose privileges it has (superusers and the extension's owner bypass this).
ALTER TABLE model_catalog ENABLE ROW LEVEL SECURITY;
CREATE POLICY model_use ON model_catalog FOR SELECT USING (true);
CREATE POLICY model_add ON model_catalog FOR INSERT WITH CHECK (owner = current_user);
CREATE POLICY model_change ON model_catalog FOR UPDATE
    USING (pg_catalog.pg_has_role(owner, 'USAGE')) WITH CHECK (pg_catalog.pg_has_role(owner, 'USAGE'));
CREATE POLICY model_drop ON model_catalog FOR DELETE USING (pg_catalog.pg_has_role(owner, 'USAGE'));
-- A model's version comes from the sequence alone and changes whenever its content does
-- (an UPDATE of weights, config, genes, scaler, labels or kind, or of the version itself):
-- the version-pinned functions (embed_at, classify_at) rely on it. Logical replication
-- copies rows without firing it (a subscriber's apply runs as a replica), so shards keep
-- the coordinator's numbers.
CREATE FUNCTION model_catalog_version() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  IF TG_OP = 'INSERT'
     OR (NEW.kind, NEW.config, NEW.genes, NEW.scaler_mean, NEW.scaler_std, NEW.labels, NEW.weights, NEW.version)
        IS DISTINCT FROM (OLD.kind, OLD.config, OLD.genes, OLD.scaler_mean, OLD.scaler_std, OLD.labels, OLD.weights, OLD.version) THEN
    NEW.version := pg_catalog.nextval('exceiver.model_version_seq'::pg_catalog.regclass);
  END IF;
  RETURN NEW;
END
$fn$;
CREATE TRIGGER model_version BEFORE INSERT OR UPDATE ON model_catalog
  FOR EACH ROW EXECUTE FUNCTION model_catalog_version();
SELECT pg_catalog.pg_extension_config_dump('model_catalog', '');
SELECT pg_catalog.pg_extension_config_dump('model_version_seq', '');
CREATE VIEW models AS
SELECT name, kind, config, cardinality(genes) AS n_genes,
       (config->>'query_len')::int * (config->>'query_dim')::int AS embedding_dim,
       scaler_mean IS NOT NULL AS has_scaler, labels, parent, source, metrics,
       octet_length(weights) AS weight_bytes, created, owner
FROM model_catalog;
COMMENT ON VIEW models IS 'exceiver models, one row each (weights left out)';
"#,
    name = "catalog",
    bootstrap
);

/// What identifies one stored model row for the cache: the catalog table (a new one
/// after DROP/CREATE EXTENSION), the row's version and its creating transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    table: u32,
    pub(crate) version: i64,
    xmin: i64,
}

/// One model as this backend holds it.
pub(crate) struct Loaded {
    pub stamp: Stamp,
    pub model: Exceiver,
    pub vocab: HashMap<String, u32>,
    pub scaler: Scaler,
    pub labels: Option<Vec<String>>,
}

thread_local! {
    static CACHE: RefCell<HashMap<String, Rc<Loaded>>> = RefCell::new(HashMap::new());
}

fn undefined_model(name: &str) -> ! {
    raise(
        Error::new(
            exceiver_core::Kind::UndefinedObject,
            format!("model \"{name}\" does not exist"),
        )
        .with_hint("SELECT name FROM exceiver.models lists the models."),
    )
}

/// The model `name`, from the backend cache when its stored row is unchanged.
pub(crate) fn get_model(name: &str) -> Rc<Loaded> {
    // Read-only SPI: this runs in parallel workers too, where a read-write SPI call
    // (pgrx's get_one helpers) is refused. Schema-qualified throughout, so the
    // caller's search_path cannot change what this reads.
    let row: (Option<i64>, Option<i64>, Option<i64>) = Spi::connect(|client| {
        let t = client.select(
            "SELECT tableoid::pg_catalog.int8, version, xmin::pg_catalog.text::pg_catalog.int8 \
                 FROM exceiver.model_catalog WHERE name OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[name.into()],
        )?;
        if t.is_empty() {
            return Ok::<_, pgrx::spi::SpiError>((None, None, None));
        }
        let t = t.first();
        Ok((t.get(1)?, t.get(2)?, t.get(3)?))
    })
    .or_raise();
    let (Some(table), Some(version), Some(xmin)) = row else {
        CACHE.with(|c| c.borrow_mut().remove(name));
        undefined_model(name)
    };
    let stamp = Stamp {
        table: table as u32,
        version,
        xmin,
    };
    if let Some(m) = CACHE.with(|c| c.borrow().get(name).filter(|m| m.stamp == stamp).cloned()) {
        return m;
    }
    let loaded = Rc::new(load_model(name, stamp));
    CACHE.with(|c| c.borrow_mut().insert(name.to_string(), loaded.clone()));
    loaded
}

/// The model `name` as stored at `version` (its `exceiver.model_version`): 55000 when the
/// catalog holds another version of it. What the `_at` functions build on: a call pinned
/// to a version gives the same answer for the same arguments or fails, so it can be
/// declared IMMUTABLE and shipped to the shards by `postgres_fdw` (README, Scaling out).
pub(crate) fn get_model_at(name: &str, version: i64) -> Rc<Loaded> {
    let m = get_model(name);
    if m.stamp.version != version {
        raise_code(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "model \"{name}\" is at version {}, not {version}",
                m.stamp.version
            ),
            Some("SELECT exceiver.model_version(name) gives a model's current version; a model re-imported, retrained or replaced gets a new one."),
        );
    }
    m
}

/// The stored version of model `name`: a number that changes whenever the model is
/// replaced (never reused), for the version-pinned `_at` functions.
#[pg_extern(stable, parallel_safe, strict)]
fn model_version(name: &str) -> i64 {
    get_model(name).stamp.version
}

fn load_model(name: &str, stamp: Stamp) -> Loaded {
    type Row = (
        Option<String>,
        Option<Vec<String>>,
        Option<Vec<f32>>,
        Option<Vec<f32>>,
        Option<Vec<String>>,
        Option<Vec<u8>>,
    );
    let row: Row = Spi::connect(|client| {
        let t = client
            .select(
                "SELECT config::pg_catalog.text, genes, scaler_mean, scaler_std, labels, weights \
                 FROM exceiver.model_catalog \
                 WHERE name OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2",
                Some(1),
                &[name.into(), stamp.version.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((
            t.get(1)?,
            t.get(2)?,
            t.get(3)?,
            t.get(4)?,
            t.get(5)?,
            t.get(6)?,
        ))
    })
    .or_raise();
    let (Some(config), Some(genes), mean, std, labels, Some(bytes)) = row else {
        undefined_model(name)
    };
    let cfg: Config = serde_json::from_str(&config)
        .map_err(|e| Error::internal(format!("stored config of model \"{name}\" is invalid: {e}")))
        .or_raise();
    let params = weights::load_safetensors_with(&bytes, &cfg).or_raise();
    let scaler = match (mean, std) {
        (Some(m), Some(s)) => Scaler::new(m, s).or_raise(),
        _ => Scaler::identity(cfg.seq_len),
    };
    let model = Exceiver::new(cfg, params, scaler.zero_fill()).or_raise();
    model.warm_up();
    let vocab = genes
        .into_iter()
        .enumerate()
        .map(|(i, g)| (g, i as u32))
        .collect();
    Loaded {
        stamp,
        model,
        vocab,
        scaler,
        labels,
    }
}

/// A cell as the model sees it: vocabulary indices and model input values of its
/// expressed, known genes. Validates the arrays; counts unknown genes.
pub(crate) struct CellInput {
    pub genes: Vec<u32>,
    pub values: Vec<f32>,
}

pub(crate) fn cell_input(m: &Loaded, genes: &Array<&str>, counts: &Array<f32>) -> CellInput {
    try_cell_input(m, genes, counts).or_raise()
}

/// [`cell_input`] as a result: arrays of different lengths, a bad value, or (kind
/// `InvalidParameter`) a cell with no counts on the model's genes are errors.
pub(crate) fn try_cell_input(
    m: &Loaded,
    genes: &Array<&str>,
    counts: &Array<f32>,
) -> Result<CellInput, Error> {
    let (ng, nc) = (genes.len(), counts.len());
    if ng != nc {
        return Err(
            Error::shape(format!("genes has {ng} elements but counts has {nc}"))
                .with_hint("genes and counts must be parallel arrays of the same length."),
        );
    }
    let (cell, unknown) = cell_input_iter(m, ng, genes.iter(), counts.iter())?;
    if unknown * 2 > ng && first_report_in_statement() {
        notice!(
            "{unknown} of the cell's {ng} genes are not in the model's vocabulary and were ignored (reported once per statement)"
        );
    }
    Ok(cell)
}

thread_local! {
    /// Start time of the statement that last reported unknown genes.
    static REPORTED_IN: std::cell::Cell<i64> = const { std::cell::Cell::new(i64::MIN) };
}

/// True once per statement: a query over many cells gets one NOTICE about genes outside
/// the vocabulary, not one per row.
fn first_report_in_statement() -> bool {
    // SAFETY: reads the backend's statement start time.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    REPORTED_IN.with(|r| r.replace(now) != now)
}

/// Validate and preprocess one cell given as parallel (gene, count) sequences of length
/// `n`; returns the model input and how many genes were outside the vocabulary.
pub(crate) fn cell_input_iter<'a>(
    m: &Loaded,
    n: usize,
    genes: impl Iterator<Item = Option<&'a str>>,
    counts: impl Iterator<Item = Option<f32>>,
) -> Result<(CellInput, usize), Error> {
    let (cell, unknown) = RawCell::read(|g| m.vocab.get(g).copied(), genes, counts)?;
    if unknown == n || cell.total <= 0.0 {
        return Err(Error::invalid(format!(
            "the cell has no counts on the model's {} genes ({n} genes given, {unknown} not in the vocabulary)",
            m.vocab.len()
        ))
        .with_hint("Check that gene symbols match the model's vocabulary: SELECT genes FROM exceiver.model_catalog."));
    }
    let mut out_g = Vec::new();
    let mut out_v = Vec::new();
    normalize_cell_into(
        &cell.genes,
        &cell.counts,
        Some(cell.total),
        &m.scaler,
        &mut out_g,
        &mut out_v,
    )?;
    if out_g.is_empty() {
        return Err(Error::invalid(
            "the cell has no non-zero counts on the model's genes",
        ));
    }
    Ok((
        CellInput {
            genes: out_g,
            values: out_v,
        },
        unknown,
    ))
}

/// The cell embedding as a real[] (the SQL function `exceiver.embed` returns it as a
/// pgvector `vector`).
#[pg_extern(stable, parallel_safe, strict)]
fn embed_array(model: &str, genes: Array<&str>, counts: Array<f32>) -> Vec<f32> {
    let m = get_model(model);
    let cell = cell_input(&m, &genes, &counts);
    m.model.embed(&cell.genes, &cell.values).or_raise()
}

/// [`embed_array`] of the model pinned at `version`, or NULL for a cell with no counts
/// on the model's genes (as `embed_table` leaves it). IMMUTABLE, so that `postgres_fdw`
/// ships it to the shard that holds the cell.
#[pg_extern(immutable, parallel_safe, strict)]
fn embed_at_array(
    model: &str,
    version: i64,
    genes: Array<&str>,
    counts: Array<f32>,
) -> Option<Vec<f32>> {
    let m = get_model_at(model, version);
    match try_cell_input(&m, &genes, &counts) {
        Ok(cell) => Some(m.model.embed(&cell.genes, &cell.values).or_raise()),
        Err(e) if e.kind == exceiver_core::Kind::InvalidParameter => None,
        Err(e) => raise(e),
    }
}

extension_sql!(
    r#"
DO $do$
DECLARE s text := (SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                   WHERE t.typname = 'vector' AND t.typtype = 'b' ORDER BY n.oid LIMIT 1);
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION exceiver.embed(model text, genes text[], counts real[]) RETURNS %1$I.vector
    LANGUAGE sql STABLE PARALLEL SAFE STRICT
    AS 'SELECT exceiver.embed_array(model, genes, counts)::%1$I.vector'$f$, s);
  EXECUTE 'COMMENT ON FUNCTION exceiver.embed(text, text[], real[]) IS '
          '''the cell embedding (processed latent, flattened) as a pgvector vector''';
  EXECUTE format($f$
    CREATE FUNCTION exceiver.embed_at(model text, version bigint, genes text[], counts real[]) RETURNS %1$I.vector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS 'SELECT exceiver.embed_at_array(model, version, genes, counts)::%1$I.vector'$f$, s);
  EXECUTE 'COMMENT ON FUNCTION exceiver.embed_at(text, bigint, text[], real[]) IS '
          '''exceiver.embed with the model pinned at a version (exceiver.model_version): immutable, so postgres_fdw runs it on the shards''';
END
$do$;
"#,
    name = "embed_vector",
    requires = [embed_array, embed_at_array]
);

fn text_array(a: &Array<&str>, what: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(a.len());
    for (i, g) in a.iter().enumerate() {
        match g {
            Some(g) => out.push(g.to_string()),
            None => raise_code(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{what}[{}] is NULL", i + 1),
                None,
            ),
        }
    }
    out
}

fn real_array(a: Option<Array<f32>>, what: &str, n: usize) -> Option<Vec<f32>> {
    let a = a?;
    if a.len() != n {
        raise(Error::shape(format!(
            "{what} has {} values but the model has {n} genes",
            a.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (i, v) in a.iter().enumerate() {
        match v {
            Some(v) if v.is_finite() => out.push(v),
            Some(v) => raise(Error::data(format!(
                "{what}[{}] = {v} is not finite",
                i + 1
            ))),
            None => raise_code(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{what}[{}] is NULL", i + 1),
                None,
            ),
        }
    }
    Some(out)
}

/// Advisory-lock class of model names (the first key of `pg_try_advisory_xact_lock`).
const NAME_LOCK: i32 = 0x4558_4345; // "EXCE"

/// Claim `name` for a model this transaction will create: refuse an empty name, a name
/// another session is creating right now (an advisory lock on the name, held until
/// the transaction ends, so a second `train` of it fails at its start, not its end) and
/// a name in use. Both refusals are 42710.
pub(crate) fn check_new_model_name(name: &str) {
    if name.trim().is_empty() {
        raise(Error::invalid("model name must not be empty"));
    }
    let (locked, exists) = Spi::connect(|c| {
        let t = c
            .select(
                "SELECT pg_catalog.pg_try_advisory_xact_lock($1, pg_catalog.hashtext($2)), \
                        EXISTS (SELECT 1 FROM exceiver.model_catalog WHERE name OPERATOR(pg_catalog.=) $2)",
                Some(1),
                &[NAME_LOCK.into(), name.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((t.get::<bool>(1)?, t.get::<bool>(2)?))
    })
    .or_raise();
    if locked != Some(true) {
        raise_code(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("model \"{name}\" is being created by another session"),
            Some("Wait for that session to finish, or choose another name."),
        );
    }
    if exists == Some(true) {
        raise_code(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("model \"{name}\" already exists"),
            Some("Choose another name, or remove it first with exceiver.drop_model()."),
        );
    }
}

/// Import a published Exceiver checkpoint (PyTorch Lightning `.ckpt`, or `.safetensors`)
/// as model `name`. The published files do not say which gene each embedding row is,
/// so `genes` (one symbol per row, in row order) is required. Without scaler arrays
/// the per-gene z-score is the identity.
#[pg_extern(volatile, parallel_unsafe)]
fn import_checkpoint(
    name: &str,
    path: &str,
    genes: Array<&str>,
    scaler_mean: default!(Option<Array<f32>>, "NULL"),
    scaler_std: default!(Option<Array<f32>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(kind, String),
        name!(n_genes, i64),
        name!(num_layers, i64),
        name!(embedding_dim, i64),
    ),
> {
    let _search_path = PinnedSearchPath::new();
    check_file_access();
    gucs::apply_limits();
    check_new_model_name(name);
    let p = Path::new(path);
    let (cfg, params) = if p.extension().is_some_and(|e| e == "safetensors") {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e)).or_raise();
        weights::load_safetensors(&bytes)
            .map_err(|e| e.context(format!("\"{path}\"")))
            .or_raise()
    } else {
        weights::load_checkpoint(p).or_raise()
    };
    let genes = text_array(&genes, "genes");
    if genes.len() != cfg.seq_len {
        raise(
            Error::shape(format!(
                "genes has {} symbols but the checkpoint's vocabulary has {} genes",
                genes.len(),
                cfg.seq_len
            ))
            .with_hint("Pass one gene symbol per embedding row, in row order."),
        );
    }
    let mut seen = std::collections::HashSet::with_capacity(genes.len());
    for g in &genes {
        if !seen.insert(g.as_str()) {
            raise(Error::invalid(format!(
                "gene \"{g}\" appears more than once in genes"
            )));
        }
    }
    let mean = real_array(scaler_mean, "scaler_mean", cfg.seq_len);
    let std = real_array(scaler_std, "scaler_std", cfg.seq_len);
    if mean.is_some() != std.is_some() {
        raise(Error::invalid(
            "give both scaler_mean and scaler_std, or neither",
        ));
    }
    let scaler = match (&mean, &std) {
        (Some(m), Some(s)) => Scaler::new(m.clone(), s.clone()).or_raise(),
        _ => Scaler::identity(cfg.seq_len),
    };
    // Build the model once to check that everything fits together.
    let model = Exceiver::new(cfg.clone(), params, scaler.zero_fill()).or_raise();
    let (cfg, params, _) = model.into_parts();
    let bytes = weights::save_safetensors(&cfg, &params, &[]).or_raise();
    let kind = if cfg.num_classes.is_some() {
        "classifier"
    } else {
        "exceiver"
    };
    let config = serde_json::to_string(&cfg).unwrap_or_default();
    Spi::run_with_args(
        "INSERT INTO exceiver.model_catalog (name, kind, config, genes, scaler_mean, scaler_std, weights, source) \
         VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8)",
        &[
            name.into(),
            kind.into(),
            config.into(),
            genes.into(),
            mean.into(),
            std.into(),
            bytes.into(),
            format!("import:{path}").into(),
        ],
    )
    .or_raise();
    TableIterator::once((
        name.to_string(),
        kind.to_string(),
        cfg.seq_len as i64,
        cfg.num_layers as i64,
        cfg.embedding_len() as i64,
    ))
}

/// Remove model `name` from the catalog (its owner, a role with its privileges, or a
/// superuser only).
#[pg_extern(volatile, parallel_unsafe)]
fn drop_model(name: &str) -> bool {
    let (deleted, owner) = pinned(|| {
        Spi::connect_mut(|c| {
            let t = c
                .update(
                    "WITH d AS (DELETE FROM exceiver.model_catalog WHERE name = $1 RETURNING 1) \
                     SELECT (SELECT count(*) FROM d), \
                            (SELECT owner::text FROM exceiver.model_catalog WHERE name = $1)",
                    Some(1),
                    &[name.into()],
                )?
                .first();
            Ok::<_, pgrx::spi::SpiError>((t.get::<i64>(1)?.unwrap_or(0), t.get::<String>(2)?))
        })
        .or_raise()
    });
    CACHE.with(|c| c.borrow_mut().remove(name));
    match (deleted, owner) {
        (0, Some(owner)) => raise_code(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of model \"{name}\" (owned by role \"{owner}\") to drop it"),
            None,
        ),
        (0, None) => undefined_model(name),
        _ => true,
    }
}
