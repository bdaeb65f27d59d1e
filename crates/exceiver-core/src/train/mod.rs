//! Training: masked value prediction (plus cross-entropy for a classifier) with a
//! hand-written backward pass and Adam, on CPU threads.
//!
//! * [`TrainCell`]: one cell of a batch: its expressed genes, model input values, the
//!   positions of the genes masked for this step, and a label for a classifier.
//! * [`Trainer`]: owns the weights and the optimiser; [`Trainer::train_step`] runs
//!   forward, loss, backward and one Adam update on a batch; [`Trainer::eval_loss`]
//!   only evaluates.
//! * [`loss_and_grads`]: loss and gradients of a batch without an update (tests).
//! * [`mask_positions`], [`n_mask_for`]: the reference's masking.
//!
//! The maths is that of the reference (`fixtures/README.md`): masked genes are fed
//! as the mask token (embedding row G, fixed at zero) with value 1.0, the decoder is
//! queried with the masked genes (then the class token for a classifier), the loss is
//! the mean squared error over all masked genes of the batch (`nn.MSELoss`), plus the
//! mean cross-entropy over the batch's cells for a classifier. In the reference
//! attention mode the encoder attends to every vocabulary gene; see [`grad`] for how
//! that is done in O(expressed genes) per cell plus one pass over the vocabulary per
//! batch.
//!
//! Results are deterministic for a given batch, parameters and thread count: cells
//! are split into contiguous chunks, one per thread, and per-thread gradients are
//! summed in thread order. Worker threads run only this crate's arithmetic.

mod decoder;
pub mod grad;
mod head;
pub use decoder::ProfileDecoder;
pub use head::ProjectionHead;
pub mod kernels;
pub mod ops;

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::rng::Rng;
use crate::model::weights::Params;
use grad::ThreadState;

/// One cell of a training batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainCell {
    /// Vocabulary indices of the expressed genes (distinct, < G).
    pub genes: Vec<u32>,
    /// Model input values of those genes (after preprocessing, see
    /// [`crate::preprocess`]); also the regression targets of the masked ones.
    pub values: Vec<f32>,
    /// Positions (into `genes`) of the masked genes, in the order they are predicted.
    pub mask: Vec<usize>,
    /// Class label (classifiers only; required there, refused otherwise).
    pub label: Option<usize>,
}

/// What one step (or evaluation) measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// `mse + ce`, the value that is minimised.
    pub loss: f64,
    /// Mean squared error over all masked genes of the batch.
    pub mse: f64,
    /// Mean cross-entropy over the cells (0 for a plain Exceiver).
    pub ce: f64,
    /// Cells in the batch.
    pub cells: usize,
    /// Masked genes in the batch.
    pub masked: usize,
}

/// Optimiser and parallelism settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOpts {
    /// Peak learning rate (reference: 3e-4).
    pub lr: f64,
    /// Coupled L2 weight decay, `grad += wd·param` as `torch.optim.Adam` (reference 1e-5).
    pub weight_decay: f64,
    /// Linear warm-up: step s (0-based) uses `lr·min(1, (s+1)/warmup_steps)`; 0 = none.
    pub warmup_steps: u64,
    /// Cosine decay after the warm-up: from `lr` at step `warmup_steps` to 0 at step
    /// `decay_steps` (the run's last); 0 = none (constant after the warm-up).
    pub decay_steps: u64,
    /// Adam's β1, β2.
    pub betas: (f64, f64),
    /// Adam's ε.
    pub eps: f64,
    /// Worker threads (0: one per available core).
    pub threads: usize,
}

impl Default for TrainOpts {
    fn default() -> Self {
        TrainOpts {
            lr: 3e-4,
            weight_decay: 1e-5,
            warmup_steps: 500,
            decay_steps: 0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            threads: 0,
        }
    }
}

impl TrainOpts {
    /// Check the numbers.
    pub fn validate(&self) -> Result<()> {
        let ok = |name: &str, v: f64, good: bool| -> Result<()> {
            if v.is_finite() && good {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "training option {name} = {v} is invalid"
                )))
            }
        };
        ok("lr", self.lr, self.lr > 0.0)?;
        ok("weight_decay", self.weight_decay, self.weight_decay >= 0.0)?;
        ok("beta1", self.betas.0, (0.0..1.0).contains(&self.betas.0))?;
        ok("beta2", self.betas.1, (0.0..1.0).contains(&self.betas.1))?;
        ok("eps", self.eps, self.eps > 0.0)?;
        if self.threads > 1024 {
            return Err(Error::invalid(format!(
                "training option threads = {} exceeds 1024",
                self.threads
            )));
        }
        Ok(())
    }

    /// Learning rate of step `step` (0-based) with the linear warm-up and, with
    /// `decay_steps`, the cosine decay after it.
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = if self.warmup_steps == 0 {
            1.0
        } else {
            ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        };
        let decay = if self.decay_steps > self.warmup_steps && step >= self.warmup_steps {
            let span = (self.decay_steps - self.warmup_steps) as f64;
            let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        } else {
            1.0
        };
        self.lr * warm * decay
    }
}

/// Adam (`torch.optim.Adam` semantics: coupled L2 weight decay, bias correction),
/// with its moments stored flat in the parameters' state_dict order.
#[derive(Debug, Clone)]
pub struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Updates done so far.
    pub t: u64,
    /// Move only a classifier's head ([`head_range`]); the moments of every parameter
    /// are kept current, so that the backbone starts with them when it moves.
    pub head_only: bool,
}

impl Adam {
    pub fn new(cfg: &Config, params: &Params) -> Adam {
        let n = params.num_parameters(cfg);
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
            head_only: false,
        }
    }

    /// One update with learning rate `lr`. The mask token's embedding row stays zero.
    pub fn update(
        &mut self,
        cfg: &Config,
        params: &mut Params,
        grads: &Params,
        lr: f64,
        opts: &TrainOpts,
    ) -> Result<()> {
        let mut flat = Vec::with_capacity(self.m.len());
        grads.visit(cfg, |_, _, v| {
            flat.extend_from_slice(v);
            Ok(())
        })?;
        if flat.len() != self.m.len() {
            return Err(Error::internal("optimiser state does not match the model"));
        }
        self.t += 1;
        let step = AdamStep::new(opts, lr, self.t);
        let mut off = 0;
        let (m, v, head_only) = (&mut self.m, &mut self.v, self.head_only);
        params.visit_mut(cfg, |name, _, p| {
            let moves = if head_only {
                head_range(cfg, &name, p.len())
            } else {
                0..p.len()
            };
            let r = off..off + p.len();
            step.apply(p, &flat[r.clone()], &mut m[r.clone()], &mut v[r], moves);
            off += p.len();
            Ok(())
        })?;
        let (g, d) = (cfg.seq_len, cfg.seq_dim);
        params.gene_emb[g * d..(g + 1) * d].fill(0.0);
        Ok(())
    }
}

/// The constants of Adam's update number `t` (1-based) at learning rate `lr`, with
/// coupled weight decay, as `torch.optim.Adam`.
pub(crate) struct AdamStep {
    step_size: f32,
    bc2_sqrt: f32,
    b1: f32,
    b2: f32,
    wd: f32,
    eps: f32,
}

impl AdamStep {
    pub(crate) fn new(opts: &TrainOpts, lr: f64, t: u64) -> AdamStep {
        let (b1, b2) = opts.betas;
        let t = t.min(i32::MAX as u64) as i32;
        AdamStep {
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            b1: b1 as f32,
            b2: b2 as f32,
            wd: opts.weight_decay as f32,
            eps: opts.eps as f32,
        }
    }

    /// Updates the moments `m`, `v` of all of tensor `x` from its gradient `g`, and
    /// moves the values at the positions in `moves`.
    pub(crate) fn apply(
        &self,
        x: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        moves: std::ops::Range<usize>,
    ) {
        let (b1, b2) = (self.b1, self.b2);
        for (k, x) in x.iter_mut().enumerate() {
            let g = g[k] + self.wd * *x;
            m[k] = b1 * m[k] + (1.0 - b1) * g;
            v[k] = b2 * v[k] + (1.0 - b2) * g * g;
            if moves.contains(&k) {
                let denom = v[k].sqrt() / self.bc2_sqrt + self.eps;
                *x -= self.step_size * m[k] / denom;
            }
        }
    }
}

/// The values of parameter tensor `name` (of `len` values) that belong to a
/// classifier's head: all of the class head (`mlp_classify.*`) and the class token's
/// row of `gene_emb.weight` (the row after the mask token's); none of any other tensor.
/// They alone move while the backbone is frozen ([`Stepper::set_head_only`]).
pub(crate) fn head_range(cfg: &Config, name: &str, len: usize) -> std::ops::Range<usize> {
    if name.starts_with("mlp_classify.") {
        0..len
    } else if name == "gene_emb.weight" && cfg.num_classes.is_some() {
        ((cfg.seq_len + 1) * cfg.seq_dim).min(len)..len
    } else {
        0..0
    }
}

/// [`Stepper::set_head_only`]'s check: only a classifier has a head to train alone.
pub(crate) fn check_head_only(cfg: &Config, on: bool) -> Result<()> {
    if on && cfg.num_classes.is_none() {
        return Err(Error::invalid(
            "only a classifier has a head to train with the rest of the model frozen",
        ));
    }
    Ok(())
}

/// Owns a model's weights and optimiser state and trains it batch by batch.
pub struct Trainer {
    cfg: Config,
    params: Params,
    zero_fill: Vec<f32>,
    opts: TrainOpts,
    adam: Adam,
    states: Vec<ThreadState>,
    head: Option<ProjectionHead>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.cfg)
            .field("opts", &self.opts)
            .field("step", &self.adam.t)
            .finish()
    }
}

fn check_zero_fill(cfg: &Config, zero_fill: &[f32]) -> Result<()> {
    if zero_fill.len() != cfg.seq_len {
        return Err(Error::shape(format!(
            "zero-fill vector has {} values, the model has {} genes",
            zero_fill.len(),
            cfg.seq_len
        )));
    }
    if let Some(i) = zero_fill.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "zero-fill value {} of gene {i} is not finite",
            zero_fill[i]
        )));
    }
    Ok(())
}

fn thread_count(t: usize) -> usize {
    if t == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        t
    }
}

impl Trainer {
    /// A trainer for `params` (checked against `cfg`), with the zero-fill model input
    /// values of the G vocabulary genes ([`crate::preprocess::Scaler::zero_fill`]).
    pub fn new(
        cfg: Config,
        mut params: Params,
        zero_fill: Vec<f32>,
        opts: TrainOpts,
    ) -> Result<Trainer> {
        params.check(&cfg)?;
        check_zero_fill(&cfg, &zero_fill)?;
        opts.validate()?;
        let (g, d) = (cfg.seq_len, cfg.seq_dim);
        params.gene_emb[g * d..(g + 1) * d].fill(0.0);
        let adam = Adam::new(&cfg, &params);
        let states = (0..thread_count(opts.threads))
            .map(|_| ThreadState::new(&cfg))
            .collect();
        Ok(Trainer {
            cfg,
            params,
            zero_fill,
            opts,
            adam,
            states,
            head: None,
        })
    }

    /// Use a projection head between the embedding and NT-Xent in the contrastive
    /// steps (None: NT-Xent of the embeddings themselves).
    pub fn set_projection_head(&mut self, head: Option<ProjectionHead>) -> Result<()> {
        check_head(&self.cfg, head.as_ref())?;
        self.head = head;
        Ok(())
    }

    /// See [`Stepper::set_head_only`].
    pub fn set_head_only(&mut self, on: bool) -> Result<()> {
        check_head_only(&self.cfg, on)?;
        self.adam.head_only = on;
        Ok(())
    }

    /// Forward, loss, backward and one Adam update on a batch. On error (bad cell,
    /// non-finite loss or gradient) the weights are unchanged.
    pub fn train_step(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        let stats = grad::run_batch(
            &self.cfg,
            &self.params,
            &self.zero_fill,
            cells,
            &mut self.states,
            true,
            None,
            None,
        )?;
        self.apply_grads()?;
        Ok(stats)
    }

    /// A step of masked value prediction plus a contrastive term on the cell
    /// embeddings: `views` holds two augmented views of each cell, in pairs (2i, 2i+1);
    /// the loss adds `weight` times the NT-Xent loss ([`nt_xent`]) of the views'
    /// embeddings at temperature `tau`, which pulls two views of a cell together and
    /// pushes the other cells of the batch away. Two passes: embeddings first (no
    /// gradient), then forward and backward with the contrastive gradient added at the
    /// processed latent. Returns the step statistics and the contrastive loss.
    pub fn train_step_contrastive(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        weight: f64,
    ) -> Result<(StepStats, f64)> {
        let (closs, mut cgrad) = self.contrastive_loss(views, tau, true)?;
        cgrad.iter_mut().for_each(|g| *g *= weight as f32);
        let mut stats = grad::run_batch(
            &self.cfg,
            &self.params,
            &self.zero_fill,
            views,
            &mut self.states,
            true,
            None,
            Some(&cgrad),
        )?;
        let lr = self.opts.lr_at(self.adam.t);
        self.apply_grads()?;
        if let Some(h) = &mut self.head {
            h.step(lr, weight, &self.opts);
        }
        stats.loss += weight * closs;
        Ok((stats, closs))
    }

    /// The NT-Xent loss of `views` (pairs, as in [`Trainer::train_step_contrastive`])
    /// under the current weights (no update).
    pub fn eval_contrastive(&mut self, views: &[TrainCell], tau: f64) -> Result<f64> {
        Ok(self.contrastive_loss(views, tau, false)?.0)
    }

    /// NT-Xent of the views' embeddings (one forward pass, no weight gradients),
    /// through the projection head if any, and with `grad` its gradient with respect
    /// to those embeddings (empty without).
    fn contrastive_loss(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        grad: bool,
    ) -> Result<(f64, Vec<f32>)> {
        check_views(views)?;
        let nd = self.cfg.query_len * self.cfg.seq_dim;
        let mut emb = vec![0.0f32; views.len() * nd];
        grad::run_batch(
            &self.cfg,
            &self.params,
            &self.zero_fill,
            views,
            &mut self.states,
            false,
            Some(&mut emb),
            None,
        )?;
        contrastive_of(
            self.head.as_mut(),
            &emb,
            nd,
            tau,
            grad,
            views,
            &self.zero_fill,
        )
    }

    /// One Adam update from the gradients in `states[0]`, refused (weights
    /// unchanged) when any gradient is not finite.
    fn apply_grads(&mut self) -> Result<()> {
        let grads = &self.states[0].acc.grads;
        let mut bad = None;
        grads.visit(&self.cfg, |name, _, v| {
            if bad.is_none() && v.iter().any(|x| !x.is_finite()) {
                bad = Some(name);
            }
            Ok(())
        })?;
        if let Some(name) = bad {
            return Err(Error::data(format!(
                "the gradient of \"{name}\" is not finite; the step was not applied"
            ))
            .with_hint("lower the learning rate"));
        }
        let lr = self.opts.lr_at(self.adam.t);
        self.adam
            .update(&self.cfg, &mut self.params, grads, lr, &self.opts)
    }

    /// The loss of a batch under the current weights (no update).
    pub fn eval_loss(&mut self, cells: &[TrainCell]) -> Result<f64> {
        Ok(self.eval_stats(cells)?.loss)
    }

    /// [`Trainer::eval_loss`] with the MSE / cross-entropy split.
    pub fn eval_stats(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        grad::run_batch(
            &self.cfg,
            &self.params,
            &self.zero_fill,
            cells,
            &mut self.states,
            false,
            None,
            None,
        )
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn into_params(self) -> Params {
        self.params
    }

    pub fn zero_fill(&self) -> &[f32] {
        &self.zero_fill
    }

    pub fn opts(&self) -> &TrainOpts {
        &self.opts
    }

    /// Updates done so far.
    pub fn steps_done(&self) -> u64 {
        self.adam.t
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.opts.lr_at(self.adam.t)
    }
}

/// One optimiser step at a time, on some device: what the training session
/// ([`crate::session`]) drives. The hand-written CPU [`Trainer`] and
/// [`crate::accel::DeviceTrainer`] implement it with the same inputs, outputs and
/// maths; [`crate::accel::stepper`] opens the one a [`crate::device::Device`] names.
pub trait Stepper: std::fmt::Debug {
    /// Forward, loss, backward and one Adam update on a batch.
    fn train_step(&mut self, cells: &[TrainCell]) -> Result<StepStats>;
    /// [`Stepper::train_step`] plus the contrastive term on pairs of views (cells
    /// 2i and 2i+1 are two views of one cell); returns the step's statistics and the
    /// contrastive loss.
    fn train_step_contrastive(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        weight: f64,
    ) -> Result<(StepStats, f64)>;
    /// The contrastive loss of pairs of views, without an update.
    fn eval_contrastive(&mut self, views: &[TrainCell], tau: f64) -> Result<f64>;
    /// The projection head of the contrastive term (`None`: on the embeddings).
    fn set_projection_head(&mut self, head: Option<ProjectionHead>) -> Result<()>;
    /// With `on`, the next updates move only a classifier's head (the class head and
    /// the class token; [`head_range`]) and leave the rest of the model as it is, the
    /// optimiser's moments kept current for all of it; `false` moves everything again.
    /// Refused (22023) for a model without a class head.
    fn set_head_only(&mut self, on: bool) -> Result<()>;
    /// Loss of a batch, without an update.
    fn eval_stats(&mut self, cells: &[TrainCell]) -> Result<StepStats>;
    /// `eval_stats(cells)?.loss`.
    fn eval_loss(&mut self, cells: &[TrainCell]) -> Result<f64> {
        Ok(self.eval_stats(cells)?.loss)
    }
    /// The current weights (borrowed on the CPU, a copy from a GPU).
    fn params(&self) -> Result<std::borrow::Cow<'_, Params>>;
    /// The trained weights.
    fn into_params(self: Box<Self>) -> Result<Params>;
    fn config(&self) -> &Config;
    /// Updates done so far.
    fn steps_done(&self) -> u64;
    /// The learning rate the next step will use.
    fn next_lr(&self) -> f64;
}

impl Stepper for Trainer {
    fn train_step(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        Trainer::train_step(self, cells)
    }
    fn train_step_contrastive(
        &mut self,
        views: &[TrainCell],
        tau: f64,
        weight: f64,
    ) -> Result<(StepStats, f64)> {
        Trainer::train_step_contrastive(self, views, tau, weight)
    }
    fn eval_contrastive(&mut self, views: &[TrainCell], tau: f64) -> Result<f64> {
        Trainer::eval_contrastive(self, views, tau)
    }
    fn set_projection_head(&mut self, head: Option<ProjectionHead>) -> Result<()> {
        Trainer::set_projection_head(self, head)
    }
    fn set_head_only(&mut self, on: bool) -> Result<()> {
        Trainer::set_head_only(self, on)
    }
    fn eval_stats(&mut self, cells: &[TrainCell]) -> Result<StepStats> {
        Trainer::eval_stats(self, cells)
    }
    fn params(&self) -> Result<std::borrow::Cow<'_, Params>> {
        Ok(std::borrow::Cow::Borrowed(Trainer::params(self)))
    }
    fn into_params(self: Box<Self>) -> Result<Params> {
        Ok(Trainer::into_params(*self))
    }
    fn config(&self) -> &Config {
        Trainer::config(self)
    }
    fn steps_done(&self) -> u64 {
        Trainer::steps_done(self)
    }
    fn next_lr(&self) -> f64 {
        Trainer::next_lr(self)
    }
}

/// Loss and gradients (`∂loss/∂param` for every tensor, reference names via
/// [`Params::visit`]) of a batch, on `threads` threads (0: all cores). The mask
/// token's gradient row is zero.
pub fn loss_and_grads(
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    cells: &[TrainCell],
    threads: usize,
) -> Result<(StepStats, Params)> {
    params.check(cfg)?;
    check_zero_fill(cfg, zero_fill)?;
    let mut states: Vec<ThreadState> = (0..thread_count(threads).min(cells.len().max(1)))
        .map(|_| ThreadState::new(cfg))
        .collect();
    let stats = grad::run_batch(cfg, params, zero_fill, cells, &mut states, true, None, None)?;
    let grads = std::mem::replace(&mut states[0].acc.grads, Params::zeros(cfg));
    Ok((stats, grads))
}

/// NT-Xent of the embeddings `emb` (rows of `nd`) of `views`, through `head` when
/// given, plus the head's profile decoder's loss when it has one (the views' profiles
/// from their values and `zero_fill`); the gradient with respect to `emb` only when
/// `grad` (the head then keeps its own).
pub(crate) fn contrastive_of(
    head: Option<&mut ProjectionHead>,
    emb: &[f32],
    nd: usize,
    tau: f64,
    grad: bool,
    views: &[TrainCell],
    zero_fill: &[f32],
) -> Result<(f64, Vec<f32>)> {
    let Some(h) = head else {
        return nt_xent(emb, nd, tau);
    };
    let prof = h
        .decoder()
        .map(|d| d.profiles(views, zero_fill))
        .transpose()?;
    if grad {
        h.loss_grad(emb, nd, tau, prof.as_deref())
    } else {
        Ok((h.loss(emb, nd, tau, prof.as_deref())?, Vec::new()))
    }
}

/// Adam's moments and step count for a flat parameter vector: the projection head's
/// and the profile decoder's optimiser (the model's `betas`, `eps` and coupled weight
/// decay; bias correction in f64, as the head always computed it, so that its runs
/// stay as pinned rather than switching to [`AdamStep`]'s f32 constants).
#[derive(Debug, Clone)]
pub(crate) struct FlatAdam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

impl FlatAdam {
    pub(crate) fn new(n: usize) -> FlatAdam {
        FlatAdam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `p` at `lr` from gradients `g` scaled by `weight`.
    pub(crate) fn step(
        &mut self,
        p: &mut [f32],
        g: &[f32],
        lr: f64,
        weight: f64,
        opts: &TrainOpts,
    ) {
        self.t += 1;
        let (b1, b2) = opts.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        let (b1, b2, wd, eps) = (b1 as f32, b2 as f32, opts.weight_decay as f32, opts.eps);
        for i in 0..p.len() {
            let gi = g[i] * weight as f32 + wd * p[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * gi;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * gi * gi;
            let mh = self.m[i] as f64 / c1;
            let vh = self.v[i] as f64 / c2;
            p[i] -= (lr * mh / (vh.sqrt() + eps)) as f32;
        }
    }
}

/// A projection head must take the model's embedding.
pub(crate) fn check_head(cfg: &Config, head: Option<&ProjectionHead>) -> Result<()> {
    if let Some(h) = head {
        if h.dims().0 != cfg.embedding_len() {
            return Err(Error::invalid(format!(
                "the projection head takes {}-float embeddings but the model's are {} floats",
                h.dims().0,
                cfg.embedding_len()
            )));
        }
    }
    Ok(())
}

/// A contrastive batch: two views per cell, so an even number, and at least two cells.
pub(crate) fn check_views(views: &[TrainCell]) -> Result<()> {
    if views.len() < 4 || !views.len().is_multiple_of(2) {
        return Err(Error::invalid(format!(
            "a contrastive batch needs two views of each of at least 2 cells, an even number of views (got {})",
            views.len()
        )));
    }
    Ok(())
}

/// NT-Xent (the normalised-temperature cross-entropy of SimCLR, Chen et al. 2020) of
/// `2B` embeddings of `dim` floats paired as (2i, 2i+1): with `u` the unit-length
/// embeddings and `s_ij = u_i·u_j / tau`,
/// `loss = 1/2B · Σ_i [ −s_i,p(i) + log Σ_{j≠i} exp(s_ij) ]`, p(i) the partner of i.
/// Returns the loss and its gradient with respect to the (unnormalised) embeddings.
pub fn nt_xent(emb: &[f32], dim: usize, tau: f64) -> Result<(f64, Vec<f32>)> {
    nt_xent_debiased(emb, dim, tau, 0.0)
}

/// NT-Xent debiased for negatives of the anchor's own class (Chuang et al. 2020,
/// "Debiased Contrastive Learning"): with `tau_plus` the share of a random other cell
/// that is of the anchor's type, the negatives' sum `Σ_neg exp(s_ij)` over the N = 2B − 2
/// negatives is replaced by the estimate of its other-type part,
/// `Ng = max((Σ_neg exp(s_ij) − tau_plus·N·exp(s_ip)) / (1 − tau_plus), N·exp(−1/tau))`,
/// and `loss_i = log(exp(s_ip) + Ng) − s_ip`. `tau_plus` 0 is [`nt_xent`].
pub fn nt_xent_debiased(
    emb: &[f32],
    dim: usize,
    tau: f64,
    tau_plus: f64,
) -> Result<(f64, Vec<f32>)> {
    if !(0.0..0.5).contains(&tau_plus) {
        return Err(Error::invalid(format!(
            "the debiasing share must be in [0, 0.5) (got {tau_plus})"
        )));
    }
    if dim == 0 || !emb.len().is_multiple_of(dim) {
        return Err(Error::shape(format!(
            "{} embedding values are not a whole number of {dim}-float rows",
            emb.len()
        )));
    }
    let m = pairs_of_views("NT-Xent", emb.len() / dim, tau)?;
    let (u, norms) = unit_rows(emb, dim);
    // similarities / tau, and the row softmax over j ≠ i
    let mut s = vec![0.0f64; m * m];
    for i in 0..m {
        for j in i..m {
            let dot: f64 = u[i * dim..(i + 1) * dim]
                .iter()
                .zip(&u[j * dim..(j + 1) * dim])
                .map(|(a, b)| a * b)
                .sum();
            s[i * m + j] = dot / tau;
            s[j * m + i] = dot / tau;
        }
    }
    let mut loss = 0.0;
    // c_ij = ∂loss/∂s_ij
    let mut c = vec![0.0f64; m * m];
    let scale = 1.0 / m as f64;
    let n_neg = (m - 2) as f64;
    for i in 0..m {
        let p = i ^ 1;
        let row = &s[i * m..(i + 1) * m];
        let mx = (0..m)
            .filter(|&j| j != i)
            .map(|j| row[j])
            .fold(f64::NEG_INFINITY, f64::max);
        if tau_plus == 0.0 {
            // plain NT-Xent, summed in index order as before the debiased form came
            // (a different order moved make demo's figures by up to 0.04)
            let z: f64 = (0..m)
                .filter(|&j| j != i)
                .map(|j| (row[j] - mx).exp())
                .sum();
            loss += mx + z.ln() - row[p];
            for j in 0..m {
                if j != i {
                    c[i * m + j] = scale * ((row[j] - mx).exp() / z);
                }
            }
            c[i * m + p] -= scale;
            continue;
        }
        let pos = (row[p] - mx).exp();
        let negs: f64 = (0..m)
            .filter(|&j| j != i && j != p)
            .map(|j| (row[j] - mx).exp())
            .sum();
        // Ng and its weights: ∂Ng/∂exp(s_ij) = w_neg, ∂Ng/∂exp(s_ip) = w_pos
        let raw = (negs - tau_plus * n_neg * pos) / (1.0 - tau_plus);
        let floor = n_neg * (-1.0 / tau - mx).exp();
        let (ng, w_neg, w_pos) = if raw > floor {
            let w = 1.0 / (1.0 - tau_plus);
            (raw, w, -tau_plus * n_neg * w)
        } else {
            (floor, 0.0, 0.0)
        };
        let den = pos + ng;
        loss += mx + den.ln() - row[p];
        for j in 0..m {
            if j != i && j != p {
                c[i * m + j] = scale * w_neg * (row[j] - mx).exp() / den;
            }
        }
        c[i * m + p] = scale * ((1.0 + w_pos) * pos / den - 1.0);
    }
    loss *= scale;
    // ∂loss/∂u_i = Σ_j (c_ij + c_ji) u_j / tau; then through the normalisation
    let mut grad = vec![0.0f32; m * dim];
    let mut gu = vec![0.0f64; dim];
    for i in 0..m {
        gu.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..m {
            let w = (c[i * m + j] + c[j * m + i]) / tau;
            if w != 0.0 {
                for (g, &x) in gu.iter_mut().zip(&u[j * dim..(j + 1) * dim]) {
                    *g += w * x;
                }
            }
        }
        let ui = &u[i * dim..(i + 1) * dim];
        let proj: f64 = gu.iter().zip(ui).map(|(a, b)| a * b).sum();
        for k in 0..dim {
            grad[i * dim + k] = ((gu[k] - proj * ui[k]) / norms[i]) as f32;
        }
    }
    Ok((loss, grad))
}

/// `m` embeddings make pairs of views (an even number, at least 4) and `tau` is a
/// temperature; returns `m`.
fn pairs_of_views(loss: &str, m: usize, tau: f64) -> Result<usize> {
    if m < 4 || !m.is_multiple_of(2) {
        return Err(Error::invalid(format!(
            "{loss} needs an even number of embeddings, at least 4 (got {m})"
        )));
    }
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::invalid(format!(
            "the contrastive temperature must be a positive number (got {tau})"
        )));
    }
    Ok(m)
}

/// Unit-length rows of `emb` (f64) and their norms (at least 1e-12).
fn unit_rows(emb: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let norms: Vec<f64> = emb
        .chunks(dim)
        .map(|r| {
            r.iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt()
                .max(1e-12)
        })
        .collect();
    let u = emb
        .chunks(dim)
        .zip(&norms)
        .flat_map(|(r, &nr)| r.iter().map(move |&x| x as f64 / nr))
        .collect();
    (u, norms)
}

/// NNCLR's loss (Dwibedi et al. 2021, "With a Little Help from My Friends"): NT-Xent
/// where the anchor of each view is not the view itself but its nearest neighbour in
/// `support`, unit rows of earlier batches' projections (constants: no gradient flows
/// into them). For the `2B` rows paired as (2i, 2i+1), row r with neighbour `n_r`:
/// `loss_r = −n_r·u_p(r)/tau + log Σ_k exp(n_r·u_k/tau)` over the B rows k of the
/// other view (p(r) the partner of r), averaged over the 2B rows. Cells of one type
/// are each other's neighbours, so the loss pulls a cell toward other cells like it
/// rather than only toward another view of itself. Returns the loss and its gradient
/// with respect to the (unnormalised) embeddings.
pub fn nn_xent(emb: &[f32], dim: usize, tau: f64, support: &[f64]) -> Result<(f64, Vec<f32>)> {
    if dim == 0
        || !emb.len().is_multiple_of(dim)
        || !support.len().is_multiple_of(dim)
        || support.is_empty()
    {
        return Err(Error::shape(format!(
            "{} embedding values and {} support values are not whole numbers of {dim}-float rows",
            emb.len(),
            support.len()
        )));
    }
    let m = pairs_of_views("NNCLR", emb.len() / dim, tau)?;
    let (u, norms) = unit_rows(emb, dim);
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let mut gu = vec![0.0f64; m * dim];
    let mut loss = 0.0;
    let scale = 1.0 / m as f64;
    let mut logits = vec![0.0f64; m / 2];
    for r in 0..m {
        let ur = &u[r * dim..(r + 1) * dim];
        // one dot product per support row (the last of equal maxima, as max_by)
        let mut nn = ur;
        let mut best = f64::NEG_INFINITY;
        for q in support.chunks_exact(dim) {
            let sim = dot(ur, q);
            if sim >= best {
                (nn, best) = (q, sim);
            }
        }
        // the other view's rows: k = 2j + (1 − r % 2)
        let side = 1 - r % 2;
        for (j, l) in logits.iter_mut().enumerate() {
            let k = 2 * j + side;
            *l = dot(nn, &u[k * dim..(k + 1) * dim]) / tau;
        }
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        loss += mx + z.ln() - logits[r / 2];
        for (j, l) in logits.iter().enumerate() {
            let k = 2 * j + side;
            let w = scale * ((l - mx).exp() / z - if j == r / 2 { 1.0 } else { 0.0 }) / tau;
            for (g, &x) in gu[k * dim..(k + 1) * dim].iter_mut().zip(nn) {
                *g += w * x;
            }
        }
    }
    let mut grad = vec![0.0f32; m * dim];
    for i in 0..m {
        let (ui, gi) = (&u[i * dim..(i + 1) * dim], &gu[i * dim..(i + 1) * dim]);
        let proj = dot(gi, ui);
        for k in 0..dim {
            grad[i * dim + k] = ((gi[k] - proj * ui[k]) / norms[i]) as f32;
        }
    }
    Ok((loss * scale, grad))
}

/// Start a model trained from scratch with its value head predicting `mean_target`
/// (the mean regression target, i.e. the mean model value of expressed genes over the
/// training cells) from a hidden unit in GELU's linear range. The head is
/// `linear2(GELU(linear1(LN(x))))` with ONE hidden unit: freshly initialised it
/// predicts about 0 while the targets average about 3.6 on real data, and when the
/// unit's pre-activation drifts negative GELU flattens it and learning stalls for
/// hundreds of steps (seen on Kang: validation MSE stuck near 1.6 against 0.42 in a
/// run that escaped). So: `linear1.bias` = 2 (pre-activation 2 ± ~0.6, where GELU's
/// slope is about 1), `linear2.weight` = 1, and `linear2.bias` chosen so that the
/// head's output for the mean input is `mean_target`. Errors for a non-finite mean.
pub fn init_value_bias(params: &mut Params, mean_target: f64) -> Result<()> {
    if !mean_target.is_finite() {
        return Err(Error::data(format!(
            "mean training target {mean_target} is not finite"
        )));
    }
    let h = &mut params.value_head;
    let (Some(b1), Some(w2), Some(b2)) = (
        h.linear1.bias.first_mut(),
        h.linear2.weight.first_mut(),
        h.linear2.bias.first_mut(),
    ) else {
        return Err(Error::internal("the value head has no hidden unit"));
    };
    const PRE: f64 = 2.0;
    let gelu = 0.5 * PRE * (1.0 + libm::erf(PRE / std::f64::consts::SQRT_2));
    *b1 = PRE as f32;
    *w2 = 1.0;
    *b2 = (mean_target - gelu) as f32;
    Ok(())
}

/// How much [`init_for_scratch_training`] scales the encoder's key projection.
pub const ENCODER_KEY_SCALE: f32 = 3.0;

/// Prepare freshly initialised weights for training from scratch:
/// [`init_value_bias`], and the encoder's key projection (`in_proj_weight` rows d..2d)
/// scaled by [`ENCODER_KEY_SCALE`]. With PyTorch's Xavier init the latents' attention
/// logits over a cell's genes have a standard deviation of about 0.5, so every latent
/// averages hundreds of genes almost uniformly, cells look alike to the decoder, and a
/// run can sit on the per-gene-mean plateau for many epochs (seen on Kang: validation
/// MSE 0.59 against the baseline 0.57 after 8 epochs; the same run with keys ×3 reached
/// 0.31 after 2). Sharper initial attention makes latents cell-specific from the start.
pub fn init_for_scratch_training(
    cfg: &Config,
    params: &mut Params,
    mean_target: f64,
) -> Result<()> {
    params.check(cfg)?;
    init_value_bias(params, mean_target)?;
    let d = cfg.seq_dim;
    params.encoder.attn.in_proj_weight[d * d..2 * d * d]
        .iter_mut()
        .for_each(|w| *w *= ENCODER_KEY_SCALE);
    Ok(())
}

/// `n_mask = int(frac · median(expressed genes per cell))`, as the reference's
/// `ExceiverDataset` (numpy median: the mean of the two middle values for an even
/// count).
pub fn n_mask_for(frac: f64, nnz_per_cell: &[usize]) -> usize {
    if nnz_per_cell.is_empty() || !(frac.is_finite() && frac > 0.0) {
        return 0;
    }
    let mut v: Vec<usize> = nnz_per_cell.to_vec();
    v.sort_unstable();
    let k = v.len();
    let median = if k % 2 == 1 {
        v[k / 2] as f64
    } else {
        (v[k / 2 - 1] + v[k / 2]) as f64 / 2.0
    };
    (frac * median) as usize
}

/// Choose `n_mask` of a cell's `nnz` expressed genes uniformly without replacement
/// (positions, in draw order), as `np.random.choice(…, replace=False)` does in
/// distribution. Errors when the cell has fewer than `n_mask` genes (the caller skips
/// such cells, as the reference does).
pub fn mask_positions(nnz: usize, n_mask: usize, rng: &mut Rng) -> Result<Vec<usize>> {
    if n_mask > nnz {
        return Err(Error::invalid(format!(
            "cannot mask {n_mask} genes of a cell with {nnz} expressed genes"
        )));
    }
    // partial Fisher–Yates over the positions
    let mut idx: Vec<usize> = (0..nnz).collect();
    for k in 0..n_mask {
        let j = k + rng.below(nnz - k);
        idx.swap(k, j);
    }
    idx.truncate(n_mask);
    Ok(idx)
}

/// About how many bytes a training run takes, to refuse one that cannot fit before it
/// allocates anything (`crate::limits::check_bytes`): the weights with their gradient
/// and Adam's two moments, one gradient accumulator and one cell's activations per
/// worker thread (`expressed`: the most expressed genes a cell may have), a projection
/// head of `head_hidden` units with its optimiser state, a profile decoder of rank
/// `decoder_rank` (0: none) with its dense batch buffers, and a batch of prepared cells.
/// An estimate within a small factor, not an accounting.
pub fn memory_estimate(
    cfg: &Config,
    batch: usize,
    threads: usize,
    expressed: usize,
    head_hidden: usize,
    decoder_rank: usize,
) -> u128 {
    let (d, ff, q) = (
        cfg.seq_dim as u128,
        cfg.dim_feedforward as u128,
        cfg.query_len as u128,
    );
    let t = threads.max(1) as u128;
    let e = expressed as u128;
    let params = cfg.approx_parameters();
    let per_cell = e * d * 8 + q * (2 * ff + 16 * d) * (cfg.num_layers as u128 + 2);
    let head = (q * d * head_hidden as u128 + head_hidden as u128 * 128) * 4;
    let cells = batch as u128 * 2 * e * 3;
    // the profile decoder: its weights with gradient and moments, and four dense
    // [2·batch, G] buffers (profiles, targets, prediction, its gradient)
    let r = decoder_rank as u128;
    let g = cfg.seq_len as u128;
    let decoder = if r > 0 {
        4 * r * (q * d + g) + 4 * batch as u128 * 2 * g
    } else {
        0
    };
    4 * (params * (4 + t) + t * per_cell + head + cells + decoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_follows_the_cosine() {
        let o = TrainOpts {
            lr: 1.0,
            warmup_steps: 10,
            ..TrainOpts::default()
        };
        assert_eq!(
            (o.lr_at(0), o.lr_at(4), o.lr_at(9), o.lr_at(5000)),
            (0.1, 0.5, 1.0, 1.0)
        );
        let c = TrainOpts {
            decay_steps: 110,
            ..o
        };
        assert_eq!((c.lr_at(4), c.lr_at(10)), (0.5, 1.0));
        assert!(
            (c.lr_at(60) - 0.5).abs() < 1e-12,
            "half way: {}",
            c.lr_at(60)
        );
        assert!(c.lr_at(109) > 0.0 && c.lr_at(109) < 1e-3);
        assert_eq!((c.lr_at(110), c.lr_at(500)), (0.0, 0.0));
        // a run shorter than its warm-up: no decay
        let short = TrainOpts {
            decay_steps: 5,
            ..c
        };
        assert_eq!(short.lr_at(4), 0.5);
    }

    /// The analytic gradient of `loss` at `emb` against central finite differences of
    /// every value (relative 2e-3); returns the loss there.
    fn check_gradient(emb: &[f32], loss: impl Fn(&[f32]) -> Result<(f64, Vec<f32>)>) -> f64 {
        let (l, grad) = loss(emb).unwrap();
        assert!(l.is_finite());
        for k in 0..emb.len() {
            let h = 1e-3f32;
            let mut e = emb.to_vec();
            e[k] += h;
            let up = loss(&e).unwrap().0;
            e[k] -= 2.0 * h;
            let dn = loss(&e).unwrap().0;
            let fd = (up - dn) / (2.0 * h as f64);
            assert!(
                (fd - grad[k] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "value {k}: finite difference {fd}, analytic {}",
                grad[k]
            );
        }
        l
    }

    #[test]
    fn nn_xent_gradient_matches_finite_differences() {
        let (m, dim) = (6usize, 5usize);
        let mut rng = Rng::new(4);
        let emb: Vec<f32> = (0..m * dim).map(|_| rng.normal() as f32).collect();
        let raw: Vec<f32> = (0..7 * dim).map(|_| rng.normal() as f32).collect();
        let (support, _) = unit_rows(&raw, dim);
        // (a step could change a row's nearest neighbour, and the loss jump: not here)
        let loss = check_gradient(&emb, |e| nn_xent(e, dim, 0.3, &support));
        assert!(loss > 0.0);
        // each row's anchor is its nearest support row: with the support set made of
        // the batch's own other views, the loss is NT-Xent's cross-view form, minimal
        // when every view is its partner
        let mut e = vec![0.0f32; 4 * 4];
        for i in 0..4 {
            e[i * 4 + i / 2] = 1.0;
        }
        let (sup, _) = unit_rows(&e, 4);
        let (l, g) = nn_xent(&e, 4, 0.1, &sup).unwrap();
        let expect = (1.0f64 + (-10.0f64).exp()).ln();
        assert!((l - expect).abs() < 1e-9, "{l} vs {expect}");
        assert!(g.iter().all(|x| x.abs() < 1e-3));
        assert!(nn_xent(&e, 4, 0.1, &[]).is_err());
        assert!(nn_xent(&e[..12], 4, 0.1, &sup).is_err());
        assert!(nn_xent(&e, 4, 0.0, &sup).is_err());
    }

    #[test]
    fn debiased_nt_xent_gradient_matches_finite_differences() {
        let (m, dim) = (8usize, 5usize);
        let mut rng = Rng::new(6);
        let emb: Vec<f32> = (0..m * dim).map(|_| rng.normal() as f32).collect();
        let loss = check_gradient(&emb, |e| nt_xent_debiased(e, dim, 0.5, 0.1));
        assert!(loss != nt_xent(&emb, dim, 0.5).unwrap().0);
        // a share so large that the estimate falls below its floor: the floor, and no
        // gradient through the negatives
        let (l, _) = nt_xent_debiased(&emb, dim, 0.5, 0.49).unwrap();
        assert!(l.is_finite());
        assert!(nt_xent_debiased(&emb, dim, 0.5, 0.5).is_err());
        assert!(nt_xent_debiased(&emb, dim, 0.5, -0.1).is_err());
    }

    #[test]
    fn nt_xent_gradient_matches_finite_differences() {
        let (m, dim) = (6usize, 5usize);
        let mut rng = Rng::new(3);
        let emb: Vec<f32> = (0..m * dim).map(|_| rng.normal() as f32).collect();
        let loss = check_gradient(&emb, |e| nt_xent(e, dim, 0.3));
        assert!(loss > 0.0);
        // identical partners, orthogonal pairs: the loss is at its minimum for tau
        let mut e = vec![0.0f32; 4 * 4];
        for i in 0..4 {
            e[i * 4 + i / 2] = 1.0;
        }
        let (l2, _) = nt_xent(&e, 4, 0.1).unwrap();
        let want = -10.0 + (10f64.exp() + 2.0).ln();
        assert!((l2 - want).abs() < 1e-9, "{l2} vs {want}");
        assert!(nt_xent(&emb[..3 * dim], dim, 0.3).is_err());
        assert!(nt_xent(&emb, dim, 0.0).is_err());
    }
}
