//! Model-quality experiment, through the training session users run from SQL
//! (`exceiver_core::session` over the vendored files in memory): train on Kang (IFN-β
//! PBMCs) with `exceiver.train`'s options, embed PBMC 3k, a dataset the model never saw,
//! and score leave-one-out kNN label accuracy / macro-F1 (cosine) on
//! `seurat_annotations`; optionally finetune classifiers (Kang `stim`, PBMC 3k cell types)
//! and report their accuracy on held-out cells.
//!
//! ```text
//! cargo run --release -p exceiver-core --example quality -- [flags]
//!   --options JSON       exceiver.train's options (default {"preset": "small"})
//!   --stim JSON          also finetune Kang `stim` classifiers with these exceiver.finetune
//!                        options (an object or an array of them), on the labelled cells
//!                        outside a held-out fifth, scored on that fifth beside logistic
//!                        regression on PCA-50 and on the pretrained embedding
//!   --finetune JSON      the same for PBMC 3k's `seurat_annotations` (a dataset the
//!                        pretraining never saw, as `make demo`'s `pbmc_train`/`pbmc_test`)
//!   --with-pbmc          train on Kang and PBMC 3k together (without labels), as a user
//!                        trains on all their cells, the ones they will query included
//!   --pbmc-only          train on PBMC 3k alone (without labels), as PCA is fit on it:
//!                        what the recipe reaches in-domain
//!   --kang-labels        also score Kang's `cell_type` (PCA of Kang beside the model's
//!                        embedding): a second labelled dataset, not the one tuned on
//!   --probe-c 1.0        inverse L2 penalty of the logistic regressions printed beside
//!                        fine-tuned classifiers (`exceiver.linear_probe`'s `C`)
//!   --threads 2 --k 15
//! ```
//!
//! After training it also scores other readouts of the same model (the latent after the
//! encoder, after each process layer, the mean of the final latents), and PCA of PBMC 3k
//! over the model's own vocabulary (the baseline on the genes the model sees). Beside
//! each fine-tuned classifier it prints logistic regression on PCA-50, on the scaled
//! 2,000 variable genes PCA is computed from, and on the pretrained embedding.
//!
//! PBMC 3k is scored with the core's metrics (`exceiver_core::metrics`: kNN accuracy,
//! macro-F1, NMI, ARI, ASW, AvgBIO), beside the standard baseline computed the same way
//! (`exceiver_core::pca`: 2,000 variable genes, PCA to 50, as `exceiver.pca_embed`).
//!
//! The split is the session's in-memory one (a hash of the barcode and the seed, not
//! PostgreSQL's `hashtext`), so the exact cells differ from a run on a table.
//! Figures in the README measured before this program ran the session (flags such as
//! `--hvg`, `--bias-init`, `--no-std`, `--diag-data`) were taken with its version at
//! commit 7b90f15, which carried its own copy of the recipe.

use exceiver_core::data::{h5ad, tenx, CellMatrix, ObsColumn, ObsValues};
use exceiver_core::device::Device;
use exceiver_core::metrics::{self, EvalOptions, Evaluation};
use exceiver_core::model::cell::{RawCell, Vocab};
use exceiver_core::model::{AttentionMode, Exceiver};
use exceiver_core::pca::{self, Collect, GeneScan, PcaOptions};
use exceiver_core::probe::{self, ProbeOptions};
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
    let probe = ProbeOptions {
        c: a.get("--probe-c", 1.0),
        ..ProbeOptions::default()
    };
    probe
        .check()
        .unwrap_or_else(|e| panic!("--probe-c: {}", e.message));
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

    let lab = session::text_column(&pbmc, "seurat_annotations").unwrap();
    let (keep, labels, classes) = labelled(&lab);
    let pick = pca_of_labelled(&pbmc, &keep, threads);
    report(
        "PCA of 2,000 variable genes",
        &score(&pick, 50, &labels, classes, k, threads),
    );
    let both;
    let train_on = if a.0.iter().any(|x| x == "--pbmc-only") {
        eprintln!("training on PBMC 3k alone (the cells that are scored, as PCA is fit on them)");
        &pbmc
    } else if a.0.iter().any(|x| x == "--with-pbmc") {
        both = concat(&kang, &pbmc);
        eprintln!(
            "training on Kang and PBMC 3k together: {} cells, {} genes",
            both.n_cells(),
            both.n_genes()
        );
        &both
    } else {
        &kang
    };
    let mut src = InMemory::new(train_on, "kang", &Split::from_options(&opts), None).unwrap();
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
    let pv = pca_over(&pbmc, Some(&t.genes), threads);
    let pv: Vec<f32> = keep
        .iter()
        .flat_map(|&c| pv[c * 50..(c + 1) * 50].iter().copied())
        .collect();
    report(
        "PCA over the model's vocabulary",
        &score(&pv, 50, &labels, classes, k, threads),
    );
    knn_report(&t, &pbmc, (&keep, &labels, classes), k, threads);
    if a.0.iter().any(|x| x == "--kang-labels") {
        kang_report(&t, &kang, k, threads);
    }

    if let Some(v) = a.json("--stim") {
        finetune_report(&t, &kang, "stim", &option_sets(v), &probe, threads);
    }
    if let Some(v) = a.json("--finetune") {
        finetune_report(
            &t,
            &pbmc,
            "seurat_annotations",
            &option_sets(v),
            &probe,
            threads,
        );
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

/// The labelled cells of a label column: their indices, label numbers and class count.
fn labelled(lab: &[Option<String>]) -> (Vec<usize>, Vec<u32>, usize) {
    let keep: Vec<usize> = (0..lab.len()).filter(|&c| lab[c].is_some()).collect();
    let mut classes: Vec<String> = keep.iter().filter_map(|&c| lab[c].clone()).collect();
    classes.sort();
    classes.dedup();
    let labels = keep
        .iter()
        .map(|&c| classes.binary_search(lab[c].as_ref().unwrap()).unwrap() as u32)
        .collect();
    (keep, labels, classes.len())
}

fn score(
    emb: &[f32],
    dim: usize,
    labels: &[u32],
    classes: usize,
    k: usize,
    threads: usize,
) -> Evaluation {
    let o = EvalOptions {
        k,
        seed: 0,
        threads,
    };
    metrics::evaluate(emb, dim, labels, classes, None, &o, &mut |_, _, _| Ok(())).unwrap()
}

fn report(what: &str, e: &Evaluation) {
    println!(
        "pbmc3k {what}: kNN accuracy / macro-F1 {:.3} / {:.3}, NMI {:.3}, ARI {:.3}, ASW {:.3}, AvgBIO {:.3} ({} cells)",
        e.accuracy, e.macro_f1, e.nmi, e.ari, e.asw, e.avg_bio(), e.cells
    );
}

/// The standard baseline's 50 components of the cells `keep` of `m` (`keep.len() × 50`).
fn pca_of_labelled(m: &CellMatrix, keep: &[usize], threads: usize) -> Vec<f32> {
    let base = pca_baseline(m, threads);
    keep.iter()
        .flat_map(|&c| base[c * 50..(c + 1) * 50].iter().copied())
        .collect()
}

/// The standard baseline of every cell of `m`: 50 principal components (`cells × 50`).
fn pca_baseline(m: &CellMatrix, threads: usize) -> Vec<f32> {
    pca_over(m, None, threads)
}

/// The same over the genes of `only` (all of them that vary): the other genes' counts
/// still count in each cell's library size.
fn pca_over(m: &CellMatrix, only: Option<&[String]>, threads: usize) -> Vec<f32> {
    let opts = PcaOptions {
        threads,
        ..Default::default()
    };
    let sel = select_genes(m, only, opts.n_top_genes);
    // every gene of the cell: those outside the selection count in its library size only
    let mut col = Collect::new(&sel, opts.max_value);
    for c in 0..m.n_cells() {
        let (g, x) = named(m, c);
        col.add_cell(&g, &x).unwrap();
    }
    pca::fit(&col, &opts, &mut |_, _| Ok(())).unwrap().scores
}

/// Cell `c` of `m` as the core's readers take it: gene names and counts.
fn named(m: &CellMatrix, c: usize) -> (Vec<Option<&str>>, Vec<Option<f32>>) {
    let (g, x) = m.cell(c);
    (
        g.iter()
            .map(|&i| Some(m.genes[i as usize].as_str()))
            .collect(),
        x.iter().map(|&v| Some(v)).collect(),
    )
}

/// The baseline's gene selection and scaling: the `n_top` most variable genes, or every
/// gene of `only` that varies (the scan then sees the other genes' counts summed into
/// one pseudo-gene, `__rest`, so that library sizes stay whole; the second pass never
/// gives it a value, so it is constant there and adds nothing to the components).
fn select_genes(m: &CellMatrix, only: Option<&[String]>, n_top: usize) -> pca::Selection {
    let set: Option<std::collections::HashSet<&str>> =
        only.map(|o| o.iter().map(|s| s.as_str()).collect());
    let mut scan = GeneScan::new();
    for c in 0..m.n_cells() {
        let (mut g, mut x) = named(m, c);
        if let Some(set) = &set {
            let rest: f32 = g
                .iter()
                .zip(&x)
                .filter(|(n, _)| !set.contains(n.unwrap_or_default()))
                .map(|(_, v)| v.unwrap_or(0.0))
                .sum();
            let (kg, kx): (Vec<_>, Vec<_>) = g
                .into_iter()
                .zip(x)
                .filter(|(n, _)| set.contains(n.unwrap_or_default()))
                .unzip();
            (g, x) = (kg, kx);
            if rest > 0.0 {
                g.push(Some("__rest"));
                x.push(Some(rest));
            }
        }
        scan.add_cell(&g, &x).unwrap();
    }
    scan.select(if only.is_some() {
        usize::MAX / 4
    } else {
        n_top
    })
    .unwrap()
}

/// Two datasets as one, over the union of their genes (no label columns; the second's
/// barcodes prefixed so that they stay unique).
fn concat(a: &CellMatrix, b: &CellMatrix) -> CellMatrix {
    let mut genes: Vec<String> = a.genes.iter().chain(&b.genes).cloned().collect();
    genes.sort();
    genes.dedup();
    let index = |g: &String| genes.binary_search(g).unwrap() as u32;
    let (ma, mb): (Vec<u32>, Vec<u32>) = (
        a.genes.iter().map(index).collect(),
        b.genes.iter().map(index).collect(),
    );
    let mut out = CellMatrix {
        barcodes: a
            .barcodes
            .iter()
            .cloned()
            .chain(b.barcodes.iter().map(|x| format!("pbmc3k:{x}")))
            .collect(),
        genes: Vec::new(),
        gene_ids: Vec::new(),
        indptr: vec![0],
        indices: Vec::new(),
        data: Vec::new(),
        obs: Vec::new(),
        renamed_genes: 0,
    };
    for (m, map) in [(a, &ma), (b, &mb)] {
        for c in 0..m.n_cells() {
            let (g, x) = m.cell(c);
            let mut e: Vec<(u32, f32)> = g
                .iter()
                .map(|&i| map[i as usize])
                .zip(x.iter().copied())
                .collect();
            e.sort_by_key(|p| p.0);
            out.indices.extend(e.iter().map(|p| p.0));
            out.data.extend(e.iter().map(|p| p.1));
            out.indptr.push(out.indices.len());
        }
    }
    out.genes = genes;
    out
}

/// Scores of the PBMC 3k embeddings, in both attention modes.
fn knn_report(
    t: &Trained,
    pbmc: &CellMatrix,
    lab: (&[usize], &[u32], usize),
    k: usize,
    threads: usize,
) {
    let (keep, labels, classes) = lab;
    let cells = model_cells(t, pbmc);
    // cells with nothing on the model's genes get a zero embedding input: none in PBMC 3k
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
        let what = format!(
            "{mode:?}{} (embedded in {et:.1} s)",
            if mode == t.cfg.attention {
                ", the model's mode"
            } else {
                ""
            }
        );
        report(&what, &score(&emb, dim, labels, classes, k, threads));
    }
    // other readouts of the same model (its own mode): the latent after the encoder and
    // after each process layer, and the final latents' mean
    let model = Exceiver::new(t.cfg.clone(), t.params.clone(), t.scaler.zero_fill()).unwrap();
    let d = t.cfg.seq_dim;
    let layers = t.cfg.num_layers;
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); layers + 2];
    for (g, v) in &input {
        let latent = model.encode(g, v).unwrap();
        let processed = model.process(&latent).unwrap();
        outs[0].extend_from_slice(&latent);
        for (l, p) in processed.iter().enumerate() {
            outs[l + 1].extend_from_slice(p);
        }
        let last = processed.last().unwrap_or(&latent);
        outs[layers + 1]
            .extend((0..d).map(|c| {
                last.chunks_exact(d).map(|r| r[c]).sum::<f32>() / (last.len() / d) as f32
            }));
    }
    for (i, e) in outs.iter().enumerate() {
        let (what, w) = match i {
            0 => ("readout: encoder latent".to_string(), dim),
            i if i <= layers => (format!("readout: after process layer {i}"), dim),
            _ => ("readout: mean of the final latents".to_string(), d),
        };
        report(&what, &score(e, w, labels, classes, k, threads));
    }
}

/// Kang's `cell_type`: PCA of Kang and the model's embedding, scored the same way.
fn kang_report(t: &Trained, kang: &CellMatrix, k: usize, threads: usize) {
    let lab = session::text_column(kang, "cell_type").unwrap();
    let (keep, labels, classes) = labelled(&lab);
    let pick = pca_of_labelled(kang, &keep, threads);
    let e = score(&pick, 50, &labels, classes, k, threads);
    println!(
        "kang cell_type PCA of 2,000 variable genes: kNN {:.3} / {:.3}, AvgBIO {:.3}",
        e.accuracy,
        e.macro_f1,
        e.avg_bio()
    );
    let cells = model_cells(t, kang);
    let input: Vec<(&[u32], &[f32])> = keep
        .iter()
        .map(|&c| (cells[c].0.as_slice(), cells[c].1.as_slice()))
        .collect();
    let model = Exceiver::new(t.cfg.clone(), t.params.clone(), t.scaler.zero_fill()).unwrap();
    let emb = model.embed_batch(&input, threads).unwrap();
    let e = score(&emb, t.cfg.embedding_len(), &labels, classes, k, threads);
    println!(
        "kang cell_type model embedding: kNN {:.3} / {:.3}, AvgBIO {:.3}",
        e.accuracy,
        e.macro_f1,
        e.avg_bio()
    );
}

/// `--stim` / `--finetune`: one options object or an array of them.
fn option_sets(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        v => vec![v],
    }
}

/// The held-out fifth of a dataset's cells (a hash of the barcode, as the demo's
/// `pbmc_test` and `kang_test` are a hash of `cell_id`; not PostgreSQL's hash).
fn held_out(barcode: &str) -> bool {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&format!("{barcode}:test"), &mut h);
    std::hash::Hasher::finish(&h).is_multiple_of(5)
}

/// Logistic regression (`exceiver.linear_probe`'s defaults) on `x` (every cell of the
/// dataset, `dim` columns), fit on the training cells and scored on the test cells.
fn probe_line(what: &str, x: &[f32], dim: usize, split: &Labelled, probe: &ProbeOptions) {
    let rows = |cells: &[usize]| -> Vec<f32> {
        cells
            .iter()
            .flat_map(|&c| x[c * dim..(c + 1) * dim].iter().copied())
            .collect()
    };
    let p = probe::fit(
        &rows(&split.train),
        dim,
        &split.y(&split.train),
        split.names.len(),
        probe,
    )
    .unwrap();
    let proba: Vec<f64> = split
        .test
        .iter()
        .flat_map(|&c| p.proba(&x[c * dim..(c + 1) * dim]))
        .collect();
    let s = probe::score_proba(&proba, split.names.len(), &split.y(&split.test));
    println!(
        "{}: {what}: held-out accuracy / macro-F1 {:.3} / {:.3} (ECE {:.3}) on {} cells",
        split.column,
        s.accuracy,
        s.macro_f1,
        s.ece,
        split.test.len()
    );
}

/// A label column split into training and held-out cells.
struct Labelled {
    column: String,
    names: Vec<String>,
    /// label number of every cell (None: unlabelled)
    label: Vec<Option<u32>>,
    train: Vec<usize>,
    test: Vec<usize>,
}

impl Labelled {
    fn new(m: &CellMatrix, column: &str) -> Labelled {
        let lab = session::text_column(m, column).unwrap();
        let mut names: Vec<String> = lab.iter().flatten().cloned().collect();
        names.sort();
        names.dedup();
        let label: Vec<Option<u32>> = lab
            .iter()
            .map(|l| l.as_ref().map(|l| names.binary_search(l).unwrap() as u32))
            .collect();
        let (test, train) = (0..m.n_cells())
            .filter(|&c| label[c].is_some())
            .partition(|&c| held_out(&m.barcodes[c]));
        Labelled {
            column: column.to_string(),
            names,
            label,
            train,
            test,
        }
    }

    fn y(&self, cells: &[usize]) -> Vec<u32> {
        cells.iter().filter_map(|&c| self.label[c]).collect()
    }
}

/// Fine-tune classifiers of `column` from the trained model on the labelled cells
/// outside the held-out fifth (each options set of `runs` in turn; the session's own
/// validation split among them drives early stopping), and score them on the held-out
/// fifth beside logistic regression on PCA-50 and on the model's embedding.
fn finetune_report(
    base: &Trained,
    m: &CellMatrix,
    column: &str,
    runs: &[Value],
    probe: &ProbeOptions,
    threads: usize,
) {
    let split = Labelled::new(m, column);
    probe_line(
        "logistic on PCA-50",
        &pca_baseline(m, threads),
        50,
        &split,
        probe,
    );
    let (x, g) = scaled_hvg(m);
    probe_line(
        "logistic on the scaled 2,000 variable genes",
        &x,
        g,
        &split,
        probe,
    );
    let cells = model_cells(base, m);
    let input: Vec<(&[u32], &[f32])> = cells
        .iter()
        .map(|c| (c.0.as_slice(), c.1.as_slice()))
        .collect();
    let model = Exceiver::new(
        base.cfg.clone(),
        base.params.clone(),
        base.scaler.zero_fill(),
    )
    .unwrap();
    let emb = model.embed_batch(&input, threads).unwrap();
    let dim = base.cfg.embedding_len();
    probe_line(
        "logistic on the pretrained embedding",
        &emb,
        dim,
        &split,
        probe,
    );
    // the training cells' labels only: the held-out fifth is unlabelled to the session
    let mut train_only = m.clone();
    let train_labels: Vec<Option<String>> = (0..m.n_cells())
        .map(|c| match split.label[c] {
            Some(l) if !held_out(&m.barcodes[c]) => Some(split.names[l as usize].clone()),
            _ => None,
        })
        .collect();
    train_only.obs.push(ObsColumn {
        name: "__train_label".into(),
        values: ObsValues::Text(train_labels),
    });
    let start = Start {
        cfg: base.cfg.clone(),
        params: base.params.clone(),
        genes: base.genes.clone(),
        scaler: base.scaler.clone(),
    };
    for opts in runs {
        let o = Options::for_finetune(opts).unwrap_or_else(|e| panic!("{opts}: {}", e.message));
        let first = session::classifier_start(
            &start,
            split.names.len(),
            o.attention,
            o.seed,
            o.init_random,
            o.class_embedding(),
        )
        .unwrap();
        let mut src = InMemory::new(
            &train_only,
            column,
            &Split::from_options(&o),
            Some("__train_label"),
        )
        .unwrap();
        let task = Task {
            model: "classifier",
            opts: &o,
            start: Some(first),
            labels: Some(split.names.clone()),
            threads,
            device: Device::Cpu,
        };
        let c = session::train(&mut src, task, &mut Stderr).unwrap();
        let model = Exceiver::new(c.cfg.clone(), c.params.clone(), c.scaler.zero_fill()).unwrap();
        let mut proba = Vec::with_capacity(split.test.len() * split.names.len());
        for &cell in &split.test {
            let mut l: Vec<f64> = model
                .classify_logits(&cells[cell].0, &cells[cell].1)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            probe::softmax(&mut l);
            proba.extend(l);
        }
        let s = probe::score_proba(&proba, split.names.len(), &split.y(&split.test));
        println!(
            "{column}: finetune {opts}: {} epochs, held-out accuracy / macro-F1 {:.3} / {:.3} (ECE {:.3}) on {} cells",
            c.epochs,
            s.accuracy,
            s.macro_f1,
            s.ece,
            split.test.len()
        );
    }
}

/// The input of the standard baseline's PCA, densely: every cell's 2,000 variable genes,
/// log-normalised (the core's `RawCell::log_norm`), scaled and clipped at ±10 as
/// `pca_embed` does (`cells × g`), for logistic regression on the genes themselves.
fn scaled_hvg(m: &CellMatrix) -> (Vec<f32>, usize) {
    let sel = select_genes(m, None, PcaOptions::default().n_top_genes);
    let idx: std::collections::HashMap<&str, u32> = sel
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let g = sel.names.len();
    let scaled = |j: usize, y: f64| ((y - sel.mean[j]) / sel.std[j]).clamp(-10.0, 10.0) as f32;
    let mut out = Vec::with_capacity(m.n_cells() * g);
    for c in 0..m.n_cells() {
        let (names, counts) = named(m, c);
        let (cell, _) = RawCell::read(
            |n| idx.get(n).copied(),
            names.into_iter(),
            counts.into_iter(),
        )
        .unwrap();
        let mut row: Vec<f32> = (0..g).map(|j| scaled(j, 0.0)).collect();
        for (&j, y) in cell.genes.iter().zip(cell.log_norm()) {
            row[j as usize] = scaled(j as usize, y as f64);
        }
        out.extend(row);
    }
    (out, g)
}
