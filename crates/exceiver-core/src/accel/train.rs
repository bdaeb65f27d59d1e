//! Training on a candle device: [`DeviceTrainer`] and [`loss_and_grads`].
//!
//! The same maths as [`crate::train`]: masked genes are fed as the mask token (row G,
//! fixed at zero) with value 1.0 and queried by the decoder (then the class token for a
//! classifier); loss = mean squared error over the batch's masked genes, plus the mean
//! cross-entropy over its cells for a classifier; gradients by candle's autograd (the
//! mask token's row zeroed, as the reference's `padding_idx` does); Adam with coupled
//! L2 weight decay, bias correction and linear warm-up, as [`crate::train::Adam`].
//! Batches larger than the element budget are split into chunks whose gradients are
//! summed (each chunk's loss is scaled by the whole batch's counts, so the sum is
//! exact).

use super::model::{check_zero_fill, per_cell_elements};
use super::net::{needs_zero_terms, EncIn, Net, RowIds};
use super::pack::{check_train_cell, pack_cells, pack_queries, plan_chunks, CellRef, Seen};
use super::{compute_err, DEFAULT_BATCH_ELEMENTS};
use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::weights::Params;
use crate::train::{ProjectionHead, StepStats, Stepper, TrainCell, TrainOpts};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Owns a model's weights and Adam state on a candle device and trains it batch by
/// batch: the device counterpart of [`crate::train::Trainer`], with the same methods
/// (weights come back from the device, so [`DeviceTrainer::params`] returns a copy).
pub struct DeviceTrainer {
    cfg: Config,
    dev: Device,
    names: Vec<String>,
    vars: Vec<Var>,
    net: Net,
    /// zero-fill values `[G, 1]`
    zf: Tensor,
    zero_fill: Vec<f32>,
    opts: TrainOpts,
    /// Adam's moments, all parameters flat in `vars` order (one update is a handful of
    /// kernels rather than a handful per tensor)
    m: Tensor,
    v: Tensor,
    /// 1 per parameter, 0 on the mask token's embedding row, flat
    keep_flat: Tensor,
    /// While only a classifier's head moves ([`DeviceTrainer::set_head_only`]): 1 on
    /// its values ([`crate::train::head_range`]), 0 elsewhere, flat
    head_flat: Option<Tensor>,
    t: u64,
    /// position of `gene_emb.weight` in `vars`
    emb: usize,
    /// `[emb_rows, 1]`: 1, and 0 on the mask token's row
    keep: Tensor,
    budget: usize,
    /// projection head of the contrastive term (on the CPU: a few small matrices)
    head: Option<ProjectionHead>,
}

impl std::fmt::Debug for DeviceTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTrainer")
            .field("config", &self.cfg)
            .field("device", &self.dev)
            .field("opts", &self.opts)
            .field("step", &self.t)
            .finish()
    }
}

/// Per-chunk results of a batch.
struct BatchResult {
    stats: StepStats,
    /// summed gradients, in `vars` order (with `backward`)
    grads: Option<Vec<Tensor>>,
    /// every cell's processed latent, cells·N·d (when asked for)
    emb: Option<Vec<f32>>,
}

/// What [`DeviceTrainer::run`] does besides the masked-value loss.
#[derive(Clone, Copy, Default)]
struct Extra<'a> {
    /// return every cell's embedding
    want_emb: bool,
    /// add `Σ emb ⊙ g` to the loss (cells·N·d): its gradient at the embedding is `g`
    emb_grad: Option<&'a [f32]>,
}

impl DeviceTrainer {
    /// A trainer for `params` (checked against `cfg`) on `device`, with the zero-fill
    /// model input values of the G vocabulary genes. The mask token's embedding row is
    /// set to zero, as [`crate::train::Trainer::new`] does. `opts.threads` is not used.
    pub fn new(
        cfg: Config,
        params: Params,
        zero_fill: Vec<f32>,
        opts: TrainOpts,
        device: &Device,
    ) -> Result<DeviceTrainer> {
        Self::build(cfg, params, zero_fill, opts, device, true)
    }

    fn build(
        cfg: Config,
        mut params: Params,
        zero_fill: Vec<f32>,
        opts: TrainOpts,
        dev: &Device,
        zero_mask_row: bool,
    ) -> Result<DeviceTrainer> {
        params.check(&cfg)?;
        check_zero_fill(&cfg, &zero_fill)?;
        opts.validate()?;
        let (g, d) = (cfg.seq_len, cfg.seq_dim);
        if zero_mask_row {
            params.gene_emb[g * d..(g + 1) * d].fill(0.0);
        }
        let mut names = Vec::new();
        let mut vars = Vec::new();
        params.visit(&cfg, |name, shape, v| {
            let var = Var::from_slice(v, shape, dev).map_err(compute_err)?;
            names.push(name);
            vars.push(var);
            Ok(())
        })?;
        let emb = names
            .iter()
            .position(|n| n == "gene_emb.weight")
            .ok_or_else(|| Error::internal("the model has no gene_emb.weight"))?;
        let map: HashMap<String, Tensor> = names
            .iter()
            .cloned()
            .zip(vars.iter().map(|v| v.as_tensor().clone()))
            .collect();
        let net = Net::build(&cfg, &map).map_err(compute_err)?;
        let total: usize = vars.iter().map(|v| v.elem_count()).sum();
        let rows = cfg.emb_rows();
        let mut keep = vec![1.0f32; rows];
        keep[g] = 0.0;
        let keep = Tensor::from_vec(keep, (rows, 1), dev).map_err(compute_err)?;
        let emb_off: usize = vars[..emb].iter().map(|v| v.elem_count()).sum();
        let mut keep_flat = vec![1.0f32; total];
        keep_flat[emb_off + g * d..emb_off + (g + 1) * d].fill(0.0);
        let keep_flat = Tensor::from_vec(keep_flat, total, dev).map_err(compute_err)?;
        let zeros = || Tensor::zeros(total, DType::F32, dev).map_err(compute_err);
        let zf = Tensor::from_slice(&zero_fill, (g, 1), dev).map_err(compute_err)?;
        Ok(DeviceTrainer {
            m: zeros()?,
            v: zeros()?,
            keep_flat,
            head_flat: None,
            cfg,
            dev: dev.clone(),
            names,
            vars,
            net,
            zf,
            zero_fill,
            opts,
            t: 0,
            emb,
            keep,
            budget: DEFAULT_BATCH_ELEMENTS,
            head: None,
        })
    }

    /// Limit the largest intermediate tensor of one chunk of a batch to `n` f32
    /// elements (default [`DEFAULT_BATCH_ELEMENTS`]). Training keeps the activations of
    /// a chunk for the backward pass: about 10 + 3·layers tensors of up to that size.
    pub fn with_batch_elements(mut self, n: usize) -> DeviceTrainer {
        self.budget = n.max(1);
        self
    }

    /// Forward, loss, backward and one Adam update on a batch. On error (bad cell,
    /// non-finite loss or gradient) the weights are unchanged.
    pub fn train_step(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        let r = self.run(cells, true, Extra::default())?;
        self.apply(r)
    }

    /// See [`crate::train::Trainer::train_step_contrastive`]: the same two passes.
    pub fn train_step_contrastive(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        weight: f64,
    ) -> Result<(StepStats, f64)> {
        let (closs, mut g) = self.contrastive_loss(views, tau, true)?;
        g.iter_mut().for_each(|x| *x *= weight as f32);
        let r = self.run(
            views,
            true,
            Extra {
                want_emb: false,
                emb_grad: Some(&g),
            },
        )?;
        let lr = self.opts.lr_at(self.t);
        let mut stats = self.apply(r)?;
        if let Some(h) = &mut self.head {
            h.step(lr, weight, &self.opts);
        }
        stats.loss += weight * closs;
        Ok((stats, closs))
    }

    /// See [`crate::train::Stepper::set_head_only`].
    pub fn set_head_only(&mut self, on: bool) -> Result<()> {
        crate::train::check_head_only(&self.cfg, on)?;
        self.head_flat = None;
        if on {
            let mut flat = Vec::new();
            for (name, var) in self.names.iter().zip(&self.vars) {
                let n = var.elem_count();
                let r = crate::train::head_range(&self.cfg, name, n);
                flat.extend((0..n).map(|k| if r.contains(&k) { 1.0f32 } else { 0.0 }));
            }
            let n = flat.len();
            self.head_flat = Some(Tensor::from_vec(flat, n, &self.dev).map_err(compute_err)?);
        }
        Ok(())
    }

    /// See [`crate::train::Trainer::eval_contrastive`].
    pub fn eval_contrastive(&mut self, views: &[TrainCell], tau: f64) -> Result<f64> {
        Ok(self.contrastive_loss(views, tau, false)?.0)
    }

    /// See [`crate::train::Trainer::set_projection_head`].
    pub fn set_projection_head(&mut self, head: Option<ProjectionHead>) -> Result<()> {
        crate::train::check_head(&self.cfg, head.as_ref())?;
        self.head = head;
        Ok(())
    }

    /// NT-Xent of the views' embeddings (through the projection head if any) and,
    /// with `grad`, its gradient with respect to them.
    fn contrastive_loss(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        grad: bool,
    ) -> Result<(f64, Vec<f32>)> {
        crate::train::check_views(views)?;
        let nd = self.cfg.query_len * self.cfg.seq_dim;
        let emb = self
            .run(
                views,
                false,
                Extra {
                    want_emb: true,
                    emb_grad: None,
                },
            )?
            .emb
            .ok_or_else(|| Error::internal("the forward pass gave no embeddings"))?;
        crate::train::contrastive_of(
            self.head.as_mut(),
            &emb,
            nd,
            tau,
            grad,
            views,
            &self.zero_fill,
        )
    }

    /// One Adam update from a backward pass's gradients (refused when not finite).
    fn apply(&mut self, r: BatchResult) -> Result<StepStats> {
        let grads = r
            .grads
            .ok_or_else(|| Error::internal("the backward pass gave no gradients"))?;
        let flat = Tensor::cat(
            &grads
                .iter()
                .map(|g| g.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(compute_err)?,
            0,
        )
        .map_err(compute_err)?;
        self.check_finite(&flat, &grads)?;
        let lr = self.opts.lr_at(self.t);
        self.adam(&flat, lr).map_err(compute_err)?;
        Ok(r.stats)
    }

    /// Loss and gradients of a batch under the current weights, without an update
    /// (`∂loss/∂param` per tensor, reference names via [`Params::visit`]; the mask
    /// token's row is zero).
    pub fn loss_and_grads(&self, cells: &[TrainCell]) -> Result<(StepStats, Params)> {
        let r = self.run(cells, true, Extra::default())?;
        let grads = r
            .grads
            .ok_or_else(|| Error::internal("the backward pass gave no gradients"))?;
        Ok((r.stats, self.download(grads.iter())?))
    }

    /// The loss of a batch under the current weights (no update).
    pub fn eval_loss(&mut self, cells: &[TrainCell]) -> Result<f64> {
        Ok(self.eval_stats(cells)?.loss)
    }

    /// [`DeviceTrainer::eval_loss`] with the MSE / cross-entropy split.
    pub fn eval_stats(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        Ok(self.run(cells, false, Extra::default())?.stats)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The current weights, copied from the device.
    pub fn params(&self) -> Result<Params> {
        self.download(self.vars.iter().map(|v| v.as_tensor()))
    }

    pub fn into_params(self) -> Result<Params> {
        self.params()
    }

    pub fn zero_fill(&self) -> &[f32] {
        &self.zero_fill
    }

    pub fn opts(&self) -> &TrainOpts {
        &self.opts
    }

    /// Updates done so far.
    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.opts.lr_at(self.t)
    }

    // ------------------------------------------------------------------ internals

    /// Tensors in `vars` order → a `Params`.
    fn download<'a>(&self, ts: impl Iterator<Item = &'a Tensor>) -> Result<Params> {
        let mut named: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
        for (name, t) in self.names.iter().zip(ts) {
            let v = t
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(compute_err)?;
            named.insert(name.clone(), (t.dims().to_vec(), v));
        }
        Params::from_named(&self.cfg, |name, _| Ok(named.remove(name)))
    }

    fn run(&self, cells: &[TrainCell], backward: bool, extra: Extra) -> Result<BatchResult> {
        let cfg = &self.cfg;
        if cells.is_empty() {
            return Err(Error::invalid("a training batch needs at least one cell"));
        }
        let mut seen = Seen::new(cfg.seq_len);
        for (k, c) in cells.iter().enumerate() {
            check_train_cell(cfg, &mut seen, c).map_err(|e| e.context(format!("cell {k}")))?;
        }
        let masked: usize = cells.iter().map(|c| c.mask.len()).sum();
        let classes = cfg.num_classes;
        if masked == 0 && classes.is_none() {
            return Err(Error::invalid(
                "a training batch needs at least one masked gene",
            ));
        }
        let lens: Vec<usize> = cells.iter().map(|c| c.genes.len()).collect();
        let qmax = cells.iter().map(|c| c.mask.len()).max().unwrap_or(0);
        let chunks = plan_chunks(&lens, self.budget, per_cell_elements(cfg, qmax + 1));
        let (mut sse, mut ce) = (0.0f64, 0.0f64);
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let q = self.net.enc_queries(cfg).map_err(compute_err)?;
        let zt = if needs_zero_terms(cfg) {
            Some(
                self.net
                    .zero_terms(cfg, &q, &self.zf)
                    .map_err(compute_err)?,
            )
        } else {
            None
        };
        let nd = cfg.query_len * cfg.seq_dim;
        if let Some(g) = extra.emb_grad {
            if g.len() != cells.len() * nd {
                return Err(Error::shape(format!(
                    "embedding gradient has {} values, {} cells need {}",
                    g.len(),
                    cells.len(),
                    cells.len() * nd
                )));
            }
        }
        let mut emb = if extra.want_emb {
            Some(vec![0.0f32; cells.len() * nd])
        } else {
            None
        };
        for idx in &chunks {
            let (loss, s, c) = self
                .chunk_loss(
                    cells,
                    idx,
                    &q,
                    zt.as_ref(),
                    masked,
                    extra,
                    emb.as_deref_mut(),
                )
                .map_err(compute_err)?;
            sse += s;
            ce += c;
            if let (true, Some(loss)) = (backward, loss) {
                let gs = loss.backward().map_err(compute_err)?;
                for (slot, var) in acc.iter_mut().zip(&self.vars) {
                    if let Some(g) = gs.get(var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(a) => (a + g).map_err(compute_err)?,
                            None => g.clone(),
                        });
                    }
                }
            }
        }
        let mse = if masked > 0 { sse / masked as f64 } else { 0.0 };
        let ce = if classes.is_some() {
            ce / cells.len() as f64
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
        let grads = if backward {
            let mut out = Vec::with_capacity(acc.len());
            for (i, (a, var)) in acc.into_iter().zip(&self.vars).enumerate() {
                let g = match a {
                    Some(g) => g,
                    None => var.as_tensor().zeros_like().map_err(compute_err)?,
                };
                // the mask token's embedding is fixed at zero (padding_idx)
                let g = if i == self.emb {
                    g.broadcast_mul(&self.keep).map_err(compute_err)?
                } else {
                    g
                };
                out.push(g);
            }
            Some(out)
        } else {
            None
        };
        Ok(BatchResult { stats, grads, emb })
    }

    /// Forward of one chunk: the loss tensor scaled by the whole batch's counts (MSE over
    /// `masked` genes, cross-entropy over all cells; `None` for a chunk of a plain
    /// Exceiver without masked genes), and the chunk's sum of squared
    /// errors and of cross-entropies in f64 (computed on the host from f32 outputs, as
    /// the CPU trainer does).
    #[allow(clippy::too_many_arguments)]
    fn chunk_loss(
        &self,
        cells: &[TrainCell],
        idx: &[usize],
        q: &Tensor,
        zt: Option<&super::net::ZeroTerms>,
        masked: usize,
        extra: Extra,
        emb_out: Option<&mut [f32]>,
    ) -> candle_core::Result<(Option<Tensor>, f64, f64)> {
        let cfg = &self.cfg;
        let dev = &self.dev;
        let classes = cfg.num_classes;
        let plain = extra.emb_grad.is_none() && emb_out.is_none();
        if plain && classes.is_none() && idx.iter().all(|&i| cells[i].mask.is_empty()) {
            // nothing to predict in this chunk: it adds nothing to the loss
            return Ok((None, 0.0, 0.0));
        }
        let refs: Vec<CellRef<'_>> = idx
            .iter()
            .map(|&i| CellRef {
                genes: &cells[i].genes,
                values: &cells[i].values,
                masked: &cells[i].mask,
            })
            .collect();
        let host = pack_cells(cfg, &self.zero_fill, &refs);
        let inp = EncIn::upload(&host, cfg, dev, true)?;
        let enc = self.net.encode(cfg, q, zt, &inp)?;
        let lat = self
            .net
            .process(cfg, &enc, false, None)?
            .pop()
            .unwrap_or(enc);
        let nd = cfg.query_len * cfg.seq_dim;
        if let Some(out) = emb_out {
            let host = lat.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in idx.iter().enumerate() {
                out[i * nd..(i + 1) * nd].copy_from_slice(&host[j * nd..(j + 1) * nd]);
            }
        }
        let mut loss = Tensor::zeros((), DType::F32, dev)?;
        if let Some(g) = extra.emb_grad {
            let mut gc = Vec::with_capacity(idx.len() * nd);
            for &i in idx {
                gc.extend_from_slice(&g[i * nd..(i + 1) * nd]);
            }
            let gt = Tensor::from_slice(&gc, lat.shape(), dev)?;
            loss = (loss + (&lat * gt)?.sum_all()?)?;
        }
        if classes.is_none() && idx.iter().all(|&i| cells[i].mask.is_empty()) {
            // nothing for the decoder to predict in this chunk
            return Ok((extra.emb_grad.map(|_| loss), 0.0, 0.0));
        }
        let lists: Vec<Vec<u32>> = idx
            .iter()
            .map(|&i| cells[i].mask.iter().map(|&p| cells[i].genes[p]).collect())
            .collect();
        let token = cfg.class_token();
        let (rows, qm) = pack_queries(cfg, &lists, token);
        let b = idx.len();
        let width = qm + usize::from(token);
        debug_assert_eq!(rows.len(), b * width);
        // none when nothing queries the decoder (a class head on the embedding, no
        // masked gene)
        let dec = match width {
            0 => None,
            _ => {
                let rows = RowIds::new(&rows, 0, cfg.emb_rows(), cfg.seq_dim, true, dev)?;
                Some(self.net.decode(cfg, &lat, &rows)?)
            }
        };
        let (mut sse, mut ce) = (0.0f64, 0.0f64);
        if let (Some(dec), true) = (&dec, qm > 0 && masked > 0) {
            let mut target = vec![0.0f32; b * qm];
            let mut weight = vec![0.0f32; b * qm];
            for (j, &i) in idx.iter().enumerate() {
                for (k, &p) in cells[i].mask.iter().enumerate() {
                    target[j * qm + k] = cells[i].values[p];
                    weight[j * qm + k] = 1.0;
                }
            }
            let pred = self.net.value_head(&dec.narrow(1, 0, qm)?)?;
            let target_t = Tensor::from_slice(&target, (b, qm), dev)?;
            let weight_t = Tensor::from_slice(&weight, (b, qm), dev)?;
            let err = ((&pred - &target_t)? * weight_t)?;
            loss = (loss + err.sqr()?.sum_all()?.affine(1.0 / masked as f64, 0.0)?)?;
            let p = pred.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in idx.iter().enumerate() {
                for k in 0..cells[i].mask.len() {
                    let e = (p[j * qm + k] - target[j * qm + k]) as f64;
                    sse += e * e;
                }
            }
        }
        if let Some(nc) = classes {
            let row = match (&dec, token) {
                (Some(dec), true) => dec.narrow(1, qm, 1)?.squeeze(1)?,
                _ => lat.flatten_from(1)?,
            };
            if let Some(logits) = self.net.class_head(&row)? {
                let mut onehot = vec![0.0f32; b * nc];
                for (j, &i) in idx.iter().enumerate() {
                    if let Some(l) = cells[i].label {
                        onehot[j * nc + l] = 1.0;
                    }
                }
                let onehot_t = Tensor::from_slice(&onehot, (b, nc), dev)?;
                let mx = logits.max_keepdim(1)?.detach();
                let lse = (logits.broadcast_sub(&mx)?.exp()?.sum_keepdim(1)?.log()? + mx)?;
                let picked = (&logits * onehot_t)?.sum_keepdim(1)?;
                let ce_t = (lse - picked)?.sum_all()?;
                loss = (loss + ce_t.affine(1.0 / cells.len() as f64, 0.0)?)?;
                let lg = logits.flatten_all()?.to_vec1::<f32>()?;
                for (j, &i) in idx.iter().enumerate() {
                    let row = &lg[j * nc..(j + 1) * nc];
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                    if let Some(l) = cells[i].label {
                        ce += m + s.ln() - row[l] as f64;
                    }
                }
            }
        }
        Ok((Some(loss), sse, ce))
    }

    /// Refuse a step whose gradient (`flat`, and per tensor `grads`) holds NaN or ±∞,
    /// naming the first such tensor.
    fn check_finite(&self, flat: &Tensor, grads: &[Tensor]) -> Result<()> {
        let total = flat
            .abs()
            .and_then(|a| a.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(compute_err)?;
        if total.is_finite() {
            return Ok(());
        }
        // Only a sum that overflowed if no single value is NaN or infinite.
        for (name, g) in self.names.iter().zip(grads) {
            let v = g
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(compute_err)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::data(format!(
                    "the gradient of \"{name}\" is not finite; the step was not applied"
                ))
                .with_hint("lower the learning rate"));
            }
        }
        Ok(())
    }

    /// One Adam update (`torch.optim.Adam`: coupled L2 weight decay, bias correction)
    /// of all parameters at once from their flat gradient, in the order and f32
    /// arithmetic of [`crate::train::Adam::update`]; the mask token's row stays zero.
    fn adam(&mut self, grad: &Tensor, lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2) = self.opts.betas;
        let t = self.t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        // the CPU optimiser's f32 constants, exactly
        let f = |x: f32| x as f64;
        let step_size = f((lr / bc1) as f32);
        let bc2_sqrt = Tensor::new(bc2.sqrt() as f32, &self.dev)?;
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let (wd, eps) = (f(self.opts.weight_decay as f32), f(self.opts.eps as f32));
        let x = Tensor::cat(
            &self
                .vars
                .iter()
                .map(|v| v.as_detached_tensor().flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        // g = grad + wd·x; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g·g
        let g = (grad + x.affine(wd, 0.0)?)?;
        let m = (self.m.affine(f(b1f), 0.0)? + g.affine(f(1.0 - b1f), 0.0)?)?;
        let v = (self.v.affine(f(b2f), 0.0)? + (g.affine(f(1.0 - b2f), 0.0)? * &g)?)?;
        // x −= step·m / (√v / √bc2 + ε)
        let denom = v.sqrt()?.broadcast_div(&bc2_sqrt)?.affine(1.0, eps)?;
        let mut step = m.affine(step_size, 0.0)?.div(&denom)?;
        if let Some(h) = &self.head_flat {
            step = (step * h)?;
        }
        let new = ((&x - step)? * &self.keep_flat)?;
        let mut off = 0;
        for var in &self.vars {
            let n = var.elem_count();
            var.set(&new.narrow(0, off, n)?.reshape(var.dims())?)?;
            off += n;
        }
        self.m = m;
        self.v = v;
        Ok(())
    }
}

/// Loss and gradients (`∂loss/∂param` for every tensor, reference names via
/// [`Params::visit`]) of a batch on `device`: the device counterpart of
/// [`crate::train::loss_and_grads`]. The mask token's gradient row is zero.
pub fn loss_and_grads(
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    cells: &[TrainCell],
    device: &Device,
) -> Result<(StepStats, Params)> {
    DeviceTrainer::build(
        cfg.clone(),
        params.clone(),
        zero_fill.to_vec(),
        TrainOpts::default(),
        device,
        false,
    )?
    .loss_and_grads(cells)
}

/// A [`Stepper`] on the device that `exceiver.device` names: the hand-written
/// [`crate::train::Trainer`] for the CPU (the fastest there), a [`DeviceTrainer`] for a
/// GPU (opened with [`crate::device::Device::open`]: a GPU in a build without the
/// `cuda` feature, or one that is not there, is an error).
pub fn stepper(
    cfg: Config,
    params: Params,
    zero_fill: Vec<f32>,
    opts: TrainOpts,
    device: crate::device::Device,
) -> Result<Box<dyn Stepper>> {
    Ok(match device {
        crate::device::Device::Cpu => {
            Box::new(crate::train::Trainer::new(cfg, params, zero_fill, opts)?)
        }
        d => Box::new(DeviceTrainer::new(
            cfg,
            params,
            zero_fill,
            opts,
            &d.open()?,
        )?),
    })
}

impl Stepper for DeviceTrainer {
    fn train_step(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        DeviceTrainer::train_step(self, cells)
    }
    fn train_step_contrastive(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        weight: f64,
    ) -> Result<(StepStats, f64)> {
        DeviceTrainer::train_step_contrastive(self, views, tau, weight)
    }
    fn eval_contrastive(&mut self, views: &[TrainCell], tau: f64) -> Result<f64> {
        DeviceTrainer::eval_contrastive(self, views, tau)
    }
    fn set_projection_head(&mut self, head: Option<ProjectionHead>) -> Result<()> {
        DeviceTrainer::set_projection_head(self, head)
    }
    fn set_head_only(&mut self, on: bool) -> Result<()> {
        DeviceTrainer::set_head_only(self, on)
    }
    fn eval_stats(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        DeviceTrainer::eval_stats(self, cells)
    }
    /// A copy from the device.
    fn params(&self) -> Result<std::borrow::Cow<'_, Params>> {
        Ok(std::borrow::Cow::Owned(DeviceTrainer::params(self)?))
    }
    fn into_params(self: Box<Self>) -> Result<Params> {
        DeviceTrainer::into_params(*self)
    }
    fn config(&self) -> &Config {
        DeviceTrainer::config(self)
    }
    fn steps_done(&self) -> u64 {
        DeviceTrainer::steps_done(self)
    }
    fn next_lr(&self) -> f64 {
        DeviceTrainer::next_lr(self)
    }
}
