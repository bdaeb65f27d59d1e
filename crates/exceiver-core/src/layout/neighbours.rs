//! Step 1: exact k nearest neighbours of every point among the others
//! ([`crate::knn`]), reported as the layout's first stage.

use super::{Progress, Stage};
use crate::error::Result;
#[cfg(test)]
pub(super) use crate::knn::{distance, DistanceKernel};
pub(super) use crate::knn::{Knn, Metric, BATCH_WORK};

/// The `k` nearest other points of every point (see [`crate::knn::search`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn nearest_neighbors(
    points: &[f32],
    n: usize,
    dim: usize,
    k: usize,
    metric: Metric,
    threads: usize,
    batch_work: usize,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Knn> {
    let points = &points[..n * dim];
    crate::knn::search(
        points,
        points,
        dim,
        k,
        metric,
        true,
        threads,
        batch_work,
        &mut |done, total| {
            progress(Progress {
                stage: Stage::Neighbors,
                done,
                total,
            })
        },
    )
}
