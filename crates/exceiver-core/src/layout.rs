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
use std::str::FromStr;

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

/// Distance between two points in the input space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `1 − cos(x, y)`; zero vectors are errors. The usual choice for embeddings.
    Cosine,
    /// `‖x − y‖`.
    Euclidean,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Euclidean => "euclidean",
        }
    }
}

impl FromStr for Metric {
    type Err = Error;
    /// `cosine` or `euclidean`, in any case, surrounding blanks ignored.
    fn from_str(s: &str) -> Result<Metric> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cosine" => Ok(Metric::Cosine),
            "euclidean" | "l2" => Ok(Metric::Euclidean),
            _ => Err(Error::invalid(format!("unknown metric \"{s}\""))
                .with_hint("use \"cosine\" or \"euclidean\"")),
        }
    }
}

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
    match metric {
        Metric::Cosine => {
            let mut out = Vec::with_capacity(data.len());
            for row in data.chunks_exact(dim) {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                out.extend(row.iter().map(|&v| (v as f64 / norm) as f32));
            }
            out
        }
        Metric::Euclidean => {
            let max = data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if max == 0.0 {
                return data.to_vec();
            }
            data.iter()
                .map(|&v| (v as f64 / max as f64) as f32)
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------------
// 1. Exact nearest neighbours.

/// The `k` nearest other points of each point, by (distance, index) ascending.
struct Knn {
    k: usize,
    idx: Vec<u32>,
    dist: Vec<f32>,
}

/// Multiply-adds per thread between two progress reports (about 0.1 s).
const BATCH_WORK: usize = 1 << 30;
/// Candidate rows per cache block.
const CAND_BLOCK: usize = 256;
/// Query rows per cache block.
const QUERY_BLOCK: usize = 16;

/// The `k` nearest other points of every point, the rows split over `threads` in
/// batches of about `batch_work` multiply-adds per thread, with a progress report
/// after each batch.
#[allow(clippy::too_many_arguments)]
fn nearest_neighbors(
    points: &[f32],
    n: usize,
    dim: usize,
    k: usize,
    metric: Metric,
    threads: usize,
    batch_work: usize,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Knn> {
    let mut idx = vec![u32::MAX; n * k];
    let mut dist = vec![f32::INFINITY; n * k];
    let kernel = DistanceKernel::get();
    progress(Progress {
        stage: Stage::Neighbors,
        done: 0,
        total: n,
    })?;
    let rows_per_thread = (batch_work / (n * dim).max(1)).clamp(1, 4096);
    let batch = rows_per_thread * threads;
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let per = (end - start).div_ceil(threads);
        let idx_b = &mut idx[start * k..end * k];
        let dist_b = &mut dist[start * k..end * k];
        let mut parts: Vec<(usize, &mut [u32], &mut [f32])> = idx_b
            .chunks_mut(per * k)
            .zip(dist_b.chunks_mut(per * k))
            .enumerate()
            .map(|(t, (i, d))| (start + t * per, i, d))
            .collect();
        let first = parts.remove(0);
        let spawn_error = std::thread::scope(|s| {
            let mut spawn_error = None;
            for (q0, i, d) in parts {
                let job = move || knn_rows(&kernel, points, n, dim, k, metric, q0, i, d);
                if let Err(e) = std::thread::Builder::new().spawn_scoped(s, job) {
                    spawn_error = Some(e);
                }
            }
            let (q0, i, d) = first;
            knn_rows(&kernel, points, n, dim, k, metric, q0, i, d);
            spawn_error
        });
        if let Some(e) = spawn_error {
            return Err(Error::new(
                Kind::Limit,
                format!("could not start a thread for the neighbour search: {e}"),
            )
            .with_hint("use fewer threads"));
        }
        start = end;
        progress(Progress {
            stage: Stage::Neighbors,
            done: start,
            total: n,
        })?;
    }
    Ok(Knn { k, idx, dist })
}

/// Neighbours of the query points `q0 ..` (as many as `idx_out` holds rows of `k`).
#[allow(clippy::too_many_arguments)]
fn knn_rows(
    kernel: &DistanceKernel,
    points: &[f32],
    n: usize,
    dim: usize,
    k: usize,
    metric: Metric,
    q0: usize,
    idx_out: &mut [u32],
    dist_out: &mut [f32],
) {
    let m = idx_out.len() / k;
    let mut block = vec![0f32; QUERY_BLOCK * CAND_BLOCK];
    for c0 in (0..n).step_by(CAND_BLOCK) {
        let c1 = (c0 + CAND_BLOCK).min(n);
        let cands = &points[c0 * dim..c1 * dim];
        for b0 in (0..m).step_by(QUERY_BLOCK) {
            let b1 = (b0 + QUERY_BLOCK).min(m);
            let queries = &points[(q0 + b0) * dim..(q0 + b1) * dim];
            kernel.block(metric, dim, queries, cands, &mut block);
            let nc = c1 - c0;
            for q in b0..b1 {
                let me = q0 + q;
                let row = &block[(q - b0) * nc..(q - b0 + 1) * nc];
                let d_out = &mut dist_out[q * k..(q + 1) * k];
                let i_out = &mut idx_out[q * k..(q + 1) * k];
                for (c, &d) in row.iter().enumerate() {
                    if c0 + c != me {
                        push_neighbor(d_out, i_out, d, (c0 + c) as u32);
                    }
                }
            }
        }
    }
}

/// Insert candidate `j` at distance `d` into the sorted list, if it is nearer than the
/// farthest. Candidates arrive in ascending index order and ties keep the earlier one,
/// so the lists are ordered by (distance, index).
#[inline]
fn push_neighbor(dist: &mut [f32], idx: &mut [u32], d: f32, j: u32) {
    let k = dist.len();
    if d >= dist[k - 1] {
        return;
    }
    let mut p = k - 1;
    while p > 0 && dist[p - 1] > d {
        dist[p] = dist[p - 1];
        idx[p] = idx[p - 1];
        p -= 1;
    }
    dist[p] = d;
    idx[p] = j;
}

// Distances. Every distance is summed the same way whichever routine computes it:
// element i goes to lane i mod 8, the 8 lanes are added as ((l0+l4)+(l2+l6)) +
// ((l1+l5)+(l3+l7)), then the elements past the last multiple of 8 one by one.
// Multiplies and adds stay separate (Rust never fuses them), so the AVX2 routine and
// the portable one give the same bits and the map does not depend on the CPU.

#[inline(always)]
fn reduce8(a: [f32; 8]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Squared Euclidean distance (`EUCLID`) or dot product of two rows, portable.
#[inline(always)]
fn pair_sum<const EUCLID: bool>(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let cx = x.chunks_exact(8);
    let cy = y.chunks_exact(8);
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for l in 0..8 {
            acc[l] += if EUCLID {
                (a[l] - b[l]) * (a[l] - b[l])
            } else {
                a[l] * b[l]
            };
        }
    }
    reduce8(acc) + tail_sum::<EUCLID>(rx, ry)
}

/// The elements past the last multiple of 8, summed in order.
#[inline(always)]
fn tail_sum<const EUCLID: bool>(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).fold(0.0, |s, (a, b)| {
        s + if EUCLID { (a - b) * (a - b) } else { a * b }
    })
}

/// The distance of the metric from [`pair_sum`]'s sum.
#[inline(always)]
fn finish<const EUCLID: bool>(s: f32) -> f32 {
    if EUCLID {
        s.sqrt()
    } else {
        (1.0 - s).max(0.0)
    }
}

/// The distance between two prepared points (see [`prepare_points`]).
#[cfg(test)]
fn distance(metric: Metric, x: &[f32], y: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => finish::<false>(pair_sum::<false>(x, y)),
        Metric::Euclidean => finish::<true>(pair_sum::<true>(x, y)),
    }
}

/// Distances between each query row and each candidate row, written row by row
/// (`out[q · n_cand + c]`), portable.
fn block_portable<const EUCLID: bool>(dim: usize, queries: &[f32], cands: &[f32], out: &mut [f32]) {
    let nc = cands.len() / dim;
    for (q, x) in queries.chunks_exact(dim).enumerate() {
        for (o, y) in out[q * nc..(q + 1) * nc]
            .iter_mut()
            .zip(cands.chunks_exact(dim))
        {
            *o = finish::<EUCLID>(pair_sum::<EUCLID>(x, y));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{finish, reduce8, tail_sum};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn term<const EUCLID: bool>(x: __m256, y: __m256) -> __m256 {
        if EUCLID {
            let d = _mm256_sub_ps(x, y);
            _mm256_mul_ps(d, d)
        } else {
            _mm256_mul_ps(x, y)
        }
    }

    #[inline(always)]
    unsafe fn lanes(v: __m256) -> [f32; 8] {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a
    }

    /// As `super::block_portable`, four candidates at a time (each with its own
    /// accumulator, so the sums are the same). Pointer steps use `wrapping_add`, which
    /// stays in bounds here, to keep debug builds free of per-load precondition checks.
    ///
    /// # Safety
    /// The CPU must have AVX2; `queries` and `cands` hold whole rows of `dim`, and
    /// `out` room for every pair.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block<const EUCLID: bool>(
        dim: usize,
        queries: &[f32],
        cands: &[f32],
        out: &mut [f32],
    ) {
        let nc = cands.len() / dim;
        let d8 = dim / 8 * 8;
        let cp = cands.as_ptr();
        for (q, x) in queries.chunks_exact(dim).enumerate() {
            let xp = x.as_ptr();
            let row = &mut out[q * nc..(q + 1) * nc];
            let mut c = 0;
            while c + 4 <= nc {
                let (y0, y1, y2, y3) = (
                    cp.wrapping_add(c * dim),
                    cp.wrapping_add((c + 1) * dim),
                    cp.wrapping_add((c + 2) * dim),
                    cp.wrapping_add((c + 3) * dim),
                );
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut i = 0;
                while i < d8 {
                    let xv = _mm256_loadu_ps(xp.wrapping_add(i));
                    a0 = _mm256_add_ps(a0, term::<EUCLID>(xv, _mm256_loadu_ps(y0.wrapping_add(i))));
                    a1 = _mm256_add_ps(a1, term::<EUCLID>(xv, _mm256_loadu_ps(y1.wrapping_add(i))));
                    a2 = _mm256_add_ps(a2, term::<EUCLID>(xv, _mm256_loadu_ps(y2.wrapping_add(i))));
                    a3 = _mm256_add_ps(a3, term::<EUCLID>(xv, _mm256_loadu_ps(y3.wrapping_add(i))));
                    i += 8;
                }
                for (j, a) in [a0, a1, a2, a3].into_iter().enumerate() {
                    let y = &cands[(c + j) * dim..(c + j + 1) * dim];
                    let s = reduce8(lanes(a)) + tail_sum::<EUCLID>(&x[d8..], &y[d8..]);
                    row[c + j] = finish::<EUCLID>(s);
                }
                c += 4;
            }
            while c < nc {
                let y = &cands[c * dim..(c + 1) * dim];
                let mut a = _mm256_setzero_ps();
                let mut i = 0;
                while i < d8 {
                    let v = term::<EUCLID>(
                        _mm256_loadu_ps(xp.wrapping_add(i)),
                        _mm256_loadu_ps(y.as_ptr().wrapping_add(i)),
                    );
                    a = _mm256_add_ps(a, v);
                    i += 8;
                }
                let s = reduce8(lanes(a)) + tail_sum::<EUCLID>(&x[d8..], &y[d8..]);
                row[c] = finish::<EUCLID>(s);
                c += 1;
            }
        }
    }
}

/// The distance-block routine for this CPU: AVX2 where there is, else portable.
#[derive(Clone, Copy)]
struct DistanceKernel {
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
}

impl DistanceKernel {
    fn get() -> DistanceKernel {
        DistanceKernel {
            #[cfg(target_arch = "x86_64")]
            avx2: is_x86_feature_detected!("avx2"),
        }
    }

    #[cfg(test)]
    fn portable() -> DistanceKernel {
        DistanceKernel {
            #[cfg(target_arch = "x86_64")]
            avx2: false,
        }
    }

    fn block(&self, metric: Metric, dim: usize, queries: &[f32], cands: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: the CPU has AVX2 (checked in `get`); the slices hold whole rows
            // and `out` has room for every pair (callers size it so).
            unsafe {
                match metric {
                    Metric::Cosine => avx2::block::<false>(dim, queries, cands, out),
                    Metric::Euclidean => avx2::block::<true>(dim, queries, cands, out),
                }
            }
            return;
        }
        match metric {
            Metric::Cosine => block_portable::<false>(dim, queries, cands, out),
            Metric::Euclidean => block_portable::<true>(dim, queries, cands, out),
        }
    }
}

// ---------------------------------------------------------------------------------
// 2. The fuzzy simplicial set.

/// The symmetric graph as a list of directed edges (each undirected edge twice),
/// ordered by (head, tail).
struct Graph {
    head: Vec<u32>,
    tail: Vec<u32>,
    weight: Vec<f32>,
}

/// ρ and σ of one point from `row`, its sorted distances to its neighbours with the
/// point itself first (umap-learn's `smooth_knn_dist` for one row, local connectivity
/// 1, bandwidth 1): ρ is the first non-zero distance, σ is found by bisection so that
/// `Σ_{j≥1} exp(−max(0, d_j − ρ)/σ) = log2(n_neighbors)`, and is kept above 1e-3 of
/// the row's mean distance (of `mean_all`, the mean over all rows, where ρ is 0).
fn smooth_knn(row: &[f64], n_neighbors: usize, mean_all: f64) -> (f64, f64) {
    let target = (n_neighbors as f64).log2();
    let rho = row.iter().copied().find(|&d| d > 0.0).unwrap_or(0.0);
    let (mut lo, mut hi, mut mid) = (0.0f64, f64::INFINITY, 1.0f64);
    for _ in 0..64 {
        let mut psum = 0.0;
        for &d in &row[1..] {
            let x = d - rho;
            psum += if x > 0.0 { (-x / mid).exp() } else { 1.0 };
        }
        if (psum - target).abs() < 1e-5 {
            break;
        }
        if psum > target {
            hi = mid;
            mid = (lo + hi) / 2.0;
        } else {
            lo = mid;
            mid = if hi == f64::INFINITY {
                mid * 2.0
            } else {
                (lo + hi) / 2.0
            };
        }
    }
    let floor = if rho > 0.0 {
        1e-3 * row.iter().sum::<f64>() / row.len() as f64
    } else {
        1e-3 * mean_all
    };
    (rho, mid.max(floor))
}

fn fuzzy_graph(knn: &Knn, n: usize) -> Graph {
    let k = knn.k;
    let n_neighbors = k + 1;
    let mean_all =
        knn.dist.iter().map(|&d| d as f64).sum::<f64>() / (n as f64 * n_neighbors as f64);
    // (low, high, strength low→high, strength high→low)
    let mut pairs: Vec<(u32, u32, f32, f32)> = Vec::with_capacity(n * k);
    let mut row = vec![0f64; n_neighbors];
    for i in 0..n {
        let dists = &knn.dist[i * k..(i + 1) * k];
        // The point itself is its nearest neighbour, at distance 0.
        for (r, &d) in row[1..].iter_mut().zip(dists) {
            *r = d as f64;
        }
        let (rho, sigma) = smooth_knn(&row, n_neighbors, mean_all);
        for (&d, &j) in dists.iter().zip(&knn.idx[i * k..(i + 1) * k]) {
            let x = d as f64 - rho;
            let w = if x <= 0.0 || sigma == 0.0 {
                1.0
            } else {
                (-x / sigma).exp() as f32
            };
            let i = i as u32;
            pairs.push(if i < j {
                (i, j, w, 0.0)
            } else {
                (j, i, 0.0, w)
            });
        }
    }
    pairs.sort_unstable_by_key(|p| (p.0, p.1));
    let mut undirected: Vec<(u32, u32, f32)> = Vec::with_capacity(pairs.len());
    let mut p = 0;
    while p < pairs.len() {
        let (lo, hi) = (pairs[p].0, pairs[p].1);
        let (mut a, mut b) = (0f32, 0f32);
        while p < pairs.len() && pairs[p].0 == lo && pairs[p].1 == hi {
            a += pairs[p].2;
            b += pairs[p].3;
            p += 1;
        }
        let w = a + b - a * b;
        if w > 0.0 {
            undirected.push((lo, hi, w));
        }
    }
    drop(pairs);
    let mut edges: Vec<(u32, u32, f32)> = Vec::with_capacity(2 * undirected.len());
    for &(lo, hi, w) in &undirected {
        edges.push((lo, hi, w));
        edges.push((hi, lo, w));
    }
    drop(undirected);
    edges.sort_unstable_by_key(|e| (e.0, e.1));
    Graph {
        head: edges.iter().map(|e| e.0).collect(),
        tail: edges.iter().map(|e| e.1).collect(),
        weight: edges.iter().map(|e| e.2).collect(),
    }
}

// ---------------------------------------------------------------------------------
// 3. The initial layout: first two principal components.

/// Power iterations of the 4-vector block (the top-2 subspace converges like
/// (λ5/λ2)^iterations).
const PCA_ITERATIONS: usize = 40;

fn pca_init(points: &[f32], n: usize, dim: usize, seed: u64) -> Vec<[f32; 2]> {
    let mut rng = Rng::new(seed ^ 0x0055_4D41_5049_4E49);
    let r = dim.min(BLOCK);
    let mut mean = vec![0f64; dim];
    for row in points.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    // Q: dim rows of BLOCK columns; columns r.. stay zero.
    let mut q: Vec<[f64; BLOCK]> = (0..dim)
        .map(|_| std::array::from_fn(|j| if j < r { rng.normal() } else { 0.0 }))
        .collect();
    orthonormalize(&mut q, r);
    let mut centred = vec![0f64; dim];
    let mut z = vec![[0f64; BLOCK]; dim];
    for _ in 0..PCA_ITERATIONS {
        // Q ← orth(Xcᵀ Xc Q), one pass over the points.
        z.iter_mut().for_each(|v| *v = [0.0; BLOCK]);
        for row in points.chunks_exact(dim) {
            let y = project_row(row, &mean, &q, &mut centred);
            for (zc, &x) in z.iter_mut().zip(&centred) {
                for j in 0..BLOCK {
                    zc[j] += x * y[j];
                }
            }
        }
        std::mem::swap(&mut q, &mut z);
        orthonormalize(&mut q, r);
    }
    // Rayleigh–Ritz: eigenvectors of H = Yᵀ Y (r × r), Y = Xc Q, order the directions.
    let y: Vec<[f64; BLOCK]> = points
        .chunks_exact(dim)
        .map(|row| project_row(row, &mean, &q, &mut centred))
        .collect();
    let mut h = vec![0f64; r * r];
    for yr in &y {
        for a in 0..r {
            for b in 0..r {
                h[a * r + b] += yr[a] * yr[b];
            }
        }
    }
    let (vals, vecs) = jacobi_eigen(&mut h, r);
    let mut order: Vec<usize> = (0..r).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));

    let mut coords = vec![[0f32; 2]; n];
    for axis in 0..2 {
        let col = order.get(axis).copied();
        let mut v: Vec<f64> = match col {
            Some(c) => y
                .iter()
                .map(|yr| (0..r).map(|j| yr[j] * vecs[j * r + c]).sum())
                .collect(),
            None => vec![0.0; n],
        };
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        if hi - lo > 1e-12 * (hi.abs() + lo.abs()).max(f64::MIN_POSITIVE) {
            v.iter_mut().for_each(|x| *x = 10.0 * (*x - lo) / (hi - lo));
        } else {
            // No spread along this axis (e.g. one-dimensional input): a random one.
            v.iter_mut().for_each(|x| *x = rng.uniform_range(0.0, 10.0));
        }
        for (c, x) in coords.iter_mut().zip(&v) {
            c[axis] = (x + 1e-4 * rng.normal()) as f32;
        }
    }
    coords
}

/// Columns of the power-iteration block.
const BLOCK: usize = 4;

/// `(x − mean) · Q` for one point; leaves `x − mean` in `centred`.
#[inline]
fn project_row(row: &[f32], mean: &[f64], q: &[[f64; BLOCK]], centred: &mut [f64]) -> [f64; BLOCK] {
    let mut y = [0f64; BLOCK];
    for ((c, &v), (&m, qc)) in centred.iter_mut().zip(row).zip(mean.iter().zip(q)) {
        *c = v as f64 - m;
        for j in 0..BLOCK {
            y[j] += *c * qc[j];
        }
    }
    y
}

/// Modified Gram–Schmidt on the first `r` columns of `q`; a column with no component
/// left becomes zero.
fn orthonormalize(q: &mut [[f64; BLOCK]], r: usize) {
    for j in 0..r {
        for i in 0..j {
            let p: f64 = q.iter().map(|row| row[i] * row[j]).sum();
            q.iter_mut().for_each(|row| row[j] -= p * row[i]);
        }
        let norm = q.iter().map(|row| row[j] * row[j]).sum::<f64>().sqrt();
        if norm > 1e-150 {
            q.iter_mut().for_each(|row| row[j] /= norm);
        } else {
            q.iter_mut().for_each(|row| row[j] = 0.0);
        }
    }
}

/// Eigen-decomposition of the symmetric `r × r` matrix `a` (destroyed) by cyclic Jacobi
/// rotations: eigenvalues, and eigenvectors as the columns of `v` (row-major).
fn jacobi_eigen(a: &mut [f64], r: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; r * r];
    for i in 0..r {
        v[i * r + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..r)
            .flat_map(|i| (0..r).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * r + j] * a[i * r + j])
            .sum();
        let total: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..r {
            for s in p + 1..r {
                let apq = a[p * r + s];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[s * r + s] - a[p * r + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for k in 0..r {
                    let akp = a[k * r + p];
                    let aks = a[k * r + s];
                    a[k * r + p] = c * akp - sn * aks;
                    a[k * r + s] = sn * akp + c * aks;
                }
                for k in 0..r {
                    let apk = a[p * r + k];
                    let ask = a[s * r + k];
                    a[p * r + k] = c * apk - sn * ask;
                    a[s * r + k] = sn * apk + c * ask;
                }
                for k in 0..r {
                    let vkp = v[k * r + p];
                    let vks = v[k * r + s];
                    v[k * r + p] = c * vkp - sn * vks;
                    v[k * r + s] = sn * vkp + c * vks;
                }
            }
        }
    }
    ((0..r).map(|i| a[i * r + i]).collect(), v)
}

// ---------------------------------------------------------------------------------
// 4. The curve parameters a and b.

/// `(a, b)` such that `1 / (1 + a·x^(2b))` fits, in least squares over 300 points of
/// [0, 3·spread], the curve that is 1 below `min_dist` and `exp(−(x − min_dist)/spread)`
/// above (umap-learn's `find_ab_params`, which calls scipy's Levenberg–Marquardt
/// `curve_fit` from (1, 1)). For min_dist 0.1: a ≈ 1.577, b ≈ 0.895.
pub fn fit_ab(min_dist: f64, spread: f64) -> (f64, f64) {
    let xs: Vec<f64> = (0..300).map(|i| 3.0 * spread * i as f64 / 299.0).collect();
    let ys: Vec<f64> = xs
        .iter()
        .map(|&x| {
            if x < min_dist {
                1.0
            } else {
                (-(x - min_dist) / spread).exp()
            }
        })
        .collect();
    let cost = |a: f64, b: f64| -> f64 {
        xs.iter()
            .zip(&ys)
            .map(|(&x, &y)| {
                let f = 1.0 / (1.0 + a * x.powf(2.0 * b));
                (f - y) * (f - y)
            })
            .sum()
    };
    let (mut a, mut b) = (1.0f64, 1.0f64);
    let mut c = cost(a, b);
    let mut lambda = 1e-3;
    for _ in 0..500 {
        // Normal equations JᵀJ δ = −Jᵀr.
        let (mut jaa, mut jab, mut jbb, mut ga, mut gb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            if x == 0.0 {
                continue; // f = 1 whatever a, b: no gradient
            }
            let p = x.powf(2.0 * b);
            let den = 1.0 + a * p;
            let f = 1.0 / den;
            let da = -p / (den * den);
            let db = -a * p * 2.0 * x.ln() / (den * den);
            let res = f - y;
            jaa += da * da;
            jab += da * db;
            jbb += db * db;
            ga += da * res;
            gb += db * res;
        }
        let mut improved = false;
        for _ in 0..30 {
            let (m11, m22) = (jaa * (1.0 + lambda), jbb * (1.0 + lambda));
            let det = m11 * m22 - jab * jab;
            if det.abs() < 1e-300 {
                lambda *= 10.0;
                continue;
            }
            let da = -(m22 * ga - jab * gb) / det;
            let db = -(m11 * gb - jab * ga) / det;
            let (na, nb) = (a + da, b + db);
            if na > 0.0 && nb > 0.0 {
                let nc = cost(na, nb);
                if nc < c {
                    let step = (da.abs() / a.abs()).max(db.abs() / b.abs());
                    a = na;
                    b = nb;
                    let rel = (c - nc) / c.max(f64::MIN_POSITIVE);
                    c = nc;
                    lambda = (lambda / 10.0).max(1e-12);
                    improved = step > 1e-12 && rel > 1e-15;
                    break;
                }
            }
            lambda *= 10.0;
        }
        if !improved {
            break;
        }
    }
    (a, b)
}

// ---------------------------------------------------------------------------------
// 5. The optimisation.

#[allow(clippy::too_many_arguments)]
fn optimize_layout(
    mut emb: Vec<[f32; 2]>,
    graph: Graph,
    n_epochs: usize,
    a: f32,
    b: f32,
    seed: u64,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Vec<[f32; 2]>> {
    let n = emb.len();
    progress(Progress {
        stage: Stage::Optimize,
        done: 0,
        total: n_epochs,
    })?;
    let max_w = graph.weight.iter().fold(0f32, |m, &w| m.max(w));
    let threshold_epochs = if n_epochs > 10 {
        n_epochs
    } else {
        default_epochs(n)
    };
    let threshold = max_w / threshold_epochs as f32;
    // Per edge: head, tail, and the sampling schedule in epochs (umap-learn's
    // epochs_per_sample = max / w; negative samples 5 times as often).
    let mut head: Vec<u32> = Vec::new();
    let mut tail: Vec<u32> = Vec::new();
    let mut eps: Vec<f64> = Vec::new();
    for ((&h, &t), &w) in graph.head.iter().zip(&graph.tail).zip(&graph.weight) {
        if w >= threshold && w > 0.0 {
            head.push(h);
            tail.push(t);
            eps.push(max_w as f64 / w as f64);
        }
    }
    drop(graph);
    let mut next = eps.clone();
    let mut next_neg: Vec<f64> = eps.iter().map(|e| e / NEGATIVE_SAMPLE_RATE).collect();
    let mut rng = Rng::new(seed ^ 0x5347_445F_554D_4150);
    for epoch in 0..n_epochs {
        // umap-learn updates alpha after each epoch, so epochs 0 and 1 both use 1.
        let alpha = 1.0 - epoch.saturating_sub(1) as f32 / n_epochs as f32;
        let now = epoch as f64;
        for e in 0..head.len() {
            if next[e] > now {
                continue;
            }
            let (j, k) = (head[e] as usize, tail[e] as usize);
            let cur = emb[j];
            let oth = emb[k];
            let (dx, dy) = (cur[0] - oth[0], cur[1] - oth[1]);
            let d2 = dx * dx + dy * dy;
            let coeff = if d2 > 0.0 {
                let pb = d2.powf(b);
                -2.0 * a * b * pb / d2 / (a * pb + 1.0)
            } else {
                0.0
            };
            let gx = (coeff * dx).clamp(-CLIP, CLIP) * alpha;
            let gy = (coeff * dy).clamp(-CLIP, CLIP) * alpha;
            let mut cur = [cur[0] + gx, cur[1] + gy];
            emb[k] = [oth[0] - gx, oth[1] - gy];
            next[e] += eps[e];

            let eps_neg = eps[e] / NEGATIVE_SAMPLE_RATE;
            let n_neg = ((now - next_neg[e]) / eps_neg).max(0.0) as usize;
            for _ in 0..n_neg {
                let s = rng.below(n);
                if s == j {
                    continue; // the point itself (its stored copy is stale here)
                }
                let o = emb[s];
                let (dx, dy) = (cur[0] - o[0], cur[1] - o[1]);
                let d2 = dx * dx + dy * dy;
                if d2 > 0.0 {
                    let coeff = 2.0 * b / ((0.001 + d2) * (a * d2.powf(b) + 1.0));
                    cur[0] += (coeff * dx).clamp(-CLIP, CLIP) * alpha;
                    cur[1] += (coeff * dy).clamp(-CLIP, CLIP) * alpha;
                }
            }
            emb[j] = cur;
            next_neg[e] += n_neg as f64 * eps_neg;
        }
        progress(Progress {
            stage: Stage::Optimize,
            done: epoch + 1,
            total: n_epochs,
        })?;
    }
    Ok(emb)
}

#[cfg(test)]
mod tests {
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
