//! The Exceiver model (Connell, Khan & Keiser 2022, arXiv 2210.14330): a Perceiver-IO
//! style model over one cell's expression profile. Gene tokens `value·E[g]` are read by
//! a fixed set of latent queries (encoder cross-attention), refined by a stack of
//! post-norm Transformer layers (process), and queried by gene embeddings (decoder)
//! to predict expression values or, with a class token, a label.
//!
//! * [`Config`]: hyperparameters and presets; [`AttentionMode`] picks the published
//!   "every gene attends" semantics or expressed genes only.
//! * [`Params`]: the weights as plain `f32` vectors under the reference's tensor
//!   names; [`load_checkpoint`] reads the published Lightning `.ckpt`,
//!   [`load_safetensors`] / [`save_safetensors`] the bytes the SQL layer stores.
//! * [`Exceiver`]: the fast CPU forward pass (`embed`, `predict`, `classify_logits`).
//! * The slow f64 reference evaluation that the tests compare against lives with
//!   them (`tests/common/dense.rs`); it is not part of the library.
//!
//! Formulas and parity tolerances: `fixtures/README.md`.

pub mod cell;
pub mod config;
pub mod forward;
pub mod interpret;
pub mod kernels;
pub mod nn;
pub mod rng;
pub(crate) mod simd;
pub mod weights;

pub use config::{AttentionMode, Config};
pub use forward::{Exceiver, Output};
pub use weights::{
    infer_config, load_checkpoint, load_checkpoint_with, load_safetensors, load_safetensors_with,
    save_safetensors, CrossAttnParams, HeadParams, LayerNorm, LayerParams, Linear, Mha, Params,
};
