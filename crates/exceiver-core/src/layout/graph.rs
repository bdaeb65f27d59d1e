//! Step 2: the fuzzy simplicial set (ρ, σ per point; the fuzzy union).

use super::neighbours::Knn;
#[allow(unused_imports)]
use super::*;

/// The symmetric graph as a list of directed edges (each undirected edge twice),
/// ordered by (head, tail).
pub(crate) struct Graph {
    pub(crate) head: Vec<u32>,
    pub(crate) tail: Vec<u32>,
    pub(crate) weight: Vec<f32>,
}

/// ρ and σ of one point from `row`, its sorted distances to its neighbours with the
/// point itself first (umap-learn's `smooth_knn_dist` for one row, local connectivity
/// 1, bandwidth 1): ρ is the first non-zero distance, σ is found by bisection so that
/// `Σ_{j≥1} exp(−max(0, d_j − ρ)/σ) = log2(n_neighbors)`, and is kept above 1e-3 of
/// the row's mean distance (of `mean_all`, the mean over all rows, where ρ is 0).
pub(super) fn smooth_knn(row: &[f64], n_neighbors: usize, mean_all: f64) -> (f64, f64) {
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

pub(crate) fn fuzzy_graph(knn: &Knn, n: usize) -> Graph {
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
