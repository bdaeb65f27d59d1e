//! The fast CPU forward pass: encoder cross-attention in O(expressed genes) per cell,
//! the post-norm process stack, the decoder and the heads.
//!
//! # The encoder in O(expressed genes)
//!
//! A gene token is `x·E[g]` (x its model input value). LayerNorm of a scaled vector
//! factors: with `u_g = E[g] − mean(E[g])` and `σ²_g = var(E[g])`,
//! `LN(x·E[g]) = c(x)·(u_g ∘ w) + b` where `c(x) = x / √(x²σ²_g + ε)`. So the key and
//! value are `c·K1[g] + K0` and `c·V1[g] + V0` with `K1 = Wk(u∘w)`, `K0 = Wk b + bk`
//! (the same for V). The `q·K0` part of a logit is the same for every key and cancels in
//! the softmax, and since the weights sum to 1 the value output is `V0 + Σ p·c·V1`.
//!
//! In the reference semantics every vocabulary gene is a key; a gene the cell does not
//! express has the fixed value `zero_fill[g]` and logit bias +1. Its term is the same
//! for every cell, so per (latent, head) the model keeps
//! `Z = Σ_g exp(s0_g + 1 − M0)` and `A = Σ_g exp(s0_g + 1 − M0)·c0_g·V1[g]` (f64), and a
//! cell only swaps the terms of its expressed genes:
//! `Zc = Z·e^{M0−m} − Σ_S exp(s0+1−m) + Σ_S exp(s−m)` (the same for `A`), with the
//! shift `m = max(M0, max_S s)` so that no exponential overflows.

use super::config::{AttentionMode, Config};
use super::kernels::{Kernels, LANES};
use super::nn::{self, LN_EPS};
use super::weights::Params;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::sync::OnceLock;

/// A ready-to-run Exceiver: config, weights, the zero-fill input values of the
/// vocabulary (from the scaler), and caches derived from them on first use.
///
/// `Send + Sync`: share one per process (e.g. behind an `Arc`) and call it from any
/// number of threads; each thread keeps its own scratch memory.
pub struct Exceiver {
    cfg: Config,
    params: Params,
    zero_fill: Vec<f32>,
    prep: OnceLock<Prep>,
    zero_sums: OnceLock<ZeroSums>,
}

impl std::fmt::Debug for Exceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exceiver")
            .field("config", &self.cfg)
            .field("parameters", &self.params.num_parameters(&self.cfg))
            .field("prepared", &self.prep.get().is_some())
            .finish()
    }
}

/// Per-model data derived from the weights.
#[derive(Debug)]
struct Prep {
    d: usize,
    /// cross-attention head count and width
    ch: usize,
    chd: usize,
    /// process head count and width
    ph: usize,
    phd: usize,
    /// latents, rounded up to LANES
    npad: usize,
    /// per embedding row: variance of E[r] over its d entries
    tok_var: Vec<f32>,
    /// per embedding row: K1 = Wk(u∘w), V1 = Wv(u∘w) (rows × d)
    k1: Vec<f32>,
    v1: Vec<f32>,
    /// with a value embedding u: Wk u and Wv u (a token with value x adds x·ku to
    /// its key and x·vu to its value), one row or one per embedding row; empty without
    ku: Vec<f32>,
    vu: Vec<f32>,
    /// V0 = Wv b_kv + bv
    enc_v0: Vec<f32>,
    /// encoder queries, scaled by 1/√chd, structure of arrays `[c·npad + i]`
    enc_q: Vec<f32>,
    layers: Vec<LayerPrep>,
}

#[derive(Debug)]
struct LayerPrep {
    /// linear1.weight transposed, padded, divided by √2: `[c·ffpad + j]`
    w1t: Vec<f32>,
    /// linear1.bias padded, divided by √2
    b1: Vec<f32>,
    /// linear2.weight padded, divided by √2: `[r·ffpad + j]`
    w2: Vec<f32>,
}

/// The zero-fill terms of the reference attention (depend on weights and zero_fill).
#[derive(Debug)]
struct ZeroSums {
    /// per gene g < G: c0_g·K1[g] and c0_g·V1[g], `[g·d + c]`
    t0: Vec<f32>,
    w0: Vec<f32>,
    /// per (head, latent) `[h·npad + i]`: M0 = max_g s0 + 1, and M0 − 1 (the shift
    /// of the bias-free logit s0)
    m0: Vec<f32>,
    m1: Vec<f32>,
    /// Z and A relative to M0: `z[h·npad + i]`, `a[c·npad + i]`
    z: Vec<f64>,
    a: Vec<f64>,
}

/// Scratch memory for one forward pass, reused across cells (one per thread).
#[derive(Debug, Default)]
pub struct Workspace {
    stamp: Vec<u32>,
    epoch: u32,
    tk: Vec<f32>,
    tv: Vec<f32>,
    t0k: Vec<f32>,
    t0v: Vec<f32>,
    m: Vec<f32>,
    z: Vec<f64>,
    a: Vec<f64>,
    z0: Vec<f64>,
    a0: Vec<f64>,
    x: Vec<f32>,
    xt: Vec<f32>,
    y: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ff: Vec<f32>,
    row: Vec<f32>,
    scratch: Vec<f32>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

fn with_ws<T>(f: impl FnOnce(&mut Workspace) -> T) -> T {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Workspace::default()),
    })
}

fn buf<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    let s = buf(v, n);
    s.fill(T::default());
    s
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// What one forward pass gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The cell embedding: processed latent flattened, `[d·i + c]`.
    pub embedding: Vec<f32>,
    /// Value predictions for the query genes.
    pub pred: Vec<f32>,
    /// Class logits (classifier only).
    pub class_logits: Option<Vec<f32>>,
}

impl Exceiver {
    /// A model from weights and the zero-fill values of the G vocabulary genes (the
    /// model input of a zero count, see [`crate::preprocess::Scaler::zero_fill`]).
    pub fn new(cfg: Config, params: Params, zero_fill: Vec<f32>) -> Result<Exceiver> {
        params.check(&cfg)?;
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
        Ok(Exceiver {
            cfg,
            params,
            zero_fill,
            prep: OnceLock::new(),
            zero_sums: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn zero_fill(&self) -> &[f32] {
        &self.zero_fill
    }

    /// Take the weights back (e.g. to continue training).
    pub fn into_parts(self) -> (Config, Params, Vec<f32>) {
        (self.cfg, self.params, self.zero_fill)
    }

    /// The same model with another attention mode.
    pub fn with_attention(self, mode: AttentionMode) -> Exceiver {
        let mut cfg = self.cfg;
        cfg.attention = mode;
        Exceiver {
            cfg,
            params: self.params,
            zero_fill: self.zero_fill,
            prep: self.prep,
            zero_sums: self.zero_sums,
        }
    }

    /// Length of a cell embedding (N·d).
    pub fn embedding_len(&self) -> usize {
        self.cfg.embedding_len()
    }

    /// Do the per-model precomputation now instead of on the first cell (~20 ms for
    /// the published model in the reference mode).
    pub fn warm_up(&self) {
        let p = self.prep();
        if self.cfg.attention == AttentionMode::Reference {
            self.zero_sums(p);
        }
    }

    /// Name of the kernel set in use ("avx512", "avx2" or "portable").
    pub fn kernel_name() -> &'static str {
        Kernels::get().name
    }

    fn prep(&self) -> &Prep {
        self.prep.get_or_init(|| Prep::new(&self.cfg, &self.params))
    }

    fn zero_sums(&self, p: &Prep) -> &ZeroSums {
        self.zero_sums
            .get_or_init(|| ZeroSums::new(&self.cfg, p, &self.zero_fill))
    }

    // ---------------------------------------------------------------- public API

    /// Encoder output (N·d floats, `[d·i + c]`) for a cell given as vocabulary indices
    /// of its expressed genes and their model input values (see
    /// [`crate::preprocess`]). Genes must be distinct; order does not matter.
    pub fn encode(&self, genes: &[u32], values: &[f32]) -> Result<Vec<f32>> {
        self.encode_tokens(genes, None, values)
    }

    /// As [`Exceiver::encode`], with the embedding row fed for each entry given
    /// separately: `tokens[n]` is normally `genes[n]`, or the mask token G for a gene
    /// masked in training (whose value is then 1.0, as the reference does).
    pub fn encode_tokens(
        &self,
        genes: &[u32],
        tokens: Option<&[u32]>,
        values: &[f32],
    ) -> Result<Vec<f32>> {
        with_ws(|ws| {
            self.run_encoder(ws, genes, tokens, values)?;
            Ok(ws.x[..self.embedding_len()].to_vec())
        })
    }

    /// The process stack applied to a latent (N·d floats); returns the output of every
    /// layer (the last one is the processed latent).
    pub fn process(&self, latent: &[f32]) -> Result<Vec<Vec<f32>>> {
        let nd = self.embedding_len();
        if latent.len() != nd {
            return Err(Error::shape(format!(
                "latent has {} values, the model needs {nd}",
                latent.len()
            )));
        }
        with_ws(|ws| {
            buf(&mut ws.x, nd).copy_from_slice(latent);
            self.rows_to_soa(ws);
            let mut outs = Vec::with_capacity(self.cfg.num_layers);
            for l in 0..self.cfg.num_layers {
                self.run_layer(ws, l);
                self.soa_to_rows(ws);
                outs.push(ws.x[..nd].to_vec());
            }
            Ok(outs)
        })
    }

    /// The cell embedding (processed latent flattened, N·d floats, `[d·i + c]`).
    pub fn embed(&self, genes: &[u32], values: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.embedding_len()];
        self.embed_into(genes, values, &mut out)?;
        Ok(out)
    }

    /// [`Exceiver::embed`] into a caller's buffer of N·d floats.
    pub fn embed_into(&self, genes: &[u32], values: &[f32], out: &mut [f32]) -> Result<()> {
        let nd = self.embedding_len();
        if out.len() != nd {
            return Err(Error::shape(format!(
                "output buffer has {} floats, the embedding has {nd}",
                out.len()
            )));
        }
        with_ws(|ws| {
            self.run_embed(ws, genes, None, values)?;
            out.copy_from_slice(&ws.x[..nd]);
            Ok(())
        })
    }

    /// Embeddings of many cells on `threads` threads (0: all cores), concatenated.
    /// Fails with the first bad cell's error, prefixed by its position.
    pub fn embed_batch(&self, cells: &[(&[u32], &[f32])], threads: usize) -> Result<Vec<f32>> {
        let nd = self.embedding_len();
        let mut out = vec![0.0f32; cells.len() * nd];
        if cells.is_empty() {
            return Ok(out);
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        }
        .min(cells.len());
        self.warm_up();
        let per = cells.len().div_ceil(threads);
        // the calling thread takes the host's interrupts meanwhile; a cancel stops
        // every thread after its current cell
        let jobs: Vec<_> = out
            .chunks_mut(per * nd)
            .zip(cells.chunks(per))
            .enumerate()
            .map(|(t, (o, cs))| {
                move |stop: &std::sync::atomic::AtomicBool| -> Result<()> {
                    for (k, (g, v)) in cs.iter().enumerate() {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return Err(Error::internal("embedding stopped"));
                        }
                        self.embed_into(g, v, &mut o[k * nd..(k + 1) * nd])
                            .map_err(|e| e.context(format!("cell {}", t * per + k)))?;
                    }
                    Ok(())
                }
            })
            .collect();
        let results = crate::limits::run_workers(jobs)
            .into_iter()
            .map(|r| r.unwrap_or_else(|_| Err(Error::internal("embedding thread panicked"))));
        for r in results {
            r?;
        }
        Ok(out)
    }

    /// Decoder output (Q·d) for a processed latent and query gene ids (any embedding
    /// rows, including the class token G + 1 of a classifier).
    pub fn decode(&self, latent: &[f32], query_rows: &[u32]) -> Result<Vec<f32>> {
        let nd = self.embedding_len();
        if latent.len() != nd {
            return Err(Error::shape(format!(
                "latent has {} values, the model needs {nd}",
                latent.len()
            )));
        }
        let rows = self.cfg.emb_rows();
        if let Some(p) = query_rows.iter().position(|&q| q as usize >= rows) {
            return Err(Error::invalid(format!(
                "query row {} at position {p} is out of range for {rows} embedding rows",
                query_rows[p]
            )));
        }
        with_ws(|ws| {
            buf(&mut ws.x, nd).copy_from_slice(latent);
            let d = self.cfg.seq_dim;
            let mut out = vec![0.0; query_rows.len() * d];
            self.run_decoder(ws, query_rows, &mut out);
            Ok(out)
        })
    }

    /// Predicted model input values of the genes `query_ids` (vocabulary indices) for
    /// a cell, from the decoder and value head.
    pub fn predict(&self, genes: &[u32], values: &[f32], query_ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .forward_tokens(genes, None, values, query_ids, false)?
            .pred)
    }

    /// Class logits of a classifier for a cell (error for a plain Exceiver).
    pub fn classify_logits(&self, genes: &[u32], values: &[f32]) -> Result<Vec<f32>> {
        if self.cfg.num_classes.is_none() {
            return Err(Error::invalid(
                "the model is not a classifier (it has no class head)",
            ));
        }
        let o = self.forward_tokens(genes, None, values, &[], true)?;
        o.class_logits
            .ok_or_else(|| Error::internal("classifier produced no logits"))
    }

    /// Embedding, value predictions for `query_ids` and (for a classifier) class
    /// logits, in one pass.
    pub fn forward(&self, genes: &[u32], values: &[f32], query_ids: &[u32]) -> Result<Output> {
        self.forward_tokens(genes, None, values, query_ids, true)
    }

    /// [`Exceiver::forward`] with separate embedding rows per entry (see
    /// [`Exceiver::encode_tokens`]); `with_class` adds the class row for a classifier.
    pub fn forward_tokens(
        &self,
        genes: &[u32],
        tokens: Option<&[u32]>,
        values: &[f32],
        query_ids: &[u32],
        with_class: bool,
    ) -> Result<Output> {
        let g = self.cfg.seq_len;
        if let Some(p) = query_ids.iter().position(|&q| q as usize >= g) {
            return Err(Error::invalid(format!(
                "query gene index {} at position {p} is out of range for a vocabulary of {g} genes",
                query_ids[p]
            )));
        }
        let d = self.cfg.seq_dim;
        let nd = self.embedding_len();
        with_ws(|ws| {
            self.run_embed(ws, genes, tokens, values)?;
            let embedding = ws.x[..nd].to_vec();
            let mut rows: Vec<u32> = query_ids.to_vec();
            let class = with_class && self.params.class_head.is_some();
            let class_row = class && self.cfg.class_token();
            if class_row {
                rows.push((g + 1) as u32);
            }
            let mut dec = vec![0.0; rows.len() * d];
            self.run_decoder(ws, &rows, &mut dec);
            let mut tmp =
                vec![0.0; self.cfg.class_in().max(d) + self.cfg.num_classes.unwrap_or(1).max(1)];
            let mut pred = vec![0.0; query_ids.len()];
            for (qi, p) in pred.iter_mut().enumerate() {
                let mut o = [0.0f32];
                nn::head(
                    &self.params.value_head,
                    &dec[qi * d..(qi + 1) * d],
                    &mut o,
                    &mut tmp,
                );
                *p = o[0];
            }
            let class_logits = match (&self.params.class_head, class) {
                (Some(h), true) => {
                    let mut o = vec![0.0; h.linear2.out_dim];
                    let r = query_ids.len();
                    let input = if class_row {
                        &dec[r * d..(r + 1) * d]
                    } else {
                        &embedding[..]
                    };
                    nn::head(h, input, &mut o, &mut tmp);
                    Some(o)
                }
                _ => None,
            };
            Ok(Output {
                embedding,
                pred,
                class_logits,
            })
        })
    }

    // ---------------------------------------------------------------- internals

    fn check_cell(
        &self,
        ws: &mut Workspace,
        genes: &[u32],
        tokens: Option<&[u32]>,
        values: &[f32],
    ) -> Result<()> {
        let g = self.cfg.seq_len;
        if genes.len() != values.len() {
            return Err(Error::shape(format!(
                "a cell has {} gene indices but {} values",
                genes.len(),
                values.len()
            )));
        }
        if let Some(t) = tokens {
            if t.len() != genes.len() {
                return Err(Error::shape(format!(
                    "a cell has {} gene indices but {} tokens",
                    genes.len(),
                    t.len()
                )));
            }
            let rows = self.cfg.emb_rows();
            if let Some(p) = t.iter().position(|&r| r as usize >= rows) {
                return Err(Error::invalid(format!(
                    "token {} at position {p} is out of range for {rows} embedding rows",
                    t[p]
                )));
            }
        }
        if genes.is_empty() && self.cfg.attention == AttentionMode::ExpressedOnly {
            return Err(Error::invalid(
                "a cell needs at least one expressed gene when the encoder attends to expressed genes only",
            ));
        }
        if ws.stamp.len() != g {
            ws.stamp = vec![0; g];
            ws.epoch = 0;
        }
        ws.epoch = ws.epoch.wrapping_add(1);
        if ws.epoch == 0 {
            ws.stamp.fill(0);
            ws.epoch = 1;
        }
        let e = ws.epoch;
        for (p, (&gi, &v)) in genes.iter().zip(values).enumerate() {
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
        Ok(())
    }

    fn run_embed(
        &self,
        ws: &mut Workspace,
        genes: &[u32],
        tokens: Option<&[u32]>,
        values: &[f32],
    ) -> Result<()> {
        self.run_encoder(ws, genes, tokens, values)?;
        self.rows_to_soa(ws);
        for l in 0..self.cfg.num_layers {
            self.run_layer(ws, l);
        }
        self.soa_to_rows(ws);
        Ok(())
    }

    /// Encoder: leaves the latent (N·d) in `ws.x`.
    fn run_encoder(
        &self,
        ws: &mut Workspace,
        genes: &[u32],
        tokens: Option<&[u32]>,
        values: &[f32],
    ) -> Result<()> {
        self.check_cell(ws, genes, tokens, values)?;
        let p = self.prep();
        let kern = Kernels::get();
        let reference = self.cfg.attention == AttentionMode::Reference;
        let zs = if reference {
            Some(self.zero_sums(p))
        } else {
            None
        };
        let (d, ch, chd, npad) = (p.d, p.ch, p.chd, p.npad);
        let n = self.cfg.query_len;
        let nnz = genes.len();

        // Per-entry keys and values, structure of arrays [c·nnz + e].
        let tk = buf(&mut ws.tk, d * nnz);
        let tv = buf(&mut ws.tv, d * nnz);
        for e in 0..nnz {
            let row = tokens.map_or(genes[e], |t| t[e]) as usize;
            let x = values[e];
            let c = x / (x * x * p.tok_var[row] + LN_EPS).sqrt();
            for cc in 0..d {
                tk[cc * nnz + e] = c * p.k1[row * d + cc];
                tv[cc * nnz + e] = c * p.v1[row * d + cc];
            }
            if let Some((ku, vu)) = p.value_rows(row) {
                for cc in 0..d {
                    tk[cc * nnz + e] += x * ku[cc];
                    tv[cc * nnz + e] += x * vu[cc];
                }
            }
        }
        let (t0k, t0v) = if let Some(zs) = zs {
            let t0k = buf(&mut ws.t0k, d * nnz);
            let t0v = buf(&mut ws.t0v, d * nnz);
            for (e, &gi) in genes.iter().enumerate() {
                let gi = gi as usize;
                for cc in 0..d {
                    t0k[cc * nnz + e] = zs.t0[gi * d + cc];
                    t0v[cc * nnz + e] = zs.w0[gi * d + cc];
                }
            }
            (&*t0k, &*t0v)
        } else {
            (&[][..], &[][..])
        };

        // Shifts m[h·npad + i] = max over this cell's logits (and M0).
        let m = buf(&mut ws.m, ch * npad);
        for h in 0..ch {
            let mh = &mut m[h * npad..(h + 1) * npad];
            match zs {
                Some(zs) => mh.copy_from_slice(&zs.m0[h * npad..(h + 1) * npad]),
                None => mh.fill(f32::NEG_INFINITY),
            }
            let q = &p.enc_q[h * chd * npad..(h + 1) * chd * npad];
            let keys = &tk[h * chd * nnz..(h + 1) * chd * nnz];
            max_logits(chd, q, npad, keys, nnz, mh);
            for v in mh[n..].iter_mut() {
                *v = 0.0;
            }
        }
        let z = zeroed(&mut ws.z, ch * npad);
        let a = zeroed(&mut ws.a, d * npad);
        let scratch = buf(&mut ws.scratch, 2 * (d + 1) * LANES);
        for h in 0..ch {
            let q = &p.enc_q[h * chd * npad..(h + 1) * chd * npad];
            let mh = &m[h * npad..(h + 1) * npad];
            let zh = &mut z[h * npad..(h + 1) * npad];
            let ah = &mut a[h * chd * npad..(h + 1) * chd * npad];
            let keys = &tk[h * chd * nnz..(h + 1) * chd * nnz];
            let vals = &tv[h * chd * nnz..(h + 1) * chd * nnz];
            if chd == 1 {
                kern.attn_h1(q, mh, keys, vals, zh, ah);
            } else {
                kern.attn_gen(chd, q, mh, keys, vals, zh, ah, scratch);
            }
        }
        let o = buf(&mut ws.y, n * d);
        if let Some(zs) = zs {
            // The zero-fill terms (logit + 1) of the expressed genes, computed exactly as
            // in the precomputed sums (same shift M0, same kernel, f64 sums), so that
            // subtracting them leaves no cancellation error.
            let z0 = zeroed(&mut ws.z0, ch * npad);
            let a0 = zeroed(&mut ws.a0, d * npad);
            for h in 0..ch {
                let q = &p.enc_q[h * chd * npad..(h + 1) * chd * npad];
                let mh = &zs.m1[h * npad..(h + 1) * npad];
                let zh = &mut z0[h * npad..(h + 1) * npad];
                let ah = &mut a0[h * chd * npad..(h + 1) * chd * npad];
                let keys = &t0k[h * chd * nnz..(h + 1) * chd * nnz];
                let vals = &t0v[h * chd * nnz..(h + 1) * chd * nnz];
                if chd == 1 {
                    kern.attn_h1_exact(q, mh, keys, vals, zh, ah);
                } else {
                    kern.attn_gen_exact(chd, q, mh, keys, vals, zh, ah, scratch);
                }
            }
            for h in 0..ch {
                for i in 0..n {
                    let hi = h * npad + i;
                    let scale = ((zs.m0[hi] - m[hi]) as f64).exp();
                    let zc = (zs.z[hi] - z0[hi]) * scale + z[hi];
                    for j in 0..chd {
                        let c = h * chd + j;
                        let ci = c * npad + i;
                        let ac = (zs.a[ci] - a0[ci]) * scale + a[ci];
                        o[i * d + c] = p.enc_v0[c] + (ac / zc) as f32;
                    }
                }
            }
        } else {
            for h in 0..ch {
                for i in 0..n {
                    let zc = z[h * npad + i];
                    for j in 0..chd {
                        let c = h * chd + j;
                        o[i * d + c] = p.enc_v0[c] + (a[c * npad + i] / zc) as f32;
                    }
                }
            }
        }
        let x = buf(&mut ws.x, n * d);
        let tmp = buf(&mut ws.row, 4 * d);
        self.encoder_output(o, x, tmp, (genes, tokens, values));
        Ok(())
    }

    /// The encoder's latent `x` (N·d) from its attention output `o`: out_proj, the
    /// residual on the un-normalised query, the MLP with its residual, then the profile
    /// path's sum over the cell's unmasked genes.
    fn encoder_output(
        &self,
        o: &[f32],
        x: &mut [f32],
        tmp: &mut [f32],
        (genes, tokens, values): (&[u32], Option<&[u32]>, &[f32]),
    ) {
        let enc = &self.params.encoder;
        let d = self.cfg.seq_dim;
        let n = self.cfg.query_len;
        for i in 0..n {
            let xi = &mut x[i * d..(i + 1) * d];
            nn::linear(&enc.attn.out_proj, &o[i * d..(i + 1) * d], xi);
            for (v, q0) in xi
                .iter_mut()
                .zip(&self.params.query_emb[i * d..(i + 1) * d])
            {
                *v += *q0;
            }
            nn::cross_mlp(enc, xi, tmp);
        }
        if self.cfg.profile {
            add_profile(
                &self.params.profile,
                &self.zero_fill,
                genes,
                tokens,
                values,
                &mut x[..n * d],
            );
        }
    }

    /// One post-norm Transformer encoder layer, in place on the latent in `ws.xt`
    /// (structure of arrays, `[c·N + i]`, so that the small per-latent maps
    /// vectorise over latents).
    fn run_layer(&self, ws: &mut Workspace, l: usize) {
        let p = self.prep();
        let kern = Kernels::get();
        let lp = &self.params.layers[l];
        let lprep = &p.layers[l];
        let (d, ph, phd, npad) = (p.d, p.ph, p.phd, p.npad);
        let n = self.cfg.query_len;
        let x = buf(&mut ws.xt, d * n);
        // q (scaled, padded with zeros), k, v
        let q = zeroed(&mut ws.q, d * npad);
        let k = buf(&mut ws.k, d * n);
        let v = buf(&mut ws.v, d * n);
        let w = &lp.self_attn.in_proj_weight;
        let b = &lp.self_attn.in_proj_bias;
        let scale = 1.0 / (phd as f32).sqrt();
        soa_affine(&w[..d * d], &b[..d], d, x, n, q, npad, scale);
        soa_affine(&w[d * d..2 * d * d], &b[d..2 * d], d, x, n, k, n, 1.0);
        soa_affine(&w[2 * d * d..], &b[2 * d..], d, x, n, v, n, 1.0);
        let m = buf(&mut ws.m, ph * npad);
        for h in 0..ph {
            let mh = &mut m[h * npad..(h + 1) * npad];
            mh.fill(f32::NEG_INFINITY);
            max_logits(
                phd,
                &q[h * phd * npad..(h + 1) * phd * npad],
                npad,
                &k[h * phd * n..(h + 1) * phd * n],
                n,
                mh,
            );
            for v in mh[n..].iter_mut() {
                *v = 0.0;
            }
        }
        let z = zeroed(&mut ws.z, ph * npad);
        let a = zeroed(&mut ws.a, d * npad);
        let scratch = buf(&mut ws.scratch, 2 * (d + 1) * LANES);
        for h in 0..ph {
            let qh = &q[h * phd * npad..(h + 1) * phd * npad];
            let mh = &m[h * npad..(h + 1) * npad];
            let kh = &k[h * phd * n..(h + 1) * phd * n];
            let vh = &v[h * phd * n..(h + 1) * phd * n];
            let zh = &mut z[h * npad..(h + 1) * npad];
            let ah = &mut a[h * phd * npad..(h + 1) * phd * npad];
            if phd == 1 {
                kern.attn_h1(qh, mh, kh, vh, zh, ah);
            } else {
                kern.attn_gen(phd, qh, mh, kh, vh, zh, ah, scratch);
            }
        }
        // x = LN1(x + out_proj(o)), o = a / z (reusing q's memory for o)
        let o = &mut q[..d * n];
        for c in 0..d {
            let h = c / phd;
            let (ac, zh, oc) = (
                &a[c * npad..c * npad + n],
                &z[h * npad..h * npad + n],
                &mut o[c * n..(c + 1) * n],
            );
            for i in 0..n {
                oc[i] = (ac[i] / zh[i]) as f32;
            }
        }
        let sa = k; // k is no longer needed
        let op = &lp.self_attn.out_proj;
        soa_affine(&op.weight, &op.bias, d, o, n, sa, n, 1.0);
        for (xv, sv) in x.iter_mut().zip(sa.iter()) {
            *xv += *sv;
        }
        let (mean, rstd) = buf(&mut ws.row, 2 * n).split_at_mut(n);
        soa_layer_norm(&lp.norm1, x, n, mean, rstd);
        // x = LN2(x + linear2(GELU(linear1(x))))
        let ff = buf(&mut ws.ff, d * n);
        if d == 4 {
            kern.ffn_d4(x, &lprep.w1t, &lprep.b1, &lprep.w2, ff);
        } else {
            kern.ffn_gen(d, x, &lprep.w1t, &lprep.b1, &lprep.w2, ff, scratch);
        }
        for c in 0..d {
            let b2 = lp.linear2.bias[c];
            for (xv, fv) in x[c * n..(c + 1) * n]
                .iter_mut()
                .zip(&ff[c * n..(c + 1) * n])
            {
                *xv += *fv + b2;
            }
        }
        soa_layer_norm(&lp.norm2, x, n, mean, rstd);
    }

    /// Row-major latent `ws.x` → structure of arrays `ws.xt`.
    fn rows_to_soa(&self, ws: &mut Workspace) {
        let (d, n) = (self.cfg.seq_dim, self.cfg.query_len);
        let xt = buf(&mut ws.xt, d * n);
        for i in 0..n {
            for c in 0..d {
                xt[c * n + i] = ws.x[i * d + c];
            }
        }
    }

    /// Structure of arrays `ws.xt` → row-major latent `ws.x`.
    fn soa_to_rows(&self, ws: &mut Workspace) {
        let (d, n) = (self.cfg.seq_dim, self.cfg.query_len);
        let x = buf(&mut ws.x, d * n);
        for i in 0..n {
            for c in 0..d {
                x[i * d + c] = ws.xt[c * n + i];
            }
        }
    }

    /// Decoder cross-attention: queries = embedding rows `rows`, keys/values = the
    /// latent in `ws.x`; writes rows.len()·d floats to `out`.
    fn run_decoder(&self, ws: &mut Workspace, rows: &[u32], out: &mut [f32]) {
        let p = self.prep();
        let kern = Kernels::get();
        let dec = &self.params.decoder;
        let (d, ch, chd) = (p.d, p.ch, p.chd);
        let n = self.cfg.query_len;
        let nq = rows.len();
        if nq == 0 {
            return;
        }
        let qpad = round_up(nq, LANES);
        let x = &ws.x[..n * d];
        // keys / values from the latent
        let k = buf(&mut ws.k, d * n);
        let v = buf(&mut ws.v, d * n);
        let tmp = buf(&mut ws.row, 4 * d);
        let (kn, rest) = tmp.split_at_mut(d);
        let (r1, _) = rest.split_at_mut(d);
        let w = &dec.attn.in_proj_weight;
        let b = &dec.attn.in_proj_bias;
        for i in 0..n {
            nn::layer_norm(&dec.layernorm_kv, &x[i * d..(i + 1) * d], kn);
            nn::linear_rows(&w[d * d..2 * d * d], &b[d..2 * d], d, kn, r1);
            for c in 0..d {
                k[c * n + i] = r1[c];
            }
            nn::linear_rows(&w[2 * d * d..3 * d * d], &b[2 * d..3 * d], d, kn, r1);
            for c in 0..d {
                v[c * n + i] = r1[c];
            }
        }
        let scale = 1.0 / (chd as f32).sqrt();
        let q = zeroed(&mut ws.q, d * qpad);
        let emb = &self.params.gene_emb;
        for (qi, &r) in rows.iter().enumerate() {
            let e = &emb[r as usize * d..(r as usize + 1) * d];
            nn::layer_norm(&dec.layernorm_q, e, kn);
            nn::linear_rows(&w[..d * d], &b[..d], d, kn, r1);
            for c in 0..d {
                q[c * qpad + qi] = r1[c] * scale;
            }
        }
        let m = buf(&mut ws.m, ch * qpad);
        for h in 0..ch {
            let mh = &mut m[h * qpad..(h + 1) * qpad];
            mh.fill(f32::NEG_INFINITY);
            max_logits(
                chd,
                &q[h * chd * qpad..(h + 1) * chd * qpad],
                qpad,
                &k[h * chd * n..(h + 1) * chd * n],
                n,
                mh,
            );
            for v in mh[nq..].iter_mut() {
                *v = 0.0;
            }
        }
        let z = zeroed(&mut ws.z, ch * qpad);
        let a = zeroed(&mut ws.a, d * qpad);
        let scratch = buf(&mut ws.scratch, 2 * (d + 1) * LANES);
        for h in 0..ch {
            let qh = &q[h * chd * qpad..(h + 1) * chd * qpad];
            let mh = &m[h * qpad..(h + 1) * qpad];
            let kh = &k[h * chd * n..(h + 1) * chd * n];
            let vh = &v[h * chd * n..(h + 1) * chd * n];
            let zh = &mut z[h * qpad..(h + 1) * qpad];
            let ah = &mut a[h * chd * qpad..(h + 1) * chd * qpad];
            if chd == 1 {
                kern.attn_h1(qh, mh, kh, vh, zh, ah);
            } else {
                kern.attn_gen(chd, qh, mh, kh, vh, zh, ah, scratch);
            }
        }
        let tmp = buf(&mut ws.row, 4 * d);
        let (o, rest) = tmp.split_at_mut(d);
        for (qi, &r) in rows.iter().enumerate() {
            for h in 0..ch {
                let zi = z[h * qpad + qi];
                for j in 0..chd {
                    let c = h * chd + j;
                    o[c] = (a[c * qpad + qi] / zi) as f32;
                }
            }
            let oi = &mut out[qi * d..(qi + 1) * d];
            nn::linear(&dec.attn.out_proj, o, oi);
            let e = &emb[r as usize * d..(r as usize + 1) * d];
            for c in 0..d {
                oi[c] += e[c];
            }
            nn::cross_mlp(dec, oi, rest);
        }
    }
}

/// The profile path ([`Config::profile`]): `out += Σ_e (values[e] − zero_fill[g_e]) ·
/// table[g_e]` over the entries whose token is their gene (a masked gene, fed as the
/// mask token, is left out); `table` is `[G, out.len()]`.
pub(crate) fn add_profile(
    table: &[f32],
    zero_fill: &[f32],
    genes: &[u32],
    tokens: Option<&[u32]>,
    values: &[f32],
    out: &mut [f32],
) {
    let w = out.len();
    for (e, &g) in genes.iter().enumerate() {
        if tokens.is_some_and(|t| t[e] != g) {
            continue;
        }
        let g = g as usize;
        let x = values[e] - zero_fill[g];
        if x == 0.0 {
            continue;
        }
        for (o, &t) in out.iter_mut().zip(&table[g * w..(g + 1) * w]) {
            *o += x * t;
        }
    }
}

/// Structure-of-arrays affine map: `out[r·stride + i] = scale·(b[r] + Σ_c w[r·d_in + c]·x[c·n + i])`
/// for r < b.len(), i < n.
#[allow(clippy::too_many_arguments)]
fn soa_affine(
    w: &[f32],
    b: &[f32],
    d_in: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    stride: usize,
    scale: f32,
) {
    for (r, &br) in b.iter().enumerate() {
        let o = &mut out[r * stride..r * stride + n];
        o.fill(br);
        for c in 0..d_in {
            let wrc = w[r * d_in + c];
            for (ov, xv) in o.iter_mut().zip(&x[c * n..(c + 1) * n]) {
                *ov += wrc * *xv;
            }
        }
        if scale != 1.0 {
            o.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

/// LayerNorm of every latent of a structure-of-arrays latent `x[c·n + i]`.
fn soa_layer_norm(
    ln: &super::weights::LayerNorm,
    x: &mut [f32],
    n: usize,
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let d = ln.weight.len();
    let inv_d = 1.0 / d as f32;
    mean.fill(0.0);
    for c in 0..d {
        for (m, xv) in mean.iter_mut().zip(&x[c * n..(c + 1) * n]) {
            *m += *xv;
        }
    }
    mean.iter_mut().for_each(|m| *m *= inv_d);
    rstd.fill(0.0);
    for c in 0..d {
        for ((r, m), xv) in rstd.iter_mut().zip(mean.iter()).zip(&x[c * n..(c + 1) * n]) {
            let t = *xv - *m;
            *r += t * t;
        }
    }
    rstd.iter_mut()
        .for_each(|r| *r = 1.0 / (*r * inv_d + LN_EPS).sqrt());
    for c in 0..d {
        let (w, b) = (ln.weight[c], ln.bias[c]);
        for ((xv, m), r) in x[c * n..(c + 1) * n]
            .iter_mut()
            .zip(mean.iter())
            .zip(rstd.iter())
        {
            *xv = (*xv - *m) * *r * w + b;
        }
    }
}

/// `m[i] = max(m[i], max_n Σ_j q[j·nq + i]·k[j·nk + n])` for i < nq.
fn max_logits(hd: usize, q: &[f32], nq: usize, k: &[f32], nk: usize, m: &mut [f32]) {
    if nk == 0 {
        return;
    }
    if hd == 1 {
        // The maximum of q·k over keys is q·max(k) or q·min(k).
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &kv in &k[..nk] {
            lo = lo.min(kv);
            hi = hi.max(kv);
        }
        for i in 0..nq {
            let qi = q[i];
            let s = if qi >= 0.0 { qi * hi } else { qi * lo };
            if s > m[i] {
                m[i] = s;
            }
        }
        return;
    }
    Kernels::get().max_logits(hd, &q[..hd * nq], &k[..hd * nk], &mut m[..nq]);
}

impl Prep {
    /// The key and value terms of the value embedding for embedding row `row` (the
    /// shared ones without [`Config::value_per_gene`]); `None` without a value
    /// embedding.
    fn value_rows(&self, row: usize) -> Option<(&[f32], &[f32])> {
        let d = self.d;
        let r = match self.ku.len() / d {
            0 => return None,
            1 => 0,
            _ => row,
        };
        Some((&self.ku[r * d..(r + 1) * d], &self.vu[r * d..(r + 1) * d]))
    }

    fn new(cfg: &Config, params: &Params) -> Prep {
        let d = cfg.seq_dim;
        let ch = cfg.cross_heads;
        let chd = d / ch;
        let ph = cfg.nhead;
        let phd = d / ph;
        let n = cfg.query_len;
        let npad = round_up(n, LANES);
        let rows = cfg.emb_rows();
        let enc = &params.encoder;
        let w = &enc.attn.in_proj_weight;
        let b = &enc.attn.in_proj_bias;
        let lnw = &enc.layernorm_kv.weight;
        let lnb = &enc.layernorm_kv.bias;
        let mut tok_var = vec![0.0f32; rows];
        let mut k1 = vec![0.0f32; rows * d];
        let mut v1 = vec![0.0f32; rows * d];
        let mut uw = vec![0.0f32; d];
        for r in 0..rows {
            let e = &params.gene_emb[r * d..(r + 1) * d];
            let mean = e.iter().sum::<f32>() / d as f32;
            let var = e.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d as f32;
            tok_var[r] = var;
            for c in 0..d {
                uw[c] = (e[c] - mean) * lnw[c];
            }
            for c in 0..d {
                let (mut sk, mut sv) = (0.0f32, 0.0f32);
                for cc in 0..d {
                    sk += w[(d + c) * d + cc] * uw[cc];
                    sv += w[(2 * d + c) * d + cc] * uw[cc];
                }
                k1[r * d + c] = sk;
                v1[r * d + c] = sv;
            }
        }
        // value embedding: the key/value projections of u (no bias; the bias is in
        // the per-model constants), scaled by each token's value in the encoder
        // (one row shared by every gene, or one per embedding row)
        let (mut ku, mut vu) = (Vec::new(), Vec::new());
        for u in params.value_emb.chunks_exact(d) {
            for c in 0..d {
                let (mut sk, mut sv) = (0.0f32, 0.0f32);
                for cc in 0..d {
                    sk += w[(d + c) * d + cc] * u[cc];
                    sv += w[(2 * d + c) * d + cc] * u[cc];
                }
                ku.push(sk);
                vu.push(sv);
            }
        }
        let mut enc_v0 = vec![0.0f32; d];
        for c in 0..d {
            let mut s = b[2 * d + c];
            for cc in 0..d {
                s += w[(2 * d + c) * d + cc] * lnb[cc];
            }
            enc_v0[c] = s;
        }
        let scale = 1.0 / (chd as f32).sqrt();
        let mut enc_q = vec![0.0f32; d * npad];
        let mut qn = vec![0.0f32; d];
        let mut qq = vec![0.0f32; d];
        for i in 0..n {
            nn::layer_norm(
                &enc.layernorm_q,
                &params.query_emb[i * d..(i + 1) * d],
                &mut qn,
            );
            nn::linear_rows(&w[..d * d], &b[..d], d, &qn, &mut qq);
            for c in 0..d {
                enc_q[c * npad + i] = qq[c] * scale;
            }
        }
        let ff = cfg.dim_feedforward;
        let ffpad = round_up(ff, LANES);
        let layers = params
            .layers
            .iter()
            .map(|lp| {
                let mut w1t = vec![0.0f32; d * ffpad];
                let mut b1 = vec![0.0f32; ffpad];
                let mut w2 = vec![0.0f32; d * ffpad];
                // GELU's 1/√2 (of the argument and of the result) folded into the
                // weights: the kernel evaluates u·(1 + erf(u)), see Kernels::ffn_d4.
                let r2 = std::f32::consts::FRAC_1_SQRT_2;
                for j in 0..ff {
                    for c in 0..d {
                        w1t[c * ffpad + j] = lp.linear1.weight[j * d + c] * r2;
                        w2[c * ffpad + j] = lp.linear2.weight[c * ff + j] * r2;
                    }
                    b1[j] = lp.linear1.bias[j] * r2;
                }
                LayerPrep { w1t, b1, w2 }
            })
            .collect();
        Prep {
            d,
            ch,
            chd,
            ph,
            phd,
            npad,
            tok_var,
            k1,
            v1,
            ku,
            vu,
            enc_v0,
            enc_q,
            layers,
        }
    }
}

impl ZeroSums {
    fn new(cfg: &Config, p: &Prep, zero_fill: &[f32]) -> ZeroSums {
        let g = cfg.seq_len;
        let (d, ch, chd, npad) = (p.d, p.ch, p.chd, p.npad);
        let n = cfg.query_len;
        let mut t0 = vec![0.0f32; g * d];
        let mut w0 = vec![0.0f32; g * d];
        for gi in 0..g {
            let x = zero_fill[gi];
            let c = x / (x * x * p.tok_var[gi] + LN_EPS).sqrt();
            for cc in 0..d {
                t0[gi * d + cc] = c * p.k1[gi * d + cc];
                w0[gi * d + cc] = c * p.v1[gi * d + cc];
            }
            if let Some((ku, vu)) = p.value_rows(gi) {
                for cc in 0..d {
                    t0[gi * d + cc] += x * ku[cc];
                    w0[gi * d + cc] += x * vu[cc];
                }
            }
        }
        // structure of arrays for the kernels: [c·g + gi]
        let mut t0s = vec![0.0f32; g * d];
        let mut w0s = vec![0.0f32; g * d];
        for gi in 0..g {
            for cc in 0..d {
                t0s[cc * g + gi] = t0[gi * d + cc];
                w0s[cc * g + gi] = w0[gi * d + cc];
            }
        }
        let mut m0 = vec![f32::NEG_INFINITY; ch * npad];
        for h in 0..ch {
            let mh = &mut m0[h * npad..(h + 1) * npad];
            max_logits(
                chd,
                &p.enc_q[h * chd * npad..(h + 1) * chd * npad],
                npad,
                &t0s[h * chd * g..(h + 1) * chd * g],
                g,
                mh,
            );
            for (i, v) in mh.iter_mut().enumerate() {
                // + 1: the additive mask bias of a zero-count gene; padding rows 0
                *v = if i < n { *v + 1.0 } else { 0.0 };
            }
        }
        let m1: Vec<f32> = m0.iter().map(|v| v - 1.0).collect();
        let mut z = vec![0.0f64; ch * npad];
        let mut a = vec![0.0f64; d * npad];
        let kern = Kernels::get();
        let mut scratch = vec![0.0f32; 2 * d * LANES + 64];
        for h in 0..ch {
            let q = &p.enc_q[h * chd * npad..(h + 1) * chd * npad];
            let mh = &m1[h * npad..(h + 1) * npad];
            let keys = &t0s[h * chd * g..(h + 1) * chd * g];
            let vals = &w0s[h * chd * g..(h + 1) * chd * g];
            let (zh, ah) = (
                &mut z[h * npad..(h + 1) * npad],
                &mut a[h * chd * npad..(h + 1) * chd * npad],
            );
            if chd == 1 {
                kern.attn_h1_exact(q, mh, keys, vals, zh, ah);
            } else {
                kern.attn_gen_exact(chd, q, mh, keys, vals, zh, ah, &mut scratch);
            }
        }
        ZeroSums {
            t0,
            w0,
            m0,
            m1,
            z,
            a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Exceiver>();
    }
}
