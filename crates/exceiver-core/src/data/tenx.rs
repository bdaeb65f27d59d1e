//! 10x Genomics Cell Ranger output: a folder with `matrix.mtx[.gz]` (genes × cells),
//! `genes.tsv[.gz]` (Cell Ranger 2) or `features.tsv[.gz]` (Cell Ranger 3, with a
//! feature-type column) and `barcodes.tsv[.gz]`; or Cell Ranger's HDF5 matrix
//! (`filtered_feature_bc_matrix.h5`, both the v2 and v3 layouts). An optional
//! `annotations.tsv[.gz]` (header line, first column the barcode) beside the matrix becomes
//! label columns. As scanpy's `read_10x_mtx` does by default, only "Gene Expression"
//! features are kept when the file lists feature types.

use super::h5::{self, dataset, is_group, read_index, read_num, read_strings};
use super::{
    check_unique_barcodes, from_csr_parts, kept_ids, mtx, CellMatrix, ObsColumn, ObsValues,
};
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
    if let Some(ann) = find(&dir, &["annotations.tsv", "annotations.tsv.gz"]) {
        if m.obs.is_empty() {
            m.obs = read_annotations(&ann, &m.barcodes)?;
        }
    }
    m.validate()?;
    Ok(m)
}

fn find(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let r: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
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

/// A Cell Ranger folder's barcodes, features and annotations, read and checked, and its
/// matrix opened at its first entry.
struct Folder {
    /// Everything but the counts: barcodes, unique gene symbols, gene ids, label columns.
    head: CellMatrix,
    /// File gene index -> kept gene index, when some features are not gene expression.
    keep: Option<Vec<Option<u32>>>,
    entries: mtx::Entries<Box<dyn BufRead + Send>>,
    mtx_path: PathBuf,
}

fn open_folder(dir: &Path, mtx_path: &Path) -> Result<Folder> {
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
    let ctx = |e: Error| e.context(format!("\"{}\"", mtx_path.display()));
    let entries = mtx::Entries::open(open_text(mtx_path)?).map_err(ctx)?;
    if entries.rows != features.len() {
        return Err(Error::format(format!(
            "\"{}\" has {} rows but \"{}\" lists {} features",
            mtx_path.display(),
            entries.rows,
            feat_path.display(),
            features.len()
        )));
    }
    if entries.cols != barcodes.len() {
        return Err(Error::format(format!(
            "\"{}\" has {} columns but \"{}\" lists {} barcodes",
            mtx_path.display(),
            entries.cols,
            bc_path.display(),
            barcodes.len()
        )));
    }
    check_unique_barcodes(&barcodes)?;
    let (keep, mut genes) = gene_expression_only(&symbols, &types);
    let renamed_genes = super::make_unique(&mut genes);
    let gene_ids = kept_ids(
        ids,
        keep.as_deref(),
        &symbols_kept(&symbols, keep.as_deref()),
    );
    let mut head = CellMatrix {
        barcodes,
        genes,
        indptr: vec![0],
        renamed_genes,
        gene_ids,
        ..Default::default()
    };
    if let Some(ann) = find(dir, &["annotations.tsv", "annotations.tsv.gz"]) {
        head.obs = read_annotations(&ann, &head.barcodes)?;
    }
    Ok(Folder {
        head,
        keep,
        entries,
        mtx_path: mtx_path.to_path_buf(),
    })
}

fn read_mtx_folder(dir: &Path, mtx_path: &Path) -> Result<CellMatrix> {
    let Folder {
        head,
        keep,
        entries,
        ..
    } = open_folder(dir, mtx_path)?;
    let t =
        mtx::read_entries(entries).map_err(|e| e.context(format!("\"{}\"", mtx_path.display())))?;
    let n_file_genes = t.rows;
    let (ptr, idx, val) =
        mtx::cells_by_genes(&t).map_err(|e| e.context(format!("\"{}\"", mtx_path.display())))?;
    drop(t);
    let idx: Vec<usize> = idx.into_iter().map(|x| x as usize).collect();
    let m = from_csr_parts(
        head.barcodes,
        // the symbols are unique already: from_csr_parts finds nothing to rename
        head.genes,
        n_file_genes,
        keep.as_deref(),
        &ptr,
        &idx,
        &val,
    )?;
    Ok(CellMatrix {
        renamed_genes: head.renamed_genes,
        gene_ids: head.gene_ids,
        obs: head.obs,
        ..m
    })
}

/// A batch of consecutive cells of a [`CellStream`]: cells `first..first + len()` in
/// CSR (gene indices ascending within a cell).
#[derive(Debug, Default)]
pub struct CellBatch {
    pub first: usize,
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub data: Vec<f32>,
}

impl CellBatch {
    pub fn len(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `i`-th cell of the batch (cell `first + i` of the file).
    pub fn cell(&self, i: usize) -> (&[u32], &[f32]) {
        let r = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[r.clone()], &self.data[r])
    }
}

/// What one step of a [`CellStream`] gave.
#[derive(Debug)]
pub enum Step {
    Cells(CellBatch),
    End,
    /// The matrix is not grouped by cell in ascending order (Cell Ranger and scipy write
    /// it so; other writers may not): read it whole with [`read`] instead.
    NotGrouped {
        line: usize,
        column: usize,
    },
}

/// The cells of a Cell Ranger folder read a batch at a time, in barcode order, so that
/// memory does not grow with the number of cells. Same checks and messages as [`read`].
pub struct CellStream {
    /// Barcodes, genes, gene ids and label columns; no counts.
    pub head: CellMatrix,
    keep: Option<Vec<Option<u32>>>,
    columns: mtx::Columns<Box<dyn BufRead + Send>>,
    mtx_path: PathBuf,
    rows: Vec<u32>,
    vals: Vec<f32>,
    cells: usize,
    nonzeros: usize,
}

/// A stream over the cells of `path` when it is a folder with a Matrix Market file;
/// `None` for Cell Ranger's `.h5` (read it with [`read`]).
pub fn stream(path: &Path) -> Result<Option<CellStream>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Ok(None);
    }
    let Some(mtx_path) = find(path, &["matrix.mtx.gz", "matrix.mtx"]) else {
        return Ok(None);
    };
    let f = open_folder(path, &mtx_path)?;
    Ok(Some(CellStream {
        head: f.head,
        keep: f.keep,
        columns: mtx::Columns::new(f.entries),
        mtx_path: f.mtx_path,
        rows: Vec::new(),
        vals: Vec::new(),
        cells: 0,
        nonzeros: 0,
    }))
}

impl CellStream {
    /// Cells and non-zero counts returned so far.
    pub fn counted(&self) -> (usize, usize) {
        (self.cells, self.nonzeros)
    }

    /// Up to `max_cells` next cells (at least one per call until the end).
    pub fn next_batch(&mut self, max_cells: usize) -> Result<Step> {
        let ctx = |e: Error, p: &Path| e.context(format!("\"{}\"", p.display()));
        let mut b = CellBatch {
            first: self.cells,
            indptr: vec![0],
            ..Default::default()
        };
        while b.len() < max_cells.max(1) {
            match self
                .columns
                .next_column(&mut self.rows, &mut self.vals)
                .map_err(|e| ctx(e, &self.mtx_path))?
            {
                mtx::ColumnStep::Column(_) => {
                    match &self.keep {
                        None => {
                            b.indices.extend_from_slice(&self.rows);
                            b.data.extend_from_slice(&self.vals);
                        }
                        Some(map) => {
                            for (&r, &v) in self.rows.iter().zip(&self.vals) {
                                if let Some(k) = map[r as usize] {
                                    b.indices.push(k);
                                    b.data.push(v);
                                }
                            }
                        }
                    }
                    b.indptr.push(b.indices.len());
                }
                mtx::ColumnStep::End => break,
                mtx::ColumnStep::OutOfOrder { line, column } => {
                    return Ok(Step::NotGrouped { line, column })
                }
            }
        }
        if b.is_empty() {
            return Ok(Step::End);
        }
        self.cells += b.len();
        self.nonzeros += b.data.len();
        Ok(Step::Cells(b))
    }
}

/// How [`pipeline`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streamed {
    /// Every cell went to the sink: cells and non-zero counts.
    Done { cells: usize, nonzeros: usize },
    /// The file is not grouped by cell: nothing more went to the sink.
    NotGrouped { line: usize, column: usize },
}

/// Parse `s` on a second thread, `batch` cells at a time, while `sink` consumes the
/// batches on the calling thread (at most two batches wait between them, so memory stays
/// flat). An error on either side stops both; `sink` may also unwind (the parsing thread
/// then stops at its next batch and is joined before the unwinding goes on).
pub fn pipeline(
    mut s: CellStream,
    batch: usize,
    mut sink: impl FnMut(&CellBatch) -> Result<()>,
) -> Result<Streamed> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Step>>(2);
        let parser = &mut s;
        scope.spawn(move || loop {
            let step = parser.next_batch(batch);
            let more = matches!(step, Ok(Step::Cells(_)));
            if tx.send(step).is_err() || !more {
                break;
            }
        });
        let (mut cells, mut nonzeros) = (0, 0);
        loop {
            match rx.recv() {
                Ok(Ok(Step::Cells(b))) => {
                    sink(&b)?;
                    cells += b.len();
                    nonzeros += b.data.len();
                }
                Ok(Ok(Step::End)) => return Ok(Streamed::Done { cells, nonzeros }),
                Ok(Ok(Step::NotGrouped { line, column })) => {
                    return Ok(Streamed::NotGrouped { line, column })
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::internal("the matrix parsing thread stopped")),
            }
        }
    })
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
