//! How well a set of cells matches a model's gene vocabulary: the share of the model's
//! genes the cells express and the share of their counts that fall on those genes. A
//! table whose gene identifiers differ from the model's (Ensembl ids against symbols,
//! another species, another annotation release) embeds silently into noise; this says
//! so before anyone trusts the result.

use crate::error::Result;
use crate::model::cell::RawCell;
use std::collections::HashMap;

/// Below this share of the model's genes expressed, embedding functions warn.
pub const LOW_VOCABULARY_COVERAGE: f64 = 0.5;

/// How many unmatched genes a report names.
pub const EXAMPLES: usize = 10;

/// Streaming statistics of cells against a vocabulary.
#[derive(Debug)]
pub struct CoverageFit<'a> {
    vocab: &'a HashMap<String, u32>,
    expressed: Vec<bool>,
    /// Counts of each table gene that is not in the vocabulary.
    unmatched: HashMap<String, f64>,
    matched_names: usize,
    on_model: f64,
    total: f64,
    cells: u64,
    without: u64,
    fractions: Vec<f32>,
}

/// The report of [`CoverageFit::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage {
    pub cells: u64,
    pub model_genes: usize,
    /// Model genes with a non-zero count in at least one cell.
    pub expressed_model_genes: usize,
    /// `expressed_model_genes / model_genes`.
    pub vocabulary_coverage: f64,
    /// Distinct genes with a non-zero count in the cells.
    pub table_genes: usize,
    /// Share of all counts on the model's genes.
    pub count_fraction: f64,
    /// Median over cells of each cell's share of counts on the model's genes.
    pub median_cell_fraction: f64,
    /// Cells with no count on any model gene (they cannot be embedded).
    pub cells_without_model_genes: u64,
    /// The most-counted genes of the cells that the model does not know.
    pub unmatched_examples: Vec<String>,
}

impl<'a> CoverageFit<'a> {
    pub fn new(vocab: &'a HashMap<String, u32>) -> CoverageFit<'a> {
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        CoverageFit {
            vocab,
            expressed: vec![false; n],
            unmatched: HashMap::new(),
            matched_names: 0,
            on_model: 0.0,
            total: 0.0,
            cells: 0,
            without: 0,
            fractions: Vec::new(),
        }
    }

    /// One cell as parallel gene and count arrays (checked as everywhere: NULL elements,
    /// negative or non-finite counts and repeated genes are errors).
    pub fn add_cell(&mut self, genes: &[Option<&str>], counts: &[Option<f32>]) -> Result<()> {
        if genes.len() != counts.len() {
            return Err(crate::Error::shape(format!(
                "genes has {} elements but counts has {}",
                genes.len(),
                counts.len()
            )));
        }
        let vocab = self.vocab;
        let (cell, _) = RawCell::read(
            |g| vocab.get(g).copied(),
            genes.iter().copied(),
            counts.iter().copied(),
        )?;
        let mut on = 0.0f64;
        for (&g, &c) in cell.genes.iter().zip(&cell.counts) {
            on += c as f64;
            if !self.expressed[g as usize] {
                self.expressed[g as usize] = true;
                self.matched_names += 1;
            }
        }
        for (g, c) in genes.iter().zip(counts) {
            if let (Some(g), Some(c)) = (g, c) {
                if *c > 0.0 && !vocab.contains_key(*g) {
                    *self.unmatched.entry(g.to_string()).or_insert(0.0) += *c as f64;
                }
            }
        }
        self.on_model += on;
        self.total += cell.total;
        self.cells += 1;
        if cell.genes.is_empty() {
            self.without += 1;
        }
        if cell.total > 0.0 {
            self.fractions.push((on / cell.total) as f32);
        }
        Ok(())
    }

    /// Bytes held, for memory limits.
    pub fn bytes(&self) -> usize {
        self.fractions.len() * 4 + self.unmatched.keys().map(|k| k.len() + 48).sum::<usize>()
    }

    pub fn finish(mut self) -> Coverage {
        let model_genes = self.vocab.len();
        self.fractions.sort_by(|a, b| a.total_cmp(b));
        let median = match self.fractions.len() {
            0 => 0.0,
            n if n % 2 == 1 => self.fractions[n / 2] as f64,
            n => (self.fractions[n / 2 - 1] as f64 + self.fractions[n / 2] as f64) / 2.0,
        };
        let mut top: Vec<(String, f64)> = self.unmatched.into_iter().collect();
        let table_genes = self.matched_names + top.len();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Coverage {
            cells: self.cells,
            model_genes,
            expressed_model_genes: self.matched_names,
            vocabulary_coverage: self.matched_names as f64 / model_genes.max(1) as f64,
            table_genes,
            count_fraction: if self.total > 0.0 {
                self.on_model / self.total
            } else {
                0.0
            },
            median_cell_fraction: median,
            cells_without_model_genes: self.without,
            unmatched_examples: top.into_iter().take(EXAMPLES).map(|t| t.0).collect(),
        }
    }
}

/// A warning for low coverage: when the cells express less than
/// [`LOW_VOCABULARY_COVERAGE`] of the model's genes.
pub fn warning(c: &Coverage, what: &str) -> Option<String> {
    (c.cells > 0 && c.vocabulary_coverage < LOW_VOCABULARY_COVERAGE).then(|| {
        format!(
            "{what} expresses only {} of the model's {} genes ({:.1}%), and {:.1}% of its counts fall on them: the embeddings will carry little of the cells' expression",
            c.expressed_model_genes,
            c.model_genes,
            100.0 * c.vocabulary_coverage,
            100.0 * c.count_fraction
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_genes_and_fractions() {
        let vocab: HashMap<String, u32> = [("A", 0), ("B", 1), ("C", 2), ("D", 3)]
            .iter()
            .map(|(g, i)| (g.to_string(), *i))
            .collect();
        let mut f = CoverageFit::new(&vocab);
        // cell 1: 3 of 4 counts on the model (A), X unknown
        f.add_cell(&[Some("A"), Some("X")], &[Some(3.0), Some(1.0)])
            .unwrap();
        // cell 2: all on the model (A, B; C at zero is not expressed)
        f.add_cell(&[Some("B"), Some("C")], &[Some(2.0), Some(0.0)])
            .unwrap();
        // cell 3: nothing on the model
        f.add_cell(&[Some("Y"), Some("X")], &[Some(5.0), Some(1.0)])
            .unwrap();
        let c = f.finish();
        assert_eq!(c.cells, 3);
        assert_eq!(
            (c.model_genes, c.expressed_model_genes, c.table_genes),
            (4, 2, 4)
        );
        assert_eq!(c.vocabulary_coverage, 0.5);
        assert!((c.count_fraction - 5.0 / 12.0).abs() < 1e-12);
        assert_eq!(c.median_cell_fraction, 0.75);
        assert_eq!(c.cells_without_model_genes, 1);
        assert_eq!(c.unmatched_examples, vec!["Y".to_string(), "X".to_string()]);
        assert!(warning(&c, "t").is_none()); // 0.5 is not below 0.5
    }

    #[test]
    fn warns_when_most_genes_are_missing_and_checks_cells() {
        let vocab: HashMap<String, u32> = (0..10).map(|i| (format!("G{i}"), i)).collect();
        let mut f = CoverageFit::new(&vocab);
        f.add_cell(&[Some("G1"), Some("ENSG1")], &[Some(1.0), Some(9.0)])
            .unwrap();
        assert!(f.add_cell(&[Some("G1")], &[Some(-1.0)]).is_err());
        assert!(f
            .add_cell(&[Some("G1"), None], &[Some(1.0), Some(1.0)])
            .is_err());
        assert!(f.add_cell(&[Some("G1")], &[]).is_err());
        let c = f.finish();
        let w = warning(&c, "table t").unwrap();
        assert!(
            w.contains("only 1 of the model's 10 genes (10.0%)")
                && w.contains("10.0% of its counts"),
            "{w}"
        );
    }
}
