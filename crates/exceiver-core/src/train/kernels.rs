//! The hot loops of training, written once over the SIMD layer of the forward pass
//! ([`crate::model::simd`]) and compiled for AVX-512, AVX2 + FMA and portably; the copy
//! matching the forward pass's choice ([`Kernels::get`], so `EXCEIVER_KERNELS` applies
//! here too) is used.
//!
//! * Attention, one query at a time with the keys in SIMD lanes (keys/values stored as
//!   structure of arrays `k[j·kpad + n]`, kpad a multiple of [`LANES`], padding finite):
//!   the largest logit, the softmax sums `Z = Σ e^{q·k−m}`, `A = Σ e^{q·k−m}·v` (f32 in
//!   blocks, f64 across blocks), and the backward of `o = A/Z`.
//! * The feed-forward backward of the process layers, fused per latent (the hidden
//!   layer is recomputed, never stored).
//!
//! Head widths 1, 2, 4, 8 and model widths 4, 8, 16 have register-resident copies;
//! other widths run a plain scalar version.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use crate::model::kernels::{Kernels, LANES};
use crate::model::simd::{verf, vexp, Portable, Simd};
#[cfg(target_arch = "x86_64")]
use crate::model::simd::{Avx2, Avx512};
use std::sync::OnceLock;

/// 16 ones then 16 zeros: `TAIL[16 − r..]` loads a mask of r ones.
static TAIL: [f32; 32] = [
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
];

/// Vectors per f32 block before partial sums go into f64.
const BLOCK_VECS: usize = 32;

const TWO_OVER_SQRT_PI: f32 = std::f32::consts::FRAC_2_SQRT_PI;

#[inline(always)]
unsafe fn tail_mask<S: Simd>(rem: usize) -> S::V {
    S::load(TAIL.as_ptr().add(16 - rem))
}

#[inline(always)]
unsafe fn hmax<S: Simd>(v: S::V) -> f32 {
    let mut t = [0f32; LANES];
    S::store(t.as_mut_ptr(), v);
    t[..S::W].iter().cloned().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
unsafe fn acc_sum<S: Simd>(a: S::Acc) -> f64 {
    let mut t = [0f64; LANES];
    S::acc_add_to(t.as_mut_ptr(), a);
    t[..S::W].iter().sum()
}

/// `max_n Σ_j q[j]·k[j·kpad + n]` (−∞ for no keys).
#[inline(always)]
unsafe fn max_dot_impl<S: Simd, const HD: usize>(
    q: *const f32,
    k: *const f32,
    kpad: usize,
    nk: usize,
) -> f32 {
    let w = S::W;
    let mut qv = [S::zero(); HD];
    for j in 0..HD {
        qv[j] = S::splat(*q.add(j));
    }
    let mut mv = S::splat(f32::NEG_INFINITY);
    let mut n = 0;
    while n < nk {
        let mut s = S::mul(qv[0], S::load(k.add(n)));
        for j in 1..HD {
            s = S::fma(qv[j], S::load(k.add(j * kpad + n)), s);
        }
        if n + w > nk {
            // padding lanes → −1e30
            let m1 = S::sub(tail_mask::<S>(nk - n), S::splat(1.0));
            s = S::fma(m1, S::splat(1e30), s);
        }
        mv = S::max(mv, s);
        n += w;
    }
    hmax::<S>(mv)
}

/// Softmax sums relative to the shift m: `out[0] = Σ_n e^{q·k_n − m}`,
/// `out[1 + j] = Σ_n e^{q·k_n − m}·v[j·kpad + n]`.
#[inline(always)]
unsafe fn sums_impl<S: Simd, const HD: usize>(
    q: *const f32,
    m: f32,
    k: *const f32,
    v: *const f32,
    kpad: usize,
    nk: usize,
    out: *mut f64,
) {
    let w = S::W;
    let mut qv = [S::zero(); HD];
    for j in 0..HD {
        qv[j] = S::splat(*q.add(j));
    }
    let nm = S::splat(-m);
    let mut zt = S::acc_zero();
    let mut at = [S::acc_zero(); HD];
    let mut n = 0;
    while n < nk {
        let end = (n + BLOCK_VECS * w).min(nk);
        let mut zb = S::zero();
        let mut ab = [S::zero(); HD];
        while n < end {
            let mut s = nm;
            for j in 0..HD {
                s = S::fma(qv[j], S::load(k.add(j * kpad + n)), s);
            }
            let mut e = vexp::<S>(s);
            if n + w > nk {
                e = S::mul(e, tail_mask::<S>(nk - n));
            }
            zb = S::add(zb, e);
            for j in 0..HD {
                ab[j] = S::fma(e, S::load(v.add(j * kpad + n)), ab[j]);
            }
            n += w;
        }
        zt = S::acc_add(zt, zb);
        for j in 0..HD {
            at[j] = S::acc_add(at[j], ab[j]);
        }
    }
    *out = acc_sum::<S>(zt);
    for j in 0..HD {
        *out.add(1 + j) = acc_sum::<S>(at[j]);
    }
}

/// Backward of attention terms `p_n = wgt·e^{q·k_n − m}` feeding `o = A/Z`: with δ the
/// gradient of o and `dvo = δ·o`: `dv[j,n] += p_n δ_j`, `ds_n = p_n (δ·v_n − dvo)`,
/// `dk[j,n] += ds_n q_j`, and `dq[j] = Σ_n ds_n k[j,n]` is written to `dq`.
#[inline(always)]
unsafe fn bwd_impl<S: Simd, const HD: usize>(
    q: *const f32,
    m: f32,
    wgt: f32,
    delta: *const f32,
    dvo: f32,
    k: *const f32,
    v: *const f32,
    kpad: usize,
    nk: usize,
    dk: *mut f32,
    dv: *mut f32,
    dq: *mut f32,
) {
    let w = S::W;
    let mut qv = [S::zero(); HD];
    let mut dl = [S::zero(); HD];
    for j in 0..HD {
        qv[j] = S::splat(*q.add(j));
        dl[j] = S::splat(*delta.add(j));
    }
    let nm = S::splat(-m);
    let wv = S::splat(wgt);
    let dvov = S::splat(dvo);
    let mut dqa = [S::zero(); HD];
    let mut n = 0;
    while n < nk {
        let mut s = nm;
        for j in 0..HD {
            s = S::fma(qv[j], S::load(k.add(j * kpad + n)), s);
        }
        let mut p = S::mul(vexp::<S>(s), wv);
        if n + w > nk {
            p = S::mul(p, tail_mask::<S>(nk - n));
        }
        let mut dvd = S::sub(S::zero(), dvov);
        for j in 0..HD {
            let vj = S::load(v.add(j * kpad + n));
            dvd = S::fma(dl[j], vj, dvd);
            let pd = dv.add(j * kpad + n);
            S::store(pd, S::fma(p, dl[j], S::load(pd)));
        }
        let ds = S::mul(p, dvd);
        for j in 0..HD {
            let pk = dk.add(j * kpad + n);
            S::store(pk, S::fma(ds, qv[j], S::load(pk)));
            dqa[j] = S::fma(ds, S::load(k.add(j * kpad + n)), dqa[j]);
        }
        n += w;
    }
    for j in 0..HD {
        *dq.add(j) = S::hsum(dqa[j]);
    }
}

/// Fused backward of the feed-forward network (folded weights as in
/// [`Kernels::ffn_d4`]: `u = b1 + w1t·x`, `g(u) = u(1 + erf u)`, `f = w2·g(u)`), for
/// n latents in structure of arrays (`x[c·n + i]`, `dy[r·n + i]`):
/// `gw2[r,j] += dy_r g(u_j)`, `du_j = g'(u_j)·Σ_r w2[r,j] dy_r`, `gb1[j] += du_j`,
/// `gw1t[c,j] += du_j x_c`, `dx[c·n + i] += Σ_j w1t[c,j] du_j`.
#[inline(always)]
unsafe fn ffn_bwd_impl<S: Simd, const D: usize>(
    n: usize,
    x: *const f32,
    dy: *const f32,
    f: usize,
    w1t: *const f32,
    b1: *const f32,
    w2: *const f32,
    gw1t: *mut f32,
    gb1: *mut f32,
    gw2: *mut f32,
    dx: *mut f32,
) {
    let w = S::W;
    let one = S::splat(1.0);
    let c2 = S::splat(TWO_OVER_SQRT_PI);
    for i in 0..n {
        let mut xc = [S::zero(); D];
        let mut dyr = [S::zero(); D];
        for c in 0..D {
            xc[c] = S::splat(*x.add(c * n + i));
            dyr[c] = S::splat(*dy.add(c * n + i));
        }
        let mut dxa = [S::zero(); D];
        let mut j = 0;
        while j < f {
            let mut u = S::load(b1.add(j));
            for c in 0..D {
                u = S::fma(xc[c], S::load(w1t.add(c * f + j)), u);
            }
            let er = verf::<S>(u);
            let g = S::fma(u, er, u);
            let ex = vexp::<S>(S::sub(S::zero(), S::mul(u, u)));
            let gp = S::fma(S::mul(u, c2), ex, S::add(one, er));
            let mut dg = S::zero();
            for r in 0..D {
                dg = S::fma(S::load(w2.add(r * f + j)), dyr[r], dg);
                let p = gw2.add(r * f + j);
                S::store(p, S::fma(dyr[r], g, S::load(p)));
            }
            let du = S::mul(dg, gp);
            let pb = gb1.add(j);
            S::store(pb, S::add(S::load(pb), du));
            for c in 0..D {
                let p = gw1t.add(c * f + j);
                S::store(p, S::fma(du, xc[c], S::load(p)));
                dxa[c] = S::fma(S::load(w1t.add(c * f + j)), du, dxa[c]);
            }
            j += w;
        }
        for c in 0..D {
            *dx.add(c * n + i) += S::hsum(dxa[c]);
        }
    }
}

// ------------------------------------------------------------------ scalar versions
// For widths without a register copy (and as a plain statement of the maths).

unsafe fn max_dot_scalar(hd: usize, q: *const f32, k: *const f32, kpad: usize, nk: usize) -> f32 {
    let mut mx = f32::NEG_INFINITY;
    for n in 0..nk {
        let mut s = 0.0f32;
        for j in 0..hd {
            s += *q.add(j) * *k.add(j * kpad + n);
        }
        mx = mx.max(s);
    }
    mx
}

unsafe fn sums_scalar(
    hd: usize,
    q: *const f32,
    m: f32,
    k: *const f32,
    v: *const f32,
    kpad: usize,
    nk: usize,
    out: *mut f64,
) {
    for j in 0..=hd {
        *out.add(j) = 0.0;
    }
    for n in 0..nk {
        let mut s = -m;
        for j in 0..hd {
            s += *q.add(j) * *k.add(j * kpad + n);
        }
        let e = crate::model::kernels::exp(s) as f64;
        *out += e;
        for j in 0..hd {
            *out.add(1 + j) += e * *v.add(j * kpad + n) as f64;
        }
    }
}

unsafe fn bwd_scalar(
    hd: usize,
    q: *const f32,
    m: f32,
    wgt: f32,
    delta: *const f32,
    dvo: f32,
    k: *const f32,
    v: *const f32,
    kpad: usize,
    nk: usize,
    dk: *mut f32,
    dv: *mut f32,
    dq: *mut f32,
) {
    for j in 0..hd {
        *dq.add(j) = 0.0;
    }
    for n in 0..nk {
        let mut s = -m;
        for j in 0..hd {
            s += *q.add(j) * *k.add(j * kpad + n);
        }
        let p = crate::model::kernels::exp(s) * wgt;
        let mut dvd = -dvo;
        for j in 0..hd {
            dvd += *delta.add(j) * *v.add(j * kpad + n);
            *dv.add(j * kpad + n) += p * *delta.add(j);
        }
        let ds = p * dvd;
        for j in 0..hd {
            *dk.add(j * kpad + n) += ds * *q.add(j);
            *dq.add(j) += ds * *k.add(j * kpad + n);
        }
    }
}

unsafe fn ffn_bwd_scalar(
    d: usize,
    n: usize,
    x: *const f32,
    dy: *const f32,
    f: usize,
    w1t: *const f32,
    b1: *const f32,
    w2: *const f32,
    gw1t: *mut f32,
    gb1: *mut f32,
    gw2: *mut f32,
    dx: *mut f32,
) {
    for i in 0..n {
        for j in 0..f {
            let mut u = *b1.add(j);
            for c in 0..d {
                u += *x.add(c * n + i) * *w1t.add(c * f + j);
            }
            let er = crate::model::kernels::erf(u);
            let g = u + u * er;
            let gp = 1.0 + er + u * TWO_OVER_SQRT_PI * (-u * u).exp();
            let mut dg = 0.0f32;
            for r in 0..d {
                let dyr = *dy.add(r * n + i);
                dg += *w2.add(r * f + j) * dyr;
                *gw2.add(r * f + j) += dyr * g;
            }
            let du = dg * gp;
            *gb1.add(j) += du;
            for c in 0..d {
                *gw1t.add(c * f + j) += du * *x.add(c * n + i);
                *dx.add(c * n + i) += *w1t.add(c * f + j) * du;
            }
        }
    }
}

// ------------------------------------------------------------------ copies

macro_rules! train_copies {
    ($modname:ident, $simd:ty, [$($feat:literal)?]) => {
        mod $modname {
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn max_dot(hd: usize, q: *const f32, k: *const f32, kpad: usize, nk: usize) -> f32 {
                match hd {
                    1 => max_dot_impl::<$simd, 1>(q, k, kpad, nk),
                    2 => max_dot_impl::<$simd, 2>(q, k, kpad, nk),
                    4 => max_dot_impl::<$simd, 4>(q, k, kpad, nk),
                    8 => max_dot_impl::<$simd, 8>(q, k, kpad, nk),
                    _ => max_dot_scalar(hd, q, k, kpad, nk),
                }
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn sums(hd: usize, q: *const f32, m: f32, k: *const f32, v: *const f32, kpad: usize, nk: usize, out: *mut f64) {
                match hd {
                    1 => sums_impl::<$simd, 1>(q, m, k, v, kpad, nk, out),
                    2 => sums_impl::<$simd, 2>(q, m, k, v, kpad, nk, out),
                    4 => sums_impl::<$simd, 4>(q, m, k, v, kpad, nk, out),
                    8 => sums_impl::<$simd, 8>(q, m, k, v, kpad, nk, out),
                    _ => sums_scalar(hd, q, m, k, v, kpad, nk, out),
                }
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn bwd(
                hd: usize, q: *const f32, m: f32, wgt: f32, delta: *const f32, dvo: f32, k: *const f32, v: *const f32,
                kpad: usize, nk: usize, dk: *mut f32, dv: *mut f32, dq: *mut f32,
            ) {
                match hd {
                    1 => bwd_impl::<$simd, 1>(q, m, wgt, delta, dvo, k, v, kpad, nk, dk, dv, dq),
                    2 => bwd_impl::<$simd, 2>(q, m, wgt, delta, dvo, k, v, kpad, nk, dk, dv, dq),
                    4 => bwd_impl::<$simd, 4>(q, m, wgt, delta, dvo, k, v, kpad, nk, dk, dv, dq),
                    8 => bwd_impl::<$simd, 8>(q, m, wgt, delta, dvo, k, v, kpad, nk, dk, dv, dq),
                    _ => bwd_scalar(hd, q, m, wgt, delta, dvo, k, v, kpad, nk, dk, dv, dq),
                }
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn ffn_bwd(
                d: usize, n: usize, x: *const f32, dy: *const f32, f: usize, w1t: *const f32, b1: *const f32,
                w2: *const f32, gw1t: *mut f32, gb1: *mut f32, gw2: *mut f32, dx: *mut f32,
            ) {
                match d {
                    4 => ffn_bwd_impl::<$simd, 4>(n, x, dy, f, w1t, b1, w2, gw1t, gb1, gw2, dx),
                    8 => ffn_bwd_impl::<$simd, 8>(n, x, dy, f, w1t, b1, w2, gw1t, gb1, gw2, dx),
                    16 => ffn_bwd_impl::<$simd, 16>(n, x, dy, f, w1t, b1, w2, gw1t, gb1, gw2, dx),
                    _ => ffn_bwd_scalar(d, n, x, dy, f, w1t, b1, w2, gw1t, gb1, gw2, dx),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
train_copies!(
    avx512,
    Avx512,
    ["avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2"]
);
#[cfg(target_arch = "x86_64")]
train_copies!(avx2, Avx2, ["avx2,fma"]);
train_copies!(portable, Portable, []);

type MaxDot = unsafe fn(usize, *const f32, *const f32, usize, usize) -> f32;
type Sums = unsafe fn(usize, *const f32, f32, *const f32, *const f32, usize, usize, *mut f64);
type Bwd = unsafe fn(
    usize,
    *const f32,
    f32,
    f32,
    *const f32,
    f32,
    *const f32,
    *const f32,
    usize,
    usize,
    *mut f32,
    *mut f32,
    *mut f32,
);
type FfnBwd = unsafe fn(
    usize,
    usize,
    *const f32,
    *const f32,
    usize,
    *const f32,
    *const f32,
    *const f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
);

/// The training kernel set for this CPU (the same instruction set as the forward
/// pass's [`Kernels`]).
pub struct TrainKernels {
    pub name: &'static str,
    max_dot: MaxDot,
    sums: Sums,
    bwd: Bwd,
    ffn_bwd: FfnBwd,
}

macro_rules! from_copy {
    ($m:ident) => {
        TrainKernels {
            name: stringify!($m),
            max_dot: $m::max_dot,
            sums: $m::sums,
            bwd: $m::bwd,
            ffn_bwd: $m::ffn_bwd,
        }
    };
}

impl TrainKernels {
    /// The copy matching [`Kernels::get`] (whose CPU features were detected).
    pub fn get() -> &'static TrainKernels {
        static K: OnceLock<TrainKernels> = OnceLock::new();
        K.get_or_init(|| match Kernels::get().name {
            #[cfg(target_arch = "x86_64")]
            "avx512" => from_copy!(avx512),
            #[cfg(target_arch = "x86_64")]
            "avx2" => from_copy!(avx2),
            _ => from_copy!(portable),
        })
    }

    /// Key arrays: hd rows of `kpad` floats (kpad a multiple of LANES, ≥ nk).
    #[inline]
    fn check_keys(hd: usize, k: &[f32], kpad: usize, nk: usize) {
        assert!(hd > 0 && kpad.is_multiple_of(LANES) && nk <= kpad && k.len() >= hd * kpad);
    }

    /// Largest logit `max_n q·k_n` (−∞ when nk = 0); q has hd entries.
    pub fn max_dot(&self, q: &[f32], k: &[f32], kpad: usize, nk: usize) -> f32 {
        let hd = q.len();
        Self::check_keys(hd, k, kpad, nk);
        // SAFETY: lengths checked; the copy's CPU features were detected.
        unsafe { (self.max_dot)(hd, q.as_ptr(), k.as_ptr(), kpad, nk) }
    }

    /// `(Σ_n e^{q·k_n − m}, Σ_n e^{q·k_n − m} v_n)` into `out` (1 + hd values).
    pub fn sums(
        &self,
        q: &[f32],
        m: f32,
        k: &[f32],
        v: &[f32],
        kpad: usize,
        nk: usize,
        out: &mut [f64],
    ) {
        let hd = q.len();
        Self::check_keys(hd, k, kpad, nk);
        assert!(v.len() >= hd * kpad && out.len() > hd);
        // SAFETY: as above.
        unsafe {
            (self.sums)(
                hd,
                q.as_ptr(),
                m,
                k.as_ptr(),
                v.as_ptr(),
                kpad,
                nk,
                out.as_mut_ptr(),
            )
        }
    }

    /// Backward of the terms `wgt·e^{q·k_n − m}` of an attention output (see
    /// [`bwd_impl`]); accumulates into dk, dv and writes dq (hd values).
    pub fn bwd(
        &self,
        q: &[f32],
        m: f32,
        wgt: f32,
        delta: &[f32],
        dvo: f32,
        k: &[f32],
        v: &[f32],
        kpad: usize,
        nk: usize,
        dk: &mut [f32],
        dv: &mut [f32],
        dq: &mut [f32],
    ) {
        let hd = q.len();
        Self::check_keys(hd, k, kpad, nk);
        assert!(v.len() >= hd * kpad && dk.len() >= hd * kpad && dv.len() >= hd * kpad);
        assert!(delta.len() >= hd && dq.len() >= hd);
        // SAFETY: as above.
        unsafe {
            (self.bwd)(
                hd,
                q.as_ptr(),
                m,
                wgt,
                delta.as_ptr(),
                dvo,
                k.as_ptr(),
                v.as_ptr(),
                kpad,
                nk,
                dk.as_mut_ptr(),
                dv.as_mut_ptr(),
                dq.as_mut_ptr(),
            )
        }
    }

    /// Fused feed-forward backward (see [`ffn_bwd_impl`]); f = b1.len(), a multiple of
    /// LANES; x, dy, dx hold d·n floats.
    #[allow(clippy::too_many_arguments)]
    pub fn ffn_bwd(
        &self,
        d: usize,
        x: &[f32],
        dy: &[f32],
        w1t: &[f32],
        b1: &[f32],
        w2: &[f32],
        gw1t: &mut [f32],
        gb1: &mut [f32],
        gw2: &mut [f32],
        dx: &mut [f32],
    ) {
        let f = b1.len();
        assert!(d > 0 && f.is_multiple_of(LANES));
        let n = x.len() / d;
        assert!(dy.len() >= d * n && dx.len() >= d * n);
        assert!(w1t.len() >= d * f && w2.len() >= d * f);
        assert!(gw1t.len() >= d * f && gw2.len() >= d * f && gb1.len() >= f);
        // SAFETY: as above.
        unsafe {
            (self.ffn_bwd)(
                d,
                n,
                x.as_ptr(),
                dy.as_ptr(),
                f,
                w1t.as_ptr(),
                b1.as_ptr(),
                w2.as_ptr(),
                gw1t.as_mut_ptr(),
                gb1.as_mut_ptr(),
                gw2.as_mut_ptr(),
                dx.as_mut_ptr(),
            )
        }
    }
}
