//! `exceiver.linear_probe`: logistic regression on an embedding column, trained on one
//! table's labelled cells and scored on another's (the algorithm:
//! `exceiver_core::probe`, scikit-learn's LogisticRegression).

use crate::api::bulk::{label_indices, read_embeddings, relation_name};
use crate::api::map::require_column;
use crate::errors::{raise, raise_code, OrRaise};
use crate::security::PinnedSearchPath;
use exceiver_core::probe::{fit, score_proba, ProbeOptions};
use exceiver_core::Error;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::Value;
use std::collections::HashSet;

const KEYS: [&str; 6] = [
    "C",
    "max_iter",
    "tol",
    "standardize",
    "label_fraction",
    "seed",
];

fn bad(msg: String) -> ! {
    raise(Error::invalid(msg).with_hint(format!("Valid options: {}.", KEYS.join(", "))))
}

/// The probe's options, the share of training labels to use, and the seed choosing them.
fn probe_options(v: &Value) -> (ProbeOptions, f64, i64) {
    let Some(m) = v.as_object() else {
        bad(format!("options must be a JSON object, not {v}"))
    };
    if let Some(key) = m.keys().find(|key| !KEYS.contains(&key.as_str())) {
        bad(format!("unknown option \"{key}\""));
    }
    let num = |key: &str| -> Option<f64> {
        let v = m.get(key)?;
        Some(
            v.as_f64()
                .unwrap_or_else(|| bad(format!("option \"{key}\" must be a number, not {v}"))),
        )
    };
    let d = ProbeOptions::default();
    let o = ProbeOptions {
        c: num("C").unwrap_or(d.c),
        max_iter: match m.get("max_iter") {
            None => d.max_iter,
            Some(v) => match v.as_u64() {
                Some(x) if (1..=100_000).contains(&x) => x as usize,
                _ => bad(format!(
                    "option \"max_iter\" = {v} must be an integer in 1..100000"
                )),
            },
        },
        tol: num("tol").unwrap_or(d.tol),
        standardize: match m.get("standardize") {
            None => d.standardize,
            Some(v) => v.as_bool().unwrap_or_else(|| {
                bad(format!(
                    "option \"standardize\" must be true or false, not {v}"
                ))
            }),
        },
    };
    o.check().or_raise();
    let fraction = num("label_fraction").unwrap_or(1.0);
    if !(fraction > 0.0 && fraction <= 1.0) {
        bad(format!(
            "option \"label_fraction\" = {fraction} is out of range (0, 1]"
        ));
    }
    let seed = match m.get("seed") {
        None => 0,
        Some(v) => v.as_i64().filter(|x| *x >= 0).unwrap_or_else(|| {
            bad(format!(
                "option \"seed\" must be a non-negative integer, not {v}"
            ))
        }),
    };
    (o, fraction, seed)
}

/// Train multinomial logistic regression on the embeddings in `embedding_column` of
/// `train`'s cells with a label in `label_column` (optionally only the share
/// `label_fraction` of them, chosen by a hash of `cell_id` and `seed` exactly as
/// `exceiver.finetune` chooses its labelled cells), then score it on `test`'s labelled
/// cells: accuracy, macro-F1, log loss and expected calibration error (15 bins).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn linear_probe(
    train: &str,
    test: &str,
    label_column: &str,
    embedding_column: default!(&str, "'embedding'"),
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(train_cells, i64),
        name!(test_cells, i64),
        name!(classes, i32),
        name!(accuracy, f64),
        name!(macro_f1, f64),
        name!(log_loss, f64),
        name!(ece, f64),
        name!(iterations, i32),
        name!(converged, bool),
    ),
> {
    let (opts, fraction, seed) = probe_options(&options.0);
    let train_rel = relation_name(train);
    let test_rel = relation_name(test);
    let _search_path = PinnedSearchPath::new();
    for rel in [&train_rel, &test_rel] {
        require_column(rel, label_column);
        let t = require_column(rel, embedding_column);
        crate::api::bulk::check_embedding_type(rel, embedding_column, &t);
    }
    let keep: Option<HashSet<String>> = (fraction < 1.0).then(|| {
        require_column(&train_rel, "cell_id");
        let cut = (fraction * 1_000_000.0).round() as i64;
        let q = format!(
            "SELECT coalesce(array_agg(cell_id::text), '{{}}') FROM {train_rel} \
             WHERE (abs(hashtext(cell_id::text || ':labels:' || $1)::bigint) % 1000000) < $2"
        );
        Spi::get_one_with_args::<Vec<String>>(&q, &[seed.to_string().into(), cut.into()])
            .or_raise()
            .unwrap_or_default()
            .into_iter()
            .collect()
    });
    let mut tr = read_embeddings(&train_rel, embedding_column, &[label_column], None);
    if let Some(keep) = &keep {
        let mut j = 0;
        let dim = tr.dim;
        for i in 0..tr.ids.len() {
            if keep.contains(&tr.ids[i]) {
                tr.ids.swap(j, i);
                tr.labels[0].swap(j, i);
                tr.data.copy_within(i * dim..(i + 1) * dim, j * dim);
                j += 1;
            }
        }
        tr.ids.truncate(j);
        tr.labels[0].truncate(j);
        tr.data.truncate(j * dim);
    }
    let (ytr, names) = label_indices(&tr.labels[0]);
    if names.len() < 2 {
        raise(Error::invalid(format!(
            "the training cells of {train_rel} have {} distinct labels in \"{label_column}\" ({} cells); a probe needs at least 2",
            names.len(),
            ytr.len()
        )));
    }
    let te = read_embeddings(&test_rel, embedding_column, &[label_column], None);
    if te.ids.is_empty() {
        raise(Error::invalid(format!(
            "{test_rel} has no cells with both a label in \"{label_column}\" and an embedding in \"{embedding_column}\""
        )));
    }
    if te.dim != tr.dim {
        raise_code(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "the test embeddings have {} dimensions, the training ones {}",
                te.dim, tr.dim
            ),
            None,
        );
    }
    notice!(
        "linear probe: {} training cells of {} labels ({} dimensions), {} test cells",
        ytr.len(),
        names.len(),
        tr.dim,
        te.ids.len()
    );
    let model = fit(&tr.data, tr.dim, &ytr, names.len(), &opts).or_raise();
    check_for_interrupts!();
    if !model.converged {
        warning!(
            "the probe did not converge in {} iterations (tolerance {}); raise max_iter",
            model.iterations,
            opts.tol
        );
    }
    // a test label the training cells lack is a class the probe cannot predict
    let yte: Vec<u32> = te.labels[0]
        .iter()
        .map(|l| names.binary_search(l).map_or(u32::MAX, |i| i as u32))
        .collect();
    let unseen = yte.iter().filter(|&&y| y == u32::MAX).count();
    if unseen > 0 {
        notice!("{unseen} test cells have labels the training cells lack (counted as wrong)");
    }
    let yte: Vec<u32> = yte.into_iter().map(|y| y.min(names.len() as u32)).collect();
    let proba: Vec<f64> = te
        .data
        .chunks_exact(te.dim)
        .flat_map(|r| model.proba(r))
        .collect();
    let s = score_proba(&proba, names.len(), &yte);
    TableIterator::once((
        ytr.len() as i64,
        yte.len() as i64,
        names.len() as i32,
        s.accuracy,
        s.macro_f1,
        s.log_loss,
        s.ece,
        model.iterations as i32,
        model.converged,
    ))
}
