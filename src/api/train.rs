//! `exceiver.train`: masked value prediction on a cell table, in the backend.
//!
//! The table is streamed, never held whole: the gene vocabulary comes from an SQL
//! aggregate, the scaler from one pass over the training cells, and each epoch reads
//! the training cells through a cursor in a fresh shuffled order, batch by batch.
//! Cells are split into training and validation by a hash of `cell_id` and the seed.
//! Between steps the backend checks for interrupts, so `pg_cancel_backend` and
//! `statement_timeout` stop training; the model is written only at the end, in the
//! caller's transaction, so an interrupted or failed run leaves nothing behind.

use crate::api::bulk::{check_cell_table, column_type, relation_name};
use crate::api::model::{check_new_model_name, get_model};
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::accel::AnyTrainer;
use exceiver_core::model::rng::Rng;
use exceiver_core::model::weights::{self, Params};
use exceiver_core::model::{AttentionMode, Config};
use exceiver_core::preprocess::{log1p32, normalize_count, HvgFit, Scaler, ScalerFit};
use exceiver_core::train::{
    init_for_scratch_training, mask_positions, n_mask_for, ProjectionHead, StepStats, TrainCell,
    TrainOpts,
};
use exceiver_core::{Error, Kind};
use pgrx::prelude::*;
use pgrx::spi::{SpiCursor, SpiError};
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Instant;

/// Training options, named after the reference's hyperparameters.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub preset: String,
    pub seq_dim: Option<usize>,
    pub query_len: Option<usize>,
    pub query_dim: Option<usize>,
    pub num_layers: Option<usize>,
    pub nhead: Option<usize>,
    pub dim_feedforward: Option<usize>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// Whether the user set learning_rate / warmup_steps / epochs (else preset defaults).
    pub set: (bool, bool, bool),
    pub batch_size: usize,
    pub frac: f64,
    pub epochs: usize,
    pub val_fraction: f64,
    pub patience: usize,
    pub seed: u64,
    pub min_cells: i64,
    /// Keep only this many highly variable genes in a new model's vocabulary (0: all).
    /// None: 2000 for the small preset, 0 for the published shape.
    pub n_top_genes: Option<usize>,
    pub max_cells: Option<i64>,
    /// None: `reference` for a new model, the base model's mode otherwise.
    pub attention: Option<AttentionMode>,
    /// None: on for the small preset, off for the published shape.
    pub value_embedding: Option<bool>,
    /// Standardise each gene's log1p values over the training cells (the published
    /// preprocessing). None: the preset's default for a new model.
    pub standardize: Option<bool>,
    /// Weight of the contrastive term (0: masked value prediction only). None: the
    /// small preset's default for a new model, 0 otherwise.
    pub contrastive: Option<f64>,
    pub contrastive_temperature: f64,
    /// Fraction of a cell's expressed genes each contrastive view keeps.
    pub contrastive_keep: f64,
    /// Hidden width of the contrastive term's projection head (0: none).
    pub contrastive_head: usize,
    pub parent: Option<String>,
    pub progress_every: u64,
    /// Finetuning only: the fraction of labelled cells used (hash of cell_id).
    pub label_fraction: f64,
    /// Finetuning only: start from the base model's weights ("pretrained") or fresh ones ("random").
    pub init_random: bool,
}

const KEYS: [&str; 31] = [
    "preset",
    "seq_dim",
    "query_len",
    "query_dim",
    "num_layers",
    "nhead",
    "dim_feedforward",
    "dropout",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "batch_size",
    "frac",
    "epochs",
    "val_fraction",
    "patience",
    "seed",
    "min_cells",
    "n_top_genes",
    "max_cells",
    "attention",
    "value_embedding",
    "standardize",
    "contrastive",
    "contrastive_temperature",
    "contrastive_keep",
    "contrastive_head",
    "parent",
    "progress_every",
    "label_fraction",
    "init",
];

fn bad(msg: String) -> ! {
    raise(Error::invalid(msg).with_hint(format!("Valid options: {}.", KEYS.join(", "))))
}

fn int_opt(m: &Map<String, Value>, k: &str, lo: i64, hi: i64) -> Option<i64> {
    let v = m.get(k)?;
    let Some(x) = v
        .as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
    else {
        bad(format!("option \"{k}\" must be an integer, not {v}"))
    };
    if x < lo || x > hi {
        bad(format!("option \"{k}\" = {x} is out of range {lo}..{hi}"));
    }
    Some(x)
}

fn num_opt(m: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Option<f64> {
    let v = m.get(k)?;
    let Some(x) = v.as_f64() else {
        bad(format!("option \"{k}\" must be a number, not {v}"))
    };
    if !(x >= lo && x <= hi) {
        bad(format!("option \"{k}\" = {x} is out of range {lo}..{hi}"));
    }
    Some(x)
}

fn str_opt<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    let v = m.get(k)?;
    match v.as_str() {
        Some(s) => Some(s),
        None => bad(format!("option \"{k}\" must be a string, not {v}")),
    }
}

/// The `small` preset trains from scratch in minutes on 2 cores, so where the user did
/// not choose, it uses a larger learning rate (3e-3), a short warm-up (50 steps),
/// expressed-genes-only attention and the value embedding. Measured on Kang
/// (tests/train_kang.rs and examples/quality.rs): the reference's 3e-4 / 500 steps
/// barely move a fresh model in minutes; 1e-2 is faster when it works but leaves some
/// seeds on the per-gene-mean plateau for many epochs, 3e-3 escaped it within 2 epochs
/// for every seed tried. Its values are log1p + 1 without the per-gene z-score
/// (`standardize` false): z-scoring lets genes expressed in few cells dominate input and
/// targets, and PBMC 3k kNN-15 rose from 0.69 to 0.75 after 3 epochs without it (README,
/// "Why unstandardised values and a projection head"). The `published` preset keeps the
/// reference's values.
fn apply_preset_defaults(o: &mut Options) {
    if o.preset == "small" && o.parent.is_none() {
        if !o.set.0 {
            o.learning_rate = 3e-3;
        }
        if !o.set.1 {
            o.warmup_steps = 50;
        }
        if !o.set.2 {
            o.epochs = 10;
        }
        if o.attention.is_none() {
            o.attention = Some(AttentionMode::ExpressedOnly);
        }
        if o.value_embedding.is_none() {
            o.value_embedding = Some(true);
        }
        if o.n_top_genes.is_none() {
            o.n_top_genes = Some(SMALL_TOP_GENES);
        }
        if o.contrastive.is_none() {
            o.contrastive = Some(SMALL_CONTRASTIVE);
        }
        if o.standardize.is_none() {
            o.standardize = Some(false);
        }
    }
}

/// Weight of the contrastive term in the small preset. Masked value prediction on the
/// expressed genes is solved largely from gene identity and sequencing depth, so its
/// cell embeddings barely separate cell types (pbmc3k kNN-15 0.59 after training on
/// Kang, below the 0.65 of random weights). Two views of each cell (random halves of
/// its expressed genes) pulled together and pushed away from the batch's other cells
/// (NT-Xent, SimCLR) make the embedding say which cell it is: see README, "Training
/// objective", for what was measured.
const SMALL_CONTRASTIVE: f64 = 1.0;

/// Hidden width of the contrastive term's projection head (SimCLR's
/// `Linear → ReLU → Linear`, output [`CONTRASTIVE_HEAD_OUT`] floats), used only in
/// training: NT-Xent compares the projected views, the model's embedding is the one
/// before the head. Measured with examples/quality.rs on Kang → PBMC 3k: see README,
/// "Why unstandardised values and a projection head".
const CONTRASTIVE_HEAD: usize = 256;
const CONTRASTIVE_HEAD_OUT: usize = 128;

/// Vocabulary size of the small preset: the most variable genes of the training cells.
/// Measured on Kang (examples/quality.rs): 2,000 of 13,778 genes leave a median of 82
/// expressed vocabulary genes per cell instead of 628, so an epoch costs far less, and
/// the genes that separate cells (cell-type markers, interferon-stimulated genes) are
/// the ones kept.
const SMALL_TOP_GENES: usize = 2000;

pub(crate) fn parse_options(v: &Value) -> Options {
    let Some(m) = v.as_object() else {
        bad(format!("options must be a JSON object, not {v}"))
    };
    if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
        bad(format!("unknown option \"{k}\""));
    }
    if let Some(d) = num_opt(m, "dropout", 0.0, 1.0) {
        if d != 0.0 {
            bad(format!("option \"dropout\" = {d} is not supported: exceiver trains without dropout, as the published models (dropout 0.0)"));
        }
    }
    let preset = str_opt(m, "preset").unwrap_or("published").to_string();
    if !matches!(preset.as_str(), "published" | "small") {
        bad(format!(
            "option \"preset\" must be \"published\" or \"small\", not \"{preset}\""
        ));
    }
    let attention = str_opt(m, "attention").map(|a| match a {
        "reference" => AttentionMode::Reference,
        "expressed_only" => AttentionMode::ExpressedOnly,
        other => bad(format!(
            "option \"attention\" must be \"reference\" or \"expressed_only\", not \"{other}\""
        )),
    });
    let u = |k: &str, lo: i64, hi: i64| int_opt(m, k, lo, hi).map(|x| x as usize);
    Options {
        seq_dim: u("seq_dim", 1, 1024),
        query_len: u("query_len", 1, 4096),
        query_dim: u("query_dim", 1, 1024),
        num_layers: u("num_layers", 0, 64),
        nhead: u("nhead", 1, 64),
        dim_feedforward: u("dim_feedforward", 1, 65536),
        set: (
            m.contains_key("learning_rate"),
            m.contains_key("warmup_steps"),
            m.contains_key("epochs"),
        ),
        learning_rate: num_opt(m, "learning_rate", 1e-12, 10.0).unwrap_or(3e-4),
        weight_decay: num_opt(m, "weight_decay", 0.0, 1.0).unwrap_or(1e-5),
        warmup_steps: int_opt(m, "warmup_steps", 0, 1_000_000_000).unwrap_or(500) as u64,
        batch_size: u("batch_size", 1, 65536).unwrap_or(64),
        frac: num_opt(m, "frac", 1e-9, 1.0).unwrap_or(0.15),
        epochs: u("epochs", 0, 100_000).unwrap_or(10),
        val_fraction: num_opt(m, "val_fraction", 0.0, 0.9).unwrap_or(0.1),
        patience: u("patience", 1, 100_000).unwrap_or(3),
        seed: int_opt(m, "seed", 0, i64::MAX).unwrap_or(0) as u64,
        min_cells: int_opt(m, "min_cells", 1, i64::MAX).unwrap_or(3),
        n_top_genes: u("n_top_genes", 0, 1_000_000),
        max_cells: int_opt(m, "max_cells", 1, i64::MAX),
        attention,
        value_embedding: m.get("value_embedding").map(|v| match v.as_bool() {
            Some(b) => b,
            None => bad(format!(
                "option \"value_embedding\" must be true or false, not {v}"
            )),
        }),
        standardize: m.get("standardize").map(|v| match v.as_bool() {
            Some(b) => b,
            None => bad(format!(
                "option \"standardize\" must be true or false, not {v}"
            )),
        }),
        contrastive: num_opt(m, "contrastive", 0.0, 1000.0),
        contrastive_temperature: num_opt(m, "contrastive_temperature", 0.001, 100.0).unwrap_or(0.1),
        contrastive_keep: num_opt(m, "contrastive_keep", 0.01, 1.0).unwrap_or(0.5),
        contrastive_head: u("contrastive_head", 0, 65536).unwrap_or(CONTRASTIVE_HEAD),
        parent: str_opt(m, "parent").map(str::to_string),
        progress_every: int_opt(m, "progress_every", 1, i64::MAX).unwrap_or(50) as u64,
        label_fraction: num_opt(m, "label_fraction", 1e-6, 1.0).unwrap_or(1.0),
        init_random: match str_opt(m, "init").unwrap_or("pretrained") {
            "pretrained" => false,
            "random" => true,
            other => bad(format!(
                "option \"init\" must be \"pretrained\" or \"random\", not \"{other}\""
            )),
        },
        preset,
    }
}

/// The model shape: the preset, then explicit options.
fn config_for(o: &Options, n_genes: usize) -> Config {
    let mut c = match o.preset.as_str() {
        "small" => Config::small(n_genes),
        _ => Config {
            seq_len: n_genes,
            ..Config::published_exceiver()
        },
    };
    if let Some(d) = o.seq_dim {
        c.seq_dim = d;
        c.query_dim = d;
    }
    if let Some(d) = o.query_dim {
        c.query_dim = d;
    }
    if let Some(x) = o.query_len {
        c.query_len = x;
    }
    if let Some(x) = o.num_layers {
        c.num_layers = x;
    }
    if let Some(x) = o.nhead {
        c.nhead = x;
    }
    if let Some(x) = o.dim_feedforward {
        c.dim_feedforward = x;
    }
    c.attention = o.attention.unwrap_or(AttentionMode::Reference);
    c.value_embedding = o.value_embedding.unwrap_or(false);
    c.num_classes = None;
    if c.seq_dim != c.query_dim {
        bad(format!(
            "seq_dim ({}) and query_dim ({}) must be equal",
            c.seq_dim, c.query_dim
        ));
    }
    c.validate().or_raise();
    c
}

/// One cell as read from the table: vocabulary indices and raw counts of its known,
/// non-zero genes, its library size over all genes, and its label (finetuning).
pub(crate) struct RawCell {
    pub genes: Vec<u32>,
    pub counts: Vec<f32>,
    pub total: f64,
    pub label: Option<String>,
}

/// Fetch up to `n` rows `(cell_id, genes, counts[, label])` and map genes to the
/// vocabulary. Rows with NULL arrays are counted in `nulls`; bad values are errors.
pub(crate) fn fetch_cells(
    cur: &mut SpiCursor<'_>,
    n: usize,
    vocab: &HashMap<String, u32>,
    with_label: bool,
    nulls: &mut u64,
) -> Result<Vec<RawCell>, SpiError> {
    let t = cur.fetch(n as _)?;
    let mut out = Vec::with_capacity(t.len());
    for r in t {
        let id: String = r.get(1)?.unwrap_or_default();
        let genes: Option<Array<&str>> = r.get(2)?;
        let counts: Option<Array<f32>> = r.get(3)?;
        let label: Option<String> = if with_label { r.get(4)? } else { None };
        let (Some(genes), Some(counts)) = (genes, counts) else {
            *nulls += 1;
            continue;
        };
        if genes.len() != counts.len() {
            raise(Error::shape(format!(
                "cell \"{id}\": genes has {} elements but counts has {}",
                genes.len(),
                counts.len()
            )));
        }
        let mut c = RawCell {
            genes: Vec::new(),
            counts: Vec::new(),
            total: 0.0,
            label,
        };
        for (p, (g, x)) in genes.iter().zip(counts.iter()).enumerate() {
            let (Some(g), Some(x)) = (g, x) else {
                raise(Error::new(
                    Kind::NullValue,
                    format!("cell \"{id}\": NULL element at position {}", p + 1),
                ))
            };
            if !x.is_finite() || x < 0.0 {
                raise(Error::data(format!(
                    "cell \"{id}\": count {x} of gene \"{g}\" is negative or not finite"
                )));
            }
            c.total += x as f64;
            if x > 0.0 {
                if let Some(&i) = vocab.get(g) {
                    c.genes.push(i);
                    c.counts.push(x);
                }
            }
        }
        let mut s = c.genes.clone();
        s.sort_unstable();
        if s.windows(2).any(|w| w[0] == w[1]) {
            raise(Error::data(format!(
                "cell \"{id}\": a gene appears more than once"
            )));
        }
        out.push(c);
    }
    Ok(out)
}

/// log1p of the library-size normalised counts.
fn log_norm(c: &RawCell) -> Vec<f32> {
    c.counts
        .iter()
        .map(|&x| log1p32(normalize_count(x, c.total)))
        .collect()
}

/// Model input values of a cell.
fn model_values(c: &RawCell, scaler: &Scaler) -> Vec<f32> {
    c.genes
        .iter()
        .zip(log_norm(c))
        .map(|(&g, y)| scaler.value(g as usize, y))
        .collect()
}

/// Everything a training run needs to know about its data and model.
pub(crate) struct Run<'a> {
    pub model: &'a str,
    pub rel: String,
    pub opts: Options,
    /// Label column for classifier finetuning.
    pub label_column: Option<String>,
    pub labels: Vec<String>,
    pub parent: Option<String>,
}

pub(crate) struct Outcome {
    pub epochs: usize,
    pub steps: u64,
    pub best_val: f64,
    pub baseline_val: f64,
    pub seconds: f64,
    pub cells_per_s: f64,
}

fn split_sql(o: &Options) -> String {
    let cut = (o.val_fraction * 1_000_000.0).round() as i64;
    format!(
        "((abs(hashtext(cell_id::text || ':{}')::bigint) % 1000000) < {cut})",
        o.seed
    )
}

/// The `n` most variable of `genes` over the training cells (scanpy's "seurat"
/// flavour: normalised dispersion of the normalised counts within bins of mean
/// expression), in name order. One extra scan of the training cells.
fn top_genes(
    run: &Run,
    train_where: &str,
    limit: &str,
    genes: Vec<String>,
    n: usize,
) -> Vec<String> {
    let rel = &run.rel;
    let vocab: HashMap<String, u32> = genes
        .iter()
        .enumerate()
        .map(|(i, g)| (g.clone(), i as u32))
        .collect();
    let mut fit = HvgFit::new(genes.len());
    let mut nulls = 0u64;
    let scan = format!(
        "SELECT cell_id::text, genes, counts::real[] FROM {rel} WHERE {train_where}{limit}"
    );
    Spi::connect(|c| {
        let mut cur = c.try_open_cursor(scan.as_str(), &[])?;
        loop {
            let cells = fetch_cells(&mut cur, 1024, &vocab, false, &mut nulls)?;
            if cells.is_empty() {
                break;
            }
            for cell in &cells {
                fit.add_cell(&cell.genes, &log_norm(cell));
            }
            check_for_interrupts!();
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
    let keep = fit.select(n);
    if keep.is_empty() {
        raise(Error::invalid(format!(
            "none of the {} vocabulary genes varies over the training cells of {rel}",
            genes.len()
        )));
    }
    notice!(
        "vocabulary: the {} most variable of {} genes expressed in at least {} training cells (option n_top_genes)",
        keep.len(),
        genes.len(),
        run.opts.min_cells
    );
    keep.into_iter().map(|g| genes[g].clone()).collect()
}

/// Refuse (54000) a training run whose memory estimate (weights, optimiser state,
/// per-thread buffers, projection head, a batch) is past `exceiver.max_memory`, before
/// anything is allocated. `nnz`: vocabulary genes expressed per training cell.
fn check_training_memory(run: &Run, cfg: &Config, nnz: &[usize]) {
    cfg.validate().or_raise();
    let o = &run.opts;
    let head_hidden = if run.label_column.is_none() && o.contrastive.unwrap_or(0.0) > 0.0 {
        o.contrastive_head
    } else {
        0
    };
    let threads = gucs::threads();
    let max_expressed = nnz.iter().copied().max().unwrap_or(0);
    exceiver_core::limits::check_bytes(
        exceiver_core::train::memory_estimate(cfg, o.batch_size, threads, max_expressed, head_hidden),
        &format!(
            "training \"{}\" ({} parameters, batch {}, {threads} threads, up to {max_expressed} genes a cell)",
            run.model,
            cfg.approx_parameters(),
            o.batch_size,
        ),
    )
    .or_raise();
}

/// Train and store model `run.model`. `start` gives the initial config, params,
/// vocabulary and scaler (None: fit from the data and initialise fresh weights).
pub(crate) fn run_training(
    run: &Run,
    start: Option<(Config, Params, Vec<String>, Scaler)>,
) -> Outcome {
    gucs::device().check_supported().or_raise();
    gucs::apply_limits();
    let o = &run.opts;
    let rel = &run.rel;
    let is_val = split_sql(o);
    // With max_cells, every scan must take the same cells: order before the limit.
    let limit = o
        .max_cells
        .map(|n| format!(" ORDER BY cell_id LIMIT {n}"))
        .unwrap_or_default();
    let label_sql = run
        .label_column
        .as_ref()
        .map(|c| format!(", {}::text", crate::api::load::quote_ident(c)))
        .unwrap_or_default();
    let label_filter = run
        .label_column
        .as_ref()
        .map(|c| {
            let cut = (o.label_fraction * 1_000_000.0).round() as i64;
            format!(
                " AND {} IS NOT NULL AND (abs(hashtext(cell_id::text || ':labels:{}')::bigint) % 1000000) < {cut}",
                crate::api::load::quote_ident(c),
                o.seed
            )
        })
        .unwrap_or_default();
    let train_where = format!("NOT {is_val} AND genes IS NOT NULL{label_filter}");
    let val_where = format!("{is_val} AND genes IS NOT NULL{label_filter}");
    let t0 = Instant::now();

    // 1. Vocabulary, scaler and the mask size.
    let any = Spi::connect(|c| {
        c.select(
            &format!("SELECT EXISTS (SELECT 1 FROM {rel})"),
            Some(1),
            &[],
        )?
        .first()
        .get::<bool>(1)
    })
    .or_raise()
    .unwrap_or(false);
    if !any {
        raise(
            Error::invalid(format!("table {rel} has no cells"))
                .with_hint("Load cells first, e.g. with exceiver.load_h5ad()."),
        );
    }
    let fresh = start.is_none();
    let (mut cfg, init_params, genes, scaler) = match start {
        Some((c, p, g, s)) => (c, Some(p), g, s),
        None => {
            let genes: Vec<String> = Spi::connect(|c| {
                c.select(
                    &format!(
                        "SELECT coalesce(array_agg(g ORDER BY g), '{{}}') FROM (SELECT g FROM \
                         (SELECT genes FROM {rel} WHERE {train_where}{limit}) t, unnest(genes) g \
                         GROUP BY g HAVING count(*) >= $1) s"
                    ),
                    Some(1),
                    &[o.min_cells.into()],
                )?
                .first()
                .get::<Vec<String>>(1)
            })
            .or_raise()
            .unwrap_or_default();
            if genes.is_empty() {
                raise(
                    Error::invalid(format!(
                        "no gene is expressed in at least {} training cells of {rel}",
                        o.min_cells
                    ))
                    .with_hint("Lower the min_cells option, or check that the table has cells."),
                );
            }
            let genes = match o.n_top_genes {
                Some(n) if n > 0 && n < genes.len() => {
                    top_genes(run, &train_where, &limit, genes, n)
                }
                _ => genes,
            };
            let cfg = config_for(o, genes.len());
            (cfg, None, genes, Scaler::identity(0))
        }
    };
    let vocab: HashMap<String, u32> = genes
        .iter()
        .enumerate()
        .map(|(i, g)| (g.clone(), i as u32))
        .collect();
    let n_genes = genes.len();
    let mut fit = ScalerFit::new(n_genes);
    let mut expr_sum = vec![0.0f64; n_genes];
    let mut expr_n = vec![0u32; n_genes];
    let mut nnz: Vec<usize> = Vec::new();
    let mut train_cells = 0u64;
    let mut nulls = 0u64;
    let scan = format!("SELECT cell_id::text, genes, counts::real[]{label_sql} FROM {rel} WHERE {train_where}{limit}");
    Spi::connect(|c| {
        let mut cur = c.try_open_cursor(scan.as_str(), &[])?;
        loop {
            let cells = fetch_cells(
                &mut cur,
                1024,
                &vocab,
                run.label_column.is_some(),
                &mut nulls,
            )?;
            if cells.is_empty() {
                break;
            }
            for cell in &cells {
                let ys = log_norm(cell);
                if fresh {
                    fit.add_cell(&cell.genes, &ys).or_raise();
                }
                for (&g, &y) in cell.genes.iter().zip(&ys) {
                    expr_sum[g as usize] += y as f64;
                    expr_n[g as usize] += 1;
                }
                nnz.push(cell.genes.len());
                train_cells += 1;
            }
            check_for_interrupts!();
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
    if train_cells == 0 {
        raise(
            Error::invalid(format!("{rel} has no training cells"))
                .with_hint("The table is empty, or every cell went to validation (val_fraction)."),
        );
    }
    let scaler = if fresh && o.standardize.unwrap_or(true) {
        fit.finish().or_raise()
    } else if fresh {
        // model values log1p + 1: mean 0 and scale 1 for every gene
        Scaler::identity(n_genes)
    } else {
        scaler
    };
    let n_mask = n_mask_for(o.frac, &nnz);
    if n_mask == 0 {
        raise(Error::invalid(format!(
            "frac {} of the median {} expressed genes per cell masks no gene",
            o.frac,
            {
                let mut v = nnz.clone();
                v.sort_unstable();
                v[v.len() / 2]
            }
        )));
    }
    let too_small = nnz.iter().filter(|&&n| n < n_mask).count();
    if too_small > 0 {
        notice!("{too_small} of {train_cells} training cells have fewer than {n_mask} expressed vocabulary genes (the mask size) and are skipped");
    }
    // Per-gene mean model value over the training cells where the gene is expressed:
    // the baseline a model must beat.
    let baseline: Vec<f32> = (0..n_genes)
        .map(|g| {
            if expr_n[g] > 0 {
                scaler.value(g, (expr_sum[g] / expr_n[g] as f64) as f32)
            } else {
                1.0
            }
        })
        .collect();

    // 2. Model and optimiser, refused before anything is allocated when the estimate
    // is past exceiver.max_memory.
    if run.label_column.is_some() {
        cfg.num_classes = Some(run.labels.len());
    }
    check_training_memory(run, &cfg, &nnz);
    let params = match init_params {
        Some(p) => p,
        None => {
            let mut p = Params::init(&cfg, o.seed).or_raise();
            // Start the value head at the mean target (the mean model value of the
            // expressed genes): a fresh head predicts ~0 against targets of ~3.6.
            let n: f64 = expr_n.iter().map(|&x| x as f64).sum();
            let mean = (0..n_genes)
                .map(|g| expr_n[g] as f64 * baseline[g] as f64)
                .sum::<f64>()
                / n.max(1.0);
            init_for_scratch_training(&cfg, &mut p, mean).or_raise();
            p
        }
    };
    let threads = gucs::threads();
    let topts = TrainOpts {
        lr: o.learning_rate,
        weight_decay: o.weight_decay,
        warmup_steps: o.warmup_steps,
        threads,
        ..TrainOpts::default()
    };
    let n_params = params.num_parameters(&cfg);
    // exceiver.device: the hand-written CPU trainer, or candle on a GPU (cuda builds)
    let mut trainer = AnyTrainer::new(
        cfg.clone(),
        params,
        scaler.zero_fill(),
        topts,
        gucs::device(),
    )
    .or_raise();
    let label_index: HashMap<&str, usize> = run
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let to_train = |cell: &RawCell, rng: &mut Rng| -> Option<TrainCell> {
        if cell.genes.len() < n_mask {
            return None;
        }
        let label = match (&cell.label, run.label_column.is_some()) {
            (Some(l), true) => Some(*label_index.get(l.as_str())?),
            (None, true) => return None,
            _ => None,
        };
        let mask = mask_positions(cell.genes.len(), n_mask, rng).ok()?;
        Some(TrainCell {
            genes: cell.genes.clone(),
            values: model_values(cell, &scaler),
            mask,
            label,
        })
    };

    // Contrastive views (plain Exceiver models only): each expressed gene kept with
    // probability contrastive_keep, then n_mask of the kept ones masked as usual.
    let contrast = if run.label_column.is_none() {
        o.contrastive.unwrap_or(0.0)
    } else {
        0.0
    };
    let tau = o.contrastive_temperature;
    if contrast > 0.0 && o.contrastive_head > 0 {
        let head = ProjectionHead::new(
            cfg.embedding_len(),
            o.contrastive_head,
            CONTRASTIVE_HEAD_OUT,
            o.seed,
        )
        .or_raise();
        trainer.set_projection_head(Some(head)).or_raise();
    }
    let to_view = |cell: &RawCell, rng: &mut Rng| -> Option<TrainCell> {
        let values = model_values(cell, &scaler);
        let (mut g, mut v) = (Vec::new(), Vec::new());
        for (&gi, &vi) in cell.genes.iter().zip(&values) {
            if rng.uniform() < o.contrastive_keep {
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
    let views_of = |raw: &[RawCell], rng: &mut Rng| -> Vec<TrainCell> {
        raw.iter()
            .filter_map(|c| {
                let a = to_view(c, rng)?;
                let b = to_view(c, rng)?;
                Some([a, b])
            })
            .flatten()
            .collect()
    };

    // 3. Validation: fixed masks (same seed every pass), also the baseline's MSE and,
    // when training contrastively, the NT-Xent loss of fixed views.
    struct Val {
        mse: f64,
        base: f64,
        ce: f64,
        contrastive: f64,
        cells: usize,
    }
    let val_scan = format!("SELECT cell_id::text, genes, counts::real[]{label_sql} FROM {rel} WHERE {val_where} ORDER BY cell_id");
    let validate = |trainer: &mut AnyTrainer| -> Val {
        let mut rng = Rng::new(o.seed ^ 0x5eed_5eed);
        let mut vrng = Rng::new(o.seed ^ 0xc0ff_ee00);
        let (mut se, mut base_se, mut ce, mut masked, mut cells) =
            (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
        let (mut csum, mut cn) = (0.0f64, 0usize);
        let mut nulls = 0u64;
        Spi::connect(|c| {
            let mut cur = c.try_open_cursor(val_scan.as_str(), &[])?;
            loop {
                let raw = fetch_cells(
                    &mut cur,
                    o.batch_size.max(64),
                    &vocab,
                    run.label_column.is_some(),
                    &mut nulls,
                )?;
                if raw.is_empty() {
                    break;
                }
                if contrast > 0.0 {
                    let views = views_of(&raw, &mut vrng);
                    if views.len() >= 4 {
                        csum +=
                            trainer.eval_contrastive(&views, tau).or_raise() * views.len() as f64;
                        cn += views.len();
                    }
                }
                let batch: Vec<TrainCell> =
                    raw.iter().filter_map(|c| to_train(c, &mut rng)).collect();
                if batch.is_empty() {
                    continue;
                }
                let s: StepStats = trainer.eval_stats(&batch).or_raise();
                se += s.mse * s.masked as f64;
                ce += s.ce * s.cells as f64;
                masked += s.masked;
                cells += s.cells;
                for tc in &batch {
                    for &p in &tc.mask {
                        let d = (baseline[tc.genes[p] as usize] - tc.values[p]) as f64;
                        base_se += d * d;
                    }
                }
                check_for_interrupts!();
            }
            Ok::<_, SpiError>(())
        })
        .or_raise();
        let contrastive = if cn > 0 { csum / cn as f64 } else { f64::NAN };
        if masked == 0 {
            return Val {
                mse: f64::NAN,
                base: f64::NAN,
                ce: f64::NAN,
                contrastive,
                cells: 0,
            };
        }
        Val {
            mse: se / masked as f64,
            base: base_se / masked as f64,
            ce: ce / cells.max(1) as f64,
            contrastive,
            cells,
        }
    };

    // 4. Epochs.
    let steps_per_epoch = ((train_cells as usize - too_small).div_ceil(o.batch_size)).max(1) as u64;
    let total_steps = steps_per_epoch * o.epochs as u64;
    notice!(
        "training \"{}\" on {rel}: {train_cells} training cells, {} genes, {} masked per cell, {} epochs of {steps_per_epoch} steps (batch {}), {} parameters, {threads} threads{}",
        run.model, n_genes, n_mask, o.epochs, o.batch_size, n_params,
        if contrast > 0.0 {
            format!("; contrastive term weight {contrast} (two views of each cell keeping {} of its genes, temperature {tau}, projection head {})", o.contrastive_keep,
                if o.contrastive_head > 0 { format!("{} → {} → {CONTRASTIVE_HEAD_OUT}", cfg.embedding_len(), o.contrastive_head) } else { "none".to_string() })
        } else {
            String::new()
        }
    );
    let mut history: Vec<Value> = Vec::new();
    let mut best: Option<(f64, Params)> = None;
    let mut baseline_val = f64::NAN;
    let mut bad_epochs = 0usize;
    let mut step = 0u64;
    let mut cells_seen = 0u64;
    let mut epochs_done = 0usize;
    let train_t0 = Instant::now();
    let mut train_time = 0.0f64;
    for epoch in 0..o.epochs {
        let order = format!(
            "SELECT cell_id::text, genes, counts::real[]{label_sql} FROM (SELECT * FROM {rel} WHERE {train_where}{limit}) t \
             ORDER BY md5(cell_id::text || ':{}:{epoch}')",
            o.seed
        );
        let mut rng = Rng::new(
            o.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as u64 + 1),
        );
        let (mut loss_sum, mut loss_n, mut closs_sum) = (0.0f64, 0usize, 0.0f64);
        Spi::connect(|c| {
            let mut cur = c.try_open_cursor(order.as_str(), &[])?;
            let mut nulls = 0u64;
            loop {
                let raw = fetch_cells(&mut cur, o.batch_size, &vocab, run.label_column.is_some(), &mut nulls)?;
                if raw.is_empty() {
                    break;
                }
                let ts = Instant::now();
                let (s, n_cells) = if contrast > 0.0 {
                    let views = views_of(&raw, &mut rng);
                    if views.len() < 4 {
                        continue;
                    }
                    let (s, c) = trainer.train_step_contrastive(&views, tau, contrast).or_raise();
                    closs_sum += c * (views.len() / 2) as f64;
                    (s, views.len() / 2)
                } else {
                    let batch: Vec<TrainCell> = raw.iter().filter_map(|c| to_train(c, &mut rng)).collect();
                    if batch.is_empty() {
                        continue;
                    }
                    (trainer.train_step(&batch).or_raise(), batch.len())
                };
                train_time += ts.elapsed().as_secs_f64();
                step += 1;
                cells_seen += n_cells as u64;
                loss_sum += s.loss * n_cells as f64;
                loss_n += n_cells;
                check_for_interrupts!();
                if step % o.progress_every == 0 {
                    let el = train_t0.elapsed().as_secs_f64();
                    notice!(
                        "step {step}/{total_steps} (epoch {}): train loss {:.4}, {:.1} cells/s, about {:.0} s left",
                        epoch + 1,
                        loss_sum / loss_n.max(1) as f64,
                        cells_seen as f64 / el.max(1e-9),
                        el / step as f64 * (total_steps - step) as f64
                    );
                }
            }
            Ok::<_, SpiError>(())
        })
        .or_raise();
        let Val {
            mse: val_mse,
            base: base_mse,
            ce: val_ce,
            contrastive: val_contrastive,
            cells: val_cells,
        } = validate(&mut trainer);
        baseline_val = base_mse;
        epochs_done = epoch + 1;
        let train_loss = loss_sum / loss_n.max(1) as f64;
        let mut h = json!({"epoch": epoch + 1, "step": step, "train_loss": train_loss,
                           "seconds": train_t0.elapsed().as_secs_f64()});
        if contrast > 0.0 {
            h["train_contrastive"] = json!(closs_sum / loss_n.max(1) as f64);
        }
        if val_cells > 0 {
            h["val_mse"] = json!(val_mse);
            if run.label_column.is_some() {
                h["val_ce"] = json!(val_ce);
            }
            if val_contrastive.is_finite() {
                h["val_contrastive"] = json!(val_contrastive);
            }
        }
        history.push(h);
        // the objective being minimised, on the validation cells
        let score = if run.label_column.is_some() {
            val_mse + val_ce
        } else if contrast > 0.0 && val_contrastive.is_finite() {
            val_mse + contrast * val_contrastive
        } else {
            val_mse
        };
        let mut extra = String::new();
        if run.label_column.is_some() {
            extra = format!(", validation CE {val_ce:.4}");
        } else if contrast > 0.0 {
            extra = format!(
                ", contrastive loss {:.4} (validation {val_contrastive:.4})",
                closs_sum / loss_n.max(1) as f64
            );
        }
        notice!(
            "epoch {}/{}: train loss {train_loss:.4}, validation MSE {val_mse:.4} (per-gene mean baseline {base_mse:.4}){extra}, {:.1} cells/s",
            epoch + 1,
            o.epochs,
            cells_seen as f64 / train_t0.elapsed().as_secs_f64().max(1e-9)
        );
        if val_cells == 0 {
            // no validation cells: keep the latest weights
            best = Some((train_loss, trainer.params().or_raise().into_owned()));
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| score < *b) {
            best = Some((score, trainer.params().or_raise().into_owned()));
            bad_epochs = 0;
        } else {
            bad_epochs += 1;
            if bad_epochs >= o.patience {
                notice!(
                    "early stop: validation did not improve for {} epochs",
                    o.patience
                );
                break;
            }
        }
    }
    let (best_score, best_params) =
        best.unwrap_or_else(|| (f64::NAN, trainer.params().or_raise().into_owned()));
    let best_val = history
        .iter()
        .filter_map(|h| h.get("val_mse").and_then(Value::as_f64))
        .fold(f64::INFINITY, f64::min);
    let seconds = t0.elapsed().as_secs_f64();
    let cps = cells_seen as f64 / train_time.max(1e-9);

    // 5. Store.
    let bytes = weights::save_safetensors(&cfg, &best_params, &[]).or_raise();
    let kind = if cfg.num_classes.is_some() {
        "classifier"
    } else {
        "exceiver"
    };
    let metrics = json!({
        "best_val_mse": if best_val.is_finite() { json!(best_val) } else { Value::Null },
        "best_val_score": if best_score.is_finite() { json!(best_score) } else { Value::Null },
        "baseline_val_mse": if baseline_val.is_finite() { json!(baseline_val) } else { Value::Null },
        "epochs": epochs_done, "steps": step, "train_cells": train_cells, "skipped_cells": too_small,
        "n_mask": n_mask, "seconds": seconds, "train_cells_per_s": cps, "threads": threads,
        "options": options_json(o),
    });
    let labels: Option<Vec<String>> = run.label_column.as_ref().map(|_| run.labels.clone());
    Spi::run_with_args(
        "INSERT INTO exceiver.model_catalog (name, kind, config, genes, scaler_mean, scaler_std, labels, weights, parent, source, metrics, history) \
         VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb)",
        &[
            run.model.into(),
            kind.into(),
            serde_json::to_string(&cfg).unwrap_or_default().into(),
            genes.clone().into(),
            scaler.mean.clone().into(),
            scaler.scale.clone().into(),
            labels.into(),
            bytes.into(),
            run.parent.clone().into(),
            format!("{}:{rel}", if run.label_column.is_some() { "finetune" } else { "train" }).into(),
            metrics.to_string().into(),
            Value::Array(history).to_string().into(),
        ],
    )
    .or_raise();
    Outcome {
        epochs: epochs_done,
        steps: step,
        best_val,
        baseline_val,
        seconds,
        cells_per_s: cps,
    }
}

fn options_json(o: &Options) -> Value {
    json!({"preset": o.preset, "learning_rate": o.learning_rate, "weight_decay": o.weight_decay,
           "warmup_steps": o.warmup_steps, "batch_size": o.batch_size, "frac": o.frac, "epochs": o.epochs,
           "val_fraction": o.val_fraction, "patience": o.patience, "seed": o.seed, "min_cells": o.min_cells, "n_top_genes": o.n_top_genes.unwrap_or(0),
           "standardize": if o.parent.is_some() { Value::Null } else { json!(o.standardize.unwrap_or(true)) },
           "contrastive": o.contrastive.unwrap_or(0.0), "contrastive_temperature": o.contrastive_temperature, "contrastive_keep": o.contrastive_keep,
           "contrastive_head": if o.contrastive.unwrap_or(0.0) > 0.0 { o.contrastive_head } else { 0 },
           "max_cells": o.max_cells, "parent": o.parent})
}

fn check_cell_id(rel: &str) {
    if column_type(rel, "cell_id").is_none() {
        raise_code(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {rel} has no column \"cell_id\""),
            Some("A cell table has columns cell_id text, genes text[] and counts real[] (see exceiver.load_10x)."),
        );
    }
}

/// Train a new model on cell table `source` by masked value prediction (or, with the
/// option `parent`, continue training an existing model on it) and store it in the
/// catalog. Options are named after the reference's hyperparameters; see README.
#[pg_extern(volatile, parallel_unsafe)]
fn train(
    model: &str,
    source: &str,
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(model, String),
        name!(epochs, i32),
        name!(steps, i64),
        name!(best_val_mse, Option<f64>),
        name!(baseline_val_mse, Option<f64>),
        name!(seconds, f64),
        name!(cells_per_s, f64),
    ),
> {
    let mut opts = parse_options(&options.0);
    apply_preset_defaults(&mut opts);
    check_new_model_name(model);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    check_cell_id(&rel);
    let start = opts.parent.as_ref().map(|p| {
        for k in ["preset", "seq_dim", "query_len", "query_dim", "num_layers", "nhead", "dim_feedforward", "min_cells", "n_top_genes", "value_embedding", "standardize"] {
            if options.0.get(k).is_some() {
                bad(format!("option \"{k}\" cannot be combined with \"parent\": the model's shape, vocabulary and scaler come from the parent"));
            }
        }
        let m = get_model(p);
        if m.model.config().num_classes.is_some() {
            raise(Error::invalid(format!("parent \"{p}\" is a classifier; continue training a plain Exceiver model")));
        }
        let mut genes: Vec<(String, u32)> = m.vocab.iter().map(|(g, &i)| (g.clone(), i)).collect();
        genes.sort_by_key(|x| x.1);
        let mut cfg = m.model.config().clone();
        if let Some(a) = opts.attention {
            cfg.attention = a;
        }
        (cfg, m.model.params().clone(), genes.into_iter().map(|x| x.0).collect(), m.scaler.clone())
    });
    let run = Run {
        model,
        rel,
        parent: opts.parent.clone(),
        opts,
        label_column: None,
        labels: Vec::new(),
    };
    let out = run_training(&run, start);
    let f = |x: f64| x.is_finite().then_some(x);
    TableIterator::once((
        model.to_string(),
        out.epochs as i32,
        out.steps as i64,
        f(out.best_val),
        f(out.baseline_val),
        out.seconds,
        out.cells_per_s,
    ))
}

/// Train the classifier variant of `base_model` (class token appended to the decoder
/// query, class head; loss = masked-value MSE + cross-entropy, as the reference) on the
/// labels in `label_column` of `source`, and store it as `new_model`. The labels are
/// stored with the model; `exceiver.classify` predicts them.
#[pg_extern(volatile, parallel_unsafe)]
fn finetune(
    base_model: &str,
    new_model: &str,
    source: &str,
    label_column: &str,
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(model, String),
        name!(classes, i32),
        name!(epochs, i32),
        name!(steps, i64),
        name!(best_val_mse, Option<f64>),
        name!(seconds, f64),
        name!(cells_per_s, f64),
    ),
> {
    let opts = parse_options(&options.0);
    for k in [
        "preset",
        "seq_dim",
        "query_len",
        "query_dim",
        "num_layers",
        "nhead",
        "dim_feedforward",
        "min_cells",
        "n_top_genes",
        "value_embedding",
        "standardize",
        "parent",
    ] {
        if options.0.get(k).is_some() {
            bad(format!("option \"{k}\" cannot be used with finetune: the model's shape, vocabulary and scaler come from the base model"));
        }
    }
    for k in [
        "contrastive",
        "contrastive_temperature",
        "contrastive_keep",
        "contrastive_head",
    ] {
        if options.0.get(k).is_some() {
            bad(format!("option \"{k}\" cannot be used with finetune: a classifier is trained on its labels (masked-value MSE + cross-entropy); use it in exceiver.train"));
        }
    }
    check_new_model_name(new_model);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    check_cell_id(&rel);
    if column_type(&rel, label_column).is_none() {
        raise_code(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {rel} has no column \"{label_column}\""),
            None,
        );
    }
    let lc = crate::api::load::quote_ident(label_column);
    let (labels, nulls): (Option<Vec<String>>, Option<i64>) = Spi::connect(|c| {
        let t = c
            .select(
                &format!(
                    "SELECT (SELECT array_agg(DISTINCT {lc}::text ORDER BY {lc}::text) FROM {rel} WHERE {lc} IS NOT NULL), \
                            (SELECT count(*) FROM {rel} WHERE {lc} IS NULL)"
                ),
                Some(1),
                &[],
            )?
            .first();
        Ok::<_, SpiError>((t.get(1)?, t.get(2)?))
    })
    .or_raise();
    let labels = labels.unwrap_or_default();
    if labels.len() < 2 {
        raise(Error::invalid(format!(
            "label column \"{label_column}\" of {rel} has {} distinct labels; a classifier needs at least 2",
            labels.len()
        )));
    }
    if let Some(n) = nulls.filter(|&n| n > 0) {
        notice!("{n} cells with a NULL \"{label_column}\" are skipped");
    }
    let base = get_model(base_model);
    let mut cfg = base.model.config().clone();
    cfg.num_classes = Some(labels.len());
    if let Some(a) = opts.attention {
        cfg.attention = a;
    }
    cfg.validate().or_raise();
    let mut params = Params::init(&cfg, opts.seed).or_raise();
    if !opts.init_random {
        let b = base.model.params();
        let n = b.gene_emb.len().min(params.gene_emb.len());
        let d = cfg.seq_dim;
        // rows 0..G and the mask row; a base classifier's class token is not reused
        let keep = n.min((cfg.seq_len + 1) * d);
        params.gene_emb[..keep].copy_from_slice(&b.gene_emb[..keep]);
        params.query_emb = b.query_emb.clone();
        params.encoder = b.encoder.clone();
        params.layers = b.layers.clone();
        params.decoder = b.decoder.clone();
        params.value_head = b.value_head.clone();
        params.value_emb = b.value_emb.clone();
    }
    let mut genes: Vec<(String, u32)> = base.vocab.iter().map(|(g, &i)| (g.clone(), i)).collect();
    genes.sort_by_key(|x| x.1);
    let start = (
        cfg,
        params,
        genes.into_iter().map(|x| x.0).collect(),
        base.scaler.clone(),
    );
    let run = Run {
        model: new_model,
        rel,
        parent: Some(base_model.to_string()),
        opts,
        label_column: Some(label_column.to_string()),
        labels: labels.clone(),
    };
    let out = run_training(&run, Some(start));
    TableIterator::once((
        new_model.to_string(),
        labels.len() as i32,
        out.epochs as i32,
        out.steps as i64,
        out.best_val.is_finite().then_some(out.best_val),
        out.seconds,
        out.cells_per_s,
    ))
}
