//! The Exceiver on batches of cells in candle tensors, on any candle device: a CUDA
//! GPU in a build with the `cuda` feature ([`crate::device::Device::open`]), or the CPU
//! (where the tests run it against the reference fixtures and the hand-written model).
//!
//! * [`DeviceModel`]: inference: `embed_batch`, `forward_batch` (embeddings, value
//!   predictions, class logits), `classify_logits_batch`, the batched forms of
//!   [`crate::model::Exceiver`]'s methods.
//! * [`DeviceTrainer`]: training with candle's autograd and Adam on the device, the
//!   same inputs ([`crate::train::TrainCell`]), outputs ([`crate::train::StepStats`]),
//!   options and maths as [`crate::train::Trainer`]; [`loss_and_grads`] as
//!   [`crate::train::loss_and_grads`]. [`stepper`] picks the hand-written CPU
//!   trainer or a [`DeviceTrainer`] from a [`crate::device::Device`].
//!
//! Everything is f32, with full-precision f32 matrix products on the GPU (no TF32:
//! [`crate::device::Device::open`] turns candle's reduced-precision GEMM off). The maths
//! is that of `fixtures/README.md`. How the encoder is batched (padding with an
//! additive −1e30 bias, the reference mode's all-gene terms as one dense product with
//! the batch's unexpressed-gene mask) is described in `net.rs`.
//!
//! On the CPU the hand-written model ([`crate::model::Exceiver`], [`crate::train`]) is
//! several times faster than candle's CPU backend: use this module for GPUs.

mod fused;
mod model;
mod net;
mod pack;
mod train;

pub use model::{BatchOutput, DeviceModel};
pub use train::{loss_and_grads, stepper, DeviceTrainer};

use crate::error::{Error, Kind, Result};
use crate::model::config::Config;
use crate::model::weights::Params;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Default limit on the largest intermediate tensor of one chunk of a batch, in f32
/// elements (2^26: 256 MiB); see [`DeviceModel::with_batch_elements`].
pub const DEFAULT_BATCH_ELEMENTS: usize = 1 << 26;

/// A failed device computation as an [`Error`]: out of memory is a limit (with a hint
/// to use smaller batches), anything else an internal error with candle's message.
pub(crate) fn compute_err(e: candle_core::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("OUT_OF_MEMORY") || msg.contains("out of memory") {
        Error::new(Kind::Limit, format!("the device ran out of memory: {msg}")).with_hint(
            "Use smaller batches (fewer cells per batch, or a smaller batch element budget).",
        )
    } else {
        Error::internal(format!("device computation failed: {msg}"))
    }
}

/// Every tensor of `params` on `dev`, by reference name.
pub(crate) fn upload_params(
    cfg: &Config,
    params: &Params,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    params.visit(cfg, |name, shape, v| {
        let t = Tensor::from_slice(v, shape, dev).map_err(compute_err)?;
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}
