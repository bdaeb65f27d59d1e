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

//!
//! # Layout
//!
//! The backward pass follows the forward's own structure, each part's forward and
//! backward side by side: [`encoder`] (and the batch-level zero-fill terms above),
//! [`process`] (self-attention layers), [`decoder`] (with the output heads and their
//! losses), over the shared building blocks of [`blocks`]. [`state`] holds what a
//! batch shares, what each thread accumulates, and each thread's scratch memory.

// Index loops over rows and heads are the clearest form here.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

mod blocks;
mod decoder;
mod encoder;
mod process;
mod state;

pub(crate) use blocks::{head_bwd, head_fwd};
use state::{Acc, Shared, Ws};
pub(crate) use state::{HeadWs, ThreadState};

use super::{StepStats, TrainCell};
use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::weights::Params;
use std::sync::atomic::{AtomicBool, Ordering};

/// A `Params` of the model's shapes with every value zero (a gradient buffer).
pub fn zero_grads(cfg: &Config) -> Params {
    let mut g = Params::zeros(cfg);
    let _ = g.visit_mut(cfg, |_, _, v| {
        v.fill(0.0);
        Ok(())
    });
    g
}

pub(super) fn flatten(cfg: &Config, p: &Params, out: &mut Vec<f32>) {
    out.clear();
    let _ = p.visit(cfg, |_, _, v| {
        out.extend_from_slice(v);
        Ok(())
    });
}

pub(super) fn add_flat(cfg: &Config, p: &mut Params, flat: &[f32]) {
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

pub(super) fn add_into<T: Copy + std::ops::AddAssign>(dst: &mut [T], src: &[T]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a += *b;
    }
}

pub(super) fn threads_or_all(t: usize) -> usize {
    if t == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        t
    }
}

// ------------------------------------------------------------------ one cell

/// Loss normalisation of a batch: ∂L/∂pred = mse_w·(pred − y), ∂L/∂logits = ce_w·(…).
#[derive(Clone, Copy)]
pub(crate) struct Norm {
    pub(super) mse_w: f32,
    pub(super) ce_w: f32,
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
    check_cell(sh.cfg, ws, cell)?;
    let nd = sh.n * sh.d;
    encoder::forward(sh, cell, ws);
    process::forward(sh, ws);
    if let Some(o) = emb_out {
        o.copy_from_slice(&ws.xl[..nd]);
    }
    decoder::forward(sh, cell, ws, acc);
    if !backward {
        return Ok(());
    }
    decoder::backward(sh, cell, norm, ws, acc);
    // ∂ of the cell embedding is in ws.gt2 (N·d)
    if let Some(gz) = emb_grad {
        add_into(&mut ws.gt2[..nd], gz);
    }
    process::backward(sh, ws, acc);
    encoder::backward(sh, cell, ws, acc);
    Ok(())
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
    // the calling thread takes the host's interrupts while the cells run; a cancel
    // stops every thread after its current cell
    let jobs: Vec<_> = states
        .iter_mut()
        .zip(cells.chunks(per))
        .zip(outs)
        .enumerate()
        .map(|(t, ((st, cs), mut out))| {
            move |stop: &AtomicBool| -> Result<()> {
                for (k, c) in cs.iter().enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Error::internal("training step stopped"));
                    }
                    let i = t * per + k;
                    let o = out.as_deref_mut().map(|o| &mut o[k * nd..(k + 1) * nd]);
                    let gz = emb_grad.map(|g| &g[i * nd..(i + 1) * nd]);
                    cell_step(shr, c, norm, &mut st.ws, &mut st.acc, backward, o, gz)
                        .map_err(|e| e.context(format!("cell {i}")))?;
                }
                Ok(())
            }
        })
        .collect();
    for r in crate::limits::run_workers(jobs) {
        r.unwrap_or_else(|_| Err(Error::internal("training thread panicked")))?;
    }
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

    if sh.reference {
        encoder::shared_backward(&sh, states, threads)?;
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

/// The batch-level parts of the backward pass, on the reduced accumulators.
fn finish_grads(sh: &Shared, acc: &mut Acc) {
    encoder::finish(sh, acc);
    process::finish(sh, acc);
    // the mask token's embedding is fixed at zero
    let (d, gm) = (sh.d, sh.cfg.seq_len);
    acc.grads.gene_emb[gm * d..(gm + 1) * d].fill(0.0);
}
