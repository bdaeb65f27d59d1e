//! How well an embedding keeps cell types apart and mixes batches: the field's metrics,
//! computed as scIB (Luecken et al. 2022) and scikit-learn compute them.
//!
//! [`evaluate`] gives, for cells with labels (and optionally batches):
//! - **kNN accuracy and macro-F1**: each cell's label predicted by the majority of its k
//!   nearest other cells by cosine distance (ties to the label that sorts first).
//! - **NMI and ARI** of a clustering against the labels, as scIB's
//!   `cluster_optimal_resolution`: the neighbour graph of 15 (the cell and its 14 nearest,
//!   Euclidean, UMAP's fuzzy weights, as scanpy's `pp.neighbors`), clustered at
//!   resolutions 0.1, 0.2, … 2.0, keeping the clustering with the highest NMI. The
//!   clustering is Louvain (scIB used Louvain before it moved to Leiden; both optimise
//!   the same modularity).
//! - **ASW**: the mean silhouette of the cells by label, Euclidean, scaled to [0, 1] as
//!   scIB does: `(s + 1) / 2`.
//! - With batches: **batch ASW** (per label, `1 − |silhouette by batch|` averaged over
//!   its cells, then over labels with 2 or more batches) and **graph connectivity**
//!   (per label, the share of its cells in the largest connected piece of the neighbour
//!   graph restricted to it, averaged over labels).
//!
//! Exact all-pairs distances, O(n² · dim) time over threads and O(n · labels) memory.

pub mod louvain;
pub mod scores;

use crate::error::{Error, Result};
use crate::knn::{self, DistanceKernel, Metric};

/// Neighbours per cell in the clustering graph, the cell itself included (scanpy's
/// `n_neighbors` default).
pub const GRAPH_NEIGHBOURS: usize = 15;

/// The resolutions tried for the clustering (scIB's `cluster_optimal_resolution`).
pub fn resolutions() -> Vec<f64> {
    (1..=20).map(|i| i as f64 / 10.0).collect()
}

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Neighbours voting in the kNN accuracy.
    pub k: usize,
    /// Seed of the clustering's node order.
    pub seed: u64,
    pub threads: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            k: 15,
            seed: 0,
            threads: 1,
        }
    }
}

/// The metrics of one embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub cells: usize,
    pub classes: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub nmi: f64,
    pub ari: f64,
    /// Silhouette by label scaled to [0, 1].
    pub asw: f64,
    /// Resolution and number of clusters of the clustering kept for NMI and ARI.
    pub resolution: f64,
    pub clusters: usize,
    /// With batches; `None` for batch ASW when no label has cells of 2 batches.
    pub batch_asw: Option<f64>,
    pub graph_connectivity: Option<f64>,
}

impl Evaluation {
    /// scIB's AvgBIO: the mean of NMI, ARI and ASW.
    pub fn avg_bio(&self) -> f64 {
        (self.nmi + self.ari + self.asw) / 3.0
    }
}

/// Where [`evaluate`] is, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Neighbours,
    Distances,
    Clustering,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Neighbours => "neighbours",
            Stage::Distances => "distances",
            Stage::Clustering => "clustering",
        }
    }
}

/// The metrics of the embeddings `data` (`n × dim`, row-major) against `labels`
/// (`0..n_labels`), and against `batches` when given. `progress(stage, done, total)` is
/// called on the calling thread between pieces of work; an error it returns stops.
pub fn evaluate(
    data: &[f32],
    dim: usize,
    labels: &[u32],
    n_labels: usize,
    batches: Option<&[u32]>,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(Stage, usize, usize) -> Result<()>,
) -> Result<Evaluation> {
    let n = labels.len();
    let dim = dim.max(1);
    if data.len() != n * dim || batches.is_some_and(|b| b.len() != n) {
        return Err(Error::shape(format!(
            "{} values, {n} labels and {} batches for {dim} dimensions",
            data.len(),
            batches.map_or(0, |b| b.len())
        )));
    }
    if opts.k < 1 || opts.k >= n {
        return Err(Error::invalid(format!(
            "k = {} must be at least 1 and below the number of cells, {n}",
            opts.k
        )));
    }
    let classes = {
        let mut seen = vec![false; n_labels];
        labels.iter().for_each(|&l| seen[l as usize] = true);
        seen.iter().filter(|&&s| s).count()
    };
    if classes < 2 {
        return Err(Error::invalid(format!(
            "the labels have {classes} distinct values; the metrics need at least 2"
        )));
    }
    // kNN vote, cosine
    let unit = knn::prepare(data, dim, Metric::Cosine);
    let threads = opts.threads.max(1);
    let nn = knn::search(
        &unit,
        &unit,
        dim,
        opts.k,
        Metric::Cosine,
        true,
        threads,
        knn::BATCH_WORK,
        &mut |d, t| progress(Stage::Neighbours, d, t),
    )?;
    drop(unit);
    let pred = vote(&nn, labels, n_labels);
    let (accuracy, macro_f1) = scores::accuracy_f1(labels, &pred, n_labels);

    // silhouettes, Euclidean, with the graph's neighbours from the same pass
    let scaled = knn::prepare(data, dim, Metric::Euclidean);
    let pass = distance_pass(
        &scaled,
        dim,
        labels,
        n_labels,
        batches,
        threads,
        &mut |d, t| progress(Stage::Distances, d, t),
    )?;
    drop(scaled);
    let asw = (mean(&scores::silhouettes(
        labels,
        &pass.label_sizes,
        &pass.label_sums,
    )) + 1.0)
        / 2.0;

    let graph = crate::layout::graph::fuzzy_graph(&pass.knn, n);
    let edges: Vec<(u32, u32, f64)> = graph
        .head
        .iter()
        .zip(&graph.tail)
        .zip(&graph.weight)
        .filter(|((h, t), _)| h < t)
        .map(|((&h, &t), &w)| (h, t, w as f64))
        .collect();
    let g = louvain::Graph::from_edges(n, edges.iter().copied());
    let mut best: Option<(f64, f64, Vec<u32>)> = None;
    let res = resolutions();
    for (i, &r) in res.iter().enumerate() {
        progress(Stage::Clustering, i, res.len())?;
        let c = louvain::louvain(&g, r, opts.seed);
        let score = scores::nmi(labels, &c);
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, r, c));
        }
    }
    progress(Stage::Clustering, res.len(), res.len())?;
    let (nmi, resolution, clustering) = best.unwrap_or((0.0, 0.0, vec![0; n]));
    let ari = scores::ari(labels, &clustering);
    let clusters = clustering.iter().max().map_or(0, |&m| m as usize + 1);

    let (batch_asw, graph_connectivity) = match batches {
        None => (None, None),
        Some(b) => {
            let pairs: Vec<(u32, u32)> = edges.iter().map(|&(h, t, _)| (h, t)).collect();
            (
                batch_asw(labels, n_labels, b, &pass),
                Some(scores::graph_connectivity(labels, n_labels, &pairs)),
            )
        }
    };
    Ok(Evaluation {
        cells: n,
        classes,
        accuracy,
        macro_f1,
        nmi,
        ari,
        asw,
        resolution,
        clusters,
        batch_asw,
        graph_connectivity,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Majority label of each cell's neighbours, ties to the lower label.
fn vote(nn: &knn::Knn, labels: &[u32], n_labels: usize) -> Vec<u32> {
    let mut count = vec![0u32; n_labels];
    (0..labels.len())
        .map(|i| {
            count.iter_mut().for_each(|c| *c = 0);
            for &j in &nn.idx[i * nn.k..(i + 1) * nn.k] {
                if let Some(&l) = labels.get(j as usize) {
                    count[l as usize] += 1;
                }
            }
            let mut best = 0;
            for l in 1..n_labels {
                if count[l] > count[best] {
                    best = l;
                }
            }
            best as u32
        })
        .collect()
}

/// What one pass over all pairs of cells gathers.
struct Pass {
    /// Per cell, summed Euclidean distance to the cells of each label (itself excluded).
    label_sums: Vec<f64>,
    label_sizes: Vec<usize>,
    /// Per cell, summed distance to the cells of its own label in each batch.
    batch_sums: Vec<f64>,
    n_batches: usize,
    /// The `GRAPH_NEIGHBOURS − 1` nearest other cells (Euclidean).
    knn: knn::Knn,
}

/// Rows of cells per thread between two progress reports.
const PASS_ROWS: usize = 64;

#[allow(clippy::too_many_arguments)]
fn distance_pass(
    scaled: &[f32],
    dim: usize,
    labels: &[u32],
    n_labels: usize,
    batches: Option<&[u32]>,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Pass> {
    let n = labels.len();
    let nb = batches.map_or(0, |b| b.iter().max().map_or(0, |&m| m as usize + 1));
    let gk = (GRAPH_NEIGHBOURS - 1).min(n - 1);
    let mut label_sizes = vec![0usize; n_labels];
    labels.iter().for_each(|&l| label_sizes[l as usize] += 1);
    let mut label_sums = vec![0f64; n * n_labels];
    let mut batch_sums = vec![0f64; n * nb];
    let mut idx = vec![u32::MAX; n * gk];
    let mut dist = vec![f32::INFINITY; n * gk];
    let kernel = DistanceKernel::get();
    let batch = PASS_ROWS * threads;
    progress(0, n)?;
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let per = (end - start).div_ceil(threads);
        let jobs: Vec<_> = label_sums[start * n_labels..end * n_labels]
            .chunks_mut(per * n_labels)
            .zip(
                batch_sums[start * nb..end * nb]
                    .chunks_mut((per * nb).max(1))
                    .chain(std::iter::repeat_with(|| &mut [][..])),
            )
            .zip(
                idx[start * gk..end * gk]
                    .chunks_mut(per * gk)
                    .zip(dist[start * gk..end * gk].chunks_mut(per * gk)),
            )
            .enumerate()
            .map(|(t, ((ls, bs), (ix, ds)))| (start + t * per, ls, bs, ix, ds))
            .collect();
        let rows = PassRows {
            kernel,
            scaled,
            dim,
            labels,
            n_labels,
            batches,
            nb,
            gk,
        };
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            let mut jobs = jobs.into_iter();
            let first = jobs.next();
            for (q0, ls, bs, ix, ds) in jobs {
                handles.push(s.spawn(move || rows.run(q0, ls, bs, ix, ds)));
            }
            if let Some((q0, ls, bs, ix, ds)) = first {
                rows.run(q0, ls, bs, ix, ds);
            }
            handles.into_iter().for_each(|h| {
                if let Err(e) = h.join() {
                    std::panic::resume_unwind(e)
                }
            });
        });
        start = end;
        progress(start, n)?;
    }
    Ok(Pass {
        label_sums,
        label_sizes,
        batch_sums,
        n_batches: nb,
        knn: knn::Knn { k: gk, idx, dist },
    })
}

#[derive(Clone, Copy)]
struct PassRows<'a> {
    kernel: DistanceKernel,
    scaled: &'a [f32],
    dim: usize,
    labels: &'a [u32],
    n_labels: usize,
    batches: Option<&'a [u32]>,
    nb: usize,
    gk: usize,
}

/// Candidate cells per distance block.
const PASS_CANDS: usize = 256;

impl PassRows<'_> {
    fn run(&self, q0: usize, ls: &mut [f64], bs: &mut [f64], ix: &mut [u32], ds: &mut [f32]) {
        let (dim, nl, nb, gk) = (self.dim, self.n_labels, self.nb, self.gk);
        let m = ls.len() / nl;
        let n = self.labels.len();
        let queries = &self.scaled[q0 * dim..(q0 + m) * dim];
        let mut block = vec![0f32; m * PASS_CANDS];
        for c0 in (0..n).step_by(PASS_CANDS) {
            let c1 = (c0 + PASS_CANDS).min(n);
            let nc = c1 - c0;
            self.kernel.block(
                Metric::Euclidean,
                dim,
                queries,
                &self.scaled[c0 * dim..c1 * dim],
                &mut block[..m * nc],
            );
            for q in 0..m {
                let i = q0 + q;
                let li = self.labels[i];
                let row = &block[q * nc..(q + 1) * nc];
                for (c, &d) in row.iter().enumerate() {
                    let j = c0 + c;
                    if j == i {
                        continue;
                    }
                    let lj = self.labels[j];
                    ls[q * nl + lj as usize] += d as f64;
                    if let Some(b) = self.batches {
                        if lj == li {
                            bs[q * nb + b[j] as usize] += d as f64;
                        }
                    }
                    knn_push(
                        &mut ds[q * gk..(q + 1) * gk],
                        &mut ix[q * gk..(q + 1) * gk],
                        d,
                        j as u32,
                    );
                }
            }
        }
    }
}

/// Insert `j` at distance `d` into a list sorted by (distance, index).
#[inline]
fn knn_push(dist: &mut [f32], idx: &mut [u32], d: f32, j: u32) {
    let k = dist.len();
    if k == 0 || d >= dist[k - 1] {
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

/// scIB's batch ASW: for each label whose cells come from more than one batch (and not
/// each from its own), the silhouette of those cells by batch, `1 − |s|` averaged over
/// them; then the mean over such labels.
fn batch_asw(labels: &[u32], n_labels: usize, batches: &[u32], pass: &Pass) -> Option<f64> {
    let nb = pass.n_batches;
    let mut per_label = Vec::new();
    for l in 0..n_labels as u32 {
        let cells: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == l).collect();
        let mut sizes = vec![0usize; nb];
        cells.iter().for_each(|&i| sizes[batches[i] as usize] += 1);
        let present = sizes.iter().filter(|&&s| s > 0).count();
        if present <= 1 || present == cells.len() {
            continue;
        }
        let sub_labels: Vec<u32> = cells.iter().map(|&i| batches[i]).collect();
        let sums: Vec<f64> = cells
            .iter()
            .flat_map(|&i| pass.batch_sums[i * nb..(i + 1) * nb].iter().copied())
            .collect();
        let s = scores::silhouettes(&sub_labels, &sizes, &sums);
        per_label.push(mean(&s.iter().map(|x| 1.0 - x.abs()).collect::<Vec<_>>()));
    }
    (!per_label.is_empty()).then(|| mean(&per_label))
}
