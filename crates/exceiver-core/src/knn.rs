//! Exact k nearest neighbours by brute force: each query row against every candidate
//! row, blocked for the cache, split over threads, with AVX2 distance kernels whose
//! results are bit-identical to the portable ones (so results do not depend on the
//! CPU). Used by the UMAP layout (each point against the others) and by label
//! transfer (query cells against a reference).

use crate::error::{Error, Kind, Result};
use std::str::FromStr;

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

/// The `k` nearest candidates of each query, by (distance, index) ascending:
/// `idx[q·k + j]`, `dist[q·k + j]`.
#[derive(Debug, Clone)]
pub struct Knn {
    pub k: usize,
    pub idx: Vec<u32>,
    pub dist: Vec<f32>,
}

/// Multiply-adds per thread between two progress reports (about 0.1 s).
pub const BATCH_WORK: usize = 1 << 30;
/// Bytes of candidate rows per cache block (about half of a core's L2): every query of
/// a query block is compared with the block's candidates while they stay in cache.
const CAND_BLOCK_BYTES: usize = 256 << 10;
/// Query rows per cache block.
const QUERY_BLOCK: usize = 64;

/// Candidate rows per cache block for rows of `dim` floats (16 to 256).
fn cand_block(dim: usize) -> usize {
    (CAND_BLOCK_BYTES / (4 * dim.max(1))).clamp(16, 256)
}

/// Rows of `data` (`dim` columns) as the distance kernels want them: unit vectors for
/// cosine; for Euclidean, scaled by the largest absolute value (which keeps the order
/// of distances). A zero row under cosine gives NaN distances: callers refuse them.
pub fn prepare(data: &[f32], dim: usize, metric: Metric) -> Vec<f32> {
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

/// The `k` nearest candidates (rows of `cands`) of every query (rows of `queries`),
/// both prepared with [`prepare`] (the same scale). With `exclude_self` the queries
/// are the candidates and a point is not its own neighbour. The query rows are split
/// over `threads` in batches of about `batch_work` multiply-adds per thread, with
/// `progress(done, total)` called on the calling thread before the first batch and
/// after each; an error it returns stops the search. Rows past the candidates get
/// index `u32::MAX` and distance infinity (k larger than the candidates).
#[allow(clippy::too_many_arguments)]
pub fn search(
    queries: &[f32],
    cands: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
    exclude_self: bool,
    threads: usize,
    batch_work: usize,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Knn> {
    let dim = dim.max(1);
    let n = queries.len() / dim;
    let nc = cands.len() / dim;
    if k == 0 || nc > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "a neighbour search needs k >= 1 and at most 2^32 candidates (k {k}, {nc} candidates)"
        )));
    }
    let threads = threads.max(1);
    let mut idx = vec![u32::MAX; n * k];
    let mut dist = vec![f32::INFINITY; n * k];
    let kernel = DistanceKernel::get();
    progress(0, n)?;
    let rows_per_thread = (batch_work / (nc * dim).max(1)).clamp(1, 4096);
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
        let rows = Rows {
            kernel,
            queries,
            cands,
            dim,
            k,
            metric,
            exclude_self,
        };
        let spawn_error = std::thread::scope(|s| {
            let mut spawn_error = None;
            for (q0, i, d) in parts {
                let job = move || rows.run(q0, i, d);
                if let Err(e) = std::thread::Builder::new().spawn_scoped(s, job) {
                    spawn_error = Some(e);
                }
            }
            let (q0, i, d) = first;
            rows.run(q0, i, d);
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
        progress(start, n)?;
    }
    Ok(Knn { k, idx, dist })
}

/// One search's inputs, shared by its threads.
#[derive(Clone, Copy)]
struct Rows<'a> {
    kernel: DistanceKernel,
    queries: &'a [f32],
    cands: &'a [f32],
    dim: usize,
    k: usize,
    metric: Metric,
    exclude_self: bool,
}

impl Rows<'_> {
    /// Neighbours of the queries `q0 ..` (as many as `idx_out` holds rows of `k`).
    fn run(&self, q0: usize, idx_out: &mut [u32], dist_out: &mut [f32]) {
        let (dim, k) = (self.dim, self.k);
        let n = self.cands.len() / dim;
        let m = idx_out.len() / k;
        let cb = cand_block(dim);
        let mut block = vec![0f32; QUERY_BLOCK * cb];
        for c0 in (0..n).step_by(cb) {
            let c1 = (c0 + cb).min(n);
            let cands = &self.cands[c0 * dim..c1 * dim];
            for b0 in (0..m).step_by(QUERY_BLOCK) {
                let b1 = (b0 + QUERY_BLOCK).min(m);
                let queries = &self.queries[(q0 + b0) * dim..(q0 + b1) * dim];
                self.kernel
                    .block(self.metric, dim, queries, cands, &mut block);
                let nc = c1 - c0;
                for q in b0..b1 {
                    let me = if self.exclude_self {
                        q0 + q
                    } else {
                        usize::MAX
                    };
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

/// The distance between two prepared points (see [`prepare`]).
#[cfg(test)]
pub(crate) fn distance(metric: Metric, x: &[f32], y: &[f32]) -> f32 {
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
pub(crate) struct DistanceKernel {
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
}

impl DistanceKernel {
    pub(crate) fn get() -> DistanceKernel {
        DistanceKernel {
            #[cfg(target_arch = "x86_64")]
            avx2: is_x86_feature_detected!("avx2"),
        }
    }

    #[cfg(test)]
    pub(crate) fn portable() -> DistanceKernel {
        DistanceKernel {
            #[cfg(target_arch = "x86_64")]
            avx2: false,
        }
    }

    pub(crate) fn block(
        &self,
        metric: Metric,
        dim: usize,
        queries: &[f32],
        cands: &[f32],
        out: &mut [f32],
    ) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng::Rng;

    /// Queries against other candidates: every query's list is the k smallest of a
    /// plain sort (ties by index), with k past the candidates padded.
    #[test]
    fn a_cross_search_is_exact() {
        let mut rng = Rng::new(4);
        let (nq, nc, dim) = (37, 300, 11);
        let q: Vec<f32> = (0..nq * dim).map(|_| rng.below(3) as f32 - 0.5).collect();
        let c: Vec<f32> = (0..nc * dim).map(|_| rng.below(3) as f32 - 0.5).collect();
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let (pq, pc) = (prepare(&q, dim, metric), prepare(&c, dim, metric));
            for k in [1, 9] {
                let knn = search(
                    &pq,
                    &pc,
                    dim,
                    k,
                    metric,
                    false,
                    3,
                    5 * nc * dim,
                    &mut |_, _| Ok(()),
                )
                .unwrap();
                for i in 0..nq {
                    let x = &pq[i * dim..(i + 1) * dim];
                    let mut all: Vec<(f32, u32)> = (0..nc)
                        .map(|j| (distance(metric, x, &pc[j * dim..(j + 1) * dim]), j as u32))
                        .collect();
                    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    let want: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
                    assert_eq!(
                        &knn.idx[i * k..(i + 1) * k],
                        &want[..],
                        "{metric:?} k {k} query {i}"
                    );
                }
            }
        }
        let small = search(
            &prepare(&q, dim, Metric::Cosine),
            &prepare(&c[..2 * dim], dim, Metric::Cosine),
            dim,
            3,
            Metric::Cosine,
            false,
            1,
            BATCH_WORK,
            &mut |_, _| Ok(()),
        )
        .unwrap();
        // k past the candidates: padded with u32::MAX at infinity
        assert_eq!(small.idx[2], u32::MAX);
        assert!(small.dist[2].is_infinite());
        let mut two = small.idx[..2].to_vec();
        two.sort_unstable();
        assert_eq!(two, vec![0, 1]);
    }
}
