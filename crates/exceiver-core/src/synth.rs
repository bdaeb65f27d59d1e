//! Realistic synthetic cells for scale measurements (`make scale`): real cells resampled
//! and thinned, so that gene identities, depths and sparsity stay those of real data.
//!
//! Cell `i` of a run is a pure function of `(seed, i)`: a real cell drawn uniformly from
//! the source datasets, each of its counts thinned binomially with a keep-probability
//! drawn per cell from `[min_keep, 1]` (as if it had been sequenced less deeply). A cell
//! that thinning would empty keeps one count of its most-counted gene. Genes are the
//! union of the sources' genes, in name order.

use crate::data::CellMatrix;
use crate::model::rng::Rng;
use crate::{Error, Result};

pub struct Resampler<'a> {
    sources: Vec<&'a CellMatrix>,
    /// `maps[s][g]`: source `s`'s gene `g` in the union.
    maps: Vec<Vec<u32>>,
    /// Union of the sources' gene symbols, sorted.
    pub genes: Vec<String>,
    /// A gene identifier per union gene (the first source's id, else the symbol).
    pub gene_ids: Vec<String>,
    /// Cumulative cell counts of the sources, for the uniform draw.
    offsets: Vec<usize>,
    pub seed: u64,
    pub min_keep: f64,
}

/// One synthetic cell: union gene indices (ascending), integer counts, and the source
/// (dataset index, cell index) it was drawn from.
pub struct SynthCell {
    pub genes: Vec<u32>,
    pub counts: Vec<u32>,
    pub source: (usize, usize),
}

impl<'a> Resampler<'a> {
    pub fn new(sources: Vec<&'a CellMatrix>, seed: u64, min_keep: f64) -> Result<Self> {
        if sources.iter().all(|m| m.n_cells() == 0) {
            return Err(Error::invalid("the source datasets have no cells"));
        }
        if !(min_keep > 0.0 && min_keep <= 1.0) {
            return Err(Error::invalid(format!(
                "min_keep = {min_keep} must be in (0, 1]"
            )));
        }
        let mut genes: Vec<String> = sources
            .iter()
            .flat_map(|m| m.genes.iter().cloned())
            .collect();
        genes.sort();
        genes.dedup();
        let mut gene_ids: Vec<String> = vec![String::new(); genes.len()];
        let mut maps = Vec::with_capacity(sources.len());
        for m in &sources {
            let map: Vec<u32> = m
                .genes
                .iter()
                .map(|g| genes.binary_search(g).map(|i| i as u32))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::internal("gene missing from the union"))?;
            for (k, &u) in map.iter().enumerate() {
                if gene_ids[u as usize].is_empty() {
                    if let Some(id) = m.gene_ids.get(k).filter(|s| !s.is_empty()) {
                        gene_ids[u as usize] = id.clone();
                    }
                }
            }
            maps.push(map);
        }
        for (id, g) in gene_ids.iter_mut().zip(&genes) {
            if id.is_empty() {
                *id = g.clone();
            }
        }
        let mut offsets = vec![0];
        for m in &sources {
            offsets.push(offsets.last().unwrap() + m.n_cells());
        }
        Ok(Resampler {
            sources,
            maps,
            genes,
            gene_ids,
            offsets,
            seed,
            min_keep,
        })
    }

    /// Real cells across the sources.
    pub fn source_cells(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    /// Synthetic cell `i`.
    pub fn cell(&self, i: u64) -> SynthCell {
        let mut rng = Rng::new(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let k = rng.below(self.source_cells());
        let s = self.offsets.partition_point(|&o| o <= k) - 1;
        let c = k - self.offsets[s];
        let keep = rng.uniform_range(self.min_keep, 1.0);
        let (g, x) = self.sources[s].cell(c);
        let mut entries: Vec<(u32, u32)> = Vec::with_capacity(g.len());
        let mut top = (0u32, 0u32);
        for (&gi, &v) in g.iter().zip(x) {
            let n = v.round().max(0.0) as u32;
            if n > top.1 {
                top = (self.maps[s][gi as usize], n);
            }
            let kept = (0..n).filter(|_| rng.uniform() < keep).count() as u32;
            if kept > 0 {
                entries.push((self.maps[s][gi as usize], kept));
            }
        }
        if entries.is_empty() && top.1 > 0 {
            entries.push((top.0, 1));
        }
        entries.sort_unstable_by_key(|e| e.0);
        SynthCell {
            genes: entries.iter().map(|e| e.0).collect(),
            counts: entries.iter().map(|e| e.1).collect(),
            source: (s, c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(genes: &[&str], cells: &[&[(u32, f32)]]) -> CellMatrix {
        let mut m = CellMatrix {
            barcodes: (0..cells.len()).map(|i| format!("c{i}")).collect(),
            genes: genes.iter().map(|s| s.to_string()).collect(),
            indptr: vec![0],
            ..Default::default()
        };
        for c in cells {
            for &(g, x) in *c {
                m.indices.push(g);
                m.data.push(x);
            }
            m.indptr.push(m.data.len());
        }
        m
    }

    #[test]
    fn resampled_cells_are_thinned_real_cells_in_union_genes() {
        let a = matrix(&["B", "D"], &[&[(0, 100.0), (1, 50.0)], &[(1, 3.0)]]);
        let b = matrix(&["A", "B", "C"], &[&[(0, 20.0), (2, 40.0)]]);
        let r = Resampler::new(vec![&a, &b], 7, 0.5).unwrap();
        assert_eq!(r.genes, ["A", "B", "C", "D"]);
        assert_eq!(r.source_cells(), 3);
        let mut seen = [0usize; 3];
        for i in 0..600 {
            let c = r.cell(i);
            // deterministic
            let again = r.cell(i);
            assert_eq!(
                (c.genes.clone(), c.counts.clone()),
                (again.genes, again.counts)
            );
            assert!(c.genes.windows(2).all(|w| w[0] < w[1]));
            assert!(!c.genes.is_empty());
            let (src, cell) = c.source;
            seen[r.offsets[src] + cell] += 1;
            // counts never exceed the source's, and keep at least half on average
            let (g, x) = r.sources[src].cell(cell);
            let orig: Vec<(u32, u32)> = g
                .iter()
                .map(|&k| r.maps[src][k as usize])
                .zip(x.iter().map(|&v| v as u32))
                .collect();
            for (gi, n) in c.genes.iter().zip(&c.counts) {
                let o = orig
                    .iter()
                    .find(|e| e.0 == *gi)
                    .expect("a gene of the source cell");
                assert!(*n <= o.1 && *n > 0);
            }
        }
        // every real cell is drawn, roughly uniformly
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        // depth: the 150-count cell keeps between 50 % and 100 % of its counts on average
        let depth: Vec<u32> = (0..600)
            .map(|i| r.cell(i))
            .filter(|c| c.source == (0, 0))
            .map(|c| c.counts.iter().sum())
            .collect();
        let mean = depth.iter().sum::<u32>() as f64 / depth.len() as f64;
        assert!((100.0..125.0).contains(&mean), "mean depth {mean}");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let empty = CellMatrix::default();
        assert!(Resampler::new(vec![&empty], 1, 0.5).is_err());
        let a = matrix(&["A"], &[&[(0, 1.0)]]);
        assert!(Resampler::new(vec![&a], 1, 0.0).is_err());
        assert!(Resampler::new(vec![&a], 1, 1.5).is_err());
    }
}
