//! `finetune`'s head-first phase on frozen embeddings (option `head_first`, LP-FT:
//! Kumar et al., ICLR 2022). When the class head reads the cell embedding
//! (`class_readout` `embedding`) and no gene is masked (`frac` 0), the frozen model gives
//! every cell the same embedding in every epoch, so the model runs once per cell and
//! the head (`LN → Linear → GELU → Linear`) trains on the stored embeddings: seconds
//! where an epoch of the whole model's forward and backward passes takes minutes. The
//! head trains as it would inside the model: batches of the same size, learning rate,
//! warm-up, Adam settings, validation cross-entropy and early stopping.

use super::{Batcher, CellSource, Options, Pass, Progress};
use crate::error::{Error, Result};
use crate::model::rng::Rng;
use crate::model::weights::HeadParams;
use crate::model::{Config, Exceiver};
use crate::train::grad::{head_bwd, head_fwd, HeadWs};
use crate::train::{AdamStep, TrainOpts};

/// The head alone trains for at least this many steps when `epochs` epochs are fewer
/// (a few labelled cells make epochs of one or two steps), early stopping permitting.
pub(super) const MIN_HEAD_STEPS: usize = 3000;

/// Cells of one pass, embedded by the frozen model: `x` is `n × dim`, `y` the labels.
pub(super) struct Features {
    pub x: Vec<f32>,
    pub y: Vec<usize>,
    pub dim: usize,
}

impl Features {
    pub fn len(&self) -> usize {
        self.y.len()
    }
}

/// Embeds the labelled cells of `pass` with the frozen model (cells a classifier
/// would skip are skipped here too).
pub(super) fn embed_pass(
    src: &mut dyn CellSource,
    b: &Batcher,
    model: &Exceiver,
    pass: Pass,
    threads: usize,
    progress: &mut dyn Progress,
) -> Result<Features> {
    let dim = model.embedding_len();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    // no gene is masked (frac 0): the seed draws nothing
    let mut rng = Rng::new(0);
    src.scan(pass, 256, &b.data.vocab, &mut |raw| {
        let batch = b.batch(&raw, &mut rng);
        let cells: Vec<(&[u32], &[f32])> = batch
            .iter()
            .map(|c| (c.genes.as_slice(), c.values.as_slice()))
            .collect();
        x.extend(model.embed_batch(&cells, threads)?);
        for c in &batch {
            y.push(
                c.label
                    .ok_or_else(|| Error::internal("a classifier's cell without a label"))?,
            );
        }
        progress.check()
    })?;
    Ok(Features { x, y, dim })
}

/// The head after the phase, and what each epoch measured.
pub(super) struct HeadFit {
    /// The head of the best validation epoch.
    pub head: HeadParams,
    pub best_ce: f64,
    /// (mean training cross-entropy, validation cross-entropy) per epoch.
    pub epochs: Vec<(f64, f64)>,
}

/// The six tensors of a head, in a fixed order.
fn tensors(h: &mut HeadParams) -> [&mut Vec<f32>; 6] {
    [
        &mut h.norm.weight,
        &mut h.norm.bias,
        &mut h.linear1.weight,
        &mut h.linear1.bias,
        &mut h.linear2.weight,
        &mut h.linear2.bias,
    ]
}

/// Mean cross-entropy of `logits` (rows of `c`) against `y`; with `grad`, also
/// `∂/∂logits` of the sum divided by `norm`.
fn cross_entropy(
    logits: &[f32],
    y: &[usize],
    c: usize,
    norm: f32,
    grad: Option<&mut [f32]>,
) -> f64 {
    let mut sum = 0.0f64;
    let mut grad = grad;
    for (r, &label) in y.iter().enumerate() {
        let row = &logits[r * c..(r + 1) * c];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let se: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        sum += se.ln() + mx - row[label] as f64;
        if let Some(g) = grad.as_deref_mut() {
            for k in 0..c {
                let p = ((row[k] as f64 - mx).exp() / se) as f32;
                g[r * c + k] = (p - if k == label { 1.0 } else { 0.0 }) / norm;
            }
        }
    }
    sum / y.len().max(1) as f64
}

/// Mean validation cross-entropy of `head` on `f`.
fn evaluate(head: &HeadParams, f: &Features, ws: &mut HeadWs) -> f64 {
    let c = head.linear2.out_dim;
    let mut sum = 0.0;
    for (xs, ys) in f.x.chunks(256 * f.dim).zip(f.y.chunks(256)) {
        let mut logits = vec![0.0f32; ys.len() * c];
        head_fwd(head, xs, f.dim, ws, &mut logits);
        sum += cross_entropy(&logits, ys, c, 1.0, None) * ys.len() as f64;
    }
    sum / f.len().max(1) as f64
}

/// Trains `head` on `train` with Adam under `topts` (batches of `o.batch_size`, a
/// fresh order each epoch from `o.seed`), for up to `max_epochs` epochs (or
/// [`MIN_HEAD_STEPS`] steps, whichever is more), stopping after
/// `o.patience` epochs without a lower validation cross-entropy (epochs within the
/// warm-up do not count); returns the best epoch's head.
pub(super) fn fit(
    mut head: HeadParams,
    train: &Features,
    val: &Features,
    o: &Options,
    topts: &TrainOpts,
    max_epochs: usize,
    progress: &mut dyn Progress,
) -> Result<HeadFit> {
    if train.len() == 0 || val.len() == 0 {
        return Err(Error::internal(
            "the head-first phase needs training and validation cells",
        ));
    }
    let (dim, c) = (train.dim, head.linear2.out_dim);
    let n_par: usize = tensors(&mut head).iter().map(|t| t.len()).sum();
    let (mut m, mut v) = (vec![0.0f32; n_par], vec![0.0f32; n_par]);
    let mut grads = head.clone();
    let mut ws = HeadWs::default();
    let (mut s1, mut s2) = (Vec::new(), Vec::new());
    let (mut xb, mut dl, mut dx) = (Vec::new(), Vec::new(), Vec::new());
    let mut order: Vec<usize> = (0..train.len()).collect();
    let max_epochs =
        max_epochs.max(MIN_HEAD_STEPS.div_ceil(train.len().div_ceil(o.batch_size.max(1))));
    let mut best = (evaluate(&head, val, &mut ws), head.clone());
    let (mut step, mut bad, mut history) = (0u64, 0usize, Vec::new());
    for e in 0..max_epochs {
        let mut rng = Rng::new(o.seed.wrapping_mul(1_000_003).wrapping_add(e as u64 + 1) ^ 0x4ead);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut loss_sum = 0.0;
        for idx in order.chunks(o.batch_size.max(1)) {
            xb.clear();
            for &i in idx {
                xb.extend_from_slice(&train.x[i * dim..(i + 1) * dim]);
            }
            let ys: Vec<usize> = idx.iter().map(|&i| train.y[i]).collect();
            let mut logits = vec![0.0f32; ys.len() * c];
            head_fwd(&head, &xb, dim, &mut ws, &mut logits);
            dl.resize(ys.len() * c, 0.0);
            loss_sum +=
                cross_entropy(&logits, &ys, c, ys.len() as f32, Some(&mut dl)) * ys.len() as f64;
            for t in tensors(&mut grads) {
                t.fill(0.0);
            }
            dx.resize(ys.len() * dim, 0.0);
            head_bwd(&head, &mut grads, &ws, dim, &dl, &mut dx, &mut s1, &mut s2);
            adam(&mut head, &mut grads, &mut m, &mut v, step, topts);
            step += 1;
        }
        progress.check()?;
        let val_ce = evaluate(&head, val, &mut ws);
        let train_ce = loss_sum / train.len() as f64;
        history.push((train_ce, val_ce));
        progress.notice(&format!(
            "head alone, epoch {}: train CE {train_ce:.4}, validation CE {val_ce:.4}",
            e + 1
        ));
        if super::improves(val_ce, best.0) {
            best = (val_ce, head.clone());
            bad = 0;
        } else if step >= topts.warmup_steps {
            bad += 1;
            if bad >= o.patience {
                break;
            }
        }
    }
    Ok(HeadFit {
        head: best.1,
        best_ce: best.0,
        epochs: history,
    })
}

/// One Adam update of the head, the model optimiser's ([`AdamStep`]) at the learning
/// rate of step `step` (0-based).
fn adam(
    head: &mut HeadParams,
    grads: &mut HeadParams,
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    o: &TrainOpts,
) {
    let a = AdamStep::new(o, o.lr_at(step), step + 1);
    let mut off = 0;
    for (p, g) in tensors(head).into_iter().zip(tensors(grads)) {
        let n = p.len();
        let r = off..off + n;
        off += n;
        a.apply(p, g, &mut m[r.clone()], &mut v[r], 0..n);
    }
}

/// Whether the head-first phase can run on stored embeddings: a classifier pretrained
/// elsewhere whose head reads the embedding, with no gene masked, and the embeddings of
/// its `train_cells` training cells and their validation cells within a quarter of the
/// memory budget ([`crate::limits::max_bytes`]; beyond it the head trains inside the
/// frozen model, epoch by epoch).
pub(super) fn on_embeddings(o: &Options, cfg: &Config, n_mask: usize, train_cells: u64) -> bool {
    let cells = train_cells as f64 / (1.0 - o.val_fraction).max(0.01);
    let bytes = cells * cfg.embedding_len() as f64 * 4.0;
    o.head_first()
        && !o.init_random
        && cfg.num_classes.is_some()
        && cfg.class_embedding
        && n_mask == 0
        && bytes <= crate::limits::max_bytes() as f64 / 4.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::{LayerNorm, Linear};
    use serde_json::json;

    struct Quiet;
    impl Progress for Quiet {
        fn notice(&mut self, _: &str) {}
    }

    /// Two classes told apart by the sign of the first of 8 features, the rest noise,
    /// one label in five flipped (so validation stops improving).
    fn features(n: usize, seed: u64) -> Features {
        let mut rng = Rng::new(seed);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let c = i % 2;
            let side = if (c == 0) != (rng.uniform() < 0.2) {
                -1.0
            } else {
                1.0
            };
            x.push(side + 0.3 * rng.uniform_range(-1.0, 1.0) as f32);
            x.extend((0..7).map(|_| rng.uniform_range(-1.0, 1.0) as f32));
            y.push(c);
        }
        Features { x, y, dim: 8 }
    }

    fn head(seed: u64) -> HeadParams {
        let mut rng = Rng::new(seed);
        let mut r = |n: usize| {
            (0..n)
                .map(|_| rng.uniform_range(-0.3, 0.3) as f32)
                .collect()
        };
        HeadParams {
            norm: LayerNorm {
                weight: vec![1.0; 8],
                bias: vec![0.0; 8],
            },
            linear1: Linear {
                weight: r(16),
                bias: r(2),
                out_dim: 2,
                in_dim: 8,
            },
            linear2: Linear {
                weight: r(4),
                bias: r(2),
                out_dim: 2,
                in_dim: 2,
            },
        }
    }

    fn topts() -> TrainOpts {
        TrainOpts {
            lr: 1e-2,
            warmup_steps: 5,
            ..TrainOpts::default()
        }
    }

    #[test]
    fn the_head_learns_stored_features_and_keeps_its_best_epoch() {
        let o =
            Options::for_finetune(&json!({"batch_size": 16, "patience": 3, "seed": 4})).unwrap();
        let (train, val) = (features(200, 1), features(100, 2));
        let start = evaluate(&head(3), &val, &mut HeadWs::default());
        let f = fit(head(3), &train, &val, &o, &topts(), 60, &mut Quiet).unwrap();
        let (first, last) = (f.epochs[0], *f.epochs.last().unwrap());
        assert!(
            start > 0.6 && f.best_ce < 0.6,
            "validation CE {start} → {}",
            f.best_ce
        );
        assert!(first.0 > last.0, "training CE {first:?} → {last:?}");
        // the head returned is the best epoch's, not the last
        let again = evaluate(&f.head, &val, &mut HeadWs::default());
        assert!(
            (again - f.best_ce).abs() < 1e-9,
            "{again} against {}",
            f.best_ce
        );
        let best = f.epochs.iter().map(|e| e.1).fold(f64::INFINITY, f64::min);
        assert!((best - f.best_ce).abs() < 1e-12);
        // stopped by patience, not by the epoch limit (60, raised to 3,000 steps of 13)
        assert!(f.epochs.len() < 231, "{} epochs", f.epochs.len());
        // the same seed, the same run
        let g = fit(head(3), &train, &val, &o, &topts(), 60, &mut Quiet).unwrap();
        assert_eq!(g.epochs, f.epochs);
    }

    #[test]
    fn only_a_pretrained_head_on_the_embedding_of_whole_cells_trains_on_stored_embeddings() {
        let mut cfg = Config::small(6);
        cfg.num_classes = Some(3);
        cfg.class_embedding = true;
        let o = |v| Options::for_finetune(&v).unwrap();
        let hf = json!({"head_first": true});
        assert!(on_embeddings(&o(hf.clone()), &cfg, 0, 10_000));
        assert!(!on_embeddings(&o(json!({})), &cfg, 0, 10_000));
        assert!(!on_embeddings(
            &o(json!({"head_first": true, "init": "random"})),
            &cfg,
            0,
            10_000
        ));
        // masked genes change the embedding from epoch to epoch
        assert!(!on_embeddings(&o(hf.clone()), &cfg, 12, 10_000));
        // embeddings past a quarter of the memory budget
        let past = crate::limits::max_bytes() / 4 / (4 * cfg.embedding_len() as u64);
        assert!(!on_embeddings(&o(hf.clone()), &cfg, 0, past));
        cfg.class_embedding = false;
        assert!(!on_embeddings(&o(hf), &cfg, 0, 10_000));
    }

    #[test]
    fn nothing_to_fit_on_is_an_error_not_a_panic() {
        let o = Options::for_finetune(&json!({})).unwrap();
        let empty = Features {
            x: vec![],
            y: vec![],
            dim: 8,
        };
        assert!(fit(
            head(1),
            &empty,
            &features(4, 1),
            &o,
            &topts(),
            5,
            &mut Quiet
        )
        .is_err());
    }
}
