//! The model's tensors on a candle device and the batched forward pass, shared by
//! inference ([`super::DeviceModel`]) and training ([`super::DeviceTrainer`], where the
//! tensors are autograd `Var`s). Everything is f32 and differentiable; the maxima
//! used to shift exponentials are detached (they cancel in every ratio).
//!
//! # The encoder on a batch
//!
//! A batch's expressed genes are padded to `[B, L]` (L = most expressed genes in the
//! batch); a padding key gets the logit bias `PAD` = −1e30, so that its exponential is
//! exactly 0. In the reference attention mode every vocabulary gene is a key: an
//! unexpressed gene g enters with its zero-fill value and a +1 logit bias, with a term
//! `z_g = exp(t0_g + 1 − M0)` (and `z_g·v0_g`) that depends on the model only. The sum
//! of those terms over a cell's *unexpressed* genes is a product of the batch's 0/1
//! matrix `notexpr [B, G]` with the `[G, H·N·(1 + hd)]` term matrix: one dense GEMM per
//! batch, a sum of positive terms with no cancellation (subtracting the expressed genes'
//! terms from the all-gene sum would lose precision in f32). The expressed genes'
//! terms use the cell's logits. Both are scaled to a common shift
//! `m = max(M0, max_S logit)` per cell, latent and head.

use super::fused::ProcessLayer;
use crate::model::config::{AttentionMode, Config};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;

/// LayerNorm epsilon of every norm (PyTorch's default).
pub(crate) const LN_EPS: f64 = 1e-5;
/// Additive logit bias of a padding key.
pub(crate) const PAD: f32 = -1e30;

/// `nn.LayerNorm` weights.
pub(crate) struct Ln {
    w: Tensor,
    b: Tensor,
}

/// `nn.Linear` weights, `w` is `[out, in]`.
pub(crate) struct Lin {
    w: Tensor,
    b: Tensor,
}

/// Packed q/k/v projections (views of `in_proj_weight` / `in_proj_bias`) and `out_proj`.
pub(crate) struct Mha {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
}

/// The reference's `CrossAttn`.
pub(crate) struct Cross {
    ln_kv: Ln,
    ln_q: Ln,
    attn: Mha,
    mlp0: Ln,
    mlp1: Lin,
    mlp3: Ln,
    mlp4: Lin,
}

/// One post-norm Transformer encoder layer.
pub(crate) struct Layer {
    attn: Mha,
    l1: Lin,
    l2: Lin,
    n1: Ln,
    n2: Ln,
}

/// `LN → Linear → GELU → Linear`.
pub(crate) struct Head {
    ln: Ln,
    l1: Lin,
    l2: Lin,
}

/// Every tensor of an Exceiver, on one device.
pub(crate) struct Net {
    pub(crate) gene_emb: Tensor,
    query_emb: Tensor,
    enc: Cross,
    layers: Vec<Layer>,
    dec: Cross,
    vhead: Head,
    chead: Option<Head>,
    /// `value_emb` `[d]` with [`Config::value_embedding`] (`[emb_rows, d]` with
    /// [`Config::value_per_gene`]): `v·u` (`v·u[g]`) is added to each token after
    /// `layernorm_kv`.
    value_emb: Option<Tensor>,
    /// `profile_proj` `[G, N·d]` with [`Config::profile`].
    profile: Option<Tensor>,
}

/// The model-only terms of the reference attention (see the module docs).
pub(crate) struct ZeroTerms {
    /// `M0` per (head, latent): the largest zero-fill logit, +1 bias included, `[1, H, N, 1]`.
    m0: Tensor,
    /// Rows `h·N + i`: `z_g`; then rows `H·N + (h·N + i)·hd + j`: `z_g·v0_g[j]`; `[H·N·(1+hd), G]`.
    terms: Tensor,
}

/// A batch's encoder input on the device.
pub(crate) struct EncIn {
    pub(crate) b: usize,
    pub(crate) l: usize,
    /// Embedding row per entry, `B·L` of them (gene, or the mask token G).
    tok: RowIds,
    /// Model input value per entry `[B, L, 1]`.
    val: Tensor,
    /// 0 for a key, `PAD` for padding, `[B, 1, L]`.
    pad: Tensor,
    /// 1 where a vocabulary gene is *not* expressed, `[B, G]` (reference mode).
    notexpr: Option<Tensor>,
    /// 1 for a cell with expressed genes, 0 for an empty one, `[B, 1, 1, 1]`; only
    /// when the batch has an empty cell (possible in the reference mode).
    nonempty: Option<Tensor>,
    /// The profile path's input `[B, G]` ([`Config::profile`]).
    profile: Option<Tensor>,
}

/// Host-side form of [`EncIn`] (see [`super::pack`]).
pub(crate) struct EncHost {
    pub(crate) b: usize,
    pub(crate) l: usize,
    pub(crate) tok: Vec<u32>,
    pub(crate) val: Vec<f32>,
    pub(crate) pad: Vec<f32>,
    /// 1 where a vocabulary gene is expressed, `[B·G]` (reference mode).
    pub(crate) expressed: Option<Vec<u8>>,
    /// 1 per cell with expressed genes, 0 per empty cell; `None` when none is empty.
    pub(crate) nonempty: Option<Vec<f32>>,
    /// `v_g − zero_fill_g` of every unmasked gene, `[B·G]` ([`Config::profile`]).
    pub(crate) profile: Option<Vec<f32>>,
}

/// Embedding rows to gather. For inference a plain `index_select`. For training the
/// ids are split into groups that each gather from their own (broadcast) copy of the
/// table: the backward pass of `index_select` is candle's CUDA `index_add`, which
/// runs one thread per table column and loops over all ids (4 threads for d = 4, over
/// ~10^5 ids per batch); the grouped gather's backward is a `scatter_add` with one
/// thread per (group, column) looping over one group's ids, and a sum over groups.
pub(crate) enum RowIds {
    Select(Tensor),
    Grouped {
        /// `[P, S, d]`: group p's S ids, each repeated over the d columns
        ids: Tensor,
        groups: usize,
        n: usize,
    },
}

/// Elements of the per-group table copies of a grouped gather (2^24 f32: 64 MiB).
const GROUPED_COPY_ELEMENTS: usize = 1 << 24;

impl RowIds {
    /// `ids` index a table of `rows × d`; `pad_row` fills the last group.
    pub(crate) fn new(
        ids: &[u32],
        pad_row: u32,
        rows: usize,
        d: usize,
        grouped: bool,
        dev: &Device,
    ) -> Result<RowIds> {
        let n = ids.len();
        if !grouped {
            return Ok(RowIds::Select(Tensor::from_slice(ids, n, dev)?));
        }
        let groups = n
            .div_ceil(64)
            .min(256)
            .min((GROUPED_COPY_ELEMENTS / (rows * d).max(1)).max(1))
            .max(1);
        let per = n.div_ceil(groups).max(1);
        let mut v = Vec::with_capacity(groups * per * d);
        for k in 0..groups * per {
            let id = ids.get(k).copied().unwrap_or(pad_row);
            v.extend(std::iter::repeat_n(id, d));
        }
        Ok(RowIds::Grouped {
            ids: Tensor::from_vec(v, (groups, per, d), dev)?,
            groups,
            n,
        })
    }

    /// The rows, `[n, d]`.
    pub(crate) fn gather(&self, table: &Tensor) -> Result<Tensor> {
        match self {
            RowIds::Select(ids) => table.index_select(ids, 0),
            RowIds::Grouped { ids, groups, n } => {
                let (rows, d) = table.dims2()?;
                let per = ids.dim(1)?;
                table
                    .unsqueeze(0)?
                    .broadcast_as((*groups, rows, d))?
                    .contiguous()?
                    .gather(ids, 1)?
                    .reshape((groups * per, d))?
                    .narrow(0, 0, *n)
            }
        }
    }
}

impl EncIn {
    /// `grouped`: gather embedding rows for training (see [`RowIds`]).
    pub(crate) fn upload(h: &EncHost, cfg: &Config, dev: &Device, grouped: bool) -> Result<EncIn> {
        let g = cfg.seq_len;
        let (b, l) = (h.b, h.l);
        let notexpr = match &h.expressed {
            Some(e) => Some(
                Tensor::from_slice(e, (b, g), dev)?
                    .to_dtype(DType::F32)?
                    .affine(-1.0, 1.0)?,
            ),
            None => None,
        };
        let nonempty = match &h.nonempty {
            Some(v) => Some(Tensor::from_slice(v, (b, 1, 1, 1), dev)?),
            None => None,
        };
        Ok(EncIn {
            b,
            l,
            tok: RowIds::new(&h.tok, g as u32, cfg.emb_rows(), cfg.seq_dim, grouped, dev)?,
            val: Tensor::from_slice(&h.val, (b, l, 1), dev)?,
            pad: Tensor::from_slice(&h.pad, (b, 1, l), dev)?,
            notexpr,
            nonempty,
            profile: match &h.profile {
                Some(p) => Some(Tensor::from_slice(p, (b, g), dev)?),
                None => None,
            },
        })
    }
}

fn lin(w: Tensor, b: Tensor) -> Lin {
    Lin { w, b }
}

impl Net {
    /// Assemble from tensors named as in the reference `state_dict` (see
    /// [`crate::model::Params::visit`]).
    pub(crate) fn build(cfg: &Config, t: &HashMap<String, Tensor>) -> Result<Net> {
        let get = |name: &str| -> Result<Tensor> {
            t.get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
        };
        let d = cfg.seq_dim;
        let ln = |p: &str| -> Result<Ln> {
            Ok(Ln {
                w: get(&format!("{p}.weight"))?,
                b: get(&format!("{p}.bias"))?,
            })
        };
        let linear = |p: &str| -> Result<Lin> {
            Ok(lin(
                get(&format!("{p}.weight"))?,
                get(&format!("{p}.bias"))?,
            ))
        };
        let mha = |p: &str| -> Result<Mha> {
            let w = get(&format!("{p}.in_proj_weight"))?;
            let b = get(&format!("{p}.in_proj_bias"))?;
            let part = |k: usize| -> Result<Lin> {
                Ok(lin(w.narrow(0, k * d, d)?, b.narrow(0, k * d, d)?))
            };
            Ok(Mha {
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                out: linear(&format!("{p}.out_proj"))?,
            })
        };
        let cross = |p: &str| -> Result<Cross> {
            Ok(Cross {
                ln_kv: ln(&format!("{p}.layernorm_kv"))?,
                ln_q: ln(&format!("{p}.layernorm_q"))?,
                attn: mha(&format!("{p}.cross_attn"))?,
                mlp0: ln(&format!("{p}.mlp.0"))?,
                mlp1: linear(&format!("{p}.mlp.1"))?,
                mlp3: ln(&format!("{p}.mlp.3"))?,
                mlp4: linear(&format!("{p}.mlp.4"))?,
            })
        };
        let head = |p: &str| -> Result<Head> {
            Ok(Head {
                ln: ln(&format!("{p}.0"))?,
                l1: linear(&format!("{p}.1"))?,
                l2: linear(&format!("{p}.3"))?,
            })
        };
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let p = format!("process_self_attn.transformer.layers.{l}");
                Ok(Layer {
                    attn: mha(&format!("{p}.self_attn"))?,
                    l1: linear(&format!("{p}.linear1"))?,
                    l2: linear(&format!("{p}.linear2"))?,
                    n1: ln(&format!("{p}.norm1"))?,
                    n2: ln(&format!("{p}.norm2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Net {
            gene_emb: get("gene_emb.weight")?,
            query_emb: get("query_emb")?,
            enc: cross("encoder_cross_attn")?,
            layers,
            dec: cross("decoder_cross_attn")?,
            vhead: head("mlp")?,
            chead: if cfg.num_classes.is_some() {
                Some(head("mlp_classify")?)
            } else {
                None
            },
            value_emb: if cfg.value_embedding {
                Some(get(crate::model::weights::VALUE_EMB)?)
            } else {
                None
            },
            profile: if cfg.profile {
                Some(get(crate::model::weights::PROFILE)?)
            } else {
                None
            },
        })
    }

    /// The encoder's latent queries `[H, N, hd]`, projected and scaled by 1/√hd.
    pub(crate) fn enc_queries(&self, cfg: &Config) -> Result<Tensor> {
        let (n, d, h) = (cfg.query_len, cfg.seq_dim, cfg.cross_heads);
        let hd = d / h;
        let qn = layer_norm(&self.query_emb, &self.enc.ln_q)?;
        let q = linear(&qn, &self.enc.attn.q)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?;
        q.reshape((n, h, hd))?.transpose(0, 1)?.contiguous()
    }

    /// The zero-fill terms of the reference attention; `zf` is `[G, 1]`.
    pub(crate) fn zero_terms(&self, cfg: &Config, q: &Tensor, zf: &Tensor) -> Result<ZeroTerms> {
        let (g, n, d, h) = (cfg.seq_len, cfg.query_len, cfg.seq_dim, cfg.cross_heads);
        let hd = d / h;
        let x0 = self.gene_emb.narrow(0, 0, g)?.broadcast_mul(zf)?;
        let mut kn = layer_norm(&x0, &self.enc.ln_kv)?;
        if let Some(u) = &self.value_emb {
            let u = if cfg.value_per_gene {
                u.narrow(0, 0, g)?
            } else {
                u.unsqueeze(0)?
            };
            kn = (kn + zf.broadcast_mul(&u)?)?;
        }
        // [G, d] → [H, G, hd]
        let split =
            |t: Tensor| -> Result<Tensor> { t.reshape((g, h, hd))?.transpose(0, 1)?.contiguous() };
        let k0 = split(linear(&kn, &self.enc.attn.k)?)?;
        let v0 = split(linear(&kn, &self.enc.attn.v)?)?;
        let t0 = q.matmul(&k0.transpose(1, 2)?)?; // [H, N, G]
        let m1 = t0.max_keepdim(2)?.detach(); // [H, N, 1]
        let z = t0.broadcast_sub(&m1)?.exp()?;
        // z_g·v0_g[j]: [H, N, 1, G] × [H, 1, hd, G] → [H, N, hd, G]
        let zv = z
            .unsqueeze(2)?
            .broadcast_mul(&v0.transpose(1, 2)?.unsqueeze(1)?)?;
        let terms = Tensor::cat(&[z.reshape((h * n, g))?, zv.reshape((h * n * hd, g))?], 0)?;
        Ok(ZeroTerms {
            m0: (m1 + 1.0)?.reshape((1, h, n, 1))?,
            terms,
        })
    }

    /// Encoder output `[B, N, d]` for a batch. `zt` is `Some` in the reference mode.
    pub(crate) fn encode(
        &self,
        cfg: &Config,
        q: &Tensor,
        zt: Option<&ZeroTerms>,
        x: &EncIn,
    ) -> Result<Tensor> {
        let (b, l) = (x.b, x.l);
        let (n, d, h) = (cfg.query_len, cfg.seq_dim, cfg.cross_heads);
        let hd = d / h;
        let dev = q.device();
        let enc = &self.enc;
        let kv = x
            .tok
            .gather(&self.gene_emb)?
            .reshape((b, l, d))?
            .broadcast_mul(&x.val)?;
        let mut kn = layer_norm(&kv, &enc.ln_kv)?;
        if let Some(u) = &self.value_emb {
            // [B, L, 1] · [1, 1, d], or per gene [B, L, 1] · [B, L, d]
            let u = if cfg.value_per_gene {
                x.tok.gather(u)?.reshape((b, l, d))?
            } else {
                u.reshape((1, 1, d))?
            };
            kn = (kn + x.val.broadcast_mul(&u)?)?;
        }
        let k = heads(&linear(&kn, &enc.attn.k)?, h)?; // [B, H, L, hd]
        let v = heads(&linear(&kn, &enc.attn.v)?, h)?;
        let (e, m) = if hd == 1 {
            // For a scalar head, max_l q·k_l = max(q·max k, q·min k).
            let kk = k.squeeze(3)?; // [B, H, L]
            let kmax = kk.broadcast_add(&x.pad)?.max_keepdim(2)?;
            let kmin = kk.broadcast_sub(&x.pad)?.min_keepdim(2)?;
            let qq = q.reshape((1, h, n))?;
            let mut m = qq
                .broadcast_mul(&kmax)?
                .maximum(&qq.broadcast_mul(&kmin)?)?
                .unsqueeze(3)?; // [B, H, N, 1]
            if let Some(ne) = &x.nonempty {
                // an empty cell has only padding (kmin = +1e30): its own maximum is −∞
                m = m
                    .broadcast_mul(ne)?
                    .broadcast_add(&ne.affine(-PAD as f64, PAD as f64)?)?;
            }
            if let Some(zt) = zt {
                m = m.broadcast_maximum(&zt.m0)?;
            }
            let m = m.detach();
            // logit − m + pad in one product: [q, −m, 1] · [k, 1, pad]
            let qa = Tensor::cat(
                &[
                    q.unsqueeze(0)?.broadcast_as((b, h, n, 1))?,
                    m.neg()?,
                    Tensor::ones((b, h, n, 1), DType::F32, dev)?,
                ],
                3,
            )?
            .contiguous()?;
            let ka = Tensor::cat(
                &[
                    k,
                    Tensor::ones((b, h, l, 1), DType::F32, dev)?,
                    x.pad.reshape((b, 1, l, 1))?.broadcast_as((b, h, l, 1))?,
                ],
                3,
            )?
            .contiguous()?;
            (qa.matmul(&ka.transpose(2, 3)?)?.exp()?, m)
        } else {
            let qb = q.unsqueeze(0)?.broadcast_as((b, h, n, hd))?.contiguous()?;
            let s = qb
                .matmul(&k.transpose(2, 3)?)?
                .broadcast_add(&x.pad.unsqueeze(1)?)?; // [B, H, N, L]
            let mut m = s.max_keepdim(3)?;
            if let Some(zt) = zt {
                m = m.broadcast_maximum(&zt.m0)?;
            }
            let m = m.detach();
            (s.broadcast_sub(&m)?.exp()?, m)
        };
        // Σ_l e·[v, 1]: the value sums and the normaliser in one product
        let va =
            Tensor::cat(&[v, Tensor::ones((b, h, l, 1), DType::F32, dev)?], 3)?.contiguous()?;
        let av = e.matmul(&va)?; // [B, H, N, hd + 1]
        let mut a = av.narrow(3, 0, hd)?;
        let mut z = av.narrow(3, hd, 1)?;
        if let (Some(zt), Some(notexpr)) = (zt, &x.notexpr) {
            let r = notexpr.matmul(&zt.terms.t()?)?; // [B, H·N·(1 + hd)]
            let rz = r.narrow(1, 0, h * n)?.reshape((b, h, n, 1))?;
            let ra = r.narrow(1, h * n, h * n * hd)?.reshape((b, h, n, hd))?;
            let f = zt.m0.broadcast_sub(&m)?.exp()?; // [B, H, N, 1]
            z = (z + rz.mul(&f)?)?;
            a = (a + ra.broadcast_mul(&f)?)?;
        }
        let o = a.broadcast_div(&z)?.transpose(1, 2)?.reshape((b, n, d))?;
        let lat = linear(&o, &enc.attn.out)?.broadcast_add(&self.query_emb)?;
        let out = cross_mlp(&lat, enc)?;
        match (&self.profile, &x.profile) {
            (Some(w), Some(p)) => out + p.matmul(w)?.reshape((b, n, d))?,
            _ => Ok(out),
        }
    }

    /// The process stack on `[B, N, d]`; returns the output of every layer when `all`,
    /// else only the last one. With `fused` (each layer's [`Net::fused_weights`]) every
    /// layer is one [`ProcessLayer`] op (inference only: no backward pass).
    pub(crate) fn process(
        &self,
        cfg: &Config,
        x: &Tensor,
        all: bool,
        fused: Option<&[Tensor]>,
    ) -> Result<Vec<Tensor>> {
        let mut outs = Vec::new();
        let mut x = x.clone();
        let op = ProcessLayer {
            d: cfg.seq_dim,
            heads: cfg.nhead,
            ff: cfg.dim_feedforward,
            eps: LN_EPS as f32,
        };
        for (l, lp) in self.layers.iter().enumerate() {
            x = match fused.and_then(|w| w.get(l)) {
                Some(w) => x.contiguous()?.apply_op2_no_bwd(w, &op)?,
                None => self.layer(cfg, &x, lp)?,
            };
            if all {
                outs.push(x.clone());
            }
        }
        if !all {
            outs.push(x);
        }
        Ok(outs)
    }

    /// Each process layer's weights packed for [`ProcessLayer`], in the order of
    /// `fused.rs`'s offsets: in_proj weight and bias (q, k, v), out_proj, norm1,
    /// linear1, linear2, norm2.
    pub(crate) fn fused_weights(&self) -> Result<Vec<Tensor>> {
        self.layers
            .iter()
            .map(|lp| {
                let a = &lp.attn;
                let parts = [
                    &a.q.w, &a.k.w, &a.v.w, &a.q.b, &a.k.b, &a.v.b, &a.out.w, &a.out.b, &lp.n1.w,
                    &lp.n1.b, &lp.l1.w, &lp.l1.b, &lp.l2.w, &lp.l2.b, &lp.n2.w, &lp.n2.b,
                ];
                let flat = parts
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&flat, 0)?.contiguous()
            })
            .collect()
    }

    fn layer(&self, cfg: &Config, x: &Tensor, lp: &Layer) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = cfg.nhead;
        let hd = d / h;
        let q = heads(&linear(x, &lp.attn.q)?, h)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?;
        let k = heads(&linear(x, &lp.attn.k)?, h)?;
        let v = heads(&linear(x, &lp.attn.v)?, h)?;
        let o = attention(&q, &k, &v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let y = (x + linear(&o, &lp.attn.out)?)?;
        let x1 = layer_norm(&y, &lp.n1)?;
        let f = linear(&linear(&x1, &lp.l1)?.gelu_erf()?, &lp.l2)?;
        layer_norm(&(x1 + f)?, &lp.n2)
    }

    /// Decoder output `[B, Q, d]`: queries are the embedding rows `rows` (B·Q of
    /// them), keys and values the processed latent `[B, N, d]`.
    pub(crate) fn decode(&self, cfg: &Config, lat: &Tensor, rows: &RowIds) -> Result<Tensor> {
        let (b, _, d) = lat.dims3()?;
        let eq = rows.gather(&self.gene_emb)?;
        let q_len = eq.dim(0)? / b.max(1);
        let h = cfg.cross_heads;
        let hd = d / h;
        let dec = &self.dec;
        let eq = eq.reshape((b, q_len, d))?;
        let qn = layer_norm(&eq, &dec.ln_q)?;
        let q = heads(&linear(&qn, &dec.attn.q)?, h)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?;
        let kn = layer_norm(lat, &dec.ln_kv)?;
        let k = heads(&linear(&kn, &dec.attn.k)?, h)?;
        let v = heads(&linear(&kn, &dec.attn.v)?, h)?;
        let o = attention(&q, &k, &v)?
            .transpose(1, 2)?
            .reshape((b, q_len, d))?;
        let out = (linear(&o, &dec.attn.out)? + eq)?;
        cross_mlp(&out, dec)
    }

    /// Value head on `[B, Q, d]` → `[B, Q]`.
    pub(crate) fn value_head(&self, x: &Tensor) -> Result<Tensor> {
        head(x, &self.vhead)?.squeeze(2)
    }

    /// Class head on `[B, d]` (the class token's decoder row) or `[B, N·d]` (the embedding,
    /// `class_embedding`) → `[B, C]` (classifiers only).
    pub(crate) fn class_head(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.chead {
            Some(hp) => Ok(Some(head(x, hp)?)),
            None => Ok(None),
        }
    }
}

/// Whether the encoder attends to every vocabulary gene (and needs [`ZeroTerms`]).
pub(crate) fn needs_zero_terms(cfg: &Config) -> bool {
    cfg.attention == AttentionMode::Reference
}

/// `[.., L, d]` → `[.., H, L, d/H]` for `[B, L, d]` inputs (contiguous).
fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    x.reshape((b, l, h, d / h))?.transpose(1, 2)?.contiguous()
}

/// Softmax attention `[B, H, Q, hd]` over keys `[B, H, K, hd]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let s = q.matmul(&k.transpose(2, 3)?)?;
    let m = s.max_keepdim(3)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    e.matmul(v)?.broadcast_div(&e.sum_keepdim(3)?)
}

/// LayerNorm over the last dimension.
fn layer_norm(x: &Tensor, ln: &Ln) -> Result<Tensor> {
    let last = x.rank() - 1;
    let mean = x.mean_keepdim(last)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(last)?;
    let rstd = (var + LN_EPS)?.sqrt()?.recip()?;
    xc.broadcast_mul(&rstd)?
        .broadcast_mul(&ln.w)?
        .broadcast_add(&ln.b)
}

/// `x W^T + b` over the last dimension.
fn linear(x: &Tensor, l: &Lin) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (out, inp) = l.w.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    let y = x
        .reshape((rows, inp))?
        .matmul(&l.w.t()?)?
        .broadcast_add(&l.b)?;
    let mut od = dims;
    if let Some(last) = od.last_mut() {
        *last = out;
    }
    y.reshape(od)
}

/// The `CrossAttn` MLP with residual: `x + L4(LN3(GELU(L1(LN0(x)))))`.
fn cross_mlp(x: &Tensor, p: &Cross) -> Result<Tensor> {
    let t = linear(&layer_norm(x, &p.mlp0)?, &p.mlp1)?.gelu_erf()?;
    x + linear(&layer_norm(&t, &p.mlp3)?, &p.mlp4)?
}

/// An output head `L2(GELU(L1(LN(x))))`.
fn head(x: &Tensor, p: &Head) -> Result<Tensor> {
    linear(&linear(&layer_norm(x, &p.ln)?, &p.l1)?.gelu_erf()?, &p.l2)
}
