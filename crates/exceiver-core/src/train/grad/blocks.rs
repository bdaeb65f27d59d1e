//! The building blocks of the forward and backward passes: the cross-attention MLP,
//! an output head, softmax attention, and the value-embedding term.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use super::add_into;
use super::state::{HeadWs, MlpWs};
use crate::model::weights::{CrossAttnParams, HeadParams};
use crate::train::kernels::TrainKernels;
use crate::train::ops::*;

/// `out = lat + L4(LN3(GELU(L1(LN0(lat)))))` for rows of width d.
pub(super) fn mlp_fwd(p: &CrossAttnParams, lat: &[f32], d: usize, c: &mut MlpWs, out: &mut [f32]) {
    let len = lat.len();
    let rows = len / d;
    let t0 = buf(&mut c.t0, len);
    ln_fwd(
        &p.mlp_norm0,
        lat,
        d,
        t0,
        buf(&mut c.xhat0, len),
        buf(&mut c.rstd0, rows),
    );
    let t1 = buf(&mut c.t1, len);
    lin_fwd(&p.mlp_linear1.weight, &p.mlp_linear1.bias, t0, d, d, t1);
    let t2 = buf(&mut c.t2, len);
    for (a, b) in t2.iter_mut().zip(t1.iter()) {
        *a = gelu(*b);
    }
    let t3 = buf(&mut c.t3, len);
    ln_fwd(
        &p.mlp_norm3,
        t2,
        d,
        t3,
        buf(&mut c.xhat3, len),
        buf(&mut c.rstd3, rows),
    );
    lin_fwd(&p.mlp_linear4.weight, &p.mlp_linear4.bias, t3, d, d, out);
    for (o, l) in out.iter_mut().zip(lat) {
        *o += *l;
    }
}

/// Backward of [`mlp_fwd`]: `dlat += ∂out/∂lat · dout` (dlat must hold dout's copy
/// for the residual, or zero and this adds it).
pub(super) fn mlp_bwd(
    p: &CrossAttnParams,
    g: &mut CrossAttnParams,
    c: &MlpWs,
    d: usize,
    dout: &[f32],
    dlat: &mut [f32],
    s1: &mut Vec<f32>,
    s2: &mut Vec<f32>,
) {
    let len = dout.len();
    add_into(dlat, dout);
    let dt3 = zeroed(s1, len);
    lin_bwd(
        &p.mlp_linear4.weight,
        &c.t3[..len],
        dout,
        d,
        d,
        Some(dt3),
        &mut g.mlp_linear4.weight,
        &mut g.mlp_linear4.bias,
    );
    let dt2 = zeroed(s2, len);
    ln_bwd(
        &p.mlp_norm3.weight,
        &c.xhat3,
        &c.rstd3,
        dt3,
        d,
        dt2,
        &mut g.mlp_norm3.weight,
        &mut g.mlp_norm3.bias,
    );
    for (k, v) in dt2.iter_mut().enumerate() {
        *v *= gelu_grad(c.t1[k]);
    }
    let dt0 = zeroed(s1, len);
    lin_bwd(
        &p.mlp_linear1.weight,
        &c.t0[..len],
        dt2,
        d,
        d,
        Some(dt0),
        &mut g.mlp_linear1.weight,
        &mut g.mlp_linear1.bias,
    );
    ln_bwd(
        &p.mlp_norm0.weight,
        &c.xhat0,
        &c.rstd0,
        dt0,
        d,
        dlat,
        &mut g.mlp_norm0.weight,
        &mut g.mlp_norm0.bias,
    );
}

/// An output head `L2(GELU(L1(LN(x))))` on rows of width d; out gets rows·C values.
pub(crate) fn head_fwd(p: &HeadParams, x: &[f32], d: usize, c: &mut HeadWs, out: &mut [f32]) {
    let rows = x.len() / d;
    let k = p.linear1.out_dim;
    let hn = buf(&mut c.hn, rows * d);
    ln_fwd(
        &p.norm,
        x,
        d,
        hn,
        buf(&mut c.xhat, rows * d),
        buf(&mut c.rstd, rows),
    );
    let a1 = buf(&mut c.a1, rows * k);
    lin_fwd(&p.linear1.weight, &p.linear1.bias, hn, d, k, a1);
    let g1 = buf(&mut c.g1, rows * k);
    for (a, b) in g1.iter_mut().zip(a1.iter()) {
        *a = gelu(*b);
    }
    lin_fwd(
        &p.linear2.weight,
        &p.linear2.bias,
        g1,
        k,
        p.linear2.out_dim,
        out,
    );
}

/// The backward of [`head_fwd`]: accumulates into `g`, writes `dx` (rows·d).
pub(crate) fn head_bwd(
    p: &HeadParams,
    g: &mut HeadParams,
    c: &HeadWs,
    d: usize,
    dout: &[f32],
    dx: &mut [f32],
    s1: &mut Vec<f32>,
    s2: &mut Vec<f32>,
) {
    let k = p.linear1.out_dim;
    let o = p.linear2.out_dim;
    let rows = dout.len() / o;
    let dg1 = zeroed(s1, rows * k);
    lin_bwd(
        &p.linear2.weight,
        &c.g1[..rows * k],
        dout,
        k,
        o,
        Some(dg1),
        &mut g.linear2.weight,
        &mut g.linear2.bias,
    );
    for (t, v) in dg1.iter_mut().enumerate() {
        *v *= gelu_grad(c.a1[t]);
    }
    let dhn = zeroed(s2, rows * d);
    lin_bwd(
        &p.linear1.weight,
        &c.hn[..rows * d],
        dg1,
        d,
        k,
        Some(dhn),
        &mut g.linear1.weight,
        &mut g.linear1.bias,
    );
    ln_bwd(
        &p.norm.weight,
        &c.xhat,
        &c.rstd,
        dhn,
        d,
        dx,
        &mut g.norm.weight,
        &mut g.norm.bias,
    );
}

/// Softmax attention of nq queries (scaled, row-major `qs[i·d + c]`) over nk keys
/// (structure of arrays, padded to kpad): per (h, i) the shift m, the sum Z, and
/// o = A/Z.
pub(super) fn attn_fwd(
    tk: &TrainKernels,
    heads: usize,
    hd: usize,
    qs: &[f32],
    kt: &[f32],
    vt: &[f32],
    kpad: usize,
    nk: usize,
    m: &mut [f32],
    z: &mut [f64],
    o: &mut [f32],
    sums: &mut Vec<f64>,
) {
    let d = heads * hd;
    let nq = qs.len() / d;
    let s = buf(sums, 1 + hd);
    for h in 0..heads {
        let kh = &kt[h * hd * kpad..(h + 1) * hd * kpad];
        let vh = &vt[h * hd * kpad..(h + 1) * hd * kpad];
        for i in 0..nq {
            let qh = &qs[i * d + h * hd..i * d + (h + 1) * hd];
            let mx = tk.max_dot(qh, kh, kpad, nk);
            tk.sums(qh, mx, kh, vh, kpad, nk, s);
            m[h * nq + i] = mx;
            z[h * nq + i] = s[0];
            for j in 0..hd {
                o[i * d + h * hd + j] = (s[1 + j] / s[0]) as f32;
            }
        }
    }
}

/// Backward of [`attn_fwd`]: `dqs += ∂/∂qs`, `dkt, dvt += ∂/∂k, ∂/∂v` (SoA).
pub(super) fn attn_bwd(
    tk: &TrainKernels,
    heads: usize,
    hd: usize,
    qs: &[f32],
    kt: &[f32],
    vt: &[f32],
    kpad: usize,
    nk: usize,
    m: &[f32],
    z: &[f64],
    o: &[f32],
    d_o: &[f32],
    dqs: &mut [f32],
    dkt: &mut [f32],
    dvt: &mut [f32],
    dq: &mut Vec<f32>,
) {
    let d = heads * hd;
    let nq = qs.len() / d;
    let dq = buf(dq, hd);
    for h in 0..heads {
        let r = h * hd * kpad..(h + 1) * hd * kpad;
        let (kh, vh) = (&kt[r.clone()], &vt[r.clone()]);
        let (dkh, dvh) = (&mut dkt[r.clone()], &mut dvt[r]);
        for i in 0..nq {
            let c0 = i * d + h * hd;
            let qh = &qs[c0..c0 + hd];
            let delta = &d_o[c0..c0 + hd];
            let dvo: f32 = delta.iter().zip(&o[c0..c0 + hd]).map(|(a, b)| a * b).sum();
            let w = (1.0 / z[h * nq + i]) as f32;
            tk.bwd(
                qh,
                m[h * nq + i],
                w,
                delta,
                dvo,
                kh,
                vh,
                kpad,
                nk,
                dkh,
                dvh,
                dq,
            );
            add_into(&mut dqs[c0..c0 + hd], dq);
        }
    }
}

/// Token rows `kn` (n × d, after layernorm_kv) += v_e · u ([`Config::value_embedding`]),
/// with `u` the shared d-vector or, per gene ([`Config::value_per_gene`]), row
/// `row(e)` of the `[emb_rows, d]` table.
pub(super) fn add_value_term(
    kn: &mut [f32],
    vals: &[f32],
    u: &[f32],
    d: usize,
    row: impl Fn(usize) -> usize,
) {
    let shared = u.len() == d;
    for (e, (x, &v)) in kn.chunks_exact_mut(d).zip(vals).enumerate() {
        let r = if shared { 0 } else { row(e) };
        for (x, &uc) in x.iter_mut().zip(&u[r * d..(r + 1) * d]) {
            *x += v * uc;
        }
    }
}

/// ∂L/∂u += Σ_e v_e · ∂L/∂kn_e, into row `row(e)` per gene (the other half of the
/// token's gradient goes on through layernorm_kv as before).
pub(super) fn value_term_bwd(
    dkn: &[f32],
    vals: &[f32],
    d: usize,
    du: &mut [f32],
    row: impl Fn(usize) -> usize,
) {
    let shared = du.len() == d;
    for (e, (x, &v)) in dkn.chunks_exact(d).zip(vals).enumerate() {
        let r = if shared { 0 } else { row(e) };
        for (g, &xc) in du[r * d..(r + 1) * d].iter_mut().zip(x) {
            *g += v * xc;
        }
    }
}
