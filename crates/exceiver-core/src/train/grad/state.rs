//! What a batch shares (derived from the parameters once per step), what each
//! thread accumulates, and each thread's scratch memory.

use super::encoder;
use super::{add_flat, add_into, flatten, zero_grads};
use crate::error::Result;
use crate::model::config::{AttentionMode, Config};
use crate::model::kernels::LANES;
use crate::model::weights::Params;
use crate::train::ops::{lin_fwd, ln_fwd, round_up, zeroed};

pub(super) const R2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// Feed-forward weights folded as the forward kernels want them (see
/// [`Kernels::ffn_d4`]), or their gradients in the same layout.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ffn {
    pub(super) w1t: Vec<f32>,
    pub(super) b1: Vec<f32>,
    pub(super) w2: Vec<f32>,
}

/// Everything derived from the parameters once per batch.
pub(crate) struct Shared<'a> {
    pub(super) cfg: &'a Config,
    pub(super) p: &'a Params,
    pub(super) zf: &'a [f32],
    pub(super) d: usize,
    pub(super) n: usize,
    pub(super) ch: usize,
    pub(super) chd: usize,
    pub(super) ph: usize,
    pub(super) phd: usize,
    pub(super) g: usize,
    pub(super) gpad: usize,
    pub(super) npad: usize,
    pub(super) ffpad: usize,
    pub(super) sc_c: f32,
    pub(super) sc_p: f32,
    pub(super) reference: bool,
    // encoder queries
    pub(super) q_xhat: Vec<f32>,
    pub(super) q_rstd: Vec<f32>,
    pub(super) q_qn: Vec<f32>,
    pub(super) enc_qs: Vec<f32>,
    // zero-fill keys of every gene (reference mode)
    pub(super) k0_xhat: Vec<f32>,
    pub(super) k0_rstd: Vec<f32>,
    pub(super) k0_kn: Vec<f32>,
    pub(super) k0t: Vec<f32>,
    pub(super) v0t: Vec<f32>,
    /// per (h, i), `[h·N + i]`: M0, and the shift M0 − 1 of the bias-free logits
    pub(super) m0: Vec<f32>,
    pub(super) s1: Vec<f32>,
    pub(super) zall: Vec<f64>,
    /// `[c·N + i]`
    pub(super) aall: Vec<f64>,
    pub(super) ffn: Vec<Ffn>,
}

impl<'a> Shared<'a> {
    pub(crate) fn new(
        cfg: &'a Config,
        p: &'a Params,
        zf: &'a [f32],
        threads: usize,
    ) -> Result<Shared<'a>> {
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

        encoder::zero_fill_terms(&mut sh, threads)?;
        Ok(sh)
    }
}

/// Gradient accumulators of one thread.
pub(crate) struct Acc {
    pub grads: Params,
    pub(super) ffn: Vec<Ffn>,
    /// ∂ of the zero-fill keys / values of every gene, `[c·gpad + g]`
    pub(super) dk0t: Vec<f32>,
    pub(super) dv0t: Vec<f32>,
    /// ∂ of the scaled encoder queries, `[i·d + c]`
    pub(super) dqs: Vec<f32>,
    /// α `[i·d + c]` and β `[h·N + i]` of the shared terms
    pub(super) alpha: Vec<f64>,
    pub(super) beta: Vec<f64>,
    pub(super) sse: f64,
    pub(super) ce: f64,
}

impl Acc {
    pub(super) fn new(cfg: &Config) -> Acc {
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

    pub(super) fn reset(&mut self, cfg: &Config, backward: bool) {
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
    pub(super) fn add(&mut self, cfg: &Config, o: &Acc, flat: &mut Vec<f32>) {
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
pub(super) struct MlpWs {
    pub(super) xhat0: Vec<f32>,
    pub(super) rstd0: Vec<f32>,
    pub(super) t0: Vec<f32>,
    pub(super) t1: Vec<f32>,
    pub(super) t2: Vec<f32>,
    pub(super) xhat3: Vec<f32>,
    pub(super) rstd3: Vec<f32>,
    pub(super) t3: Vec<f32>,
}

/// What an output head's forward keeps for its backward ([`super::head_fwd`]).
#[derive(Default)]
pub(crate) struct HeadWs {
    pub(super) xhat: Vec<f32>,
    pub(super) rstd: Vec<f32>,
    pub(super) hn: Vec<f32>,
    pub(super) a1: Vec<f32>,
    pub(super) g1: Vec<f32>,
}

#[derive(Default)]
pub(super) struct LayerWs {
    pub(super) xin: Vec<f32>,
    pub(super) qs: Vec<f32>,
    pub(super) kt: Vec<f32>,
    pub(super) vt: Vec<f32>,
    pub(super) m: Vec<f32>,
    pub(super) z: Vec<f64>,
    pub(super) o: Vec<f32>,
    pub(super) xhat1: Vec<f32>,
    pub(super) rstd1: Vec<f32>,
    pub(super) x1: Vec<f32>,
    pub(super) x1t: Vec<f32>,
    pub(super) xhat2: Vec<f32>,
    pub(super) rstd2: Vec<f32>,
}

/// Scratch memory of one thread, reused across cells and steps.
#[derive(Default)]
pub(crate) struct Ws {
    pub(super) stamp: Vec<u32>,
    pub(super) epoch: u32,
    // encoder
    pub(super) tok: Vec<u32>,
    pub(super) val: Vec<f32>,
    pub(super) e_xhat: Vec<f32>,
    pub(super) e_rstd: Vec<f32>,
    pub(super) e_kn: Vec<f32>,
    pub(super) e_kt: Vec<f32>,
    pub(super) e_vt: Vec<f32>,
    pub(super) e_k0: Vec<f32>,
    pub(super) e_v0: Vec<f32>,
    pub(super) e_m: Vec<f32>,
    pub(super) e_z: Vec<f64>,
    pub(super) e_o: Vec<f32>,
    pub(super) e_lat: Vec<f32>,
    pub(super) e_mlp: MlpWs,
    // process
    pub(super) layers: Vec<LayerWs>,
    pub(super) xl: Vec<f32>,
    // decoder
    pub(super) rows: Vec<u32>,
    pub(super) targets: Vec<f32>,
    pub(super) d_xhat: Vec<f32>,
    pub(super) d_rstd: Vec<f32>,
    pub(super) d_kn: Vec<f32>,
    pub(super) d_kt: Vec<f32>,
    pub(super) d_vt: Vec<f32>,
    pub(super) d_qe: Vec<f32>,
    pub(super) d_qxhat: Vec<f32>,
    pub(super) d_qrstd: Vec<f32>,
    pub(super) d_qn: Vec<f32>,
    pub(super) d_qs: Vec<f32>,
    pub(super) d_m: Vec<f32>,
    pub(super) d_z: Vec<f64>,
    pub(super) d_o: Vec<f32>,
    pub(super) d_lat: Vec<f32>,
    pub(super) d_mlp: MlpWs,
    pub(super) dec: Vec<f32>,
    pub(super) vhead: HeadWs,
    pub(super) chead: HeadWs,
    /// ∂ of the cell embedding from a class head that reads it (N·d)
    pub(super) d_cls: Vec<f32>,
    pub(super) pred: Vec<f32>,
    pub(super) logits: Vec<f32>,
    // backward scratch
    pub(super) g1: Vec<f32>,
    pub(super) g2: Vec<f32>,
    pub(super) g3: Vec<f32>,
    pub(super) g4: Vec<f32>,
    pub(super) g5: Vec<f32>,
    pub(super) gt1: Vec<f32>,
    pub(super) gt2: Vec<f32>,
    pub(super) gt3: Vec<f32>,
    pub(super) gt4: Vec<f32>,
    pub(super) dq: Vec<f32>,
    pub(super) sums: Vec<f64>,
    pub(super) scratch: Vec<f32>,
}

/// Per-thread state kept across steps.
pub(crate) struct ThreadState {
    pub ws: Ws,
    pub acc: Acc,
    pub(super) flat: Vec<f32>,
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
