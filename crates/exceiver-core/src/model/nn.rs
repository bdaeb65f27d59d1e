//! Small per-row building blocks shared by the fast forward pass: LayerNorm, linear
//! maps on short rows, the cross-attention MLP and the output heads. Widths here
//! are d (4 in the published model) or the class count, so plain loops suffice.

// Index loops over the few entries of a row are the clearest form here.
#![allow(clippy::needless_range_loop)]

use super::weights::{CrossAttnParams, HeadParams, LayerNorm, Linear};

/// LayerNorm epsilon of every norm in the reference (PyTorch default).
pub const LN_EPS: f32 = 1e-5;

/// Exact-erf GELU for the small layers (f64 erf, rounded once).
#[inline]
pub fn gelu_exact(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// `out = LN(x)` for one row.
#[inline]
pub fn layer_norm(ln: &LayerNorm, x: &[f32], out: &mut [f32]) {
    let d = x.len();
    let mean = x.iter().sum::<f32>() / d as f32;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
    let inv = 1.0 / (var + LN_EPS).sqrt();
    for c in 0..d {
        out[c] = (x[c] - mean) * inv * ln.weight[c] + ln.bias[c];
    }
}

/// In-place LayerNorm of one row.
#[inline]
pub fn layer_norm_inplace(ln: &LayerNorm, x: &mut [f32]) {
    let d = x.len();
    let mean = x.iter().sum::<f32>() / d as f32;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
    let inv = 1.0 / (var + LN_EPS).sqrt();
    for c in 0..d {
        x[c] = (x[c] - mean) * inv * ln.weight[c] + ln.bias[c];
    }
}

/// `out = W x + b` for one row (W is `[out, in]`).
#[inline]
pub fn linear(l: &Linear, x: &[f32], out: &mut [f32]) {
    for r in 0..l.out_dim {
        let w = &l.weight[r * l.in_dim..(r + 1) * l.in_dim];
        let mut s = l.bias[r];
        for c in 0..l.in_dim {
            s += w[c] * x[c];
        }
        out[r] = s;
    }
}

/// `out = W x + b` with W and b given as rows `rows` of a packed matrix.
#[inline]
pub fn linear_rows(w: &[f32], b: &[f32], d_in: usize, x: &[f32], out: &mut [f32]) {
    for r in 0..out.len() {
        let wr = &w[r * d_in..(r + 1) * d_in];
        let mut s = b[r];
        for c in 0..d_in {
            s += wr[c] * x[c];
        }
        out[r] = s;
    }
}

/// The `CrossAttn` MLP with residual, in place on one row:
/// `x += L4(LN3(GELU(L1(LN0(x)))))`. `tmp` needs 2·d floats.
#[inline]
pub fn cross_mlp(p: &CrossAttnParams, x: &mut [f32], tmp: &mut [f32]) {
    let d = x.len();
    let (t0, t1) = tmp[..2 * d].split_at_mut(d);
    layer_norm(&p.mlp_norm0, x, t0);
    linear(&p.mlp_linear1, t0, t1);
    for v in t1.iter_mut() {
        *v = gelu_exact(*v);
    }
    layer_norm_inplace(&p.mlp_norm3, t1);
    linear(&p.mlp_linear4, t1, t0);
    for c in 0..d {
        x[c] += t0[c];
    }
}

/// An output head `L2(GELU(L1(LN(x))))` on one row; `out` gets `linear2.out_dim`
/// values, `tmp` needs d + linear1.out_dim floats.
#[inline]
pub fn head(p: &HeadParams, x: &[f32], out: &mut [f32], tmp: &mut [f32]) {
    let d = x.len();
    let (t0, t1) = tmp[..d + p.linear1.out_dim].split_at_mut(d);
    layer_norm(&p.norm, x, t0);
    linear(&p.linear1, t0, t1);
    for v in t1.iter_mut() {
        *v = gelu_exact(*v);
    }
    linear(&p.linear2, t1, out);
}
