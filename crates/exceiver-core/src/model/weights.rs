//! The parameters of an Exceiver as plain `f32` vectors, named as in the reference
//! `state_dict`, and their reading and writing: published Lightning `.ckpt` files
//! (via candle's pickle reader) and safetensors bytes (what the SQL layer stores).
//!
//! Every matrix is row-major `[out, in]`, exactly as PyTorch stores it.

use super::config::Config;
use super::rng::Rng;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// `nn.LayerNorm` (affine, eps 1e-5).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// `nn.Linear`: `weight` is `[out, in]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub out_dim: usize,
    pub in_dim: usize,
}

/// `nn.MultiheadAttention` with equal q/k/v widths: packed `in_proj_weight` `[3d, d]`
/// (rows 0..d: Wq, d..2d: Wk, 2d..3d: Wv), `in_proj_bias` `[3d]`, and `out_proj`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mha {
    pub in_proj_weight: Vec<f32>,
    pub in_proj_bias: Vec<f32>,
    pub out_proj: Linear,
}

/// The reference's `CrossAttn`: `layernorm_kv`, `layernorm_q`, `cross_attn` and
/// `mlp = [LN (mlp.0), Linear (mlp.1), GELU, LN (mlp.3), Linear (mlp.4)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossAttnParams {
    pub layernorm_kv: LayerNorm,
    pub layernorm_q: LayerNorm,
    pub attn: Mha,
    pub mlp_norm0: LayerNorm,
    pub mlp_linear1: Linear,
    pub mlp_norm3: LayerNorm,
    pub mlp_linear4: Linear,
}

/// One post-norm `nn.TransformerEncoderLayer` of the process stack.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams {
    pub self_attn: Mha,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
}

/// An output head `[LN (.0), Linear (.1), GELU, Linear (.3)]`: the value head `mlp`
/// (d → 1 → 1) or the class head `mlp_classify` (d → C → C; N·d → C → C when the
/// head reads the cell embedding).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadParams {
    pub norm: LayerNorm,
    pub linear1: Linear,
    pub linear2: Linear,
}

/// All parameters of an Exceiver (or classifier).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `gene_emb.weight`, `[emb_rows, d]`: row G is the mask/padding token (zeros),
    /// row G + 1 (classifier only) the class token.
    pub gene_emb: Vec<f32>,
    /// `query_emb`, `[N, d]`: the encoder's latent queries.
    pub query_emb: Vec<f32>,
    pub encoder: CrossAttnParams,
    pub layers: Vec<LayerParams>,
    pub decoder: CrossAttnParams,
    pub value_head: HeadParams,
    pub class_head: Option<HeadParams>,
    /// `value_emb`, `[d]`, with [`Config::value_embedding`] only (else empty): added
    /// to each gene token after the encoder's `layernorm_kv`, times the token's value;
    /// `[emb_rows, d]` with [`Config::value_per_gene`], row g for gene g's tokens.
    pub value_emb: Vec<f32>,
    /// `profile_proj`, `[G, N·d]`, with [`Config::profile`] only (else empty): row g
    /// times gene g's value above its zero fill, summed over the cell's unmasked
    /// genes, is added to the encoder's output.
    pub profile: Vec<f32>,
}

/// Name of the value embedding tensor (not in the published checkpoints).
pub const VALUE_EMB: &str = "value_emb";

/// Name of the profile path's tensor (not in the published checkpoints).
pub const PROFILE: &str = "profile_proj";

/// Prefix of the unused template layer that the reference's `ProcessSelfAttn` keeps
/// registered (deep-copied into `transformer.layers.*`, never used in `forward`).
pub const TEMPLATE_PREFIX: &str = "process_self_attn.encoder_layer.";

// One traversal for both `&` and `&mut`: (name, shape, vector) in state_dict order.
macro_rules! visit_params {
    ($p:expr, $cfg:expr, $f:expr, $($m:tt)?) => {{
        let cfg: &Config = $cfg;
        let d = cfg.seq_dim;
        let p = $p;
        let f = $f;
        f("gene_emb.weight".to_string(), vec![cfg.emb_rows(), d], & $($m)? p.gene_emb)?;
        f("query_emb".to_string(), vec![cfg.query_len, d], & $($m)? p.query_emb)?;
        for (pre, ca) in [("encoder_cross_attn", & $($m)? p.encoder), ("decoder_cross_attn", & $($m)? p.decoder)] {
            f(format!("{pre}.layernorm_kv.weight"), vec![d], & $($m)? ca.layernorm_kv.weight)?;
            f(format!("{pre}.layernorm_kv.bias"), vec![d], & $($m)? ca.layernorm_kv.bias)?;
            f(format!("{pre}.layernorm_q.weight"), vec![d], & $($m)? ca.layernorm_q.weight)?;
            f(format!("{pre}.layernorm_q.bias"), vec![d], & $($m)? ca.layernorm_q.bias)?;
            f(format!("{pre}.cross_attn.in_proj_weight"), vec![3 * d, d], & $($m)? ca.attn.in_proj_weight)?;
            f(format!("{pre}.cross_attn.in_proj_bias"), vec![3 * d], & $($m)? ca.attn.in_proj_bias)?;
            f(format!("{pre}.cross_attn.out_proj.weight"), vec![d, d], & $($m)? ca.attn.out_proj.weight)?;
            f(format!("{pre}.cross_attn.out_proj.bias"), vec![d], & $($m)? ca.attn.out_proj.bias)?;
            f(format!("{pre}.mlp.0.weight"), vec![d], & $($m)? ca.mlp_norm0.weight)?;
            f(format!("{pre}.mlp.0.bias"), vec![d], & $($m)? ca.mlp_norm0.bias)?;
            f(format!("{pre}.mlp.1.weight"), vec![d, d], & $($m)? ca.mlp_linear1.weight)?;
            f(format!("{pre}.mlp.1.bias"), vec![d], & $($m)? ca.mlp_linear1.bias)?;
            f(format!("{pre}.mlp.3.weight"), vec![d], & $($m)? ca.mlp_norm3.weight)?;
            f(format!("{pre}.mlp.3.bias"), vec![d], & $($m)? ca.mlp_norm3.bias)?;
            f(format!("{pre}.mlp.4.weight"), vec![d, d], & $($m)? ca.mlp_linear4.weight)?;
            f(format!("{pre}.mlp.4.bias"), vec![d], & $($m)? ca.mlp_linear4.bias)?;
        }
        let ff = cfg.dim_feedforward;
        for (l, layer) in (& $($m)? p.layers).into_iter().enumerate() {
            let pre = format!("process_self_attn.transformer.layers.{l}");
            f(format!("{pre}.self_attn.in_proj_weight"), vec![3 * d, d], & $($m)? layer.self_attn.in_proj_weight)?;
            f(format!("{pre}.self_attn.in_proj_bias"), vec![3 * d], & $($m)? layer.self_attn.in_proj_bias)?;
            f(format!("{pre}.self_attn.out_proj.weight"), vec![d, d], & $($m)? layer.self_attn.out_proj.weight)?;
            f(format!("{pre}.self_attn.out_proj.bias"), vec![d], & $($m)? layer.self_attn.out_proj.bias)?;
            f(format!("{pre}.linear1.weight"), vec![ff, d], & $($m)? layer.linear1.weight)?;
            f(format!("{pre}.linear1.bias"), vec![ff], & $($m)? layer.linear1.bias)?;
            f(format!("{pre}.linear2.weight"), vec![d, ff], & $($m)? layer.linear2.weight)?;
            f(format!("{pre}.linear2.bias"), vec![d], & $($m)? layer.linear2.bias)?;
            f(format!("{pre}.norm1.weight"), vec![d], & $($m)? layer.norm1.weight)?;
            f(format!("{pre}.norm1.bias"), vec![d], & $($m)? layer.norm1.bias)?;
            f(format!("{pre}.norm2.weight"), vec![d], & $($m)? layer.norm2.weight)?;
            f(format!("{pre}.norm2.bias"), vec![d], & $($m)? layer.norm2.bias)?;
        }
        let vh = & $($m)? p.value_head;
        f("mlp.0.weight".to_string(), vec![d], & $($m)? vh.norm.weight)?;
        f("mlp.0.bias".to_string(), vec![d], & $($m)? vh.norm.bias)?;
        f("mlp.1.weight".to_string(), vec![1, d], & $($m)? vh.linear1.weight)?;
        f("mlp.1.bias".to_string(), vec![1], & $($m)? vh.linear1.bias)?;
        f("mlp.3.weight".to_string(), vec![1, 1], & $($m)? vh.linear2.weight)?;
        f("mlp.3.bias".to_string(), vec![1], & $($m)? vh.linear2.bias)?;
        if let (Some(c), Some(ch)) = (cfg.num_classes, & $($m)? p.class_head) {
            let ci = cfg.class_in();
            f("mlp_classify.0.weight".to_string(), vec![ci], & $($m)? ch.norm.weight)?;
            f("mlp_classify.0.bias".to_string(), vec![ci], & $($m)? ch.norm.bias)?;
            f("mlp_classify.1.weight".to_string(), vec![c, ci], & $($m)? ch.linear1.weight)?;
            f("mlp_classify.1.bias".to_string(), vec![c], & $($m)? ch.linear1.bias)?;
            f("mlp_classify.3.weight".to_string(), vec![c, c], & $($m)? ch.linear2.weight)?;
            f("mlp_classify.3.bias".to_string(), vec![c], & $($m)? ch.linear2.bias)?;
        }
        if cfg.value_per_gene && cfg.value_embedding {
            f(VALUE_EMB.to_string(), vec![cfg.emb_rows(), d], & $($m)? p.value_emb)?;
        } else if cfg.value_embedding {
            f(VALUE_EMB.to_string(), vec![d], & $($m)? p.value_emb)?;
        }
        if cfg.profile {
            f(PROFILE.to_string(), vec![cfg.seq_len, cfg.embedding_len()], & $($m)? p.profile)?;
        }
        Ok::<(), Error>(())
    }};
}

fn ln(d: usize) -> LayerNorm {
    LayerNorm {
        weight: vec![1.0; d],
        bias: vec![0.0; d],
    }
}

fn lin(out_dim: usize, in_dim: usize) -> Linear {
    Linear {
        weight: vec![0.0; out_dim * in_dim],
        bias: vec![0.0; out_dim],
        out_dim,
        in_dim,
    }
}

fn mha(d: usize) -> Mha {
    Mha {
        in_proj_weight: vec![0.0; 3 * d * d],
        in_proj_bias: vec![0.0; 3 * d],
        out_proj: lin(d, d),
    }
}

fn cross(d: usize) -> CrossAttnParams {
    CrossAttnParams {
        layernorm_kv: ln(d),
        layernorm_q: ln(d),
        attn: mha(d),
        mlp_norm0: ln(d),
        mlp_linear1: lin(d, d),
        mlp_norm3: ln(d),
        mlp_linear4: lin(d, d),
    }
}

fn head(d: usize, c: usize) -> HeadParams {
    HeadParams {
        norm: ln(d),
        linear1: lin(c, d),
        linear2: lin(c, c),
    }
}

impl Params {
    /// Parameters of the right shapes: linear layers zero, LayerNorms identity.
    /// Call [`Config::validate`] first.
    pub fn zeros(cfg: &Config) -> Params {
        let d = cfg.seq_dim;
        let ff = cfg.dim_feedforward;
        Params {
            gene_emb: vec![0.0; cfg.emb_rows() * d],
            query_emb: vec![0.0; cfg.query_len * d],
            encoder: cross(d),
            layers: (0..cfg.num_layers)
                .map(|_| LayerParams {
                    self_attn: mha(d),
                    linear1: lin(ff, d),
                    linear2: lin(d, ff),
                    norm1: ln(d),
                    norm2: ln(d),
                })
                .collect(),
            decoder: cross(d),
            value_head: head(d, 1),
            class_head: cfg.num_classes.map(|c| head(cfg.class_in(), c)),
            value_emb: vec![0.0; cfg.value_rows() * d],
            profile: vec![
                0.0;
                if cfg.profile {
                    cfg.seq_len * cfg.embedding_len()
                } else {
                    0
                }
            ],
        }
    }

    /// A fresh model initialised as PyTorch initialises the reference modules:
    /// embeddings and latent queries N(0, 1) (mask row zero), packed attention
    /// projections Xavier-uniform with zero biases, linear layers U(±1/√fan_in),
    /// LayerNorms identity.
    pub fn init(cfg: &Config, seed: u64) -> Result<Params> {
        cfg.validate()?;
        let mut p = Params::zeros(cfg);
        let mut rng = Rng::new(seed);
        let d = cfg.seq_dim;
        p.visit_mut(cfg, |name, shape, v| {
            if name == PROFILE {
                // zeros: a new model starts as it would without the path
            } else if name == "gene_emb.weight" || name == "query_emb" || name == VALUE_EMB {
                for x in v.iter_mut() {
                    *x = rng.normal() as f32;
                }
                if name == "gene_emb.weight" {
                    let g = cfg.seq_len;
                    v[g * d..(g + 1) * d].iter_mut().for_each(|x| *x = 0.0);
                }
                if name == VALUE_EMB && v.len() > d {
                    // per-gene rows start equal (the shared vector's draw), so a new
                    // model computes what the shared one would; genes part in training
                    let (first, rest) = v.split_at_mut(d);
                    rest.chunks_exact_mut(d)
                        .for_each(|r| r.copy_from_slice(first));
                }
            } else if name.ends_with("in_proj_weight") {
                let bound = (6.0 / (d + 3 * d) as f64).sqrt();
                v.iter_mut()
                    .for_each(|x| *x = rng.uniform_range(-bound, bound) as f32);
            } else if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") {
                // zeros, as nn.MultiheadAttention._reset_parameters
            } else if shape.len() == 2 {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                v.iter_mut()
                    .for_each(|x| *x = rng.uniform_range(-bound, bound) as f32);
            } else if !is_layernorm(&name) {
                // a Linear bias: U(±1/√fan_in), fan_in from the weight's shape
                let fan_in = linear_fan_in(cfg, &name);
                let bound = 1.0 / (fan_in as f64).sqrt();
                v.iter_mut()
                    .for_each(|x| *x = rng.uniform_range(-bound, bound) as f32);
            }
            Ok(())
        })?;
        Ok(p)
    }

    /// Visit every tensor: (reference name, shape, values), in state_dict order.
    pub fn visit(
        &self,
        cfg: &Config,
        mut f: impl FnMut(String, Vec<usize>, &Vec<f32>) -> Result<()>,
    ) -> Result<()> {
        visit_params!(self, cfg, &mut f,)
    }

    /// Visit every tensor mutably (for loading, initialisation, optimisers).
    pub fn visit_mut(
        &mut self,
        cfg: &Config,
        mut f: impl FnMut(String, Vec<usize>, &mut Vec<f32>) -> Result<()>,
    ) -> Result<()> {
        visit_params!(self, cfg, &mut f, mut)
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self, cfg: &Config) -> usize {
        let mut n = 0;
        let _ = self.visit(cfg, |_, _, v| {
            n += v.len();
            Ok(())
        });
        n
    }

    /// Check every tensor against the shapes `cfg` implies and that every value is finite.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        cfg.validate()?;
        if self.layers.len() != cfg.num_layers {
            return Err(Error::shape(format!(
                "model has {} process layers, the config needs {}",
                self.layers.len(),
                cfg.num_layers
            )));
        }
        if self.class_head.is_some() != cfg.num_classes.is_some() {
            return Err(Error::shape(
                "model weights and config disagree on whether the model is a classifier",
            ));
        }
        self.visit(cfg, |name, shape, v| {
            let n: usize = shape.iter().product();
            if v.len() != n {
                return Err(Error::shape(format!(
                    "tensor \"{name}\" has {} values, shape {shape:?} needs {n}",
                    v.len()
                )));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::format(format!(
                    "tensor \"{name}\" holds a non-finite value {} at flat index {i}",
                    v[i]
                )));
            }
            Ok(())
        })
    }

    /// Build from named tensors `(shape, values)`, checking every shape against `cfg`.
    /// Tensors not used by the model (the reference's template layer) are ignored.
    pub fn from_named(
        cfg: &Config,
        mut get: impl FnMut(&str, &[usize]) -> Result<Option<(Vec<usize>, Vec<f32>)>>,
    ) -> Result<Params> {
        cfg.validate()?;
        // the zeroed parameters plus one tensor being read
        crate::limits::check_bytes(cfg.approx_parameters() * 8, "the model's weights")?;
        let mut p = Params::zeros(cfg);
        p.visit_mut(cfg, |name, shape, slot| {
            let (got_shape, data) = get(&name, &shape)?.ok_or_else(|| {
                Error::format(format!("weights lack tensor \"{name}\" (shape {shape:?})"))
            })?;
            if got_shape != shape {
                return Err(Error::shape(format!(
                    "tensor \"{name}\" has shape {got_shape:?}, the model config needs {shape:?}"
                )));
            }
            if data.len() != slot.len() {
                return Err(Error::format(format!(
                    "tensor \"{name}\" has {} values for shape {shape:?}",
                    data.len()
                )));
            }
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(Error::format(format!(
                    "tensor \"{name}\" holds a non-finite value {} at flat index {i}",
                    data[i]
                )));
            }
            *slot = data;
            Ok(())
        })?;
        Ok(p)
    }
}

fn is_layernorm(name: &str) -> bool {
    name.contains("layernorm")
        || name.contains(".norm")
        || name.ends_with("mlp.0.weight")
        || name.ends_with("mlp.0.bias")
        || name.ends_with("mlp.3.weight") && name.contains("_cross_attn")
        || name.ends_with("mlp.3.bias") && name.contains("_cross_attn")
        || name.starts_with("mlp_classify.0.")
}

fn linear_fan_in(cfg: &Config, bias_name: &str) -> usize {
    if bias_name.ends_with("linear2.bias") {
        cfg.dim_feedforward
    } else if bias_name == "mlp.3.bias" {
        1
    } else if bias_name == "mlp_classify.3.bias" {
        cfg.num_classes.unwrap_or(1)
    } else if bias_name == "mlp_classify.1.bias" {
        cfg.class_in()
    } else {
        cfg.seq_dim
    }
}

/// Infer a config from tensor shapes (for files that carry no hyperparameters):
/// G from `gene_emb.weight` rows, d from its columns, N from `query_emb`, the layer
/// count from `process_self_attn.transformer.layers.N`, the feed-forward width from
/// `linear1`, classes from `mlp_classify`. Head counts cannot be seen in shapes: they
/// are taken as 4 (the published models), or 1 when d is not divisible by 4.
pub fn infer_config(shapes: &HashMap<String, Vec<usize>>) -> Result<Config> {
    let get = |name: &str| -> Result<&Vec<usize>> {
        shapes
            .get(name)
            .ok_or_else(|| Error::format(format!("weights lack tensor \"{name}\"")))
    };
    let emb = get("gene_emb.weight")?;
    let q = get("query_emb")?;
    if emb.len() != 2 || q.len() != 2 {
        return Err(Error::shape(format!(
            "gene_emb.weight has shape {emb:?} and query_emb {q:?}; both must be 2-d"
        )));
    }
    let d = emb[1];
    let mut num_layers = 0;
    let mut ff = None;
    let pre = "process_self_attn.transformer.layers.";
    for name in shapes.keys() {
        if let Some(rest) = name.strip_prefix(pre) {
            if let Some((idx, tail)) = rest.split_once('.') {
                if let Ok(i) = idx.parse::<usize>() {
                    num_layers = num_layers.max(i + 1);
                    if tail == "linear1.weight" {
                        ff = shapes.get(name).and_then(|s| s.first().copied());
                    }
                }
            }
        }
    }
    let ff = ff
        .or_else(|| {
            shapes
                .get("process_self_attn.encoder_layer.linear1.weight")
                .and_then(|s| s.first().copied())
        })
        .unwrap_or(2048);
    let num_classes = shapes
        .get("mlp_classify.1.weight")
        .and_then(|s| s.first().copied());
    let extra = if num_classes.is_some() { 2 } else { 1 };
    if emb[0] <= extra {
        return Err(Error::shape(format!(
            "gene_emb.weight has only {} rows",
            emb[0]
        )));
    }
    let heads = if d % 4 == 0 { 4 } else { 1 };
    let cfg = Config {
        seq_len: emb[0] - extra,
        seq_dim: d,
        query_len: q[0],
        query_dim: q[1],
        num_layers,
        nhead: heads,
        cross_heads: heads,
        dim_feedforward: ff,
        dropout: 0.0,
        num_classes,
        attention: Default::default(),
        value_embedding: shapes.contains_key(VALUE_EMB),
        value_per_gene: shapes.get(VALUE_EMB).is_some_and(|s| s.len() == 2),
        profile: shapes.contains_key(PROFILE),
        // a head as wide as the embedding reads it (when that differs from d)
        class_embedding: shapes
            .get("mlp_classify.1.weight")
            .is_some_and(|s| s.get(1) == Some(&(q[0] * q[1])) && q[0] * q[1] != d),
    };
    cfg.validate()?;
    Ok(cfg)
}

fn catch<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Error::format(format!("{what}: the file is corrupt"))),
    }
}

/// Read a PyTorch / Lightning checkpoint (`.ckpt`, `.pt`): the tensors under
/// `state_dict` (or at the top level for a bare state dict). The config is inferred
/// from the shapes (see [`infer_config`]).
pub fn load_checkpoint(path: &Path) -> Result<(Config, Params)> {
    let (shapes, pth) = open_checkpoint(path)?;
    let cfg = infer_config(&shapes)
        .map_err(|e| e.context(format!("checkpoint \"{}\"", path.display())))?;
    let params = read_checkpoint(path, &pth, &cfg)?;
    Ok((cfg, params))
}

/// Read a checkpoint whose hyperparameters are known (e.g. from its `hparams.yaml`);
/// every tensor shape is checked against `cfg`.
pub fn load_checkpoint_with(path: &Path, cfg: &Config) -> Result<Params> {
    let (_, pth) = open_checkpoint(path)?;
    read_checkpoint(path, &pth, cfg)
}

type Shapes = HashMap<String, Vec<usize>>;

fn open_checkpoint(path: &Path) -> Result<(Shapes, candle_core::pickle::PthTensors)> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::io(path, e));
    }
    let ctx = format!("checkpoint \"{}\"", path.display());
    let pth = catch(&ctx, || {
        match candle_core::pickle::PthTensors::new(path, Some("state_dict")) {
            Ok(p) if !p.tensor_infos().is_empty() => Ok(p),
            // a bare state dict (torch.save(model.state_dict()))
            _ => candle_core::pickle::PthTensors::new(path, None).map_err(Error::from),
        }
    })
    .map_err(|e| Error::format(e.message).context(&ctx))?;
    let shapes: Shapes = pth
        .tensor_infos()
        .iter()
        .map(|(k, ti)| (k.clone(), ti.layout.dims().to_vec()))
        .collect();
    if shapes.is_empty() {
        return Err(Error::format(format!("{ctx}: no tensors found")));
    }
    Ok((shapes, pth))
}

fn read_checkpoint(
    path: &Path,
    pth: &candle_core::pickle::PthTensors,
    cfg: &Config,
) -> Result<Params> {
    let ctx = format!("checkpoint \"{}\"", path.display());
    catch(&ctx, || {
        Params::from_named(cfg, |name, want| {
            // The declared shape is compared with the model's before the tensor is
            // read: a checkpoint may not make us allocate what its header claims.
            let Some(info) = pth.tensor_infos().get(name) else {
                return Ok(None);
            };
            let dims = info.layout.dims();
            if dims != want {
                return Err(Error::shape(format!(
                    "tensor \"{name}\" has shape {dims:?}, the model config needs {want:?}"
                )));
            }
            let t = match pth.get(name)? {
                Some(t) => t,
                None => return Ok(None),
            };
            let shape = t.dims().to_vec();
            let data = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(Some((shape, data)))
        })
    })
    .map_err(|e| e.context(&ctx))
}

/// Metadata key holding the config as this crate's JSON ([`Config`] serde form).
pub const META_CONFIG: &str = "exceiver_config";
/// Metadata key holding the reference-style hyperparameters JSON.
pub const META_HPARAMS: &str = "hyper_parameters";

/// Read safetensors bytes. The config comes from the metadata (`exceiver_config`,
/// else the reference's `hyper_parameters`), else it is inferred from the shapes.
pub fn load_safetensors(bytes: &[u8]) -> Result<(Config, Params)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(format!("not a valid safetensors buffer: {e}")))?;
    let meta = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(format!("not a valid safetensors buffer: {e}")))?
        .1;
    let md = meta.metadata().clone().unwrap_or_default();
    let cfg = if let Some(js) = md.get(META_CONFIG) {
        let cfg: Config = serde_json::from_str(js).map_err(|e| {
            Error::format(format!(
                "safetensors metadata {META_CONFIG} is invalid: {e}"
            ))
        })?;
        cfg.validate()?;
        cfg
    } else if let Some(js) = md.get(META_HPARAMS) {
        Config::from_hyper_parameters(js)?
    } else {
        let shapes: Shapes = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        infer_config(&shapes)?
    };
    let params = params_from_safetensors(&st, &cfg)?;
    Ok((cfg, params))
}

/// Read safetensors bytes with a known config (shapes are checked against it).
pub fn load_safetensors_with(bytes: &[u8], cfg: &Config) -> Result<Params> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(format!("not a valid safetensors buffer: {e}")))?;
    params_from_safetensors(&st, cfg)
}

fn params_from_safetensors(st: &safetensors::SafeTensors<'_>, cfg: &Config) -> Result<Params> {
    // a tensor of this crate's extensions that the config does not use would be
    // dropped silently, and the model would compute something else
    for (name, used) in [(VALUE_EMB, cfg.value_embedding), (PROFILE, cfg.profile)] {
        if !used && st.tensor(name).is_ok() {
            return Err(Error::shape(format!(
                "the weights have tensor \"{name}\", which the model's config does not use"
            )));
        }
    }
    Params::from_named(cfg, |name, _| {
        let v = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        Ok(Some((v.shape().to_vec(), view_to_f32(name, &v)?)))
    })
}

/// The values of a safetensors tensor as f32 (F32 as is, F64 rounded).
pub fn view_to_f32(name: &str, v: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let b = v.data();
    match v.dtype() {
        Dtype::F32 => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F64 => Ok(b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()),
        other => Err(Error::format(format!(
            "tensor \"{name}\" has dtype {other:?}; only F32 and F64 are supported"
        ))),
    }
}

/// Serialise to safetensors bytes (every tensor F32, reference names, no template
/// layer). The metadata holds the config twice (`exceiver_config`, this crate's form,
/// and `hyper_parameters`, the reference's), plus `extra` entries.
pub fn save_safetensors(cfg: &Config, params: &Params, extra: &[(&str, &str)]) -> Result<Vec<u8>> {
    params.check(cfg)?;
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    params.visit(cfg, |name, shape, v| {
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        named.push((name, shape, bytes));
        Ok(())
    })?;
    let views = named
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::internal(format!("safetensors view of \"{n}\": {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut md: HashMap<String, String> = HashMap::new();
    md.insert(
        META_CONFIG.to_string(),
        serde_json::to_string(cfg).map_err(|e| Error::internal(format!("config to JSON: {e}")))?,
    );
    md.insert(META_HPARAMS.to_string(), cfg.to_hyper_parameters());
    for (k, v) in extra {
        md.insert(k.to_string(), v.to_string());
    }
    let bytes = safetensors::serialize(views, Some(md))
        .map_err(|e| Error::internal(format!("safetensors serialisation failed: {e}")))?;
    canonical_header(bytes)
}

/// Rewrite a safetensors file's JSON header with its keys sorted. `safetensors`
/// writes the metadata from a `HashMap`, whose order changes from one map to the
/// next, so the same weights would otherwise give different bytes (and stored models
/// that compare unequal). The tensor data and its offsets are unchanged.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use std::collections::BTreeMap;
    let bad = |what: &str| Error::internal(format!("safetensors header: {what}"));
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .ok_or_else(|| bad("shorter than 8 bytes"))?;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| bad("length beyond the end"))?;
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let sorted: BTreeMap<String, serde_json::Value> = parsed
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::Object(m) => {
                let m: BTreeMap<String, serde_json::Value> = m.into_iter().collect();
                serde_json::to_value(m).map(|v| (k, v))
            }
            v => Ok((k, v)),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(&e.to_string()))?;
    let mut json = serde_json::to_vec(&sorted).map_err(|e| bad(&e.to_string()))?;
    // the data that follows stays 8-byte aligned, as the format asks
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}
