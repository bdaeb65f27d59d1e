//! The training session: the whole recipe of `exceiver.train` and `exceiver.finetune`,
//! generic over where the cells come from.
//!
//! A [`CellSource`] streams cells pass by pass (the training cells in a fixed order,
//! the training cells shuffled for an epoch, the validation cells); the PostgreSQL
//! extension implements it with SPI cursors over a cell table, [`InMemory`] over a
//! loaded file, so `cargo test`, the experiment program and the benchmarks run the same
//! session users run from SQL. A [`Progress`] receives the NOTICE lines and may stop the
//! work between batches.
//!
//! The recipe, in order:
//! 1. the vocabulary (a new model: genes expressed in at least `min_cells` training
//!    cells, then optionally the `n_top_genes` most variable), one pass to fit the
//!    scaler, the per-gene-mean baseline and the mask size;
//! 2. the memory estimate, checked against [`crate::limits`] before weights exist;
//!    fresh weights start with the value head at the mean target;
//! 3. epochs: shuffled batches, masked value prediction (plus cross-entropy for a
//!    classifier, plus NT-Xent of two views per cell when `contrastive` > 0), then
//!    validation with fixed masks; the weights of the best validation epoch are kept,
//!    and training stops after `patience` epochs without improvement (epochs that end
//!    within the learning-rate warm-up do not count).

mod head;
mod options;
mod source;

pub use options::{
    Options, CONTRASTIVE_HEAD, CONTRASTIVE_HEAD_OUT, KEYS, SMALL_CONTRASTIVE, SMALL_TOP_GENES,
};
pub use source::{text_column, InMemory, Split};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::cell::{RawCell, Vocab};
use crate::model::rng::Rng;
use crate::model::{AttentionMode, Config, Exceiver, Params};
use crate::preprocess::{HvgFit, Scaler, ScalerFit};
use crate::train::{
    init_for_scratch_training, mask_positions, n_mask_for, ProfileDecoder, ProjectionHead, Stepper,
    TrainCell, TrainOpts,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Instant;

/// Which cells a pass reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The training cells, in an order that is the same in every such pass.
    Training,
    /// The training cells in a fresh order for this epoch (0-based), fixed by the seed.
    Shuffled { epoch: usize },
    /// The validation cells, in an order that is the same in every pass.
    Validation,
}

/// Where the cells of a training run come from. Which cells train and which validate
/// (`val_fraction`, `seed`, `max_cells`, `label_fraction`) is the source's to decide,
/// the same way in every pass; a classifier's source returns only labelled cells.
pub trait CellSource {
    /// What the cells are, for messages (e.g. a table's qualified name).
    fn describe(&self) -> String;
    /// Whether there is any cell at all.
    fn has_cells(&mut self) -> Result<bool>;
    /// Names of the genes that appear in at least `min_cells` training cells, sorted.
    fn expressed_genes(&mut self, min_cells: i64) -> Result<Vec<String>>;
    /// Stream the cells of `pass` over `vocab` to `each`, in batches of up to `batch`
    /// cells (the last may be shorter).
    fn scan(
        &mut self,
        pass: Pass,
        batch: usize,
        vocab: &Vocab,
        each: &mut dyn FnMut(Vec<RawCell>) -> Result<()>,
    ) -> Result<()>;
}

/// Progress lines and a chance to stop, between batches.
pub trait Progress {
    /// A progress line (the extension sends it as a NOTICE).
    fn notice(&mut self, _line: &str) {}
    /// Called after every batch; an error (or an unwinding host check) stops the run.
    fn check(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Progress that prints to standard error (tests, examples).
pub struct Stderr;
impl Progress for Stderr {
    fn notice(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

/// What a run starts from when it does not fit a new model to the data: a model's
/// shape, weights, vocabulary and scaler.
#[derive(Debug, Clone)]
pub struct Start {
    pub cfg: Config,
    pub params: Params,
    pub genes: Vec<String>,
    pub scaler: Scaler,
}

/// One training run.
pub struct Task<'a> {
    /// The new model's name (messages).
    pub model: &'a str,
    pub opts: &'a Options,
    /// None: a new model fitted to the data.
    pub start: Option<Start>,
    /// A classifier's labels (finetuning); None for a plain Exceiver model.
    pub labels: Option<Vec<String>>,
    pub threads: usize,
    pub device: Device,
}

/// A trained model and what the run measured.
#[derive(Debug, Clone)]
pub struct Trained {
    pub cfg: Config,
    /// The weights of the best validation epoch.
    pub params: Params,
    pub genes: Vec<String>,
    pub scaler: Scaler,
    pub labels: Option<Vec<String>>,
    /// `metrics` and `history` as the catalog stores them.
    pub metrics: Value,
    pub history: Vec<Value>,
    pub epochs: usize,
    pub steps: u64,
    /// Best validation MSE (NaN without validation cells).
    pub best_val: f64,
    /// Validation MSE of the per-gene-mean baseline (NaN without validation cells).
    pub baseline_val: f64,
    pub seconds: f64,
    pub cells_per_s: f64,
}

/// An epoch's progress line.
fn epoch_line(
    (epoch, epochs): (usize, usize),
    train_loss: f64,
    v: &Val,
    extra: &str,
    cells_per_s: f64,
) -> String {
    // a classifier on whole cells (frac 0) masks no gene: no MSE to report
    let mse = if v.mse.is_nan() {
        String::new()
    } else {
        format!(
            ", validation MSE {:.4} (per-gene mean baseline {:.4})",
            v.mse, v.base
        )
    };
    format!(
        "epoch {epoch}/{epochs}: train loss {train_loss:.4}{mse}{extra}, {cells_per_s:.1} cells/s"
    )
}

/// A classifier to finetune from `base` (its shape, plus `n_classes`; a class head
/// on the cell embedding when `class_embedding`): the base's weights where
/// `init_random` is false (every tensor but a base classifier's class token and head),
/// fresh ones otherwise.
pub fn classifier_start(
    base: &Start,
    n_classes: usize,
    attention: Option<AttentionMode>,
    seed: u64,
    init_random: bool,
    class_embedding: bool,
) -> Result<Start> {
    let mut cfg = base.cfg.clone();
    cfg.num_classes = Some(n_classes);
    cfg.class_embedding = class_embedding;
    if let Some(a) = attention {
        cfg.attention = a;
    }
    cfg.validate()?;
    let mut params = Params::init(&cfg, seed)?;
    if !init_random {
        let b = &base.params;
        let n = b.gene_emb.len().min(params.gene_emb.len());
        // rows 0..G and the mask row; a base classifier's class token is not reused
        let keep = n.min((cfg.seq_len + 1) * cfg.seq_dim);
        params.gene_emb[..keep].copy_from_slice(&b.gene_emb[..keep]);
        params.query_emb = b.query_emb.clone();
        params.encoder = b.encoder.clone();
        params.layers = b.layers.clone();
        params.decoder = b.decoder.clone();
        params.value_head = b.value_head.clone();
        // per gene: the base's rows; a classifier's class-token row (never an
        // encoder token) keeps its initial value
        let nv = b.value_emb.len().min(params.value_emb.len());
        params.value_emb[..nv].copy_from_slice(&b.value_emb[..nv]);
        params.profile = b.profile.clone();
    }
    Ok(Start {
        cfg,
        params,
        genes: base.genes.clone(),
        scaler: base.scaler.clone(),
    })
}

/// What the data pass found: vocabulary, scaler, baseline, mask size.
struct Data {
    vocab: Vocab,
    scaler: Scaler,
    /// Per-gene mean model value over the training cells where the gene is expressed.
    baseline: Vec<f32>,
    /// Cells expressing each gene.
    expr_n: Vec<u32>,
    /// Vocabulary genes expressed per training cell.
    nnz: Vec<usize>,
    n_mask: usize,
    /// Training cells with fewer expressed genes than the mask size.
    too_small: usize,
    train_cells: u64,
}

/// The `n` most variable of `genes` over the training cells (scanpy's "seurat"
/// flavour), in name order. One extra pass.
fn top_genes(
    src: &mut dyn CellSource,
    progress: &mut dyn Progress,
    genes: Vec<String>,
    n: usize,
    min_cells: i64,
) -> Result<Vec<String>> {
    let vocab = Vocab::new(genes)?;
    let mut fit = HvgFit::new(vocab.len());
    src.scan(Pass::Training, 1024, &vocab, &mut |cells| {
        for cell in &cells {
            fit.add_cell(&cell.genes, &cell.log_norm());
        }
        progress.check()
    })?;
    let keep = fit.select(n);
    if keep.is_empty() {
        return Err(Error::invalid(format!(
            "none of the {} vocabulary genes varies over the training cells of {}",
            vocab.len(),
            src.describe()
        )));
    }
    progress.notice(&format!(
        "vocabulary: the {} most variable of {} genes expressed in at least {min_cells} training cells (option n_top_genes)",
        keep.len(),
        vocab.len(),
    ));
    let names = vocab.into_names();
    Ok(keep.into_iter().map(|g| names[g].clone()).collect())
}

/// Step 1: vocabulary, scaler, baseline and mask size. Returns the data and the model
/// shape (a new model's from the options; `start`'s otherwise).
fn prepare(
    src: &mut dyn CellSource,
    o: &Options,
    start: Option<&Start>,
    progress: &mut dyn Progress,
) -> Result<(Data, Config)> {
    let rel = src.describe();
    if !src.has_cells()? {
        return Err(Error::invalid(format!("table {rel} has no cells"))
            .with_hint("Load cells first, e.g. with exceiver.load_h5ad()."));
    }
    let (cfg, genes) = match start {
        Some(s) => (s.cfg.clone(), s.genes.clone()),
        None => {
            let genes = src.expressed_genes(o.min_cells)?;
            if genes.is_empty() {
                return Err(Error::invalid(format!(
                    "no gene is expressed in at least {} training cells of {rel}",
                    o.min_cells
                ))
                .with_hint("Lower the min_cells option, or check that the table has cells."));
            }
            let genes = match o.n_top_genes {
                Some(n) if n > 0 && n < genes.len() => {
                    top_genes(src, progress, genes, n, o.min_cells)?
                }
                _ => genes,
            };
            (o.config(genes.len())?, genes)
        }
    };
    let vocab = Vocab::new(genes)?;
    let n_genes = vocab.len();
    let mut fit = ScalerFit::new(n_genes);
    let mut expr_sum = vec![0.0f64; n_genes];
    let mut expr_n = vec![0u32; n_genes];
    let mut nnz: Vec<usize> = Vec::new();
    let fresh = start.is_none();
    src.scan(Pass::Training, 1024, &vocab, &mut |cells| {
        for cell in &cells {
            let ys = cell.log_norm();
            if fresh {
                fit.add_cell(&cell.genes, &ys)?;
            }
            for (&g, &y) in cell.genes.iter().zip(&ys) {
                expr_sum[g as usize] += y as f64;
                expr_n[g as usize] += 1;
            }
            nnz.push(cell.genes.len());
        }
        progress.check()
    })?;
    let train_cells = nnz.len() as u64;
    if train_cells == 0 {
        return Err(Error::invalid(format!("{rel} has no training cells"))
            .with_hint("The table is empty, or every cell went to validation (val_fraction)."));
    }
    let scaler = match start {
        Some(s) => s.scaler.clone(),
        None if o.standardize.unwrap_or(true) => fit.finish()?,
        // model values log1p + 1: mean 0 and scale 1 for every gene
        None => Scaler::identity(n_genes),
    };
    let n_mask = n_mask_for(o.frac, &nnz);
    // frac 0 (finetune only): the classifier alone, on whole cells as classify sees them
    if n_mask == 0 && o.frac > 0.0 {
        let mut v = nnz.clone();
        v.sort_unstable();
        return Err(Error::invalid(format!(
            "frac {} of the median {} expressed genes per cell masks no gene",
            o.frac,
            v[v.len() / 2]
        )));
    }
    let too_small = nnz.iter().filter(|&&n| n < n_mask).count();
    if too_small > 0 {
        progress.notice(&format!("{too_small} of {train_cells} training cells have fewer than {n_mask} expressed vocabulary genes (the mask size) and are skipped"));
    }
    // the baseline a model must beat
    let baseline: Vec<f32> = (0..n_genes)
        .map(|g| {
            if expr_n[g] > 0 {
                scaler.value(g, (expr_sum[g] / expr_n[g] as f64) as f32)
            } else {
                1.0
            }
        })
        .collect();
    let data = Data {
        vocab,
        scaler,
        baseline,
        expr_n,
        nnz,
        n_mask,
        too_small,
        train_cells,
    };
    Ok((data, cfg))
}

/// Refuse (54000) a run whose memory estimate (weights, optimiser state, per-thread
/// buffers, projection head, a batch) is past [`crate::limits::max_bytes`], before
/// anything is allocated.
pub fn check_memory(
    model: &str,
    cfg: &Config,
    o: &Options,
    classifier: bool,
    threads: usize,
    nnz: &[usize],
) -> Result<()> {
    cfg.validate()?;
    let head_hidden = if !classifier && o.contrastive.unwrap_or(0.0) > 0.0 {
        o.contrastive_head
    } else {
        0
    };
    let decoder_rank = if head_hidden > 0 && o.reconstruct() > 0.0 {
        o.reconstruct_rank
    } else {
        0
    };
    let max_expressed = nnz.iter().copied().max().unwrap_or(0);
    crate::limits::check_bytes(
        crate::train::memory_estimate(
            cfg,
            o.batch_size,
            threads,
            max_expressed,
            head_hidden,
            decoder_rank,
        ),
        &format!(
            "training \"{model}\" ({} parameters, batch {}, {threads} threads, up to {max_expressed} genes a cell)",
            cfg.approx_parameters(),
            o.batch_size,
        ),
    )
}

/// Cells into training examples: masks, contrastive views, labels.
struct Batcher<'a> {
    data: &'a Data,
    labels: Option<HashMap<&'a str, usize>>,
    keep: f64,
    depth: f64,
}

/// The cell as if sequenced at `rate` of its depth: whole counts thinned binomially
/// (fractional ones scaled), genes left without reads dropped, and the library size
/// (which counts genes outside the vocabulary too) scaled by the rate for the reads
/// this cell does not list.
fn thin(cell: &RawCell, rate: f64, rng: &mut Rng) -> RawCell {
    let listed: f64 = cell.counts.iter().map(|&x| x as f64).sum();
    let mut out = RawCell {
        total: (cell.total - listed).max(0.0) * rate,
        label: cell.label.clone(),
        ..RawCell::default()
    };
    for (&g, &x) in cell.genes.iter().zip(&cell.counts) {
        let kept = if x.fract() == 0.0 && x < 1e9 {
            rng.binomial(x as u64, rate) as f32
        } else {
            x * rate as f32
        };
        if kept > 0.0 {
            out.genes.push(g);
            out.counts.push(kept);
            out.total += kept as f64;
        }
    }
    out
}

impl Batcher<'_> {
    /// A cell with its mask (None: too few genes, or a classifier's cell without a
    /// known label).
    fn example(&self, cell: &RawCell, rng: &mut Rng) -> Option<TrainCell> {
        let n_mask = self.data.n_mask;
        if cell.genes.len() < n_mask {
            return None;
        }
        let label = match (&cell.label, &self.labels) {
            (Some(l), Some(index)) => Some(*index.get(l.as_str())?),
            (None, Some(_)) => return None,
            _ => None,
        };
        let mask = mask_positions(cell.genes.len(), n_mask, rng).ok()?;
        Some(TrainCell {
            genes: cell.genes.clone(),
            values: cell.model_values(&self.data.scaler),
            mask,
            label,
        })
    }

    fn batch(&self, raw: &[RawCell], rng: &mut Rng) -> Vec<TrainCell> {
        raw.iter().filter_map(|c| self.example(c, rng)).collect()
    }

    /// A contrastive view: the cell's reads thinned at a rate drawn between `depth` and
    /// 1 (binomially for whole counts; 1: untouched), then each remaining expressed gene
    /// kept with probability `keep`, then the mask size of the kept ones masked as usual.
    fn view(&self, cell: &RawCell, rng: &mut Rng) -> Option<TrainCell> {
        let thinned;
        let cell = if self.depth < 1.0 {
            thinned = thin(cell, rng.uniform_range(self.depth, 1.0), rng);
            &thinned
        } else {
            cell
        };
        let values = cell.model_values(&self.data.scaler);
        let (mut g, mut v) = (Vec::new(), Vec::new());
        for (&gi, &vi) in cell.genes.iter().zip(&values) {
            if rng.uniform() < self.keep {
                g.push(gi);
                v.push(vi);
            }
        }
        if g.len() <= self.data.n_mask {
            return None;
        }
        let mask = mask_positions(g.len(), self.data.n_mask, rng).ok()?;
        Some(TrainCell {
            genes: g,
            values: v,
            mask,
            label: None,
        })
    }

    /// Two views of each cell, side by side (cells without two views are left out).
    fn views(&self, raw: &[RawCell], rng: &mut Rng) -> Vec<TrainCell> {
        raw.iter()
            .filter_map(|c| Some([self.view(c, rng)?, self.view(c, rng)?]))
            .flatten()
            .collect()
    }
}

/// What validation measured (NaN where nothing was measured).
struct Val {
    mse: f64,
    base: f64,
    ce: f64,
    contrastive: f64,
    cells: usize,
}

impl Val {
    /// The objective being minimised, on the validation cells, and what the epoch's
    /// progress line adds about it (`closs`: the epoch's training contrastive loss).
    fn score(&self, classifier: bool, contrast: f64, closs: f64) -> (f64, String) {
        let v = self;
        let score = if classifier && v.mse.is_finite() {
            v.mse + v.ce
        } else if classifier {
            v.ce
        } else if contrast > 0.0 && v.contrastive.is_finite() {
            v.mse + contrast * v.contrastive
        } else {
            v.mse
        };
        let extra = if classifier {
            format!(", validation CE {:.4}", v.ce)
        } else if contrast > 0.0 {
            format!(
                ", contrastive loss {closs:.4} (validation {:.4})",
                v.contrastive
            )
        } else {
            String::new()
        };
        (score, extra)
    }
}

/// Step 3b: validation with fixed masks (the same seed every pass), the baseline's MSE
/// and, when training contrastively, the NT-Xent loss of fixed views.
fn validate(
    src: &mut dyn CellSource,
    trainer: &mut dyn Stepper,
    b: &Batcher,
    o: &Options,
    contrast: f64,
    progress: &mut dyn Progress,
) -> Result<Val> {
    let mut rng = Rng::new(o.seed ^ 0x5eed_5eed);
    let mut vrng = Rng::new(o.seed ^ 0xc0ff_ee00);
    let (mut se, mut base_se, mut ce, mut masked, mut cells) = (0.0f64, 0.0f64, 0.0f64, 0, 0);
    let (mut csum, mut cn) = (0.0f64, 0usize);
    let tau = o.contrastive_temperature;
    src.scan(
        Pass::Validation,
        o.batch_size.max(64),
        &b.data.vocab,
        &mut |raw| {
            if contrast > 0.0 {
                let views = b.views(&raw, &mut vrng);
                if views.len() >= 4 {
                    csum += trainer.eval_contrastive(&views, tau)? * views.len() as f64;
                    cn += views.len();
                }
            }
            let batch = b.batch(&raw, &mut rng);
            if batch.is_empty() {
                return Ok(());
            }
            let s = trainer.eval_stats(&batch)?;
            se += s.mse * s.masked as f64;
            ce += s.ce * s.cells as f64;
            masked += s.masked;
            cells += s.cells;
            for tc in &batch {
                for &p in &tc.mask {
                    let d = (b.data.baseline[tc.genes[p] as usize] - tc.values[p]) as f64;
                    base_se += d * d;
                }
            }
            progress.check()
        },
    )?;
    let contrastive = if cn > 0 { csum / cn as f64 } else { f64::NAN };
    if masked == 0 && (cells == 0 || trainer.config().num_classes.is_none()) {
        return Ok(Val {
            mse: f64::NAN,
            base: f64::NAN,
            ce: f64::NAN,
            contrastive,
            cells: 0,
        });
    }
    let per_masked = |x: f64| {
        if masked > 0 {
            x / masked as f64
        } else {
            f64::NAN
        }
    };
    Ok(Val {
        mse: per_masked(se),
        base: per_masked(base_se),
        ce: ce / cells.max(1) as f64,
        contrastive,
        cells,
    })
}

/// Counters across epochs.
struct Clock {
    step: u64,
    total_steps: u64,
    cells_seen: u64,
    t0: Instant,
    /// Seconds spent in training steps only.
    train_time: f64,
}

/// Step 3a: one epoch of shuffled batches. Returns (mean train loss, mean contrastive
/// loss) per cell.
#[allow(clippy::too_many_arguments)]
fn epoch(
    src: &mut dyn CellSource,
    trainer: &mut dyn Stepper,
    b: &Batcher,
    o: &Options,
    contrast: f64,
    epoch: usize,
    clock: &mut Clock,
    progress: &mut dyn Progress,
) -> Result<(f64, f64)> {
    let mut rng = Rng::new(
        o.seed
            .wrapping_mul(1_000_003)
            .wrapping_add(epoch as u64 + 1),
    );
    let (mut loss_sum, mut loss_n, mut closs_sum) = (0.0f64, 0usize, 0.0f64);
    let tau = o.contrastive_temperature;
    src.scan(
        Pass::Shuffled { epoch },
        o.batch_size,
        &b.data.vocab,
        &mut |raw| {
            let ts = Instant::now();
            let (s, n_cells) = if contrast > 0.0 {
                let views = b.views(&raw, &mut rng);
                if views.len() < 4 {
                    return Ok(());
                }
                let (s, c) = trainer.train_step_contrastive(&views, tau, contrast)?;
                closs_sum += c * (views.len() / 2) as f64;
                (s, views.len() / 2)
            } else {
                let batch = b.batch(&raw, &mut rng);
                if batch.is_empty() {
                    return Ok(());
                }
                (trainer.train_step(&batch)?, batch.len())
            };
            clock.train_time += ts.elapsed().as_secs_f64();
            clock.step += 1;
            clock.cells_seen += n_cells as u64;
            loss_sum += s.loss * n_cells as f64;
            loss_n += n_cells;
            progress.check()?;
            if clock.step.is_multiple_of(o.progress_every) {
                let el = clock.t0.elapsed().as_secs_f64();
                progress.notice(&format!(
                    "step {}/{} (epoch {}): train loss {:.4}, {:.1} cells/s, about {:.0} s left",
                    clock.step,
                    clock.total_steps,
                    epoch + 1,
                    loss_sum / loss_n.max(1) as f64,
                    clock.cells_seen as f64 / el.max(1e-9),
                    el / clock.step as f64 * clock.total_steps.saturating_sub(clock.step) as f64
                ));
            }
            Ok(())
        },
    )?;
    let n = loss_n.max(1) as f64;
    Ok((loss_sum / n, closs_sum / n))
}

/// Whether a validation score improves on the best so far: lower by more than a
/// millionth of it, so that rounding (which differs between CPUs' kernels) never
/// counts as progress and early stopping decides the same everywhere.
fn improves(score: f64, best: f64) -> bool {
    score < best - 1e-6 * best.abs()
}

/// Early stopping, and a classifier's head-first phase (option `head_first`, LP-FT:
/// Kumar et al., ICLR 2022): while only the head moves, `patience` epochs without
/// improvement end that phase, and the whole model trains from the weights reached,
/// instead of ending the run.
struct Patience {
    limit: usize,
    bad: usize,
    head_only: bool,
    /// Epochs the head trained alone, once the whole model moves.
    head_epochs: usize,
}

impl Patience {
    /// Freezes all but the head of a classifier pretrained elsewhere when `head_first`,
    /// unless the head already trained alone for `head_epochs` epochs on stored
    /// embeddings ([`head_phase`]).
    fn start(
        o: &Options,
        classifier: bool,
        head_epochs: usize,
        trainer: &mut dyn Stepper,
        progress: &mut dyn Progress,
    ) -> Result<Patience> {
        let head_only = classifier && o.head_first() && !o.init_random && head_epochs == 0;
        if head_only {
            trainer.set_head_only(true)?;
            progress.notice(&format!("head first: the class head and class token train alone until validation stops improving for {} epochs, then the whole model", o.patience));
        }
        Ok(Patience {
            limit: o.patience,
            bad: 0,
            head_only,
            head_epochs,
        })
    }

    /// After epoch `epoch` (0-based): whether to stop. `improved`: the validation
    /// score is the best so far; `counts`: an epoch without improvement counts.
    fn stop(
        &mut self,
        improved: bool,
        counts: bool,
        epoch: usize,
        trainer: &mut dyn Stepper,
        progress: &mut dyn Progress,
    ) -> Result<bool> {
        if improved {
            self.bad = 0;
            return Ok(false);
        }
        if !counts {
            return Ok(false);
        }
        self.bad += 1;
        if self.bad < self.limit {
            return Ok(false);
        }
        if self.head_only {
            trainer.set_head_only(false)?;
            self.head_only = false;
            self.head_epochs = epoch + 1;
            self.bad = 0;
            progress.notice(&format!(
                "the head alone did not improve for {} epochs: from epoch {} the whole model trains",
                self.limit,
                epoch + 2
            ));
            return Ok(false);
        }
        progress.notice(&format!(
            "early stop: validation did not improve for {} epochs",
            self.limit
        ));
        Ok(true)
    }

    /// Epochs the head trained alone (all of them if it never stopped improving).
    fn head_epochs(&self, epochs_done: usize) -> usize {
        if self.head_only {
            epochs_done
        } else {
            self.head_epochs
        }
    }
}

/// What the head-first phase on stored embeddings left.
struct HeadDone {
    history: Vec<Value>,
    best_ce: f64,
    epochs: usize,
}

/// `head_first` on stored embeddings ([`head`]): the frozen model embeds the training
/// and validation cells once, the class head trains on them, and the best epoch's head
/// goes into `start`, from which the whole model then trains. `None` (the head then
/// trains inside the frozen model) when there are no validation cells to stop on.
fn head_phase(
    src: &mut dyn CellSource,
    start: &mut Start,
    b: &Batcher,
    task: &Task,
    progress: &mut dyn Progress,
) -> Result<Option<HeadDone>> {
    let o = task.opts;
    let t0 = Instant::now();
    // the frozen model (its class head unused)
    let model = Exceiver::new(
        start.cfg.clone(),
        start.params.clone(),
        b.data.scaler.zero_fill(),
    )?;
    let train = head::embed_pass(src, b, &model, Pass::Training, task.threads, progress)?;
    let val = head::embed_pass(src, b, &model, Pass::Validation, task.threads, progress)?;
    drop(model);
    if train.len() == 0 || val.len() == 0 {
        return Ok(None);
    }
    let (Some(h), n) = (start.params.class_head.take(), train.len()) else {
        return Err(Error::internal("a classifier without a class head"));
    };
    progress.notice(&format!(
        "head first: the frozen model embedded {n} training and {} validation cells in {:.1} s; the class head trains alone on them until validation stops improving for {} epochs, then the whole model",
        val.len(),
        t0.elapsed().as_secs_f64(),
        o.patience
    ));
    let topts = TrainOpts {
        lr: o.learning_rate,
        weight_decay: o.weight_decay,
        warmup_steps: o.warmup_steps,
        threads: task.threads,
        ..TrainOpts::default()
    };
    let fit = head::fit(h, &train, &val, o, &topts, o.epochs, progress)?;
    start.params.class_head = Some(fit.head);
    let epochs = fit.epochs.len();
    let history = fit
        .epochs
        .iter()
        .enumerate()
        .map(|(e, (tr, ce))| {
            json!({"epoch": e + 1, "step": 0, "train_loss": tr, "val_mse": null, "val_ce": ce,
                   "head_only": true, "seconds": t0.elapsed().as_secs_f64()})
        })
        .collect();
    progress.notice(&format!(
        "the head alone: best validation CE {:.4} in {epochs} epochs ({:.1} s); from epoch {} the whole model trains from it",
        fit.best_ce,
        t0.elapsed().as_secs_f64(),
        epochs + 1
    ));
    Ok(Some(HeadDone {
        history,
        best_ce: fit.best_ce,
        epochs,
    }))
}

/// Optimiser steps in one epoch of the training cells.
fn steps_per_epoch(data: &Data, o: &Options) -> u64 {
    ((data.train_cells as usize - data.too_small).div_ceil(o.batch_size)).max(1) as u64
}

/// Step 2: the model and its optimiser (and the contrastive projection head).
fn trainer_for(
    task: &Task,
    start: Option<Start>,
    mut cfg: Config,
    data: &Data,
    contrast: f64,
) -> Result<Box<dyn Stepper>> {
    let o = task.opts;
    if let Some(l) = &task.labels {
        cfg.num_classes = Some(l.len());
    }
    check_memory(
        task.model,
        &cfg,
        o,
        task.labels.is_some(),
        task.threads,
        &data.nnz,
    )?;
    let params = match start {
        Some(s) => s.params,
        None => {
            let mut p = Params::init(&cfg, o.seed)?;
            // Start the value head at the mean target (the mean model value of the
            // expressed genes): a fresh head predicts ~0 against targets of ~3.6.
            let n: f64 = data.expr_n.iter().map(|&x| x as f64).sum();
            let mean = (0..data.vocab.len())
                .map(|g| data.expr_n[g] as f64 * data.baseline[g] as f64)
                .sum::<f64>()
                / n.max(1.0);
            init_for_scratch_training(&cfg, &mut p, mean)?;
            p
        }
    };
    let topts = TrainOpts {
        lr: o.learning_rate,
        weight_decay: o.weight_decay,
        warmup_steps: o.warmup_steps,
        decay_steps: if o.cosine {
            steps_per_epoch(data, o) * o.epochs as u64
        } else {
            0
        },
        threads: task.threads,
        ..TrainOpts::default()
    };
    let emb_len = cfg.embedding_len();
    let mut trainer =
        crate::accel::stepper(cfg, params, data.scaler.zero_fill(), topts, task.device)?;
    if contrast > 0.0 && o.contrastive_head > 0 {
        let mut head =
            ProjectionHead::new(emb_len, o.contrastive_head, CONTRASTIVE_HEAD_OUT, o.seed)?
                .with_support(o.contrastive_support)
                .with_debias(o.contrastive_debias)?;
        if o.reconstruct() > 0.0 {
            head = head.with_decoder(ProfileDecoder::new(
                emb_len,
                o.reconstruct_rank,
                data.vocab.len(),
                o.reconstruct(),
                o.seed,
            )?)?;
        }
        trainer.set_projection_head(Some(head))?;
    }
    Ok(trainer)
}

/// Run the training session: see the module documentation.
pub fn train(
    src: &mut dyn CellSource,
    mut task: Task,
    progress: &mut dyn Progress,
) -> Result<Trained> {
    let o = task.opts;
    let t0 = Instant::now();
    let mut start = task.start.take();
    let (data, cfg) = prepare(src, o, start.as_ref(), progress)?;
    let classifier = task.labels.is_some();
    // contrastive views: plain Exceiver models only
    let contrast = if classifier {
        0.0
    } else {
        o.contrastive.unwrap_or(0.0)
    };
    let batcher = Batcher {
        data: &data,
        labels: task
            .labels
            .as_ref()
            .map(|l| l.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect()),
        keep: o.keep(),
        depth: o.depth(),
    };
    let head_done = match start.as_mut() {
        Some(s) if head::on_embeddings(o, &s.cfg, data.n_mask, data.train_cells) => {
            head_phase(src, s, &batcher, &task, progress)?
        }
        _ => None,
    };
    let mut trainer = trainer_for(&task, start, cfg, &data, contrast)?;
    let cfg = trainer.config().clone();
    let steps_per_epoch = steps_per_epoch(&data, o);
    progress.notice(&start_line(
        &task,
        src,
        &data,
        &cfg,
        contrast,
        steps_per_epoch,
        trainer.as_ref(),
    ));
    // after a head phase on stored embeddings: its epochs, and its best head as the best
    // weights so far
    let (mut history, mut best, first) = match head_done {
        Some(h) => (
            h.history,
            Some((h.best_ce, trainer.params()?.into_owned())),
            h.epochs,
        ),
        None => (Vec::new(), None, 0),
    };
    let mut clock = Clock {
        step: 0,
        total_steps: steps_per_epoch * o.epochs as u64,
        cells_seen: 0,
        t0: Instant::now(),
        train_time: 0.0,
    };
    let (mut baseline_val, mut epochs_done) = (f64::NAN, first);
    let mut patience = Patience::start(o, classifier, first, trainer.as_mut(), progress)?;
    // each phase has up to `epochs` epochs: the whole model's start when the head's end
    let mut limit = first + o.epochs;
    for e in first.. {
        if e >= limit {
            break;
        }
        let (train_loss, closs) = epoch(
            src,
            trainer.as_mut(),
            &batcher,
            o,
            contrast,
            e,
            &mut clock,
            progress,
        )?;
        let v = validate(src, trainer.as_mut(), &batcher, o, contrast, progress)?;
        baseline_val = v.base;
        epochs_done = e + 1;
        let mut h = history_entry(e, &clock, train_loss, closs, &v, classifier, contrast);
        if patience.head_only {
            h["head_only"] = json!(true);
        }
        history.push(h);
        let (score, extra) = v.score(classifier, contrast, closs);
        progress.notice(&epoch_line(
            (e + 1, limit),
            train_loss,
            &v,
            &extra,
            clock.cells_seen as f64 / clock.t0.elapsed().as_secs_f64().max(1e-9),
        ));
        if v.cells == 0 {
            // no validation cells: keep the latest weights
            best = Some((train_loss, trainer.params()?.into_owned()));
            continue;
        }
        let improved = best.as_ref().is_none_or(|(b, _)| improves(score, *b));
        if improved {
            best = Some((score, trainer.params()?.into_owned()));
        }
        // epochs still in the warm-up do not count against patience: a run is not
        // judged before its learning rate has arrived (a few labelled cells make
        // epochs of one or two steps)
        let counts = clock.step >= o.warmup_steps;
        let head_only = patience.head_only;
        if patience.stop(improved, counts, e, trainer.as_mut(), progress)? {
            break;
        }
        if head_only && !patience.head_only {
            limit = e + 1 + o.epochs;
            clock.total_steps = clock.step + steps_per_epoch * o.epochs as u64;
        }
    }
    let head_epochs = patience.head_epochs(epochs_done);
    let (best_score, params) = match best {
        Some(b) => b,
        None => (f64::NAN, trainer.params()?.into_owned()),
    };
    let best_val = history
        .iter()
        .filter_map(|h| h.get("val_mse").and_then(Value::as_f64))
        .fold(f64::INFINITY, f64::min);
    let seconds = t0.elapsed().as_secs_f64();
    let cells_per_s = clock.cells_seen as f64 / clock.train_time.max(1e-9);
    let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    let metrics = json!({
        "best_val_mse": finite(best_val), "best_val_score": finite(best_score),
        "baseline_val_mse": finite(baseline_val),
        "epochs": epochs_done, "head_epochs": head_epochs, "steps": clock.step, "train_cells": data.train_cells,
        "skipped_cells": data.too_small, "n_mask": data.n_mask, "seconds": seconds,
        "train_cells_per_s": cells_per_s, "threads": task.threads, "options": o.to_json(),
    });
    Ok(Trained {
        cfg,
        params,
        genes: data.vocab.into_names(),
        scaler: data.scaler,
        labels: task.labels,
        metrics,
        history,
        epochs: epochs_done,
        steps: clock.step,
        best_val,
        baseline_val,
        seconds,
        cells_per_s,
    })
}

/// The first progress line: what is about to be trained.
fn start_line(
    task: &Task,
    src: &dyn CellSource,
    data: &Data,
    cfg: &Config,
    contrast: f64,
    steps_per_epoch: u64,
    trainer: &dyn Stepper,
) -> String {
    let o = task.opts;
    let n_params = trainer.params().map(|p| p.num_parameters(cfg)).unwrap_or(0);
    let contrastive = if contrast > 0.0 {
        let head = if o.contrastive_head > 0 {
            let mut support = match o.contrastive_support {
                0 => String::new(),
                n => format!("; positives: nearest neighbours among the last {n} projections"),
            };
            if o.contrastive_debias > 0.0 {
                support += &format!(
                    "; debiased for {} same-type negatives",
                    o.contrastive_debias
                );
            }
            if o.reconstruct() > 0.0 {
                support += &format!(
                    "; plus {} × the error of a rank-{} linear decoder from each view's embedding to the other view's standardised profile",
                    o.reconstruct(),
                    o.reconstruct_rank
                );
            }
            format!(
                "{} → {} → {CONTRASTIVE_HEAD_OUT}{support}",
                cfg.embedding_len(),
                o.contrastive_head
            )
        } else {
            "none".to_string()
        };
        format!(
            "; contrastive term weight {contrast} (two views of each cell thinned to {}-1 of its reads, keeping {} of its genes, temperature {}, projection head {head})",
            o.depth(), o.keep(), o.contrastive_temperature
        )
    } else {
        String::new()
    };
    format!(
        "training \"{}\" on {}: {} training cells, {} genes, {} masked per cell, {} epochs of {steps_per_epoch} steps (batch {}), {} parameters, {} threads{contrastive}",
        task.model,
        src.describe(),
        data.train_cells,
        data.vocab.len(),
        data.n_mask,
        o.epochs,
        o.batch_size,
        n_params,
        task.threads,
    )
}

fn history_entry(
    e: usize,
    clock: &Clock,
    train_loss: f64,
    closs: f64,
    v: &Val,
    classifier: bool,
    contrast: f64,
) -> Value {
    let mut h = json!({"epoch": e + 1, "step": clock.step, "train_loss": train_loss,
                       "seconds": clock.t0.elapsed().as_secs_f64()});
    if contrast > 0.0 {
        h["train_contrastive"] = json!(closs);
    }
    if v.cells > 0 {
        h["val_mse"] = json!(v.mse);
        if classifier {
            h["val_ce"] = json!(v.ce);
        }
        if v.contrastive.is_finite() {
            h["val_contrastive"] = json!(v.contrastive);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> RawCell {
        RawCell {
            genes: vec![3, 7, 9],
            counts: vec![1.0, 40.0, 200.0],
            total: 341.0, // 100 reads on genes outside the vocabulary
            label: Some("x".into()),
        }
    }

    /// A classifier from a pretrained base keeps the base's profile path (and starts
    /// it at zero from random weights).
    #[test]
    fn classifier_start_keeps_the_profile_path() {
        let mut cfg = Config::small(6);
        cfg.seq_dim = 8;
        cfg.query_dim = 8;
        cfg.profile = true;
        let mut params = Params::init(&cfg, 1).unwrap();
        params
            .profile
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32);
        let base = Start {
            cfg,
            params,
            genes: (0..6).map(|g| format!("g{g}")).collect(),
            scaler: Scaler::new(vec![0.0; 6], vec![1.0; 6]).unwrap(),
        };
        let c = classifier_start(&base, 3, None, 2, false, false).unwrap();
        assert!(c.cfg.profile);
        assert_eq!(c.params.profile, base.params.profile);
        let r = classifier_start(&base, 3, None, 2, true, false).unwrap();
        assert!(r.params.profile.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn classifier_start_puts_the_head_on_the_embedding() {
        let mut cfg = Config::small(6);
        cfg.seq_dim = 8;
        cfg.query_dim = 8;
        let base = Start {
            params: Params::init(&cfg, 1).unwrap(),
            cfg,
            genes: (0..6).map(|g| format!("g{g}")).collect(),
            scaler: Scaler::new(vec![0.0; 6], vec![1.0; 6]).unwrap(),
        };
        let c = classifier_start(&base, 3, None, 2, false, true).unwrap();
        assert!(c.cfg.class_embedding);
        let h = c.params.class_head.as_ref().unwrap();
        // LayerNorm over the N·d embedding, then N·d → 3
        assert_eq!(h.norm.weight.len(), base.cfg.embedding_len());
        assert_eq!(h.linear1.weight.len(), 3 * base.cfg.embedding_len());
        let t = classifier_start(&base, 3, None, 2, false, false).unwrap();
        assert_eq!(
            t.params.class_head.unwrap().norm.weight.len(),
            base.cfg.seq_dim
        );
    }

    #[test]
    fn thinning_at_rate_one_keeps_the_cell() {
        let mut rng = Rng::new(1);
        assert_eq!(thin(&cell(), 1.0, &mut rng), cell());
    }

    #[test]
    fn thinning_scales_the_reads_and_drops_emptied_genes() {
        let mut rng = Rng::new(2);
        let (mut kept, mut total, mut first_gene) = (0.0, 0.0, 0);
        let n = 2000;
        for _ in 0..n {
            let t = thin(&cell(), 0.25, &mut rng);
            assert!(t.counts.iter().all(|&x| x > 0.0 && x.fract() == 0.0));
            assert_eq!(t.genes.len(), t.counts.len());
            let listed: f64 = t.counts.iter().map(|&x| x as f64).sum();
            assert!(
                (t.total - listed - 25.0).abs() < 1e-9,
                "unlisted reads scaled"
            );
            kept += listed;
            total += t.total;
            first_gene += usize::from(t.genes.first() == Some(&3));
            assert_eq!(t.label.as_deref(), Some("x"));
        }
        let (kept, total) = (kept / n as f64, total / n as f64);
        assert!((kept - 60.25).abs() < 1.0, "mean listed reads {kept}");
        assert!((total - 85.25).abs() < 1.0, "mean library size {total}");
        // the gene with one read survives a quarter of the time
        assert!((first_gene as f64 / n as f64 - 0.25).abs() < 0.04);
        // fractional counts are scaled, not sampled
        let mut c = cell();
        c.counts[1] = 2.5;
        let t = thin(&c, 0.5, &mut rng);
        assert!(t.counts.contains(&1.25));
    }
}
