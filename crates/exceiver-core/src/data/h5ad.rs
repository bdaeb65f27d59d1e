//! AnnData `.h5ad` files: `X` as CSR, CSC or dense (gzip-compressed or not), the `var`
//! index as gene symbols, and `obs` columns (categorical, string, numeric, boolean,
//! nullable) as label columns. Both the current encoding (anndata ≥ 0.8, with
//! `encoding-type` attributes) and the older one (anndata 0.7, categories under
//! `obs/__categories`, `h5sparse_format` on `X`) are read.

use super::h5::{
    self, attr_index, attr_string, attr_strings, dataset, is_dataset, is_group, read_index,
    read_num, read_strings,
};
use super::{from_csr_parts, transpose_compressed, CellMatrix, ObsColumn, ObsValues};
use crate::error::{Error, Result};
use hdf5::types::TypeDescriptor;
use hdf5::{Dataset, Group};
use std::path::Path;

/// Rows of a dense `X` read per block, to bound memory.
const DENSE_BLOCK_ROWS: usize = 1024;

/// Read an `.h5ad` file into cells × genes, the HDF5 library running in a child
/// process ([`super::isolated`]): a file that crashes the library is an error.
pub fn read(path: &Path) -> Result<CellMatrix> {
    // a missing file or a folder is told apart here, without a process
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    super::isolated::run_file(path, || read_in_process(path))
}

/// [`read`] in this process (tests, and fuzzing the HDF5 library itself).
pub fn read_in_process(path: &Path) -> Result<CellMatrix> {
    let file = h5::open(path)?;
    let ctx = |e: Error| e.context(format!("\"{}\"", path.display()));
    read_file(&file).map_err(ctx)
}

fn read_file(file: &hdf5::File) -> Result<CellMatrix> {
    let root: &Group = file;
    if !root.link_exists("X") {
        return Err(Error::format("the file has no X matrix")
            .with_hint("exceiver reads the count matrix from X; store raw counts there."));
    }
    if !is_group(root, "obs") || !is_group(root, "var") {
        if is_dataset(root, "obs") {
            return Err(Error::format("obs is stored in the pre-0.7 anndata layout (a compound dataset), which is not supported")
                .with_hint("Open the file with anndata >= 0.7 and write it again."));
        }
        return Err(Error::format("the file has no obs or var group"));
    }
    let obs = root.group("obs")?;
    let var = root.group("var")?;
    let barcodes = read_index_names(&obs, "obs")?;
    let genes = read_index_names(&var, "var")?;
    let genes_before_unique = genes.clone();
    let (n_obs, n_var) = (barcodes.len(), genes.len());

    let mut m = if is_group(root, "X") {
        let x = root.group("X")?;
        let enc = attr_string(&x, "encoding-type")
            .or_else(|| attr_string(&x, "h5sparse_format"))
            .unwrap_or_default();
        let shape = attr_index(&x, "shape").or_else(|| attr_index(&x, "h5sparse_shape"));
        if let Some(s) = &shape {
            if s.len() != 2 || s[0] != n_obs || s[1] != n_var {
                return Err(Error::format(format!(
                    "X has shape {:?} but obs has {n_obs} cells and var has {n_var} genes",
                    s
                )));
            }
        }
        let data: Vec<f32> = read_num(&dataset(&x, "data")?)?;
        let indices = read_index(&dataset(&x, "indices")?)?;
        let indptr = read_index(&dataset(&x, "indptr")?)?;
        match enc.as_str() {
            "csr_matrix" | "csr" => {
                from_csr_parts(barcodes, genes, n_var, None, &indptr, &indices, &data)?
            }
            "csc_matrix" | "csc" => {
                if indptr.len() != n_var + 1 {
                    return Err(Error::format(format!(
                        "X (CSC) index pointer has {} entries for {n_var} genes (expected {})",
                        indptr.len(),
                        n_var + 1
                    )));
                }
                if indptr[0] != 0 || indptr[n_var] != data.len() || indices.len() != data.len() {
                    return Err(Error::format(format!(
                        "X (CSC) index pointer ends at {} but the matrix has {} values and {} indices",
                        indptr[n_var],
                        data.len(),
                        indices.len()
                    )));
                }
                if let Some(j) = indptr.windows(2).position(|w| w[1] < w[0]) {
                    return Err(Error::format(format!(
                        "X (CSC) index pointer decreases at gene {}",
                        j + 1
                    )));
                }
                let mut idx32 = Vec::with_capacity(indices.len());
                for &i in &indices {
                    if i >= n_obs {
                        return Err(Error::format(format!(
                            "cell index {i} out of range for {n_obs} cells in X"
                        )));
                    }
                    idx32.push(i as u32);
                }
                drop(indices);
                let (p, i, d) = transpose_compressed(n_var, n_obs, &indptr, &idx32, &data);
                let i: Vec<usize> = i.into_iter().map(|x| x as usize).collect();
                from_csr_parts(barcodes, genes, n_var, None, &p, &i, &d)?
            }
            other => {
                return Err(Error::format(format!(
                    "X has encoding \"{other}\"; expected csr_matrix, csc_matrix or a dense array"
                )))
            }
        }
    } else {
        let x = root.dataset("X")?;
        let shape = x.shape();
        if shape.len() != 2 || shape[0] != n_obs || shape[1] != n_var {
            return Err(Error::format(format!(
                "X has shape {shape:?} but obs has {n_obs} cells and var has {n_var} genes"
            )));
        }
        h5::checked_len(&x, 8)?;
        read_dense(&x, barcodes, genes)?
    };
    m.obs = read_obs(&obs, n_obs)?;
    m.gene_ids = var_gene_ids(&var, n_var, &genes_before_unique);
    m.validate()?;
    Ok(m)
}

fn read_dense(x: &Dataset, barcodes: Vec<String>, genes: Vec<String>) -> Result<CellMatrix> {
    let (n_obs, n_var) = (barcodes.len(), genes.len());
    let mut indptr = vec![0usize];
    let mut indices = Vec::new();
    let mut data = Vec::new();
    let mut start = 0;
    while start < n_obs {
        let end = (start + DENSE_BLOCK_ROWS).min(n_obs);
        crate::limits::interrupt();
        let block = x
            .read_slice_2d::<f32, _>((start..end, ..))
            .map_err(|e| Error::format(format!("cannot read X rows {start}..{end}: {e}")))?;
        for (r, row) in block.outer_iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    indices.push(j);
                    data.push(v);
                }
            }
            let _ = r;
            indptr.push(data.len());
        }
        start = end;
    }
    from_csr_parts(barcodes, genes, n_var, None, &indptr, &indices, &data)
}

/// The names in a dataframe group's index (`_index` attribute names the dataset).
fn read_index_names(g: &Group, what: &str) -> Result<Vec<String>> {
    let name = attr_string(g, "_index").unwrap_or_else(|| "_index".to_string());
    if !is_dataset(g, &name) {
        return Err(Error::format(format!(
            "{what} has no index dataset \"{name}\""
        )));
    }
    read_strings(&g.dataset(&name)?).map_err(|e| e.context(format!("{what} index")))
}

/// Names of `var` columns that hold gene identifiers, in order of preference (scanpy's
/// `read_10x_mtx` writes `gene_ids`; merged objects have `gene_ids-0`).
const GENE_ID_COLUMNS: [&str; 4] = ["gene_ids", "gene_id", "ensembl_id", "gene_ids-0"];

/// The gene identifiers of a `var` column named in [`GENE_ID_COLUMNS`] (text), or none;
/// a column that cannot be read is ignored (it is optional).
fn var_gene_ids(var: &Group, n: usize, symbols: &[String]) -> Vec<String> {
    let Ok(cols) = read_obs(var, n) else {
        return Vec::new();
    };
    for name in GENE_ID_COLUMNS {
        if let Some(ObsValues::Text(v)) = cols.iter().find(|c| c.name == name).map(|c| &c.values) {
            let ids: Vec<String> = v.iter().map(|x| x.clone().unwrap_or_default()).collect();
            return super::kept_ids(ids, None, symbols);
        }
    }
    Vec::new()
}

fn read_obs(obs: &Group, n: usize) -> Result<Vec<ObsColumn>> {
    let index = attr_string(obs, "_index").unwrap_or_else(|| "_index".to_string());
    let mut names = attr_strings(obs, "column-order");
    if names.is_empty() {
        names = obs
            .member_names()?
            .into_iter()
            .filter(|c| *c != index && c != "__categories")
            .collect();
    }
    let old_cats = if is_group(obs, "__categories") {
        Some(obs.group("__categories")?)
    } else {
        None
    };
    let mut cols = Vec::new();
    for name in names {
        let values = if is_group(obs, &name) {
            let g = obs.group(&name)?;
            let enc = attr_string(&g, "encoding-type").unwrap_or_default();
            match enc.as_str() {
                "categorical" => categorical(&dataset(&g, "codes")?, &dataset(&g, "categories")?)?,
                "nullable-integer" | "nullable-boolean" | "nullable-string-array" => {
                    nullable(&g, &enc)?
                }
                _ => continue, // not a per-cell column we can represent
            }
        } else if is_dataset(obs, &name) {
            let ds = obs.dataset(&name)?;
            if ds.ndim() != 1 {
                continue;
            }
            match old_cats.as_ref().filter(|c| is_dataset(c, &name)) {
                Some(c) => categorical(&ds, &c.dataset(&name)?)?,
                None => plain(&ds)?,
            }
        } else {
            continue;
        };
        if values.len() != n {
            return Err(Error::format(format!(
                "obs column \"{name}\" has {} values for {n} cells",
                values.len()
            )));
        }
        cols.push(ObsColumn { name, values });
    }
    Ok(cols)
}

fn categorical(codes: &Dataset, cats: &Dataset) -> Result<ObsValues> {
    let labels: Vec<String> = if h5::is_string(cats) {
        read_strings(cats)?
    } else {
        read_num::<f64>(cats)?
            .into_iter()
            .map(|x| format_number(x))
            .collect()
    };
    let codes: Vec<i64> = read_num(codes)?;
    let mut out = Vec::with_capacity(codes.len());
    for c in codes {
        if c < 0 {
            out.push(None);
        } else {
            let l = labels.get(c as usize).ok_or_else(|| {
                Error::format(format!(
                    "category code {c} out of range for {} categories",
                    labels.len()
                ))
            })?;
            out.push(Some(l.clone()));
        }
    }
    Ok(ObsValues::Text(out))
}

fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn nullable(g: &Group, enc: &str) -> Result<ObsValues> {
    let values = dataset(g, "values")?;
    let mask: Vec<bool> = if is_dataset(g, "mask") {
        read_num(&dataset(g, "mask")?)?
    } else {
        Vec::new()
    };
    let missing = |i: usize| mask.get(i).copied().unwrap_or(false);
    Ok(match enc {
        "nullable-boolean" => {
            let v: Vec<bool> = read_num(&values)?;
            ObsValues::Bool(
                v.into_iter()
                    .enumerate()
                    .map(|(i, x)| (!missing(i)).then_some(x))
                    .collect(),
            )
        }
        "nullable-string-array" => {
            let v = read_strings(&values)?;
            ObsValues::Text(
                v.into_iter()
                    .enumerate()
                    .map(|(i, x)| (!missing(i)).then_some(x))
                    .collect(),
            )
        }
        _ => {
            let v: Vec<i64> = read_num(&values)?;
            ObsValues::Int(
                v.into_iter()
                    .enumerate()
                    .map(|(i, x)| (!missing(i)).then_some(x))
                    .collect(),
            )
        }
    })
}

fn plain(ds: &Dataset) -> Result<ObsValues> {
    Ok(match h5::descriptor(ds)? {
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) => {
            ObsValues::Int(read_num::<i64>(ds)?.into_iter().map(Some).collect())
        }
        TypeDescriptor::Float(_) => ObsValues::Float(
            read_num::<f64>(ds)?
                .into_iter()
                .map(|x| (!x.is_nan()).then_some(x))
                .collect(),
        ),
        TypeDescriptor::Boolean | TypeDescriptor::Enum(_) => {
            ObsValues::Bool(read_num::<bool>(ds)?.into_iter().map(Some).collect())
        }
        _ => ObsValues::Text(read_strings(ds)?.into_iter().map(Some).collect()),
    })
}
