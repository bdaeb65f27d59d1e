//! 10x Genomics Cell Ranger output: a folder with `matrix.mtx[.gz]` (genes × cells),
//! `genes.tsv[.gz]` (Cell Ranger 2) or `features.tsv[.gz]` (Cell Ranger 3, with a
//! feature-type column) and `barcodes.tsv[.gz]`; or Cell Ranger's HDF5 matrix
//! (`filtered_feature_bc_matrix.h5`, both the v2 and v3 layouts). An optional
//! `annotations.tsv` (header line, first column the barcode) beside the matrix becomes
//! label columns. As scanpy's `read_10x_mtx` does by default, only "Gene Expression"
//! features are kept when the file lists feature types.

use super::h5::{self, dataset, is_group, read_index, read_num, read_strings};
use super::{from_csr_parts, kept_ids, mtx, CellMatrix, ObsColumn, ObsValues};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Read a Cell Ranger folder or `.h5` file.
pub fn read(path: &Path) -> Result<CellMatrix> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let (mut m, dir) = if meta.is_dir() {
        match find(path, &["matrix.mtx.gz", "matrix.mtx"]) {
            Some(mtx_path) => (read_mtx_folder(path, &mtx_path)?, path.to_path_buf()),
            None => {
                let h5 = find(path, &["filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5", "filtered_gene_bc_matrices.h5"])
                    .ok_or_else(|| {
                        Error::new(crate::Kind::FileNotFound, format!("no matrix.mtx[.gz] or Cell Ranger .h5 file in \"{}\"", path.display()))
                            .with_hint("Point at a Cell Ranger output folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) or at its .h5 file.")
                    })?;
                (
                    super::isolated::run_file(&h5, || read_h5(&h5))?,
                    path.to_path_buf(),
                )
            }
        }
    } else {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        (super::isolated::run_file(path, || read_h5(path))?, dir)
    };
    let ann = dir.join("annotations.tsv");
    if ann.is_file() {
        m.obs = read_annotations(&ann, &m.barcodes)?;
    }
    m.validate()?;
    Ok(m)
}

fn find(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let r: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut bytes = 0u128;
    for (i, line) in open_text(path)?.lines().enumerate() {
        let line = line.map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::InvalidData {
                "is not valid UTF-8 (or its compression is corrupt)"
            } else {
                "is truncated or corrupt"
            };
            Error::format(format!(
                "\"{}\" {what} near line {}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        if let Some(p) = line.find('\0') {
            return Err(Error::format(format!(
                "\"{}\" line {} contains a NUL byte at position {}",
                path.display(),
                i + 1,
                p + 1
            )));
        }
        bytes += line.len() as u128 + 24;
        if i % 65_536 == 0 {
            crate::limits::check_bytes(bytes, &format!("reading \"{}\"", path.display()))?;
            crate::limits::interrupt();
        }
        if !line.is_empty() {
            out.push(line);
        }
    }
    crate::limits::check_bytes(bytes, &format!("reading \"{}\"", path.display()))?;
    Ok(out)
}

fn read_mtx_folder(dir: &Path, mtx_path: &Path) -> Result<CellMatrix> {
    let feat_path = find(
        dir,
        &[
            "features.tsv.gz",
            "features.tsv",
            "genes.tsv.gz",
            "genes.tsv",
        ],
    )
    .ok_or_else(|| {
        Error::new(
            crate::Kind::FileNotFound,
            format!(
                "no features.tsv[.gz] or genes.tsv[.gz] in \"{}\"",
                dir.display()
            ),
        )
    })?;
    let bc_path = find(dir, &["barcodes.tsv.gz", "barcodes.tsv"]).ok_or_else(|| {
        Error::new(
            crate::Kind::FileNotFound,
            format!("no barcodes.tsv[.gz] in \"{}\"", dir.display()),
        )
    })?;
    let barcodes: Vec<String> = read_lines(&bc_path)?
        .into_iter()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect();
    let features = read_lines(&feat_path)?;
    let mut ids = Vec::with_capacity(features.len());
    let mut symbols = Vec::with_capacity(features.len());
    let mut types = Vec::with_capacity(features.len());
    for l in &features {
        let f: Vec<&str> = l.split('\t').collect();
        ids.push(f[0].to_string());
        symbols.push(f.get(1).unwrap_or(&f[0]).to_string());
        types.push(f.get(2).map(|s| s.to_string()));
    }
    let t = mtx::read(open_text(mtx_path)?)
        .map_err(|e| e.context(format!("\"{}\"", mtx_path.display())))?;
    if t.rows != features.len() {
        return Err(Error::format(format!(
            "\"{}\" has {} rows but \"{}\" lists {} features",
            mtx_path.display(),
            t.rows,
            feat_path.display(),
            features.len()
        )));
    }
    if t.cols != barcodes.len() {
        return Err(Error::format(format!(
            "\"{}\" has {} columns but \"{}\" lists {} barcodes",
            mtx_path.display(),
            t.cols,
            bc_path.display(),
            barcodes.len()
        )));
    }
    let (keep, genes) = gene_expression_only(&symbols, &types);
    let (ptr, idx, val) = mtx::cells_by_genes(&t)?;
    drop(t);
    let idx: Vec<usize> = idx.into_iter().map(|x| x as usize).collect();
    let mut m = from_csr_parts(
        barcodes,
        genes,
        features.len(),
        keep.as_deref(),
        &ptr,
        &idx,
        &val,
    )?;
    m.gene_ids = kept_ids(
        ids,
        keep.as_deref(),
        &symbols_kept(&symbols, keep.as_deref()),
    );
    Ok(m)
}

/// The symbols of the kept genes, before they were made unique.
fn symbols_kept(symbols: &[String], keep: Option<&[Option<u32>]>) -> Vec<String> {
    match keep {
        None => symbols.to_vec(),
        Some(k) => symbols
            .iter()
            .zip(k)
            .filter_map(|(s, k)| k.map(|_| s.clone()))
            .collect(),
    }
}

/// Keep only "Gene Expression" features when types are given and some are other types.
fn gene_expression_only(
    symbols: &[String],
    types: &[Option<String>],
) -> (Option<Vec<Option<u32>>>, Vec<String>) {
    let is_gex = |t: &Option<String>| t.as_deref().is_none_or(|t| t == "Gene Expression");
    if types.iter().all(is_gex) {
        return (None, symbols.to_vec());
    }
    let mut map = Vec::with_capacity(symbols.len());
    let mut genes = Vec::new();
    for (s, t) in symbols.iter().zip(types) {
        if is_gex(t) {
            map.push(Some(genes.len() as u32));
            genes.push(s.clone());
        } else {
            map.push(None);
        }
    }
    (Some(map), genes)
}

/// Cell Ranger's HDF5 matrix: v3 (`matrix/` with `features/`) or v2 (`<genome>/`).
pub fn read_h5(path: &Path) -> Result<CellMatrix> {
    let file = h5::open(path)?;
    let ctx = |e: Error| e.context(format!("\"{}\"", path.display()));
    let root: &hdf5::Group = &file;
    let (g, v3) = if is_group(root, "matrix") {
        (root.group("matrix").map_err(Error::from)?, true)
    } else {
        let names = root.member_names().map_err(Error::from)?;
        let genome = names
            .into_iter()
            .find(|n| {
                is_group(root, n)
                    && root
                        .group(n)
                        .map(|g| g.link_exists("indptr"))
                        .unwrap_or(false)
            })
            .ok_or_else(|| {
                ctx(Error::format(
                    "not a Cell Ranger matrix file: no \"matrix\" or genome group",
                ))
            })?;
        (root.group(&genome).map_err(Error::from)?, false)
    };
    (|| {
        let barcodes = read_strings(&dataset(&g, "barcodes")?)?;
        let (symbols, types, ids) = if v3 {
            let f = g
                .group("features")
                .map_err(|_| Error::format("missing group \"matrix/features\""))?;
            let symbols = read_strings(&dataset(&f, "name")?)?;
            let ids = if f.link_exists("id") {
                read_strings(&dataset(&f, "id")?)?
            } else {
                Vec::new()
            };
            let types = if f.link_exists("feature_type") {
                read_strings(&dataset(&f, "feature_type")?)?
                    .into_iter()
                    .map(Some)
                    .collect()
            } else {
                vec![None; symbols.len()]
            };
            (symbols, types, ids)
        } else {
            let symbols = read_strings(&dataset(&g, "gene_names")?)?;
            let n = symbols.len();
            let ids = if g.link_exists("genes") {
                read_strings(&dataset(&g, "genes")?)?
            } else {
                Vec::new()
            };
            (symbols, vec![None; n], ids)
        };
        let shape = read_index(&dataset(&g, "shape")?)?;
        if shape.len() != 2 || shape[0] != symbols.len() || shape[1] != barcodes.len() {
            return Err(Error::format(format!(
                "shape {:?} does not match {} features × {} barcodes",
                shape,
                symbols.len(),
                barcodes.len()
            )));
        }
        let data: Vec<f32> = read_num(&dataset(&g, "data")?)?;
        let indices = read_index(&dataset(&g, "indices")?)?;
        let indptr = read_index(&dataset(&g, "indptr")?)?;
        let n_features = symbols.len();
        let (keep, genes) = gene_expression_only(&symbols, &types);
        let mut m = from_csr_parts(
            barcodes,
            genes,
            n_features,
            keep.as_deref(),
            &indptr,
            &indices,
            &data,
        )?;
        if ids.len() == n_features {
            m.gene_ids = kept_ids(
                ids,
                keep.as_deref(),
                &symbols_kept(&symbols, keep.as_deref()),
            );
        }
        Ok(m)
    })()
    .map_err(ctx)
}

/// `annotations.tsv`: a header line, the barcode in the first column, one label per
/// further column. Empty fields are NULL; a column whose values all parse as integers
/// (or numbers) gets that type. Cells absent from the file get NULLs.
fn read_annotations(path: &Path, barcodes: &[String]) -> Result<Vec<ObsColumn>> {
    let lines = read_lines(path)?;
    let Some(header) = lines.first() else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = header
        .split('\t')
        .skip(1)
        .map(|s| s.trim().to_string())
        .collect();
    let pos: HashMap<&str, usize> = barcodes
        .iter()
        .enumerate()
        .map(|(i, b)| (b.as_str(), i))
        .collect();
    let mut cols: Vec<Vec<Option<String>>> = vec![vec![None; barcodes.len()]; names.len()];
    for (ln, l) in lines.iter().enumerate().skip(1) {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != names.len() + 1 {
            return Err(Error::format(format!(
                "\"{}\" line {}: {} fields, expected {}",
                path.display(),
                ln + 1,
                f.len(),
                names.len() + 1
            )));
        }
        let Some(&c) = pos.get(f[0]) else { continue };
        for (k, v) in f[1..].iter().enumerate() {
            let v = v.trim();
            cols[k][c] = (!v.is_empty()).then(|| v.to_string());
        }
    }
    Ok(names
        .into_iter()
        .zip(cols)
        .map(|(name, v)| ObsColumn {
            name,
            values: infer(v),
        })
        .collect())
}

fn infer(v: Vec<Option<String>>) -> ObsValues {
    let present = || v.iter().flatten();
    if present().next().is_some() && present().all(|s| s.parse::<i64>().is_ok()) {
        return ObsValues::Int(
            v.iter()
                .map(|s| s.as_ref().and_then(|s| s.parse().ok()))
                .collect(),
        );
    }
    if present().next().is_some() && present().all(|s| s.parse::<f64>().is_ok()) {
        return ObsValues::Float(
            v.iter()
                .map(|s| s.as_ref().and_then(|s| s.parse().ok()))
                .collect(),
        );
    }
    ObsValues::Text(v)
}
