//! A minimal SIMD layer for the kernels: one trait, three implementations
//! (AVX-512 `__m512`, AVX2 + FMA `__m256`, and a portable `[f32; 8]`), and the vector
//! forms of `exp`, `erf` and GELU written once on top of it.
//!
//! Every method is `unsafe` and `#[inline(always)]`: the x86 ones may only run on a
//! CPU with the features, which the callers (`#[target_feature]` copies chosen by
//! run-time detection in [`super::kernels`]) guarantee; inlined there they compile
//! to single instructions. Pointer arguments must be valid for `W` lanes.

#![allow(clippy::missing_safety_doc)]

use super::kernels::consts::*;

pub(crate) trait Simd {
    /// Lanes per vector.
    const W: usize;
    type V: Copy;
    /// W lanes of f64 accumulators.
    type Acc: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// a·b + c
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// c − a·b
    unsafe fn fnma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// 1/a to about 1 ulp (hardware estimate refined by one Newton step).
    unsafe fn recip(a: Self::V) -> Self::V;
    /// `2^n` where `t = n + MAGIC` was rounded by adding MAGIC (|n| ≤ 127).
    unsafe fn pow2_from_magic(t: Self::V) -> Self::V;
    /// Round to the nearest integer (ties to even).
    unsafe fn round(a: Self::V) -> Self::V;
    /// `p·2^n` for integral n in [-126, 127].
    unsafe fn scale2(p: Self::V, n: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn acc_zero() -> Self::Acc;
    /// acc += v, lane by lane, in f64.
    unsafe fn acc_add(acc: Self::Acc, v: Self::V) -> Self::Acc;
    /// p[0..W] += acc.
    unsafe fn acc_add_to(p: *mut f64, acc: Self::Acc);
}

/// `e^x`, as [`super::kernels::exp`].
#[inline(always)]
pub(crate) unsafe fn vexp<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::min(x, S::splat(EXP_HI)), S::splat(EXP_LO));
    let t = S::fma(x, S::splat(LOG2E), S::splat(MAGIC));
    let n = S::sub(t, S::splat(MAGIC));
    let r = S::fnma(n, S::splat(LN2_HI), x);
    let r = S::fnma(n, S::splat(LN2_LO), r);
    let mut p = S::splat(EXP_C6);
    p = S::fma(p, r, S::splat(EXP_C5));
    p = S::fma(p, r, S::splat(EXP_C4));
    p = S::fma(p, r, S::splat(EXP_C3));
    p = S::fma(p, r, S::splat(EXP_C2));
    p = S::fma(p, r, S::splat(1.0));
    p = S::fma(p, r, S::splat(1.0));
    S::mul(p, S::pow2_from_magic(t))
}

/// `2^y` for y ≤ 0 (an attention weight relative to the maximum logit, in units of
/// log2 e): degree-6 polynomial for `2^r` on |r| ≤ 1/2 (coefficients fitted here,
/// relative error 2e-9, 1e-7 in f32), times `2^n`. y is clamped at −126, where the
/// result (1e-38) is negligible next to the largest term, 1.
#[inline(always)]
pub(crate) unsafe fn vexp2_neg<S: Simd>(y: S::V) -> S::V {
    let y = S::max(y, S::splat(-126.0));
    let n = S::round(y);
    let r = S::sub(y, n);
    let mut p = S::splat(EXP2_C6);
    p = S::fma(p, r, S::splat(EXP2_C5));
    p = S::fma(p, r, S::splat(EXP2_C4));
    p = S::fma(p, r, S::splat(EXP2_C3));
    p = S::fma(p, r, S::splat(EXP2_C2));
    p = S::fma(p, r, S::splat(EXP2_C1));
    p = S::fma(p, r, S::splat(1.0));
    S::scale2(p, n)
}

/// `u·(1 + erf(u))` = √2·GELU(√2·u): the GELU of the feed-forward kernels, whose
/// callers fold the 1/√2 of the argument and of the result into the weights.
#[inline(always)]
pub(crate) unsafe fn vgelu_folded<S: Simd>(u: S::V) -> S::V {
    S::fma(u, verf::<S>(u), u)
}

/// `erf(u)`: the rational approximation, division by reciprocal + Newton step.
#[inline(always)]
pub(crate) unsafe fn verf<S: Simd>(u: S::V) -> S::V {
    let u = S::max(S::min(u, S::splat(ERF_CLAMP)), S::splat(-ERF_CLAMP));
    let t = S::mul(u, u);
    let mut p = S::splat(ERF_P[6]);
    p = S::fma(p, t, S::splat(ERF_P[5]));
    p = S::fma(p, t, S::splat(ERF_P[4]));
    p = S::fma(p, t, S::splat(ERF_P[3]));
    p = S::fma(p, t, S::splat(ERF_P[2]));
    p = S::fma(p, t, S::splat(ERF_P[1]));
    p = S::fma(p, t, S::splat(ERF_P[0]));
    let mut q = S::splat(ERF_Q[5]);
    q = S::fma(q, t, S::splat(ERF_Q[4]));
    q = S::fma(q, t, S::splat(ERF_Q[3]));
    q = S::fma(q, t, S::splat(ERF_Q[2]));
    q = S::fma(q, t, S::splat(ERF_Q[1]));
    q = S::fma(q, t, S::splat(ERF_Q[0]));
    S::mul(S::mul(u, p), S::recip(q))
}

/// Exact-erf GELU `0.5·x·(1 + erf(x/√2))`, as [`super::kernels::gelu`] but with the
/// division done as reciprocal + Newton step.
#[inline(always)]
pub(crate) unsafe fn vgelu<S: Simd>(x: S::V) -> S::V {
    let e = verf::<S>(S::mul(x, S::splat(std::f32::consts::FRAC_1_SQRT_2)));
    let h = S::mul(x, S::splat(0.5));
    S::fma(h, e, h)
}

// ------------------------------------------------------------------ portable

/// Plain Rust, 8 lanes: LLVM vectorises what it can for the baseline target.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn pfma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c) // NEON has FMA
}
#[cfg(not(target_arch = "aarch64"))]
#[inline(always)]
fn pfma(a: f32, b: f32, c: f32) -> f32 {
    a * b + c // a software fma would be far slower than the rounding it saves
}

macro_rules! lanes {
    (|$l:ident| $e:expr) => {{
        let mut o = [0f32; 8];
        for $l in 0..8 {
            o[$l] = $e;
        }
        o
    }};
}

impl Simd for Portable {
    const W: usize = 8;
    type V = [f32; 8];
    type Acc = [f64; 8];
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        lanes!(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        lanes!(|l| a[l] - b[l])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        lanes!(|l| a[l] * b[l])
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        lanes!(|l| pfma(a[l], b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn fnma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        lanes!(|l| pfma(-a[l], b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn min(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        lanes!(|l| if a[l] < b[l] { a[l] } else { b[l] })
    }
    #[inline(always)]
    unsafe fn max(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        lanes!(|l| if a[l] > b[l] { a[l] } else { b[l] })
    }
    #[inline(always)]
    unsafe fn recip(a: [f32; 8]) -> [f32; 8] {
        lanes!(|l| 1.0 / a[l])
    }
    #[inline(always)]
    unsafe fn pow2_from_magic(t: [f32; 8]) -> [f32; 8] {
        lanes!(|l| {
            let n = (t[l].to_bits() as i32).wrapping_sub(MAGIC_BITS);
            f32::from_bits((n.wrapping_add(127) << 23) as u32)
        })
    }
    #[inline(always)]
    unsafe fn round(a: [f32; 8]) -> [f32; 8] {
        lanes!(|l| (a[l] + MAGIC) - MAGIC)
    }
    #[inline(always)]
    unsafe fn scale2(p: [f32; 8], n: [f32; 8]) -> [f32; 8] {
        lanes!(|l| p[l] * f32::from_bits((((n[l] as i32) + 127) << 23) as u32))
    }
    #[inline(always)]
    unsafe fn hsum(v: [f32; 8]) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn acc_zero() -> [f64; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn acc_add(acc: [f64; 8], v: [f32; 8]) -> [f64; 8] {
        let mut o = acc;
        for l in 0..8 {
            o[l] += v[l] as f64;
        }
        o
    }
    #[inline(always)]
    unsafe fn acc_add_to(p: *mut f64, acc: [f64; 8]) {
        for (l, a) in acc.iter().enumerate() {
            *p.add(l) += a;
        }
    }
}

// ------------------------------------------------------------------ x86

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kernels::consts::MAGIC_BITS;
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        const W: usize = 8;
        type V = __m256;
        type Acc = (__m256d, __m256d);
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn recip(a: __m256) -> __m256 {
            // 12-bit estimate, one Newton step: r' = r + r·(1 − a·r)
            let r = _mm256_rcp_ps(a);
            let e = _mm256_fnmadd_ps(a, r, _mm256_set1_ps(1.0));
            _mm256_fmadd_ps(r, e, r)
        }
        #[inline(always)]
        unsafe fn pow2_from_magic(t: __m256) -> __m256 {
            let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(MAGIC_BITS - 127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n))
        }
        #[inline(always)]
        unsafe fn round(a: __m256) -> __m256 {
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a)
        }
        #[inline(always)]
        unsafe fn scale2(p: __m256, n: __m256) -> __m256 {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn acc_zero() -> (__m256d, __m256d) {
            (_mm256_setzero_pd(), _mm256_setzero_pd())
        }
        #[inline(always)]
        unsafe fn acc_add(acc: (__m256d, __m256d), v: __m256) -> (__m256d, __m256d) {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            (_mm256_add_pd(acc.0, lo), _mm256_add_pd(acc.1, hi))
        }
        #[inline(always)]
        unsafe fn acc_add_to(p: *mut f64, acc: (__m256d, __m256d)) {
            _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), acc.0));
            _mm256_storeu_pd(p.add(4), _mm256_add_pd(_mm256_loadu_pd(p.add(4)), acc.1));
        }
    }

    /// AVX-512 (F + DQ), 16 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const W: usize = 16;
        type V = __m512;
        type Acc = (__m512d, __m512d);
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn recip(a: __m512) -> __m512 {
            // 14-bit estimate, one Newton step
            let r = _mm512_rcp14_ps(a);
            let e = _mm512_fnmadd_ps(a, r, _mm512_set1_ps(1.0));
            _mm512_fmadd_ps(r, e, r)
        }
        #[inline(always)]
        unsafe fn pow2_from_magic(t: __m512) -> __m512 {
            let n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(MAGIC_BITS - 127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n))
        }
        #[inline(always)]
        unsafe fn round(a: __m512) -> __m512 {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a)
        }
        #[inline(always)]
        unsafe fn scale2(p: __m512, n: __m512) -> __m512 {
            _mm512_scalef_ps(p, n)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm512_extractf32x8_ps::<1>(v);
            Avx2::hsum(_mm256_add_ps(lo, hi))
        }
        #[inline(always)]
        unsafe fn acc_zero() -> (__m512d, __m512d) {
            (_mm512_setzero_pd(), _mm512_setzero_pd())
        }
        #[inline(always)]
        unsafe fn acc_add(acc: (__m512d, __m512d), v: __m512) -> (__m512d, __m512d) {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v));
            (_mm512_add_pd(acc.0, lo), _mm512_add_pd(acc.1, hi))
        }
        #[inline(always)]
        unsafe fn acc_add_to(p: *mut f64, acc: (__m512d, __m512d)) {
            _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), acc.0));
            _mm512_storeu_pd(p.add(8), _mm512_add_pd(_mm512_loadu_pd(p.add(8)), acc.1));
        }
    }
}
