//! Model-quality experiment, through the training session users run from SQL
//! (`exceiver_core::session` over the vendored files in memory): train on Kang (IFN-β
//! PBMCs) with `exceiver.train`'s options, embed PBMC 3k, a dataset the model never saw,
//! and score leave-one-out kNN label accuracy / macro-F1 (cosine) on
//! `seurat_annotations`; optionally finetune a `stim` classifier on Kang and report its
//! accuracy on the held-out cells.
//!
//! ```text
//! cargo run --release -p exceiver-core --example quality -- [flags]
//!   --options JSON       exceiver.train's options (default {"preset": "small"})
//!   --stim JSON          also finetune a stim classifier with these exceiver.finetune options
//!   --threads 2 --k 15
//! ```
//!
//! The split is the session's in-memory one (a hash of the barcode and the seed, not
//! PostgreSQL's `hashtext`), so the exact cells differ from a run on a table.
//! Figures in the README measured before this program ran the session (flags such as
//! `--hvg`, `--bias-init`, `--no-std`, `--diag-data`) were taken with its version at
//! commit 7b90f15, which carried its own copy of the recipe.

use exceiver_core::data::{h5ad, tenx, CellMatrix};
use exceiver_core::device::Device;
use exceiver_core::model::cell::Vocab;
use exceiver_core::model::{AttentionMode, Exceiver};
use exceiver_core::session::{
    self, CellSource, InMemory, Options, Pass, Split, Start, Stderr, Task, Trained,
};
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data");

struct Args(Vec<String>);
impl Args {
    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(|s| s.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
            .unwrap_or(default)
    }
    fn json(&self, name: &str) -> Option<Value> {
        let s: String = self.get(name, String::new());
        (!s.is_empty()).then(|| serde_json::from_str(&s).unwrap_or_else(|e| panic!("{name}: {e}")))
    }
}

fn main() {
    let a = Args(std::env::args().collect());
    let threads: usize = a.get("--threads", 2);
    let k: usize = a.get("--k", 15);
    let opts = Options::for_train(
        &a.json("--options")
            .unwrap_or(serde_json::json!({"preset": "small"})),
    )
    .unwrap_or_else(|e| panic!("--options: {}", e.message));
    let t0 = Instant::now();
    let kang = h5ad::read(Path::new(&format!("{DATA}/kang_ifnb/kang_ifnb.h5ad"))).unwrap();
    let pbmc = tenx::read(Path::new(&format!("{DATA}/pbmc3k"))).unwrap();
    eprintln!(
        "read kang {}x{} and pbmc3k {}x{} in {:.1}s",
        kang.n_cells(),
        kang.n_genes(),
        pbmc.n_cells(),
        pbmc.n_genes(),
        t0.elapsed().as_secs_f64()
    );

    let mut src = InMemory::new(&kang, "kang", &Split::from_options(&opts), None).unwrap();
    let task = Task {
        model: "quality",
        opts: &opts,
        start: None,
        labels: None,
        threads,
        device: Device::Cpu,
    };
    let t = session::train(&mut src, task, &mut Stderr).unwrap();
    println!(
        "kang: {} epochs, best validation MSE {:.4} (per-gene-mean baseline {:.4}), {:.0} s, {:.1} cells/s",
        t.epochs, t.best_val, t.baseline_val, t.seconds, t.cells_per_s
    );
    knn_report(&t, &pbmc, k, threads);

    if let Some(stim_opts) = a.json("--stim") {
        stim(&t, &kang, &stim_opts, threads);
    }
    println!("total {:.0}s", t0.elapsed().as_secs_f64());
}

/// Cells of `m` as model input over the model's vocabulary (every cell, in file order).
fn model_cells(t: &Trained, m: &CellMatrix) -> Vec<(Vec<u32>, Vec<f32>)> {
    let vocab = Vocab::new(t.genes.clone()).unwrap();
    let split = Split {
        val_fraction: 0.0,
        seed: 0,
        max_cells: None,
        label_fraction: 1.0,
    };
    let mut src = InMemory::new(m, "cells", &split, None).unwrap();
    let mut by_id = Vec::new();
    src.scan(Pass::Training, 1024, &vocab, &mut |cells| {
        by_id.extend(
            cells
                .into_iter()
                .map(|c| (c.genes.clone(), c.model_values(&t.scaler))),
        );
        Ok(())
    })
    .unwrap();
    // the source reads cells in id order: back to file order
    let mut order: Vec<usize> = (0..m.n_cells()).collect();
    order.sort_by(|&x, &y| m.barcodes[x].cmp(&m.barcodes[y]));
    let mut out = vec![(Vec::new(), Vec::new()); m.n_cells()];
    for (cell, &c) in by_id.into_iter().zip(&order) {
        out[c] = cell;
    }
    out
}

/// kNN label accuracy of the PBMC 3k embeddings, in both attention modes.
fn knn_report(t: &Trained, pbmc: &CellMatrix, k: usize, threads: usize) {
    let lab = session::text_column(pbmc, "seurat_annotations").unwrap();
    let cells = model_cells(t, pbmc);
    let keep: Vec<usize> = (0..pbmc.n_cells())
        .filter(|&c| lab[c].is_some() && !cells[c].0.is_empty())
        .collect();
    let mut classes: Vec<String> = keep.iter().filter_map(|&c| lab[c].clone()).collect();
    classes.sort();
    classes.dedup();
    let labels: Vec<usize> = keep
        .iter()
        .map(|&c| classes.binary_search(lab[c].as_ref().unwrap()).unwrap())
        .collect();
    let input: Vec<(&[u32], &[f32])> = keep
        .iter()
        .map(|&c| (cells[c].0.as_slice(), cells[c].1.as_slice()))
        .collect();
    let dim = t.cfg.embedding_len();
    for mode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
        let mut cfg = t.cfg.clone();
        cfg.attention = mode;
        let model = Exceiver::new(cfg, t.params.clone(), t.scaler.zero_fill()).unwrap();
        let te = Instant::now();
        let emb = model.embed_batch(&input, threads).unwrap();
        let et = te.elapsed().as_secs_f64();
        let (acc, f1) = knn_eval(&emb, dim, &labels, classes.len(), k, threads);
        let (m, sd) = col_stats(&emb, dim);
        let (acc_s, f1_s) = knn_eval(
            &transform(&emb, dim, &m, Some(&sd)),
            dim,
            &labels,
            classes.len(),
            k,
            threads,
        );
        println!(
            "pbmc3k {mode:?}{} ({} cells, {} classes, embedded in {et:.1} s): kNN-{k} accuracy / macro-F1 {acc:.3} / {f1:.3}, standardised dimensions {acc_s:.3} / {f1_s:.3}",
            if mode == t.cfg.attention { " (the model's mode)" } else { "" },
            keep.len(),
            classes.len(),
        );
    }
}

/// Finetune a stim classifier from the trained model and report held-out accuracy.
fn stim(base: &Trained, kang: &CellMatrix, opts: &Value, threads: usize) {
    let o = Options::for_finetune(opts).unwrap_or_else(|e| panic!("--stim: {}", e.message));
    let mut classes: Vec<String> = session::text_column(kang, "stim")
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    classes.sort();
    classes.dedup();
    let start = Start {
        cfg: base.cfg.clone(),
        params: base.params.clone(),
        genes: base.genes.clone(),
        scaler: base.scaler.clone(),
    };
    let start =
        session::classifier_start(&start, classes.len(), o.attention, o.seed, o.init_random)
            .unwrap();
    let mut src = InMemory::new(kang, "kang", &Split::from_options(&o), Some("stim")).unwrap();
    let task = Task {
        model: "stim",
        opts: &o,
        start: Some(start),
        labels: Some(classes.clone()),
        threads,
        device: Device::Cpu,
    };
    let c = session::train(&mut src, task, &mut Stderr).unwrap();
    // accuracy on the held-out (validation) cells
    let model = Exceiver::new(c.cfg.clone(), c.params.clone(), c.scaler.zero_fill()).unwrap();
    let vocab = Vocab::new(c.genes.clone()).unwrap();
    let (mut right, mut n) = (0usize, 0usize);
    src.scan(Pass::Validation, 256, &vocab, &mut |cells| {
        for cell in cells {
            let logits = model.classify_logits(&cell.genes, &cell.model_values(&c.scaler))?;
            let best = (0..logits.len())
                .max_by(|&x, &y| logits[x].total_cmp(&logits[y]))
                .unwrap_or(0);
            right += usize::from(cell.label.as_deref() == Some(classes[best].as_str()));
            n += 1;
        }
        Ok(())
    })
    .unwrap();
    println!(
        "stim: {} epochs, held-out accuracy {:.3} on {n} cells (label_fraction {}, init {})",
        c.epochs,
        right as f64 / n.max(1) as f64,
        o.label_fraction,
        if o.init_random {
            "random"
        } else {
            "pretrained"
        }
    );
}

/// Exact leave-one-out kNN (cosine) label accuracy and macro-F1; ties: smallest label.
fn knn_eval(
    emb: &[f32],
    dim: usize,
    labels: &[usize],
    n_cls: usize,
    k: usize,
    threads: usize,
) -> (f64, f64) {
    let n = labels.len();
    let normed: Vec<f32> = emb
        .chunks(dim)
        .flat_map(|r| {
            let nr = r
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt()
                .max(1e-30);
            r.iter().map(move |x| (*x as f64 / nr) as f32)
        })
        .collect();
    let per = n.div_ceil(threads);
    let preds: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let normed = &normed;
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut sims: Vec<(f32, usize)> = Vec::with_capacity(n);
                    for i in t * per..((t + 1) * per).min(n) {
                        sims.clear();
                        let a = &normed[i * dim..(i + 1) * dim];
                        for j in 0..n {
                            if j != i {
                                let b = &normed[j * dim..(j + 1) * dim];
                                let dot = dot8(a, b);
                                sims.push((dot, j));
                            }
                        }
                        let kk = k.min(sims.len());
                        sims.select_nth_unstable_by(kk - 1, |x, y| y.0.total_cmp(&x.0));
                        let mut votes = vec![0usize; n_cls];
                        for &(_, j) in &sims[..kk] {
                            votes[labels[j]] += 1;
                        }
                        let mx = *votes.iter().max().unwrap();
                        out.push(votes.iter().position(|&v| v == mx).unwrap());
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let acc = preds.iter().zip(labels).filter(|(p, y)| p == y).count() as f64 / n as f64;
    let mut f1 = 0.0;
    for c in 0..n_cls {
        let tp = preds
            .iter()
            .zip(labels)
            .filter(|(p, y)| **p == c && **y == c)
            .count() as f64;
        let fp = preds
            .iter()
            .zip(labels)
            .filter(|(p, y)| **p == c && **y != c)
            .count() as f64;
        let fnn = preds
            .iter()
            .zip(labels)
            .filter(|(p, y)| **p != c && **y == c)
            .count() as f64;
        f1 += if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fnn)
        };
    }
    (acc, f1 / n_cls as f64)
}

fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

fn col_stats(emb: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let n = emb.len() / dim;
    let mut mean = vec![0.0f64; dim];
    let mut sq = vec![0.0f64; dim];
    for r in emb.chunks(dim) {
        for (c, &x) in r.iter().enumerate() {
            mean[c] += x as f64;
            sq[c] += (x as f64) * (x as f64);
        }
    }
    let mean: Vec<f64> = mean.iter().map(|m| m / n as f64).collect();
    let sd: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| ((s / n as f64 - m * m).max(0.0).sqrt() as f32).max(1e-6))
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), sd)
}

fn transform(emb: &[f32], dim: usize, mean: &[f32], sd: Option<&[f32]>) -> Vec<f32> {
    emb.chunks(dim)
        .flat_map(|r| {
            r.iter().enumerate().map(move |(c, &x)| {
                let y = x - mean[c];
                match sd {
                    Some(s) => y / s[c],
                    None => y,
                }
            })
        })
        .collect()
}
