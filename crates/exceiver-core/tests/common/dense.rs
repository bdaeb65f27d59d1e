//! A slow, straightforward reference evaluation in f64, for tests only: every one of
//! the G vocabulary genes is a key of every cell (as the reference feeds them), the
//! formulas are those of `fixtures/README.md` written out directly (no factoring, no
//! precomputed sums). Proves that the fast O(expressed genes) evaluation in
//! `exceiver_core::model::forward` (and the training forward of `train::grad`) compute
//! the same function. Test code: it lives with the tests, not in the library.

use exceiver_core::error::{Error, Result};
use exceiver_core::model::{AttentionMode, Config};
use exceiver_core::model::{CrossAttnParams, HeadParams, LayerNorm, Linear, Mha, Params};

/// Everything the dense evaluation computes for one cell.
#[derive(Debug, Clone)]
pub struct DenseOutput {
    /// Encoder output, N·d.
    pub enc_latent: Vec<f32>,
    /// Output of each process layer, N·d each (the last is the embedding).
    pub layers: Vec<Vec<f32>>,
    /// Decoder output, rows·d (query genes, then the class token for a classifier).
    pub decoder_out: Vec<f32>,
    /// Value head on the query rows.
    pub pred: Vec<f32>,
    /// Class head on the class row (classifier only).
    pub class_logits: Option<Vec<f32>>,
}

const EPS: f64 = 1e-5;

fn ln(p: &LayerNorm, x: &[f64]) -> Vec<f64> {
    let d = x.len() as f64;
    let mean = x.iter().sum::<f64>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d;
    x.iter()
        .enumerate()
        .map(|(c, v)| (v - mean) / (var + EPS).sqrt() * p.weight[c] as f64 + p.bias[c] as f64)
        .collect()
}

fn lin(p: &Linear, x: &[f64]) -> Vec<f64> {
    (0..p.out_dim)
        .map(|r| {
            p.bias[r] as f64
                + (0..p.in_dim)
                    .map(|c| p.weight[r * p.in_dim + c] as f64 * x[c])
                    .sum::<f64>()
        })
        .collect()
}

fn proj(m: &Mha, part: usize, d: usize, x: &[f64]) -> Vec<f64> {
    (0..d)
        .map(|r| {
            let row = part * d + r;
            m.in_proj_bias[row] as f64
                + (0..d)
                    .map(|c| m.in_proj_weight[row * d + c] as f64 * x[c])
                    .sum::<f64>()
        })
        .collect()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// Multi-head attention of `q` rows over `k`/`v` rows with additive `bias` per key and
/// an optional key filter. Returns the head outputs concatenated (before out_proj).
fn mha_core(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    bias: &[f64],
    keep: &[bool],
    heads: usize,
) -> Vec<Vec<f64>> {
    let d = q.first().map_or(0, |r| r.len());
    let hd = d / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    q.iter()
        .map(|qi| {
            let mut o = vec![0.0; d];
            for h in 0..heads {
                let r = h * hd..(h + 1) * hd;
                let logits: Vec<f64> = k
                    .iter()
                    .enumerate()
                    .map(|(g, kg)| {
                        if keep[g] {
                            r.clone().map(|c| qi[c] * kg[c]).sum::<f64>() * scale + bias[g]
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut zs = 0.0;
                for (g, &s) in logits.iter().enumerate() {
                    if keep[g] {
                        let e = (s - mx).exp();
                        zs += e;
                        for c in r.clone() {
                            o[c] += e * v[g][c];
                        }
                    }
                }
                for c in r.clone() {
                    o[c] /= zs;
                }
            }
            o
        })
        .collect()
}

/// The reference `CrossAttn.forward` (residual = true). `value_term`: (u per key, v per
/// key) adds v·u to each normalised key/value input ([`Config::value_embedding`]; u is
/// the same vector for every key without [`Config::value_per_gene`]).
#[allow(clippy::too_many_arguments)]
fn cross_attn(
    p: &CrossAttnParams,
    heads: usize,
    query: &[Vec<f64>],
    kv: &[Vec<f64>],
    bias: &[f64],
    keep: &[bool],
    value_term: Option<(&[&[f32]], &[f64])>,
) -> Vec<Vec<f64>> {
    let d = query.first().map_or(0, |r| r.len());
    let mut kvn: Vec<Vec<f64>> = kv.iter().map(|x| ln(&p.layernorm_kv, x)).collect();
    if let Some((us, vals)) = value_term {
        for ((x, &v), u) in kvn.iter_mut().zip(vals).zip(us) {
            for (xc, &uc) in x.iter_mut().zip(*u) {
                *xc += v * uc as f64;
            }
        }
    }
    let k: Vec<Vec<f64>> = kvn.iter().map(|x| proj(&p.attn, 1, d, x)).collect();
    let v: Vec<Vec<f64>> = kvn.iter().map(|x| proj(&p.attn, 2, d, x)).collect();
    let q: Vec<Vec<f64>> = query
        .iter()
        .map(|x| proj(&p.attn, 0, d, &ln(&p.layernorm_q, x)))
        .collect();
    let o = mha_core(&q, &k, &v, bias, keep, heads);
    o.iter()
        .zip(query)
        .map(|(oi, qi)| {
            let att = lin(&p.attn.out_proj, oi);
            let lat: Vec<f64> = att.iter().zip(qi).map(|(a, b)| a + b).collect();
            let t = ln(&p.mlp_norm0, &lat);
            let t: Vec<f64> = lin(&p.mlp_linear1, &t).into_iter().map(gelu).collect();
            let t = lin(&p.mlp_linear4, &ln(&p.mlp_norm3, &t));
            lat.iter().zip(&t).map(|(a, b)| a + b).collect()
        })
        .collect()
}

fn head(p: &HeadParams, x: &[f64]) -> Vec<f64> {
    let t: Vec<f64> = lin(&p.linear1, &ln(&p.norm, x))
        .into_iter()
        .map(gelu)
        .collect();
    lin(&p.linear2, &t)
}

fn flat(x: &[Vec<f64>]) -> Vec<f32> {
    x.iter().flat_map(|r| r.iter().map(|&v| v as f32)).collect()
}

/// Evaluate one cell densely. `genes`/`values`: the cell's expressed genes and model
/// input values; `tokens`: optional embedding rows per entry (mask token for masked
/// training input); `zero_fill`: the value of every unexpressed gene.
#[allow(clippy::too_many_arguments)]
pub fn dense_forward(
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    genes: &[u32],
    tokens: Option<&[u32]>,
    values: &[f32],
    query_ids: &[u32],
) -> Result<DenseOutput> {
    let g = cfg.seq_len;
    let d = cfg.seq_dim;
    let n = cfg.query_len;
    if zero_fill.len() != g || genes.len() != values.len() {
        return Err(Error::shape("dense_forward: inconsistent lengths"));
    }
    let reference = cfg.attention == AttentionMode::Reference;
    // Dense input: gene_ids, gene_vals, additive bias, key filter.
    let mut ids: Vec<usize> = (0..g).collect();
    let mut vals: Vec<f64> = zero_fill.iter().map(|&v| v as f64).collect();
    let mut bias = vec![1.0f64; g];
    let mut keep = vec![reference; g];
    for (e, (&gi, &v)) in genes.iter().zip(values).enumerate() {
        let gi = gi as usize;
        if gi >= g {
            return Err(Error::invalid("dense_forward: gene out of range"));
        }
        ids[gi] = tokens.map_or(gi, |t| t[e] as usize);
        vals[gi] = v as f64;
        bias[gi] = 0.0;
        keep[gi] = true;
    }
    let emb = |r: usize| -> Vec<f64> {
        params.gene_emb[r * d..(r + 1) * d]
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    let kv: Vec<Vec<f64>> = (0..g)
        .map(|gi| emb(ids[gi]).into_iter().map(|x| x * vals[gi]).collect())
        .collect();
    let q0: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            params.query_emb[i * d..(i + 1) * d]
                .iter()
                .map(|&x| x as f64)
                .collect()
        })
        .collect();
    let us: Vec<&[f32]> = (0..g)
        .map(|gi| {
            let r = if cfg.value_per_gene { ids[gi] } else { 0 };
            &params.value_emb[(r * d).min(params.value_emb.len())..]
        })
        .collect();
    let value_term = if cfg.value_embedding {
        Some((&us[..], &vals[..]))
    } else {
        None
    };
    let mut x = cross_attn(
        &params.encoder,
        cfg.cross_heads,
        &q0,
        &kv,
        &bias,
        &keep,
        value_term,
    );
    if cfg.profile {
        // Σ over the cell's unmasked genes of (v − zero fill) · profile_proj[g]
        let nd = n * d;
        for (e, (&gi, &v)) in genes.iter().zip(values).enumerate() {
            let gi = gi as usize;
            if tokens.is_some_and(|t| t[e] as usize != gi) {
                continue;
            }
            let w = v as f64 - zero_fill[gi] as f64;
            for (k, &t) in params.profile[gi * nd..(gi + 1) * nd].iter().enumerate() {
                x[k / d][k % d] += w * t as f64;
            }
        }
    }
    let enc_latent = flat(&x);
    let mut layers = Vec::new();
    let zero_bias = vec![0.0; n];
    let all = vec![true; n];
    for lp in &params.layers {
        let q: Vec<Vec<f64>> = x.iter().map(|r| proj(&lp.self_attn, 0, d, r)).collect();
        let k: Vec<Vec<f64>> = x.iter().map(|r| proj(&lp.self_attn, 1, d, r)).collect();
        let v: Vec<Vec<f64>> = x.iter().map(|r| proj(&lp.self_attn, 2, d, r)).collect();
        let o = mha_core(&q, &k, &v, &zero_bias, &all, cfg.nhead);
        x = x
            .iter()
            .zip(&o)
            .map(|(xi, oi)| {
                let sa = lin(&lp.self_attn.out_proj, oi);
                let y: Vec<f64> = xi.iter().zip(&sa).map(|(a, b)| a + b).collect();
                let y = ln(&lp.norm1, &y);
                let h: Vec<f64> = lin(&lp.linear1, &y).into_iter().map(gelu).collect();
                let f = lin(&lp.linear2, &h);
                let z: Vec<f64> = y.iter().zip(&f).map(|(a, b)| a + b).collect();
                ln(&lp.norm2, &z)
            })
            .collect();
        layers.push(flat(&x));
    }
    let mut rows: Vec<usize> = query_ids.iter().map(|&q| q as usize).collect();
    if params.class_head.is_some() && !cfg.class_embedding {
        rows.push(g + 1);
    }
    let qd: Vec<Vec<f64>> = rows.iter().map(|&r| emb(r)).collect();
    let dec = cross_attn(
        &params.decoder,
        cfg.cross_heads,
        &qd,
        &x,
        &zero_bias,
        &all,
        None,
    );
    let pred = dec[..query_ids.len()]
        .iter()
        .map(|r| head(&params.value_head, r)[0] as f32)
        .collect();
    // the class head reads the class token's decoder row, or the embedding itself
    let embedding: Vec<f64> = x.iter().flatten().copied().collect();
    let class_logits = params.class_head.as_ref().map(|h| {
        let input = if cfg.class_embedding {
            &embedding
        } else {
            &dec[query_ids.len()]
        };
        head(h, input).into_iter().map(|v| v as f32).collect()
    });
    Ok(DenseOutput {
        enc_latent,
        layers,
        decoder_out: flat(&dec),
        pred,
        class_logits,
    })
}
