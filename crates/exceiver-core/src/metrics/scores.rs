//! The scores themselves, each as scikit-learn (and scib-metrics) define it, on labels
//! given as indices `0..n_labels`.

/// Counts of each (true, predicted) pair: `table[t · n_pred + p]`, with the row sums
/// (true labels) and column sums (predictions).
struct Contingency {
    table: Vec<f64>,
    rows: Vec<f64>,
    cols: Vec<f64>,
    n: f64,
}

impl Contingency {
    fn new(truth: &[u32], pred: &[u32]) -> Contingency {
        let nt = truth.iter().max().map_or(0, |&m| m as usize + 1);
        let np = pred.iter().max().map_or(0, |&m| m as usize + 1);
        let mut table = vec![0f64; nt * np];
        let (mut rows, mut cols) = (vec![0f64; nt], vec![0f64; np]);
        for (&t, &p) in truth.iter().zip(pred) {
            table[t as usize * np + p as usize] += 1.0;
            rows[t as usize] += 1.0;
            cols[p as usize] += 1.0;
        }
        Contingency {
            table,
            rows,
            cols,
            n: truth.len() as f64,
        }
    }
}

/// Entropy (natural log) of a distribution given by counts summing to `n`.
fn entropy(counts: &[f64], n: f64) -> f64 {
    -counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| c / n * (c / n).ln())
        .sum::<f64>()
}

/// Normalised mutual information of two labellings, normalised by the arithmetic mean
/// of their entropies: scikit-learn's `normalized_mutual_info_score` with its default
/// `average_method="arithmetic"` (1 when both are a single class).
pub fn nmi(truth: &[u32], pred: &[u32]) -> f64 {
    let c = Contingency::new(truth, pred);
    // labels that never occur are not classes
    let classes = |v: &[f64]| v.iter().filter(|&&x| x > 0.0).count();
    if classes(&c.rows) == classes(&c.cols) && classes(&c.rows) <= 1 {
        return 1.0;
    }
    let np = c.cols.len();
    let mut mi = 0.0;
    for (t, &a) in c.rows.iter().enumerate() {
        for (p, &b) in c.cols.iter().enumerate() {
            let nij = c.table[t * np + p];
            if nij > 0.0 {
                mi += nij / c.n * (c.n * nij / (a * b)).ln();
            }
        }
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return 0.0;
    }
    let norm = 0.5 * (entropy(&c.rows, c.n) + entropy(&c.cols, c.n));
    mi / norm.max(f64::EPSILON)
}

/// Adjusted Rand index: scikit-learn's `adjusted_rand_score`, from the pair confusion
/// matrix (1 when the two labellings agree on every pair).
pub fn ari(truth: &[u32], pred: &[u32]) -> f64 {
    let c = Contingency::new(truth, pred);
    let n = c.n;
    let sum_squares: f64 = c.table.iter().map(|x| x * x).sum();
    let tp = sum_squares - n;
    let fp = c.cols.iter().map(|x| x * x).sum::<f64>() - sum_squares;
    let fn_ = c.rows.iter().map(|x| x * x).sum::<f64>() - sum_squares;
    let tn = n * n - fp - fn_ - sum_squares;
    if fn_ == 0.0 && fp == 0.0 {
        return 1.0;
    }
    2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn))
}

/// Silhouette of each cell from its summed distances to every cell of each label
/// (`sums[i · n_labels + l]`, itself excluded) and the label sizes: `(b − a) / max(a, b)`
/// with `a` the mean distance to the other cells of its own label and `b` the least mean
/// distance to another label's cells; 0 for a cell alone in its label (scikit-learn's
/// `silhouette_samples`).
pub fn silhouettes(labels: &[u32], sizes: &[usize], sums: &[f64]) -> Vec<f64> {
    let nl = sizes.len();
    labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let l = l as usize;
            if sizes[l] <= 1 {
                return 0.0;
            }
            let row = &sums[i * nl..(i + 1) * nl];
            let a = row[l] / (sizes[l] - 1) as f64;
            let b = (0..nl)
                .filter(|&m| m != l && sizes[m] > 0)
                .map(|m| row[m] / sizes[m] as f64)
                .fold(f64::INFINITY, f64::min);
            let s = (b - a) / a.max(b);
            if s.is_finite() {
                s
            } else {
                0.0
            }
        })
        .collect()
}

/// Accuracy and macro-F1 (over the true labels present) of predicted labels.
pub fn accuracy_f1(truth: &[u32], pred: &[u32], n_labels: usize) -> (f64, f64) {
    let n = truth.len().max(1) as f64;
    let right = truth.iter().zip(pred).filter(|(t, p)| t == p).count() as f64;
    let (mut tp, mut fp, mut fn_) = (
        vec![0f64; n_labels],
        vec![0f64; n_labels],
        vec![0f64; n_labels],
    );
    let mut present = vec![false; n_labels];
    for (&t, &p) in truth.iter().zip(pred) {
        present[t as usize] = true;
        if t == p {
            tp[t as usize] += 1.0;
        } else {
            fp[p as usize] += 1.0;
            fn_[t as usize] += 1.0;
        }
    }
    let f1: Vec<f64> = (0..n_labels)
        .filter(|&l| present[l])
        .map(|l| {
            let d = 2.0 * tp[l] + fp[l] + fn_[l];
            if d == 0.0 {
                0.0
            } else {
                2.0 * tp[l] / d
            }
        })
        .collect();
    (right / n, f1.iter().sum::<f64>() / f1.len().max(1) as f64)
}

/// Fraction of the cells of each label in the largest connected component of the graph
/// restricted to that label's cells, averaged over labels (scIB's graph connectivity).
/// `edges` are undirected `(i, j)` pairs.
pub fn graph_connectivity(labels: &[u32], n_labels: usize, edges: &[(u32, u32)]) -> f64 {
    let n = labels.len();
    let mut parent: Vec<u32> = (0..n as u32).collect();
    fn find(parent: &mut [u32], mut x: u32) -> u32 {
        while parent[x as usize] != x {
            let up = parent[parent[x as usize] as usize];
            parent[x as usize] = up;
            x = up;
        }
        x
    }
    for &(i, j) in edges {
        if labels[i as usize] == labels[j as usize] {
            let (a, b) = (find(&mut parent, i), find(&mut parent, j));
            if a != b {
                parent[a.max(b) as usize] = a.min(b);
            }
        }
    }
    let mut comp = vec![0usize; n];
    let mut size = vec![0usize; n_labels];
    for i in 0..n {
        let r = find(&mut parent, i as u32);
        comp[r as usize] += 1;
        size[labels[i] as usize] += 1;
    }
    let mut largest = vec![0usize; n_labels];
    for i in 0..n {
        if parent[i] == i as u32 {
            let l = labels[i] as usize;
            largest[l] = largest[l].max(comp[i]);
        }
    }
    let present: Vec<usize> = (0..n_labels).filter(|&l| size[l] > 0).collect();
    present
        .iter()
        .map(|&l| largest[l] as f64 / size[l] as f64)
        .sum::<f64>()
        / present.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_and_independence() {
        let a = [0, 0, 1, 1, 2, 2];
        assert_eq!(nmi(&a, &a), 1.0);
        assert_eq!(ari(&a, &a), 1.0);
        // the same partition under other names
        assert!((nmi(&a, &[2, 2, 0, 0, 1, 1]) - 1.0).abs() < 1e-12);
        assert_eq!(ari(&a, &[2, 2, 0, 0, 1, 1]), 1.0);
        // one cluster holding everything says nothing
        assert_eq!(nmi(&a, &[0; 6]), 0.0);
        assert_eq!(ari(&a, &[0; 6]), 0.0);
        // both a single class: 1, as scikit-learn
        assert_eq!(nmi(&[0, 0], &[1, 1]), 1.0);
    }

    #[test]
    fn ari_known_value() {
        // scikit-learn's docstring: adjusted_rand_score([0, 0, 1, 2], [0, 0, 1, 1]) = 0.5714…
        let v = ari(&[0, 0, 1, 2], &[0, 0, 1, 1]);
        assert!((v - 0.571_428_571_428_571_4).abs() < 1e-12, "{v}");
        // and a negative one: adjusted_rand_score([0, 0, 1, 1], [0, 1, 0, 1]) = -0.5
        assert!((ari(&[0, 0, 1, 1], &[0, 1, 0, 1]) + 0.5).abs() < 1e-12);
    }

    #[test]
    fn silhouette_by_hand() {
        // points 0, 1 on a line (label 0) and 10 (label 1); sums of distances to each label
        let labels = [0, 0, 1];
        let sums = [1.0, 10.0, 1.0, 9.0, 19.0, 0.0];
        let s = silhouettes(&labels, &[2, 1], &sums);
        assert!((s[0] - 0.9).abs() < 1e-12 && (s[1] - (8.0 / 9.0)).abs() < 1e-12);
        assert_eq!(s[2], 0.0); // alone in its label
    }

    #[test]
    fn connectivity_counts_components_within_labels() {
        // label 0: 0-1 joined, 2 apart (2/3); label 1: 3-4 joined through label 0's
        // cell 0, which does not count (1/2)
        let labels = [0, 0, 0, 1, 1];
        let edges = [(0, 1), (3, 0), (0, 4)];
        let g = graph_connectivity(&labels, 2, &edges);
        assert!((g - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn accuracy_and_macro_f1() {
        // the workflow golden's toy: 6 of 7 right, F1 6/7 for both labels
        let (acc, f1) = accuracy_f1(&[0, 0, 0, 1, 1, 1, 1], &[0, 0, 0, 1, 1, 1, 0], 2);
        assert!((acc - 6.0 / 7.0).abs() < 1e-12 && (f1 - 6.0 / 7.0).abs() < 1e-12);
    }
}
