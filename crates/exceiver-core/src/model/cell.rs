//! The one cell contract: how a cell given as parallel (gene symbol, count) sequences
//! becomes model input, with one set of checks and messages for every caller (SQL
//! functions per row, training scans, files read in memory).
//!
//! - Every element must be present (22004), every count finite and non-negative (22000).
//! - Genes outside the vocabulary are ignored and counted; zero counts are dropped (the
//!   model's input is the expressed genes; `Scaler::zero_fill` stands for the rest).
//! - A vocabulary gene may appear once per cell (22000).
//! - The library size is the sum of **all** the cell's counts, in the vocabulary or not:
//!   values are `log1p(count / total · 10⁴)`, then the model's per-gene scaler.

use crate::error::{Error, Kind, Result};
use crate::preprocess::{log1p32, normalize_count, Scaler};
use std::collections::HashMap;

/// A gene vocabulary: names in model order and their indices.
#[derive(Debug, Clone, Default)]
pub struct Vocab {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    /// A vocabulary from names in model order; names must be unique.
    pub fn new(names: Vec<String>) -> Result<Vocab> {
        let mut index = HashMap::with_capacity(names.len());
        for (i, g) in names.iter().enumerate() {
            if index.insert(g.clone(), i as u32).is_some() {
                return Err(Error::invalid(format!(
                    "gene \"{g}\" appears more than once in the vocabulary"
                )));
            }
        }
        Ok(Vocab { names, index })
    }
    pub fn get(&self, gene: &str) -> Option<u32> {
        self.index.get(gene).copied()
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn into_names(self) -> Vec<String> {
        self.names
    }
}

/// One cell over a vocabulary: indices and raw counts of its expressed vocabulary genes,
/// its library size over all its genes, and its label (classifier training).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawCell {
    pub genes: Vec<u32>,
    pub counts: Vec<f32>,
    pub total: f64,
    pub label: Option<String>,
}

impl RawCell {
    /// Read a cell from parallel sequences; returns it and how many of its genes were
    /// outside the vocabulary. `genes` and `counts` must have the same length (checked
    /// by the caller, which knows their lengths).
    pub fn read<'a>(
        lookup: impl Fn(&str) -> Option<u32>,
        genes: impl Iterator<Item = Option<&'a str>>,
        counts: impl Iterator<Item = Option<f32>>,
    ) -> Result<(RawCell, usize)> {
        let mut c = RawCell::default();
        let mut names: Vec<&str> = Vec::new();
        let mut unknown = 0usize;
        for (p, (g, x)) in genes.zip(counts).enumerate() {
            let g =
                g.ok_or_else(|| Error::new(Kind::NullValue, format!("genes[{}] is NULL", p + 1)))?;
            let x =
                x.ok_or_else(|| Error::new(Kind::NullValue, format!("counts[{}] is NULL", p + 1)))?;
            if !x.is_finite() || x < 0.0 {
                return Err(Error::data(format!(
                    "counts[{}] = {x} for gene \"{g}\": counts must be finite and non-negative",
                    p + 1
                )));
            }
            c.total += x as f64;
            match lookup(g) {
                Some(i) => {
                    c.genes.push(i);
                    c.counts.push(x);
                    names.push(g);
                }
                None => unknown += 1,
            }
        }
        let mut order: Vec<usize> = (0..c.genes.len()).collect();
        order.sort_unstable_by_key(|&p| c.genes[p]);
        if let Some(w) = order.windows(2).find(|w| c.genes[w[0]] == c.genes[w[1]]) {
            return Err(Error::data(format!(
                "gene \"{}\" appears more than once in the cell",
                names[w[1]]
            )));
        }
        let keep: Vec<bool> = c.counts.iter().map(|&x| x > 0.0).collect();
        if keep.iter().any(|k| !k) {
            let mut k = keep.iter();
            c.genes.retain(|_| *k.next().unwrap_or(&false));
            let mut k = keep.iter();
            c.counts.retain(|_| *k.next().unwrap_or(&false));
        }
        Ok((c, unknown))
    }

    /// log1p of the library-size normalised counts (counts per 10,000).
    pub fn log_norm(&self) -> Vec<f32> {
        self.counts
            .iter()
            .map(|&x| log1p32(normalize_count(x, self.total)))
            .collect()
    }

    /// Model input values: the scaler applied to [`RawCell::log_norm`].
    pub fn model_values(&self, scaler: &Scaler) -> Vec<f32> {
        self.genes
            .iter()
            .zip(self.log_norm())
            .map(|(&g, y)| scaler.value(g as usize, y))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocab {
        Vocab::new(vec!["A".into(), "B".into(), "C".into()]).unwrap()
    }

    fn read(g: &[Option<&str>], x: &[Option<f32>]) -> Result<(RawCell, usize)> {
        let v = vocab();
        RawCell::read(|s| v.get(s), g.iter().copied(), x.iter().copied())
    }

    #[test]
    fn unknown_genes_count_in_the_library_size_and_zeros_are_dropped() {
        let (c, unknown) = read(
            &[Some("C"), Some("X"), Some("A"), Some("B")],
            &[Some(2.0), Some(5.0), Some(0.0), Some(3.0)],
        )
        .unwrap();
        assert_eq!(unknown, 1);
        assert_eq!(c.genes, vec![2, 1]);
        assert_eq!(c.counts, vec![2.0, 3.0]);
        assert_eq!(c.total, 10.0);
        let y = c.log_norm();
        assert!((y[0] - (1.0f32 + 2000.0).ln()).abs() < 1e-5);
    }

    #[test]
    fn every_bad_element_is_named() {
        let e = read(&[Some("A"), None], &[Some(1.0), Some(1.0)]).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (Kind::NullValue, "genes[2] is NULL")
        );
        let e = read(&[Some("A")], &[None]).unwrap_err();
        assert_eq!(e.message, "counts[1] is NULL");
        let e = read(&[Some("A"), Some("B")], &[Some(1.0), Some(f32::NAN)]).unwrap_err();
        assert_eq!(e.kind, Kind::Data);
        assert!(
            e.message.contains("counts[2] = NaN for gene \"B\""),
            "{}",
            e.message
        );
        let e = read(
            &[Some("A"), Some("B"), Some("A")],
            &[Some(1.0), Some(1.0), Some(0.0)],
        )
        .unwrap_err();
        assert_eq!(e.message, "gene \"A\" appears more than once in the cell");
        let e = Vocab::new(vec!["A".into(), "A".into()]).unwrap_err();
        assert!(e.message.contains("more than once in the vocabulary"));
    }
}
