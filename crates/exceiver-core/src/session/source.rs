//! [`InMemory`]: a [`CellSource`] over a loaded file, for tests, the experiment program
//! and the benchmarks. Its split follows the SQL source's rules (a hash of the cell id
//! and the seed picks the validation cells; `max_cells` takes the first cells by id;
//! `label_fraction` a hash of the id) with its own hash function, so the exact cells
//! differ from a run on a PostgreSQL table (`hashtext`, `md5`).

use super::{CellSource, Options, Pass};
use crate::data::{CellMatrix, ObsValues};
use crate::error::{Error, Result};
use crate::model::cell::{RawCell, Vocab};

/// Which cells train and which validate.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Fraction of cells (by hash of id and seed) that validate.
    pub val_fraction: f64,
    pub seed: u64,
    /// Only the first `max_cells` training cells by id.
    pub max_cells: Option<usize>,
    /// Classifiers: the fraction of labelled cells used (by hash of id and seed).
    pub label_fraction: f64,
}

impl Split {
    pub fn from_options(o: &Options) -> Split {
        Split {
            val_fraction: o.val_fraction,
            seed: o.seed,
            max_cells: o.max_cells.map(|n| n.max(0) as usize),
            label_fraction: o.label_fraction,
        }
    }
}

/// FNV-1a of `s`, salted with `seed`.
fn fnv(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn below(h: u64, fraction: f64) -> bool {
    h % 1_000_000 < (fraction * 1_000_000.0).round() as u64
}

/// A label column of a loaded file as text (None where missing).
pub fn text_column(m: &CellMatrix, name: &str) -> Result<Vec<Option<String>>> {
    let col = m.obs.iter().find(|c| c.name == name).ok_or_else(|| {
        Error::new(
            crate::error::Kind::UndefinedObject,
            format!("the cells have no column \"{name}\""),
        )
    })?;
    Ok(match &col.values {
        ObsValues::Text(v) => v.clone(),
        ObsValues::Int(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        ObsValues::Float(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        ObsValues::Bool(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
    })
}

/// The cells of a loaded file as a training source.
pub struct InMemory<'a> {
    m: &'a CellMatrix,
    name: String,
    labels: Option<Vec<Option<String>>>,
    train: Vec<usize>,
    val: Vec<usize>,
    seed: u64,
}

impl<'a> InMemory<'a> {
    /// `label_column`: train a classifier on this column (cells without a label are
    /// left out, as are those outside `label_fraction`).
    pub fn new(
        m: &'a CellMatrix,
        name: &str,
        split: &Split,
        label_column: Option<&str>,
    ) -> Result<InMemory<'a>> {
        let labels = label_column.map(|c| text_column(m, c)).transpose()?;
        let mut by_id: Vec<usize> = (0..m.n_cells()).collect();
        by_id.sort_by(|&a, &b| m.barcodes[a].cmp(&m.barcodes[b]));
        let used = |c: usize| match &labels {
            Some(l) => {
                l[c].is_some()
                    && below(
                        fnv(&format!("{}:labels", m.barcodes[c]), split.seed),
                        split.label_fraction,
                    )
            }
            None => true,
        };
        let is_val = |c: usize| below(fnv(&m.barcodes[c], split.seed), split.val_fraction);
        let mut train: Vec<usize> = by_id
            .iter()
            .copied()
            .filter(|&c| used(c) && !is_val(c))
            .collect();
        if let Some(n) = split.max_cells {
            train.truncate(n);
        }
        let val = by_id
            .into_iter()
            .filter(|&c| used(c) && is_val(c))
            .collect();
        Ok(InMemory {
            m,
            name: name.to_string(),
            labels,
            train,
            val,
            seed: split.seed,
        })
    }

    /// The training cells (indices into the matrix), in id order.
    pub fn training_cells(&self) -> &[usize] {
        &self.train
    }
    /// The validation cells, in id order.
    pub fn validation_cells(&self) -> &[usize] {
        &self.val
    }

    fn cell(&self, c: usize, map: &[Option<u32>]) -> RawCell {
        let (gi, x) = self.m.cell(c);
        let mut r = RawCell {
            label: self.labels.as_ref().and_then(|l| l[c].clone()),
            ..RawCell::default()
        };
        for (&g, &v) in gi.iter().zip(x) {
            r.total += v as f64;
            if let (true, Some(i)) = (v > 0.0, map[g as usize]) {
                r.genes.push(i);
                r.counts.push(v);
            }
        }
        r
    }
}

impl CellSource for InMemory<'_> {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn has_cells(&mut self) -> Result<bool> {
        Ok(self.m.n_cells() > 0)
    }

    fn expressed_genes(&mut self, min_cells: i64) -> Result<Vec<String>> {
        let mut n = vec![0i64; self.m.n_genes()];
        for &c in &self.train {
            for &g in self.m.cell(c).0 {
                n[g as usize] += 1;
            }
        }
        let mut genes: Vec<String> = (0..self.m.n_genes())
            .filter(|&g| n[g] >= min_cells)
            .map(|g| self.m.genes[g].clone())
            .collect();
        genes.sort();
        Ok(genes)
    }

    fn scan(
        &mut self,
        pass: Pass,
        batch: usize,
        vocab: &Vocab,
        each: &mut dyn FnMut(Vec<RawCell>) -> Result<()>,
    ) -> Result<()> {
        let map: Vec<Option<u32>> = self.m.genes.iter().map(|g| vocab.get(g)).collect();
        let order: Vec<usize> = match pass {
            Pass::Training => self.train.clone(),
            Pass::Validation => self.val.clone(),
            Pass::Shuffled { epoch } => {
                let salt = format!(":{}:{epoch}", self.seed);
                let mut keyed: Vec<(u64, usize)> = self
                    .train
                    .iter()
                    .map(|&c| (fnv(&format!("{}{salt}", self.m.barcodes[c]), 0), c))
                    .collect();
                keyed.sort_unstable();
                keyed.into_iter().map(|(_, c)| c).collect()
            }
        };
        for chunk in order.chunks(batch.max(1)) {
            each(chunk.iter().map(|&c| self.cell(c, &map)).collect())?;
        }
        Ok(())
    }
}
