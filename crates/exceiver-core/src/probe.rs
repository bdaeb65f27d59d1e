//! Linear probe: multinomial logistic regression on embeddings, the field's simplest
//! strong baseline for cell-type and condition labels (logistic regression on PCA) and
//! the standard way to read how much a label is linearly present in an embedding.
//!
//! The model and objective are scikit-learn's `LogisticRegression(C=C)` (multinomial,
//! L2 on the weights, none on the intercepts), optionally after `StandardScaler` fitted
//! on the training cells: minimise `(1/n) Σ −log p(yᵢ | xᵢ) + ‖W‖² / (2 C n)` (with two
//! classes, scikit-learn's single weight vector: the penalty doubled) by L-BFGS
//! (10 corrections, backtracking Armijo line search) until the largest gradient entry
//! is below `tol` or `max_iter` iterations. The objective is strictly convex, so the
//! optimum is scikit-learn's (checked against it in `tests/probe_sklearn.rs`).

use crate::error::{Error, Result};

/// Options of [`fit`]; the defaults are scikit-learn's `C` with a tighter tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOptions {
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub c: f64,
    pub max_iter: usize,
    /// Stop when every gradient entry is below this.
    pub tol: f64,
    /// Z-score the features with the training cells' mean and standard deviation.
    pub standardize: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            c: 1.0,
            max_iter: 1000,
            tol: 1e-6,
            standardize: true,
        }
    }
}

impl ProbeOptions {
    pub fn check(&self) -> Result<()> {
        if !(self.c > 0.0 && self.c.is_finite()) {
            return Err(Error::invalid(format!("C = {} must be positive", self.c)));
        }
        if !(1..=100_000).contains(&self.max_iter) {
            return Err(Error::invalid(format!(
                "max_iter = {} is out of range 1..100000",
                self.max_iter
            )));
        }
        if !(self.tol > 0.0) {
            return Err(Error::invalid(format!(
                "tol = {} must be positive",
                self.tol
            )));
        }
        Ok(())
    }
}

/// A fitted probe.
#[derive(Debug, Clone)]
pub struct Logistic {
    pub dim: usize,
    pub classes: usize,
    mean: Vec<f64>,
    inv_scale: Vec<f64>,
    /// `classes × dim`, row-major, on the standardised features.
    pub weights: Vec<f64>,
    pub intercepts: Vec<f64>,
    pub iterations: usize,
    pub converged: bool,
}

impl Logistic {
    /// Class probabilities of one cell.
    pub fn proba(&self, x: &[f32]) -> Vec<f64> {
        let z: Vec<f64> = x
            .iter()
            .zip(self.mean.iter().zip(&self.inv_scale))
            .map(|(&v, (m, s))| (v as f64 - m) * s)
            .collect();
        let mut logits: Vec<f64> = (0..self.classes)
            .map(|k| {
                self.intercepts[k]
                    + self.weights[k * self.dim..(k + 1) * self.dim]
                        .iter()
                        .zip(&z)
                        .map(|(w, v)| w * v)
                        .sum::<f64>()
            })
            .collect();
        softmax(&mut logits);
        logits
    }
}

/// Softmax in place (shifted by the maximum).
pub fn softmax(v: &mut [f64]) {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        s += *x;
    }
    v.iter_mut().for_each(|x| *x /= s);
}

/// Objective and gradient at `theta` (`classes × (dim + 1)`: weights then intercepts).
struct Problem<'a> {
    z: &'a [f64],
    y: &'a [u32],
    dim: usize,
    classes: usize,
    l2: f64,
}

impl Problem<'_> {
    fn eval(&self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let (d, k) = (self.dim, self.classes);
        let n = self.y.len();
        let (w, b) = theta.split_at(k * d);
        grad.iter_mut().for_each(|g| *g = 0.0);
        let mut loss = 0.0;
        let mut p = vec![0f64; k];
        for (row, &yi) in self.z.chunks_exact(d).zip(self.y) {
            for c in 0..k {
                p[c] = b[c]
                    + w[c * d..(c + 1) * d]
                        .iter()
                        .zip(row)
                        .map(|(a, x)| a * x)
                        .sum::<f64>();
            }
            let m = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + p.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            loss += lse - p[yi as usize];
            for c in 0..k {
                let r = (p[c] - lse).exp() - f64::from(c as u32 == yi);
                let g = &mut grad[c * d..(c + 1) * d];
                g.iter_mut().zip(row).for_each(|(gv, x)| *gv += r * x);
                grad[k * d + c] += r;
            }
        }
        let inv_n = 1.0 / n as f64;
        grad.iter_mut().for_each(|g| *g *= inv_n);
        let mut reg = 0.0;
        for (g, wv) in grad[..k * d].iter_mut().zip(w) {
            *g += self.l2 * wv;
            reg += wv * wv;
        }
        loss * inv_n + 0.5 * self.l2 * reg
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// L-BFGS with backtracking; returns the iterations taken and whether it converged.
fn lbfgs(p: &Problem<'_>, theta: &mut [f64], max_iter: usize, tol: f64) -> (usize, bool) {
    const M: usize = 10;
    let nv = theta.len();
    let mut g = vec![0f64; nv];
    let mut f = p.eval(theta, &mut g);
    let (mut s_hist, mut y_hist): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
    let mut new_g = vec![0f64; nv];
    let mut trial = vec![0f64; nv];
    for it in 0..max_iter {
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < tol {
            return (it, true);
        }
        // two-loop recursion: direction = −H g
        let mut q = g.clone();
        let mut alpha = vec![0f64; s_hist.len()];
        for i in (0..s_hist.len()).rev() {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            alpha[i] = rho * dot(&s_hist[i], &q);
            q.iter_mut()
                .zip(&y_hist[i])
                .for_each(|(qv, yv)| *qv -= alpha[i] * yv);
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for i in 0..s_hist.len() {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            let beta = rho * dot(&y_hist[i], &q);
            q.iter_mut()
                .zip(&s_hist[i])
                .for_each(|(qv, sv)| *qv += (alpha[i] - beta) * sv);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&dir, &g);
        if slope >= 0.0 {
            // not a descent direction: restart from steepest descent
            s_hist.clear();
            y_hist.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = dot(&dir, &g);
        }
        let mut step = if s_hist.is_empty() {
            1.0 / g.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0)
        } else {
            1.0
        };
        let mut accepted = false;
        for _ in 0..60 {
            trial
                .iter_mut()
                .zip(theta.iter().zip(&dir))
                .for_each(|(t, (x, d))| *t = x + step * d);
            let ft = p.eval(&trial, &mut new_g);
            if ft <= f + 1e-4 * step * slope {
                let s: Vec<f64> = trial.iter().zip(theta.iter()).map(|(a, b)| a - b).collect();
                let y: Vec<f64> = new_g.iter().zip(&g).map(|(a, b)| a - b).collect();
                if dot(&s, &y) > 1e-16 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
                    s_hist.push(s);
                    y_hist.push(y);
                    if s_hist.len() > M {
                        s_hist.remove(0);
                        y_hist.remove(0);
                    }
                }
                theta.copy_from_slice(&trial);
                g.copy_from_slice(&new_g);
                f = ft;
                accepted = true;
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            // no decrease possible at machine precision: at the optimum
            return (it + 1, true);
        }
    }
    let done = g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < tol;
    (max_iter, done)
}

/// Fit a probe to `x` (`n × dim`, row-major) and labels `y` (`0..classes`).
pub fn fit(
    x: &[f32],
    dim: usize,
    y: &[u32],
    classes: usize,
    opts: &ProbeOptions,
) -> Result<Logistic> {
    opts.check()?;
    let n = y.len();
    if dim == 0 || x.len() != n * dim {
        return Err(Error::shape(format!(
            "{} values for {n} cells of {dim} dimensions",
            x.len()
        )));
    }
    if n < 2 || classes < 2 || y.iter().any(|&c| c as usize >= classes) {
        return Err(Error::invalid(format!(
            "a probe needs at least 2 cells and 2 classes ({n} cells, {classes} classes)"
        )));
    }
    let (mut mean, mut inv_scale) = (vec![0f64; dim], vec![1f64; dim]);
    if opts.standardize {
        for row in x.chunks_exact(dim) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut var = vec![0f64; dim];
        for row in x.chunks_exact(dim) {
            for ((v, &xv), m) in var.iter_mut().zip(row).zip(&mean) {
                *v += (xv as f64 - m).powi(2);
            }
        }
        // population variance, as StandardScaler; a constant feature keeps scale 1
        for (s, v) in inv_scale.iter_mut().zip(&var) {
            let sd = (v / n as f64).sqrt();
            *s = if sd > 0.0 { 1.0 / sd } else { 1.0 };
        }
    }
    let z: Vec<f64> = x
        .chunks_exact(dim)
        .flat_map(|row| {
            row.iter()
                .zip(mean.iter().zip(&inv_scale))
                .map(|(&v, (m, s))| (v as f64 - m) * s)
                .collect::<Vec<_>>()
        })
        .collect();
    let p = Problem {
        z: &z,
        y,
        dim,
        classes,
        // with two classes scikit-learn fits one weight vector v = w₁ − w₀ penalised by
        // ‖v‖²/2; the symmetric multinomial optimum has w₁ = −w₀ = v/2, so the same
        // optimum needs twice the penalty
        l2: if classes == 2 { 2.0 } else { 1.0 } / (opts.c * n as f64),
    };
    let mut theta = vec![0f64; classes * (dim + 1)];
    let (iterations, converged) = lbfgs(&p, &mut theta, opts.max_iter, opts.tol);
    let intercepts = theta.split_off(classes * dim);
    Ok(Logistic {
        dim,
        classes,
        mean,
        inv_scale,
        weights: theta,
        intercepts,
        iterations,
        converged,
    })
}

/// How well predicted probabilities match labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbaScores {
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Mean −log p(true label), probabilities clipped at 1e-15 (scikit-learn's
    /// `log_loss`).
    pub log_loss: f64,
    /// Expected calibration error: the cells binned by their top probability into 15
    /// equal-width bins, `Σ |accuracy − mean confidence| · share of cells`.
    pub ece: f64,
}

/// Bins of the calibration error.
pub const ECE_BINS: usize = 15;

/// Scores of probabilities `proba` (`n × classes`) against labels `y`; a label outside
/// `0..classes` (a class the probe never saw) counts as wrong with probability 0.
pub fn score_proba(proba: &[f64], classes: usize, y: &[u32]) -> ProbaScores {
    let n = y.len();
    let mut pred = Vec::with_capacity(n);
    let (mut loss, mut bin_n, mut bin_conf, mut bin_right) =
        (0.0, [0usize; ECE_BINS], [0f64; ECE_BINS], [0f64; ECE_BINS]);
    for (row, &yi) in proba.chunks_exact(classes).zip(y) {
        let (best, conf) =
            row.iter().enumerate().fold(
                (0, f64::NEG_INFINITY),
                |b, (i, &p)| if p > b.1 { (i, p) } else { b },
            );
        pred.push(best as u32);
        let pt = row.get(yi as usize).copied().unwrap_or(0.0);
        loss -= pt.clamp(1e-15, 1.0).ln();
        let b = ((conf * ECE_BINS as f64).ceil() as usize).clamp(1, ECE_BINS) - 1;
        bin_n[b] += 1;
        bin_conf[b] += conf;
        bin_right[b] += f64::from(best as u32 == yi);
    }
    let n_labels = y
        .iter()
        .map(|&v| v as usize + 1)
        .max()
        .unwrap_or(0)
        .max(classes);
    let (accuracy, macro_f1) = crate::metrics::scores::accuracy_f1(y, &pred, n_labels);
    let ece = (0..ECE_BINS)
        .filter(|&b| bin_n[b] > 0)
        .map(|b| (bin_right[b] - bin_conf[b]).abs() / n.max(1) as f64)
        .sum();
    ProbaScores {
        accuracy,
        macro_f1,
        log_loss: loss / n.max(1) as f64,
        ece,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng::Rng;

    fn blobs(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = Rng::new(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = (i % 3) as u32;
            y.push(c);
            for d in 0..4 {
                let centre = if d == c as usize { 2.0 } else { 0.0 };
                x.push((centre + rng.normal()) as f32);
            }
        }
        (x, y)
    }

    #[test]
    fn gradient_is_zero_at_the_optimum_and_predictions_are_good() {
        let (x, y) = blobs(300, 5);
        let m = fit(&x, 4, &y, 3, &ProbeOptions::default()).unwrap();
        assert!(m.converged, "{} iterations", m.iterations);
        let proba: Vec<f64> = x.chunks(4).flat_map(|r| m.proba(r)).collect();
        let s = score_proba(&proba, 3, &y);
        assert!(s.accuracy > 0.8, "{s:?}");
        assert!(s.ece < 0.1 && s.log_loss < 0.6, "{s:?}");
        // probabilities sum to 1
        for row in proba.chunks(3) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn stronger_regularisation_shrinks_the_weights() {
        let (x, y) = blobs(150, 9);
        let norm = |c: f64| {
            let m = fit(
                &x,
                4,
                &y,
                3,
                &ProbeOptions {
                    c,
                    ..Default::default()
                },
            )
            .unwrap();
            m.weights.iter().map(|w| w * w).sum::<f64>()
        };
        assert!(norm(0.01) < norm(1.0));
    }

    #[test]
    fn scores_by_hand_and_bad_inputs() {
        // two cells: right with 0.8, wrong with 0.6 on the other class
        let s = score_proba(&[0.8, 0.2, 0.6, 0.4], 2, &[0, 1]);
        assert_eq!(s.accuracy, 0.5);
        assert!((s.log_loss - (-(0.8f64).ln() - (0.4f64).ln()) / 2.0).abs() < 1e-12);
        // bins: 0.8 right (|1 − 0.8|), 0.6 wrong (|0 − 0.6|), each half the cells
        assert!((s.ece - (0.2 + 0.6) / 2.0).abs() < 1e-12);
        assert!(fit(&[1.0, 2.0], 1, &[0, 0], 1, &ProbeOptions::default()).is_err());
        assert!(fit(&[1.0, 2.0], 1, &[0], 2, &ProbeOptions::default()).is_err());
        assert!(ProbeOptions {
            c: 0.0,
            ..Default::default()
        }
        .check()
        .is_err());
    }
}
