//! Interpretability: the encoder's attention over a cell's genes.
//!
//! For each latent query, the softmax weight its attention (averaged over heads) puts
//! on each of the cell's expressed genes, computed directly (over every vocabulary
//! gene in the reference mode, so the weights are exactly the model's). This is for
//! inspecting single cells, not a hot path: O(vocabulary × latents) per cell.

use super::config::AttentionMode;
use super::forward::Exceiver;
use super::nn::{layer_norm, linear_rows};
use crate::error::{Error, Result};

/// Head-averaged encoder attention of every latent over the cell's genes:
/// `[latent][entry]` (N × n, row-major), plus, per latent, the total weight on the
/// cell's expressed genes (the rest goes to zero-count genes in the reference mode).
pub struct EncoderAttention {
    pub weights: Vec<f32>,
    pub expressed_mass: Vec<f32>,
    pub n_latents: usize,
    pub n_entries: usize,
}

impl Exceiver {
    /// The encoder's attention for a cell given as vocabulary indices and model input
    /// values of its expressed genes (see [`crate::preprocess`]).
    pub fn encoder_attention(&self, genes: &[u32], values: &[f32]) -> Result<EncoderAttention> {
        let cfg = self.config();
        let p = self.params();
        let (d, g_all, nq, h) = (cfg.seq_dim, cfg.seq_len, cfg.query_len, cfg.cross_heads);
        if genes.len() != values.len() {
            return Err(Error::shape(format!(
                "{} genes but {} values",
                genes.len(),
                values.len()
            )));
        }
        if let Some(&g) = genes.iter().find(|&&g| g as usize >= g_all) {
            return Err(Error::invalid(format!(
                "gene index {g} out of range for {g_all} genes"
            )));
        }
        let hd = d / h;
        let scale = 1.0 / (hd as f32).sqrt();
        let enc = &p.encoder;
        let (w, b) = (&enc.attn.in_proj_weight, &enc.attn.in_proj_bias);
        // latent queries
        let mut q = vec![0.0f32; nq * d];
        let mut tmp = vec![0.0f32; d];
        for i in 0..nq {
            layer_norm(&enc.layernorm_q, &p.query_emb[i * d..(i + 1) * d], &mut tmp);
            linear_rows(&w[..d * d], &b[..d], d, &tmp, &mut q[i * d..(i + 1) * d]);
        }
        let key = |g: usize, v: f32, out: &mut [f32]| {
            let x: Vec<f32> = p.gene_emb[g * d..(g + 1) * d]
                .iter()
                .map(|e| e * v)
                .collect();
            let mut kn = vec![0.0f32; d];
            layer_norm(&enc.layernorm_kv, &x, &mut kn);
            if cfg.value_embedding {
                let r = if cfg.value_per_gene { g } else { 0 };
                for (k, u) in kn.iter_mut().zip(&p.value_emb[r * d..(r + 1) * d]) {
                    *k += v * u;
                }
            }
            linear_rows(&w[d * d..2 * d * d], &b[d..2 * d], d, &kn, out);
        };
        let n = genes.len();
        let mut k = vec![0.0f32; n * d];
        for (e, (&g, &v)) in genes.iter().zip(values).enumerate() {
            key(g as usize, v, &mut k[e * d..(e + 1) * d]);
        }
        // zero-count genes take part in the reference mode, with logit bias +1
        let mut k0: Vec<f32> = Vec::new();
        if cfg.attention == AttentionMode::Reference {
            let mut expressed = vec![false; g_all];
            genes.iter().for_each(|&g| expressed[g as usize] = true);
            let zf = self.zero_fill();
            let mut row = vec![0.0f32; d];
            for g in 0..g_all {
                if !expressed[g] {
                    key(g, zf[g], &mut row);
                    k0.extend_from_slice(&row);
                }
            }
        }
        let n0 = k0.len() / d.max(1);
        let mut weights = vec![0.0f32; nq * n];
        let mut mass = vec![0.0f32; nq];
        let mut s = vec![0.0f64; n];
        let mut s0 = vec![0.0f64; n0];
        for i in 0..nq {
            for hh in 0..h {
                let qi = &q[i * d + hh * hd..i * d + (hh + 1) * hd];
                let dot = |kr: &[f32]| -> f64 {
                    (qi.iter()
                        .zip(&kr[hh * hd..(hh + 1) * hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale) as f64
                };
                let mut m = f64::NEG_INFINITY;
                for e in 0..n {
                    s[e] = dot(&k[e * d..(e + 1) * d]);
                    m = m.max(s[e]);
                }
                for e in 0..n0 {
                    s0[e] = dot(&k0[e * d..(e + 1) * d]) + 1.0;
                    m = m.max(s0[e]);
                }
                let z: f64 = s.iter().chain(s0.iter()).map(|x| (x - m).exp()).sum();
                for e in 0..n {
                    let pw = ((s[e] - m).exp() / z) as f32 / h as f32;
                    weights[i * n + e] += pw;
                    mass[i] += pw;
                }
            }
        }
        Ok(EncoderAttention {
            weights,
            expressed_mass: mass,
            n_latents: nq,
            n_entries: n,
        })
    }
}
