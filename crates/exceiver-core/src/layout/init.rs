//! Step 3: the initial layout, the first two principal components.

#[allow(unused_imports)]
use super::*;

/// Power iterations of the 4-vector block (the top-2 subspace converges like
/// (λ5/λ2)^iterations).
const PCA_ITERATIONS: usize = 40;

pub(super) fn pca_init(points: &[f32], n: usize, dim: usize, seed: u64) -> Vec<[f32; 2]> {
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
pub(crate) fn jacobi_eigen(a: &mut [f64], r: usize) -> (Vec<f64>, Vec<f64>) {
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
