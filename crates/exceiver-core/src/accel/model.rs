//! Batched inference on a candle device: [`DeviceModel`].

use super::net::{needs_zero_terms, EncIn, Net, RowIds, ZeroTerms};
use super::pack::{check_cell, pack_cells, pack_queries, plan_chunks, CellRef, Seen};
use super::{compute_err, upload_params, DEFAULT_BATCH_ELEMENTS};
use crate::error::{Error, Result};
use crate::model::config::{AttentionMode, Config};
use crate::model::forward::Exceiver;
use crate::model::weights::Params;
use candle_core::{Device, Tensor};

/// What [`DeviceModel::forward_batch`] gives, for B cells.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The cell embeddings, B·N·d floats (cell b's at `[b·N·d..]`, each `[d·i + c]`).
    pub embedding: Vec<f32>,
    /// Value predictions for each cell's query genes.
    pub pred: Vec<Vec<f32>>,
    /// Class logits, B·C floats (classifiers only).
    pub class_logits: Option<Vec<f32>>,
}

/// An Exceiver whose weights live on a candle device (a CUDA GPU, or the CPU), run on
/// batches of cells. Computes what [`Exceiver`] computes, in f32 (see
/// [`super`] for how the encoder is batched); results agree with it to f32 rounding.
///
/// Cells are processed in chunks, taken in order of their number of expressed genes
/// (less padding), so that the largest intermediate tensor of a chunk has at most
/// [`DeviceModel::with_batch_elements`] elements. Results come back in input order.
pub struct DeviceModel {
    cfg: Config,
    /// The model input of a zero count per gene (the profile path's origin).
    zero_fill: Vec<f32>,
    dev: Device,
    net: Net,
    /// encoder queries `[H, N, hd]`
    q: Tensor,
    zero: Option<ZeroTerms>,
    budget: usize,
    /// Each process layer's packed weights when the fused process layer is on.
    fused: Option<Vec<Tensor>>,
}

impl std::fmt::Debug for DeviceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("config", &self.cfg)
            .field("device", &self.dev)
            .field("batch_elements", &self.budget)
            .finish()
    }
}

pub(crate) fn check_zero_fill(cfg: &Config, zero_fill: &[f32]) -> Result<()> {
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

impl DeviceModel {
    /// Put a model on `device`: its config, weights (checked against the config) and
    /// the zero-fill model input values of its G genes (see
    /// [`crate::preprocess::Scaler::zero_fill`]). In the reference attention mode the
    /// model-only terms of every unexpressed gene are computed here, once.
    pub fn new(
        cfg: Config,
        params: &Params,
        zero_fill: &[f32],
        device: &Device,
    ) -> Result<DeviceModel> {
        params.check(&cfg)?;
        check_zero_fill(&cfg, zero_fill)?;
        let tensors = upload_params(&cfg, params, device)?;
        let net = Net::build(&cfg, &tensors).map_err(compute_err)?;
        let q = net.enc_queries(&cfg).map_err(compute_err)?;
        let zero = if needs_zero_terms(&cfg) {
            let zf =
                Tensor::from_slice(zero_fill, (cfg.seq_len, 1), device).map_err(compute_err)?;
            Some(net.zero_terms(&cfg, &q, &zf).map_err(compute_err)?)
        } else {
            None
        };
        Ok(DeviceModel {
            cfg,
            zero_fill: zero_fill.to_vec(),
            dev: device.clone(),
            net,
            q,
            zero,
            budget: DEFAULT_BATCH_ELEMENTS,
            fused: None,
        })
    }

    /// The same model as a CPU [`Exceiver`], on `device` (same attention mode).
    pub fn from_exceiver(model: &Exceiver, device: &Device) -> Result<DeviceModel> {
        DeviceModel::new(
            model.config().clone(),
            model.params(),
            model.zero_fill(),
            device,
        )
    }

    /// Limit the largest intermediate tensor of one chunk to `n` f32 elements (default
    /// [`DEFAULT_BATCH_ELEMENTS`]); a chunk always holds at least one cell.
    pub fn with_batch_elements(mut self, n: usize) -> DeviceModel {
        self.budget = n.max(1);
        self
    }

    /// Run each process layer as one fused op (`accel/fused.rs`; off by default: its
    /// CUDA kernel has not been checked on a GPU yet). An error when the model's shape
    /// has no fused kernel: latent width 1, 2, 4 or 8, a whole number of dimensions per
    /// head, at most 1,024 latents and 6,144 latent values per cell. Inference only;
    /// training is unaffected.
    pub fn with_fused_process(mut self, on: bool) -> Result<DeviceModel> {
        if !on {
            self.fused = None;
            return Ok(self);
        }
        if !super::fused::supports(&self.cfg) {
            return Err(Error::invalid(format!(
                "the fused process layer needs a latent width of 1, 2, 4 or 8 divisible by the heads, at most {} latents and {} latent values; this model has width {}, {} heads, {} latents",
                super::fused::MAX_LATENTS,
                super::fused::MAX_CELL_VALUES,
                self.cfg.seq_dim,
                self.cfg.nhead,
                self.cfg.query_len
            )));
        }
        self.fused = Some(self.net.fused_weights().map_err(compute_err)?);
        Ok(self)
    }

    /// Whether the fused process layer is on.
    pub fn fused_process(&self) -> bool {
        self.fused.is_some()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub fn attention(&self) -> AttentionMode {
        self.cfg.attention
    }

    /// Length of a cell embedding (N·d).
    pub fn embedding_len(&self) -> usize {
        self.cfg.embedding_len()
    }

    /// Encoder outputs (N·d floats per cell, concatenated).
    pub fn encode_batch(&self, cells: &[(&[u32], &[f32])]) -> Result<Vec<f32>> {
        let nd = self.embedding_len();
        let mut out = vec![0.0f32; cells.len() * nd];
        self.for_chunks(cells, 0, |idx, inp| {
            let lat = self
                .net
                .encode(&self.cfg, &self.q, self.zero.as_ref(), inp)?;
            scatter(&lat, idx, nd, &mut out)
        })?;
        Ok(out)
    }

    /// Cell embeddings (processed latents, N·d floats per cell, concatenated), the
    /// batched form of [`Exceiver::embed`]. Fails with the first bad cell's error,
    /// prefixed by its position.
    pub fn embed_batch(&self, cells: &[(&[u32], &[f32])]) -> Result<Vec<f32>> {
        let nd = self.embedding_len();
        let mut out = vec![0.0f32; cells.len() * nd];
        self.for_chunks(cells, 0, |idx, inp| {
            let lat = self.latent(inp)?;
            scatter(&lat, idx, nd, &mut out)
        })?;
        Ok(out)
    }

    /// Embedding, value predictions for each cell's `queries` (vocabulary indices) and,
    /// for a classifier, class logits: the batched form of [`Exceiver::forward`].
    pub fn forward_batch(
        &self,
        cells: &[(&[u32], &[f32])],
        queries: &[&[u32]],
    ) -> Result<BatchOutput> {
        if queries.len() != cells.len() {
            return Err(Error::shape(format!(
                "{} cells but {} query lists",
                cells.len(),
                queries.len()
            )));
        }
        let g = self.cfg.seq_len;
        for (k, qs) in queries.iter().enumerate() {
            if let Some(p) = qs.iter().position(|&q| q as usize >= g) {
                return Err(Error::invalid(format!(
                    "cell {k}: query gene index {} at position {p} is out of range for a vocabulary of {g} genes",
                    qs[p]
                )));
            }
        }
        let nd = self.embedding_len();
        let classes = self.cfg.num_classes;
        let qmax = queries.iter().map(|q| q.len()).max().unwrap_or(0);
        let mut embedding = vec![0.0f32; cells.len() * nd];
        let mut pred: Vec<Vec<f32>> = queries.iter().map(|q| vec![0.0; q.len()]).collect();
        let mut logits = classes.map(|c| vec![0.0f32; cells.len() * c]);
        self.for_chunks(cells, qmax + 1, |idx, inp| {
            let lat = self.latent(inp)?;
            scatter(&lat, idx, nd, &mut embedding)?;
            let lists: Vec<Vec<u32>> = idx.iter().map(|&i| queries[i].to_vec()).collect();
            let token = classes.is_some() && self.cfg.class_token();
            if let (Some(c), Some(out), false) = (classes, logits.as_mut(), token) {
                self.class_logits(&lat.flatten_from(1)?, idx, c, out)?;
            }
            let (rows, qm) = pack_queries(&self.cfg, &lists, token);
            if qm == 0 && !token {
                // nothing queries the decoder
                return Ok(());
            }
            let rows_t = self.row_ids(&rows)?;
            let dec = self.net.decode(&self.cfg, &lat, &rows_t)?;
            if qm > 0 {
                let p = self
                    .net
                    .value_head(&dec.narrow(1, 0, qm)?)?
                    .to_vec2::<f32>()?;
                for (j, &i) in idx.iter().enumerate() {
                    let n = pred[i].len();
                    pred[i].copy_from_slice(&p[j][..n]);
                }
            }
            if let (Some(c), Some(out), true) = (classes, logits.as_mut(), token) {
                self.class_logits(&dec.narrow(1, qm, 1)?.squeeze(1)?, idx, c, out)?;
            }
            Ok(())
        })?;
        Ok(BatchOutput {
            embedding,
            pred,
            class_logits: logits,
        })
    }

    /// Class logits of a classifier (C floats per cell, concatenated); an error for a
    /// plain Exceiver. The batched form of [`Exceiver::classify_logits`].
    pub fn classify_logits_batch(&self, cells: &[(&[u32], &[f32])]) -> Result<Vec<f32>> {
        let Some(c) = self.cfg.num_classes else {
            return Err(Error::invalid(
                "the model is not a classifier (it has no class head)",
            ));
        };
        let mut out = vec![0.0f32; cells.len() * c];
        let class_row = self.cfg.seq_len as u32 + 1;
        self.for_chunks(cells, 1, |idx, inp| {
            let lat = self.latent(inp)?;
            if self.cfg.class_embedding {
                return self.class_logits(&lat.flatten_from(1)?, idx, c, &mut out);
            }
            let rows = self.row_ids(&vec![class_row; idx.len()])?;
            let dec = self.net.decode(&self.cfg, &lat, &rows)?;
            self.class_logits(&dec.squeeze(1)?, idx, c, &mut out)
        })?;
        Ok(out)
    }

    // ------------------------------------------------------------------ internals

    fn row_ids(&self, rows: &[u32]) -> candle_core::Result<RowIds> {
        let c = &self.cfg;
        RowIds::new(rows, 0, c.emb_rows(), c.seq_dim, false, &self.dev)
    }

    fn latent(&self, inp: &EncIn) -> candle_core::Result<Tensor> {
        let enc = self
            .net
            .encode(&self.cfg, &self.q, self.zero.as_ref(), inp)?;
        let mut outs = self
            .net
            .process(&self.cfg, &enc, false, self.fused.as_deref())?;
        Ok(outs.pop().unwrap_or(enc))
    }

    fn class_logits(
        &self,
        row: &Tensor,
        idx: &[usize],
        c: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        if let Some(l) = self.net.class_head(row)? {
            let l = l.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in idx.iter().enumerate() {
                out[i * c..(i + 1) * c].copy_from_slice(&l[j * c..(j + 1) * c]);
            }
        }
        Ok(())
    }

    /// Check every cell, then run `f` on each chunk (positions into `cells`, and the
    /// chunk's encoder input on the device). `queries` is the decoder rows per cell.
    fn for_chunks(
        &self,
        cells: &[(&[u32], &[f32])],
        queries: usize,
        mut f: impl FnMut(&[usize], &EncIn) -> candle_core::Result<()>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let mut seen = Seen::new(cfg.seq_len);
        for (k, (g, v)) in cells.iter().enumerate() {
            check_cell(cfg, &mut seen, g, v).map_err(|e| e.context(format!("cell {k}")))?;
        }
        let lens: Vec<usize> = cells.iter().map(|(g, _)| g.len()).collect();
        let per_cell = per_cell_elements(cfg, queries);
        for idx in plan_chunks(&lens, self.budget, per_cell) {
            let refs: Vec<CellRef<'_>> = idx
                .iter()
                .map(|&i| CellRef {
                    genes: cells[i].0,
                    values: cells[i].1,
                    masked: &[],
                })
                .collect();
            let host = pack_cells(cfg, &self.zero_fill, &refs);
            let inp = EncIn::upload(&host, cfg, &self.dev, false).map_err(compute_err)?;
            f(&idx, &inp).map_err(compute_err)?;
        }
        Ok(())
    }
}

/// Elements of the largest intermediate tensor per cell, for a cell with `l` expressed
/// genes and `queries` decoder rows: encoder logits `H·N·(L + 2)`, feed-forward `N·ff`,
/// process attention `h·N·N`, decoder attention `H·Q·N`, the unexpressed-gene mask `G`.
pub(crate) fn per_cell_elements(cfg: &Config, queries: usize) -> impl Fn(usize) -> usize {
    let (h, n, ff, ph, g) = (
        cfg.cross_heads,
        cfg.query_len,
        cfg.dim_feedforward,
        cfg.nhead,
        cfg.seq_len,
    );
    let fixed = (n * ff).max(ph * n * n).max(h * queries * n).max(g);
    move |l| (h * n * (l + 2)).max(fixed)
}

/// Copy a chunk's `[b, N, d]` result rows to their cells' places in `out`.
fn scatter(t: &Tensor, idx: &[usize], nd: usize, out: &mut [f32]) -> candle_core::Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    for (j, &i) in idx.iter().enumerate() {
        out[i * nd..(i + 1) * nd].copy_from_slice(&v[j * nd..(j + 1) * nd]);
    }
    Ok(())
}
