//! The profile decoder of the contrastive step (option `reconstruct`): a rank-`r`
//! linear map from a view's cell embedding to the *other* view's whole expression
//! profile over the vocabulary, each gene standardised as PCA's input is
//! (`z = min((y − mean) / sd, 10)`, `y` = model value − zero-fill, mean and sd running
//! over the training views seen). Its mean squared error, added to NT-Xent, asks the
//! embedding to keep a linear `r`-dimensional summary from which the cell's profile
//! can be rebuilt: the subspace PCA keeps, learnt here by the model. Predicting the
//! other view rather than the view itself (both are noisy, independently thinned
//! samples of one cell) rewards what the two views share, not one view's noise.
//! Like the projection head it exists only in training.

use super::ops::{lin_bwd, lin_fwd};
use super::{FlatAdam, TrainCell, TrainOpts};
use crate::error::{Error, Result};
use crate::model::rng::Rng;

/// Upper clip of a standardised target (scanpy's `max_value`, Seurat's `scale.max`).
const CLIP: f32 = 10.0;

/// `y = W2 · (W1 · h + b1) + b2`, W1 `[rank, dim_in]`, W2 `[genes, rank]`, with its own
/// Adam state and the running per-gene moments of its targets.
#[derive(Debug, Clone)]
pub struct ProfileDecoder {
    dim_in: usize,
    rank: usize,
    genes: usize,
    /// Weight of its loss beside NT-Xent's.
    weight: f64,
    /// W1, b1, W2, b2, flat.
    p: Vec<f32>,
    g: Vec<f32>,
    adam: FlatAdam,
    /// Per-gene sum and sum of squares of the profiles seen in training, and their count.
    sum: Vec<f64>,
    sumsq: Vec<f64>,
    n: f64,
}

impl ProfileDecoder {
    /// A decoder from `dim_in`-float embeddings through `rank` to `genes` values, whose
    /// loss counts `weight` times; `torch.nn.Linear`'s initialisation from `seed`, the
    /// output bias at zero (the targets are centred).
    pub fn new(
        dim_in: usize,
        rank: usize,
        genes: usize,
        weight: f64,
        seed: u64,
    ) -> Result<ProfileDecoder> {
        if dim_in == 0
            || rank == 0
            || genes == 0
            || rank > 4096
            || !weight.is_finite()
            || weight <= 0.0
        {
            return Err(Error::invalid(format!(
                "a profile decoder needs positive sizes, a rank up to 4096 and a positive weight (got {dim_in} → {rank} → {genes}, weight {weight})"
            )));
        }
        let n = rank * dim_in + rank + genes * rank + genes;
        let mut rng = Rng::new(seed ^ 0xdec0_de00);
        let b1 = 1.0 / (dim_in as f64).sqrt();
        let b2 = 1.0 / (rank as f64).sqrt();
        let mut p: Vec<f32> = (0..rank * dim_in + rank)
            .map(|_| rng.uniform_range(-b1, b1) as f32)
            .collect();
        p.extend((0..genes * rank).map(|_| rng.uniform_range(-b2, b2) as f32));
        p.resize(n, 0.0);
        Ok(ProfileDecoder {
            dim_in,
            rank,
            genes,
            weight,
            g: vec![0.0; n],
            adam: FlatAdam::new(n),
            p,
            sum: vec![0.0; genes],
            sumsq: vec![0.0; genes],
            n: 0.0,
        })
    }

    /// (input, rank, genes) widths.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.dim_in, self.rank, self.genes)
    }

    fn offsets(&self) -> (usize, usize, usize) {
        let b1 = self.rank * self.dim_in;
        let w2 = b1 + self.rank;
        (b1, w2, w2 + self.genes * self.rank)
    }

    /// The views' profiles, one dense row of `genes` per view: model value minus the
    /// gene's zero-fill at the expressed genes (masked ones included: their values are
    /// the cell's), 0 elsewhere.
    pub fn profiles(&self, views: &[TrainCell], zero_fill: &[f32]) -> Result<Vec<f32>> {
        let gn = self.genes;
        if zero_fill.len() != gn {
            return Err(Error::shape(format!(
                "the profile decoder has {gn} genes but the zero-fill has {}",
                zero_fill.len()
            )));
        }
        let mut out = vec![0.0f32; views.len() * gn];
        for (row, c) in out.chunks_exact_mut(gn).zip(views) {
            for (&g, &v) in c.genes.iter().zip(&c.values) {
                let g = g as usize;
                if g >= gn {
                    return Err(Error::shape(format!(
                        "gene index {g} is outside the decoder's {gn} genes"
                    )));
                }
                row[g] = v - zero_fill[g];
            }
        }
        Ok(out)
    }

    /// Fold profiles into the running per-gene moments.
    fn observe(&mut self, prof: &[f32]) {
        for row in prof.chunks_exact(self.genes) {
            for ((s, q), &y) in self.sum.iter_mut().zip(&mut self.sumsq).zip(row) {
                *s += y as f64;
                *q += (y as f64) * (y as f64);
            }
        }
        self.n += (prof.len() / self.genes) as f64;
    }

    /// Each view's target: its partner's profile (views 2i and 2i+1), standardised by
    /// the running moments; 0 for a gene without spread yet.
    fn targets(&self, prof: &[f32]) -> Vec<f32> {
        let gn = self.genes;
        let stats: Vec<(f32, f32)> = (0..gn)
            .map(|g| {
                if self.n < 2.0 {
                    return (0.0, 0.0);
                }
                let mean = self.sum[g] / self.n;
                let var = (self.sumsq[g] / self.n - mean * mean).max(0.0);
                let inv = if var > 1e-12 { 1.0 / var.sqrt() } else { 0.0 };
                (mean as f32, inv as f32)
            })
            .collect();
        let mut t = vec![0.0f32; prof.len()];
        for (i, row) in t.chunks_exact_mut(gn).enumerate() {
            let src = &prof[(i ^ 1) * gn..((i ^ 1) + 1) * gn];
            for ((z, &y), &(mean, inv)) in row.iter_mut().zip(src).zip(&stats) {
                *z = ((y - mean) * inv).min(CLIP);
            }
        }
        t
    }

    fn check(&self, emb: &[f32], dim: usize, prof: &[f32]) -> Result<usize> {
        let rows = emb.len() / dim.max(1);
        if dim != self.dim_in
            || !emb.len().is_multiple_of(dim)
            || prof.len() != rows * self.genes
            || !rows.is_multiple_of(2)
        {
            return Err(Error::shape(format!(
                "the profile decoder takes pairs of {}-float embeddings and {}-gene profiles, got {} values of width {dim} and {} profile values",
                self.dim_in,
                self.genes,
                emb.len(),
                prof.len()
            )));
        }
        Ok(rows)
    }

    /// Bottleneck and prediction of the rows of `emb`.
    fn forward(&self, emb: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
        let (b1, w2, b2) = self.offsets();
        let mut hid = vec![0.0f32; rows * self.rank];
        lin_fwd(
            &self.p[..b1],
            &self.p[b1..w2],
            emb,
            self.dim_in,
            self.rank,
            &mut hid,
        );
        let mut pred = vec![0.0f32; rows * self.genes];
        lin_fwd(
            &self.p[w2..b2],
            &self.p[b2..],
            &hid,
            self.rank,
            self.genes,
            &mut pred,
        );
        (hid, pred)
    }

    /// `weight` × the mean squared error over rows and genes, without gradients and
    /// without updating the running moments.
    pub fn loss(&self, emb: &[f32], dim: usize, prof: &[f32]) -> Result<f64> {
        let rows = self.check(emb, dim, prof)?;
        let (_, pred) = self.forward(emb, rows);
        Ok(self.weight * mse(&pred, &self.targets(prof)))
    }

    /// [`ProfileDecoder::loss`] after folding `prof` into the running moments, and its
    /// gradient with respect to `emb`; the decoder's own gradients are kept for
    /// [`ProfileDecoder::step`].
    pub fn loss_grad(&mut self, emb: &[f32], dim: usize, prof: &[f32]) -> Result<(f64, Vec<f32>)> {
        let rows = self.check(emb, dim, prof)?;
        self.observe(prof);
        let target = self.targets(prof);
        let (hid, pred) = self.forward(emb, rows);
        let loss = self.weight * mse(&pred, &target);
        let scale = (2.0 * self.weight / pred.len().max(1) as f64) as f32;
        let dpred: Vec<f32> = pred
            .iter()
            .zip(&target)
            .map(|(p, t)| scale * (p - t))
            .collect();
        let (b1, w2, b2) = self.offsets();
        let (r, gn, d) = (self.rank, self.genes, self.dim_in);
        self.g.iter_mut().for_each(|x| *x = 0.0);
        let (g1, g2) = self.g.split_at_mut(w2);
        let (gw2, gb2) = g2.split_at_mut(b2 - w2);
        let mut dhid = vec![0.0f32; rows * r];
        lin_bwd(
            &self.p[w2..b2],
            &hid,
            &dpred,
            r,
            gn,
            Some(&mut dhid),
            gw2,
            gb2,
        );
        let (gw1, gb1) = g1.split_at_mut(b1);
        let mut demb = vec![0.0f32; emb.len()];
        lin_bwd(&self.p[..b1], emb, &dhid, d, r, Some(&mut demb), gw1, gb1);
        Ok((loss, demb))
    }

    /// One Adam update from the last [`ProfileDecoder::loss_grad`]'s gradients, scaled
    /// by `weight` (the contrastive term's weight in the loss).
    pub fn step(&mut self, lr: f64, weight: f64, opts: &TrainOpts) {
        self.adam.step(&mut self.p, &self.g, lr, weight, opts);
    }
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    s / a.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(rows: usize, genes: usize, rng: &mut Rng) -> Vec<TrainCell> {
        (0..rows)
            .map(|_| {
                let g: Vec<u32> = (0..genes as u32).filter(|_| rng.uniform() < 0.6).collect();
                TrainCell {
                    values: g.iter().map(|_| 1.0 + rng.uniform() as f32 * 3.0).collect(),
                    genes: g,
                    mask: Vec::new(),
                    label: None,
                }
            })
            .collect()
    }

    #[test]
    fn decoder_gradient_matches_finite_differences() {
        let (dim, rows, genes) = (6, 8, 5);
        let mut rng = Rng::new(4);
        let emb: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
        let zf = vec![1.0f32; genes];
        let mut dec = ProfileDecoder::new(dim, 3, genes, 0.7, 2).unwrap();
        let prof = dec.profiles(&views(rows, genes, &mut rng), &zf).unwrap();
        let (loss, grad) = dec.loss_grad(&emb, dim, &prof).unwrap();
        assert!((loss - dec.loss(&emb, dim, &prof).unwrap()).abs() < 1e-9);
        let h = 1e-3;
        for k in 0..emb.len() {
            let mut e = emb.clone();
            e[k] += h;
            let up = dec.loss(&e, dim, &prof).unwrap();
            e[k] -= 2.0 * h;
            let dn = dec.loss(&e, dim, &prof).unwrap();
            let fd = (up - dn) / (2.0 * h as f64);
            assert!(
                (fd - grad[k] as f64).abs() < 2e-3,
                "emb {k}: finite difference {fd}, gradient {}",
                grad[k]
            );
        }
        // its own gradients, through W1[0][0] and W2[0][0]
        for at in [0, dec.offsets().1] {
            let mut moved = dec.clone();
            moved.p[at] += h;
            let up = moved.loss(&emb, dim, &prof).unwrap();
            moved.p[at] -= 2.0 * h;
            let dn = moved.loss(&emb, dim, &prof).unwrap();
            assert!((((up - dn) / (2.0 * h as f64)) - dec.g[at] as f64).abs() < 2e-3);
        }
        // steps lower the loss; wrong widths are errors
        for _ in 0..30 {
            dec.loss_grad(&emb, dim, &prof).unwrap();
            dec.step(1e-2, 1.0, &TrainOpts::default());
        }
        assert!(dec.loss(&emb, dim, &prof).unwrap() < loss);
        assert!(dec.loss(&emb[..rows * 5], 5, &prof).is_err());
        assert!(dec.loss(&emb, dim, &prof[1..]).is_err());
        assert!(ProfileDecoder::new(dim, 0, genes, 1.0, 1).is_err());
        assert!(ProfileDecoder::new(dim, 3, genes, 0.0, 1).is_err());
        assert!(dec.profiles(&views(2, genes, &mut rng), &zf[1..]).is_err());
    }

    /// A view's target is its partner's profile, standardised by the moments seen.
    #[test]
    fn targets_are_the_partners_standardised_profile() {
        let genes = 3;
        let mut dec = ProfileDecoder::new(2, 1, genes, 1.0, 1).unwrap();
        let prof = vec![0.0, 1.0, 5.0, 2.0, 1.0, 5.0, 4.0, 1.0, 5.0, 6.0, 1.0, 5.0];
        dec.observe(&prof);
        let t = dec.targets(&prof);
        // gene 0 over the 4 views: 0, 2, 4, 6: mean 3, sd √5
        let sd = 5f32.sqrt();
        assert!(
            (t[0] - (2.0 - 3.0) / sd).abs() < 1e-6,
            "view 0 gets view 1's"
        );
        assert!(
            (t[3] - (0.0 - 3.0) / sd).abs() < 1e-6,
            "view 1 gets view 0's"
        );
        assert!((t[6] - (6.0 - 3.0) / sd).abs() < 1e-6);
        // genes 1 and 2 never vary: 0
        assert!(t.iter().skip(1).step_by(3).all(|&x| x == 0.0));
        assert!(t.iter().skip(2).step_by(3).all(|&x| x == 0.0));
    }
}
