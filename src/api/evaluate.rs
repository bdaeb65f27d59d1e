//! `exceiver.evaluate_embeddings`: how well an embedding column keeps labelled cell
//! types apart (and, given a batch column, mixes batches), by the field's metrics
//! (`exceiver_core::metrics`: kNN accuracy and macro-F1, NMI, ARI, ASW, batch ASW,
//! graph connectivity).

use crate::api::bulk::{label_indices, read_embeddings, relation_name};
use crate::api::map::require_column;
use crate::errors::{raise, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::metrics::{evaluate, EvalOptions};
use exceiver_core::Error;
use pgrx::prelude::*;

use std::time::Instant;

/// Scores of the embeddings in `embedding_column` of `source` against the labels in
/// `label_column` (cells with a NULL embedding or label are skipped): leave-one-out kNN
/// accuracy and macro-F1 (the majority of the `k` nearest other cells by cosine
/// distance, ties to the label that sorts first in byte order); NMI and ARI of the best
/// Louvain clustering of the 15-neighbour graph over resolutions 0.1..2.0 (scIB's
/// recipe; `resolution` and `clusters` say which was kept); the label silhouette `asw`
/// scaled to [0, 1]; `avg_bio`, the mean of the three. With `batch_column`:
/// `batch_asw` (1 is perfectly mixed batches within each label) and
/// `graph_connectivity`. Exact all-pairs distances: O(cells² · dimensions).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn evaluate_embeddings(
    source: &str,
    embedding_column: &str,
    label_column: &str,
    k: default!(i32, 15),
    batch_column: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(cells, i64),
        name!(classes, i32),
        name!(neighbours, i32),
        name!(accuracy, f64),
        name!(macro_f1, f64),
        name!(nmi, f64),
        name!(ari, f64),
        name!(asw, f64),
        name!(avg_bio, f64),
        name!(batch_asw, Option<f64>),
        name!(graph_connectivity, Option<f64>),
        name!(resolution, f64),
        name!(clusters, i32),
    ),
> {
    if k < 1 {
        raise(Error::invalid(format!("k must be at least 1, not {k}")));
    }
    let t0 = Instant::now();
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    let t = require_column(&rel, embedding_column);
    crate::api::bulk::check_embedding_type(&rel, embedding_column, &t);
    let mut cols = vec![label_column];
    require_column(&rel, label_column);
    if let Some(b) = batch_column {
        require_column(&rel, b);
        cols.push(b);
    }
    let e = read_embeddings(
        &rel,
        embedding_column,
        &cols,
        Some("Leave zero vectors out of the table (or set their embedding to NULL)."),
    );
    let (labels, names) = label_indices(&e.labels[0]);
    if names.len() < 2 {
        raise(Error::invalid(format!(
            "label column \"{label_column}\" of {rel} has {} distinct labels among {} cells with an embedding; the metrics need at least 2",
            names.len(),
            e.ids.len()
        )));
    }
    if k as usize >= e.ids.len() {
        raise(Error::invalid(format!(
            "k = {k} must be below the number of cells with a label and an embedding, {}",
            e.ids.len()
        )));
    }
    let batches = batch_column.map(|_| label_indices(&e.labels[1]));
    notice!(
        "evaluating {} cells of {} labels{} ({} dimensions)",
        e.ids.len(),
        names.len(),
        batches
            .as_ref()
            .map_or(String::new(), |(_, b)| format!(" and {} batches", b.len())),
        e.dim
    );
    // the embeddings read and the working set: two scaled copies, per-cell sums by
    // label and batch, neighbour lists
    let n = e.ids.len() as u128;
    let n_batches = batches.as_ref().map_or(0, |(_, b)| b.len()) as u128;
    let work = n
        * (3 * 4 * e.dim as u128
            + 8 * (names.len() as u128 + n_batches)
            + 8 * (k as u128 + 15)
            + 64);
    exceiver_core::limits::check_bytes(work, &format!("evaluating the embeddings of {rel}"))
        .or_raise();
    let opts = EvalOptions {
        k: k as usize,
        seed: 0,
        threads: gucs::threads(),
    };
    let mut last = Instant::now();
    let r = evaluate(
        &e.data,
        e.dim,
        &labels,
        names.len(),
        batches.as_ref().map(|(b, _)| b.as_slice()),
        &opts,
        &mut |stage, done, total| {
            check_for_interrupts!();
            if last.elapsed().as_secs_f64() >= 5.0 {
                notice!(
                    "{}: {done} of {total} ({:.0} s)",
                    stage.name(),
                    t0.elapsed().as_secs_f64()
                );
                last = Instant::now();
            }
            Ok(())
        },
    )
    .or_raise();
    TableIterator::once((
        r.cells as i64,
        r.classes as i32,
        k,
        r.accuracy,
        r.macro_f1,
        r.nmi,
        r.ari,
        r.asw,
        r.avg_bio(),
        r.batch_asw,
        r.graph_connectivity,
        r.resolution,
        r.clusters as i32,
    ))
}
