//! `exceiver.train` and `exceiver.finetune`: the SQL skin over the core's training
//! session ([`exceiver_core::session`]).
//!
//! This file only adapts: [`TableSource`] streams a cell table through SPI cursors (the
//! vocabulary from an SQL aggregate, each pass through a cursor in batches, an epoch's
//! order by `md5` of `cell_id` and the seed, validation cells by a hash of `cell_id`);
//! [`Notices`] turns progress lines into NOTICEs and checks for interrupts after every
//! batch, so `pg_cancel_backend` and `statement_timeout` stop training; the model is
//! written to the catalog only at the end, in the caller's transaction, so an
//! interrupted or failed run leaves nothing behind.

use crate::api::bulk::{check_cell_table, column_type, relation_name};
use crate::api::load::quote_ident;
use crate::api::model::{check_new_model_name, get_model, Loaded};
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::model::cell::{RawCell, Vocab};
use exceiver_core::model::weights;
use exceiver_core::session::{self, CellSource, Options, Pass, Progress, Start, Task, Trained};
use exceiver_core::{Error, Result};
use pgrx::prelude::*;
use pgrx::spi::{SpiCursor, SpiError};
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::Value;

fn spi(e: SpiError) -> Error {
    Error::internal(format!("SPI: {e}"))
}

/// A cell table as the session's [`CellSource`]: rows `(cell_id, genes, counts[, label])`.
struct TableSource {
    rel: String,
    /// `WHERE` clauses of the training and validation cells.
    train_where: String,
    val_where: String,
    /// ` ORDER BY cell_id LIMIT n` with max_cells (every training pass takes the same cells).
    limit: String,
    /// `, label::text` for a classifier.
    label_sql: String,
    seed: u64,
}

impl TableSource {
    fn new(rel: &str, o: &Options, label_column: Option<&str>) -> TableSource {
        let cut = (o.val_fraction * 1_000_000.0).round() as i64;
        let is_val = format!(
            "((abs(hashtext(cell_id::text || ':{}')::bigint) % 1000000) < {cut})",
            o.seed
        );
        let label_filter = label_column
            .map(|c| {
                let cut = (o.label_fraction * 1_000_000.0).round() as i64;
                format!(
                    " AND {} IS NOT NULL AND (abs(hashtext(cell_id::text || ':labels:{}')::bigint) % 1000000) < {cut}",
                    quote_ident(c),
                    o.seed
                )
            })
            .unwrap_or_default();
        TableSource {
            rel: rel.to_string(),
            train_where: format!("NOT {is_val} AND genes IS NOT NULL{label_filter}"),
            val_where: format!("{is_val} AND genes IS NOT NULL{label_filter}"),
            limit: o
                .max_cells
                .map(|n| format!(" ORDER BY cell_id LIMIT {n}"))
                .unwrap_or_default(),
            label_sql: label_column
                .map(|c| format!(", {}::text", quote_ident(c)))
                .unwrap_or_default(),
            seed: o.seed,
        }
    }
}

/// Up to `n` rows of the cursor as cells over `vocab` (rows with NULL arrays skipped),
/// through the core's cell contract; errors name the cell.
fn fetch_cells(
    cur: &mut SpiCursor<'_>,
    n: usize,
    vocab: &Vocab,
    with_label: bool,
) -> Result<Vec<RawCell>> {
    let t = cur.fetch(n as _).map_err(spi)?;
    let _batch = crate::api::bulk::FetchedBatch::new();
    let mut out = Vec::with_capacity(t.len());
    for r in t {
        let id: String = r.get(1).map_err(spi)?.unwrap_or_default();
        let genes: Option<Array<&str>> = r.get(2).map_err(spi)?;
        let counts: Option<Array<f32>> = r.get(3).map_err(spi)?;
        let label: Option<String> = if with_label {
            r.get(4).map_err(spi)?
        } else {
            None
        };
        let (Some(genes), Some(counts)) = (genes, counts) else {
            continue;
        };
        if genes.len() != counts.len() {
            return Err(Error::shape(format!(
                "cell \"{id}\": genes has {} elements but counts has {}",
                genes.len(),
                counts.len()
            )));
        }
        let (mut cell, _) = RawCell::read(|g| vocab.get(g), genes.iter(), counts.iter())
            .map_err(|e| e.context(format!("cell \"{id}\"")))?;
        cell.label = label;
        out.push(cell);
    }
    Ok(out)
}

impl CellSource for TableSource {
    fn describe(&self) -> String {
        self.rel.clone()
    }

    fn has_cells(&mut self) -> Result<bool> {
        let q = format!("SELECT EXISTS (SELECT 1 FROM {})", self.rel);
        Spi::connect(|c| c.select(&q, Some(1), &[])?.first().get::<bool>(1))
            .map(|b| b.unwrap_or(false))
            .map_err(spi)
    }

    fn expressed_genes(&mut self, min_cells: i64) -> Result<Vec<String>> {
        let q = format!(
            "SELECT coalesce(array_agg(g ORDER BY g), '{{}}') FROM (SELECT g FROM \
             (SELECT genes FROM {} WHERE {}{}) t, unnest(genes) g WHERE g IS NOT NULL \
             GROUP BY g HAVING count(*) >= $1) s",
            self.rel, self.train_where, self.limit
        );
        Spi::connect(|c| {
            c.select(&q, Some(1), &[min_cells.into()])?
                .first()
                .get::<Vec<String>>(1)
        })
        .map(Option::unwrap_or_default)
        .map_err(spi)
    }

    fn scan(
        &mut self,
        pass: Pass,
        batch: usize,
        vocab: &Vocab,
        each: &mut dyn FnMut(Vec<RawCell>) -> Result<()>,
    ) -> Result<()> {
        let (rel, ls, tw, lim) = (&self.rel, &self.label_sql, &self.train_where, &self.limit);
        let q = match pass {
            Pass::Training => {
                format!("SELECT cell_id::text, genes, counts::real[]{ls} FROM {rel} WHERE {tw}{lim}")
            }
            Pass::Shuffled { epoch } => format!(
                "SELECT cell_id::text, genes, counts::real[]{ls} FROM (SELECT * FROM {rel} WHERE {tw}{lim}) t \
                 ORDER BY md5(cell_id::text || ':{}:{epoch}')",
                self.seed
            ),
            Pass::Validation => format!(
                "SELECT cell_id::text, genes, counts::real[]{ls} FROM {rel} WHERE {} ORDER BY cell_id",
                self.val_where
            ),
        };
        let with_label = !ls.is_empty();
        Spi::connect(|c| {
            let mut cur = c.try_open_cursor(q.as_str(), &[]).map_err(spi)?;
            loop {
                let cells = fetch_cells(&mut cur, batch, vocab, with_label)?;
                if cells.is_empty() {
                    return Ok(());
                }
                each(cells)?;
            }
        })
    }
}

/// Progress lines as NOTICEs; PostgreSQL's interrupt check after every batch.
struct Notices;
impl Progress for Notices {
    fn notice(&mut self, line: &str) {
        notice!("{line}");
    }
    fn check(&mut self) -> Result<()> {
        check_for_interrupts!();
        Ok(())
    }
}

/// A stored model as a starting point.
fn start_of(m: &Loaded) -> Start {
    let mut genes: Vec<(String, u32)> = m.vocab.iter().map(|(g, &i)| (g.clone(), i)).collect();
    genes.sort_by_key(|x| x.1);
    Start {
        cfg: m.model.config().clone(),
        params: m.model.params().clone(),
        genes: genes.into_iter().map(|x| x.0).collect(),
        scaler: m.scaler.clone(),
    }
}

/// Run the session on `rel` and store the model `model` in the catalog.
fn train_and_store(
    model: &str,
    rel: &str,
    opts: &Options,
    start: Option<Start>,
    label_column: Option<&str>,
    labels: Option<Vec<String>>,
    parent: Option<String>,
) -> Trained {
    gucs::device().check_supported().or_raise();
    gucs::apply_limits();
    gucs::apply_precision();
    let mut src = TableSource::new(rel, opts, label_column);
    let task = Task {
        model,
        opts,
        start,
        labels,
        threads: gucs::threads(),
        device: gucs::device(),
    };
    let t = session::train(&mut src, task, &mut Notices).or_raise();
    let bytes = weights::save_safetensors(&t.cfg, &t.params, &[]).or_raise();
    let (kind, source) = match t.cfg.num_classes {
        Some(_) => ("classifier", "finetune"),
        None => ("exceiver", "train"),
    };
    Spi::run_with_args(
        "INSERT INTO exceiver.model_catalog (name, kind, config, genes, scaler_mean, scaler_std, labels, weights, parent, source, metrics, history) \
         VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb)",
        &[
            model.into(),
            kind.into(),
            serde_json::to_string(&t.cfg).unwrap_or_default().into(),
            t.genes.clone().into(),
            t.scaler.mean.clone().into(),
            t.scaler.scale.clone().into(),
            t.labels.clone().into(),
            bytes.into(),
            parent.into(),
            format!("{source}:{rel}").into(),
            t.metrics.to_string().into(),
            Value::Array(t.history.clone()).to_string().into(),
        ],
    )
    .or_raise();
    t
}

fn check_cell_id(rel: &str) {
    if column_type(rel, "cell_id").is_none() {
        raise_code(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {rel} has no column \"cell_id\""),
            Some("A cell table has columns cell_id text, genes text[] and counts real[] (see exceiver.load_10x)."),
        );
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Train a new model on cell table `source` by masked value prediction (or, with the
/// option `parent`, continue training an existing model on it) and store it in the
/// catalog. Options are named after the reference's hyperparameters; see README.
#[pg_extern(volatile, parallel_unsafe)]
fn train(
    model: &str,
    source: &str,
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(model, String),
        name!(epochs, i32),
        name!(steps, i64),
        name!(best_val_mse, Option<f64>),
        name!(baseline_val_mse, Option<f64>),
        name!(seconds, f64),
        name!(cells_per_s, f64),
    ),
> {
    let opts = Options::for_train(&options.0).or_raise();
    check_new_model_name(model);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    check_cell_id(&rel);
    let start = opts.parent.as_ref().map(|p| {
        Options::check_parent_keys(&options.0).or_raise();
        let m = get_model(p);
        if m.model.config().num_classes.is_some() {
            raise(Error::invalid(format!(
                "parent \"{p}\" is a classifier; continue training a plain Exceiver model"
            )));
        }
        let mut s = start_of(&m);
        if let Some(a) = opts.attention {
            s.cfg.attention = a;
        }
        s
    });
    let t = train_and_store(model, &rel, &opts, start, None, None, opts.parent.clone());
    TableIterator::once((
        model.to_string(),
        t.epochs as i32,
        t.steps as i64,
        finite(t.best_val),
        finite(t.baseline_val),
        t.seconds,
        t.cells_per_s,
    ))
}

/// Train the classifier variant of `base_model` (class token appended to the decoder
/// query, class head; loss = masked-value MSE + cross-entropy, as the reference) on the
/// labels in `label_column` of `source`, and store it as `new_model`. The labels are
/// stored with the model; `exceiver.classify` predicts them.
#[pg_extern(volatile, parallel_unsafe)]
fn finetune(
    base_model: &str,
    new_model: &str,
    source: &str,
    label_column: &str,
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(model, String),
        name!(classes, i32),
        name!(epochs, i32),
        name!(steps, i64),
        name!(best_val_mse, Option<f64>),
        name!(seconds, f64),
        name!(cells_per_s, f64),
    ),
> {
    let opts = Options::for_finetune(&options.0).or_raise();
    check_new_model_name(new_model);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    check_cell_id(&rel);
    if column_type(&rel, label_column).is_none() {
        raise_code(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {rel} has no column \"{label_column}\""),
            None,
        );
    }
    let lc = quote_ident(label_column);
    let (labels, nulls): (Option<Vec<String>>, Option<i64>) = Spi::connect(|c| {
        let t = c
            .select(
                &format!(
                    "SELECT (SELECT array_agg(DISTINCT {lc}::text ORDER BY {lc}::text) FROM {rel} WHERE {lc} IS NOT NULL), \
                            (SELECT count(*) FROM {rel} WHERE {lc} IS NULL)"
                ),
                Some(1),
                &[],
            )?
            .first();
        Ok::<_, SpiError>((t.get(1)?, t.get(2)?))
    })
    .or_raise();
    let labels = labels.unwrap_or_default();
    if labels.len() < 2 {
        raise(Error::invalid(format!(
            "label column \"{label_column}\" of {rel} has {} distinct labels; a classifier needs at least 2",
            labels.len()
        )));
    }
    if let Some(n) = nulls.filter(|&n| n > 0) {
        notice!("{n} cells with a NULL \"{label_column}\" are skipped");
    }
    let base = start_of(&get_model(base_model));
    let start = session::classifier_start(
        &base,
        labels.len(),
        opts.attention,
        opts.seed,
        opts.init_random,
        opts.class_embedding(),
    )
    .or_raise();
    let n_classes = labels.len() as i32;
    let t = train_and_store(
        new_model,
        &rel,
        &opts,
        Some(start),
        Some(label_column),
        Some(labels),
        Some(base_model.to_string()),
    );
    TableIterator::once((
        new_model.to_string(),
        n_classes,
        t.epochs as i32,
        t.steps as i64,
        finite(t.best_val),
        t.seconds,
        t.cells_per_s,
    ))
}
