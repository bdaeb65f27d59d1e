//! Model hyperparameters: the shape of an Exceiver and how its encoder attends.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the encoder's latent queries attend over a cell's genes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionMode {
    /// The published model's semantics: every vocabulary gene is a key. A gene the cell
    /// does not express takes part with its zero-fill value (the z-scored zero count)
    /// and a +1 additive logit bias, because the reference passes a *float*
    /// `key_padding_mask` that PyTorch adds to the logits. Evaluated exactly in
    /// O(expressed genes) per cell from sums precomputed once per model.
    #[default]
    Reference,
    /// Only the cell's expressed genes are keys (what a *bool* padding mask would do).
    /// Not the published semantics; cheaper and independent of the zero-fill values.
    ExpressedOnly,
}

fn default_cross_heads() -> usize {
    4
}

/// The hyperparameters of an Exceiver (names as in the reference `hparams.yaml`).
///
/// `seq_dim` (gene embedding width) and `query_dim` (latent width) must be equal: the
/// encoder adds the latent query to its attention output and the decoder adds the gene
/// embedding to its attention output, so the reference only works with equal widths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Number of genes in the vocabulary (G). The embedding table has G + 1 rows
    /// (row G: the mask/padding token, fixed at zero), G + 2 for a classifier (row
    /// G + 1: the class token).
    pub seq_len: usize,
    /// Width of a gene embedding (d).
    pub seq_dim: usize,
    /// Number of latent queries (N); the cell embedding has N * d floats.
    pub query_len: usize,
    /// Width of a latent (must equal `seq_dim`).
    pub query_dim: usize,
    /// Number of post-norm Transformer encoder layers in the process stack.
    pub num_layers: usize,
    /// Attention heads of the process layers (head width d / nhead).
    pub nhead: usize,
    /// Attention heads of the encoder and decoder cross-attention. The reference's
    /// `CrossAttn` always uses its default of 4, whatever `nhead` is.
    #[serde(default = "default_cross_heads")]
    pub cross_heads: usize,
    /// Hidden width of the process layers' feed-forward network.
    pub dim_feedforward: usize,
    /// Dropout of the process layers (training only; 0 in the published models).
    #[serde(default)]
    pub dropout: f32,
    /// Number of classes of a classifier (the reference's `classify_dim`); `None` for a
    /// plain Exceiver.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// How the encoder attends (not a weight property; defaults to the reference).
    #[serde(default)]
    pub attention: AttentionMode,
    /// Add `v · value_emb` to every gene token after `layernorm_kv` (`value_emb`: a
    /// learned d-vector, `v`: the token's model input value). Not in the published
    /// model, whose token `LayerNorm(v · E[g])` keeps only the sign of `v`: LayerNorm
    /// divides the scale away, so the encoder cannot see how much a gene is
    /// expressed. With this on it can (keys and values gain a term linear in `v`).
    #[serde(default)]
    pub value_embedding: bool,
    /// With [`Config::value_embedding`]: one value vector per embedding row (`value_emb`
    /// `[emb_rows, d]`) instead of one shared d-vector, so that each gene adds
    /// `v · value_emb[g]` to its token: the encoder then sees every gene's value along a
    /// direction of its own, linearly, as PCA does, where the shared vector gives every
    /// gene the same direction.
    #[serde(default)]
    pub value_per_gene: bool,
    /// A linear path from the whole expression profile into the latents: the encoder's
    /// output gains `Σ_g (v_g − zero_fill_g) · profile_proj[g]` (`profile_proj`
    /// `[G, N·d]`, one row per gene; masked genes left out). Attention averages its
    /// values, so the latents see *which* genes a cell expresses but not how many of
    /// a program's genes it expresses; this term adds them up, as PCA's projection
    /// does. Not in the published model.
    #[serde(default)]
    pub profile: bool,
    /// A classifier's head reads the cell embedding (the processed latent, N·d floats)
    /// instead of a class token queried through the decoder (one attention-weighted
    /// average of the latents, d floats). Not in the published classifier.
    #[serde(default)]
    pub class_embedding: bool,
}

impl Config {
    /// The published pretrained Exceiver (Tabula Sapiens, `pretrained_TS_exceiver.ckpt`):
    /// 19,067 genes, d = 4, 128 latents, 8 process layers, 4 heads, feed-forward 2048.
    pub fn published_exceiver() -> Config {
        Config {
            seq_len: 19067,
            seq_dim: 4,
            query_len: 128,
            query_dim: 4,
            num_layers: 8,
            nhead: 4,
            cross_heads: 4,
            dim_feedforward: 2048,
            dropout: 0.0,
            num_classes: None,
            attention: AttentionMode::Reference,
            value_embedding: false,
            value_per_gene: false,
            profile: false,
            class_embedding: false,
        }
    }

    /// The published classifier (`pretrained_TS_exceiver_classifier.ckpt`): as
    /// [`Config::published_exceiver`] with 1 process layer and 24 tissue classes.
    pub fn published_classifier() -> Config {
        Config {
            num_layers: 1,
            num_classes: Some(24),
            ..Config::published_exceiver()
        }
    }

    /// A small model for training from scratch on a 2-core machine: d = 64 (4 heads of
    /// width 16), 16 latents, 2 process layers, feed-forward 128; its cell embedding has
    /// 1,024 floats. Wide latents rather than many: every latent and the decoder's
    /// class row is an attention-weighted average, and with d = 16 and 64 latents those
    /// averages left cells so alike that a classifier finetuned on Kang's `stim` never
    /// left the class prior (held-out accuracy 0.53); with d = 64 and 16 latents the
    /// same run reaches 0.97 in 2 epochs (`examples/quality.rs --stim-epochs 2`).
    pub fn small(n_genes: usize) -> Config {
        Config {
            seq_len: n_genes,
            seq_dim: 64,
            query_len: 16,
            query_dim: 64,
            num_layers: 2,
            nhead: 4,
            cross_heads: 4,
            dim_feedforward: 128,
            dropout: 0.0,
            num_classes: None,
            attention: AttentionMode::Reference,
            value_embedding: false,
            value_per_gene: false,
            profile: false,
            class_embedding: false,
        }
    }

    /// The width d of genes and latents.
    pub fn d(&self) -> usize {
        self.seq_dim
    }

    /// Rows of the gene embedding table: G + 1 (mask token), plus 1 class token for a
    /// classifier.
    pub fn emb_rows(&self) -> usize {
        self.seq_len + if self.num_classes.is_some() { 2 } else { 1 }
    }

    /// Length of the cell embedding (the processed latent flattened): N * d.
    pub fn embedding_len(&self) -> usize {
        self.query_len * self.query_dim
    }

    /// Width of a classifier head's input: the cell embedding ([`Config::embedding_len`])
    /// when `class_embedding`, otherwise the decoder's class-token row (d).
    pub fn class_in(&self) -> usize {
        if self.class_embedding {
            self.embedding_len()
        } else {
            self.seq_dim
        }
    }

    /// Whether a classifier queries its class token through the decoder (one extra
    /// decoder row per cell): a classifier whose head does not read the embedding.
    pub fn class_token(&self) -> bool {
        self.num_classes.is_some() && !self.class_embedding
    }

    /// Rows of `value_emb`: 0 without a value embedding, 1 shared, or one per
    /// embedding row with [`Config::value_per_gene`].
    pub fn value_rows(&self) -> usize {
        match (self.value_embedding, self.value_per_gene) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => self.emb_rows(),
        }
    }

    /// The number of parameters, to within the small vectors (norms, biases): the gene
    /// embedding, the latents, and every layer's feed-forward and attention matrices.
    /// Used to refuse shapes past the memory budget before allocating them.
    pub fn approx_parameters(&self) -> u128 {
        let d = self.seq_dim as u128;
        let ff = self.dim_feedforward as u128;
        // process layers, the encoder's and the decoder's cross-attention blocks
        let blocks = self.num_layers as u128 + 2;
        (self.emb_rows() + self.value_rows()) as u128 * d
            + self.query_len as u128 * d
            + blocks * (2 * ff * d + 4 * d * d + ff + 8 * d)
            + if self.profile {
                self.seq_len as u128 * self.embedding_len() as u128
            } else {
                0
            }
            // the class head: LayerNorm over its input, input → C, C → C
            + self.num_classes.map_or(0, |c| {
                let (c, i) = (c as u128, self.class_in() as u128);
                2 * i + c * (i + c + 2)
            })
    }

    /// Check that the numbers make a model: positive sizes, widths divisible by the
    /// head counts, equal gene and latent widths, sane limits.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| -> Result<()> {
            if v == 0 {
                Err(Error::invalid(format!(
                    "model config: {name} must be positive, got 0"
                )))
            } else {
                Ok(())
            }
        };
        pos("seq_len", self.seq_len)?;
        pos("seq_dim", self.seq_dim)?;
        pos("query_len", self.query_len)?;
        pos("query_dim", self.query_dim)?;
        pos("nhead", self.nhead)?;
        pos("cross_heads", self.cross_heads)?;
        pos("dim_feedforward", self.dim_feedforward)?;
        if self.seq_dim != self.query_dim {
            return Err(Error::invalid(format!(
                "model config: seq_dim ({}) and query_dim ({}) must be equal",
                self.seq_dim, self.query_dim
            )));
        }
        let d = self.seq_dim;
        if !d.is_multiple_of(self.nhead) {
            return Err(Error::invalid(format!(
                "model config: seq_dim {d} is not divisible by nhead {}",
                self.nhead
            )));
        }
        if !d.is_multiple_of(self.cross_heads) {
            return Err(Error::invalid(format!(
                "model config: seq_dim {d} is not divisible by cross_heads {} (the reference's cross-attention uses 4 heads)",
                self.cross_heads
            )));
        }
        if let Some(c) = self.num_classes {
            if c < 2 {
                return Err(Error::invalid(format!(
                    "model config: num_classes must be at least 2, got {c}"
                )));
            }
            if c > 100_000 {
                return Err(Error::new(
                    crate::Kind::Limit,
                    format!("model config: num_classes {c} exceeds the limit of 100000"),
                ));
            }
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(Error::invalid(format!(
                "model config: dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        let limits = [
            ("seq_len", self.seq_len, 10_000_000usize),
            ("seq_dim", self.seq_dim, 1024),
            ("query_len", self.query_len, 65_536),
            ("num_layers", self.num_layers, 1024),
            ("dim_feedforward", self.dim_feedforward, 1 << 20),
        ];
        for (name, v, max) in limits {
            if v > max {
                return Err(Error::new(
                    crate::Kind::Limit,
                    format!("model config: {name} {v} exceeds the limit of {max}"),
                ));
            }
        }
        // Parameter count must stay addressable and sane (4 GiB of f32).
        let total = self.approx_parameters();
        if total > (1u128 << 30) {
            return Err(Error::new(
                crate::Kind::Limit,
                format!("model config: {total} parameters exceed the limit of 2^30"),
            ));
        }
        Ok(())
    }

    /// Read the reference's hyperparameters (the Lightning `hyper_parameters` dict as
    /// JSON, e.g. the `hyper_parameters` metadata of the fixture safetensors): `seq_len`,
    /// `seq_dim`, `query_len`, `query_dim`, `num_layers`, `nhead`, `dim_feedforward`,
    /// `dropout`, and `classify_dim` for a classifier. Other keys are ignored.
    pub fn from_hyper_parameters(json: &str) -> Result<Config> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::format(format!("hyper_parameters is not valid JSON: {e}")))?;
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| {
                    Error::format(format!(
                        "hyper_parameters lacks a non-negative integer \"{k}\""
                    ))
                })
        };
        let cfg = Config {
            seq_len: get("seq_len")?,
            seq_dim: get("seq_dim")?,
            query_len: get("query_len")?,
            query_dim: get("query_dim")?,
            num_layers: get("num_layers")?,
            nhead: get("nhead")?,
            cross_heads: v
                .get("cross_heads")
                .and_then(|x| x.as_u64())
                .map_or(4, |x| x as usize),
            dim_feedforward: get("dim_feedforward")?,
            dropout: v.get("dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
            num_classes: v
                .get("classify_dim")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
            attention: AttentionMode::Reference,
            value_embedding: false,
            value_per_gene: false,
            profile: false,
            class_embedding: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The hyperparameters in the reference's key names (`classify_dim` for the number
    /// of classes), as stored in the `hyper_parameters` safetensors metadata.
    pub fn to_hyper_parameters(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("seq_len".into(), self.seq_len.into());
        m.insert("seq_dim".into(), self.seq_dim.into());
        m.insert("query_len".into(), self.query_len.into());
        m.insert("query_dim".into(), self.query_dim.into());
        m.insert("num_layers".into(), self.num_layers.into());
        m.insert("nhead".into(), self.nhead.into());
        m.insert("cross_heads".into(), self.cross_heads.into());
        m.insert("dim_feedforward".into(), self.dim_feedforward.into());
        m.insert(
            "dropout".into(),
            serde_json::Value::from(self.dropout as f64),
        );
        if let Some(c) = self.num_classes {
            m.insert("classify_dim".into(), c.into());
        }
        serde_json::Value::Object(m).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class head on the embedding is N·d wide: its size counts against the
    /// parameter limit before anything is allocated.
    #[test]
    fn a_class_head_on_a_wide_embedding_is_refused() {
        let mut c = Config {
            seq_len: 10,
            seq_dim: 1024,
            query_len: 4096,
            query_dim: 1024,
            num_layers: 0,
            dim_feedforward: 16,
            num_classes: Some(300),
            ..Config::small(10)
        };
        c.validate().unwrap();
        c.class_embedding = true;
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind, crate::Kind::Limit);
        assert!(e.message.contains("parameters exceed"), "{}", e.message);
    }

    #[test]
    fn presets_validate() {
        Config::published_exceiver().validate().unwrap();
        Config::published_classifier().validate().unwrap();
        Config::small(2000).validate().unwrap();
        assert_eq!(Config::published_exceiver().embedding_len(), 512);
        assert_eq!(Config::published_classifier().emb_rows(), 19069);
    }

    #[test]
    fn bad_configs_are_errors() {
        let mut c = Config::small(100);
        c.nhead = 3;
        let e = c.validate().unwrap_err();
        assert!(
            e.message.contains("not divisible by nhead 3"),
            "{}",
            e.message
        );
        let mut c = Config::small(100);
        c.query_dim = 8;
        assert!(c.validate().unwrap_err().message.contains("must be equal"));
        let mut c = Config::small(100);
        c.seq_len = 0;
        assert!(c.validate().is_err());
        let mut c = Config::small(100);
        c.num_classes = Some(1);
        assert!(c.validate().is_err());
    }

    #[test]
    fn serde_round_trip() {
        let c = Config::published_classifier();
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"attention\":\"reference\""), "{s}");
        let back: Config = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let h = Config::from_hyper_parameters(&c.to_hyper_parameters()).unwrap();
        assert_eq!(h, c);
        // Minimal JSON: defaults for the optional fields.
        let m: Config = serde_json::from_str(
            r#"{"seq_len":10,"seq_dim":4,"query_len":8,"query_dim":4,"num_layers":1,"nhead":2,"dim_feedforward":16}"#,
        )
        .unwrap();
        assert_eq!(m.cross_heads, 4);
        assert_eq!(m.attention, AttentionMode::Reference);
    }
}
