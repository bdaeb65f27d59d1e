//! Single-cell file readers: 10x Cell Ranger folders (Matrix Market) and HDF5 files, and
//! AnnData `.h5ad`. Every reader returns a [`CellMatrix`]: cells × genes in CSR, with
//! the cell barcodes, unique gene symbols and per-cell label columns.
//!
//! Readers check what they read: dimensions that disagree, indices out of range,
//! negative / NaN / infinite counts and duplicate barcodes are errors with the
//! numbers in the message. Zero entries are dropped; non-integer counts are valid.

mod h5;
pub mod h5ad;
pub mod isolated;
pub mod mtx;
pub mod tenx;

use crate::error::{Error, Result};
use std::collections::HashMap;

/// The values of one per-cell label column (`obs` in AnnData terms).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ObsValues {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl ObsValues {
    pub fn len(&self) -> usize {
        match self {
            ObsValues::Text(v) => v.len(),
            ObsValues::Int(v) => v.len(),
            ObsValues::Float(v) => v.len(),
            ObsValues::Bool(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The SQL type a column of these values gets.
    pub fn sql_type(&self) -> &'static str {
        match self {
            ObsValues::Text(_) => "text",
            ObsValues::Int(_) => "bigint",
            ObsValues::Float(_) => "double precision",
            ObsValues::Bool(_) => "boolean",
        }
    }
}

/// A named per-cell column.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObsColumn {
    pub name: String,
    pub values: ObsValues,
}

/// Cells × genes, compressed by row (one row per cell).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CellMatrix {
    /// Cell identifiers (barcodes), unique.
    pub barcodes: Vec<String>,
    /// Gene symbols, unique (duplicates made unique the way scanpy does).
    pub genes: Vec<String>,
    /// Row pointer: cell `c`'s entries are `indptr[c]..indptr[c+1]`.
    pub indptr: Vec<usize>,
    /// Gene index of each entry, ascending within a cell.
    pub indices: Vec<u32>,
    /// Count of each entry (finite, > 0).
    pub data: Vec<f32>,
    /// Per-cell label columns, in file order.
    pub obs: Vec<ObsColumn>,
    /// How many gene symbols were renamed to make them unique.
    pub renamed_genes: usize,
    /// The file's gene identifiers beside the symbols (Ensembl ids in Cell Ranger
    /// output and in scanpy's `var["gene_ids"]`), one per gene; empty when the file has
    /// none or they are the symbols themselves.
    #[serde(default)]
    pub gene_ids: Vec<String>,
}

/// Identifiers of the kept genes (`keep` maps file genes to kept ones, as
/// [`from_csr_parts`] takes it), or none when they are just the symbols.
pub(crate) fn kept_ids(
    ids: Vec<String>,
    keep: Option<&[Option<u32>]>,
    symbols: &[String],
) -> Vec<String> {
    let ids: Vec<String> = match keep {
        None => ids,
        Some(k) => ids
            .into_iter()
            .zip(k)
            .filter_map(|(id, k)| k.map(|_| id))
            .collect(),
    };
    if ids.len() != symbols.len() || ids.iter().zip(symbols).all(|(i, s)| i == s || i.is_empty()) {
        return Vec::new();
    }
    ids
}

impl CellMatrix {
    pub fn n_cells(&self) -> usize {
        self.barcodes.len()
    }
    pub fn n_genes(&self) -> usize {
        self.genes.len()
    }
    pub fn nnz(&self) -> usize {
        self.data.len()
    }
    /// Cell `c` as (gene indices, counts).
    pub fn cell(&self, c: usize) -> (&[u32], &[f32]) {
        let r = self.indptr[c]..self.indptr[c + 1];
        (&self.indices[r.clone()], &self.data[r])
    }

    /// Check the invariants every reader promises; readers call this last.
    pub fn validate(&self) -> Result<()> {
        let n = self.n_cells();
        if self.indptr.len() != n + 1 {
            return Err(Error::format(format!(
                "row pointer has {} entries for {} cells (expected {})",
                self.indptr.len(),
                n,
                n + 1
            )));
        }
        if self.indptr[0] != 0
            || self.indptr[n] != self.data.len()
            || self.indices.len() != self.data.len()
        {
            return Err(Error::format(format!(
                "sparse matrix is inconsistent: row pointer ends at {}, {} indices, {} values",
                self.indptr[n],
                self.indices.len(),
                self.data.len()
            )));
        }
        let g = self.genes.len() as u32;
        for c in 0..n {
            let (lo, hi) = (self.indptr[c], self.indptr[c + 1]);
            if hi < lo {
                return Err(Error::format(format!("row pointer decreases at cell {c}")));
            }
            let mut prev: Option<u32> = None;
            for k in lo..hi {
                let j = self.indices[k];
                if j >= g {
                    return Err(Error::format(format!(
                        "gene index {j} out of range for {g} genes (cell {})",
                        self.barcodes[c]
                    )));
                }
                if let Some(p) = prev {
                    if j <= p {
                        return Err(Error::format(format!(
                            "gene {} appears twice or out of order in cell {}",
                            self.genes[j as usize], self.barcodes[c]
                        )));
                    }
                }
                prev = Some(j);
            }
        }
        for col in &self.obs {
            if col.values.len() != n {
                return Err(Error::format(format!(
                    "column \"{}\" has {} values for {} cells",
                    col.name,
                    col.values.len(),
                    n
                )));
            }
        }
        check_unique_barcodes(&self.barcodes)
    }
}

/// Counts must be finite and non-negative; `what` says where the value was found.
pub(crate) fn check_count(v: f64, what: impl FnOnce() -> String) -> Result<()> {
    if !v.is_finite() {
        return Err(
            Error::data(format!("count {v} is not finite at {}", what())).with_hint(
                "Counts must be finite numbers; replace NaN or infinite values before loading.",
            ),
        );
    }
    if v < 0.0 {
        return Err(Error::data(format!("negative count {v} at {}", what()))
            .with_hint("Counts must be raw, non-negative expression values."));
    }
    Ok(())
}

/// Barcodes must be unique: they become the table's primary key.
pub(crate) fn check_unique_barcodes(barcodes: &[String]) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(barcodes.len());
    for (i, b) in barcodes.iter().enumerate() {
        if let Some(first) = seen.insert(b.as_str(), i) {
            return Err(Error::data(format!(
                "duplicate cell barcode \"{b}\" at cells {} and {}",
                first + 1,
                i + 1
            ))
            .with_hint("Cell barcodes must be unique within a file."));
        }
    }
    Ok(())
}

/// Make names unique the way scanpy/anndata `var_names_make_unique` does: the first
/// occurrence keeps its name, later ones get `-1`, `-2`, … (skipping suffixes already
/// taken). Returns how many names were changed.
pub fn make_unique(names: &mut [String]) -> usize {
    let mut count: HashMap<String, usize> = HashMap::new();
    for n in names.iter() {
        *count.entry(n.clone()).or_default() += 1;
    }
    if count.values().all(|&c| c == 1) {
        return 0;
    }
    let mut taken: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut first_seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut renamed = 0;
    for n in names.iter_mut() {
        if count[n.as_str()] == 1 || first_seen.insert(n.clone()) {
            continue;
        }
        let base = n.clone();
        let k = next.entry(base.clone()).or_insert(1);
        loop {
            let cand = format!("{base}-{k}");
            *k += 1;
            if taken.insert(cand.clone()) {
                *n = cand;
                break;
            }
        }
        renamed += 1;
    }
    renamed
}

/// Turn CSC (genes-major: `indptr` over `n_major` columns, minor indices in
/// `indices`) into CSR over the minor axis, keeping entry order sorted.
pub(crate) fn transpose_compressed(
    n_major: usize,
    n_minor: usize,
    indptr: &[usize],
    indices: &[u32],
    data: &[f32],
) -> (Vec<usize>, Vec<u32>, Vec<f32>) {
    let nnz = data.len();
    let mut counts = vec![0usize; n_minor + 1];
    for &i in indices {
        counts[i as usize + 1] += 1;
    }
    for i in 0..n_minor {
        counts[i + 1] += counts[i];
    }
    let out_ptr = counts.clone();
    let mut next = counts;
    let mut out_idx = vec![0u32; nnz];
    let mut out_val = vec![0f32; nnz];
    for j in 0..n_major {
        for k in indptr[j]..indptr[j + 1] {
            let r = indices[k] as usize;
            let p = next[r];
            out_idx[p] = j as u32;
            out_val[p] = data[k];
            next[r] += 1;
        }
    }
    (out_ptr, out_idx, out_val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_feature_list_shorter_than_the_matrix_is_an_error_not_a_panic() {
        // found by fuzzing tenx_h5 (run 5): 3 features, a matrix of 4 genes, index 3
        let keep = [Some(0u32), Some(1), Some(2)];
        let e = from_csr_parts(
            s(&["c1"]),
            s(&["A", "B", "C"]),
            4,
            Some(&keep),
            &[0, 1],
            &[3],
            &[1.0],
        )
        .unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::FileFormat, "{e}");
        assert!(
            e.message.contains("3 features") && e.message.contains("4 genes"),
            "{e}"
        );
    }

    #[test]
    fn make_unique_like_scanpy() {
        let mut n = s(&["A", "B", "A", "A", "A-1", "C"]);
        // scanpy: A, B, A-2 (A-1 is taken), A-3, A-1, C
        let r = make_unique(&mut n);
        assert_eq!(n, s(&["A", "B", "A-2", "A-3", "A-1", "C"]));
        assert_eq!(r, 2);
        let mut u = s(&["x", "y"]);
        assert_eq!(make_unique(&mut u), 0);
    }

    #[test]
    fn transpose_roundtrip() {
        // 2 genes × 3 cells in CSC over cells... here: major = genes (2), minor = cells (3)
        let indptr = vec![0, 2, 3];
        let indices = vec![0u32, 2, 1];
        let data = vec![1.0f32, 2.0, 3.0];
        let (p, i, d) = transpose_compressed(2, 3, &indptr, &indices, &data);
        assert_eq!(p, vec![0, 1, 2, 3]);
        assert_eq!(i, vec![0, 1, 0]);
        assert_eq!(d, vec![1.0, 3.0, 2.0]);
    }

    #[test]
    fn counts_are_checked() {
        assert!(check_count(1.5, || "x".into()).is_ok());
        assert!(check_count(-1.0, || "x".into()).is_err());
        assert!(check_count(f64::NAN, || "x".into()).is_err());
        assert!(check_count(f64::INFINITY, || "x".into()).is_err());
        assert!(check_unique_barcodes(&s(&["a", "b", "a"])).is_err());
    }
}

/// Build a [`CellMatrix`] from cells × genes CSR parts as a file stores them: checks
/// the pointer and every index, drops explicit zeros, sorts genes within a cell,
/// rejects a gene listed twice in a cell, and checks every count. `keep` maps a file
/// gene index to the kept gene index (None = drop that gene, e.g. antibody features).
pub(crate) fn from_csr_parts(
    barcodes: Vec<String>,
    mut genes: Vec<String>,
    n_file_genes: usize,
    keep: Option<&[Option<u32>]>,
    indptr: &[usize],
    indices: &[usize],
    data: &[f32],
) -> Result<CellMatrix> {
    let n = barcodes.len();
    if indptr.len() != n + 1 {
        return Err(Error::format(format!(
            "index pointer has {} entries but there are {} cells (expected {})",
            indptr.len(),
            n,
            n + 1
        )));
    }
    if indices.len() != data.len() {
        return Err(Error::format(format!(
            "{} indices but {} values in the sparse matrix",
            indices.len(),
            data.len()
        )));
    }
    if indptr[0] != 0 || indptr[n] != data.len() {
        return Err(Error::format(format!(
            "index pointer runs from {} to {} but the matrix has {} values",
            indptr[0],
            indptr[n],
            data.len()
        )));
    }
    if let Some(map) = keep.filter(|m| m.len() != n_file_genes) {
        return Err(Error::format(format!(
            "the file lists {} features but its matrix has {n_file_genes} genes",
            map.len()
        )));
    }
    let mut out_ptr = Vec::with_capacity(n + 1);
    out_ptr.push(0usize);
    let mut out_idx: Vec<u32> = Vec::with_capacity(data.len());
    let mut out_val: Vec<f32> = Vec::with_capacity(data.len());
    let mut row: Vec<(u32, f32)> = Vec::new();
    for c in 0..n {
        let (lo, hi) = (indptr[c], indptr[c + 1]);
        if hi < lo || hi > data.len() {
            return Err(Error::format(format!(
                "index pointer decreases or overruns at cell {}",
                c + 1
            )));
        }
        row.clear();
        for k in lo..hi {
            let j = indices[k];
            if j >= n_file_genes {
                return Err(Error::format(format!(
                    "gene index {j} out of range for {n_file_genes} genes (cell {})",
                    barcodes[c]
                )));
            }
            let v = data[k];
            check_count(v as f64, || format!("cell {}, gene {}", barcodes[c], j))?;
            let jj = match keep {
                Some(map) => match map[j] {
                    Some(x) => x,
                    None => continue,
                },
                None => j as u32,
            };
            if v != 0.0 {
                row.push((jj, v));
            }
        }
        if !row.windows(2).all(|w| w[0].0 < w[1].0) {
            row.sort_by_key(|e| e.0);
            if let Some(w) = row.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(Error::format(format!(
                    "gene {} appears twice in cell {}",
                    genes[w[0].0 as usize], barcodes[c]
                )));
            }
        }
        out_idx.extend(row.iter().map(|e| e.0));
        out_val.extend(row.iter().map(|e| e.1));
        out_ptr.push(out_idx.len());
    }
    let renamed_genes = make_unique(&mut genes);
    let m = CellMatrix {
        barcodes,
        genes,
        indptr: out_ptr,
        indices: out_idx,
        data: out_val,
        obs: Vec::new(),
        renamed_genes,
        gene_ids: Vec::new(),
    };
    check_unique_barcodes(&m.barcodes)?;
    Ok(m)
}
