//! Training options: named after the reference's hyperparameters, each with its range,
//! parsed and checked from the JSON object `exceiver.train` / `exceiver.finetune` take,
//! before any work starts. Presets fill in what the caller did not choose.

use crate::error::{Error, Result};
use crate::model::{AttentionMode, Config};
use serde_json::{json, Map, Value};

/// Training options (see README, "Training options", for each one's meaning).
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
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
    /// Whether the caller set learning_rate / warmup_steps / epochs (else preset defaults).
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
    pub value_embedding: Option<ValueEmbedding>,
    /// Standardise each gene's log1p values over the training cells (the published
    /// preprocessing). None: the preset's default for a new model.
    pub standardize: Option<bool>,
    /// Weight of the contrastive term (0: masked value prediction only). None: the
    /// small preset's default for a new model, 0 otherwise.
    pub contrastive: Option<f64>,
    pub contrastive_temperature: f64,
    /// Fraction of a cell's expressed genes each contrastive view keeps. None: 1 for
    /// the small preset's new models, 0.5 otherwise ([`Options::keep`]).
    pub contrastive_keep: Option<f64>,
    /// Lowest fraction of a cell's reads a contrastive view keeps: each view thins the
    /// counts binomially at a rate drawn between this and 1 (1: no thinning), so that
    /// two views of a cell differ in sequencing depth as two cells of a type do.
    /// None: [`SMALL_DEPTH`] for the small preset's new models, 1 otherwise
    /// ([`Options::depth`]).
    pub contrastive_depth: Option<f64>,
    /// Hidden width of the contrastive term's projection head (0: none).
    pub contrastive_head: usize,
    /// Rows of NNCLR's support set (0: positives are the cell's other view, NT-Xent);
    /// needs the projection head ([`crate::train::ProjectionHead::with_support`]).
    pub contrastive_support: usize,
    /// Share of same-type negatives NT-Xent is debiased for (0: none); needs the
    /// projection head ([`crate::train::ProjectionHead::with_debias`]).
    pub contrastive_debias: f64,
    /// Weight of the profile decoder's loss beside NT-Xent (0: none); needs the
    /// projection head ([`crate::train::ProjectionHead::with_decoder`]). None:
    /// [`SMALL_RECONSTRUCT`] for the small preset's new contrastive models with a
    /// head, 0 otherwise ([`Options::reconstruct`]).
    pub reconstruct: Option<f64>,
    /// Rank of the profile decoder ([`crate::train::ProfileDecoder`]).
    pub reconstruct_rank: usize,
    /// A new model's profile path ([`Config::profile`]). None: on for the small
    /// preset's new models, off otherwise.
    pub profile_path: Option<bool>,
    pub parent: Option<String>,
    pub progress_every: u64,
    /// Finetuning only: the fraction of labelled cells used (hash of cell_id).
    pub label_fraction: f64,
    /// Finetuning only: start from the base model's weights ("pretrained") or fresh ones ("random").
    pub init_random: bool,
    /// Finetuning only: the class head reads the cell embedding (`"embedding"`, true) or
    /// a class token queried through the decoder (`"token"`, false; the published
    /// classifier). None: the finetune default ([`Options::class_embedding`]).
    pub class_readout: Option<bool>,
    /// After the warm-up: the learning rate stays (`"constant"`, false) or decays to 0
    /// along a half cosine over the planned epochs (`"cosine"`, true).
    pub cosine: bool,
    /// Finetuning only: train the class head alone (the pretrained model frozen) until
    /// validation stops improving, then the whole model (LP-FT). None: the finetune
    /// default ([`Options::head_first`]).
    pub head_first: Option<bool>,
}

/// `finetune`'s class head when the caller does not choose (`class_readout`): the
/// published class token. The head on the embedding won on PBMC 3k but made
/// `make demo`'s Kang `stim` classifiers run past 25 minutes (README, "Fine-tuning a
/// classifier"), so it is opt-in until that is understood.
const CLASS_DEFAULT: bool = false;

/// `finetune`'s `head_first` when the caller does not choose.
const HEAD_FIRST_DEFAULT: bool = false;

/// Every option key, in the order the error hint lists them.
pub const KEYS: [&str; 40] = [
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
    "contrastive_depth",
    "contrastive_head",
    "parent",
    "progress_every",
    "label_fraction",
    "init",
    "lr_schedule",
    "contrastive_support",
    "contrastive_debias",
    "reconstruct",
    "reconstruct_rank",
    "profile_path",
    "class_readout",
    "head_first",
];

/// Options that fix a new model's shape, vocabulary or scaler: refused where those come
/// from another model (`parent`, `finetune`).
const SHAPE_KEYS: [&str; 12] = [
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
    "profile_path",
];

const CONTRASTIVE_KEYS: [&str; 9] = [
    "contrastive",
    "contrastive_temperature",
    "contrastive_keep",
    "contrastive_depth",
    "contrastive_head",
    "contrastive_support",
    "contrastive_debias",
    "reconstruct",
    "reconstruct_rank",
];

/// Weight of the contrastive term in the small preset. Masked value prediction on the
/// expressed genes is solved largely from gene identity and sequencing depth, so its
/// cell embeddings barely separate cell types (pbmc3k kNN-15 0.59 after training on
/// Kang, below the 0.65 of random weights). Two views of each cell (random halves of
/// its expressed genes) pulled together and pushed away from the batch's other cells
/// (NT-Xent, SimCLR) make the embedding say which cell it is: see README, "Training
/// objective", for what was measured.
pub const SMALL_CONTRASTIVE: f64 = 1.0;

/// The small preset's contrastive views: each thins the cell's reads binomially to a
/// fraction drawn between this and 1 and keeps every remaining gene. Random halves of
/// the expressed genes (`contrastive_keep` 0.5, the earlier default) teach invariance to
/// losing genes at random; thinning teaches invariance to sequencing depth, which is
/// how two cells of one type differ. PBMC 3k kNN-15 after 3 epochs on Kang (examples/
/// quality.rs): halves 0.805 (AvgBIO 0.575); thinning to 0.1-1 0.818 (0.621); to
/// 0.05-1 0.828 (0.645): README, "Why views at another depth".
pub const SMALL_DEPTH: f64 = 0.05;

/// Hidden width of the contrastive term's projection head (SimCLR's
/// `Linear → ReLU → Linear`, output [`CONTRASTIVE_HEAD_OUT`] floats), used only in
/// training: NT-Xent compares the projected views, the model's embedding is the one
/// before the head. Measured with examples/quality.rs on Kang → PBMC 3k: see README,
/// "Why unstandardised values and a projection head".
pub const CONTRASTIVE_HEAD: usize = 256;
pub const CONTRASTIVE_HEAD_OUT: usize = 128;

/// Weight of the profile decoder's loss in the small preset's new contrastive models
/// (option `reconstruct`; the loss is a mean over views and genes of standardised
/// values, so about 1 at the start against NT-Xent's 2-5). Measured with
/// examples/quality.rs, Kang and PBMC 3k together, 3 epochs, seeds 0-2: PBMC 3k kNN-15
/// rose with the weight (0: 0.877 on average; 50: 0.886; 200: 0.891, PCA 0.890), and
/// on Kang alone from 0.860 to 0.875: README, "Why a profile decoder".
pub const SMALL_RECONSTRUCT: f64 = 200.0;

/// Rank of the profile decoder (option `reconstruct_rank`): the 50 dimensions of the
/// PCA baseline.
pub const RECONSTRUCT_RANK: usize = 50;

/// Vocabulary size of the small preset: the most variable genes of the training cells.
/// Measured on Kang (examples/quality.rs): 2,000 of 13,778 genes leave a median of 82
/// expressed vocabulary genes per cell instead of 628, so an epoch costs far less, and
/// the genes that separate cells (cell-type markers, interferon-stimulated genes) are
/// the ones kept.
pub const SMALL_TOP_GENES: usize = 2000;

fn bad(msg: String) -> Error {
    Error::invalid(msg).with_hint(format!("Valid options: {}.", KEYS.join(", ")))
}

fn int_opt(m: &Map<String, Value>, k: &str, lo: i64, hi: i64) -> Result<Option<i64>> {
    let Some(v) = m.get(k) else { return Ok(None) };
    let Some(x) = v
        .as_i64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
    else {
        return Err(bad(format!("option \"{k}\" must be an integer, not {v}")));
    };
    if x < lo || x > hi {
        return Err(bad(format!(
            "option \"{k}\" = {x} is out of range {lo}..{hi}"
        )));
    }
    Ok(Some(x))
}

fn usize_opt(m: &Map<String, Value>, k: &str, lo: i64, hi: i64) -> Result<Option<usize>> {
    Ok(int_opt(m, k, lo, hi)?.map(|x| x as usize))
}

fn num_opt(m: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f64>> {
    let Some(v) = m.get(k) else { return Ok(None) };
    let Some(x) = v.as_f64() else {
        return Err(bad(format!("option \"{k}\" must be a number, not {v}")));
    };
    if !(x >= lo && x <= hi) {
        return Err(bad(format!(
            "option \"{k}\" = {x} is out of range {lo}..{hi}"
        )));
    }
    Ok(Some(x))
}

fn str_opt<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>> {
    let Some(v) = m.get(k) else { return Ok(None) };
    match v.as_str() {
        Some(s) => Ok(Some(s)),
        None => Err(bad(format!("option \"{k}\" must be a string, not {v}"))),
    }
}

/// Option `value_embedding`: how a gene token carries its value
/// ([`Config::value_embedding`], [`Config::value_per_gene`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueEmbedding {
    /// `false`: the published token, which keeps only the value's sign.
    Off,
    /// `true` or `"shared"`: one learned vector for every gene, times the value.
    Shared,
    /// `"per_gene"`: a learned vector per gene, times the value.
    PerGene,
}

fn value_embedding_opt(m: &Map<String, Value>) -> Result<Option<ValueEmbedding>> {
    let k = "value_embedding";
    let Some(v) = m.get(k) else { return Ok(None) };
    match (v.as_bool(), v.as_str()) {
        (Some(false), _) => Ok(Some(ValueEmbedding::Off)),
        (Some(true), _) | (_, Some("shared")) => Ok(Some(ValueEmbedding::Shared)),
        (_, Some("per_gene")) => Ok(Some(ValueEmbedding::PerGene)),
        _ => Err(bad(format!(
            "option \"{k}\" must be true, false, \"shared\" or \"per_gene\", not {v}"
        ))),
    }
}

/// A string option with two values: false for `first` (the default), true for `second`.
fn either(m: &Map<String, Value>, k: &str, first: &str, second: &str) -> Result<bool> {
    match str_opt(m, k)?.unwrap_or(first) {
        s if s == first => Ok(false),
        s if s == second => Ok(true),
        other => Err(bad(format!(
            "option \"{k}\" must be \"{first}\" or \"{second}\", not \"{other}\""
        ))),
    }
}

fn bool_opt(m: &Map<String, Value>, k: &str) -> Result<Option<bool>> {
    let Some(v) = m.get(k) else { return Ok(None) };
    match v.as_bool() {
        Some(b) => Ok(Some(b)),
        None => Err(bad(format!(
            "option \"{k}\" must be true or false, not {v}"
        ))),
    }
}

impl Options {
    /// Parse and range-check options (22023 for an unknown key, a wrong type or a value
    /// out of range); no preset defaults applied yet.
    pub fn parse(v: &Value) -> Result<Options> {
        let Some(m) = v.as_object() else {
            return Err(bad(format!("options must be a JSON object, not {v}")));
        };
        if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(bad(format!("unknown option \"{k}\"")));
        }
        if let Some(d) = num_opt(m, "dropout", 0.0, 1.0)? {
            if d != 0.0 {
                return Err(bad(format!("option \"dropout\" = {d} is not supported: exceiver trains without dropout, as the published models (dropout 0.0)")));
            }
        }
        let preset = str_opt(m, "preset")?.unwrap_or("published").to_string();
        if !matches!(preset.as_str(), "published" | "small") {
            return Err(bad(format!(
                "option \"preset\" must be \"published\" or \"small\", not \"{preset}\""
            )));
        }
        let attention = match str_opt(m, "attention")? {
            None => None,
            Some("reference") => Some(AttentionMode::Reference),
            Some("expressed_only") => Some(AttentionMode::ExpressedOnly),
            Some(other) => {
                return Err(bad(format!(
                "option \"attention\" must be \"reference\" or \"expressed_only\", not \"{other}\""
            )))
            }
        };
        let u = |k: &str, lo: i64, hi: i64| usize_opt(m, k, lo, hi);
        Ok(Options {
            seq_dim: u("seq_dim", 1, 1024)?,
            query_len: u("query_len", 1, 4096)?,
            query_dim: u("query_dim", 1, 1024)?,
            num_layers: u("num_layers", 0, 64)?,
            nhead: u("nhead", 1, 64)?,
            dim_feedforward: u("dim_feedforward", 1, 65536)?,
            set: (
                m.contains_key("learning_rate"),
                m.contains_key("warmup_steps"),
                m.contains_key("epochs"),
            ),
            learning_rate: num_opt(m, "learning_rate", 1e-12, 10.0)?.unwrap_or(3e-4),
            weight_decay: num_opt(m, "weight_decay", 0.0, 1.0)?.unwrap_or(1e-5),
            warmup_steps: int_opt(m, "warmup_steps", 0, 1_000_000_000)?.unwrap_or(500) as u64,
            batch_size: u("batch_size", 1, 65536)?.unwrap_or(64),
            frac: num_opt(m, "frac", 0.0, 1.0)?.unwrap_or(0.15),
            epochs: u("epochs", 0, 100_000)?.unwrap_or(10),
            val_fraction: num_opt(m, "val_fraction", 0.0, 0.9)?.unwrap_or(0.1),
            patience: u("patience", 1, 100_000)?.unwrap_or(3),
            seed: int_opt(m, "seed", 0, i64::MAX)?.unwrap_or(0) as u64,
            min_cells: int_opt(m, "min_cells", 1, i64::MAX)?.unwrap_or(3),
            n_top_genes: u("n_top_genes", 0, 1_000_000)?,
            max_cells: int_opt(m, "max_cells", 1, i64::MAX)?,
            attention,
            value_embedding: value_embedding_opt(m)?,
            standardize: bool_opt(m, "standardize")?,
            contrastive: num_opt(m, "contrastive", 0.0, 1000.0)?,
            contrastive_temperature: num_opt(m, "contrastive_temperature", 0.001, 100.0)?
                .unwrap_or(0.1),
            contrastive_keep: num_opt(m, "contrastive_keep", 0.01, 1.0)?,
            contrastive_depth: num_opt(m, "contrastive_depth", 0.01, 1.0)?,
            contrastive_head: u("contrastive_head", 0, 65536)?.unwrap_or(CONTRASTIVE_HEAD),
            contrastive_support: u("contrastive_support", 0, 65536)?.unwrap_or(0),
            contrastive_debias: num_opt(m, "contrastive_debias", 0.0, 0.49)?.unwrap_or(0.0),
            reconstruct: num_opt(m, "reconstruct", 0.0, 1000.0)?,
            reconstruct_rank: u("reconstruct_rank", 1, 4096)?.unwrap_or(RECONSTRUCT_RANK),
            profile_path: bool_opt(m, "profile_path")?,
            parent: str_opt(m, "parent")?.map(str::to_string),
            progress_every: int_opt(m, "progress_every", 1, i64::MAX)?.unwrap_or(50) as u64,
            label_fraction: num_opt(m, "label_fraction", 1e-6, 1.0)?.unwrap_or(1.0),
            init_random: either(m, "init", "pretrained", "random")?,
            class_readout: match m.get("class_readout") {
                None => None,
                Some(_) => Some(either(m, "class_readout", "token", "embedding")?),
            },
            cosine: either(m, "lr_schedule", "constant", "cosine")?,
            head_first: bool_opt(m, "head_first")?,
            preset,
        })
    }

    /// Options of `exceiver.train`: parsed, then the preset's defaults.
    pub fn for_train(v: &Value) -> Result<Options> {
        let mut o = Options::parse(v)?;
        for k in ["class_readout", "head_first"] {
            if v.get(k).is_some() {
                return Err(bad(format!("option \"{k}\" is for finetune: a model trained by exceiver.train has no class head")));
            }
        }
        if o.frac == 0.0 {
            return Err(bad("option \"frac\" = 0 is out of range 1e-9..1 for train: the model learns from masked genes (finetune accepts 0: the classifier alone)".to_string()));
        }
        o.apply_preset_defaults();
        if o.contrastive_support > 0 && o.contrastive_head == 0 {
            return Err(bad(format!(
                "option \"contrastive_support\" = {} needs the projection head (\"contrastive_head\" > 0): the support set holds its projections",
                o.contrastive_support
            )));
        }
        if o.reconstruct() > 0.0 && (o.contrastive_head == 0 || o.contrastive.unwrap_or(0.0) == 0.0)
        {
            return Err(bad(format!(
                "option \"reconstruct\" = {} needs the contrastive term (\"contrastive\" > 0) and its projection head (\"contrastive_head\" > 0): the decoder reads the views' embeddings",
                o.reconstruct()
            )));
        }
        if o.contrastive_debias > 0.0 && o.contrastive_head == 0 {
            return Err(bad(format!(
                "option \"contrastive_debias\" = {} needs the projection head (\"contrastive_head\" > 0)",
                o.contrastive_debias
            )));
        }
        Ok(o)
    }

    /// Options of `exceiver.finetune`: the shape, vocabulary and scaler come from the
    /// base model, and a classifier is trained on its labels, not contrastively.
    pub fn for_finetune(v: &Value) -> Result<Options> {
        let mut o = Options::parse(v)?;
        o.apply_finetune_defaults(v);
        for k in SHAPE_KEYS.iter().chain(&["parent"]) {
            if v.get(k).is_some() {
                return Err(bad(format!("option \"{k}\" cannot be used with finetune: the model's shape, vocabulary and scaler come from the base model")));
            }
        }
        for k in CONTRASTIVE_KEYS {
            if v.get(k).is_some() {
                return Err(bad(format!("option \"{k}\" cannot be used with finetune: a classifier is trained on its labels (masked-value MSE + cross-entropy); use it in exceiver.train")));
            }
        }
        Ok(o)
    }

    /// With `parent`, the shape, vocabulary and scaler come from the parent: refuse the
    /// options that would set them (`v`: the options as given).
    pub fn check_parent_keys(v: &Value) -> Result<()> {
        for k in SHAPE_KEYS {
            if v.get(k).is_some() {
                return Err(bad(format!("option \"{k}\" cannot be combined with \"parent\": the model's shape, vocabulary and scaler come from the parent")));
            }
        }
        Ok(())
    }

    /// The `small` preset trains from scratch in minutes on 2 cores, so where the user
    /// did not choose, it uses a larger learning rate (3e-3), a short warm-up (50 steps),
    /// expressed-genes-only attention and the value embedding. Measured on Kang
    /// (tests/train_kang.rs and examples/quality.rs): the reference's 3e-4 / 500 steps
    /// barely move a fresh model in minutes; 1e-2 is faster when it works but leaves
    /// some seeds on the per-gene-mean plateau for many epochs, 3e-3 escaped it within
    /// 2 epochs for every seed tried. Its values are log1p + 1 without the per-gene
    /// z-score (`standardize` false): z-scoring lets genes expressed in few cells
    /// dominate input and targets, and PBMC 3k kNN-15 rose from 0.69 to 0.75 after 3
    /// epochs without it (README, "Why unstandardised values and a projection head").
    /// Its new models have the profile path ([`crate::model::Config::profile`]): with
    /// it, 10 epochs on Kang gave PBMC 3k kNN-15 0.854 and AvgBIO 0.668 against 0.835
    /// and 0.619 without (README, "Why a profile path").
    /// The `published` preset keeps the reference's values.
    pub fn apply_preset_defaults(&mut self) {
        if self.preset == "small" && self.parent.is_none() {
            if !self.set.0 {
                self.learning_rate = 3e-3;
            }
            if !self.set.1 {
                self.warmup_steps = 50;
            }
            if !self.set.2 {
                self.epochs = 10;
            }
            self.attention.get_or_insert(AttentionMode::ExpressedOnly);
            self.value_embedding.get_or_insert(ValueEmbedding::Shared);
            self.n_top_genes.get_or_insert(SMALL_TOP_GENES);
            self.contrastive.get_or_insert(SMALL_CONTRASTIVE);
            self.contrastive_keep.get_or_insert(1.0);
            self.contrastive_depth.get_or_insert(SMALL_DEPTH);
            self.standardize.get_or_insert(false);
            self.profile_path.get_or_insert(true);
            if self.contrastive.unwrap_or(0.0) > 0.0 && self.contrastive_head > 0 {
                self.reconstruct.get_or_insert(SMALL_RECONSTRUCT);
            }
        }
    }

    /// The profile decoder's weight (default 0; see [`Options::apply_preset_defaults`]).
    pub fn reconstruct(&self) -> f64 {
        self.reconstruct.unwrap_or(0.0)
    }

    /// The fraction of its expressed genes a contrastive view keeps (default 0.5; the
    /// small preset's new models: 1, as they thin reads instead).
    pub fn keep(&self) -> f64 {
        self.contrastive_keep.unwrap_or(0.5)
    }

    /// The lowest fraction of its reads a contrastive view keeps (default 1: no thinning).
    pub fn depth(&self) -> f64 {
        self.contrastive_depth.unwrap_or(1.0)
    }

    /// Whether a classifier's head reads the cell embedding ([`Config::class_embedding`]):
    /// the caller's `class_readout`, else CLASS_DEFAULT.
    pub fn class_embedding(&self) -> bool {
        self.class_readout.unwrap_or(CLASS_DEFAULT)
    }

    /// Whether a classifier's head trains alone first: the caller's `head_first`, else
    /// HEAD_FIRST_DEFAULT.
    pub fn head_first(&self) -> bool {
        self.head_first.unwrap_or(HEAD_FIRST_DEFAULT)
    }

    /// `finetune`'s defaults where the caller did not choose (`v`: the options as
    /// given): the classifier alone on whole cells (`frac` 0, as `classify` sees them;
    /// with masked genes the classifier learns on inputs it never gets at inference:
    /// PBMC 3k held-out accuracy 0.60 with 16 of a median 107 genes masked, 0.80
    /// without), learning rate 1e-3 after 50 warm-up steps, and up to 100 epochs that
    /// early stopping (`patience` 5 on the validation cross-entropy) cuts short. The
    /// reference's settings (masked genes, 3e-4 after 500 warm-up steps, 10 epochs)
    /// gave 0.38 on the same PBMC 3k split, its cross-entropy still falling (README,
    /// "Fine-tuning a classifier").
    fn apply_finetune_defaults(&mut self, v: &Value) {
        let given = |k: &str| v.get(k).is_some();
        if !given("frac") {
            self.frac = 0.0;
        }
        if !self.set.0 {
            self.learning_rate = 1e-3;
        }
        if !self.set.1 {
            self.warmup_steps = 50;
        }
        if !self.set.2 {
            self.epochs = 100;
        }
        if !given("patience") {
            self.patience = 5;
        }
    }

    /// A new model's shape: the preset, then explicit options.
    pub fn config(&self, n_genes: usize) -> Result<Config> {
        let mut c = match self.preset.as_str() {
            "small" => Config::small(n_genes),
            _ => Config {
                seq_len: n_genes,
                ..Config::published_exceiver()
            },
        };
        if let Some(d) = self.seq_dim {
            c.seq_dim = d;
            c.query_dim = d;
        }
        if let Some(d) = self.query_dim {
            c.query_dim = d;
        }
        if let Some(x) = self.query_len {
            c.query_len = x;
        }
        if let Some(x) = self.num_layers {
            c.num_layers = x;
        }
        if let Some(x) = self.nhead {
            c.nhead = x;
        }
        if let Some(x) = self.dim_feedforward {
            c.dim_feedforward = x;
        }
        c.attention = self.attention.unwrap_or(AttentionMode::Reference);
        let ve = self.value_embedding.unwrap_or(ValueEmbedding::Off);
        c.value_embedding = ve != ValueEmbedding::Off;
        c.value_per_gene = ve == ValueEmbedding::PerGene;
        c.profile = self.profile_path.unwrap_or(false);
        c.num_classes = None;
        if c.seq_dim != c.query_dim {
            return Err(bad(format!(
                "seq_dim ({}) and query_dim ({}) must be equal",
                c.seq_dim, c.query_dim
            )));
        }
        c.validate()?;
        Ok(c)
    }

    /// The options as recorded in a model's metrics.
    pub fn to_json(&self) -> Value {
        let contrastive = self.contrastive.unwrap_or(0.0);
        json!({"preset": self.preset, "learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
               "warmup_steps": self.warmup_steps, "batch_size": self.batch_size, "frac": self.frac, "epochs": self.epochs,
               "val_fraction": self.val_fraction, "patience": self.patience, "seed": self.seed, "min_cells": self.min_cells,
               "n_top_genes": self.n_top_genes.unwrap_or(0),
               "standardize": if self.parent.is_some() { Value::Null } else { json!(self.standardize.unwrap_or(true)) },
               "contrastive": contrastive, "contrastive_temperature": self.contrastive_temperature,
               "contrastive_keep": self.keep(), "contrastive_depth": self.depth(),
               "contrastive_head": if contrastive > 0.0 { self.contrastive_head } else { 0 },
               "contrastive_support": if contrastive > 0.0 { self.contrastive_support } else { 0 },
               "contrastive_debias": if contrastive > 0.0 { self.contrastive_debias } else { 0.0 },
               "reconstruct": if contrastive > 0.0 { self.reconstruct() } else { 0.0 },
               "reconstruct_rank": if contrastive > 0.0 && self.reconstruct() > 0.0 { json!(self.reconstruct_rank) } else { Value::Null },
               "profile_path": if self.parent.is_some() { Value::Null } else { json!(self.profile_path.unwrap_or(false)) },
               "max_cells": self.max_cells, "parent": self.parent,
               "lr_schedule": if self.cosine { "cosine" } else { "constant" },
               "head_first": self.head_first()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_fill_only_what_was_not_chosen() {
        let o = Options::for_train(&json!({"preset": "small", "learning_rate": 1e-3})).unwrap();
        assert_eq!(o.learning_rate, 1e-3);
        assert_eq!(o.warmup_steps, 50);
        assert_eq!(o.n_top_genes, Some(SMALL_TOP_GENES));
        assert_eq!(o.contrastive, Some(SMALL_CONTRASTIVE));
        assert_eq!(o.attention, Some(AttentionMode::ExpressedOnly));
        assert_eq!((o.keep(), o.depth()), (1.0, SMALL_DEPTH));
        let h = Options::for_train(&json!({"preset": "small", "contrastive_keep": 0.5})).unwrap();
        assert_eq!((h.keep(), h.depth()), (0.5, SMALL_DEPTH));
        let p = Options::for_train(&json!({})).unwrap();
        assert_eq!(
            (p.learning_rate, p.warmup_steps, p.contrastive),
            (3e-4, 500, None)
        );
        assert_eq!((p.keep(), p.depth()), (0.5, 1.0));
        assert_eq!(p.config(100).unwrap().seq_len, 100);
        // the profile decoder: on for the small preset's new contrastive models with a
        // head, off without either, and refused where it was asked for without them
        assert_eq!((o.reconstruct(), p.reconstruct()), (SMALL_RECONSTRUCT, 0.0));
        for v in [
            json!({"preset": "small", "contrastive_head": 0}),
            json!({"preset": "small", "contrastive": 0}),
        ] {
            assert_eq!(Options::for_train(&v).unwrap().reconstruct(), 0.0);
        }
        let mut v = json!({"preset": "small", "contrastive_head": 0, "reconstruct": 5});
        assert!(Options::for_train(&v).is_err());
        v["contrastive_head"] = json!(16);
        assert_eq!(Options::for_train(&v).unwrap().reconstruct(), 5.0);
        assert!(Options::for_finetune(&json!({"reconstruct": 5})).is_err());
    }

    #[test]
    fn bad_options_name_the_key_and_the_range() {
        let msg = |v: Value| Options::for_train(&v).unwrap_err().message;
        assert_eq!(msg(json!({"epoch": 1})), "unknown option \"epoch\"");
        assert_eq!(
            msg(json!({"batch_size": 0})),
            "option \"batch_size\" = 0 is out of range 1..65536"
        );
        assert_eq!(
            msg(json!({"frac": "x"})),
            "option \"frac\" must be a number, not \"x\""
        );
        assert_eq!(
            msg(json!({"standardize": 1})),
            "option \"standardize\" must be true or false, not 1"
        );
        assert_eq!(msg(json!([])), "options must be a JSON object, not []");
        let e = Options::for_finetune(&json!({"contrastive": 1.0})).unwrap_err();
        assert!(e
            .message
            .starts_with("option \"contrastive\" cannot be used with finetune"));
        assert!(Options::check_parent_keys(&json!({"seq_dim": 8})).is_err());
        let e = Options::for_train(&json!({"seq_dim": 8, "query_dim": 16}))
            .unwrap()
            .config(10)
            .unwrap_err();
        assert_eq!(e.message, "seq_dim (8) and query_dim (16) must be equal");
    }

    #[test]
    fn finetune_defaults_train_the_classifier_on_whole_cells() {
        let o = Options::for_finetune(&json!({})).unwrap();
        assert_eq!(
            (
                o.frac,
                o.learning_rate,
                o.warmup_steps,
                o.epochs,
                o.patience
            ),
            (0.0, 1e-3, 50, 100, 5)
        );
        let o = Options::for_finetune(
            &json!({"frac": 0.15, "epochs": 3, "learning_rate": 3e-4, "patience": 2}),
        )
        .unwrap();
        assert_eq!(
            (o.frac, o.epochs, o.learning_rate, o.patience),
            (0.15, 3, 3e-4, 2)
        );
        // a plain model learns from masked genes: frac 0 is refused there
        let e = Options::for_train(&json!({"frac": 0})).unwrap_err();
        assert!(
            e.message.starts_with("option \"frac\" = 0"),
            "{}",
            e.message
        );
        assert_eq!(Options::for_train(&json!({})).unwrap().frac, 0.15);
    }

    #[test]
    fn head_first_is_a_finetune_option() {
        assert!(Options::for_finetune(&json!({"head_first": true}))
            .unwrap()
            .head_first());
        assert_eq!(
            Options::for_finetune(&json!({})).unwrap().head_first(),
            HEAD_FIRST_DEFAULT
        );
        let e = Options::for_finetune(&json!({"head_first": 1})).unwrap_err();
        assert_eq!(
            e.message,
            "option \"head_first\" must be true or false, not 1"
        );
        let e = Options::for_train(&json!({"head_first": true})).unwrap_err();
        assert!(e
            .message
            .starts_with("option \"head_first\" is for finetune"));
    }
}
