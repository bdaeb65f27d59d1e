//! The projection head of the contrastive term (SimCLR, Chen et al. 2020, §4.2):
//! `z = W2 · relu(W1 · h + b1) + b2` maps a cell embedding `h` to the space where
//! NT-Xent compares views. It exists only during training (the model's embedding stays
//! `h`): the loss can make `z` invariant to the views while `h` keeps what the head
//! discards, which nearest-neighbour search over `h` needs.

use super::decoder::ProfileDecoder;
use super::ops::{lin_bwd, lin_fwd};
use super::{nn_xent, nt_xent, nt_xent_debiased, unit_rows, FlatAdam, TrainOpts};
use crate::error::{Error, Result};
use crate::model::rng::Rng;

/// A two-layer MLP head with its own Adam state (same settings as the model's).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    dim_in: usize,
    hidden: usize,
    out: usize,
    /// W1 `[hidden, dim_in]`, b1, W2 `[out, hidden]`, b2, flat.
    p: Vec<f32>,
    /// Gradients of the last [`ProjectionHead::loss_grad`], same layout.
    g: Vec<f32>,
    adam: FlatAdam,
    /// NNCLR's support set: unit rows of earlier batches' projections, a ring of at
    /// most `support_cap` rows (0: plain NT-Xent); `support_next` is the next to replace.
    support: Vec<f64>,
    support_cap: usize,
    support_next: usize,
    /// Share of same-type negatives NT-Xent is debiased for in training (0: none).
    debias: f64,
    /// The profile decoder whose loss joins NT-Xent's (option `reconstruct`).
    decoder: Option<ProfileDecoder>,
}

impl ProjectionHead {
    /// A head for `dim_in`-float embeddings, `torch.nn.Linear`'s initialisation
    /// (uniform ±1/√fan_in) from `seed`.
    pub fn new(dim_in: usize, hidden: usize, out: usize, seed: u64) -> Result<ProjectionHead> {
        if dim_in == 0 || hidden == 0 || out == 0 || hidden > 65536 || out > 65536 {
            return Err(Error::invalid(format!(
                "a projection head needs positive sizes up to 65536 (got {dim_in} → {hidden} → {out})"
            )));
        }
        let n = hidden * dim_in + hidden + out * hidden + out;
        let mut rng = Rng::new(seed ^ 0x4ead_4ead);
        let mut p = Vec::with_capacity(n);
        let b1 = 1.0 / (dim_in as f64).sqrt();
        for _ in 0..hidden * dim_in + hidden {
            p.push(rng.uniform_range(-b1, b1) as f32);
        }
        let b2 = 1.0 / (hidden as f64).sqrt();
        for _ in 0..out * hidden + out {
            p.push(rng.uniform_range(-b2, b2) as f32);
        }
        Ok(ProjectionHead {
            dim_in,
            hidden,
            out,
            g: vec![0.0; n],
            adam: FlatAdam::new(n),
            p,
            support: Vec::new(),
            support_cap: 0,
            support_next: 0,
            debias: 0.0,
            decoder: None,
        })
    }

    /// Train with NT-Xent debiased for a share `tau_plus` of same-type negatives
    /// ([`nt_xent_debiased`]; 0: plain). Validation ([`ProjectionHead::loss`]) stays
    /// plain NT-Xent, comparable between runs.
    pub fn with_debias(mut self, tau_plus: f64) -> Result<ProjectionHead> {
        if !(0.0..0.5).contains(&tau_plus) {
            return Err(Error::invalid(format!(
                "the debiasing share must be in [0, 0.5) (got {tau_plus})"
            )));
        }
        self.debias = tau_plus;
        Ok(self)
    }

    /// Train with nearest-neighbour positives ([`nn_xent`], averaged with NT-Xent) from
    /// a support set of the last `rows` projections (0: plain NT-Xent). Until the
    /// support set holds a batch, steps use NT-Xent alone; validation
    /// ([`ProjectionHead::loss`]) always does, so its figure stays comparable between
    /// runs. (NNCLR's term alone collapsed the embedding on Kang: PBMC 3k kNN-15 0.64
    /// after 3 epochs, below random weights; README, Known limitations.)
    pub fn with_support(mut self, rows: usize) -> ProjectionHead {
        self.support_cap = rows;
        self
    }

    /// Add the profile decoder's loss to NT-Xent's, in training and validation alike
    /// (it reads the embedding `h`, not the projection).
    pub fn with_decoder(mut self, decoder: ProfileDecoder) -> Result<ProjectionHead> {
        if decoder.dims().0 != self.dim_in {
            return Err(Error::invalid(format!(
                "the profile decoder takes {}-float embeddings but the head takes {}",
                decoder.dims().0,
                self.dim_in
            )));
        }
        self.decoder = Some(decoder);
        Ok(self)
    }

    /// The profile decoder, if any.
    pub fn decoder(&self) -> Option<&ProfileDecoder> {
        self.decoder.as_ref()
    }

    /// Add a batch's projections (unit rows) to the support set, oldest out first.
    fn remember(&mut self, z: &[f32]) {
        let o = self.out;
        let (u, _) = unit_rows(z, o);
        for row in u.chunks_exact(o) {
            if self.support.len() < self.support_cap * o {
                self.support.extend_from_slice(row);
            } else {
                let at = self.support_next * o;
                self.support[at..at + o].copy_from_slice(row);
                self.support_next = (self.support_next + 1) % self.support_cap;
            }
        }
    }

    /// (input, hidden, output) widths.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.dim_in, self.hidden, self.out)
    }

    fn offsets(&self) -> (usize, usize, usize, usize) {
        let w1 = 0;
        let b1 = self.hidden * self.dim_in;
        let w2 = b1 + self.hidden;
        let b2 = w2 + self.out * self.hidden;
        (w1, b1, w2, b2)
    }

    fn check(&self, emb: &[f32], dim: usize) -> Result<usize> {
        if dim != self.dim_in || !emb.len().is_multiple_of(dim) {
            return Err(Error::shape(format!(
                "the projection head takes {}-float embeddings, got {} values of width {dim}",
                self.dim_in,
                emb.len()
            )));
        }
        Ok(emb.len() / dim)
    }

    /// Hidden pre-activations and outputs of the rows of `emb`.
    fn forward(&self, emb: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (w1, b1, w2, b2) = self.offsets();
        let mut pre = vec![0.0f32; rows * self.hidden];
        lin_fwd(
            &self.p[w1..b1],
            &self.p[b1..w2],
            emb,
            self.dim_in,
            self.hidden,
            &mut pre,
        );
        let act: Vec<f32> = pre.iter().map(|&x| x.max(0.0)).collect();
        let mut z = vec![0.0f32; rows * self.out];
        lin_fwd(
            &self.p[w2..b2],
            &self.p[b2..],
            &act,
            self.hidden,
            self.out,
            &mut z,
        );
        (pre, act, z)
    }

    /// NT-Xent ([`nt_xent`]) of the projected embeddings, plus the profile decoder's
    /// loss on the views' profiles `prof` when there is a decoder; without gradients.
    pub fn loss(&self, emb: &[f32], dim: usize, tau: f64, prof: Option<&[f32]>) -> Result<f64> {
        let rows = self.check(emb, dim)?;
        let (_, _, z) = self.forward(emb, rows);
        let rec = match (&self.decoder, prof) {
            (Some(d), Some(p)) => d.loss(emb, dim, p)?,
            _ => 0.0,
        };
        Ok(nt_xent(&z, self.out, tau)?.0 + rec)
    }

    /// NT-Xent of the projected embeddings (plus the profile decoder's loss, as in
    /// [`ProjectionHead::loss`]) and its gradient with respect to `emb`; the head's
    /// and the decoder's own gradients are kept for [`ProjectionHead::step`].
    pub fn loss_grad(
        &mut self,
        emb: &[f32],
        dim: usize,
        tau: f64,
        prof: Option<&[f32]>,
    ) -> Result<(f64, Vec<f32>)> {
        let rows = self.check(emb, dim)?;
        let (pre, act, z) = self.forward(emb, rows);
        let (loss, dz) = if self.support_cap > 0 && self.support.len() >= rows * self.out {
            // NNCLR's term beside NT-Xent's, averaged
            let (a, ga) = nn_xent(&z, self.out, tau, &self.support)?;
            let (b, gb) = nt_xent_debiased(&z, self.out, tau, self.debias)?;
            let g = ga.iter().zip(&gb).map(|(x, y)| 0.5 * (x + y)).collect();
            (0.5 * (a + b), g)
        } else {
            nt_xent_debiased(&z, self.out, tau, self.debias)?
        };
        if self.support_cap > 0 {
            self.remember(&z);
        }
        let (w1, b1, w2, b2) = self.offsets();
        let (h, o, d) = (self.hidden, self.out, self.dim_in);
        self.g.iter_mut().for_each(|x| *x = 0.0);
        let mut dact = vec![0.0f32; rows * h];
        {
            let (g1, g2) = self.g.split_at_mut(w2);
            let (gw2, gb2) = g2.split_at_mut(b2 - w2);
            lin_bwd(&self.p[w2..b2], &act, &dz, h, o, Some(&mut dact), gw2, gb2);
            for (da, &x) in dact.iter_mut().zip(&pre) {
                if x <= 0.0 {
                    *da = 0.0;
                }
            }
            let (gw1, gb1) = g1.split_at_mut(b1);
            let mut demb = vec![0.0f32; emb.len()];
            lin_bwd(&self.p[w1..b1], emb, &dact, d, h, Some(&mut demb), gw1, gb1);
            if let (Some(dec), Some(p)) = (&mut self.decoder, prof) {
                let (rl, rg) = dec.loss_grad(emb, dim, p)?;
                demb.iter_mut().zip(&rg).for_each(|(a, b)| *a += b);
                return Ok((loss + rl, demb));
            }
            Ok((loss, demb))
        }
    }

    /// One Adam update (the model's `betas`, `eps` and coupled weight decay) at `lr`
    /// from the gradients of the last [`ProjectionHead::loss_grad`], scaled by `weight`
    /// (the contrastive term's weight in the loss); the profile decoder, if any, takes
    /// its step too.
    pub fn step(&mut self, lr: f64, weight: f64, opts: &TrainOpts) {
        self.adam.step(&mut self.p, &self.g, lr, weight, opts);
        if let Some(d) = &mut self.decoder {
            d.step(lr, weight, opts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_gradient_matches_finite_differences() {
        let (dim, rows) = (6, 8);
        let mut rng = Rng::new(3);
        let emb: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
        let mut head = ProjectionHead::new(dim, 5, 4, 1).unwrap();
        let (loss, grad) = head.loss_grad(&emb, dim, 0.5, None).unwrap();
        assert!((loss - head.loss(&emb, dim, 0.5, None).unwrap()).abs() < 1e-9);
        let h = 1e-3;
        for k in 0..emb.len() {
            let mut e = emb.clone();
            e[k] += h;
            let up = head.loss(&e, dim, 0.5, None).unwrap();
            e[k] -= 2.0 * h;
            let dn = head.loss(&e, dim, 0.5, None).unwrap();
            let fd = (up - dn) / (2.0 * h as f64);
            assert!(
                (fd - grad[k] as f64).abs() < 2e-3,
                "emb {k}: finite difference {fd}, gradient {}",
                grad[k]
            );
        }
        // the head's own gradients: check through a parameter step of W2[0][0]
        let g0 = head.g[head.offsets().2];
        let mut moved = head.clone();
        moved.p[head.offsets().2] += h;
        let up = moved.loss(&emb, dim, 0.5, None).unwrap();
        moved.p[head.offsets().2] -= 2.0 * h;
        let dn = moved.loss(&emb, dim, 0.5, None).unwrap();
        assert!((((up - dn) / (2.0 * h as f64)) - g0 as f64).abs() < 2e-3);
        // a step lowers the loss, and a wrong width is an error
        for _ in 0..20 {
            head.loss_grad(&emb, dim, 0.5, None).unwrap();
            head.step(1e-2, 1.0, &TrainOpts::default());
        }
        assert!(head.loss(&emb, dim, 0.5, None).unwrap() < loss);
        assert!(head.loss(&emb[..rows * 5], 5, 0.5, None).is_err());
        assert!(ProjectionHead::new(0, 5, 4, 1).is_err());
    }

    /// With a support set: NT-Xent until it holds a batch, then NNCLR against the
    /// remembered projections (the ring keeps the newest `cap` rows).
    #[test]
    fn support_set_fills_then_gives_the_positives() {
        let (dim, rows) = (6, 8);
        let mut rng = Rng::new(5);
        let emb: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
        let mut head = ProjectionHead::new(dim, 5, 4, 1).unwrap().with_support(12);
        let (l0, _) = head.loss_grad(&emb, dim, 0.5, None).unwrap();
        assert_eq!(
            l0,
            head.loss(&emb, dim, 0.5, None).unwrap(),
            "first step: NT-Xent"
        );
        assert_eq!(head.support.len(), rows * 4);
        let (l1, g1) = head.loss_grad(&emb, dim, 0.5, None).unwrap();
        let (_, _, z) = head.forward(&emb, rows);
        let (u, _) = unit_rows(&z, 4);
        let (nn, eg) = nn_xent(&z, 4, 0.5, &u).unwrap();
        let (nt, _) = nt_xent(&z, 4, 0.5).unwrap();
        assert!(
            (l1 - 0.5 * (nn + nt)).abs() < 1e-12,
            "second step: NNCLR against the first batch, averaged with NT-Xent"
        );
        assert_eq!(g1.len(), emb.len());
        assert!(eg.iter().any(|&x| x != 0.0));
        // the ring holds 12 rows: the second batch's first 4 filled it, its last 4
        // replaced the oldest 4
        assert_eq!(head.support.len(), 12 * 4);
        assert_eq!(head.support_next, 4);
        assert_eq!(&head.support[..4 * 4], &u[4 * 4..]);
    }

    /// With a profile decoder the loss is NT-Xent's plus the decoder's, and so is the
    /// gradient with respect to the embeddings.
    #[test]
    fn decoder_loss_joins_nt_xent() {
        let (dim, rows, genes) = (6, 8, 4);
        let mut rng = Rng::new(9);
        let emb: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
        let views: Vec<super::super::TrainCell> = (0..rows)
            .map(|i| super::super::TrainCell {
                genes: vec![0, 1 + (i % 3) as u32],
                values: vec![1.5 + i as f32 * 0.1, 2.0 + (i % 2) as f32],
                mask: Vec::new(),
                label: None,
            })
            .collect();
        let zf = vec![1.0f32; genes];
        let dec = ProfileDecoder::new(dim, 2, genes, 3.0, 5).unwrap();
        assert!(ProjectionHead::new(dim + 1, 5, 4, 1)
            .unwrap()
            .with_decoder(dec.clone())
            .is_err());
        let mut head = ProjectionHead::new(dim, 5, 4, 1)
            .unwrap()
            .with_decoder(dec)
            .unwrap();
        let prof = head.decoder().unwrap().profiles(&views, &zf).unwrap();
        let (loss, grad) = head.loss_grad(&emb, dim, 0.5, Some(&prof)).unwrap();
        let (_, _, z) = head.forward(&emb, rows);
        let parts = nt_xent(&z, 4, 0.5).unwrap().0
            + head.decoder().unwrap().loss(&emb, dim, &prof).unwrap();
        assert!((loss - parts).abs() < 1e-9);
        assert!((head.loss(&emb, dim, 0.5, Some(&prof)).unwrap() - loss).abs() < 1e-9);
        let h = 1e-3;
        for k in 0..emb.len() {
            let mut e = emb.clone();
            e[k] += h;
            let up = head.loss(&e, dim, 0.5, Some(&prof)).unwrap();
            e[k] -= 2.0 * h;
            let dn = head.loss(&e, dim, 0.5, Some(&prof)).unwrap();
            let fd = (up - dn) / (2.0 * h as f64);
            assert!(
                (fd - grad[k] as f64).abs() < 3e-3,
                "emb {k}: {fd} against {}",
                grad[k]
            );
        }
    }

    /// A debiased head trains on the debiased loss and validates on plain NT-Xent.
    #[test]
    fn debiased_head_trains_on_the_debiased_loss() {
        let (dim, rows) = (6, 8);
        let mut rng = Rng::new(8);
        let emb: Vec<f32> = (0..rows * dim).map(|_| rng.normal() as f32).collect();
        let head = ProjectionHead::new(dim, 5, 4, 1).unwrap();
        assert!(head.clone().with_debias(0.5).is_err());
        assert!(head.clone().with_debias(-0.1).is_err());
        let mut h = head.with_debias(0.2).unwrap();
        let (l, _) = h.loss_grad(&emb, dim, 0.5, None).unwrap();
        let (_, _, z) = h.forward(&emb, rows);
        assert_eq!(l, nt_xent_debiased(&z, 4, 0.5, 0.2).unwrap().0);
        assert_eq!(
            h.loss(&emb, dim, 0.5, None).unwrap(),
            nt_xent(&z, 4, 0.5).unwrap().0
        );
    }
}
