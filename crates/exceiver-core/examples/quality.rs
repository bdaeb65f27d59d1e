//! Model-quality experiment: train on Kang (IFN-β PBMCs) as `exceiver.train` does,
//! report validation MSE against the per-gene-mean baseline per epoch, then embed
//! pbmc3k and score leave-one-out kNN label accuracy / macro-F1 (cosine) on
//! `seurat_annotations`. Optionally finetune a stim classifier on Kang.
//!
//! ```text
//! cargo run --release -p exceiver-core --example quality -- [flags]
//!   --epochs 3 --lr 1e-3 --warmup 50 --batch 64 --wd 1e-5 --threads 2 --seed 0
//!   --d 16 --latents 64 --layers 2 --ff 128 --nhead 4
//!   --mode reference|expressed        (training attention)
//!   --max-train N --max-val N         (subsample cells for quick probes)
//!   --bias-init                       (value head output bias := mean target)
//!   --value-emb                       (Config::value_embedding: the encoder sees values)
//!   --frac 0.15 --min-cells 3 --k 15
//!   --hvg N                           (vocabulary: N highly variable genes)
//!   --key-scale S --head-bias B       (extra init: encoder keys x S, class head bias B)
//!   --overfit N                       (train on N cells, report their train MSE)
//!   --stim-epochs E                   (finetune a stim classifier afterwards)
//!   --contrast W --tau T --keep P     (contrastive term as exceiver.train's options
//!                                      contrastive / _temperature / _keep; then the
//!                                      pbmc3k kNN is printed after every epoch)
//!   --head H --head-out O             (projection head H → O for the contrastive term,
//!                                      as the option contrastive_head; O default 128)
//!   --no-std                          (model values log1p + 1, as standardize false)
//! ```
//!
//! Data preparation follows `src/api/train.rs`: vocabulary = genes expressed in at
//! least `min_cells` training cells; library size = all counts of the cell; values =
//! `scaler.value(g, log1p(normalize_count(count, total)))`; n_mask = int(frac · median
//! expressed vocabulary genes); baseline = per-gene mean value over training cells
//! where the gene is expressed. The split is a hash of the barcode (not PostgreSQL's
//! hashtext, so the exact cells differ from the SQL run).

use exceiver_core::data::{h5ad, tenx, CellMatrix, ObsValues};
use exceiver_core::model::rng::Rng;
use exceiver_core::model::{AttentionMode, Config, Exceiver, Params};
use exceiver_core::preprocess::{log1p32, normalize_count, Scaler, ScalerFit};
use exceiver_core::train::{mask_positions, n_mask_for, TrainCell, TrainOpts, Trainer};
use std::collections::HashMap;
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
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
    fn str(&self, name: &str, default: &str) -> String {
        self.get(name, default.to_string())
    }
}

/// One cell: vocabulary indices and counts of its non-zero known genes, library size.
#[derive(Clone)]
struct Raw {
    genes: Vec<u32>,
    counts: Vec<f32>,
    total: f64,
}

fn raw_cells(m: &CellMatrix, vocab: &HashMap<String, u32>) -> Vec<Raw> {
    let map: Vec<Option<u32>> = m.genes.iter().map(|g| vocab.get(g).copied()).collect();
    (0..m.n_cells())
        .map(|c| {
            let (gi, x) = m.cell(c);
            let mut r = Raw {
                genes: Vec::new(),
                counts: Vec::new(),
                total: 0.0,
            };
            for (&g, &v) in gi.iter().zip(x) {
                r.total += v as f64;
                if v > 0.0 {
                    if let Some(i) = map[g as usize] {
                        r.genes.push(i);
                        r.counts.push(v);
                    }
                }
            }
            r
        })
        .collect()
}

fn log_norm(c: &Raw) -> Vec<f32> {
    c.counts
        .iter()
        .map(|&x| log1p32(normalize_count(x, c.total)))
        .collect()
}

fn model_values(c: &Raw, s: &Scaler) -> Vec<f32> {
    c.genes
        .iter()
        .zip(log_norm(c))
        .map(|(&g, y)| s.value(g as usize, y))
        .collect()
}

fn fnv(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9e3779b97f4a7c15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn text_col(m: &CellMatrix, name: &str) -> Vec<Option<String>> {
    let col = m
        .obs
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no obs column {name}"));
    match &col.values {
        ObsValues::Text(v) => v.clone(),
        ObsValues::Int(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        ObsValues::Float(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        ObsValues::Bool(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
    }
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

fn main() {
    let a = Args(std::env::args().collect());
    let epochs: usize = a.get("--epochs", 3);
    let lr: f64 = a.get("--lr", 1e-3);
    let warmup: u64 = a.get("--warmup", 50);
    let batch: usize = a.get("--batch", 64);
    let wd: f64 = a.get("--wd", 1e-5);
    let threads: usize = a.get("--threads", 2);
    let seed: u64 = a.get("--seed", 0);
    let frac: f64 = a.get("--frac", 0.15);
    let min_cells: usize = a.get("--min-cells", 3);
    let k: usize = a.get("--k", 15);
    let max_train: usize = a.get("--max-train", usize::MAX);
    let max_val: usize = a.get("--max-val", usize::MAX);
    let overfit: usize = a.get("--overfit", 0);
    let stim_epochs: usize = a.get("--stim-epochs", 0);
    let mode = match a.str("--mode", "reference").as_str() {
        "reference" => AttentionMode::Reference,
        "expressed" => AttentionMode::ExpressedOnly,
        m => panic!("bad --mode {m}"),
    };

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

    // split
    let is_val: Vec<bool> = kang
        .barcodes
        .iter()
        .map(|b| fnv(b, seed) % 1_000_000 < 100_000)
        .collect();
    let mut train_idx: Vec<usize> = (0..kang.n_cells()).filter(|&c| !is_val[c]).collect();
    let mut val_idx: Vec<usize> = (0..kang.n_cells()).filter(|&c| is_val[c]).collect();
    if overfit > 0 {
        train_idx.truncate(overfit);
        val_idx = train_idx.clone();
    }
    train_idx.truncate(max_train);
    val_idx.truncate(max_val);

    // vocabulary
    let mut n_cells_of = vec![0usize; kang.n_genes()];
    for &c in &train_idx {
        for &g in kang.cell(c).0 {
            n_cells_of[g as usize] += 1;
        }
    }
    let mut names: Vec<String> = (0..kang.n_genes())
        .filter(|&g| n_cells_of[g] >= min_cells)
        .map(|g| kang.genes[g].clone())
        .collect();
    names.sort();
    let mut vocab: HashMap<String, u32> = names
        .iter()
        .enumerate()
        .map(|(i, g)| (g.clone(), i as u32))
        .collect();
    let mut kraw = raw_cells(&kang, &vocab);
    let hvg: usize = a.get("--hvg", 0);
    if hvg > 0 {
        let mut hf = exceiver_core::preprocess::HvgFit::new(names.len());
        for &c in &train_idx {
            hf.add_cell(&kraw[c].genes, &log_norm(&kraw[c]));
        }
        let top = hf.select(hvg);
        names = top.iter().map(|&g| names[g].clone()).collect();
        vocab = names
            .iter()
            .enumerate()
            .map(|(i, g)| (g.clone(), i as u32))
            .collect();
        kraw = raw_cells(&kang, &vocab);
        eprintln!("vocabulary: {} highly variable genes", names.len());
    }
    let ng = names.len();

    // scaler, baseline, n_mask
    let mut fit = ScalerFit::new(ng);
    let mut esum = vec![0.0f64; ng];
    let mut en = vec![0u32; ng];
    let mut nnz = Vec::new();
    for &c in &train_idx {
        let ys = log_norm(&kraw[c]);
        fit.add_cell(&kraw[c].genes, &ys).unwrap();
        for (&g, &y) in kraw[c].genes.iter().zip(&ys) {
            esum[g as usize] += y as f64;
            en[g as usize] += 1;
        }
        nnz.push(kraw[c].genes.len());
    }
    let mut scaler = fit.finish().unwrap();
    if a.has("--no-std") {
        // experiment: model values log1p + 1 (no per-gene standardisation)
        scaler = exceiver_core::preprocess::Scaler::new(vec![0.0; ng], vec![1.0; ng]).unwrap();
    }
    let n_mask = n_mask_for(frac, &nnz);
    let baseline: Vec<f32> = (0..ng)
        .map(|g| {
            if en[g] > 0 {
                scaler.value(g, (esum[g] / en[g] as f64) as f32)
            } else {
                1.0
            }
        })
        .collect();
    let values: Vec<Vec<f32>> = kraw.iter().map(|c| model_values(c, &scaler)).collect();

    // config
    let mut cfg = Config::small(ng);
    cfg.seq_dim = a.get("--d", cfg.seq_dim);
    cfg.query_dim = cfg.seq_dim;
    cfg.query_len = a.get("--latents", cfg.query_len);
    cfg.num_layers = a.get("--layers", cfg.num_layers);
    cfg.dim_feedforward = a.get("--ff", cfg.dim_feedforward);
    cfg.nhead = a.get("--nhead", cfg.nhead);
    cfg.attention = mode;
    cfg.value_embedding = a.has("--value-emb");
    cfg.validate().unwrap();
    let mut params = Params::init(&cfg, seed).unwrap();
    // mean target over masked positions == mean value over expressed genes
    let (mut tsum, mut tn) = (0.0f64, 0usize);
    for &c in &train_idx {
        tsum += values[c].iter().map(|&v| v as f64).sum::<f64>();
        tn += values[c].len();
    }
    let tmean = tsum / tn as f64;
    if a.has("--bias-init") {
        exceiver_core::train::init_for_scratch_training(&cfg, &mut params, tmean).unwrap();
        let ks: f32 = a.get("--key-scale", 1.0);
        let d = cfg.seq_dim;
        params.encoder.attn.in_proj_weight[d * d..2 * d * d]
            .iter_mut()
            .for_each(|w| *w *= ks);
    }
    eprintln!(
        "{} train / {} val cells, {ng} genes, n_mask {n_mask}, median nnz {}, mean target {tmean:.3}; config d={} N={} L={} ff={} {:?}; {} params",
        train_idx.len(),
        val_idx.len(),
        { let mut v = nnz.clone(); v.sort(); v[v.len() / 2] },
        cfg.seq_dim, cfg.query_len, cfg.num_layers, cfg.dim_feedforward, cfg.attention,
        params.num_parameters(&cfg)
    );

    if a.has("--diag-data") {
        let zf = scaler.zero_fill();
        let pos = zf.iter().filter(|&&v| v > 0.0).count();
        let (mut neg, mut tot) = (0usize, 0usize);
        for &c in &train_idx {
            neg += values[c].iter().filter(|&&v| v < 0.0).count();
            tot += values[c].len();
        }
        println!("data: zero_fill > 0 for {pos} of {ng} genes (min {:.3}, median {:.3}); expressed values < 0: {neg} of {tot} ({:.2}%)",
            zf.iter().cloned().fold(f32::INFINITY, f32::min), { let mut v = zf.clone(); v.sort_by(f32::total_cmp); v[ng / 2] }, 100.0 * neg as f64 / tot as f64);
        // bag-of-expressed-genes ceiling: random Gaussian projection (1024 dims) of the
        // binary expressed set, and of the model values, on pbmc3k
        let lab = text_col(&pbmc, "seurat_annotations");
        let praw = raw_cells(&pbmc, &vocab);
        let keep: Vec<usize> = (0..pbmc.n_cells())
            .filter(|&c| lab[c].is_some() && !praw[c].genes.is_empty())
            .collect();
        let mut classes: Vec<String> = keep.iter().map(|&c| lab[c].clone().unwrap()).collect();
        classes.sort();
        classes.dedup();
        let labels: Vec<usize> = keep
            .iter()
            .map(|&c| classes.binary_search(lab[c].as_ref().unwrap()).unwrap())
            .collect();
        for dim in [16usize, 64, 1024] {
            let mut rng = Rng::new(7);
            let proj: Vec<f32> = (0..ng * dim).map(|_| rng.normal() as f32).collect();
            for kind in ["binary", "log1p", "scaled"] {
                let mut emb = vec![0.0f32; keep.len() * dim];
                for (r, &c) in keep.iter().enumerate() {
                    let ys = log_norm(&praw[c]);
                    for (&g, &y) in praw[c].genes.iter().zip(&ys) {
                        let w = match kind {
                            "binary" => 1.0,
                            "log1p" => y,
                            _ => y / scaler.scale[g as usize],
                        };
                        for j in 0..dim {
                            emb[r * dim + j] += w * proj[g as usize * dim + j];
                        }
                    }
                }
                let (m, sd) = col_stats(&emb, dim);
                let (acc, f1) = knn_eval(
                    &transform(&emb, dim, &m, Some(&sd)),
                    dim,
                    &labels,
                    classes.len(),
                    k,
                    threads,
                );
                println!("ceiling: random projection to {dim} dims of {kind} expression (standardised): kNN acc {acc:.3} F1 {f1:.3}");
            }
        }
        return;
    }
    let opts = TrainOpts {
        lr,
        weight_decay: wd,
        warmup_steps: warmup,
        threads,
        ..TrainOpts::default()
    };
    let mut tr = Trainer::new(cfg.clone(), params, scaler.zero_fill(), opts).unwrap();
    let head_hidden: usize = a.get("--head", 0);
    if head_hidden > 0 {
        let out: usize = a.get("--head-out", 128);
        tr.set_projection_head(Some(
            exceiver_core::train::ProjectionHead::new(cfg.embedding_len(), head_hidden, out, seed)
                .unwrap(),
        ))
        .unwrap();
    }

    let to_train = |c: usize, rng: &mut Rng| -> Option<TrainCell> {
        if kraw[c].genes.len() < n_mask {
            return None;
        }
        let mask = mask_positions(kraw[c].genes.len(), n_mask, rng).ok()?;
        Some(TrainCell {
            genes: kraw[c].genes.clone(),
            values: values[c].clone(),
            mask,
            label: None,
        })
    };

    // contrastive views: each expressed gene kept with probability `keep`, then
    // n_mask of the kept ones masked
    let contrast: f64 = a.get("--contrast", 0.0);
    let tau: f64 = a.get("--tau", 0.2);
    let keep: f64 = a.get("--keep", 0.7);
    let view = |c: usize, rng: &mut Rng| -> Option<TrainCell> {
        let (mut g, mut v) = (Vec::new(), Vec::new());
        for (&gi, &vi) in kraw[c].genes.iter().zip(&values[c]) {
            if rng.uniform() < keep {
                g.push(gi);
                v.push(vi);
            }
        }
        if g.len() <= n_mask {
            return None;
        }
        let mask = mask_positions(g.len(), n_mask, rng).ok()?;
        Some(TrainCell {
            genes: g,
            values: v,
            mask,
            label: None,
        })
    };

    // fixed validation batches
    let mut vrng = Rng::new(seed ^ 0x5eed_5eed);
    let val_batches: Vec<Vec<TrainCell>> = val_idx
        .chunks(batch.max(64))
        .map(|ch| ch.iter().filter_map(|&c| to_train(c, &mut vrng)).collect())
        .collect();
    let (mut base_se, mut gm_se, mut nmask_tot) = (0.0f64, 0.0f64, 0usize);
    for b in &val_batches {
        for tc in b {
            for &p in &tc.mask {
                let d = (baseline[tc.genes[p] as usize] - tc.values[p]) as f64;
                base_se += d * d;
                let d2 = tmean - tc.values[p] as f64;
                gm_se += d2 * d2;
                nmask_tot += 1;
            }
        }
    }
    let base_mse = base_se / nmask_tot as f64;
    let gm_mse = gm_se / nmask_tot as f64;
    let validate = |tr: &mut Trainer| -> f64 {
        let (mut se, mut m) = (0.0, 0usize);
        for b in &val_batches {
            let s = tr.eval_stats(b).unwrap();
            se += s.mse * s.masked as f64;
            m += s.masked;
        }
        se / m as f64
    };
    println!(
        "baseline: per-gene mean {base_mse:.4}, global mean {gm_mse:.4}; initial val MSE {:.4}",
        validate(&mut tr)
    );

    // per-epoch probe: kNN on pbmc3k with the training attention mode
    let probe = {
        let lab = text_col(&pbmc, "seurat_annotations");
        let praw = raw_cells(&pbmc, &vocab);
        let keep: Vec<usize> = (0..pbmc.n_cells())
            .filter(|&c| lab[c].is_some() && !praw[c].genes.is_empty())
            .collect();
        let mut classes: Vec<String> = keep.iter().map(|&c| lab[c].clone().unwrap()).collect();
        classes.sort();
        classes.dedup();
        let labels: Vec<usize> = keep
            .iter()
            .map(|&c| classes.binary_search(lab[c].as_ref().unwrap()).unwrap())
            .collect();
        let cells: Vec<(Vec<u32>, Vec<f32>)> = keep
            .iter()
            .map(|&c| (praw[c].genes.clone(), model_values(&praw[c], &scaler)))
            .collect();
        let mut nz: Vec<usize> = cells.iter().map(|c| c.0.len()).collect();
        nz.sort();
        eprintln!(
            "pbmc3k probe: {} cells, median {} vocabulary genes expressed",
            nz.len(),
            nz[nz.len() / 2]
        );
        (labels, classes.len(), cells)
    };
    let knn_now = |p: &Params| -> (f64, f64) {
        let model = Exceiver::new(cfg.clone(), p.clone(), scaler.zero_fill()).unwrap();
        let cells: Vec<(&[u32], &[f32])> = probe
            .2
            .iter()
            .map(|(g, v)| (g.as_slice(), v.as_slice()))
            .collect();
        let emb = model.embed_batch(&cells, threads).unwrap();
        knn_eval(&emb, cfg.embedding_len(), &probe.0, probe.1, k, threads)
    };
    let tt = Instant::now();
    let mut train_secs = 0.0;
    for ep in 0..epochs {
        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(ep as u64 + 1));
        let mut order = train_idx.clone();
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        let (mut ls, mut ln) = (0.0, 0usize);
        let te = Instant::now();
        let mut cl = 0.0;
        for ch in order.chunks(batch) {
            if contrast > 0.0 {
                let b: Vec<TrainCell> = ch
                    .iter()
                    .filter_map(|&c| {
                        let v1 = view(c, &mut rng)?;
                        let v2 = view(c, &mut rng)?;
                        Some([v1, v2])
                    })
                    .flatten()
                    .collect();
                if b.len() < 4 {
                    continue;
                }
                let (s, c) = tr.train_step_contrastive(&b, tau, contrast).unwrap();
                ls += s.mse * b.len() as f64;
                cl += c * b.len() as f64;
                ln += b.len();
                continue;
            }
            let b: Vec<TrainCell> = ch.iter().filter_map(|&c| to_train(c, &mut rng)).collect();
            if b.is_empty() {
                continue;
            }
            let s = tr.train_step(&b).unwrap();
            ls += s.loss * b.len() as f64;
            ln += b.len();
        }
        if contrast > 0.0 {
            let (ka, kf) = knn_now(tr.params());
            println!(
                "  contrastive loss {:.4}, pbmc3k kNN {ka:.3} / F1 {kf:.3}",
                cl / ln.max(1) as f64
            );
        }
        train_secs += te.elapsed().as_secs_f64();
        let v = validate(&mut tr);
        println!(
            "epoch {}: step {}, train loss {:.4}, val MSE {v:.4} (baseline {base_mse:.4}), train {:.0}s, total {:.0}s",
            ep + 1,
            tr.steps_done(),
            ls / ln.max(1) as f64,
            train_secs,
            tt.elapsed().as_secs_f64()
        );
    }

    // diagnostics: do predictions vary with the gene? correlation with baseline
    {
        let model = Exceiver::new(cfg.clone(), tr.params().clone(), scaler.zero_fill()).unwrap();
        let (mut sp, mut sb, mut spp, mut sbb, mut spb, mut n) = (0.0f64, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mut cell_sd = 0.0;
        let mut ncell = 0.0;
        for b in val_batches.iter().take(2) {
            for tc in b {
                // masked input as in training: mask token (row G) with value 1.0
                let gq = cfg.seq_len as u32;
                let toks: Vec<u32> = (0..tc.genes.len())
                    .map(|p| {
                        if tc.mask.contains(&p) {
                            gq
                        } else {
                            tc.genes[p]
                        }
                    })
                    .collect();
                let v: Vec<f32> = (0..tc.genes.len())
                    .map(|p| {
                        if tc.mask.contains(&p) {
                            1.0
                        } else {
                            tc.values[p]
                        }
                    })
                    .collect();
                let q: Vec<u32> = tc.mask.iter().map(|&p| tc.genes[p]).collect();
                let pred = model
                    .forward_tokens(&tc.genes, Some(&toks), &v, &q, false)
                    .unwrap()
                    .pred;
                let mean = pred.iter().map(|&x| x as f64).sum::<f64>() / pred.len() as f64;
                cell_sd += (pred.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>()
                    / pred.len() as f64)
                    .sqrt();
                ncell += 1.0;
                for (&p, &gq) in pred.iter().zip(&q) {
                    let bb = baseline[gq as usize] as f64;
                    let p = p as f64;
                    sp += p;
                    sb += bb;
                    spp += p * p;
                    sbb += bb * bb;
                    spb += p * bb;
                    n += 1.0;
                }
            }
        }
        let cov = spb / n - sp / n * sb / n;
        let corr =
            cov / ((spp / n - (sp / n).powi(2)).sqrt() * (sbb / n - (sb / n).powi(2)).sqrt());
        println!(
            "diag: masked val cells: mean pred {:.3}, sd over genes within a cell {:.3}, corr(pred, per-gene mean) {corr:.3} (baseline sd {:.3})",
            sp / n, cell_sd / ncell, (sbb / n - (sb / n).powi(2)).sqrt()
        );
    }

    // embed pbmc3k
    let lab = text_col(&pbmc, "seurat_annotations");
    let praw = raw_cells(&pbmc, &vocab);
    let keep: Vec<usize> = (0..pbmc.n_cells())
        .filter(|&c| lab[c].is_some() && !praw[c].genes.is_empty())
        .collect();
    let mut classes: Vec<String> = keep.iter().map(|&c| lab[c].clone().unwrap()).collect();
    classes.sort();
    classes.dedup();
    let labels: Vec<usize> = keep
        .iter()
        .map(|&c| classes.binary_search(lab[c].as_ref().unwrap()).unwrap())
        .collect();
    let pvals: Vec<Vec<f32>> = keep
        .iter()
        .map(|&c| model_values(&praw[c], &scaler))
        .collect();
    let cells: Vec<(&[u32], &[f32])> = keep
        .iter()
        .zip(&pvals)
        .map(|(&c, v)| (praw[c].genes.as_slice(), v.as_slice()))
        .collect();
    // kang training cells (a subsample) for per-model embedding statistics
    let kang_sub: Vec<usize> = train_idx
        .iter()
        .copied()
        .step_by((train_idx.len() / 2000).max(1))
        .collect();
    let kcells: Vec<(&[u32], &[f32])> = kang_sub
        .iter()
        .map(|&c| (kraw[c].genes.as_slice(), values[c].as_slice()))
        .collect();
    let dim = cfg.embedding_len();
    for emode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
        let mut c2 = cfg.clone();
        c2.attention = emode;
        let model = Exceiver::new(c2, tr.params().clone(), scaler.zero_fill()).unwrap();
        let te = Instant::now();
        let emb = model.embed_batch(&cells, threads).unwrap();
        let et = te.elapsed().as_secs_f64();
        let kemb = model.embed_batch(&kcells, threads).unwrap();
        let (pm, ps) = col_stats(&emb, dim);
        let (km, ks) = col_stats(&kemb, dim);
        let norm = emb
            .chunks(dim)
            .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
            .sum::<f32>()
            / keep.len() as f32;
        let dev = ps.iter().map(|s| s * s).sum::<f32>().sqrt();
        let (a0, f0) = knn_eval(&emb, dim, &labels, classes.len(), k, threads);
        let (a1, f1) = knn_eval(
            &transform(&emb, dim, &km, None),
            dim,
            &labels,
            classes.len(),
            k,
            threads,
        );
        let (a2, f2) = knn_eval(
            &transform(&emb, dim, &km, Some(&ks)),
            dim,
            &labels,
            classes.len(),
            k,
            threads,
        );
        let (a3, f3) = knn_eval(
            &transform(&emb, dim, &pm, Some(&ps)),
            dim,
            &labels,
            classes.len(),
            k,
            threads,
        );
        println!(
            "pbmc3k {:?} ({} cells, {} classes, embed {et:.1}s, mean norm {norm:.2}, total sd {dev:.3}): kNN-{k} acc/F1 raw {a0:.3}/{f0:.3} | centred(kang) {a1:.3}/{f1:.3} | std(kang) {a2:.3}/{f2:.3} | std(pbmc) {a3:.3}/{f3:.3}",
            emode, keep.len(), classes.len()
        );
        if emode == cfg.attention {
            // Readout 2: the decoder's predicted values for the most variable genes
            // (by the scaler's log1p sd over the training cells), standardised.
            let nh: usize = a.get("--profile-genes", 1000);
            let mut order: Vec<usize> = (0..ng).collect();
            order.sort_by(|&x, &y| scaler.scale[y].total_cmp(&scaler.scale[x]));
            let rows: Vec<u32> = order.iter().take(nh).map(|&g| g as u32).collect();
            let tp = Instant::now();
            let prof: Vec<f32> = cells
                .iter()
                .flat_map(|(g, v)| model.predict(g, v, &rows).unwrap())
                .collect();
            let pd = rows.len();
            let (qm, qs) = col_stats(&prof, pd);
            let (b0, g0) = knn_eval(&prof, pd, &labels, classes.len(), k, threads);
            let (b1, g1) = knn_eval(
                &transform(&prof, pd, &qm, Some(&qs)),
                pd,
                &labels,
                classes.len(),
                k,
                threads,
            );
            println!(
                "pbmc3k decoded profile of {pd} variable genes ({:.1}s): kNN-{k} acc/F1 raw {b0:.3}/{g0:.3} | std(pbmc) {b1:.3}/{g1:.3}",
                tp.elapsed().as_secs_f64()
            );
        }
    }

    if stim_epochs > 0 {
        stim(
            &a,
            &kang,
            &kraw,
            &values,
            &train_idx,
            &val_idx,
            &cfg,
            tr.params(),
            &scaler,
            n_mask,
            stim_epochs,
            threads,
            seed,
        );
    }
    println!("total {:.0}s", t0.elapsed().as_secs_f64());
}

#[allow(clippy::too_many_arguments)]
fn stim(
    a: &Args,
    kang: &CellMatrix,
    kraw: &[Raw],
    values: &[Vec<f32>],
    train_idx: &[usize],
    val_idx: &[usize],
    base_cfg: &Config,
    base: &Params,
    scaler: &Scaler,
    n_mask: usize,
    epochs: usize,
    threads: usize,
    seed: u64,
) {
    let lab = text_col(kang, "stim");
    let mut classes: Vec<String> = lab.iter().flatten().cloned().collect();
    classes.sort();
    classes.dedup();
    let mut cfg = base_cfg.clone();
    cfg.num_classes = Some(classes.len());
    if a.has("--stim-expressed") {
        cfg.attention = AttentionMode::ExpressedOnly;
    }
    let mut params = Params::init(&cfg, seed).unwrap();
    let keep = (cfg.seq_len + 1) * cfg.seq_dim;
    params.gene_emb[..keep].copy_from_slice(&base.gene_emb[..keep]);
    params.query_emb = base.query_emb.clone();
    params.encoder = base.encoder.clone();
    params.layers = base.layers.clone();
    params.decoder = base.decoder.clone();
    params.value_head = base.value_head.clone();
    params.value_emb = base.value_emb.clone();
    let hb: f32 = a.get("--head-bias", 0.0);
    if hb != 0.0 {
        if let Some(h) = params.class_head.as_mut() {
            h.linear1.bias.iter_mut().for_each(|b| *b = hb);
        }
    }
    let lr: f64 = a.get("--stim-lr", a.get("--lr", 1e-3));
    let opts = TrainOpts {
        lr,
        weight_decay: 1e-5,
        warmup_steps: a.get("--warmup", 50),
        threads,
        ..TrainOpts::default()
    };
    let mut tr = Trainer::new(cfg.clone(), params, scaler.zero_fill(), opts).unwrap();
    let label_of = |c: usize| lab[c].as_ref().and_then(|l| classes.binary_search(l).ok());
    let to_train = |c: usize, rng: &mut Rng| -> Option<TrainCell> {
        if kraw[c].genes.len() < n_mask {
            return None;
        }
        let mask = mask_positions(kraw[c].genes.len(), n_mask, rng).ok()?;
        Some(TrainCell {
            genes: kraw[c].genes.clone(),
            values: values[c].clone(),
            mask,
            label: Some(label_of(c)?),
        })
    };
    let batch: usize = a.get("--batch", 64);
    for ep in 0..epochs {
        let mut rng = Rng::new(seed.wrapping_mul(7).wrapping_add(ep as u64 + 101));
        let mut order = train_idx.to_vec();
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        let te = Instant::now();
        let (mut ls, mut ln) = (0.0, 0usize);
        for ch in order.chunks(batch) {
            let b: Vec<TrainCell> = ch.iter().filter_map(|&c| to_train(c, &mut rng)).collect();
            if b.is_empty() {
                continue;
            }
            let s = tr.train_step(&b).unwrap();
            ls += s.ce * b.len() as f64;
            ln += b.len();
        }
        let model = Exceiver::new(cfg.clone(), tr.params().clone(), scaler.zero_fill()).unwrap();
        let (mut ok, mut n) = (0, 0);
        for &c in val_idx {
            let Some(y) = label_of(c) else { continue };
            let l = model.classify_logits(&kraw[c].genes, &values[c]).unwrap();
            let p = l
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0;
            ok += (p == y) as usize;
            n += 1;
        }
        for &c in val_idx.iter().take(6) {
            let l = model.classify_logits(&kraw[c].genes, &values[c]).unwrap();
            let o = model.forward(&kraw[c].genes, &values[c], &[]).unwrap();
            println!(
                "  cell {c} label {:?} logits {:?} emb[0..4] {:?}",
                label_of(c),
                l,
                &o.embedding[..4]
            );
        }
        println!(
            "stim epoch {}: train CE {:.4}, held-out acc {:.4} ({n} cells), {:.0}s",
            ep + 1,
            ls / ln.max(1) as f64,
            ok as f64 / n as f64,
            te.elapsed().as_secs_f64()
        );
    }
}
