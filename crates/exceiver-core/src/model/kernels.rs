//! The hot loops of the forward pass, written once over the small SIMD layer in
//! [`super::simd`] and compiled three times: for AVX-512, for AVX2 + FMA, and
//! portably; the best copy for the running CPU is picked once at run time.
//!
//! * `exp`: range reduction `x = n·ln2 + r`, a degree-6 polynomial for `e^r` on
//!   |r| ≤ ln2/2 (coefficients fitted here, minimax in relative error), `2^n` by
//!   building the exponent bits. Relative error ≤ 2e-7 on [-87, 88]; inputs are
//!   clamped to that range (below it the result is ~1e-38 instead of 0, which is
//!   harmless in a softmax whose largest term is 1).
//! * `erf`: odd rational `u·P(u²)/Q(u²)` with deg P = 6, deg Q = 5 (coefficients
//!   fitted here by Lawson-weighted linear least squares on [0, 3.95]); f64 error
//!   2.2e-8, f32 evaluation ≤ 5e-7 absolute. |u| is clamped at 3.95, where
//!   1 − erf < 2e-8.
//! * `gelu` = `0.5·x·(1 + erf(x/√2))`, the exact-erf GELU of PyTorch.

// Index loops over lanes and heads are the clearest form for these kernels.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use super::simd::{vexp, vexp2_neg, vgelu, vgelu_folded, Portable, Simd};
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use std::sync::OnceLock;

/// Query and feed-forward widths are padded to a multiple of this (a multiple of
/// every SIMD width used).
pub const LANES: usize = 16;

/// Constants of the `exp` and `erf` approximations (the fitted f64 coefficients,
/// rounded to f32 by the compiler).
#[allow(clippy::excessive_precision)]
pub(crate) mod consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// 1.5·2^23: adding it rounds to an integer, kept in the low mantissa bits.
    pub const MAGIC: f32 = 12_582_912.0;
    pub const MAGIC_BITS: i32 = 0x4B40_0000;
    pub const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in f32
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const EXP_HI: f32 = 88.0;
    pub const EXP_LO: f32 = -87.0;
    pub const EXP_C2: f32 = 0.499_999_934_513_422;
    pub const EXP_C3: f32 = 0.166_665_206_859_418_05;
    pub const EXP_C4: f32 = 0.041_668_387_432_295_395;
    pub const EXP_C5: f32 = 0.008_368_710_197_827_884;
    pub const EXP_C6: f32 = 0.001_381_461_008_753_812;
    pub const EXP2_C1: f32 = 0.693_147_202_856_040_1;
    pub const EXP2_C2: f32 = 0.240_226_479_134_921_37;
    pub const EXP2_C3: f32 = 0.055_503_324_695_203_075;
    pub const EXP2_C4: f32 = 0.009_618_437_366_746_43;
    pub const EXP2_C5: f32 = 0.001_339_887_494_026_981_2;
    pub const EXP2_C6: f32 = 0.000_153_533_606_972_388_71;
    pub const ERF_CLAMP: f32 = 3.95;
    pub const ERF_P: [f32; 7] = [
        1.128_379_178_693_928_6,
        0.184_216_985_376_012_2,
        0.054_027_584_939_893_39,
        0.003_788_852_990_667_744_6,
        0.000_371_832_062_561_048_2,
        4.496_317_956_408_166e-6,
        -1.212_655_982_271_711_6e-8,
    ];
    pub const ERF_Q: [f32; 6] = [
        1.0,
        0.496_591_566_065_266,
        0.113_410_383_032_815_9,
        0.015_313_383_156_647_598,
        0.001_284_806_699_685_117_5,
        6.133_999_351_966_304e-5,
    ];
}
use consts::*;

fn scalar<F: FnOnce([f32; 8]) -> [f32; 8]>(x: f32, f: F) -> f32 {
    f([x; 8])[0]
}

/// `e^x` in f32 (the portable kernel on one value; relative error ≤ 2e-7 on [-87, 88]).
pub fn exp(x: f32) -> f32 {
    // SAFETY: the portable implementation has no CPU requirements.
    scalar(x, |v| unsafe { vexp::<Portable>(v) })
}

/// Exact-erf GELU in f32 (the portable kernel on one value).
pub fn gelu(x: f32) -> f32 {
    // SAFETY: as above.
    scalar(x, |v| unsafe { vgelu::<Portable>(v) })
}

/// `erf(x)` in f32 by the kernels' rational approximation (absolute error ≤ 5e-7).
pub fn erf(x: f32) -> f32 {
    let u = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let t = u * u;
    let p = ERF_P.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    let q = ERF_Q.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    u * p / q
}

// ---------------------------------------------------------------------------------
// Kernel bodies, generic over the SIMD layer. Callers check the slice lengths (see
// the safe wrappers on `Kernels`); the bodies then stay within them.

/// Elementwise map over a slice, the tail through a padded buffer.
#[inline(always)]
unsafe fn map_slice<S: Simd>(xs: &mut [f32], f: impl Fn(S::V) -> S::V) {
    let w = S::W;
    let n = xs.len() / w * w;
    let p = xs.as_mut_ptr();
    let mut i = 0;
    while i < n {
        S::store(p.add(i), f(S::load(p.add(i))));
        i += w;
    }
    if n < xs.len() {
        let mut t = [0f32; LANES];
        let rest = xs.len() - n;
        t[..rest].copy_from_slice(&xs[n..]);
        S::store(t.as_mut_ptr(), f(S::load(t.as_ptr())));
        xs[n..].copy_from_slice(&t[..rest]);
    }
}

/// Keys per f32 block before the partial sums are added into f64 totals.
const BLOCK: usize = 128;

/// Attention sums for head width 1. For every query i < nq (a multiple of LANES):
/// `z[i] += Σ_n exp(q[i]·k[n] − m[i])`, `a[i] += Σ_n exp(q[i]·k[n] − m[i])·v[n]`.
/// With `EXACT`, every term (and product with v) is added straight into f64 sums, so
/// two calls produce the same terms bit for bit and sums exact to ~1e-12: the
/// zero-fill terms of a cell's expressed genes can then be subtracted from the
/// precomputed all-gene sums without cancellation error. Otherwise terms are summed
/// in f32 over blocks of keys and in f64 across blocks.
#[inline(always)]
unsafe fn attn_h1_impl<S: Simd, const EXACT: bool>(
    nq: usize,
    q: *const f32,
    m: *const f32,
    nk: usize,
    k: *const f32,
    v: *const f32,
    z: *mut f64,
    a: *mut f64,
) {
    let mut i0 = 0;
    while i0 < nq {
        let qv = S::load(q.add(i0));
        let nm = S::sub(S::zero(), S::load(m.add(i0)));
        let mut zt = S::acc_zero();
        let mut at = S::acc_zero();
        let mut n0 = 0;
        while n0 < nk {
            let n1 = if EXACT { nk } else { (n0 + BLOCK).min(nk) };
            let mut zb = S::zero();
            let mut ab = S::zero();
            for n in n0..n1 {
                let kn = S::splat(*k.add(n));
                let vn = S::splat(*v.add(n));
                // exp(s) = 2^(s·log2 e) for the shifted logit s = q·k − m ≤ 0, computed
                // exactly-rounded first so that the large parts cancel before scaling.
                let e = vexp2_neg::<S>(S::mul(S::fma(qv, kn, nm), S::splat(LOG2E)));
                if EXACT {
                    zt = S::acc_add(zt, e);
                    at = S::acc_add(at, S::mul(e, vn));
                } else {
                    zb = S::add(zb, e);
                    ab = S::fma(e, vn, ab);
                }
            }
            if !EXACT {
                zt = S::acc_add(zt, zb);
                at = S::acc_add(at, ab);
            }
            n0 = n1;
        }
        S::acc_add_to(z.add(i0), zt);
        S::acc_add_to(a.add(i0), at);
        i0 += S::W;
    }
}

/// Attention sums for any head width `hd`, structure of arrays: `q[j·nq + i]`,
/// `k[j·nk + n]`, `v[j·nk + n]`, `a[j·nq + i]`. `z[i] += Σ_n exp(Σ_j q[j,i]·k[j,n] − m[i])`,
/// `a[j,i] += Σ_n exp(..)·v[j,n]`; `EXACT` as in [`attn_h1_impl`]. `scratch` holds
/// hd vectors of block sums.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attn_gen_impl<S: Simd, const EXACT: bool>(
    hd: usize,
    nq: usize,
    q: *const f32,
    m: *const f32,
    nk: usize,
    k: *const f32,
    v: *const f32,
    z: *mut f64,
    a: *mut f64,
    scratch: *mut f32,
) {
    let w = S::W;
    let mut i0 = 0;
    while i0 < nq {
        let nm = S::sub(S::zero(), S::load(m.add(i0)));
        let mut zt = S::acc_zero();
        let mut n0 = 0;
        while n0 < nk {
            let n1 = if EXACT { nk } else { (n0 + BLOCK).min(nk) };
            let mut zb = S::zero();
            for j in 0..hd {
                S::store(scratch.add(j * w), S::zero());
            }
            for n in n0..n1 {
                let mut s = nm;
                for j in 0..hd {
                    s = S::fma(S::load(q.add(j * nq + i0)), S::splat(*k.add(j * nk + n)), s);
                }
                let e = vexp2_neg::<S>(S::mul(s, S::splat(LOG2E)));
                if EXACT {
                    zt = S::acc_add(zt, e);
                    for j in 0..hd {
                        let t = S::mul(e, S::splat(*v.add(j * nk + n)));
                        // f32 products, summed in f64 straight into `a`
                        let mut tmp = [0f32; LANES];
                        S::store(tmp.as_mut_ptr(), t);
                        for l in 0..w {
                            *a.add(j * nq + i0 + l) += tmp[l] as f64;
                        }
                    }
                } else {
                    zb = S::add(zb, e);
                    for j in 0..hd {
                        let p = scratch.add(j * w);
                        S::store(p, S::fma(e, S::splat(*v.add(j * nk + n)), S::load(p)));
                    }
                }
            }
            if !EXACT {
                zt = S::acc_add(zt, zb);
                for j in 0..hd {
                    let mut acc = S::acc_zero();
                    acc = S::acc_add(acc, S::load(scratch.add(j * w)));
                    S::acc_add_to(a.add(j * nq + i0), acc);
                }
            }
            n0 = n1;
        }
        S::acc_add_to(z.add(i0), zt);
        i0 += w;
    }
}

/// [`attn_gen_impl`] for a head width known at compile time: queries and
/// accumulators live in registers.
#[inline(always)]
unsafe fn attn_hd_impl<S: Simd, const HD: usize, const EXACT: bool>(
    nq: usize,
    q: *const f32,
    m: *const f32,
    nk: usize,
    k: *const f32,
    v: *const f32,
    z: *mut f64,
    a: *mut f64,
) {
    let mut i0 = 0;
    while i0 < nq {
        let mut qv = [S::zero(); HD];
        for j in 0..HD {
            qv[j] = S::load(q.add(j * nq + i0));
        }
        let nm = S::sub(S::zero(), S::load(m.add(i0)));
        let mut zt = S::acc_zero();
        let mut at = [S::acc_zero(); HD];
        let mut n0 = 0;
        while n0 < nk {
            let n1 = if EXACT { nk } else { (n0 + BLOCK).min(nk) };
            let mut zb = S::zero();
            let mut ab = [S::zero(); HD];
            for n in n0..n1 {
                let mut s = nm;
                for j in 0..HD {
                    s = S::fma(qv[j], S::splat(*k.add(j * nk + n)), s);
                }
                let e = vexp2_neg::<S>(S::mul(s, S::splat(LOG2E)));
                if EXACT {
                    zt = S::acc_add(zt, e);
                    for j in 0..HD {
                        at[j] = S::acc_add(at[j], S::mul(e, S::splat(*v.add(j * nk + n))));
                    }
                } else {
                    zb = S::add(zb, e);
                    for j in 0..HD {
                        ab[j] = S::fma(e, S::splat(*v.add(j * nk + n)), ab[j]);
                    }
                }
            }
            if !EXACT {
                zt = S::acc_add(zt, zb);
                for j in 0..HD {
                    at[j] = S::acc_add(at[j], ab[j]);
                }
            }
            n0 = n1;
        }
        S::acc_add_to(z.add(i0), zt);
        for j in 0..HD {
            S::acc_add_to(a.add(j * nq + i0), at[j]);
        }
        i0 += S::W;
    }
}

/// Head width dispatch: registers for widths 1, 2, 4 and 8, memory otherwise.
#[inline(always)]
unsafe fn attn_any_impl<S: Simd, const EXACT: bool>(
    hd: usize,
    nq: usize,
    q: *const f32,
    m: *const f32,
    nk: usize,
    k: *const f32,
    v: *const f32,
    z: *mut f64,
    a: *mut f64,
    scratch: *mut f32,
) {
    match hd {
        1 => attn_h1_impl::<S, EXACT>(nq, q, m, nk, k, v, z, a),
        2 => attn_hd_impl::<S, 2, EXACT>(nq, q, m, nk, k, v, z, a),
        4 => attn_hd_impl::<S, 4, EXACT>(nq, q, m, nk, k, v, z, a),
        8 => attn_hd_impl::<S, 8, EXACT>(nq, q, m, nk, k, v, z, a),
        _ => attn_gen_impl::<S, EXACT>(hd, nq, q, m, nk, k, v, z, a, scratch),
    }
}

/// Largest logit per query: `m[i] = max(m[i], max_n Σ_j q[j·nq + i]·k[j·nk + n])`.
#[inline(always)]
unsafe fn max_hd_impl<S: Simd, const HD: usize>(
    nq: usize,
    q: *const f32,
    nk: usize,
    k: *const f32,
    m: *mut f32,
) {
    let mut i0 = 0;
    while i0 < nq {
        let mut qv = [S::zero(); HD];
        for j in 0..HD {
            qv[j] = S::load(q.add(j * nq + i0));
        }
        let mut mv = S::load(m.add(i0));
        for n in 0..nk {
            let mut s = S::mul(qv[0], S::splat(*k.add(n)));
            for j in 1..HD {
                s = S::fma(qv[j], S::splat(*k.add(j * nk + n)), s);
            }
            mv = S::max(mv, s);
        }
        S::store(m.add(i0), mv);
        i0 += S::W;
    }
}

/// [`max_hd_impl`] for any head width (queries from memory).
#[inline(always)]
unsafe fn max_gen_impl<S: Simd>(
    hd: usize,
    nq: usize,
    q: *const f32,
    nk: usize,
    k: *const f32,
    m: *mut f32,
) {
    let mut i0 = 0;
    while i0 < nq {
        let mut mv = S::load(m.add(i0));
        for n in 0..nk {
            let mut s = S::mul(S::load(q.add(i0)), S::splat(*k.add(n)));
            for j in 1..hd {
                s = S::fma(S::load(q.add(j * nq + i0)), S::splat(*k.add(j * nk + n)), s);
            }
            mv = S::max(mv, s);
        }
        S::store(m.add(i0), mv);
        i0 += S::W;
    }
}

#[inline(always)]
unsafe fn max_any_impl<S: Simd>(
    hd: usize,
    nq: usize,
    q: *const f32,
    nk: usize,
    k: *const f32,
    m: *mut f32,
) {
    match hd {
        1 => max_hd_impl::<S, 1>(nq, q, nk, k, m),
        2 => max_hd_impl::<S, 2>(nq, q, nk, k, m),
        4 => max_hd_impl::<S, 4>(nq, q, nk, k, m),
        8 => max_hd_impl::<S, 8>(nq, q, nk, k, m),
        _ => max_gen_impl::<S>(hd, nq, q, nk, k, m),
    }
}

/// The process layers' feed-forward network for d = 4, fused per latent:
/// `out[r·n + i] = Σ_j w2[r·f + j] · g(b1[j] + Σ_c w1t[c·f + j]·x[c·n + i])` with
/// `g(u) = u·(1 + erf(u))` (no bias b2; latents in structure-of-arrays form; f a
/// multiple of LANES). With w1t = linear1.weightᵀ/√2, b1 = linear1.bias/√2 and
/// w2 = linear2.weight/√2 this is `linear2(GELU(linear1(x)))` without linear2's bias.
/// `G` latents at a time share each weight load.
#[inline(always)]
unsafe fn ffn_d4_impl<S: Simd, const G: usize>(
    n: usize,
    x: *const f32,
    f: usize,
    w1t: *const f32,
    b1: *const f32,
    w2: *const f32,
    out: *mut f32,
) {
    let mut i = 0;
    while i < n {
        let g = G.min(n - i);
        if g == G {
            ffn_d4_group::<S, G>(i, n, x, f, w1t, b1, w2, out);
        } else {
            for ii in i..n {
                ffn_d4_group::<S, 1>(ii, n, x, f, w1t, b1, w2, out);
            }
        }
        i += g;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn ffn_d4_group<S: Simd, const G: usize>(
    i: usize,
    n: usize,
    x: *const f32,
    f: usize,
    w1t: *const f32,
    b1: *const f32,
    w2: *const f32,
    out: *mut f32,
) {
    let mut xs = [[S::zero(); 4]; G];
    for (g, xg) in xs.iter_mut().enumerate() {
        for (c, xc) in xg.iter_mut().enumerate() {
            *xc = S::splat(*x.add(c * n + i + g));
        }
    }
    let mut acc = [[S::zero(); 4]; G];
    let mut j = 0;
    while j < f {
        let b = S::load(b1.add(j));
        let w10 = S::load(w1t.add(j));
        let w11 = S::load(w1t.add(f + j));
        let w12 = S::load(w1t.add(2 * f + j));
        let w13 = S::load(w1t.add(3 * f + j));
        let w20 = S::load(w2.add(j));
        let w21 = S::load(w2.add(f + j));
        let w22 = S::load(w2.add(2 * f + j));
        let w23 = S::load(w2.add(3 * f + j));
        for g in 0..G {
            let h = S::fma(
                xs[g][3],
                w13,
                S::fma(
                    xs[g][2],
                    w12,
                    S::fma(xs[g][1], w11, S::fma(xs[g][0], w10, b)),
                ),
            );
            let y = vgelu_folded::<S>(h);
            acc[g][0] = S::fma(y, w20, acc[g][0]);
            acc[g][1] = S::fma(y, w21, acc[g][1]);
            acc[g][2] = S::fma(y, w22, acc[g][2]);
            acc[g][3] = S::fma(y, w23, acc[g][3]);
        }
        j += S::W;
    }
    for g in 0..G {
        for r in 0..4 {
            *out.add(r * n + i + g) = S::hsum(acc[g][r]);
        }
    }
}

/// The feed-forward network for any width d (layouts as [`ffn_d4_impl`]); `scratch`
/// holds d vectors of accumulators.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn ffn_gen_impl<S: Simd>(
    d: usize,
    n: usize,
    x: *const f32,
    f: usize,
    w1t: *const f32,
    b1: *const f32,
    w2: *const f32,
    out: *mut f32,
    scratch: *mut f32,
) {
    let w = S::W;
    for i in 0..n {
        for r in 0..d {
            S::store(scratch.add(r * w), S::zero());
        }
        let mut j = 0;
        while j < f {
            let mut h = S::load(b1.add(j));
            for c in 0..d {
                h = S::fma(S::splat(*x.add(c * n + i)), S::load(w1t.add(c * f + j)), h);
            }
            let y = vgelu_folded::<S>(h);
            for r in 0..d {
                let p = scratch.add(r * w);
                S::store(p, S::fma(y, S::load(w2.add(r * f + j)), S::load(p)));
            }
            j += w;
        }
        for r in 0..d {
            *out.add(r * n + i) = S::hsum(S::load(scratch.add(r * w)));
        }
    }
}

// ---------------------------------------------------------------------------------
// Compiled copies and dispatch.

macro_rules! kernel_copies {
    ($modname:ident, $simd:ty, $group:literal, [$($feat:literal)?]) => {
        #[allow(clippy::too_many_arguments)]
        mod $modname {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn exp_slice(xs: &mut [f32]) {
                map_slice::<$simd>(xs, |v| vexp::<$simd>(v))
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn gelu_slice(xs: &mut [f32]) {
                map_slice::<$simd>(xs, |v| vgelu::<$simd>(v))
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn attn_h1(nq: usize, q: *const f32, m: *const f32, nk: usize, k: *const f32, v: *const f32, z: *mut f64, a: *mut f64) {
                attn_h1_impl::<$simd, false>(nq, q, m, nk, k, v, z, a)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn attn_h1_exact(nq: usize, q: *const f32, m: *const f32, nk: usize, k: *const f32, v: *const f32, z: *mut f64, a: *mut f64) {
                attn_h1_impl::<$simd, true>(nq, q, m, nk, k, v, z, a)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn attn_gen(
                hd: usize, nq: usize, q: *const f32, m: *const f32, nk: usize, k: *const f32, v: *const f32, z: *mut f64, a: *mut f64, s: *mut f32,
            ) {
                attn_any_impl::<$simd, false>(hd, nq, q, m, nk, k, v, z, a, s)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn attn_gen_exact(
                hd: usize, nq: usize, q: *const f32, m: *const f32, nk: usize, k: *const f32, v: *const f32, z: *mut f64, a: *mut f64, s: *mut f32,
            ) {
                attn_any_impl::<$simd, true>(hd, nq, q, m, nk, k, v, z, a, s)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn max_logits(hd: usize, nq: usize, q: *const f32, nk: usize, k: *const f32, m: *mut f32) {
                max_any_impl::<$simd>(hd, nq, q, nk, k, m)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn ffn_d4(n: usize, x: *const f32, f: usize, w1t: *const f32, b1: *const f32, w2: *const f32, out: *mut f32) {
                ffn_d4_impl::<$simd, $group>(n, x, f, w1t, b1, w2, out)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn ffn_gen(
                d: usize, n: usize, x: *const f32, f: usize, w1t: *const f32, b1: *const f32, w2: *const f32, out: *mut f32, s: *mut f32,
            ) {
                ffn_gen_impl::<$simd>(d, n, x, f, w1t, b1, w2, out, s)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernel_copies!(
    avx512,
    Avx512,
    1,
    ["avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2"]
);
#[cfg(target_arch = "x86_64")]
kernel_copies!(avx2, Avx2, 1, ["avx2,fma"]);
kernel_copies!(portable, Portable, 1, []);

macro_rules! kernels_from {
    ($m:ident) => {
        Kernels {
            name: stringify!($m),
            exp_slice: $m::exp_slice,
            gelu_slice: $m::gelu_slice,
            attn_h1: $m::attn_h1,
            attn_h1_exact: $m::attn_h1_exact,
            attn_gen: $m::attn_gen,
            attn_gen_exact: $m::attn_gen_exact,
            max_logits: $m::max_logits,
            ffn_d4: $m::ffn_d4,
            ffn_gen: $m::ffn_gen,
        }
    };
}

type AttnH1 =
    unsafe fn(usize, *const f32, *const f32, usize, *const f32, *const f32, *mut f64, *mut f64);
type AttnGen = unsafe fn(
    usize,
    usize,
    *const f32,
    *const f32,
    usize,
    *const f32,
    *const f32,
    *mut f64,
    *mut f64,
    *mut f32,
);
type MaxLogits = unsafe fn(usize, usize, *const f32, usize, *const f32, *mut f32);
type FfnD4 = unsafe fn(usize, *const f32, usize, *const f32, *const f32, *const f32, *mut f32);
type FfnGen = unsafe fn(
    usize,
    usize,
    *const f32,
    usize,
    *const f32,
    *const f32,
    *const f32,
    *mut f32,
    *mut f32,
);

/// The kernel set chosen for this CPU.
pub struct Kernels {
    /// "avx512", "avx2" or "portable".
    pub name: &'static str,
    exp_slice: unsafe fn(&mut [f32]),
    gelu_slice: unsafe fn(&mut [f32]),
    attn_h1: AttnH1,
    attn_h1_exact: AttnH1,
    attn_gen: AttnGen,
    attn_gen_exact: AttnGen,
    max_logits: MaxLogits,
    ffn_d4: FfnD4,
    ffn_gen: FfnGen,
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("bmi2")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let force = std::env::var("EXCEIVER_KERNELS").ok();
            let want = |n: &str| force.as_deref().is_none_or(|f| f == n);
            if want("avx512") && has_avx512() {
                return kernels_from!(avx512);
            }
            if want("avx2") && has_avx2() {
                return kernels_from!(avx2);
            }
        }
        kernels_from!(portable)
    }

    /// The kernels for this CPU, chosen once. The environment variable
    /// `EXCEIVER_KERNELS` (`avx512`, `avx2`, `portable`) restricts the choice, for
    /// testing and benchmarking.
    pub fn get() -> &'static Kernels {
        static K: OnceLock<Kernels> = OnceLock::new();
        K.get_or_init(Kernels::detect)
    }

    /// Every kernel set this CPU can run (for tests comparing them).
    pub fn all_available() -> Vec<Kernels> {
        #[allow(unused_mut)]
        let mut v = vec![kernels_from!(portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                v.push(kernels_from!(avx2));
            }
            if has_avx512() {
                v.push(kernels_from!(avx512));
            }
        }
        v
    }

    // Safe wrappers: a `Kernels` only ever holds copies whose CPU features were
    // detected (or the portable copy), and each wrapper checks the slice lengths the
    // kernel body relies on.

    pub fn exp_slice(&self, xs: &mut [f32]) {
        // SAFETY: see above.
        unsafe { (self.exp_slice)(xs) }
    }

    pub fn gelu_slice(&self, xs: &mut [f32]) {
        // SAFETY: see above.
        unsafe { (self.gelu_slice)(xs) }
    }

    /// Head width 1: `z[i] += Σ_n e^{q_i k_n − m_i}`, `a[i] += Σ_n e^{q_i k_n − m_i} v_n`
    /// for i < q.len(), which must be a multiple of [`LANES`].
    pub fn attn_h1(
        &self,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
    ) {
        self.attn_h1_any(false, q, m, k, v, z, a)
    }

    /// [`Kernels::attn_h1`] with every term added straight into f64 sums
    /// (reproducible term by term; used for the zero-fill sums).
    pub fn attn_h1_exact(
        &self,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
    ) {
        self.attn_h1_any(true, q, m, k, v, z, a)
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_h1_any(
        &self,
        exact: bool,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
    ) {
        let nq = q.len();
        assert!(nq.is_multiple_of(LANES) && m.len() >= nq && z.len() >= nq && a.len() >= nq);
        assert!(v.len() >= k.len());
        let f = if exact {
            self.attn_h1_exact
        } else {
            self.attn_h1
        };
        // SAFETY: see above.
        unsafe {
            f(
                nq,
                q.as_ptr(),
                m.as_ptr(),
                k.len(),
                k.as_ptr(),
                v.as_ptr(),
                z.as_mut_ptr(),
                a.as_mut_ptr(),
            )
        }
    }

    /// Any head width, structure of arrays: `q[j·nq + i]`, `k[j·nk + n]`,
    /// `v[j·nk + n]`, `a[j·nq + i]` with nq = m.len() (a multiple of [`LANES`]) and
    /// nk = k.len() / hd. `scratch` needs hd·LANES floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_gen(
        &self,
        hd: usize,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
        scratch: &mut [f32],
    ) {
        self.attn_gen_any(false, hd, q, m, k, v, z, a, scratch)
    }

    /// [`Kernels::attn_gen`] with every term added straight into f64 sums.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_gen_exact(
        &self,
        hd: usize,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
        scratch: &mut [f32],
    ) {
        self.attn_gen_any(true, hd, q, m, k, v, z, a, scratch)
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_gen_any(
        &self,
        exact: bool,
        hd: usize,
        q: &[f32],
        m: &[f32],
        k: &[f32],
        v: &[f32],
        z: &mut [f64],
        a: &mut [f64],
        scratch: &mut [f32],
    ) {
        let nq = m.len();
        assert!(
            hd > 0
                && nq.is_multiple_of(LANES)
                && q.len() >= hd * nq
                && z.len() >= nq
                && a.len() >= hd * nq
        );
        assert!(k.len().is_multiple_of(hd) && v.len() >= k.len() && scratch.len() >= hd * LANES);
        let nk = k.len() / hd;
        let f = if exact {
            self.attn_gen_exact
        } else {
            self.attn_gen
        };
        // SAFETY: see above.
        unsafe {
            f(
                hd,
                nq,
                q.as_ptr(),
                m.as_ptr(),
                nk,
                k.as_ptr(),
                v.as_ptr(),
                z.as_mut_ptr(),
                a.as_mut_ptr(),
                scratch.as_mut_ptr(),
            )
        }
    }

    /// Largest logit per query, structure of arrays as [`Kernels::attn_gen`]:
    /// `m[i] = max(m[i], max_n Σ_j q[j·nq + i]·k[j·nk + n])`, nq = m.len() (a multiple
    /// of [`LANES`]), nk = k.len() / hd.
    pub fn max_logits(&self, hd: usize, q: &[f32], k: &[f32], m: &mut [f32]) {
        let nq = m.len();
        assert!(
            hd > 0 && nq.is_multiple_of(LANES) && q.len() >= hd * nq && k.len().is_multiple_of(hd)
        );
        let nk = k.len() / hd;
        // SAFETY: see above.
        unsafe { (self.max_logits)(hd, nq, q.as_ptr(), nk, k.as_ptr(), m.as_mut_ptr()) }
    }

    /// Feed-forward for d = 4: x holds n latents as structure of arrays `[c·n + i]`,
    /// w1t and w2 are 4×f, b1 has f entries (f a multiple of [`LANES`]); writes
    /// `out[r·n + i] = Σ_j w2[r·f + j]·g(b1[j] + Σ_c w1t[c·f + j]·x[c·n + i])` with
    /// `g(u) = u·(1 + erf(u))`: pass linear1's weight (transposed) and bias and
    /// linear2's weight each divided by √2 to get `linear2(GELU(linear1(x)))` without
    /// linear2's bias.
    pub fn ffn_d4(&self, x: &[f32], w1t: &[f32], b1: &[f32], w2: &[f32], out: &mut [f32]) {
        let f = b1.len();
        let n = x.len() / 4;
        assert!(
            f.is_multiple_of(LANES)
                && w1t.len() >= 4 * f
                && w2.len() >= 4 * f
                && out.len() >= 4 * n
        );
        // SAFETY: see above.
        unsafe {
            (self.ffn_d4)(
                n,
                x.as_ptr(),
                f,
                w1t.as_ptr(),
                b1.as_ptr(),
                w2.as_ptr(),
                out.as_mut_ptr(),
            )
        }
    }

    /// Feed-forward for any d (layouts and scaling as [`Kernels::ffn_d4`]); `scratch` needs
    /// d·LANES floats.
    #[allow(clippy::too_many_arguments)]
    pub fn ffn_gen(
        &self,
        d: usize,
        x: &[f32],
        w1t: &[f32],
        b1: &[f32],
        w2: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let f = b1.len();
        assert!(d > 0);
        let n = x.len() / d;
        assert!(
            f.is_multiple_of(LANES)
                && w1t.len() >= d * f
                && w2.len() >= d * f
                && out.len() >= d * n
        );
        assert!(scratch.len() >= d * LANES);
        // SAFETY: see above.
        unsafe {
            (self.ffn_gen)(
                d,
                n,
                x.as_ptr(),
                f,
                w1t.as_ptr(),
                b1.as_ptr(),
                w2.as_ptr(),
                out.as_mut_ptr(),
                scratch.as_mut_ptr(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_accuracy() {
        for k in Kernels::all_available() {
            let n = 2_000_001;
            let mut xs: Vec<f32> = (0..n)
                .map(|i| -87.0 + 175.0 * i as f32 / (n - 1) as f32)
                .collect();
            let orig = xs.clone();
            k.exp_slice(&mut xs);
            let mut worst = 0f64;
            for (x, y) in orig.iter().zip(&xs) {
                let t = (*x as f64).exp();
                worst = worst.max(((*y as f64) - t).abs() / t);
            }
            assert!(worst < 2.5e-7, "{}: exp max relative error {worst}", k.name);
            let mut s = [-100.0f32, 0.0, 100.0];
            k.exp_slice(&mut s);
            assert!(s[0] < 1e-37 && s[1] == 1.0 && s[2].is_finite());
        }
    }

    #[test]
    fn erf_and_gelu_accuracy() {
        for k in Kernels::all_available() {
            let n = 2_000_001;
            let xs: Vec<f32> = (0..n)
                .map(|i| -6.0 + 12.0 * i as f32 / (n - 1) as f32)
                .collect();
            let mut worst = 0f64;
            for &x in &xs {
                let e = erf(x) as f64;
                worst = worst.max((e - libm::erf(x as f64)).abs());
            }
            assert!(worst < 1e-6, "erf max abs error {worst}");
            let mut g: Vec<f32> = xs.iter().map(|x| x * std::f32::consts::SQRT_2).collect();
            let inp = g.clone();
            k.gelu_slice(&mut g);
            let mut worst_g = 0f64;
            for (x, y) in inp.iter().zip(&g) {
                let x = *x as f64;
                let t = 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
                worst_g = worst_g.max((*y as f64 - t).abs() / x.abs().max(1.0));
            }
            assert!(worst_g < 1e-6, "{}: gelu max error {worst_g}", k.name);
        }
    }
}
