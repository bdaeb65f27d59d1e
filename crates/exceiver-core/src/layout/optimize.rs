//! Steps 4 and 5: the curve parameters a and b, and the optimisation of the layout.

use super::graph::Graph;
#[allow(unused_imports)]
use super::*;

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
pub(super) fn optimize_layout(
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
