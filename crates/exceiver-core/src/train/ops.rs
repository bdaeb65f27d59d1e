//! Row-wise differentiable building blocks on row-major matrices (`rows × width`):
//! LayerNorm, affine maps, exact-erf GELU, each with its backward. Backward functions
//! accumulate (`+=`) into their gradient outputs so one buffer can collect a batch.

// Index loops over the few entries of a row are the clearest form here.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use crate::model::weights::LayerNorm;

/// LayerNorm epsilon of every norm in the reference (PyTorch default).
pub const LN_EPS: f32 = 1e-5;

/// `out = LN(x)` row by row; keeps x̂ and 1/σ for the backward.
pub fn ln_fwd(
    ln: &LayerNorm,
    x: &[f32],
    d: usize,
    out: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let rows = x.len() / d;
    for r in 0..rows {
        let xr = &x[r * d..(r + 1) * d];
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let rs = 1.0 / (var + LN_EPS).sqrt();
        rstd[r] = rs;
        for c in 0..d {
            let xh = (xr[c] - mean) * rs;
            xhat[r * d + c] = xh;
            out[r * d + c] = xh * ln.weight[c] + ln.bias[c];
        }
    }
}

/// `dx += LN'(dy)` row by row; `gw += Σ dy·x̂`, `gb += Σ dy`.
pub fn ln_bwd(
    w: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    dy: &[f32],
    d: usize,
    dx: &mut [f32],
    gw: &mut [f32],
    gb: &mut [f32],
) {
    let rows = dy.len() / d;
    let inv_d = 1.0 / d as f32;
    let mut dxh = [0.0f32; 64];
    let mut heap;
    let dxh: &mut [f32] = if d <= 64 {
        &mut dxh[..d]
    } else {
        heap = vec![0.0f32; d];
        &mut heap
    };
    for r in 0..rows {
        let xh = &xhat[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for c in 0..d {
            gw[c] += dyr[c] * xh[c];
            gb[c] += dyr[c];
            dxh[c] = dyr[c] * w[c];
            s1 += dxh[c];
            s2 += dxh[c] * xh[c];
        }
        let (m1, m2) = (s1 * inv_d, s2 * inv_d);
        for c in 0..d {
            dx[r * d + c] += rstd[r] * (dxh[c] - m1 - xh[c] * m2);
        }
    }
}

/// `out[r] = W x[r] + b` (W `[o, i]` row-major), rows of width i → o.
pub fn lin_fwd(w: &[f32], b: &[f32], x: &[f32], i: usize, o: usize, out: &mut [f32]) {
    let rows = x.len() / i;
    for r in 0..rows {
        let xr = &x[r * i..(r + 1) * i];
        for k in 0..o {
            let wk = &w[k * i..(k + 1) * i];
            let mut s = b[k];
            for c in 0..i {
                s += wk[c] * xr[c];
            }
            out[r * o + k] = s;
        }
    }
}

/// Backward of [`lin_fwd`]: `gw += Σ_r dy[r] ⊗ x[r]`, `gb += Σ_r dy[r]`, and
/// `dx[r] += Wᵀ dy[r]` when `dx` is given.
pub fn lin_bwd(
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    i: usize,
    o: usize,
    dx: Option<&mut [f32]>,
    gw: &mut [f32],
    gb: &mut [f32],
) {
    let rows = dy.len() / o;
    for r in 0..rows {
        let xr = &x[r * i..(r + 1) * i];
        for k in 0..o {
            let g = dy[r * o + k];
            gb[k] += g;
            let gwk = &mut gw[k * i..(k + 1) * i];
            for c in 0..i {
                gwk[c] += g * xr[c];
            }
        }
    }
    if let Some(dx) = dx {
        for r in 0..rows {
            for k in 0..o {
                let g = dy[r * o + k];
                let wk = &w[k * i..(k + 1) * i];
                let dxr = &mut dx[r * i..(r + 1) * i];
                for c in 0..i {
                    dxr[c] += g * wk[c];
                }
            }
        }
    }
}

/// Exact-erf GELU (f64 erf, rounded once), as the forward pass's small layers.
#[inline]
pub fn gelu(x: f32) -> f32 {
    crate::model::nn::gelu_exact(x)
}

/// `GELU'(x) = Φ(x) + x φ(x)`, in f64.
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() * 0.398_942_280_401_432_7;
    (cdf + x * pdf) as f32
}

/// Row-major `[rows, d]` → structure of arrays `[c·pad + r]` (padding untouched).
pub fn to_soa(x: &[f32], d: usize, pad: usize, out: &mut [f32]) {
    let rows = x.len() / d;
    for r in 0..rows {
        for c in 0..d {
            out[c * pad + r] = x[r * d + c];
        }
    }
}

/// Structure of arrays `[c·pad + r]` → row-major `[rows, d]`, added into `out`.
pub fn add_from_soa(x: &[f32], d: usize, pad: usize, rows: usize, out: &mut [f32]) {
    for r in 0..rows {
        for c in 0..d {
            out[r * d + c] += x[c * pad + r];
        }
    }
}

/// `v[..n]` resized if short, then returned (contents unspecified).
pub fn buf<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// `v[..n]`, zeroed.
pub fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    let s = buf(v, n);
    s.fill(T::default());
    s
}

pub fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}
