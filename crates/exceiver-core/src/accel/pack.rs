//! Host side of a batch: checking cells (the same errors as the CPU model and trainer)
//! and packing them into padded arrays for the device, plus the chunking plan that
//! keeps a batch's largest intermediate tensor within a size budget.

use super::net::{EncHost, PAD};
use crate::error::{Error, Result};
use crate::model::config::{AttentionMode, Config};
use crate::train::TrainCell;

/// Marks seen gene indices without clearing a G-sized buffer per cell.
pub(crate) struct Seen {
    stamp: Vec<u32>,
    epoch: u32,
}

impl Seen {
    pub(crate) fn new(n: usize) -> Seen {
        Seen {
            stamp: vec![0; n],
            epoch: 0,
        }
    }

    fn next(&mut self, n: usize) -> u32 {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.fill(0);
            self.epoch = 1;
        }
        self.epoch
    }
}

/// Check one inference cell: equal lengths, gene indices in range and distinct, finite
/// values, and at least one gene when the encoder attends to expressed genes only.
pub(crate) fn check_cell(
    cfg: &Config,
    seen: &mut Seen,
    genes: &[u32],
    values: &[f32],
) -> Result<()> {
    let g = cfg.seq_len;
    if genes.len() != values.len() {
        return Err(Error::shape(format!(
            "a cell has {} gene indices but {} values",
            genes.len(),
            values.len()
        )));
    }
    if genes.is_empty() && cfg.attention == AttentionMode::ExpressedOnly {
        return Err(Error::invalid(
            "a cell needs at least one expressed gene when the encoder attends to expressed genes only",
        ));
    }
    let e = seen.next(g);
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
        if seen.stamp[gu] == e {
            return Err(Error::invalid(format!(
                "gene index {gi} appears more than once in a cell (again at position {p})"
            )));
        }
        seen.stamp[gu] = e;
    }
    Ok(())
}

/// Check one training cell as the CPU trainer does: a valid cell with at least one
/// gene, distinct in-range mask positions, a label exactly when the model classifies.
pub(crate) fn check_train_cell(cfg: &Config, seen: &mut Seen, cell: &TrainCell) -> Result<()> {
    let nnz = cell.genes.len();
    if cell.values.len() != nnz {
        return Err(Error::shape(format!(
            "a cell has {nnz} gene indices but {} values",
            cell.values.len()
        )));
    }
    if nnz == 0 {
        return Err(Error::invalid("a cell has no expressed genes"));
    }
    check_cell(cfg, seen, &cell.genes, &cell.values)?;
    let e = seen.next(nnz);
    for &mp in &cell.mask {
        if mp >= nnz {
            return Err(Error::invalid(format!(
                "mask position {mp} is out of range for a cell with {nnz} expressed genes"
            )));
        }
        if seen.stamp[mp] == e {
            return Err(Error::invalid(format!(
                "mask position {mp} appears more than once"
            )));
        }
        seen.stamp[mp] = e;
    }
    match (cfg.num_classes, cell.label) {
        (Some(c), Some(l)) if l >= c => Err(Error::invalid(format!(
            "label {l} is out of range for a classifier with {c} classes"
        ))),
        (Some(_), None) => Err(Error::invalid(
            "a cell has no label, but the model is a classifier",
        )),
        (None, Some(_)) => Err(Error::invalid(
            "a cell has a label, but the model is not a classifier",
        )),
        _ => Ok(()),
    }
}

/// One cell as the encoder sees it; `masked` positions are fed as the mask token
/// (embedding row G) with value 1.0, as the reference does in training.
pub(crate) struct CellRef<'a> {
    pub(crate) genes: &'a [u32],
    pub(crate) values: &'a [f32],
    pub(crate) masked: &'a [usize],
}

/// Pad a batch's expressed genes to `[B, L]` (L at least 1). Padding entries use the
/// mask token with value 0 and the logit bias `PAD`. With [`Config::profile`] also the
/// profile path's input, `v_g − zero_fill_g` of each unmasked gene, dense `[B, G]`.
pub(crate) fn pack_cells(cfg: &Config, zero_fill: &[f32], cells: &[CellRef<'_>]) -> EncHost {
    let g = cfg.seq_len;
    let b = cells.len();
    let l = cells
        .iter()
        .map(|c| c.genes.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mask_row = g as u32;
    let mut tok = vec![mask_row; b * l];
    let mut val = vec![0.0f32; b * l];
    let mut pad = vec![PAD; b * l];
    let reference = cfg.attention == AttentionMode::Reference;
    let mut expressed = if reference {
        Some(vec![0u8; b * g])
    } else {
        None
    };
    let mut profile = cfg.profile.then(|| vec![0.0f32; b * g]);
    for (c, cell) in cells.iter().enumerate() {
        let row = c * l;
        tok[row..row + cell.genes.len()].copy_from_slice(cell.genes);
        val[row..row + cell.values.len()].copy_from_slice(cell.values);
        pad[row..row + cell.genes.len()].fill(0.0);
        if let Some(pr) = profile.as_mut() {
            for (&gi, &v) in cell.genes.iter().zip(cell.values) {
                pr[c * g + gi as usize] = v - zero_fill[gi as usize];
            }
            for &p in cell.masked {
                pr[c * g + cell.genes[p] as usize] = 0.0;
            }
        }
        for &p in cell.masked {
            tok[row + p] = mask_row;
            val[row + p] = 1.0;
        }
        if let Some(ex) = expressed.as_mut() {
            for &gi in cell.genes {
                ex[c * g + gi as usize] = 1;
            }
        }
    }
    let nonempty = cells.iter().any(|c| c.genes.is_empty()).then(|| {
        cells
            .iter()
            .map(|c| if c.genes.is_empty() { 0.0 } else { 1.0 })
            .collect()
    });
    EncHost {
        b,
        l,
        tok,
        val,
        pad,
        expressed,
        nonempty,
        profile,
    }
}

/// Decoder query rows `[B·Q]`: each cell's rows padded (with row 0) to the longest
/// list, then the class token G + 1 when `class`. Returns (rows, longest list).
pub(crate) fn pack_queries(cfg: &Config, lists: &[Vec<u32>], class: bool) -> (Vec<u32>, usize) {
    let qmax = lists.iter().map(Vec::len).max().unwrap_or(0);
    let width = qmax + usize::from(class);
    let mut rows = vec![0u32; lists.len() * width];
    for (c, list) in lists.iter().enumerate() {
        rows[c * width..c * width + list.len()].copy_from_slice(list);
        if class {
            rows[c * width + qmax] = cfg.seq_len as u32 + 1;
        }
    }
    (rows, qmax)
}

/// Split cells into chunks (lists of positions into `lens`), taking them in order of
/// their number of expressed genes, so that in every chunk
/// `cells · per_cell(longest)` stays within `budget` (a chunk holds at least one cell).
pub(crate) fn plan_chunks(
    lens: &[usize],
    budget: usize,
    per_cell: impl Fn(usize) -> usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        let cost = (cur.len() + 1).saturating_mul(per_cell(lens[i].max(1)));
        if !cur.is_empty() && cost > budget {
            chunks.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_the_budget_and_keep_every_cell_once() {
        let lens = [5, 1, 9, 3, 3, 0, 7];
        let chunks = plan_chunks(&lens, 20, |l| 2 * l);
        let mut all: Vec<usize> = chunks.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        for c in &chunks {
            let longest = c.iter().map(|&i| lens[i].max(1)).max().unwrap();
            assert!(c.len() == 1 || c.len() * 2 * longest <= 20, "{c:?}");
        }
        // a cell larger than the budget still gets a chunk of its own
        assert_eq!(plan_chunks(&[100], 10, |l| l), vec![vec![0]]);
    }

    #[test]
    fn packing_pads_and_masks() {
        let mut cfg = Config::small(10);
        cfg.attention = AttentionMode::Reference;
        let cells = [
            CellRef {
                genes: &[3, 7],
                values: &[0.5, 2.0],
                masked: &[1],
            },
            CellRef {
                genes: &[1],
                values: &[4.0],
                masked: &[],
            },
        ];
        let h = pack_cells(&cfg, &vec![1.0; cfg.seq_len], &cells);
        assert_eq!((h.b, h.l), (2, 2));
        assert_eq!(h.tok, vec![3, 10, 1, 10]);
        assert_eq!(h.val, vec![0.5, 1.0, 4.0, 0.0]);
        assert_eq!(h.pad, vec![0.0, 0.0, 0.0, PAD]);
        let ex = h.expressed.unwrap();
        assert_eq!(ex.iter().map(|&x| x as usize).sum::<usize>(), 3);
        assert_eq!((ex[3], ex[7], ex[10 + 1]), (1, 1, 1));
        let (rows, q) = pack_queries(&cfg, &[vec![4, 5], vec![6]], true);
        assert_eq!(q, 2);
        assert_eq!(rows, vec![4, 5, 11, 6, 0, 11]);
    }
}
