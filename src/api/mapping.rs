//! Reference mapping: `exceiver.transfer_labels` puts query cells next to an annotated
//! reference by their embeddings and transfers its labels, with a confidence, the
//! runner-up and "unknown" (the algorithm: `exceiver_core::mapping`).

use crate::api::bulk::{label_indices, read_embeddings, relation_name};
use crate::api::map::require_column;
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::mapping::{transfer_labels as transfer, TransferOptions};
use exceiver_core::Error;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::Value;
use std::time::Instant;

const KEYS: [&str; 4] = [
    "min_confidence",
    "distance_quantile",
    "calibration_cells",
    "seed",
];

/// What a query cell is called when it gets no label.
const UNKNOWN: &str = "unknown";

fn bad(msg: String) -> ! {
    raise(Error::invalid(msg).with_hint(format!("Valid options: {}.", KEYS.join(", "))))
}

fn transfer_options(v: &Value, k: i32) -> TransferOptions {
    let Some(m) = v.as_object() else {
        bad(format!("options must be a JSON object, not {v}"))
    };
    if let Some(key) = m.keys().find(|key| !KEYS.contains(&key.as_str())) {
        bad(format!("unknown option \"{key}\""));
    }
    if k < 1 {
        raise(Error::invalid(format!("k = {k} must be at least 1")));
    }
    let num = |key: &str| -> Option<f64> {
        let v = m.get(key)?;
        Some(
            v.as_f64()
                .unwrap_or_else(|| bad(format!("option \"{key}\" must be a number, not {v}"))),
        )
    };
    let int = |key: &str, lo: i64, hi: i64| -> Option<i64> {
        let v = m.get(key)?;
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Some(x),
            Some(x) => bad(format!("option \"{key}\" = {x} is out of range {lo}..{hi}")),
            None => bad(format!("option \"{key}\" must be an integer, not {v}")),
        }
    };
    let d = TransferOptions::default();
    let o = TransferOptions {
        k: k as usize,
        min_confidence: num("min_confidence").unwrap_or(d.min_confidence),
        distance_quantile: num("distance_quantile").unwrap_or(d.distance_quantile),
        calibration_cells: int("calibration_cells", 2, 1_000_000)
            .map_or(d.calibration_cells, |x| x as usize),
        seed: int("seed", 0, i64::MAX).map_or(d.seed, |x| x as u64),
        threads: gucs::threads(),
    };
    // ranges now, before the tables are read; k against the reference once it is
    o.check_ranges().or_raise();
    o
}

fn check_embedding_column(rel: &str, col: &str) {
    let t = require_column(rel, col);
    crate::api::bulk::check_embedding_type(rel, col, &t);
}

/// Transfer the labels in `label_column` of `reference` to the cells of `query`, by
/// the `k` nearest reference cells of each query cell in `embedding_column` (in both
/// tables; cosine distance, exact search). One row per query cell with an embedding:
/// the transferred label (`unknown` when the neighbours disagree or the cell is far
/// from every reference cell: see `status`), its confidence (the winning label's share
/// of the similarity-weighted vote), the runner-up and its share, the vote's winner
/// whatever the status, and the cell's mean cosine distance to its neighbours.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn transfer_labels(
    query: &str,
    reference: &str,
    label_column: &str,
    embedding_column: default!(&str, "'embedding'"),
    k: default!(i32, 15),
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(cell_id, String),
        name!(label, String),
        name!(confidence, f32),
        name!(runner_up, Option<String>),
        name!(runner_up_confidence, Option<f32>),
        name!(voted_label, String),
        name!(distance, f32),
        name!(status, String),
    ),
> {
    let opts = transfer_options(&options.0, k);
    let t0 = Instant::now();
    let qrel = relation_name(query);
    let rrel = relation_name(reference);
    let _search_path = PinnedSearchPath::new();
    for (rel, cols) in [
        (&qrel, vec!["cell_id"]),
        (&rrel, vec!["cell_id", label_column]),
    ] {
        for c in cols {
            require_column(rel, c);
        }
    }
    check_embedding_column(&qrel, embedding_column);
    check_embedding_column(&rrel, embedding_column);
    let hint = Some("Leave zero vectors out of the table (or set their embedding to NULL).");
    let r = read_embeddings(&rrel, embedding_column, &[label_column], hint);
    if r.ids.is_empty() {
        raise(Error::invalid(format!(
            "reference {rrel} has no cells with both a label in \"{label_column}\" and an embedding in \"{embedding_column}\""
        )));
    }
    let (labels, names) = label_indices(&r.labels[0]);
    opts.validate(labels.len()).or_raise();
    let q = read_embeddings(&qrel, embedding_column, &[], hint);
    if !q.ids.is_empty() && q.dim != r.dim {
        raise_code(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "the query's embeddings have {} dimensions, the reference's {}",
                q.dim, r.dim
            ),
            Some("Embed both tables with the same model (exceiver.embed_table)."),
        );
    }
    notice!(
        "transferring {} labels of {} reference cells to {} query cells ({} dimensions, k = {})",
        names.len(),
        r.ids.len(),
        q.ids.len(),
        r.dim,
        opts.k
    );
    let mut last = Instant::now();
    let t = transfer(
        &r.data,
        &labels,
        names.len(),
        &q.data,
        r.dim.max(1),
        &opts,
        &mut |done, total| {
            check_for_interrupts!();
            if last.elapsed().as_secs_f64() >= 5.0 {
                notice!(
                    "neighbour search: {done} of {total} ({:.0} s)",
                    t0.elapsed().as_secs_f64()
                );
                last = Instant::now();
            }
            Ok(())
        },
    )
    .or_raise();
    let count =
        |v: exceiver_core::mapping::Verdict| t.calls.iter().filter(|c| c.verdict == v).count();
    use exceiver_core::mapping::Verdict::*;
    notice!(
        "{} cells: {} assigned, {} low confidence (below {}), {} far from the reference (mean distance to the {} nearest above {:.4}, the {} quantile of the reference's own)",
        t.calls.len(),
        count(Assigned),
        count(LowConfidence),
        opts.min_confidence,
        count(Distant),
        opts.k,
        t.distance_threshold,
        opts.distance_quantile,
    );
    let rows: Vec<_> = q
        .ids
        .into_iter()
        .zip(t.calls)
        .map(|(id, c)| {
            let name = |i: u32| names[i as usize].clone();
            (
                id,
                c.label().map_or_else(|| UNKNOWN.to_string(), name),
                c.confidence,
                c.runner_up.map(name),
                c.runner_up.map(|_| c.runner_up_confidence),
                name(c.voted),
                c.distance,
                c.verdict.name().to_string(),
            )
        })
        .collect();
    TableIterator::new(rows)
}
