//! Loss and gradients of a batch: a per-cell forward pass that keeps its activations,
//! a hand-written backward pass through the whole model, and the batch-level terms of
//! the reference encoder attention.
//!
//! # The encoder's all-gene terms
//!
//! In the reference semantics every vocabulary gene is a key of every cell; a gene the
//! cell does not express takes part with its zero-fill value `zf_g` and logit bias +1.
//! Per step (the parameters change every step) the batch computes once, per latent i
//! and head h, with `q` the (scaled) latent query and `k0_g, v0_g` the key and value of
//! `zf_g·E[g]`: `t0_g = q·k0_g + 1`, `M0 = max_g t0_g`, `Zall = Σ_g e^{t0_g − M0}`,
//! `Aall = Σ_g e^{t0_g − M0} v0_g`. A cell with entries n (keys k_n, logits s_n) then
//! has, with `m = max(M0, max_n s_n)`:
//! `Z = e^{M0−m} Zall − Σ_n e^{t0_{g_n} − m} + Σ_n e^{s_n − m}` (A likewise), o = A/Z.
//!
//! Backward with δ = ∂L/∂o: the cell and subtracted terms are handled per cell; the
//! shared terms need `α = Σ_cells e^{M0−m} δ / Z` and `β = Σ_cells e^{M0−m} (δ·o) / Z`,
//! after which one pass over all genes gives `∂t0_g = p̃_g (α·v0_g − β)` and
//! `∂v0_g = p̃_g α` with `p̃_g = e^{t0_g − M0}`. Those flow through LN_kv, Wk, Wv into
//! `E[g]` (scaled by zf_g) once per batch.

// Index loops over rows and heads are the clearest form here.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use super::kernels::TrainKernels;
use super::ops::{
    add_from_soa, buf, gelu, gelu_grad, lin_bwd, lin_fwd, ln_bwd, ln_fwd, round_up, to_soa, zeroed,
};
use super::{StepStats, TrainCell};
use crate::error::{Error, Result};
use crate::model::config::{AttentionMode, Config};
use crate::model::kernels::{Kernels, LANES};
use crate::model::weights::{CrossAttnParams, HeadParams, Params};

const R2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// A `Params` of the model's shapes with every value zero (a gradient buffer).
pub fn zero_grads(cfg: &Config) -> Params {
    let mut g = Params::zeros(cfg);
    let _ = g.visit_mut(cfg, |_, _, v| {
        v.fill(0.0);
        Ok(())
    });
    g
}

fn flatten(cfg: &Config, p: &Params, out: &mut Vec<f32>) {
    out.clear();
    let _ = p.visit(cfg, |_, _, v| {
        out.extend_from_slice(v);
        Ok(())
    });
}

fn add_flat(cfg: &Config, p: &mut Params, flat: &[f32]) {
    let mut off = 0;
    let _ = p.visit_mut(cfg, |_, _, v| {
        let len = v.len();
        for (a, b) in v.iter_mut().zip(&flat[off..off + len]) {
            *a += *b;
        }
        off += len;
        Ok(())
    });
}

fn add_into<T: Copy + std::ops::AddAssign>(dst: &mut [T], src: &[T]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a += *b;
    }
}

fn threads_or_all(t: usize) -> usize {
    if t == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        t
    }
}

/// Feed-forward weights folded as the forward kernels want them (see
/// [`Kernels::ffn_d4`]), or their gradients in the same layout.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ffn {
    w1t: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
}

/// Everything derived from the parameters once per batch.
pub(crate) struct Shared<'a> {
    cfg: &'a Config,
    p: &'a Params,
    zf: &'a [f32],
    d: usize,
    n: usize,
    ch: usize,
    chd: usize,
    ph: usize,
    phd: usize,
    g: usize,
    gpad: usize,
    npad: usize,
    ffpad: usize,
    sc_c: f32,
    sc_p: f32,
    reference: bool,
    // encoder queries
    q_xhat: Vec<f32>,
    q_rstd: Vec<f32>,
    q_qn: Vec<f32>,
    enc_qs: Vec<f32>,
    // zero-fill keys of every gene (reference mode)
    k0_xhat: Vec<f32>,
    k0_rstd: Vec<f32>,
    k0_kn: Vec<f32>,
    k0t: Vec<f32>,
    v0t: Vec<f32>,
    /// per (h, i), `[h·N + i]`: M0, and the shift M0 − 1 of the bias-free logits
    m0: Vec<f32>,
    s1: Vec<f32>,
    zall: Vec<f64>,
    /// `[c·N + i]`
    aall: Vec<f64>,
    ffn: Vec<Ffn>,
}

impl<'a> Shared<'a> {
    pub(crate) fn new(
        cfg: &'a Config,
        p: &'a Params,
        zf: &'a [f32],
        threads: usize,
    ) -> Result<Shared<'a>> {
        let tk = TrainKernels::get();
        let d = cfg.seq_dim;
        let n = cfg.query_len;
        let ch = cfg.cross_heads;
        let chd = d / ch;
        let ph = cfg.nhead;
        let phd = d / ph;
        let g = cfg.seq_len;
        let gpad = round_up(g, LANES);
        let npad = round_up(n, LANES);
        let ff = cfg.dim_feedforward;
        let ffpad = round_up(ff, LANES);
        let sc_c = 1.0 / (chd as f32).sqrt();
        let sc_p = 1.0 / (phd as f32).sqrt();
        let reference = cfg.attention == AttentionMode::Reference;
        let enc = &p.encoder;
        let w = &enc.attn.in_proj_weight;
        let b = &enc.attn.in_proj_bias;

        let mut q_xhat = vec![0.0; n * d];
        let mut q_rstd = vec![0.0; n];
        let mut q_qn = vec![0.0; n * d];
        ln_fwd(
            &enc.layernorm_q,
            &p.query_emb,
            d,
            &mut q_qn,
            &mut q_xhat,
            &mut q_rstd,
        );
        let mut enc_qs = vec![0.0; n * d];
        lin_fwd(&w[..d * d], &b[..d], &q_qn, d, d, &mut enc_qs);
        enc_qs.iter_mut().for_each(|v| *v *= sc_c);

        let ffn = p
            .layers
            .iter()
            .map(|lp| {
                let mut w1t = vec![0.0f32; d * ffpad];
                let mut b1 = vec![0.0f32; ffpad];
                let mut w2 = vec![0.0f32; d * ffpad];
                for j in 0..ff {
                    for c in 0..d {
                        w1t[c * ffpad + j] = lp.linear1.weight[j * d + c] * R2;
                        w2[c * ffpad + j] = lp.linear2.weight[c * ff + j] * R2;
                    }
                    b1[j] = lp.linear1.bias[j] * R2;
                }
                Ffn { w1t, b1, w2 }
            })
            .collect();

        let mut sh = Shared {
            cfg,
            p,
            zf,
            d,
            n,
            ch,
            chd,
            ph,
            phd,
            g,
            gpad,
            npad,
            ffpad,
            sc_c,
            sc_p,
            reference,
            q_xhat,
            q_rstd,
            q_qn,
            enc_qs,
            k0_xhat: Vec::new(),
            k0_rstd: Vec::new(),
            k0_kn: Vec::new(),
            k0t: Vec::new(),
            v0t: Vec::new(),
            m0: Vec::new(),
            s1: Vec::new(),
            zall: Vec::new(),
            aall: Vec::new(),
            ffn,
        };
        if !reference {
            return Ok(sh);
        }

        // Keys and values of every gene at its zero-fill value.
        let mut x0 = vec![0.0f32; g * d];
        for gi in 0..g {
            for c in 0..d {
                x0[gi * d + c] = zf[gi] * p.gene_emb[gi * d + c];
            }
        }
        let mut k0_xhat = vec![0.0; g * d];
        let mut k0_rstd = vec![0.0; g];
        let mut k0_kn = vec![0.0; g * d];
        ln_fwd(
            &enc.layernorm_kv,
            &x0,
            d,
            &mut k0_kn,
            &mut k0_xhat,
            &mut k0_rstd,
        );
        if cfg.value_embedding {
            add_value_term(&mut k0_kn, zf, &p.value_emb, d);
        }
        let mut tmp = vec![0.0f32; g * d];
        let mut k0t = vec![0.0f32; d * gpad];
        let mut v0t = vec![0.0f32; d * gpad];
        lin_fwd(&w[d * d..2 * d * d], &b[d..2 * d], &k0_kn, d, d, &mut tmp);
        to_soa(&tmp, d, gpad, &mut k0t);
        lin_fwd(&w[2 * d * d..], &b[2 * d..], &k0_kn, d, d, &mut tmp);
        to_soa(&tmp, d, gpad, &mut v0t);

        // Per (head, latent): M0, Zall, Aall, split over threads.
        let pairs = ch * n;
        let stride = 2 + chd;
        let mut res = vec![0.0f64; pairs * stride];
        let threads = threads_or_all(threads).min(pairs).max(1);
        let per = pairs.div_ceil(threads);
        {
            let (enc_qs, k0t, v0t) = (&sh.enc_qs, &k0t, &v0t);
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = res
                    .chunks_mut(per * stride)
                    .enumerate()
                    .map(|(t, chunk)| {
                        s.spawn(move || {
                            let mut out = vec![0.0f64; 1 + chd];
                            for (k, r) in chunk.chunks_mut(stride).enumerate() {
                                let pi = t * per + k;
                                let (h, i) = (pi / n, pi % n);
                                let qh = &enc_qs[i * d + h * chd..i * d + (h + 1) * chd];
                                let kh = &k0t[h * chd * gpad..(h + 1) * chd * gpad];
                                let vh = &v0t[h * chd * gpad..(h + 1) * chd * gpad];
                                let m0 = tk.max_dot(qh, kh, gpad, g) + 1.0;
                                tk.sums(qh, m0 - 1.0, kh, vh, gpad, g, &mut out);
                                r[0] = m0 as f64;
                                r[1..].copy_from_slice(&out);
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join()
                        .map_err(|_| Error::internal("training thread panicked"))?;
                }
                Ok(())
            })?;
        }
        let mut m0 = vec![0.0f32; pairs];
        let mut s1 = vec![0.0f32; pairs];
        let mut zall = vec![0.0f64; pairs];
        let mut aall = vec![0.0f64; d * n];
        for pi in 0..pairs {
            let (h, i) = (pi / n, pi % n);
            let r = &res[pi * stride..(pi + 1) * stride];
            m0[pi] = r[0] as f32;
            s1[pi] = m0[pi] - 1.0;
            zall[pi] = r[1];
            for j in 0..chd {
                aall[(h * chd + j) * n + i] = r[2 + j];
            }
        }
        sh.k0_xhat = k0_xhat;
        sh.k0_rstd = k0_rstd;
        sh.k0_kn = k0_kn;
        sh.k0t = k0t;
        sh.v0t = v0t;
        sh.m0 = m0;
        sh.s1 = s1;
        sh.zall = zall;
        sh.aall = aall;
        Ok(sh)
    }
}

/// Gradient accumulators of one thread.
pub(crate) struct Acc {
    pub grads: Params,
    ffn: Vec<Ffn>,
    /// ∂ of the zero-fill keys / values of every gene, `[c·gpad + g]`
    dk0t: Vec<f32>,
    dv0t: Vec<f32>,
    /// ∂ of the scaled encoder queries, `[i·d + c]`
    dqs: Vec<f32>,
    /// α `[i·d + c]` and β `[h·N + i]` of the shared terms
    alpha: Vec<f64>,
    beta: Vec<f64>,
    sse: f64,
    ce: f64,
}

impl Acc {
    fn new(cfg: &Config) -> Acc {
        let d = cfg.seq_dim;
        let ffpad = round_up(cfg.dim_feedforward, LANES);
        Acc {
            grads: zero_grads(cfg),
            ffn: (0..cfg.num_layers)
                .map(|_| Ffn {
                    w1t: vec![0.0; d * ffpad],
                    b1: vec![0.0; ffpad],
                    w2: vec![0.0; d * ffpad],
                })
                .collect(),
            dk0t: Vec::new(),
            dv0t: Vec::new(),
            dqs: vec![0.0; cfg.query_len * d],
            alpha: vec![0.0; cfg.query_len * d],
            beta: vec![0.0; cfg.query_len * cfg.cross_heads],
            sse: 0.0,
            ce: 0.0,
        }
    }

    fn reset(&mut self, cfg: &Config, backward: bool) {
        self.sse = 0.0;
        self.ce = 0.0;
        if !backward {
            return;
        }
        let _ = self.grads.visit_mut(cfg, |_, _, v| {
            v.fill(0.0);
            Ok(())
        });
        for f in &mut self.ffn {
            f.w1t.fill(0.0);
            f.b1.fill(0.0);
            f.w2.fill(0.0);
        }
        let n0 = if cfg.attention == AttentionMode::Reference {
            cfg.seq_dim * round_up(cfg.seq_len, LANES)
        } else {
            0
        };
        zeroed(&mut self.dk0t, n0);
        zeroed(&mut self.dv0t, n0);
        self.dqs.fill(0.0);
        self.alpha.fill(0.0);
        self.beta.fill(0.0);
    }

    /// Add another thread's accumulators (not α, β: those are reduced earlier).
    fn add(&mut self, cfg: &Config, o: &Acc, flat: &mut Vec<f32>) {
        flatten(cfg, &o.grads, flat);
        add_flat(cfg, &mut self.grads, flat);
        for (a, b) in self.ffn.iter_mut().zip(&o.ffn) {
            add_into(&mut a.w1t, &b.w1t);
            add_into(&mut a.b1, &b.b1);
            add_into(&mut a.w2, &b.w2);
        }
        add_into(&mut self.dk0t, &o.dk0t);
        add_into(&mut self.dv0t, &o.dv0t);
        add_into(&mut self.dqs, &o.dqs);
    }
}

// ------------------------------------------------------------------ caches

#[derive(Default)]
struct MlpWs {
    xhat0: Vec<f32>,
    rstd0: Vec<f32>,
    t0: Vec<f32>,
    t1: Vec<f32>,
    t2: Vec<f32>,
    xhat3: Vec<f32>,
    rstd3: Vec<f32>,
    t3: Vec<f32>,
}

#[derive(Default)]
struct HeadWs {
    xhat: Vec<f32>,
    rstd: Vec<f32>,
    hn: Vec<f32>,
    a1: Vec<f32>,
    g1: Vec<f32>,
}

#[derive(Default)]
struct LayerWs {
    xin: Vec<f32>,
    qs: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    m: Vec<f32>,
    z: Vec<f64>,
    o: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    x1: Vec<f32>,
    x1t: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// Scratch memory of one thread, reused across cells and steps.
#[derive(Default)]
pub(crate) struct Ws {
    stamp: Vec<u32>,
    epoch: u32,
    // encoder
    tok: Vec<u32>,
    val: Vec<f32>,
    e_xhat: Vec<f32>,
    e_rstd: Vec<f32>,
    e_kn: Vec<f32>,
    e_kt: Vec<f32>,
    e_vt: Vec<f32>,
    e_k0: Vec<f32>,
    e_v0: Vec<f32>,
    e_m: Vec<f32>,
    e_z: Vec<f64>,
    e_o: Vec<f32>,
    e_lat: Vec<f32>,
    e_mlp: MlpWs,
    // process
    layers: Vec<LayerWs>,
    xl: Vec<f32>,
    // decoder
    rows: Vec<u32>,
    targets: Vec<f32>,
    d_xhat: Vec<f32>,
    d_rstd: Vec<f32>,
    d_kn: Vec<f32>,
    d_kt: Vec<f32>,
    d_vt: Vec<f32>,
    d_qe: Vec<f32>,
    d_qxhat: Vec<f32>,
    d_qrstd: Vec<f32>,
    d_qn: Vec<f32>,
    d_qs: Vec<f32>,
    d_m: Vec<f32>,
    d_z: Vec<f64>,
    d_o: Vec<f32>,
    d_lat: Vec<f32>,
    d_mlp: MlpWs,
    dec: Vec<f32>,
    vhead: HeadWs,
    chead: HeadWs,
    pred: Vec<f32>,
    logits: Vec<f32>,
    // backward scratch
    g1: Vec<f32>,
    g2: Vec<f32>,
    g3: Vec<f32>,
    g4: Vec<f32>,
    g5: Vec<f32>,
    gt1: Vec<f32>,
    gt2: Vec<f32>,
    gt3: Vec<f32>,
    gt4: Vec<f32>,
    dq: Vec<f32>,
    sums: Vec<f64>,
    scratch: Vec<f32>,
}

/// Per-thread state kept across steps.
pub(crate) struct ThreadState {
    pub ws: Ws,
    pub acc: Acc,
    flat: Vec<f32>,
}

impl ThreadState {
    pub(crate) fn new(cfg: &Config) -> ThreadState {
        ThreadState {
            ws: Ws::default(),
            acc: Acc::new(cfg),
            flat: Vec::new(),
        }
    }
}

// ------------------------------------------------------------------ building blocks

/// `out = lat + L4(LN3(GELU(L1(LN0(lat)))))` for rows of width d.
fn mlp_fwd(p: &CrossAttnParams, lat: &[f32], d: usize, c: &mut MlpWs, out: &mut [f32]) {
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
fn mlp_bwd(
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
fn head_fwd(p: &HeadParams, x: &[f32], d: usize, c: &mut HeadWs, out: &mut [f32]) {
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

fn head_bwd(
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
fn attn_fwd(
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
fn attn_bwd(
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

// ------------------------------------------------------------------ one cell

/// Loss normalisation of a batch: ∂L/∂pred = mse_w·(pred − y), ∂L/∂logits = ce_w·(…).
#[derive(Clone, Copy)]
pub(crate) struct Norm {
    mse_w: f32,
    ce_w: f32,
}

fn bump(ws: &mut Ws) -> u32 {
    ws.epoch = ws.epoch.wrapping_add(1);
    if ws.epoch == 0 {
        ws.stamp.fill(0);
        ws.epoch = 1;
    }
    ws.epoch
}

fn check_cell(cfg: &Config, ws: &mut Ws, cell: &TrainCell) -> Result<()> {
    let g = cfg.seq_len;
    let nnz = cell.genes.len();
    if cell.values.len() != nnz {
        return Err(Error::shape(format!(
            "a cell has {nnz} gene indices but {} values",
            cell.values.len()
        )));
    }
    if nnz == 0 {
        return Err(Error::invalid("a cell has no expressed genes"));
    }
    if ws.stamp.len() != g.max(nnz) {
        ws.stamp = vec![0; g.max(nnz)];
        ws.epoch = 0;
    }
    let e = bump(ws);
    for (p, (&gi, &v)) in cell.genes.iter().zip(&cell.values).enumerate() {
        let gu = gi as usize;
        if gu >= g {
            return Err(Error::invalid(format!(
                "gene index {gi} at position {p} is out of range for a vocabulary of {g} genes"
            )));
        }
        if !v.is_finite() {
            return Err(Error::data(format!(
                "input value {v} of gene {gi} (position {p}) is not finite"
            )));
        }
        if ws.stamp[gu] == e {
            return Err(Error::invalid(format!(
                "gene index {gi} appears more than once in a cell (again at position {p})"
            )));
        }
        ws.stamp[gu] = e;
    }
    let e = bump(ws);
    for &mp in &cell.mask {
        if mp >= nnz {
            return Err(Error::invalid(format!(
                "mask position {mp} is out of range for a cell with {nnz} expressed genes"
            )));
        }
        if ws.stamp[mp] == e {
            return Err(Error::invalid(format!(
                "mask position {mp} appears more than once"
            )));
        }
        ws.stamp[mp] = e;
    }
    match (cfg.num_classes, cell.label) {
        (Some(c), Some(l)) if l >= c => Err(Error::invalid(format!(
            "label {l} is out of range for a classifier with {c} classes"
        ))),
        (Some(_), None) => Err(Error::invalid(
            "a cell has no label, but the model is a classifier",
        )),
        (None, Some(_)) => Err(Error::invalid(
            "a cell has a label, but the model is not a classifier",
        )),
        _ => Ok(()),
    }
}

/// Forward (and with `backward`, backward) of one cell; adds its squared error and
/// cross-entropy to `acc`. `emb_out` receives the processed latent (the cell
/// embedding, N·d); `emb_grad` is an extra loss's gradient with respect to it, added
/// to the backward pass (the contrastive term of [`crate::train::Trainer`]).
#[allow(clippy::too_many_arguments)]
fn cell_step(
    sh: &Shared,
    cell: &TrainCell,
    norm: Norm,
    ws: &mut Ws,
    acc: &mut Acc,
    backward: bool,
    emb_out: Option<&mut [f32]>,
    emb_grad: Option<&[f32]>,
) -> Result<()> {
    let cfg = sh.cfg;
    check_cell(cfg, ws, cell)?;
    let p = sh.p;
    let tk = TrainKernels::get();
    let kern = Kernels::get();
    let (d, n, ch, chd, ph, phd) = (sh.d, sh.n, sh.ch, sh.chd, sh.ph, sh.phd);
    let npad = sh.npad;
    let g_mask = cfg.seq_len as u32;
    let nnz = cell.genes.len();
    let epad = round_up(nnz, LANES);
    let enc = &p.encoder;
    let ew = &enc.attn.in_proj_weight;
    let eb = &enc.attn.in_proj_bias;

    // ---------------- encoder forward
    let tok = buf(&mut ws.tok, nnz);
    let val = buf(&mut ws.val, nnz);
    tok.copy_from_slice(&cell.genes);
    val.copy_from_slice(&cell.values);
    for &mp in &cell.mask {
        tok[mp] = g_mask;
        val[mp] = 1.0;
    }
    let x = buf(&mut ws.g1, nnz * d);
    for e in 0..nnz {
        let r = tok[e] as usize;
        for c in 0..d {
            x[e * d + c] = val[e] * p.gene_emb[r * d + c];
        }
    }
    let kn = buf(&mut ws.e_kn, nnz * d);
    ln_fwd(
        &enc.layernorm_kv,
        x,
        d,
        kn,
        buf(&mut ws.e_xhat, nnz * d),
        buf(&mut ws.e_rstd, nnz),
    );
    if sh.cfg.value_embedding {
        add_value_term(kn, val, &p.value_emb, d);
    }
    let tmp = buf(&mut ws.g2, nnz * d);
    let kt = zeroed(&mut ws.e_kt, d * epad);
    let vt = zeroed(&mut ws.e_vt, d * epad);
    lin_fwd(&ew[d * d..2 * d * d], &eb[d..2 * d], kn, d, d, tmp);
    to_soa(tmp, d, epad, kt);
    lin_fwd(&ew[2 * d * d..], &eb[2 * d..], kn, d, d, tmp);
    to_soa(tmp, d, epad, vt);
    let (k0, v0) = if sh.reference {
        let k0 = zeroed(&mut ws.e_k0, d * epad);
        let v0 = zeroed(&mut ws.e_v0, d * epad);
        for (e, &gi) in cell.genes.iter().enumerate() {
            let gi = gi as usize;
            for c in 0..d {
                k0[c * epad + e] = sh.k0t[c * sh.gpad + gi];
                v0[c * epad + e] = sh.v0t[c * sh.gpad + gi];
            }
        }
        (&*k0, &*v0)
    } else {
        (&[][..], &[][..])
    };
    let em = buf(&mut ws.e_m, ch * n);
    let ez = buf(&mut ws.e_z, ch * n);
    let eo = buf(&mut ws.e_o, n * d);
    {
        let s = buf(&mut ws.sums, 2 * (1 + chd));
        let (sc, s0) = s.split_at_mut(1 + chd);
        for h in 0..ch {
            let r = h * chd * epad..(h + 1) * chd * epad;
            let (kh, vh) = (&kt[r.clone()], &vt[r.clone()]);
            for i in 0..n {
                let pi = h * n + i;
                let qh = &sh.enc_qs[i * d + h * chd..i * d + (h + 1) * chd];
                let mc = tk.max_dot(qh, kh, epad, nnz);
                let m = if sh.reference { mc.max(sh.m0[pi]) } else { mc };
                tk.sums(qh, m, kh, vh, epad, nnz, sc);
                let mut z = sc[0];
                if sh.reference {
                    let s2 = m - 1.0;
                    tk.sums(qh, s2, &k0[r.clone()], &v0[r.clone()], epad, nnz, s0);
                    let f = ((sh.s1[pi] as f64) - (s2 as f64)).exp();
                    z = f * sh.zall[pi] - s0[0] + sc[0];
                    for j in 0..chd {
                        let c = h * chd + j;
                        let av = f * sh.aall[c * n + i] - s0[1 + j] + sc[1 + j];
                        eo[i * d + c] = (av / z) as f32;
                    }
                } else {
                    for j in 0..chd {
                        eo[i * d + h * chd + j] = (sc[1 + j] / z) as f32;
                    }
                }
                em[pi] = m;
                ez[pi] = z;
            }
        }
    }
    let lat = buf(&mut ws.e_lat, n * d);
    let op = &enc.attn.out_proj;
    lin_fwd(&op.weight, &op.bias, eo, d, d, lat);
    add_into(lat, &p.query_emb);
    // encoder output = input of layer 0
    if ws.layers.len() < cfg.num_layers {
        ws.layers.resize_with(cfg.num_layers, LayerWs::default);
    }
    let xl = buf(&mut ws.xl, n * d);
    mlp_fwd(enc, lat, d, &mut ws.e_mlp, xl);

    // ---------------- process forward
    for l in 0..cfg.num_layers {
        let lp = &p.layers[l];
        let lw = &mut ws.layers[l];
        let xin = buf(&mut lw.xin, n * d);
        xin.copy_from_slice(&ws.xl[..n * d]);
        let w = &lp.self_attn.in_proj_weight;
        let b = &lp.self_attn.in_proj_bias;
        let qs = buf(&mut lw.qs, n * d);
        lin_fwd(&w[..d * d], &b[..d], xin, d, d, qs);
        qs.iter_mut().for_each(|v| *v *= sh.sc_p);
        let tmp = buf(&mut ws.g2, n * d);
        let kt = zeroed(&mut lw.kt, d * npad);
        let vt = zeroed(&mut lw.vt, d * npad);
        lin_fwd(&w[d * d..2 * d * d], &b[d..2 * d], xin, d, d, tmp);
        to_soa(tmp, d, npad, kt);
        lin_fwd(&w[2 * d * d..], &b[2 * d..], xin, d, d, tmp);
        to_soa(tmp, d, npad, vt);
        let m = buf(&mut lw.m, ph * n);
        let z = buf(&mut lw.z, ph * n);
        let o = buf(&mut lw.o, n * d);
        attn_fwd(tk, ph, phd, qs, kt, vt, npad, n, m, z, o, &mut ws.sums);
        let y = buf(&mut ws.g3, n * d);
        let op = &lp.self_attn.out_proj;
        lin_fwd(&op.weight, &op.bias, o, d, d, y);
        add_into(y, xin);
        let x1 = buf(&mut lw.x1, n * d);
        ln_fwd(
            &lp.norm1,
            y,
            d,
            x1,
            buf(&mut lw.xhat1, n * d),
            buf(&mut lw.rstd1, n),
        );
        let x1t = buf(&mut lw.x1t, n * d);
        to_soa(x1, d, n, x1t);
        let f = buf(&mut ws.g4, n * d);
        let fw = &sh.ffn[l];
        if d == 4 {
            kern.ffn_d4(x1t, &fw.w1t, &fw.b1, &fw.w2, f);
        } else {
            let scratch = buf(&mut ws.scratch, d * LANES);
            kern.ffn_gen(d, x1t, &fw.w1t, &fw.b1, &fw.w2, f, scratch);
        }
        // y2 = x1 + f + b2 (row-major)
        for i in 0..n {
            for c in 0..d {
                y[i * d + c] = x1[i * d + c] + f[c * n + i] + lp.linear2.bias[c];
            }
        }
        let xo = buf(&mut ws.xl, n * d);
        ln_fwd(
            &lp.norm2,
            y,
            d,
            xo,
            buf(&mut lw.xhat2, n * d),
            buf(&mut lw.rstd2, n),
        );
    }

    if let Some(o) = emb_out {
        o.copy_from_slice(&ws.xl[..n * d]);
    }

    // ---------------- decoder forward
    let nmask = cell.mask.len();
    let class = cfg.num_classes.is_some();
    let nq = nmask + usize::from(class);
    let dec_p = &p.decoder;
    let dw = &dec_p.attn.in_proj_weight;
    let dbias = &dec_p.attn.in_proj_bias;
    let rows = buf(&mut ws.rows, nq);
    let targets = buf(&mut ws.targets, nmask);
    for (j, &mp) in cell.mask.iter().enumerate() {
        rows[j] = cell.genes[mp];
        targets[j] = cell.values[mp];
    }
    if class {
        rows[nmask] = g_mask + 1;
    }
    let xl = &ws.xl[..n * d];
    let dkn = buf(&mut ws.d_kn, n * d);
    ln_fwd(
        &dec_p.layernorm_kv,
        xl,
        d,
        dkn,
        buf(&mut ws.d_xhat, n * d),
        buf(&mut ws.d_rstd, n),
    );
    let tmp = buf(&mut ws.g2, n * d);
    let dkt = zeroed(&mut ws.d_kt, d * npad);
    let dvt = zeroed(&mut ws.d_vt, d * npad);
    lin_fwd(&dw[d * d..2 * d * d], &dbias[d..2 * d], dkn, d, d, tmp);
    to_soa(tmp, d, npad, dkt);
    lin_fwd(&dw[2 * d * d..], &dbias[2 * d..], dkn, d, d, tmp);
    to_soa(tmp, d, npad, dvt);
    let qe = buf(&mut ws.d_qe, nq * d);
    for (j, &r) in rows.iter().enumerate() {
        let r = r as usize;
        qe[j * d..(j + 1) * d].copy_from_slice(&p.gene_emb[r * d..(r + 1) * d]);
    }
    let qn = buf(&mut ws.d_qn, nq * d);
    ln_fwd(
        &dec_p.layernorm_q,
        qe,
        d,
        qn,
        buf(&mut ws.d_qxhat, nq * d),
        buf(&mut ws.d_qrstd, nq),
    );
    let dqs = buf(&mut ws.d_qs, nq * d);
    lin_fwd(&dw[..d * d], &dbias[..d], qn, d, d, dqs);
    dqs.iter_mut().for_each(|v| *v *= sh.sc_c);
    let dm = buf(&mut ws.d_m, ch * nq);
    let dz = buf(&mut ws.d_z, ch * nq);
    let dout = buf(&mut ws.d_o, nq * d);
    attn_fwd(
        tk,
        ch,
        chd,
        dqs,
        dkt,
        dvt,
        npad,
        n,
        dm,
        dz,
        dout,
        &mut ws.sums,
    );
    let dlat = buf(&mut ws.d_lat, nq * d);
    let op = &dec_p.attn.out_proj;
    lin_fwd(&op.weight, &op.bias, dout, d, d, dlat);
    add_into(dlat, qe);
    let dec = buf(&mut ws.dec, nq * d);
    mlp_fwd(dec_p, dlat, d, &mut ws.d_mlp, dec);
    let pred = buf(&mut ws.pred, nmask);
    head_fwd(&p.value_head, &dec[..nmask * d], d, &mut ws.vhead, pred);
    let mut sse = 0.0f64;
    for j in 0..nmask {
        let e = (pred[j] - targets[j]) as f64;
        sse += e * e;
    }
    acc.sse += sse;
    if let (Some(nc), Some(hp), Some(label)) = (cfg.num_classes, &p.class_head, cell.label) {
        let lg = buf(&mut ws.logits, nc);
        head_fwd(hp, &dec[nmask * d..nq * d], d, &mut ws.chead, lg);
        let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let se: f64 = lg.iter().map(|&v| (v as f64 - mx).exp()).sum();
        let lse = mx + se.ln();
        acc.ce += lse - lg[label] as f64;
    }
    if !backward {
        return Ok(());
    }

    // ================= backward
    let gr = &mut acc.grads;
    // heads → ∂dec
    let ddec = zeroed(&mut ws.gt1, nq * d);
    let dpred = buf(&mut ws.gt2, nmask);
    for j in 0..nmask {
        dpred[j] = norm.mse_w * (pred[j] - targets[j]);
    }
    head_bwd(
        &p.value_head,
        &mut gr.value_head,
        &ws.vhead,
        d,
        dpred,
        &mut ddec[..nmask * d],
        &mut ws.g1,
        &mut ws.g2,
    );
    if let (Some(nc), Some(hp), Some(gh), Some(label)) = (
        cfg.num_classes,
        &p.class_head,
        gr.class_head.as_mut(),
        cell.label,
    ) {
        let lg = &ws.logits[..nc];
        let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let se: f64 = lg.iter().map(|&v| (v as f64 - mx).exp()).sum();
        let dl = buf(&mut ws.gt3, nc);
        for k in 0..nc {
            let pk = ((lg[k] as f64 - mx).exp() / se) as f32;
            dl[k] = norm.ce_w * (pk - if k == label { 1.0 } else { 0.0 });
        }
        head_bwd(
            hp,
            gh,
            &ws.chead,
            d,
            dl,
            &mut ddec[nmask * d..nq * d],
            &mut ws.g1,
            &mut ws.g2,
        );
    }
    // decoder MLP → ∂lat
    let dlat_g = zeroed(&mut ws.gt2, nq * d);
    mlp_bwd(
        dec_p,
        &mut gr.decoder,
        &ws.d_mlp,
        d,
        ddec,
        dlat_g,
        &mut ws.g1,
        &mut ws.g2,
    );
    // residual: ∂qe += ∂lat
    let dqe = buf(&mut ws.gt3, nq * d);
    dqe.copy_from_slice(dlat_g);
    // out_proj
    let d_o = zeroed(&mut ws.gt4, nq * d);
    let gop = &mut gr.decoder.attn.out_proj;
    lin_bwd(
        &dec_p.attn.out_proj.weight,
        &ws.d_o[..nq * d],
        dlat_g,
        d,
        d,
        Some(d_o),
        &mut gop.weight,
        &mut gop.bias,
    );
    // attention
    let dqs_g = zeroed(&mut ws.gt1, nq * d);
    let dkt_g = zeroed(&mut ws.g3, d * npad);
    let dvt_g = zeroed(&mut ws.g4, d * npad);
    attn_bwd(
        tk,
        ch,
        chd,
        &ws.d_qs[..nq * d],
        &ws.d_kt,
        &ws.d_vt,
        npad,
        n,
        &ws.d_m,
        &ws.d_z,
        &ws.d_o[..nq * d],
        d_o,
        dqs_g,
        dkt_g,
        dvt_g,
        &mut ws.dq,
    );
    dqs_g.iter_mut().for_each(|v| *v *= sh.sc_c);
    {
        let gia = &mut gr.decoder.attn;
        let dqn = zeroed(&mut ws.g1, nq * d);
        lin_bwd(
            &dw[..d * d],
            &ws.d_qn[..nq * d],
            dqs_g,
            d,
            d,
            Some(dqn),
            &mut gia.in_proj_weight[..d * d],
            &mut gia.in_proj_bias[..d],
        );
        ln_bwd(
            &dec_p.layernorm_q.weight,
            &ws.d_qxhat,
            &ws.d_qrstd,
            dqn,
            d,
            dqe,
            &mut gr.decoder.layernorm_q.weight,
            &mut gr.decoder.layernorm_q.bias,
        );
        for (j, &r) in ws.rows[..nq].iter().enumerate() {
            let r = r as usize;
            add_into(
                &mut gr.gene_emb[r * d..(r + 1) * d],
                &dqe[j * d..(j + 1) * d],
            );
        }
        // keys / values from the latent
        let dk = zeroed(&mut ws.g1, n * d);
        add_from_soa(dkt_g, d, npad, n, dk);
        let dv = zeroed(&mut ws.g2, n * d);
        add_from_soa(dvt_g, d, npad, n, dv);
        let dkn = zeroed(&mut ws.gt1, n * d);
        let gia = &mut gr.decoder.attn;
        let (gwq, rest) = gia.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let _ = gwq;
        let (gbq, rest) = gia.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        let _ = gbq;
        lin_bwd(
            &dw[d * d..2 * d * d],
            &ws.d_kn[..n * d],
            dk,
            d,
            d,
            Some(&mut *dkn),
            gwk,
            gbk,
        );
        lin_bwd(
            &dw[2 * d * d..],
            &ws.d_kn[..n * d],
            dv,
            d,
            d,
            Some(&mut *dkn),
            gwv,
            gbv,
        );
        let dx = zeroed(&mut ws.gt2, n * d);
        ln_bwd(
            &dec_p.layernorm_kv.weight,
            &ws.d_xhat,
            &ws.d_rstd,
            dkn,
            d,
            dx,
            &mut gr.decoder.layernorm_kv.weight,
            &mut gr.decoder.layernorm_kv.bias,
        );
    }
    // ∂ of the latent is in ws.gt2 (n·d)
    if let Some(gz) = emb_grad {
        add_into(&mut ws.gt2[..n * d], gz);
    }

    // ---------------- process backward
    for l in (0..cfg.num_layers).rev() {
        let lp = &p.layers[l];
        let gl = &mut gr.layers[l];
        let lw = &ws.layers[l];
        let dx2 = &ws.gt2[..n * d];
        // LN2
        let dy2 = zeroed(&mut ws.gt1, n * d);
        ln_bwd(
            &lp.norm2.weight,
            &lw.xhat2,
            &lw.rstd2,
            dx2,
            d,
            dy2,
            &mut gl.norm2.weight,
            &mut gl.norm2.bias,
        );
        // FFN (residual: ∂x1 = ∂y2 + FFN')
        let dft = buf(&mut ws.g3, n * d);
        to_soa(dy2, d, n, dft);
        for c in 0..d {
            gl.linear2.bias[c] += dft[c * n..(c + 1) * n].iter().sum::<f32>();
        }
        let dx1t = zeroed(&mut ws.g4, n * d);
        let fw = &sh.ffn[l];
        let fg = &mut acc.ffn[l];
        tk.ffn_bwd(
            d,
            &lw.x1t[..n * d],
            dft,
            &fw.w1t,
            &fw.b1,
            &fw.w2,
            &mut fg.w1t,
            &mut fg.b1,
            &mut fg.w2,
            dx1t,
        );
        add_from_soa(dx1t, d, n, n, dy2);
        // LN1
        let dy = zeroed(&mut ws.gt3, n * d);
        ln_bwd(
            &lp.norm1.weight,
            &lw.xhat1,
            &lw.rstd1,
            dy2,
            d,
            dy,
            &mut gl.norm1.weight,
            &mut gl.norm1.bias,
        );
        // residual + out_proj
        let dxin = buf(&mut ws.gt2, n * d);
        dxin.copy_from_slice(dy);
        let d_o = zeroed(&mut ws.gt4, n * d);
        lin_bwd(
            &lp.self_attn.out_proj.weight,
            &lw.o[..n * d],
            dy,
            d,
            d,
            Some(d_o),
            &mut gl.self_attn.out_proj.weight,
            &mut gl.self_attn.out_proj.bias,
        );
        let dqs = zeroed(&mut ws.gt1, n * d);
        let dkt = zeroed(&mut ws.g3, d * npad);
        let dvt = zeroed(&mut ws.g4, d * npad);
        attn_bwd(
            tk,
            ph,
            phd,
            &lw.qs[..n * d],
            &lw.kt,
            &lw.vt,
            npad,
            n,
            &lw.m,
            &lw.z,
            &lw.o[..n * d],
            d_o,
            dqs,
            dkt,
            dvt,
            &mut ws.dq,
        );
        dqs.iter_mut().for_each(|v| *v *= sh.sc_p);
        let dk = zeroed(&mut ws.g1, n * d);
        add_from_soa(dkt, d, npad, n, dk);
        let dv = zeroed(&mut ws.g5, n * d);
        add_from_soa(dvt, d, npad, n, dv);
        let w = &lp.self_attn.in_proj_weight;
        let ga = &mut gl.self_attn;
        let (gwq, rest) = ga.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let (gbq, rest) = ga.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        let xin = &lw.xin[..n * d];
        lin_bwd(&w[..d * d], xin, dqs, d, d, Some(&mut *dxin), gwq, gbq);
        lin_bwd(
            &w[d * d..2 * d * d],
            xin,
            dk,
            d,
            d,
            Some(&mut *dxin),
            gwk,
            gbk,
        );
        lin_bwd(&w[2 * d * d..], xin, dv, d, d, Some(&mut *dxin), gwv, gbv);
    }
    // ∂ of the encoder output is in ws.gt2

    // ---------------- encoder backward
    let dxo = &ws.gt2[..n * d];
    let dlat = zeroed(&mut ws.gt1, n * d);
    mlp_bwd(
        enc,
        &mut gr.encoder,
        &ws.e_mlp,
        d,
        dxo,
        dlat,
        &mut ws.g1,
        &mut ws.g2,
    );
    add_into(&mut gr.query_emb, dlat);
    let d_o = zeroed(&mut ws.gt3, n * d);
    let gop = &mut gr.encoder.attn.out_proj;
    lin_bwd(
        &enc.attn.out_proj.weight,
        &ws.e_o[..n * d],
        dlat,
        d,
        d,
        Some(d_o),
        &mut gop.weight,
        &mut gop.bias,
    );
    let dkt = zeroed(&mut ws.g3, d * epad);
    let dvt = zeroed(&mut ws.g4, d * epad);
    let (dk0, dv0) = if sh.reference {
        (
            zeroed(&mut ws.g5, d * epad),
            zeroed(&mut ws.scratch, d * epad),
        )
    } else {
        (&mut [][..], &mut [][..])
    };
    let dq = buf(&mut ws.dq, chd);
    for h in 0..ch {
        let r = h * chd * epad..(h + 1) * chd * epad;
        for i in 0..n {
            let pi = h * n + i;
            let c0 = i * d + h * chd;
            let qh = &sh.enc_qs[c0..c0 + chd];
            let delta = &d_o[c0..c0 + chd];
            let o = &ws.e_o[c0..c0 + chd];
            let dvo: f32 = delta.iter().zip(o).map(|(a, b)| a * b).sum();
            let z = ws.e_z[pi];
            let m = ws.e_m[pi];
            let w = (1.0 / z) as f32;
            tk.bwd(
                qh,
                m,
                w,
                delta,
                dvo,
                &ws.e_kt[r.clone()],
                &ws.e_vt[r.clone()],
                epad,
                nnz,
                &mut dkt[r.clone()],
                &mut dvt[r.clone()],
                dq,
            );
            add_into(&mut acc.dqs[c0..c0 + chd], dq);
            if sh.reference {
                let s2 = m - 1.0;
                tk.bwd(
                    qh,
                    s2,
                    -w,
                    delta,
                    dvo,
                    &ws.e_k0[r.clone()],
                    &ws.e_v0[r.clone()],
                    epad,
                    nnz,
                    &mut dk0[r.clone()],
                    &mut dv0[r.clone()],
                    dq,
                );
                add_into(&mut acc.dqs[c0..c0 + chd], dq);
                let f = ((sh.s1[pi] as f64) - (s2 as f64)).exp() / z;
                for j in 0..chd {
                    acc.alpha[c0 + j] += f * delta[j] as f64;
                }
                acc.beta[pi] += f * dvo as f64;
            }
        }
    }
    if sh.reference {
        let gp = sh.gpad;
        for (e, &gi) in cell.genes.iter().enumerate() {
            let gi = gi as usize;
            for c in 0..d {
                acc.dk0t[c * gp + gi] += dk0[c * epad + e];
                acc.dv0t[c * gp + gi] += dv0[c * epad + e];
            }
        }
    }
    // entries: keys/values → LN_kv → E[tok]
    let dk = zeroed(&mut ws.g1, nnz * d);
    add_from_soa(dkt, d, epad, nnz, dk);
    let dv = zeroed(&mut ws.g2, nnz * d);
    add_from_soa(dvt, d, epad, nnz, dv);
    let dkn = zeroed(&mut ws.gt1, nnz * d);
    {
        let ga = &mut gr.encoder.attn;
        let (_, rest) = ga.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let (_, rest) = ga.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        let kn = &ws.e_kn[..nnz * d];
        lin_bwd(
            &ew[d * d..2 * d * d],
            kn,
            dk,
            d,
            d,
            Some(&mut *dkn),
            gwk,
            gbk,
        );
        lin_bwd(&ew[2 * d * d..], kn, dv, d, d, Some(&mut *dkn), gwv, gbv);
    }
    if sh.cfg.value_embedding {
        value_term_bwd(dkn, &ws.val[..nnz], d, &mut gr.value_emb);
    }
    let dx = zeroed(&mut ws.gt2, nnz * d);
    ln_bwd(
        &enc.layernorm_kv.weight,
        &ws.e_xhat,
        &ws.e_rstd,
        dkn,
        d,
        dx,
        &mut gr.encoder.layernorm_kv.weight,
        &mut gr.encoder.layernorm_kv.bias,
    );
    for e in 0..nnz {
        let t = ws.tok[e];
        if t == g_mask {
            continue;
        }
        let t = t as usize;
        let v = ws.val[e];
        for c in 0..d {
            gr.gene_emb[t * d + c] += v * dx[e * d + c];
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ value embedding

/// Token rows `kn` (n × d, after layernorm_kv) += v_e · u ([`Config::value_embedding`]).
fn add_value_term(kn: &mut [f32], vals: &[f32], u: &[f32], d: usize) {
    for (row, &v) in kn.chunks_exact_mut(d).zip(vals) {
        for (x, &uc) in row.iter_mut().zip(u) {
            *x += v * uc;
        }
    }
}

/// ∂L/∂u += Σ_e v_e · ∂L/∂kn_e (the other half of the token's gradient goes on
/// through layernorm_kv as before).
fn value_term_bwd(dkn: &[f32], vals: &[f32], d: usize, du: &mut [f32]) {
    for (row, &v) in dkn.chunks_exact(d).zip(vals) {
        for (g, &x) in du.iter_mut().zip(row) {
            *g += v * x;
        }
    }
}

// ------------------------------------------------------------------ a batch

/// Run a batch: forward (and backward) of every cell on `states.len()` threads.
/// Returns the statistics and, with `backward`, the gradients (in `states[0]`).
/// `emb_out` (cells·N·d) receives every cell's embedding; `emb_grad` (same layout)
/// adds an extra loss's gradient with respect to the embeddings.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_batch(
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    cells: &[TrainCell],
    states: &mut [ThreadState],
    backward: bool,
    emb_out: Option<&mut [f32]>,
    emb_grad: Option<&[f32]>,
) -> Result<StepStats> {
    if cells.is_empty() {
        return Err(Error::invalid("a training batch needs at least one cell"));
    }
    if zero_fill.len() != cfg.seq_len {
        return Err(Error::shape(format!(
            "zero-fill vector has {} values, the model has {} genes",
            zero_fill.len(),
            cfg.seq_len
        )));
    }
    if states.is_empty() {
        return Err(Error::internal("no thread states"));
    }
    let masked: usize = cells.iter().map(|c| c.mask.len()).sum();
    let classifier = cfg.num_classes.is_some();
    if masked == 0 && !classifier {
        return Err(Error::invalid(
            "a training batch needs at least one masked gene",
        ));
    }
    let norm = Norm {
        mse_w: if masked > 0 { 2.0 / masked as f32 } else { 0.0 },
        ce_w: if classifier {
            1.0 / cells.len() as f32
        } else {
            0.0
        },
    };
    let threads = states.len().min(cells.len());
    let sh = Shared::new(cfg, params, zero_fill, threads)?;
    for st in states.iter_mut() {
        st.acc.reset(cfg, backward);
    }
    let per = cells.len().div_ceil(threads);
    let nd = cfg.query_len * cfg.seq_dim;
    for (name, len) in [
        ("embedding output", emb_out.as_ref().map(|o| o.len())),
        ("embedding gradient", emb_grad.map(|g| g.len())),
    ] {
        if let Some(len) = len {
            if len != cells.len() * nd {
                return Err(Error::shape(format!(
                    "{name} has {len} values, {} cells need {}",
                    cells.len(),
                    cells.len() * nd
                )));
            }
        }
    }
    let mut outs: Vec<Option<&mut [f32]>> = match emb_out {
        Some(o) => o.chunks_mut(per * nd).map(Some).collect(),
        None => (0..threads).map(|_| None).collect(),
    };
    outs.resize_with(threads, || None);
    let shr = &sh;
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = states
            .iter_mut()
            .zip(cells.chunks(per))
            .zip(outs)
            .enumerate()
            .map(|(t, ((st, cs), mut out))| {
                s.spawn(move || -> Result<()> {
                    for (k, c) in cs.iter().enumerate() {
                        let i = t * per + k;
                        let o = out.as_deref_mut().map(|o| &mut o[k * nd..(k + 1) * nd]);
                        let gz = emb_grad.map(|g| &g[i * nd..(i + 1) * nd]);
                        cell_step(shr, c, norm, &mut st.ws, &mut st.acc, backward, o, gz)
                            .map_err(|e| e.context(format!("cell {i}")))?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first = Ok(());
        for h in hs {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::internal("training thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })?;
    let sse: f64 = states.iter().map(|s| s.acc.sse).sum();
    let ce_sum: f64 = states.iter().map(|s| s.acc.ce).sum();
    let mse = if masked > 0 { sse / masked as f64 } else { 0.0 };
    let ce = if classifier {
        ce_sum / cells.len() as f64
    } else {
        0.0
    };
    let stats = StepStats {
        loss: mse + ce,
        mse,
        ce,
        cells: cells.len(),
        masked,
    };
    if !stats.loss.is_finite() {
        return Err(
            Error::data(format!("the training loss is not finite ({})", stats.loss))
                .with_hint("lower the learning rate"),
        );
    }
    if !backward {
        return Ok(stats);
    }

    // Shared terms: α, β summed over all threads, then one pass over all genes.
    if sh.reference {
        let (first, rest) = states.split_at_mut(1);
        for st in rest.iter() {
            add_into(&mut first[0].acc.alpha, &st.acc.alpha);
            add_into(&mut first[0].acc.beta, &st.acc.beta);
        }
        let alpha: Vec<f32> = first[0].acc.alpha.iter().map(|&v| v as f32).collect();
        let beta: Vec<f32> = first[0].acc.beta.iter().map(|&v| v as f32).collect();
        let (d, n, ch, chd, g, gpad) = (sh.d, sh.n, sh.ch, sh.chd, sh.g, sh.gpad);
        let pairs = ch * n;
        let per = pairs.div_ceil(threads);
        let (alpha, beta) = (&alpha, &beta);
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = states
                .iter_mut()
                .take(threads)
                .enumerate()
                .map(|(t, st)| {
                    s.spawn(move || {
                        let tk = TrainKernels::get();
                        let mut dq = vec![0.0f32; chd];
                        let acc = &mut st.acc;
                        for pi in (t * per)..((t + 1) * per).min(pairs) {
                            let (h, i) = (pi / n, pi % n);
                            let c0 = i * d + h * chd;
                            let r = h * chd * gpad..(h + 1) * chd * gpad;
                            tk.bwd(
                                &shr.enc_qs[c0..c0 + chd],
                                shr.s1[pi],
                                1.0,
                                &alpha[c0..c0 + chd],
                                beta[pi],
                                &shr.k0t[r.clone()],
                                &shr.v0t[r.clone()],
                                gpad,
                                g,
                                &mut acc.dk0t[r.clone()],
                                &mut acc.dv0t[r.clone()],
                                &mut dq,
                            );
                            add_into(&mut acc.dqs[c0..c0 + chd], &dq);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| Error::internal("training thread panicked"))?;
            }
            Ok(())
        })?;
    }

    // Reduce every thread into states[0], in thread order (deterministic).
    {
        let (first, rest) = states.split_at_mut(1);
        let f = &mut first[0];
        for st in rest.iter() {
            f.acc.add(cfg, &st.acc, &mut f.flat);
        }
    }
    finish_grads(&sh, &mut states[0].acc);
    Ok(stats)
}

/// The batch-level parts of the backward pass, on the reduced accumulators: the
/// zero-fill keys/values of every gene back into E, the encoder queries back into
/// query_emb, the folded feed-forward gradients into the true ones.
fn finish_grads(sh: &Shared, acc: &mut Acc) {
    let (d, n, g) = (sh.d, sh.n, sh.g);
    let p = sh.p;
    let enc = &p.encoder;
    let ew = &enc.attn.in_proj_weight;
    let gr = &mut acc.grads;
    if sh.reference {
        let gpad = sh.gpad;
        let mut dk = vec![0.0f32; g * d];
        let mut dv = vec![0.0f32; g * d];
        add_from_soa(&acc.dk0t, d, gpad, g, &mut dk);
        add_from_soa(&acc.dv0t, d, gpad, g, &mut dv);
        let mut dkn = vec![0.0f32; g * d];
        let ga = &mut gr.encoder.attn;
        let (_, rest) = ga.in_proj_weight.split_at_mut(d * d);
        let (gwk, gwv) = rest.split_at_mut(d * d);
        let (_, rest) = ga.in_proj_bias.split_at_mut(d);
        let (gbk, gbv) = rest.split_at_mut(d);
        lin_bwd(
            &ew[d * d..2 * d * d],
            &sh.k0_kn,
            &dk,
            d,
            d,
            Some(&mut dkn),
            gwk,
            gbk,
        );
        lin_bwd(
            &ew[2 * d * d..],
            &sh.k0_kn,
            &dv,
            d,
            d,
            Some(&mut dkn),
            gwv,
            gbv,
        );
        if sh.cfg.value_embedding {
            value_term_bwd(&dkn, &sh.zf[..g], d, &mut gr.value_emb);
        }
        let mut dx = vec![0.0f32; g * d];
        ln_bwd(
            &enc.layernorm_kv.weight,
            &sh.k0_xhat,
            &sh.k0_rstd,
            &dkn,
            d,
            &mut dx,
            &mut gr.encoder.layernorm_kv.weight,
            &mut gr.encoder.layernorm_kv.bias,
        );
        for gi in 0..g {
            let z = sh.zf[gi];
            for c in 0..d {
                gr.gene_emb[gi * d + c] += z * dx[gi * d + c];
            }
        }
    }
    // encoder queries: qs = sc·(Wq LN_q(Q0) + bq)
    let mut dq = acc.dqs.clone();
    dq.iter_mut().for_each(|v| *v *= sh.sc_c);
    let mut dqn = vec![0.0f32; n * d];
    let ga = &mut gr.encoder.attn;
    lin_bwd(
        &ew[..d * d],
        &sh.q_qn,
        &dq,
        d,
        d,
        Some(&mut dqn),
        &mut ga.in_proj_weight[..d * d],
        &mut ga.in_proj_bias[..d],
    );
    ln_bwd(
        &enc.layernorm_q.weight,
        &sh.q_xhat,
        &sh.q_rstd,
        &dqn,
        d,
        &mut gr.query_emb,
        &mut gr.encoder.layernorm_q.weight,
        &mut gr.encoder.layernorm_q.bias,
    );
    // folded feed-forward gradients → linear1 / linear2
    let ff = sh.cfg.dim_feedforward;
    let ffpad = sh.ffpad;
    for (l, fg) in acc.ffn.iter().enumerate() {
        let gl = &mut gr.layers[l];
        for j in 0..ff {
            for c in 0..d {
                gl.linear1.weight[j * d + c] += fg.w1t[c * ffpad + j] * R2;
                gl.linear2.weight[c * ff + j] += fg.w2[c * ffpad + j] * R2;
            }
            gl.linear1.bias[j] += fg.b1[j] * R2;
        }
    }
    // the mask token's embedding is fixed at zero
    let gm = sh.cfg.seq_len;
    gr.gene_emb[gm * d..(gm + 1) * d].fill(0.0);
}
