//! Two-dimensional maps of embeddings, for plotting: UMAP (McInnes, Healy & Melville
//! 2018, arXiv 1802.03426) as its reference implementation, umap-learn, computes it.
//!
//! [`umap_2d`] runs the standard algorithm in five steps:
//!
//! 1. **Neighbours.** Exact k nearest neighbours by brute force, cosine or Euclidean
//!    distance: O(n²·dim) time split over threads, O(n·k) memory (no n × n matrix).
//! 2. **Fuzzy simplicial set.** Per point, ρ (distance to the nearest neighbour) and σ
//!    (binary search so that the membership strengths sum to log2 k); strengths
//!    `exp(−(d − ρ)/σ)`; the directed graph made symmetric by fuzzy union
//!    `w = a + b − a·b`. Edges weaker than `max / epochs` are dropped, as umap-learn does.
//! 3. **Initial layout.** The first two principal components of the points (of the unit
//!    vectors under cosine), each scaled to [0, 10], plus 1e-4 noise. umap-learn
//!    defaults to a spectral layout and offers this one as `init="pca"`; PCA needs no
//!    sparse eigensolver and keeps the global arrangement of clusters.
//! 4. **Curve.** `1 / (1 + a·x^(2b))` fitted to the `min_dist` step curve (spread 1) by
//!    Levenberg–Marquardt least squares, as umap-learn's `find_ab_params`.
//! 5. **Optimisation.** umap-learn's `optimize_layout_euclidean`: each edge sampled in
//!    proportion to its weight, attraction along it, 5 negative samples per positive
//!    one, gradients clipped at 4, learning rate decaying linearly from 1.
//!
//! The result is deterministic: the same points, options and seed give the same map for
//! any thread count. Threads only split the neighbour search, where each distance is
//! computed the same way whichever thread computes it; the optimisation runs on the
//! calling thread with one seeded generator. Progress is reported, and cancellation
//! accepted, through a callback that is only ever called on the calling thread, so a
//! PostgreSQL backend can emit NOTICEs and check for interrupts from it.

use crate::error::{Error, Kind, Result};
use crate::model::rng::Rng;

pub(crate) mod graph;
pub(crate) mod init;
mod neighbours;
mod optimize;

pub use crate::knn::Metric;

use graph::fuzzy_graph;
use init::pca_init;
use neighbours::{nearest_neighbors, BATCH_WORK};
pub use optimize::fit_ab;
use optimize::optimize_layout;

/// The most points [`umap_2d`] maps. The exact neighbour search costs n²·dim (some
/// minutes of 2 cores at 200,000 × 64) and grows with the square of n; a sample of
/// the rows shows the same structure far sooner.
pub const MAX_POINTS: usize = 200_000;

/// The most optimisation epochs accepted.
pub const MAX_EPOCHS: usize = 10_000;

/// Negative samples per positive sample (umap-learn's `negative_sample_rate`).
const NEGATIVE_SAMPLE_RATE: f64 = 5.0;

/// Gradient clip (umap-learn's `clip`).
const CLIP: f32 = 4.0;

/// Options of [`umap_2d`]; `MapOptions::default()` gives umap-learn's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MapOptions {
    /// Size of the local neighbourhood, the point itself included (umap-learn's
    /// convention): 2 ≤ `n_neighbors` < number of points. Larger values keep more global
    /// structure. Default 15.
    pub n_neighbors: usize,
    /// How tightly points may pack in the map, 0 ≤ `min_dist` ≤ 1 (the spread is 1).
    /// Default 0.1.
    pub min_dist: f32,
    /// Distance in the input space. Default cosine.
    pub metric: Metric,
    /// Optimisation epochs, 1 ..= [`MAX_EPOCHS`]; `None` picks umap-learn's default,
    /// [`default_epochs`] (500 up to 10,000 points, 200 above).
    pub epochs: Option<usize>,
    /// Seed of the initial-layout noise and the negative sampling.
    pub seed: u64,
    /// Threads for the neighbour search; 0 = all available cores. The result does not
    /// depend on it.
    pub threads: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            n_neighbors: 15,
            min_dist: 0.1,
            metric: Metric::Cosine,
            epochs: None,
            seed: 42,
            threads: 0,
        }
    }
}

/// umap-learn's default number of epochs: 500 for up to 10,000 points, 200 above.
pub fn default_epochs(n: usize) -> usize {
    if n <= 10_000 {
        500
    } else {
        200
    }
}

/// The long-running stages that report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The exact neighbour search; `done`/`total` count points.
    Neighbors,
    /// The layout optimisation; `done`/`total` count epochs.
    Optimize,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Neighbors => "nearest neighbours",
            Stage::Optimize => "layout optimisation",
        }
    }
}

/// A progress report: `done` of `total` units of `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub done: usize,
    pub total: usize,
}

/// A 2-D UMAP map of `n` points of dimension `dim` (`data` row-major, `n × dim`).
/// Returns one `[x, y]` per point, in input order.
///
/// Errors: fewer than 3 points or a non-finite value or (cosine) a zero vector
/// ([`Kind::Data`], the message names the 0-based point); `data.len() != n·dim`
/// ([`Kind::ArrayShape`]); `dim` 0 or an option out of range
/// ([`Kind::InvalidParameter`]); more than [`MAX_POINTS`] points ([`Kind::Limit`]).
pub fn umap_2d(data: &[f32], n: usize, dim: usize, opts: &MapOptions) -> Result<Vec<[f32; 2]>> {
    umap_2d_with_progress(data, n, dim, opts, &mut |_| Ok(()))
}

/// [`umap_2d`] with a progress callback, called on the calling thread at the start of
/// each stage, after each block of the neighbour search (about every 100 ms) and after
/// each epoch. An error it returns stops the computation and is returned as is: the way
/// to cancel.
pub fn umap_2d_with_progress(
    data: &[f32],
    n: usize,
    dim: usize,
    opts: &MapOptions,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Vec<[f32; 2]>> {
    check_input(data, n, dim, opts)?;
    let n_epochs = opts.epochs.unwrap_or_else(|| default_epochs(n));
    let points = prepare_points(data, dim, opts.metric);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |t| t.get()),
        t => t,
    }
    .clamp(1, 256);

    let knn = nearest_neighbors(
        &points,
        n,
        dim,
        opts.n_neighbors - 1,
        opts.metric,
        threads,
        BATCH_WORK,
        progress,
    )?;
    let graph = fuzzy_graph(&knn, n);
    drop(knn);
    let init = pca_init(&points, n, dim, opts.seed);
    drop(points);
    let (a, b) = fit_ab(opts.min_dist as f64, 1.0);
    optimize_layout(
        init, graph, n_epochs, a as f32, b as f32, opts.seed, progress,
    )
}

fn check_input(data: &[f32], n: usize, dim: usize, opts: &MapOptions) -> Result<()> {
    // n_neighbors counts the point itself, is at least 2 and below n: so n ≥ 3.
    if n < 3 {
        return Err(Error::data(format!(
            "a map needs at least 3 points, got {n}"
        )));
    }
    if n > MAX_POINTS {
        return Err(Error::new(
            Kind::Limit,
            format!("{n} points exceed the limit of {MAX_POINTS} for a map"),
        )
        .with_hint("map a sample of the rows, for example with TABLESAMPLE"));
    }
    if dim == 0 {
        return Err(Error::invalid(
            "points must have at least 1 dimension, got 0",
        ));
    }
    match n.checked_mul(dim) {
        Some(expected) if expected == data.len() => {}
        expected => {
            let expected =
                expected.map_or("more than fit in memory".to_string(), |e| e.to_string());
            return Err(Error::shape(format!(
                "data has {} values, expected {n} points × {dim} dimensions = {expected}",
                data.len()
            )));
        }
    }
    if opts.n_neighbors < 2 {
        return Err(Error::invalid(format!(
            "n_neighbors must be at least 2, got {}",
            opts.n_neighbors
        )));
    }
    if opts.n_neighbors >= n {
        return Err(Error::invalid(format!(
            "n_neighbors {} must be less than the number of points {n}",
            opts.n_neighbors
        ))
        .with_hint("lower n_neighbors or map more points"));
    }
    if !(opts.min_dist.is_finite() && (0.0..=1.0).contains(&opts.min_dist)) {
        return Err(Error::invalid(format!(
            "min_dist must be between 0 and 1, got {}",
            opts.min_dist
        )));
    }
    if let Some(e) = opts.epochs {
        if e == 0 || e > MAX_EPOCHS {
            return Err(Error::invalid(format!(
                "epochs must be between 1 and {MAX_EPOCHS}, got {e}"
            )));
        }
    }
    for (p, row) in data.chunks_exact(dim).enumerate() {
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::data(format!(
                "point {p} has the non-finite value {} at dimension {c}",
                row[c]
            )));
        }
        if opts.metric == Metric::Cosine && row.iter().all(|&v| v == 0.0) {
            return Err(Error::data(format!(
                "point {p} is a zero vector, for which cosine distance is undefined"
            ))
            .with_hint("leave zero vectors out, or use metric euclidean"));
        }
    }
    Ok(())
}

/// The points the search and the initial layout work on: unit vectors under cosine
/// (then `1 − x·y` is the distance), and under Euclidean the points divided by their
/// largest absolute value, so that squared distances cannot overflow. UMAP does not
/// change when all distances are scaled alike: ρ and σ scale with them.
fn prepare_points(data: &[f32], dim: usize, metric: Metric) -> Vec<f32> {
    crate::knn::prepare(data, dim, metric)
}

#[cfg(test)]
mod tests {
    use super::graph::*;
    use super::init::*;
    use super::neighbours::*;
    use super::*;

    /// Values of umap-learn's `smooth_knn_dist` (as recorded in the tests of the R
    /// package `umap`, which checks itself against it): rows [1.1 1.2 1.3 1.4] and
    /// [0 0 0.5 0.8] with k = 2 and 3.
    #[test]
    fn smooth_knn_matches_umap_learn() {
        let rows = [[1.1, 1.2, 1.3, 1.4], [0.0, 0.0, 0.5, 0.8]];
        let mean_all = rows.iter().flatten().sum::<f64>() / 8.0;
        for (k, sigma0) in [(2, 0.16410065), (3, 0.2959671)] {
            let (rho, sigma) = smooth_knn(&rows[0], k, mean_all);
            assert_eq!(rho, 1.1);
            assert!((sigma - sigma0).abs() < 1e-6, "k={k}: sigma {sigma}");
            let (rho, sigma) = smooth_knn(&rows[1], k, mean_all);
            assert_eq!(rho, 0.5);
            assert!((sigma - 0.000325).abs() < 1e-9, "k={k}: sigma {sigma}");
        }
    }

    /// The blocked, threaded search equals a plain sort of all distances, ties by index.
    #[test]
    fn neighbors_are_exact() {
        let mut rng = Rng::new(3);
        let (n, dim, k) = (300, 19, 7);
        // Coarse values make ties likely.
        let data: Vec<f32> = (0..n * dim).map(|_| (rng.below(3) as f32) - 1.0).collect();
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let mut data = data.clone();
            for row in data.chunks_exact_mut(dim) {
                row[0] = 1.0; // no zero vectors
            }
            let pts = prepare_points(&data, dim, metric);
            // Batches of 7 rows per thread, 3 threads: 15 batches, the last one short.
            let mut reports = Vec::new();
            let knn = nearest_neighbors(&pts, n, dim, k, metric, 3, 7 * n * dim, &mut |p| {
                reports.push(p.done);
                Ok(())
            })
            .unwrap();
            let want: Vec<usize> = std::iter::once(0)
                .chain((1..=15).map(|b| (21 * b).min(n)))
                .collect();
            assert_eq!(reports, want);
            for i in 0..n {
                let x = &pts[i * dim..(i + 1) * dim];
                let mut all: Vec<(f32, u32)> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| {
                        let y = &pts[j * dim..(j + 1) * dim];
                        (distance(metric, x, y), j as u32)
                    })
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let want: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
                assert_eq!(
                    &knn.idx[i * k..(i + 1) * k],
                    &want[..],
                    "{metric:?} point {i}"
                );
                let wd: Vec<f32> = all[..k].iter().map(|p| p.0).collect();
                assert_eq!(&knn.dist[i * k..(i + 1) * k], &wd[..]);
            }
        }
    }

    /// The AVX2 and portable routines give the same bits, for every remainder of the
    /// dimension modulo 8 and candidate counts not a multiple of 4.
    #[test]
    fn distance_kernels_agree() {
        let mut rng = Rng::new(5);
        for dim in [1, 3, 7, 8, 9, 16, 31, 64, 100] {
            let (nq, nc) = (5, 23);
            let q: Vec<f32> = (0..nq * dim).map(|_| rng.normal() as f32).collect();
            let c: Vec<f32> = (0..nc * dim).map(|_| rng.normal() as f32).collect();
            for metric in [Metric::Cosine, Metric::Euclidean] {
                let mut fast = vec![0f32; nq * nc];
                let mut slow = vec![0f32; nq * nc];
                DistanceKernel::get().block(metric, dim, &q, &c, &mut fast);
                DistanceKernel::portable().block(metric, dim, &q, &c, &mut slow);
                assert_eq!(fast, slow, "{metric:?} dim {dim}");
                for i in 0..nq {
                    for j in 0..nc {
                        let d = distance(
                            metric,
                            &q[i * dim..(i + 1) * dim],
                            &c[j * dim..(j + 1) * dim],
                        );
                        assert_eq!(fast[i * nc + j], d);
                    }
                }
            }
        }
    }

    /// Fuzzy union: w = a + b − ab, each undirected edge listed both ways.
    #[test]
    fn fuzzy_union_is_symmetric() {
        let mut rng = Rng::new(9);
        let (n, dim, k) = (80, 5, 6);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
        let pts = prepare_points(&data, dim, Metric::Euclidean);
        let knn = nearest_neighbors(
            &pts,
            n,
            dim,
            k,
            Metric::Euclidean,
            1,
            BATCH_WORK,
            &mut |_| Ok(()),
        )
        .unwrap();
        let g = fuzzy_graph(&knn, n);
        let mut m = std::collections::HashMap::new();
        for ((&h, &t), &w) in g.head.iter().zip(&g.tail).zip(&g.weight) {
            assert!(w > 0.0 && w <= 1.0);
            assert_ne!(h, t);
            assert!(m.insert((h, t), w).is_none(), "edge {h}->{t} twice");
        }
        for (&(h, t), &w) in &m {
            assert_eq!(m.get(&(t, h)), Some(&w));
        }
        assert!(g.head.windows(2).all(|p| p[0] <= p[1]));
        // Every point's nearest neighbour gets strength 1 (d = ρ), so weight 1.
        for i in 0..n {
            let j = knn.idx[i * k];
            let w = m.get(&(i as u32, j)).copied().unwrap_or(0.0);
            assert!(
                (w - 1.0).abs() < 1e-6,
                "nearest neighbour edge {i}->{j} weight {w}"
            );
        }
    }

    /// The initial layout is the projection on the top two principal components, as
    /// an exact eigen-decomposition of the covariance matrix gives them.
    #[test]
    fn pca_init_is_the_top_two_components() {
        let mut rng = Rng::new(4);
        let (n, dim) = (300, 6);
        let scales = [10.0, 3.0, 1.0, 0.5, 0.1, 0.01];
        let mut data = Vec::new();
        for _ in 0..n {
            let z: Vec<f64> = scales.iter().map(|s| s * rng.normal()).collect();
            // Mix the coordinates so that the components are not the axes.
            for i in 0..dim {
                data.push((z[i] + 0.5 * z[(i + 1) % dim] + 1.0) as f32);
            }
        }
        let init = pca_init(&data, n, dim, 1);
        assert!(init
            .iter()
            .all(|c| c.iter().all(|&x| (-0.01..=10.01).contains(&x))));

        let mut mean = vec![0f64; dim];
        for r in data.chunks_exact(dim) {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64 / n as f64;
            }
        }
        let mut cov = vec![0f64; dim * dim];
        for r in data.chunks_exact(dim) {
            for i in 0..dim {
                for j in 0..dim {
                    cov[i * dim + j] += (r[i] as f64 - mean[i]) * (r[j] as f64 - mean[j]);
                }
            }
        }
        let (vals, vecs) = jacobi_eigen(&mut cov, dim);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
        for axis in 0..2 {
            let c = order[axis];
            let want: Vec<f64> = data
                .chunks_exact(dim)
                .map(|r| {
                    (0..dim)
                        .map(|i| (r[i] as f64 - mean[i]) * vecs[i * dim + c])
                        .sum()
                })
                .collect();
            let got: Vec<f64> = init.iter().map(|p| p[axis] as f64).collect();
            let (mw, mg) = (
                want.iter().sum::<f64>() / n as f64,
                got.iter().sum::<f64>() / n as f64,
            );
            let sxy: f64 = want
                .iter()
                .zip(&got)
                .map(|(w, g)| (w - mw) * (g - mg))
                .sum();
            let sxx: f64 = want.iter().map(|w| (w - mw).powi(2)).sum();
            let syy: f64 = got.iter().map(|g| (g - mg).powi(2)).sum();
            let corr = (sxy / (sxx * syy).sqrt()).abs();
            assert!(
                corr > 0.99999,
                "axis {axis}: |correlation| with the exact component {corr}"
            );
        }
    }

    #[test]
    fn jacobi_diagonalises() {
        let mut a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let orig = a.clone();
        let (vals, v) = jacobi_eigen(&mut a, 3);
        for c in 0..3 {
            for i in 0..3 {
                let av: f64 = (0..3).map(|j| orig[i * 3 + j] * v[j * 3 + c]).sum();
                assert!((av - vals[c] * v[i * 3 + c]).abs() < 1e-12);
            }
        }
    }
}
