//! Inference beyond the cell embedding: gene embeddings, expression prediction
//! (imputation), and classification with classifier models.

use crate::api::bulk::{check_cell_table, relation_name, FetchedBatch};
use crate::api::load::quote_ident;
use crate::api::map::require_column;
use crate::api::model::{cell_input, cell_input_iter, get_model, get_model_at, Loaded};
use crate::errors::{raise, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::probe::{score_proba, softmax};
use exceiver_core::{Error, Kind};
use pgrx::prelude::*;
use std::collections::HashMap;

/// Gene embeddings (rows of the gene embedding matrix) as real[]; the SQL function
/// `exceiver.gene_embeddings` returns them as pgvector `vector`s.
#[pg_extern(stable, parallel_safe, strict)]
fn gene_embedding_arrays(
    model: &str,
) -> TableIterator<'static, (name!(gene, String), name!(embedding, Vec<f32>))> {
    let m = get_model(model);
    let d = m.model.config().seq_dim;
    let e = &m.model.params().gene_emb;
    let mut rows: Vec<(String, Vec<f32>)> = m
        .vocab
        .iter()
        .map(|(g, &i)| (g.clone(), e[i as usize * d..(i as usize + 1) * d].to_vec()))
        .collect();
    rows.sort_by_cached_key(|r| m.vocab[&r.0]);
    TableIterator::new(rows)
}

fn target_indices(m: &crate::api::model::Loaded, targets: &Array<&str>) -> Vec<u32> {
    let mut out = Vec::with_capacity(targets.len());
    for (p, t) in targets.iter().enumerate() {
        let Some(t) = t else {
            raise(Error::invalid(format!("targets[{}] is NULL", p + 1)));
        };
        match m.vocab.get(t) {
            Some(&i) => out.push(i),
            None => raise(
                Error::new(
                    Kind::UndefinedObject,
                    format!("target gene \"{t}\" is not in the model's vocabulary"),
                )
                .with_hint(
                    "SELECT gene FROM exceiver.gene_embeddings('<model>') lists the model's genes.",
                ),
            ),
        }
    }
    out
}

/// Predicted expression of the `targets` genes given the cell's context (the decoder
/// and value head). `scale => 'model'` (default) gives the model's value scale
/// (z-scored log1p of library-size normalised counts, clipped at 10, plus 1);
/// `scale => 'log1p'` maps back through the model's scaler to log1p(counts / library
/// size * 1e4).
#[pg_extern(stable, parallel_safe, strict)]
fn predict_expression(
    model: &str,
    genes: Array<&str>,
    counts: Array<f32>,
    targets: Array<&str>,
    scale: default!(&str, "'model'"),
) -> Vec<f32> {
    let m = get_model(model);
    let q = target_indices(&m, &targets);
    if !matches!(scale, "model" | "log1p") {
        raise(Error::invalid(format!(
            "scale must be 'model' or 'log1p', not '{scale}'"
        )));
    }
    let cell = cell_input(&m, &genes, &counts);
    let mut pred = m.model.predict(&cell.genes, &cell.values, &q).or_raise();
    if scale == "log1p" {
        for (v, &g) in pred.iter_mut().zip(&q) {
            let g = g as usize;
            *v = (*v - 1.0) * m.scaler.scale[g] + m.scaler.mean[g];
        }
    }
    pred
}

fn class_probabilities(m: &Loaded, genes: &Array<&str>, counts: &Array<f32>) -> Vec<(String, f32)> {
    if m.model.config().num_classes.is_none() {
        raise(
            Error::invalid("model is not a classifier")
                .with_hint("Use exceiver.finetune() to train a classifier from a model."),
        );
    }
    let cell = cell_input(m, genes, counts);
    probabilities(m, &cell.genes, &cell.values)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let label = m
                .labels
                .as_ref()
                .and_then(|l| l.get(i).cloned())
                .unwrap_or_else(|| format!("class_{i}"));
            (label, p as f32)
        })
        .collect()
}

/// The softmax of a classifier's class logits for a prepared cell.
fn probabilities(m: &Loaded, genes: &[u32], values: &[f32]) -> Vec<f64> {
    let logits = m.model.classify_logits(genes, values).or_raise();
    let mut p: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
    softmax(&mut p);
    p
}

/// How good and how calibrated a classifier is on the labelled cells of a cell table:
/// the probabilities `classify_proba` gives, scored against `label_column` by the core's
/// `score_proba` (accuracy, macro-F1, log loss, expected calibration error over 15
/// bins of the top probability). A label the model does not know counts as wrong with
/// probability 0 (`unknown_labels`); cells with a NULL label, genes or counts, or no
/// counts on the model's genes, are skipped and counted. Read through a cursor;
/// interrupts and `exceiver.max_memory` are checked once per 1,024 rows.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn evaluate_classifier(
    model: &str,
    source: &str,
    label_column: &str,
) -> TableIterator<
    'static,
    (
        name!(cells, i64),
        name!(skipped, i64),
        name!(unknown_labels, i64),
        name!(accuracy, f64),
        name!(macro_f1, f64),
        name!(log_loss, f64),
        name!(ece, f64),
    ),
> {
    let m = get_model(model);
    let Some(labels) = m.labels.clone() else {
        raise(
            Error::invalid(format!("model \"{model}\" is not a classifier"))
                .with_hint("Use exceiver.finetune() to train a classifier from a model."),
        )
    };
    gucs::apply_limits();
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    require_column(&rel, label_column);
    let index: HashMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let classes = labels.len();
    let (mut proba, mut y) = (Vec::<f64>::new(), Vec::<u32>::new());
    let (mut skipped, mut unknown) = (0i64, 0i64);
    let query = format!(
        "SELECT genes, counts::real[], {}::text FROM {rel}",
        quote_ident(label_column)
    );
    Spi::connect(|c| {
        let mut cur = c.try_open_cursor(&query, &[])?;
        loop {
            let rows = cur.fetch(1024)?;
            let _batch = FetchedBatch::new();
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let (Some(g), Some(x), Some(label)) = (
                    row.get::<Vec<Option<String>>>(1)?,
                    row.get::<Vec<Option<f32>>>(2)?,
                    row.get::<String>(3)?,
                ) else {
                    skipped += 1;
                    continue;
                };
                if g.len() != x.len() {
                    raise(Error::shape(format!(
                        "a cell of {rel} has {} genes but {} counts",
                        g.len(),
                        x.len()
                    )));
                }
                let cell = match cell_input_iter(
                    &m,
                    g.len(),
                    g.iter().map(|s| s.as_deref()),
                    x.into_iter(),
                ) {
                    Ok((cell, _)) => cell,
                    Err(e) if e.kind == Kind::InvalidParameter => {
                        skipped += 1;
                        continue;
                    }
                    Err(e) => raise(e),
                };
                proba.extend(probabilities(&m, &cell.genes, &cell.values));
                y.push(index.get(label.as_str()).copied().unwrap_or_else(|| {
                    unknown += 1;
                    classes as u32
                }));
            }
            exceiver_core::limits::check_bytes(
                proba.len() as u128 * 8 + y.len() as u128 * 4,
                &format!("scoring the cells of {rel}"),
            )
            .or_raise();
            check_for_interrupts!();
        }
        Ok::<_, pgrx::spi::SpiError>(())
    })
    .or_raise();
    if y.is_empty() {
        raise(Error::invalid(format!(
            "{rel} has no cell with a label in \"{label_column}\" and counts on the model's genes ({skipped} skipped)"
        )));
    }
    let s = score_proba(&proba, classes, &y);
    TableIterator::once((
        y.len() as i64,
        skipped,
        unknown,
        s.accuracy,
        s.macro_f1,
        s.log_loss,
        s.ece,
    ))
}

/// The most probable label of a cell under a classifier model.
#[pg_extern(stable, parallel_safe, strict)]
fn classify(model: &str, genes: Array<&str>, counts: Array<f32>) -> String {
    let m = get_model(model);
    let p = class_probabilities(&m, &genes, &counts);
    p.into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|x| x.0)
        .unwrap_or_default()
}

/// [`classify`] with the model pinned at `version` (`exceiver.model_version`):
/// IMMUTABLE, so that `postgres_fdw` ships it to the shard that holds the cell.
#[pg_extern(immutable, parallel_safe, strict)]
fn classify_at(model: &str, version: i64, genes: Array<&str>, counts: Array<f32>) -> String {
    let m = get_model_at(model, version);
    let p = class_probabilities(&m, &genes, &counts);
    p.into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|x| x.0)
        .unwrap_or_default()
}

/// Every label with its probability (softmax of the class logits), most probable first.
#[pg_extern(stable, parallel_safe, strict)]
fn classify_proba(
    model: &str,
    genes: Array<&str>,
    counts: Array<f32>,
) -> TableIterator<'static, (name!(label, String), name!(probability, f32))> {
    let m = get_model(model);
    let mut p = class_probabilities(&m, &genes, &counts);
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    TableIterator::new(p)
}

extension_sql!(
    r#"
DO $do$
DECLARE s text := (SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                   WHERE t.typname = 'vector' AND t.typtype = 'b' ORDER BY n.oid LIMIT 1);
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION exceiver.gene_embeddings(model text) RETURNS TABLE(gene text, embedding %1$I.vector)
    LANGUAGE sql STABLE PARALLEL SAFE STRICT ROWS 20000
    AS 'SELECT gene, embedding::%1$I.vector FROM exceiver.gene_embedding_arrays(model)'$f$, s);
  EXECUTE 'COMMENT ON FUNCTION exceiver.gene_embeddings(text) IS '
          '''one row per vocabulary gene: its embedding (a row of the gene embedding matrix)''';
END
$do$;
"#,
    name = "gene_embeddings_vector",
    requires = [gene_embedding_arrays]
);

/// The largest `top_k` of `encoder_attention` (a cell has fewer genes than this anyway).
const MAX_TOP_K: i32 = 1_000_000;

/// The encoder's attention over a cell's genes: for each latent, its `top_k` genes by
/// head-averaged attention weight, and the latent's total weight on the cell's
/// expressed genes (in the reference mode the rest goes to zero-count genes).
#[pg_extern(stable, parallel_safe, strict)]
fn encoder_attention(
    model: &str,
    genes: Array<&str>,
    counts: Array<f32>,
    top_k: default!(i32, 10),
) -> TableIterator<
    'static,
    (
        name!(latent, i32),
        name!(rank, i32),
        name!(gene, String),
        name!(weight, f32),
        name!(expressed_mass, f32),
    ),
> {
    if !(1..=MAX_TOP_K).contains(&top_k) {
        raise(Error::invalid(format!(
            "top_k must be between 1 and {MAX_TOP_K}, not {top_k}"
        )));
    }
    let m = get_model(model);
    let cell = cell_input(&m, &genes, &counts);
    let a = m
        .model
        .encoder_attention(&cell.genes, &cell.values)
        .or_raise();
    let mut names = vec![String::new(); m.vocab.len()];
    for (g, &i) in &m.vocab {
        names[i as usize] = g.clone();
    }
    // never more rows than the cell has genes, whatever top_k asks
    let top_k = (top_k as usize).min(a.n_entries);
    let mut rows = Vec::with_capacity(a.n_latents * top_k);
    let mut order: Vec<usize> = Vec::with_capacity(a.n_entries);
    for i in 0..a.n_latents {
        let w = &a.weights[i * a.n_entries..(i + 1) * a.n_entries];
        order.clear();
        order.extend(0..a.n_entries);
        order.sort_by(|&x, &y| w[y].total_cmp(&w[x]).then(x.cmp(&y)));
        for (r, &e) in order.iter().take(top_k).enumerate() {
            rows.push((
                i as i32,
                r as i32 + 1,
                names[cell.genes[e] as usize].clone(),
                w[e],
                a.expressed_mass[i],
            ));
        }
    }
    TableIterator::new(rows)
}
