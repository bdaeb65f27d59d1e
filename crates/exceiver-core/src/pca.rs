//! The field's standard baseline embedding, as scanpy computes it: counts normalised to
//! 10,000 per cell and log1p (`pp.normalize_total`, `pp.log1p`), the `n_top_genes` most
//! variable genes (`pp.highly_variable_genes(flavor="seurat")`), each gene scaled to zero
//! mean and unit variance and clipped at ±`max_value` (`pp.scale(max_value=10)`), and the
//! first `n_components` principal components (`tl.pca(n_comps=50)`).
//!
//! Two passes over the cells, both streamed: [`GeneScan`] (per-gene statistics for the
//! selection and the scaling), then [`Collect`] (the chosen genes' clipped values, kept
//! sparse). [`fit`] finds the components by randomized subspace iteration with
//! Rayleigh–Ritz (Halko, Martinsson & Tropp 2011) on the implicitly centred and scaled
//! sparse matrix, never forming it densely: O(iterations · (nnz + (cells + genes) · l) · l)
//! with `l = 2 · n_components` (at least `n_components + 10`) columns.
//!
//! Each component's sign is fixed so that its largest gene loading is positive; the
//! result is deterministic for a seed and any thread count.

use crate::error::{Error, Result};
use crate::layout::init::jacobi_eigen;
use crate::model::cell::RawCell;
use crate::model::rng::Rng;
use crate::preprocess::HvgFit;
use std::collections::HashMap;

/// Options of the baseline; the defaults are scanpy's standard recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct PcaOptions {
    pub n_top_genes: usize,
    pub n_components: usize,
    /// Clip of the scaled values (`pp.scale(max_value=…)`).
    pub max_value: f64,
    /// Subspace iterations.
    pub iterations: usize,
    pub seed: u64,
    pub threads: usize,
}

impl Default for PcaOptions {
    fn default() -> Self {
        PcaOptions {
            n_top_genes: 2000,
            n_components: 50,
            max_value: 10.0,
            iterations: 12,
            seed: 0,
            threads: 1,
        }
    }
}

impl PcaOptions {
    pub fn check(&self) -> Result<()> {
        if !(1..=200).contains(&self.n_components) {
            return Err(Error::invalid(format!(
                "n_components = {} is out of range 1..200",
                self.n_components
            )));
        }
        if self.n_top_genes < 1 {
            return Err(Error::invalid("n_top_genes must be at least 1"));
        }
        if !(self.max_value > 0.0) {
            return Err(Error::invalid(format!(
                "max_value = {} must be positive",
                self.max_value
            )));
        }
        if !(1..=100).contains(&self.iterations) {
            return Err(Error::invalid(format!(
                "iterations = {} is out of range 1..100",
                self.iterations
            )));
        }
        Ok(())
    }
}

/// Pass 1: every gene's statistics over every cell, on log-normalised counts.
#[derive(Debug, Default)]
pub struct GeneScan {
    vocab: HashMap<String, u32>,
    names: Vec<String>,
    hvg: Option<HvgFit>,
    /// Σ y and Σ y² of the log-normalised values per gene (zeros included implicitly).
    sum: Vec<f64>,
    sum2: Vec<f64>,
    cells: usize,
}

/// A cell's genes (NULL elements are errors) and counts, read through the core's cell
/// contract with `lookup` for the gene indices.
fn read_cell(
    lookup: impl Fn(&str) -> Option<u32>,
    genes: &[Option<&str>],
    counts: &[Option<f32>],
) -> Result<RawCell> {
    if genes.len() != counts.len() {
        return Err(Error::shape(format!(
            "genes has {} elements but counts has {}",
            genes.len(),
            counts.len()
        )));
    }
    Ok(RawCell::read(lookup, genes.iter().copied(), counts.iter().copied())?.0)
}

impl GeneScan {
    pub fn new() -> GeneScan {
        GeneScan::default()
    }

    pub fn add_cell(&mut self, genes: &[Option<&str>], counts: &[Option<f32>]) -> Result<()> {
        for g in genes.iter().flatten() {
            if !self.vocab.contains_key(*g) {
                self.vocab.insert(g.to_string(), self.names.len() as u32);
                self.names.push(g.to_string());
            }
        }
        let n = self.names.len();
        let hvg = self.hvg.get_or_insert_with(|| HvgFit::new(0));
        hvg.grow(n);
        self.sum.resize(n, 0.0);
        self.sum2.resize(n, 0.0);
        let cell = read_cell(|g| self.vocab.get(g).copied(), genes, counts)?;
        let ys = cell.log_norm();
        hvg.add_cell(&cell.genes, &ys);
        for (&g, &y) in cell.genes.iter().zip(&ys) {
            self.sum[g as usize] += y as f64;
            self.sum2[g as usize] += y as f64 * y as f64;
        }
        self.cells += 1;
        Ok(())
    }

    pub fn cells(&self) -> usize {
        self.cells
    }

    pub fn genes(&self) -> usize {
        self.names.len()
    }

    /// The `n_top` most variable genes, with their scaling: mean and standard deviation
    /// (ddof 1, as scanpy; 1 for a constant gene) of the log-normalised values.
    pub fn select(&self, n_top: usize) -> Result<Selection> {
        let n = self.cells as f64;
        if self.cells < 2 {
            return Err(Error::invalid(format!(
                "a PCA needs at least 2 cells with counts, not {}",
                self.cells
            )));
        }
        let mut keep = self
            .hvg
            .as_ref()
            .map(|h| h.select(n_top))
            .unwrap_or_default();
        // in name order, so that the result does not depend on the order of the rows
        keep.sort_by(|&a, &b| self.names[a].cmp(&self.names[b]));
        if keep.is_empty() {
            return Err(Error::invalid(format!(
                "none of the {} genes varies over the {} cells",
                self.names.len(),
                self.cells
            )));
        }
        let mut s = Selection {
            column: HashMap::new(),
            names: Vec::new(),
            mean: Vec::new(),
            std: Vec::new(),
        };
        for (c, &g) in keep.iter().enumerate() {
            let m = self.sum[g] / n;
            let var = ((self.sum2[g] - n * m * m) / (n - 1.0)).max(0.0);
            s.column.insert(self.names[g].clone(), c as u32);
            s.names.push(self.names[g].clone());
            s.mean.push(m);
            s.std.push(if var > 0.0 { var.sqrt() } else { 1.0 });
        }
        Ok(s)
    }
}

/// The chosen genes, in name order, and their scaling.
#[derive(Debug, Clone)]
pub struct Selection {
    column: HashMap<String, u32>,
    pub names: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Pass 2: the chosen genes' values of every cell, clipped, as sparse rows.
#[derive(Debug)]
pub struct Collect<'a> {
    sel: &'a Selection,
    max_value: f64,
    /// Value of a zero count after clipping, per gene: `max(0, mean − max_value · std)`.
    floor: Vec<f64>,
    start: Vec<usize>,
    col: Vec<u32>,
    /// Clipped value minus the gene's `floor` (zero counts are 0 here).
    val: Vec<f32>,
}

impl<'a> Collect<'a> {
    pub fn new(sel: &'a Selection, max_value: f64) -> Collect<'a> {
        let floor = sel
            .mean
            .iter()
            .zip(&sel.std)
            .map(|(m, s)| (m - max_value * s).max(0.0))
            .collect();
        Collect {
            sel,
            max_value,
            floor,
            start: vec![0],
            col: Vec::new(),
            val: Vec::new(),
        }
    }

    pub fn add_cell(&mut self, genes: &[Option<&str>], counts: &[Option<f32>]) -> Result<()> {
        let cell = read_cell(|g| self.sel.column.get(g).copied(), genes, counts)?;
        for (&c, y) in cell.genes.iter().zip(cell.log_norm()) {
            let (m, s) = (self.sel.mean[c as usize], self.sel.std[c as usize]);
            let clipped = (y as f64).clamp(m - self.max_value * s, m + self.max_value * s);
            let v = clipped - self.floor[c as usize];
            if v != 0.0 {
                self.col.push(c);
                self.val.push(v as f32);
            }
        }
        self.start.push(self.col.len());
        Ok(())
    }

    pub fn cells(&self) -> usize {
        self.start.len() - 1
    }

    /// Bytes held, for memory limits.
    pub fn bytes(&self) -> usize {
        self.start.len() * 8 + self.col.len() * 8
    }
}

/// The fitted components and each cell's coordinates.
#[derive(Debug, Clone)]
pub struct Pca {
    /// `cells × n_components`, row-major, in the order the cells were collected.
    pub scores: Vec<f32>,
    /// `n_components × genes`, row-major: the loadings of the selected genes.
    pub components: Vec<f64>,
    /// Variance along each component (ddof 1).
    pub variance: Vec<f64>,
    /// Its share of the total variance of the scaled genes.
    pub variance_ratio: Vec<f64>,
}

/// Cells per block of [`Scaled::t_times`].
const T_BLOCK: usize = 1024;

/// The scaled, centred matrix `Z = (S − 1 mᵀ) D⁻¹` as products, never formed.
struct Scaled<'a> {
    s: &'a Collect<'a>,
    /// Column means of S.
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    threads: usize,
}

impl Scaled<'_> {
    fn n(&self) -> usize {
        self.s.cells()
    }
    fn g(&self) -> usize {
        self.inv_std.len()
    }

    /// `Z · X` for `X` of `g × l` (row-major): `n × l`.
    fn times(&self, x: &[f64], l: usize) -> Vec<f64> {
        let (n, g) = (self.n(), self.g());
        let xs: Vec<f64> = (0..g * l).map(|i| x[i] * self.inv_std[i / l]).collect();
        let mut shift = vec![0f64; l];
        for j in 0..g {
            for c in 0..l {
                shift[c] += self.mean[j] * xs[j * l + c];
            }
        }
        let mut out = vec![0f64; n * l];
        let per = n.div_ceil(self.threads.max(1)).max(1);
        std::thread::scope(|sc| {
            for (t, chunk) in out.chunks_mut(per * l).enumerate() {
                let (xs, shift) = (&xs, &shift);
                sc.spawn(move || {
                    for (r, row) in chunk.chunks_mut(l).enumerate() {
                        let i = t * per + r;
                        row.copy_from_slice(shift);
                        row.iter_mut().for_each(|v| *v = -*v);
                        for p in self.s.start[i]..self.s.start[i + 1] {
                            let (j, v) = (self.s.col[p] as usize, self.s.val[p] as f64);
                            for (o, &xv) in row.iter_mut().zip(&xs[j * l..(j + 1) * l]) {
                                *o += v * xv;
                            }
                        }
                    }
                });
            }
        });
        out
    }

    /// `Zᵀ · Y` for `Y` of `n × l`: `g × l`. Rows are summed in fixed blocks of
    /// [`T_BLOCK`] cells, added in block order, so the result does not depend on the
    /// thread count.
    fn t_times(&self, y: &[f64], l: usize) -> Vec<f64> {
        let (n, g) = (self.n(), self.g());
        let mut acc = vec![0f64; g * l];
        let mut colsum = vec![0f64; l];
        let blocks = n.div_ceil(T_BLOCK);
        let threads = self.threads.max(1);
        for wave in (0..blocks).step_by(threads) {
            let parts: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = (wave..(wave + threads).min(blocks))
                    .map(|b| {
                        sc.spawn(move || {
                            let mut acc = vec![0f64; g * l];
                            let mut colsum = vec![0f64; l];
                            for i in b * T_BLOCK..((b + 1) * T_BLOCK).min(n) {
                                let yr = &y[i * l..(i + 1) * l];
                                colsum.iter_mut().zip(yr).for_each(|(c, v)| *c += v);
                                for p in self.s.start[i]..self.s.start[i + 1] {
                                    let (j, v) = (self.s.col[p] as usize, self.s.val[p] as f64);
                                    for (a, &yv) in acc[j * l..(j + 1) * l].iter_mut().zip(yr) {
                                        *a += v * yv;
                                    }
                                }
                            }
                            (acc, colsum)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            });
            for (a, c) in &parts {
                acc.iter_mut().zip(a).for_each(|(x, y)| *x += y);
                colsum.iter_mut().zip(c).for_each(|(x, y)| *x += y);
            }
        }
        for j in 0..g {
            for c in 0..l {
                acc[j * l + c] = (acc[j * l + c] - self.mean[j] * colsum[c]) * self.inv_std[j];
            }
        }
        acc
    }

    /// Total variance of Z (the trace of its covariance).
    fn total_variance(&self) -> f64 {
        let (n, g) = (self.n(), self.g());
        let mut sq = vec![0f64; g];
        for (&j, &v) in self.s.col.iter().zip(&self.s.val) {
            sq[j as usize] += v as f64 * v as f64;
        }
        (0..g)
            .map(|j| (sq[j] - n as f64 * self.mean[j] * self.mean[j]) * self.inv_std[j].powi(2))
            .sum::<f64>()
            / (n as f64 - 1.0)
    }
}

/// Orthonormal columns (modified Gram–Schmidt) of `a`, `rows × l` row-major; a column
/// with nothing left becomes zero.
fn orthonormalize(a: &mut [f64], l: usize) {
    let rows = a.len() / l;
    for j in 0..l {
        for i in 0..j {
            let p: f64 = (0..rows).map(|r| a[r * l + i] * a[r * l + j]).sum();
            (0..rows).for_each(|r| a[r * l + j] -= p * a[r * l + i]);
        }
        let norm = (0..rows).map(|r| a[r * l + j].powi(2)).sum::<f64>().sqrt();
        let scale = if norm > 1e-150 { 1.0 / norm } else { 0.0 };
        (0..rows).for_each(|r| a[r * l + j] *= scale);
    }
}

/// The principal components of the collected cells (see the module documentation).
pub fn fit(
    collected: &Collect<'_>,
    opts: &PcaOptions,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Pca> {
    opts.check()?;
    let sel = collected.sel;
    let (n, g) = (collected.cells(), sel.names.len());
    let k = opts.n_components.min(g).min(n.saturating_sub(1));
    if k == 0 {
        return Err(Error::invalid(format!(
            "a PCA of {n} cells and {g} genes has no component"
        )));
    }
    let mut mean = vec![0f64; g];
    for (&j, &v) in collected.col.iter().zip(&collected.val) {
        mean[j as usize] += v as f64;
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let z = Scaled {
        s: collected,
        mean,
        inv_std: sel.std.iter().map(|s| 1.0 / s).collect(),
        threads: opts.threads.max(1),
    };
    let l = (2 * k).max(k + 10).min(g).min(n);
    let mut rng = Rng::new(opts.seed ^ 0x5043_415F_4241_5345);
    let mut q: Vec<f64> = (0..g * l).map(|_| rng.normal()).collect();
    orthonormalize(&mut q, l);
    for it in 0..opts.iterations {
        progress(it, opts.iterations)?;
        let mut y = z.times(&q, l);
        orthonormalize(&mut y, l);
        q = z.t_times(&y, l);
        orthonormalize(&mut q, l);
    }
    progress(opts.iterations, opts.iterations)?;
    // Rayleigh–Ritz: P = orth(Z Q); B = Pᵀ Z (l × g) from Zᵀ P; B Bᵀ = U Σ² Uᵀ.
    let mut p = z.times(&q, l);
    orthonormalize(&mut p, l);
    let bt = z.t_times(&p, l); // g × l, = Bᵀ
    let mut bbt = vec![0f64; l * l];
    for j in 0..g {
        let row = &bt[j * l..(j + 1) * l];
        for a in 0..l {
            for b in 0..l {
                bbt[a * l + b] += row[a] * row[b];
            }
        }
    }
    let (vals, vecs) = jacobi_eigen(&mut bbt, l);
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let order = &order[..k];
    let total = z.total_variance();
    let mut components = vec![0f64; k * g];
    let mut variance = Vec::with_capacity(k);
    for (c, &o) in order.iter().enumerate() {
        let sigma = vals[o].max(0.0).sqrt();
        // v = Bᵀ u / σ
        let comp = &mut components[c * g..(c + 1) * g];
        for j in 0..g {
            comp[j] = (0..l).map(|a| bt[j * l + a] * vecs[a * l + o]).sum::<f64>()
                / sigma.max(f64::MIN_POSITIVE);
        }
        let big = comp
            .iter()
            .copied()
            .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            comp.iter_mut().for_each(|x| *x = -*x);
        }
        variance.push(vals[o].max(0.0) / (n as f64 - 1.0));
    }
    // scores = Z V (n × k)
    let vt: Vec<f64> = (0..g * k)
        .map(|i| components[(i % k) * g + i / k])
        .collect();
    let scores64 = z.times(&vt, k);
    Ok(Pca {
        scores: scores64.iter().map(|&x| x as f32).collect(),
        variance_ratio: variance
            .iter()
            .map(|v| v / total.max(f64::MIN_POSITIVE))
            .collect(),
        components,
        variance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded cells with three programmes of genes over 60 genes.
    fn cells(n: usize, seed: u64) -> Vec<(Vec<String>, Vec<f32>)> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|i| {
                let kind = i % 3;
                let mut genes = Vec::new();
                let mut counts = Vec::new();
                for g in 0..60usize {
                    let rate =
                        if g / 20 == kind { 6.0 } else { 0.6 } * (1.0 + (g % 7) as f64 / 3.0);
                    let c = (rate * rng.uniform() * 2.0).floor();
                    if c > 0.0 {
                        genes.push(format!("G{g:02}"));
                        counts.push(c as f32);
                    }
                }
                (genes, counts)
            })
            .collect()
    }

    fn run(
        cells: &[(Vec<String>, Vec<f32>)],
        opts: &PcaOptions,
    ) -> (Selection, Pca, Vec<Vec<f64>>) {
        let mut scan = GeneScan::new();
        fn as_opts(c: &(Vec<String>, Vec<f32>)) -> (Vec<Option<&str>>, Vec<Option<f32>>) {
            (
                c.0.iter().map(|g| Some(g.as_str())).collect(),
                c.1.iter().map(|&x| Some(x)).collect(),
            )
        }
        for c in cells {
            let (g, x) = as_opts(c);
            scan.add_cell(&g, &x).unwrap();
        }
        let sel = scan.select(opts.n_top_genes).unwrap();
        let mut col = Collect::new(&sel, opts.max_value);
        for c in cells {
            let (g, x) = as_opts(c);
            col.add_cell(&g, &x).unwrap();
        }
        let pca = fit(&col, opts, &mut |_, _| Ok(())).unwrap();
        // the dense scaled matrix, for the oracle
        let gsel = sel.names.len();
        let mut dense = vec![vec![0f64; gsel]; cells.len()];
        for (i, row) in dense.iter_mut().enumerate() {
            for j in 0..gsel {
                row[j] = col.floor[j];
            }
            for p in col.start[i]..col.start[i + 1] {
                row[col.col[p] as usize] += col.val[p] as f64;
            }
        }
        let sel2 = sel.clone();
        (sel2, pca, dense)
    }

    #[test]
    fn matches_a_dense_eigendecomposition() {
        let data = cells(150, 11);
        let opts = PcaOptions {
            n_top_genes: 40,
            n_components: 5,
            max_value: 2.0, // low enough that clipping happens
            // iterated to convergence: the default 12 leave a component's variance
            // ~1e-6 from the oracle's, and the oracle comparison is about correctness
            iterations: 40,
            threads: 2,
            ..Default::default()
        };
        let (sel, pca, dense) = run(&data, &opts);
        let (n, g) = (dense.len(), sel.names.len());
        assert_eq!(g, 40);
        // scale, clip, centre densely
        let mut z = vec![vec![0f64; g]; n];
        for j in 0..g {
            for i in 0..n {
                let v = ((dense[i][j] - sel.mean[j]) / sel.std[j]).clamp(-2.0, 2.0);
                z[i][j] = v;
            }
            let m = z.iter().map(|r| r[j]).sum::<f64>() / n as f64;
            z.iter_mut().for_each(|r| r[j] -= m);
        }
        let mut cov = vec![0f64; g * g];
        for r in &z {
            for a in 0..g {
                for b in 0..g {
                    cov[a * g + b] += r[a] * r[b] / (n as f64 - 1.0);
                }
            }
        }
        let total: f64 = (0..g).map(|a| cov[a * g + a]).sum();
        let (vals, vecs) = jacobi_eigen(&mut cov, g);
        let mut order: Vec<usize> = (0..g).collect();
        order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
        for c in 0..5 {
            let o = order[c];
            let rel = (pca.variance[c] - vals[o]).abs() / vals[o];
            assert!(
                rel < 1e-6,
                "component {c}: variance {} vs {}",
                pca.variance[c],
                vals[o]
            );
            assert!((pca.variance_ratio[c] - vals[o] / total).abs() < 1e-6);
            let dot: f64 = (0..g)
                .map(|j| pca.components[c * g + j] * vecs[j * g + o])
                .sum();
            assert!(
                (dot.abs() - 1.0).abs() < 1e-5,
                "component {c}: |cos| {}",
                dot.abs()
            );
            // scores are Z v
            for i in [0, 77, 149] {
                let s: f64 = (0..g).map(|j| z[i][j] * pca.components[c * g + j]).sum();
                assert!((s - pca.scores[i * 5 + c] as f64).abs() < 1e-4 * (1.0 + s.abs()));
            }
        }
    }

    #[test]
    fn deterministic_for_any_thread_count_and_signs_fixed() {
        let data = cells(90, 3);
        let mk = |threads| PcaOptions {
            n_top_genes: 30,
            n_components: 4,
            threads,
            ..Default::default()
        };
        let (_, a, _) = run(&data, &mk(1));
        let (_, b, _) = run(&data, &mk(3));
        assert_eq!(a.scores, b.scores);
        for c in 0..4 {
            let comp = &a.components[c * 30..(c + 1) * 30];
            let big = comp
                .iter()
                .copied()
                .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            assert!(big > 0.0);
        }
        // the three kinds of cell separate on the first two components
        let centre = |k: usize| {
            let rows: Vec<usize> = (0..90).filter(|i| i % 3 == k).collect();
            [0, 1]
                .map(|c| rows.iter().map(|&i| a.scores[i * 4 + c]).sum::<f32>() / rows.len() as f32)
        };
        let (c0, c1, c2) = (centre(0), centre(1), centre(2));
        let d = |x: [f32; 2], y: [f32; 2]| ((x[0] - y[0]).powi(2) + (x[1] - y[1]).powi(2)).sqrt();
        assert!(d(c0, c1) > 3.0 && d(c1, c2) > 3.0 && d(c0, c2) > 3.0);
    }

    #[test]
    fn bad_options_and_inputs() {
        assert!(PcaOptions {
            n_components: 0,
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(PcaOptions {
            max_value: f64::NAN,
            ..Default::default()
        }
        .check()
        .is_err());
        let mut scan = GeneScan::new();
        scan.add_cell(&[Some("A")], &[Some(1.0)]).unwrap();
        assert!(scan
            .select(10)
            .unwrap_err()
            .to_string()
            .contains("at least 2 cells"));
        assert!(scan
            .add_cell(&[Some("A"), Some("B")], &[Some(1.0)])
            .is_err());
        assert!(scan.add_cell(&[Some("A")], &[Some(-1.0)]).is_err());
    }
}
