//! Reference mapping: transfer the labels of an annotated reference to query cells by
//! their nearest reference cells in an embedding, with a confidence, the runner-up, and
//! an honest "unknown".
//!
//! For each query cell, its `k` nearest reference cells by cosine distance `d` (exact,
//! [`crate::knn::search`]) vote for their labels with weight `max(1 − d, 0)` (their
//! cosine similarity; equal weights if every neighbour's is 0). The label with the
//! largest total weight wins; its **confidence** is its share of the total weight, the
//! **runner-up** is the label with the next largest total (ties go to the label listed
//! first). A cell gets no label ("unknown") when
//!
//! * its **distance** to the reference, the mean distance to its `k` neighbours, is
//!   larger than that of all but a fraction of the reference's own cells: the threshold
//!   is the `distance_quantile` quantile (default 0.99) of the same statistic computed,
//!   leaving each cell out, on a sample of `calibration_cells` reference cells
//!   (default 1,000, seeded). Cells of a type the reference lacks sit far from every
//!   reference cell, whatever the vote says; or
//! * its confidence is below `min_confidence` (default 0.5): the neighbours disagree.
//!
//! The distance test comes first ([`Verdict::Distant`]), then the vote
//! ([`Verdict::LowConfidence`]). Both thresholds are options; `distance_quantile` 1
//! turns the distance test off, `min_confidence` 0 the vote test.

use crate::error::{Error, Result};
use crate::knn::{prepare, search, Metric, BATCH_WORK};
use crate::model::rng::Rng;

/// Defaults of [`TransferOptions`].
pub const DEFAULT_K: usize = 15;
pub const DEFAULT_MIN_CONFIDENCE: f64 = 0.5;
pub const DEFAULT_DISTANCE_QUANTILE: f64 = 0.99;
pub const DEFAULT_CALIBRATION_CELLS: usize = 1000;

/// How labels are transferred (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct TransferOptions {
    pub k: usize,
    pub min_confidence: f64,
    pub distance_quantile: f64,
    pub calibration_cells: usize,
    pub seed: u64,
    /// Worker threads (0: all cores).
    pub threads: usize,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            k: DEFAULT_K,
            min_confidence: DEFAULT_MIN_CONFIDENCE,
            distance_quantile: DEFAULT_DISTANCE_QUANTILE,
            calibration_cells: DEFAULT_CALIBRATION_CELLS,
            seed: 0,
            threads: 0,
        }
    }
}

impl TransferOptions {
    /// Check the options against a reference of `n_ref` cells.
    pub fn validate(&self, n_ref: usize) -> Result<()> {
        self.check_ranges()?;
        if self.k == 0 || self.k >= n_ref {
            return Err(Error::invalid(format!(
                "k = {} must be at least 1 and less than the reference's {n_ref} labelled cells",
                self.k
            )));
        }
        Ok(())
    }

    /// Check the options that do not depend on the reference.
    pub fn check_ranges(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(Error::invalid(format!(
                "min_confidence = {} must be between 0 and 1",
                self.min_confidence
            )));
        }
        if !(self.distance_quantile > 0.0 && self.distance_quantile <= 1.0) {
            return Err(Error::invalid(format!(
                "distance_quantile = {} must be greater than 0 and at most 1",
                self.distance_quantile
            )));
        }
        if self.calibration_cells < 2 {
            return Err(Error::invalid(format!(
                "calibration_cells = {} must be at least 2",
                self.calibration_cells
            )));
        }
        Ok(())
    }
}

/// Why a query cell got its label, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The vote's winner, with at least `min_confidence`.
    Assigned,
    /// Near the reference, but its neighbours disagree (confidence below the minimum).
    LowConfidence,
    /// Farther from the reference than the `distance_quantile` of its own cells.
    Distant,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Assigned => "assigned",
            Verdict::LowConfidence => "low_confidence",
            Verdict::Distant => "far_from_reference",
        }
    }
}

/// The transfer's answer for one query cell. Labels are indices into the reference's
/// label list.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The vote's winner (whatever the verdict).
    pub voted: u32,
    pub confidence: f32,
    pub runner_up: Option<u32>,
    pub runner_up_confidence: f32,
    /// Mean cosine distance to the `k` nearest reference cells.
    pub distance: f32,
    pub verdict: Verdict,
}

impl Call {
    /// The transferred label: the vote's winner if assigned, else none ("unknown").
    pub fn label(&self) -> Option<u32> {
        (self.verdict == Verdict::Assigned).then_some(self.voted)
    }
}

/// Every query cell's [`Call`], and the distance threshold the reference gave.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub calls: Vec<Call>,
    pub distance_threshold: f32,
}

/// Transfer labels from `reference` (rows of `dim`, labels `labels[i] < n_labels`) to
/// `queries` (rows of `dim`), cosine distance. `progress(done, total)` is called on the
/// calling thread during the neighbour searches (calibration, then queries); an error
/// it returns stops the work.
pub fn transfer_labels(
    reference: &[f32],
    labels: &[u32],
    n_labels: usize,
    queries: &[f32],
    dim: usize,
    opts: &TransferOptions,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Transfer> {
    let n_ref = labels.len();
    check_rows(reference, dim, n_ref, "reference")?;
    if dim == 0 || queries.len() % dim != 0 {
        return Err(Error::shape(format!(
            "{} query values are not rows of {dim}",
            queries.len()
        )));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= n_labels)
    {
        return Err(Error::invalid(format!(
            "label {l} of reference cell {i} is out of range for {n_labels} labels"
        )));
    }
    opts.validate(n_ref)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |t| t.get()),
        t => t,
    };
    let refs = prepare(reference, dim, Metric::Cosine);
    let threshold = distance_threshold(&refs, dim, opts, threads, progress)?;
    let q = prepare(queries, dim, Metric::Cosine);
    let knn = search(
        &q,
        &refs,
        dim,
        opts.k,
        Metric::Cosine,
        false,
        threads,
        BATCH_WORK,
        progress,
    )?;
    let k = opts.k;
    let mut votes = vec![0f64; n_labels];
    let calls = (0..queries.len() / dim)
        .map(|i| {
            let idx = &knn.idx[i * k..(i + 1) * k];
            let dist = &knn.dist[i * k..(i + 1) * k];
            vote(
                idx,
                dist,
                labels,
                &mut votes,
                threshold,
                opts.min_confidence,
            )
        })
        .collect();
    Ok(Transfer {
        calls,
        distance_threshold: threshold,
    })
}

fn check_rows(data: &[f32], dim: usize, n: usize, what: &str) -> Result<()> {
    if dim == 0 || data.len() != n * dim {
        return Err(Error::shape(format!(
            "the {what} has {} values, not {n} rows of {dim}",
            data.len()
        )));
    }
    Ok(())
}

/// The `distance_quantile` quantile of the reference's own leave-one-out distance
/// statistic, on a seeded sample of `calibration_cells` of its cells (infinity when
/// the quantile is 1: no distance test).
fn distance_threshold(
    refs: &[f32],
    dim: usize,
    opts: &TransferOptions,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<f32> {
    if opts.distance_quantile >= 1.0 {
        return Ok(f32::INFINITY);
    }
    let n = refs.len() / dim;
    let m = opts.calibration_cells.min(n);
    let sample = sample_indices(n, m, opts.seed);
    let mut rows = Vec::with_capacity(m * dim);
    for &i in &sample {
        rows.extend_from_slice(&refs[i * dim..(i + 1) * dim]);
    }
    // k + 1 neighbours: the cell itself is among them (at distance 0) unless an exact
    // duplicate took its place; drop it, or the farthest.
    let k1 = opts.k + 1;
    let knn = search(
        &rows,
        refs,
        dim,
        k1,
        Metric::Cosine,
        false,
        threads,
        BATCH_WORK,
        progress,
    )?;
    let mut stats: Vec<f32> = sample
        .iter()
        .enumerate()
        .map(|(s, &i)| {
            let idx = &knn.idx[s * k1..(s + 1) * k1];
            let dist = &knn.dist[s * k1..(s + 1) * k1];
            let skip = idx.iter().position(|&j| j as usize == i).unwrap_or(opts.k);
            let sum: f64 = (0..k1).filter(|&j| j != skip).map(|j| dist[j] as f64).sum();
            (sum / opts.k as f64) as f32
        })
        .collect();
    stats.sort_by(|a, b| a.total_cmp(b));
    let pos = ((stats.len() - 1) as f64 * opts.distance_quantile).round() as usize;
    Ok(stats[pos.min(stats.len() - 1)])
}

/// `m` of `0..n` drawn without replacement (partial Fisher–Yates), in ascending
/// order; all of them when `m >= n`.
fn sample_indices(n: usize, m: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    if m < n {
        let mut rng = Rng::new(seed);
        for i in 0..m {
            let j = i + rng.below(n - i);
            all.swap(i, j);
        }
        all.truncate(m);
        all.sort_unstable();
    }
    all
}

/// One query cell's vote (see the module doc); `votes` is scratch of one slot per label.
fn vote(
    idx: &[u32],
    dist: &[f32],
    labels: &[u32],
    votes: &mut [f64],
    threshold: f32,
    min_confidence: f64,
) -> Call {
    votes.fill(0.0);
    let weights: Vec<f64> = dist.iter().map(|&d| (1.0 - d as f64).max(0.0)).collect();
    let total: f64 = weights.iter().sum();
    let equal = total <= 0.0;
    let mut seen: Vec<u32> = Vec::with_capacity(idx.len());
    for (&j, &w) in idx.iter().zip(&weights) {
        let l = labels[j as usize];
        votes[l as usize] += if equal { 1.0 } else { w };
        if !seen.contains(&l) {
            seen.push(l);
        }
    }
    let total = if equal { idx.len() as f64 } else { total };
    seen.sort_unstable();
    // the largest total, then the next; ties to the smaller label index
    let mut order = seen.clone();
    order.sort_by(|&a, &b| {
        votes[b as usize]
            .total_cmp(&votes[a as usize])
            .then(a.cmp(&b))
    });
    let voted = order[0];
    let confidence = (votes[voted as usize] / total) as f32;
    let runner_up = order.get(1).copied();
    let runner_up_confidence = runner_up.map_or(0.0, |r| (votes[r as usize] / total) as f32);
    let distance = (dist.iter().map(|&d| d as f64).sum::<f64>() / dist.len() as f64) as f32;
    let verdict = if distance > threshold {
        Verdict::Distant
    } else if (confidence as f64) < min_confidence {
        Verdict::LowConfidence
    } else {
        Verdict::Assigned
    };
    Call {
        voted,
        confidence,
        runner_up,
        runner_up_confidence,
        distance,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `centres` (unit-ish directions) with small noise.
    fn blobs(rng: &mut Rng, centres: &[Vec<f32>], per: usize, noise: f32) -> (Vec<f32>, Vec<u32>) {
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..per {
                data.extend(centre.iter().map(|&x| x + noise * rng.normal() as f32));
                labels.push(c as u32);
            }
        }
        (data, labels)
    }

    fn centres(dim: usize, n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|c| (0..dim).map(|j| if j == c { 1.0 } else { 0.0 }).collect())
            .collect()
    }

    #[test]
    fn labels_transfer_and_a_missing_type_is_unknown() {
        let mut rng = Rng::new(1);
        let dim = 8;
        let cs = centres(dim, 4);
        // reference: types 0, 1, 2; queries: all four, type 3 absent from the reference
        let (reference, labels) = blobs(&mut rng, &cs[..3], 200, 0.1);
        let (queries, truth) = blobs(&mut rng, &cs, 50, 0.1);
        let t = transfer_labels(
            &reference,
            &labels,
            3,
            &queries,
            dim,
            &TransferOptions::default(),
            &mut |_, _| Ok(()),
        )
        .unwrap();
        assert!(t.distance_threshold.is_finite() && t.distance_threshold > 0.0);
        let mut known_right = 0;
        let mut missing_unknown = 0;
        for (c, &y) in t.calls.iter().zip(&truth) {
            if y < 3 {
                known_right += usize::from(c.label() == Some(y));
            } else {
                missing_unknown += usize::from(c.label().is_none());
                assert_eq!(c.verdict, Verdict::Distant);
            }
        }
        assert!(known_right >= 145, "{known_right} of 150 known cells right");
        assert_eq!(missing_unknown, 50);
    }

    #[test]
    fn a_cell_between_two_types_has_low_confidence_and_a_runner_up() {
        let mut rng = Rng::new(2);
        let dim = 4;
        let cs = centres(dim, 2);
        let (reference, labels) = blobs(&mut rng, &cs, 100, 0.3);
        // exactly between the two: the neighbours split
        let mid: Vec<f32> = vec![0.5, 0.5, 0.0, 0.0];
        let opts = TransferOptions {
            k: 30,
            min_confidence: 0.9,
            distance_quantile: 1.0,
            ..TransferOptions::default()
        };
        let t =
            transfer_labels(&reference, &labels, 2, &mid, dim, &opts, &mut |_, _| Ok(())).unwrap();
        let c = &t.calls[0];
        assert_eq!(t.distance_threshold, f32::INFINITY);
        assert_eq!(c.verdict, Verdict::LowConfidence);
        assert!(c.runner_up.is_some());
        assert!((c.confidence + c.runner_up_confidence - 1.0).abs() < 1e-5);
        assert!(c.confidence >= c.runner_up_confidence);
    }

    #[test]
    fn votes_are_weighted_by_similarity_and_ties_go_to_the_first_label() {
        let labels = [0u32, 1, 1, 0];
        let mut votes = vec![0.0; 2];
        // two near label-1 cells outweigh ...
        let c = vote(
            &[1, 2, 0],
            &[0.1, 0.1, 0.5],
            &labels,
            &mut votes,
            f32::INFINITY,
            0.0,
        );
        assert_eq!(c.voted, 1);
        assert!((c.confidence - 1.8 / 2.3).abs() < 1e-6, "{}", c.confidence);
        assert_eq!(c.runner_up, Some(0));
        // ... an exact tie goes to label 0
        let c = vote(
            &[1, 0],
            &[0.2, 0.2],
            &labels,
            &mut votes,
            f32::INFINITY,
            0.0,
        );
        assert_eq!((c.voted, c.runner_up), (0, Some(1)));
        // all similarities 0: equal weights
        let c = vote(
            &[0, 1, 2],
            &[1.5, 1.2, 1.1],
            &labels,
            &mut votes,
            f32::INFINITY,
            0.0,
        );
        assert_eq!(c.voted, 1);
        assert!((c.confidence - 2.0 / 3.0).abs() < 1e-6);
        // one label only: no runner-up
        let c = vote(
            &[0, 3],
            &[0.1, 0.2],
            &labels,
            &mut votes,
            f32::INFINITY,
            0.0,
        );
        assert_eq!((c.voted, c.runner_up, c.confidence), (0, None, 1.0));
    }

    #[test]
    fn bad_options_and_shapes_are_refused() {
        let reference = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let labels = [0u32, 1, 1];
        let ok = |o: TransferOptions| {
            transfer_labels(&reference, &labels, 2, &[1.0, 0.0], 2, &o, &mut |_, _| {
                Ok(())
            })
        };
        let d = TransferOptions {
            k: 1,
            calibration_cells: 3,
            ..TransferOptions::default()
        };
        assert!(ok(d.clone()).is_ok());
        for (o, msg) in [
            (
                TransferOptions { k: 3, ..d.clone() },
                "less than the reference's 3",
            ),
            (TransferOptions { k: 0, ..d.clone() }, "at least 1"),
            (
                TransferOptions {
                    min_confidence: 1.5,
                    ..d.clone()
                },
                "min_confidence = 1.5",
            ),
            (
                TransferOptions {
                    distance_quantile: 0.0,
                    ..d.clone()
                },
                "distance_quantile = 0",
            ),
        ] {
            let e = ok(o).unwrap_err();
            assert!(e.message.contains(msg), "{}", e.message);
        }
        let e = transfer_labels(
            &reference,
            &labels,
            2,
            &[1.0, 0.0, 3.0],
            2,
            &d,
            &mut |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(e.message.contains("not rows of 2"), "{}", e.message);
        let e = transfer_labels(
            &reference,
            &[0, 1, 2],
            2,
            &[1.0, 0.0],
            2,
            &d,
            &mut |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(
            e.message.contains("label 2 of reference cell 2"),
            "{}",
            e.message
        );
    }
}
