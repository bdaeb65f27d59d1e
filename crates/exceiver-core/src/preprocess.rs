//! The reference preprocessing: one cell's raw counts become model input values.
//!
//! As `fixtures/README.md` ("How the inputs were generated") and the reference's
//! `ExceiverDataset` do, for a gene with count `k` in a cell with library size `T`:
//!
//! 1. `x = f32(k / T · 1e4)`, computed in f64 and rounded once (`normalize_total`);
//! 2. `y = log1p(x)` in f32;
//! 3. `z = (y − mean_g) / scale_g` in f32 with the scaler's f32 mean and scale;
//! 4. value `= min(z, 10) + 1` (the clip is upper-only: values may be negative).
//!
//! A gene with count 0 is not an input of its own: the model gives it the
//! gene's *zero-fill* value `min(−mean_g/scale_g, 10) + 1` ([`Scaler::zero_fill`]).
//!
//! **Library size.** The reference normalised each cell over *all* genes of the data
//! file, including genes outside the model's vocabulary. So [`normalize_cell`] takes
//! the library size as an argument: the SQL layer passes the total of the whole cell
//! (all its counts, before dropping genes the model does not know); `None` means "the
//! sum of the counts given", right when the caller passes the whole cell.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Target library size of the normalisation (`sc.pp.normalize_total(target_sum=1e4)`).
pub const TARGET_SUM: f64 = 1e4;
/// Upper clip of the z-score (`max_value=10` in the reference).
pub const MAX_VALUE: f32 = 10.0;

/// Per-gene standardisation of `log1p(normalised count)`: scikit-learn's
/// `StandardScaler` `mean_` and `scale_`, as f32 (the values the arithmetic uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Scaler {
    /// No standardisation (mean 0, scale 1) for `n_genes` genes.
    pub fn identity(n_genes: usize) -> Scaler {
        Scaler {
            mean: vec![0.0; n_genes],
            scale: vec![1.0; n_genes],
        }
    }

    /// A scaler from f32 means and scales; checks lengths, finiteness and scale > 0.
    pub fn new(mean: Vec<f32>, scale: Vec<f32>) -> Result<Scaler> {
        let s = Scaler { mean, scale };
        s.check()?;
        Ok(s)
    }

    /// Check lengths, finiteness and scale > 0.
    pub fn check(&self) -> Result<()> {
        if self.mean.len() != self.scale.len() {
            return Err(Error::shape(format!(
                "scaler has {} means but {} scales",
                self.mean.len(),
                self.scale.len()
            )));
        }
        if let Some(i) = self.mean.iter().position(|v| !v.is_finite()) {
            return Err(Error::data(format!(
                "scaler mean {} of gene {i} is not finite",
                self.mean[i]
            )));
        }
        if let Some(i) = self.scale.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::data(format!(
                "scaler scale {} of gene {i} is not a positive finite number",
                self.scale[i]
            )));
        }
        Ok(())
    }

    /// Number of genes.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }

    /// Model input value of `y = log1p(x)` for gene `g`: `min((y − mean)/scale, 10) + 1`.
    #[inline]
    pub fn value(&self, g: usize, y: f32) -> f32 {
        let z = (y - self.mean[g]) / self.scale[g];
        z.min(MAX_VALUE) + 1.0
    }

    /// The model input of a zero count, per gene: `min(−mean/scale, 10) + 1`.
    pub fn zero_fill(&self) -> Vec<f32> {
        (0..self.len()).map(|g| self.value(g, 0.0)).collect()
    }

    /// Fit a scaler as `StandardScaler().fit(log1p(X))` does (population variance,
    /// scale 1 where the variance is 0), from cells given as (vocabulary indices,
    /// log1p values) of their non-zero entries. Sums in f64.
    pub fn fit<'a>(
        n_genes: usize,
        cells: impl IntoIterator<Item = (&'a [u32], &'a [f32])>,
    ) -> Result<Scaler> {
        let mut acc = ScalerFit::new(n_genes);
        for (genes, ys) in cells {
            acc.add_cell(genes, ys)?;
        }
        acc.finish()
    }
}

/// A streaming [`Scaler::fit`]: add cells one at a time (e.g. batch by batch from a
/// table), then `finish`. Memory is O(genes), not O(cells).
#[derive(Debug, Clone)]
pub struct ScalerFit {
    s: Vec<f64>,
    s2: Vec<f64>,
    n_cells: usize,
}

impl ScalerFit {
    pub fn new(n_genes: usize) -> ScalerFit {
        ScalerFit {
            s: vec![0.0; n_genes],
            s2: vec![0.0; n_genes],
            n_cells: 0,
        }
    }

    /// Add one cell: vocabulary indices and log1p values of its non-zero entries.
    pub fn add_cell(&mut self, genes: &[u32], ys: &[f32]) -> Result<()> {
        let n_genes = self.s.len();
        if genes.len() != ys.len() {
            return Err(Error::shape(format!(
                "a cell has {} genes but {} values",
                genes.len(),
                ys.len()
            )));
        }
        for (&g, &y) in genes.iter().zip(ys) {
            let g = g as usize;
            if g >= n_genes {
                return Err(Error::invalid(format!(
                    "gene index {g} is out of range for {n_genes} genes"
                )));
            }
            if !y.is_finite() {
                return Err(Error::data(format!("value {y} of gene {g} is not finite")));
            }
            self.s[g] += y as f64;
            self.s2[g] += y as f64 * y as f64;
        }
        self.n_cells += 1;
        Ok(())
    }

    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    pub fn finish(self) -> Result<Scaler> {
        if self.n_cells == 0 {
            return Err(Error::invalid("cannot fit a scaler on zero cells"));
        }
        let n = self.n_cells as f64;
        let mut mean = Vec::with_capacity(self.s.len());
        let mut scale = Vec::with_capacity(self.s.len());
        for g in 0..self.s.len() {
            let m = self.s[g] / n;
            let var = (self.s2[g] / n - m * m).max(0.0);
            mean.push(m as f32);
            scale.push(if var == 0.0 { 1.0 } else { var.sqrt() as f32 });
        }
        Scaler::new(mean, scale)
    }
}

/// `x = f32(count / library_size · 1e4)` (f64 arithmetic, one rounding).
#[inline]
pub fn normalize_count(count: f32, library_size: f64) -> f32 {
    (count as f64 / library_size * TARGET_SUM) as f32
}

/// `log1p` in f32, correctly rounded (computed in f64).
#[inline]
pub fn log1p32(x: f32) -> f32 {
    (x as f64).ln_1p() as f32
}

/// Check counts (finite, not negative) and return their f64 sum.
pub fn library_size(counts: &[f32]) -> Result<f64> {
    let mut total = 0.0f64;
    for (p, &c) in counts.iter().enumerate() {
        check_count(p, None, c)?;
        total += c as f64;
    }
    Ok(total)
}

fn check_count(p: usize, gene: Option<u32>, c: f32) -> Result<()> {
    let at = match gene {
        Some(g) => format!("position {p} (gene index {g})"),
        None => format!("position {p}"),
    };
    if !c.is_finite() {
        return Err(Error::data(format!("count {c} at {at} is not finite")));
    }
    if c < 0.0 {
        return Err(Error::data(format!("count {c} at {at} is negative")));
    }
    Ok(())
}

/// Model inputs of one cell: returns (genes, values) for the entries with a non-zero
/// count, in the given order. `genes` are vocabulary indices (< scaler.len()),
/// `counts` raw counts (finite, ≥ 0). `library_size`: the cell's total over all its
/// genes (see the module documentation), or `None` for the sum of `counts`.
pub fn normalize_cell(
    genes: &[u32],
    counts: &[f32],
    library_size: Option<f64>,
    scaler: &Scaler,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut out_g = Vec::with_capacity(genes.len());
    let mut out_v = Vec::with_capacity(genes.len());
    normalize_cell_into(genes, counts, library_size, scaler, &mut out_g, &mut out_v)?;
    Ok((out_g, out_v))
}

/// [`normalize_cell`] into caller-owned vectors (cleared first), to reuse memory.
pub fn normalize_cell_into(
    genes: &[u32],
    counts: &[f32],
    library_size: Option<f64>,
    scaler: &Scaler,
    out_genes: &mut Vec<u32>,
    out_values: &mut Vec<f32>,
) -> Result<()> {
    out_genes.clear();
    out_values.clear();
    if genes.len() != counts.len() {
        return Err(Error::shape(format!(
            "a cell has {} genes but {} counts",
            genes.len(),
            counts.len()
        )));
    }
    let n = scaler.len();
    let mut sum = 0.0f64;
    for (p, (&g, &c)) in genes.iter().zip(counts).enumerate() {
        check_count(p, Some(g), c)?;
        if g as usize >= n {
            return Err(Error::invalid(format!(
                "gene index {g} at position {p} is out of range for a vocabulary of {n} genes"
            )));
        }
        sum += c as f64;
    }
    let total = match library_size {
        None => sum,
        Some(t) => {
            if !(t.is_finite() && t >= 0.0) {
                return Err(Error::invalid(format!(
                    "library size {t} is not a non-negative number"
                )));
            }
            if t < sum * (1.0 - 1e-6) {
                return Err(Error::invalid(format!(
                    "library size {t} is smaller than the sum of the cell's counts ({sum})"
                )));
            }
            t
        }
    };
    if genes.is_empty() {
        return Err(Error::data("the cell is empty: it has no genes"));
    }
    if total <= 0.0 || sum <= 0.0 {
        return Err(Error::data("the cell has no counts: every count is zero"));
    }
    for (&g, &c) in genes.iter().zip(counts) {
        if c == 0.0 {
            continue;
        }
        let y = log1p32(normalize_count(c, total));
        out_genes.push(g);
        out_values.push(scaler.value(g as usize, y));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_scaler_values() {
        let s = Scaler::identity(3);
        assert_eq!(s.zero_fill(), vec![1.0; 3]);
        let (g, v) = normalize_cell(&[0, 2, 1], &[1.0, 3.0, 0.0], None, &s).unwrap();
        assert_eq!(g, vec![0, 2]);
        assert!((v[0] - (1.0 + (2500f64).ln_1p() as f32)).abs() < 1e-6);
        // clip at 10
        let s = Scaler::new(vec![0.0; 3], vec![0.1; 3]).unwrap();
        let (_, v) = normalize_cell(&[0], &[5.0], None, &s).unwrap();
        assert_eq!(v[0], 11.0);
    }

    #[test]
    fn bad_counts() {
        let s = Scaler::identity(4);
        let e = normalize_cell(&[0, 1], &[1.0, f32::NAN], None, &s).unwrap_err();
        assert_eq!(e.kind, crate::Kind::Data);
        assert!(
            e.message.contains("position 1") && e.message.contains("NaN"),
            "{}",
            e.message
        );
        let e = normalize_cell(&[0, 1], &[1.0, -2.0], None, &s).unwrap_err();
        assert!(
            e.message.contains("-2") && e.message.contains("negative"),
            "{}",
            e.message
        );
        assert!(normalize_cell(&[0, 1], &[1.0, f32::INFINITY], None, &s).is_err());
        assert!(normalize_cell(&[], &[], None, &s).is_err());
        assert!(normalize_cell(&[0, 1], &[0.0, 0.0], None, &s).is_err());
        assert!(normalize_cell(&[0, 9], &[1.0, 1.0], None, &s).is_err());
        assert!(normalize_cell(&[0, 1], &[1.0], None, &s).is_err());
        assert!(normalize_cell(&[0, 1], &[1.0, 2.0], Some(2.0), &s).is_err());
        assert!(Scaler::new(vec![0.0], vec![0.0]).is_err());
        assert!(Scaler::new(vec![0.0, 1.0], vec![1.0]).is_err());
    }

    #[test]
    fn library_size_argument() {
        let s = Scaler::identity(2);
        let (_, a) = normalize_cell(&[0], &[5.0], Some(10.0), &s).unwrap();
        let (_, b) = normalize_cell(&[0, 1], &[5.0, 5.0], None, &s).unwrap();
        assert_eq!(a[0], b[0]);
    }

    #[test]
    fn fit_matches_population_statistics() {
        let cells: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(vec![0, 1], vec![1.0, 2.0]), (vec![0], vec![3.0])];
        let s = Scaler::fit(3, cells.iter().map(|(g, v)| (&g[..], &v[..]))).unwrap();
        assert_eq!(s.mean, vec![2.0, 1.0, 0.0]);
        assert_eq!(s.scale, vec![1.0, 1.0, 1.0]);
    }

    /// Highly variable genes: an over-dispersed gene beats genes of similar mean with
    /// binomial-like noise; constant genes are never chosen; the normalised dispersion
    /// follows scanpy's "seurat" formula (checked against a direct computation).
    #[test]
    fn hvg_picks_the_overdispersed_gene() {
        let n_cells = 400usize;
        let mut rng = crate::model::rng::Rng::new(3);
        // genes 0..30: each expressed (count 1 of 1000) in a random 20-40 % of cells;
        // gene 30: constant; gene 31: a marker of about the same mean expression,
        // 8 counts in every 27th cell only
        let mut fit = HvgFit::new(32);
        let mut dense = vec![vec![0.0f64; 32]; n_cells];
        for (c, row) in dense.iter_mut().enumerate() {
            let (mut genes, mut ys) = (Vec::new(), Vec::new());
            for g in 0..30u32 {
                if rng.uniform() < 0.2 + 0.2 * g as f64 / 29.0 {
                    genes.push(g);
                    ys.push(log1p32(normalize_count(1.0, 1000.0)));
                }
            }
            genes.push(30);
            ys.push(log1p32(normalize_count(2.0, 1000.0)));
            if c % 27 == 0 {
                genes.push(31);
                ys.push(log1p32(normalize_count(8.0, 1000.0)));
            }
            for (&g, &y) in genes.iter().zip(&ys) {
                row[g as usize] = (y as f64).exp_m1();
            }
            fit.add_cell(&genes, &ys);
        }
        assert_eq!(fit.n_cells(), n_cells);
        let nd = fit.normalized_dispersion();
        assert_eq!(nd[30], None, "a constant gene has no dispersion");
        assert_eq!(fit.select(1), vec![31]);
        assert!(!fit.select(31).contains(&30));
        assert_eq!(fit.select(100).len(), 31);
        // direct computation: mean/variance (ddof 1), log dispersion, 20 bins of log1p(mean)
        let n = n_cells as f64;
        let stats: Vec<(f64, Option<f64>)> = (0..32)
            .map(|g| {
                let m = dense.iter().map(|r| r[g]).sum::<f64>() / n;
                let v = dense.iter().map(|r| (r[g] - m).powi(2)).sum::<f64>() / (n - 1.0);
                (m.ln_1p(), (v > 1e-9).then(|| (v / m).ln()))
            })
            .collect();
        let lo = stats.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
        let hi = stats.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
        let bin = |m: f64| {
            (((m - lo) / ((hi - lo) / 20.0)).ceil() as usize)
                .max(1)
                .min(20)
        };
        for g in 0..32 {
            let Some(d) = stats[g].1 else { continue };
            let peers: Vec<f64> = (0..32)
                .filter(|&h| bin(stats[h].0) == bin(stats[g].0))
                .filter_map(|h| stats[h].1)
                .collect();
            let want = if peers.len() < 2 {
                1.0
            } else {
                let k = peers.len() as f64;
                let mu = peers.iter().sum::<f64>() / k;
                let sd = (peers.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (k - 1.0)).sqrt();
                (d - mu) / sd
            };
            let got = nd[g].unwrap();
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "gene {g}: {got} vs {want}"
            );
        }
        // too few cells: nothing varies
        assert!(HvgFit::new(3).select(3).is_empty());
    }
}

/// Streaming statistics for choosing highly variable genes, as scanpy's
/// `highly_variable_genes(flavor="seurat")` does on log-normalised data: per gene, the
/// mean and (sample) variance of the normalised counts `expm1(y)` over all cells, zeros
/// included. Add cells, then [`HvgFit::select`].
#[derive(Debug, Clone)]
pub struct HvgFit {
    s: Vec<f64>,
    s2: Vec<f64>,
    n_cells: usize,
}

impl HvgFit {
    pub fn new(n_genes: usize) -> HvgFit {
        HvgFit {
            s: vec![0.0; n_genes],
            s2: vec![0.0; n_genes],
            n_cells: 0,
        }
    }

    /// Add one cell: vocabulary indices and log1p values of its non-zero entries
    /// (indices must be in range; the caller checked them, e.g. via [`ScalerFit`]).
    pub fn add_cell(&mut self, genes: &[u32], ys: &[f32]) {
        for (&g, &y) in genes.iter().zip(ys) {
            if let (Some(s), Some(s2)) = (self.s.get_mut(g as usize), self.s2.get_mut(g as usize)) {
                let x = (y as f64).exp_m1();
                *s += x;
                *s2 += x * x;
            }
        }
        self.n_cells += 1;
    }

    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    /// Room for `n_genes` genes (new genes start with no counts in the cells so far).
    pub fn grow(&mut self, n_genes: usize) {
        if n_genes > self.s.len() {
            self.s.resize(n_genes, 0.0);
            self.s2.resize(n_genes, 0.0);
        }
    }

    /// Normalised dispersion of every gene: `log(var / mean)` of the normalised counts,
    /// z-scored within 20 equal-width bins of `log1p(mean)` (a bin with one gene gives
    /// 1.0, as scanpy does). `None` for a gene with zero variance.
    pub fn normalized_dispersion(&self) -> Vec<Option<f64>> {
        let ng = self.s.len();
        let n = self.n_cells as f64;
        if self.n_cells < 2 || ng == 0 {
            return vec![None; ng];
        }
        let mut lmean = vec![0.0f64; ng];
        let mut disp: Vec<Option<f64>> = vec![None; ng];
        for g in 0..ng {
            let m = self.s[g] / n;
            let var = ((self.s2[g] - n * m * m) / (n - 1.0)).max(0.0);
            lmean[g] = m.ln_1p();
            let d = var / m.max(1e-12);
            if d > 0.0 && d.is_finite() {
                disp[g] = Some(d.ln());
            }
        }
        let lo = lmean.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = lmean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        const BINS: usize = 20;
        let width = (hi - lo) / BINS as f64;
        let bin = |m: f64| -> usize {
            if width <= 0.0 {
                0
            } else {
                (((m - lo) / width).ceil() as usize)
                    .saturating_sub(1)
                    .min(BINS - 1)
            }
        };
        let (mut bs, mut bs2, mut bn) = ([0.0f64; BINS], [0.0f64; BINS], [0usize; BINS]);
        for g in 0..ng {
            if let Some(d) = disp[g] {
                let b = bin(lmean[g]);
                bs[b] += d;
                bs2[b] += d * d;
                bn[b] += 1;
            }
        }
        (0..ng)
            .map(|g| {
                let d = disp[g]?;
                let b = bin(lmean[g]);
                if bn[b] < 2 {
                    return Some(1.0);
                }
                let k = bn[b] as f64;
                let mu = bs[b] / k;
                let sd = ((bs2[b] - k * mu * mu) / (k - 1.0)).max(0.0).sqrt();
                Some(if sd > 0.0 { (d - mu) / sd } else { 0.0 })
            })
            .collect()
    }

    /// Indices of the `n_top` genes with the highest normalised dispersion (ties: lower
    /// index first), sorted ascending. Fewer when fewer genes vary.
    pub fn select(&self, n_top: usize) -> Vec<usize> {
        let nd = self.normalized_dispersion();
        let mut order: Vec<(usize, f64)> = nd
            .iter()
            .enumerate()
            .filter_map(|(g, d)| d.map(|d| (g, d)))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut top: Vec<usize> = order.into_iter().take(n_top).map(|(g, _)| g).collect();
        top.sort_unstable();
        top
    }
}
