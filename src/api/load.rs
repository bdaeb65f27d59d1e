//! `exceiver.load_10x` and `exceiver.load_h5ad`: single-cell files into cell tables.
//!
//! A cell table has one row per cell:
//! `cell_id text PRIMARY KEY, genes text[] NOT NULL, counts real[] NOT NULL`, then one
//! column per label (text for categories, bigint / double precision / boolean for
//! numbers and flags). `genes` and `counts` have the same length, genes are unique
//! within a cell, and only non-zero counts are stored.

use crate::errors::{raise_code, OrRaise};
use crate::security::{check_server_files, pinned, FileAccess};
use exceiver_core::data::{h5ad, tenx, CellMatrix, ObsValues};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::path::{Path, PathBuf};

/// Rows inserted per SPI connection; memory is released between batches.
const INSERT_BATCH: usize = 512;

/// Names a label column may not take, because the cell table already uses them.
const RESERVED: [&str; 3] = ["cell_id", "genes", "counts"];

/// Reading server files is a privileged act, checked as `COPY FROM` a file checks it.
pub(crate) fn check_file_access() {
    check_server_files(FileAccess::Read, "");
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A new table's name (schema-qualified or not), placed as `CREATE TABLE` places it
/// under the caller's search_path (its current schema), fully qualified and quoted, so
/// that it means the same under [`pinned`]. Call it before pinning the search path.
pub(crate) fn qualified_name(name: &str) -> String {
    // Only schema-qualified functions and no operators: the caller's path is in force.
    let (parts, schema) = Spi::connect(|c| {
        let t = c
            .select(
                "SELECT pg_catalog.parse_ident($1), pg_catalog.current_schema()::pg_catalog.text",
                Some(1),
                &[name.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((t.get::<Vec<String>>(1)?, t.get::<String>(2)?))
    })
    .or_raise();
    let parts = parts.unwrap_or_default();
    let (schema, table) = match parts.as_slice() {
        [table] => match schema {
            Some(s) => (s, table.clone()),
            None => raise_code(
                PgSqlErrorCode::ERRCODE_INVALID_SCHEMA_NAME,
                format!("no schema has been selected to create table \"{table}\" in"),
                Some("Qualify the table name with a schema, or set search_path."),
            ),
        },
        [s, table] => (s.clone(), table.clone()),
        _ => raise_code(
            PgSqlErrorCode::ERRCODE_INVALID_NAME,
            format!(
                "table name \"{name}\" has {} parts; give table or schema.table",
                parts.len()
            ),
            None,
        ),
    };
    // format's %I quotes only where SQL needs it (public.pbmc3k, "My Schema".x)
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', $1, $2)",
        &[schema.into(), table.into()],
    )
    .or_raise()
    .unwrap_or_default()
}

fn label_columns(m: &CellMatrix) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for c in &m.obs {
        let mut n = c.name.clone();
        if RESERVED.contains(&n.as_str()) {
            n = format!("obs_{n}");
        }
        while names.contains(&n) {
            n.push('_');
        }
        names.push(n);
    }
    names
}

/// The file's gene identifiers into a new table `<table>_genes (gene, gene_id)` beside
/// the cell table `qname` (just created), for matching a model named by other
/// identifiers.
fn write_gene_ids(m: &CellMatrix, qname: &str) {
    let gq = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname || '_genes') \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
         WHERE c.oid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
        &[qname.into()],
    )
    .or_raise()
    .unwrap_or_default();
    Spi::run(&format!(
        "CREATE TABLE {gq} (gene text PRIMARY KEY, gene_id text NOT NULL)"
    ))
    .or_raise();
    Spi::run(&format!(
        "COMMENT ON TABLE {gq} IS 'exceiver: the gene identifiers of cell table {}, beside the symbols in its genes arrays'",
        qname.replace('\'', "''")
    ))
    .or_raise();
    Spi::run_with_args(
        &format!("INSERT INTO {gq} SELECT * FROM unnest($1::text[], $2::text[])"),
        &[m.genes.clone().into(), m.gene_ids.clone().into()],
    )
    .or_raise();
    notice!("the file's gene identifiers are in table {gq} (gene, gene_id)");
}

/// `COMPRESSION lz4` for the `genes` and `counts` columns where the server has lz4:
/// measured on 100,000 cells, loading takes half the time of the default pglz and reading
/// the arrays back a third, for tables about a quarter larger.
fn array_compression() -> &'static str {
    let lz4 = Spi::get_one::<bool>(
        "SELECT 'lz4' OPERATOR(pg_catalog.=) ANY (enumvals) FROM pg_catalog.pg_settings \
         WHERE name OPERATOR(pg_catalog.=) 'default_toast_compression'",
    )
    .or_raise()
    .unwrap_or(false);
    if lz4 {
        " COMPRESSION lz4"
    } else {
        ""
    }
}

/// Create the cell table `qname` (from [`qualified_name`]) for `head`'s label columns,
/// and its `_genes` table when the file has gene identifiers. Returns the label columns'
/// names.
fn create_table(head: &CellMatrix, qname: &str) -> Vec<String> {
    let labels = label_columns(head);
    let z = array_compression();
    let mut ddl = format!(
        "CREATE TABLE {qname} (cell_id text PRIMARY KEY, genes text[]{z} NOT NULL, counts real[]{z} NOT NULL"
    );
    for (c, name) in head.obs.iter().zip(&labels) {
        ddl.push_str(&format!(", {} {}", quote_ident(name), c.values.sql_type()));
    }
    ddl.push(')');
    Spi::run(&ddl).or_raise();
    if !head.gene_ids.is_empty() {
        write_gene_ids(head, qname);
    }
    labels
}

fn comment_table(qname: &str, cells: usize, genes: usize, nonzeros: usize) {
    Spi::run(&format!(
        "COMMENT ON TABLE {qname} IS 'exceiver cell table: {cells} cells x {genes} genes, {nonzeros} non-zero counts'"
    ))
    .or_raise();
}

/// Inserts cells into a new cell table with one prepared statement. Each gene symbol
/// becomes a `text` value once; a cell's arrays are then built from those values
/// directly (`construct_array`), not element by element.
struct Inserter<'a> {
    head: &'a CellMatrix,
    insert: String,
    oids: Vec<pgrx::PgOid>,
    gene_text: Vec<pg_sys::Datum>,
}

impl<'a> Inserter<'a> {
    /// Call outside any SPI connection: the gene values live in the calling function's
    /// memory context, until it returns.
    fn new(head: &'a CellMatrix, qname: &str, labels: &[String]) -> Self {
        let mut cols = vec!["cell_id".to_string(), "genes".into(), "counts".into()];
        cols.extend(labels.iter().map(|n| quote_ident(n)));
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {qname} ({}) VALUES ({})",
            cols.join(", "),
            params.join(", ")
        );
        let mut oids = vec![
            pg_sys::TEXTOID.into(),
            pg_sys::TEXTARRAYOID.into(),
            pg_sys::FLOAT4ARRAYOID.into(),
        ];
        for c in &head.obs {
            oids.push(
                match c.values {
                    ObsValues::Text(_) => pg_sys::TEXTOID,
                    ObsValues::Int(_) => pg_sys::INT8OID,
                    ObsValues::Float(_) => pg_sys::FLOAT8OID,
                    ObsValues::Bool(_) => pg_sys::BOOLOID,
                }
                .into(),
            );
        }
        let gene_text = head
            .genes
            .iter()
            .map(|g| unsafe {
                // SAFETY: copies len bytes of a valid &str into a palloc'd text.
                pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                    g.as_ptr() as *const std::ffi::c_char,
                    g.len() as i32,
                ))
            })
            .collect();
        Inserter {
            head,
            insert,
            oids,
            gene_text,
        }
    }

    /// Insert cells given as (cell index into `head`, gene indices, counts), in one SPI
    /// connection (its memory is released when it closes).
    fn insert<'c>(&self, cells: impl Iterator<Item = (usize, &'c [u32], &'c [f32])>) {
        let mut elems: Vec<pg_sys::Datum> = Vec::new();
        Spi::connect_mut(|client| {
            let stmt = client
                .prepare_mut(self.insert.as_str(), &self.oids)
                .or_raise();
            for (c, idx, val) in cells {
                // SAFETY: every element is a valid datum of the array's element type
                // (text values made in `new`, float4 by value); construct_array copies them.
                let (genes, counts) = unsafe {
                    elems.clear();
                    elems.extend(idx.iter().map(|&g| self.gene_text[g as usize]));
                    let genes = pg_sys::construct_array_builtin(
                        elems.as_mut_ptr(),
                        elems.len() as i32,
                        pg_sys::TEXTOID,
                    );
                    elems.clear();
                    elems.extend(val.iter().map(|v| pg_sys::Datum::from(v.to_bits())));
                    let counts = pg_sys::construct_array_builtin(
                        elems.as_mut_ptr(),
                        elems.len() as i32,
                        pg_sys::FLOAT4OID,
                    );
                    (
                        DatumWithOid::new(pg_sys::Datum::from(genes), pg_sys::TEXTARRAYOID),
                        DatumWithOid::new(pg_sys::Datum::from(counts), pg_sys::FLOAT4ARRAYOID),
                    )
                };
                let mut args: Vec<DatumWithOid> =
                    vec![self.head.barcodes[c].as_str().into(), genes, counts];
                for col in &self.head.obs {
                    args.push(match &col.values {
                        ObsValues::Text(v) => v[c].as_deref().into(),
                        ObsValues::Int(v) => v[c].into(),
                        ObsValues::Float(v) => v[c].into(),
                        ObsValues::Bool(v) => v[c].into(),
                    });
                }
                client.update(&stmt, None, &args).or_raise();
            }
        });
    }

    /// Insert every cell of a whole matrix, a batch at a time.
    fn insert_all(&self, m: &CellMatrix) {
        let n = m.n_cells();
        let mut start = 0;
        while start < n {
            let end = (start + INSERT_BATCH).min(n);
            self.insert((start..end).map(|c| {
                let (idx, val) = m.cell(c);
                (c, idx, val)
            }));
            check_for_interrupts!();
            start = end;
        }
    }
}

type Loaded = TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
>;

fn renamed_notice(renamed: usize) {
    if renamed > 0 {
        notice!(
            "made {renamed} duplicate gene symbols unique by adding -1, -2, ... suffixes (as scanpy does)"
        );
    }
}

/// A whole matrix (read into memory) into a new table.
fn load(m: CellMatrix, table: &str) -> Loaded {
    renamed_notice(m.renamed_genes);
    let qname = qualified_name(table);
    let labels = pinned(|| {
        let labels = create_table(&m, &qname);
        Inserter::new(&m, &qname, &labels).insert_all(&m);
        comment_table(&qname, m.n_cells(), m.n_genes(), m.nnz());
        labels
    });
    TableIterator::once((
        qname,
        m.n_cells() as i64,
        m.n_genes() as i64,
        m.nnz() as i64,
        labels,
    ))
}

/// A Cell Ranger folder into a new table while it is read: a second thread parses the
/// matrix a batch of cells ahead of the inserts, and memory stays flat in the number of
/// cells. A matrix not grouped by cell is read whole instead (the rows inserted so far
/// are truncated away first).
fn load_streamed(
    mut s: tenx::CellStream,
    path: &Path,
    table: &str,
    relabel: &dyn Fn(exceiver_core::Error) -> exceiver_core::Error,
) -> Loaded {
    let head = std::mem::take(&mut s.head);
    renamed_notice(head.renamed_genes);
    let qname = qualified_name(table);
    let (cells, nonzeros, labels) = pinned(|| {
        let labels = create_table(&head, &qname);
        let ins = Inserter::new(&head, &qname, &labels);
        let streamed = tenx::pipeline(s, INSERT_BATCH, |b| {
            ins.insert((0..b.len()).map(|i| {
                let (idx, val) = b.cell(i);
                (b.first + i, idx, val)
            }));
            check_for_interrupts!();
            Ok(())
        })
        .map_err(relabel)
        .or_raise();
        let (cells, nonzeros) = match streamed {
            tenx::Streamed::Done { cells, nonzeros } => (cells, nonzeros),
            tenx::Streamed::NotGrouped { line, column } => {
                notice!(
                    "the matrix is not grouped by cell (line {line} returns to cell {column}); reading it whole into memory instead"
                );
                Spi::run(&format!("TRUNCATE {qname}")).or_raise();
                let m = tenx::read(path).map_err(relabel).or_raise();
                Inserter::new(&m, &qname, &labels).insert_all(&m);
                (m.n_cells(), m.nnz())
            }
        };
        comment_table(&qname, cells, head.n_genes(), nonzeros);
        (cells, nonzeros, labels)
    });
    TableIterator::once((
        qname,
        cells as i64,
        head.n_genes() as i64,
        nonzeros as i64,
        labels,
    ))
}

/// Load a 10x Genomics Cell Ranger folder (matrix.mtx[.gz], features.tsv[.gz] or
/// genes.tsv[.gz], barcodes.tsv[.gz], optional annotations.tsv) or Cell Ranger .h5 file
/// into a new cell table.
#[pg_extern(volatile, parallel_unsafe)]
fn load_10x(
    path: &str,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    check_file_access();
    crate::gucs::apply_limits();
    match tenx::stream(Path::new(path)).or_raise() {
        Some(s) => load_streamed(s, Path::new(path), table_name, &|e| e),
        None => load(tenx::read(Path::new(path)).or_raise(), table_name),
    }
}

/// Load an AnnData .h5ad file (X as CSR, CSC or dense; obs columns as labels) into a
/// new cell table.
#[pg_extern(volatile, parallel_unsafe)]
fn load_h5ad(
    path: &str,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    check_file_access();
    crate::gucs::apply_limits();
    let m = h5ad::read(Path::new(path)).or_raise();
    load(m, table_name)
}

// ---------------------------------------------------------------------------------
// Loading without server-file rights: files the client uploaded as large objects.

/// A private folder in the server's temporary-file directory (`base/pgsql_tmp`, which
/// PostgreSQL empties at restart), removed when dropped, also while an error unwinds.
/// Remembers which large object each file came from, for messages.
struct TempDir(PathBuf, std::cell::RefCell<Vec<(String, String)>>);

impl TempDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // SAFETY: DataDir is set once at server start and never changes.
        let data_dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }
            .to_string_lossy()
            .into_owned();
        let base = Path::new(&data_dir).join("base").join("pgsql_tmp");
        let dir = base.join(format!(
            "pgsql_tmp_exceiver_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let made = std::fs::create_dir_all(&base).and_then(|_| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir)
        });
        if let Err(e) = made {
            raise_code(
                PgSqlErrorCode::ERRCODE_IO_ERROR,
                format!(
                    "could not create temporary folder \"{}\": {e}",
                    dir.display()
                ),
                None,
            );
        }
        TempDir(dir, Default::default())
    }

    /// An error about a copied file, naming the large object instead of the temporary path.
    fn relabel(&self, mut e: exceiver_core::Error) -> exceiver_core::Error {
        for (path, what) in self.1.borrow().iter() {
            e.message = e.message.replace(&format!("\"{path}\""), what);
        }
        e
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes read per `lo_get` call.
const LO_CHUNK: i32 = 4 << 20;

/// Copy large object `lo` into `dir/name` (`name.gz` when it holds gzip data), a chunk at a
/// time, read with `pg_catalog.lo_get` as the caller: PostgreSQL checks that the caller may
/// read it (SELECT on the large object) and that it exists. `used` counts the bytes
/// written to temporary files, held within `temp_file_limit` as PostgreSQL holds its own.
fn copy_large_object(lo: pg_sys::Oid, dir: &TempDir, name: &str, used: &mut u64) -> PathBuf {
    use std::io::Write;
    // SAFETY: a GUC variable, read on the backend's own thread.
    let limit_kb = unsafe { pg_sys::temp_file_limit };
    let mut out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)> = None;
    let mut offset: i64 = 0;
    loop {
        let chunk: Vec<u8> = Spi::get_one_with_args::<Vec<u8>>(
            "SELECT pg_catalog.lo_get($1, $2, $3)",
            &[lo.into(), offset.into(), LO_CHUNK.into()],
        )
        .or_raise()
        .unwrap_or_default();
        let (path, w) = out.get_or_insert_with(|| {
            let gz = chunk.starts_with(&[0x1f, 0x8b]);
            let file = if gz {
                format!("{name}.gz")
            } else {
                name.to_string()
            };
            let path = dir.0.join(&file);
            dir.1.borrow_mut().push((
                path.display().to_string(),
                format!("large object {} ({file})", lo.to_u32()),
            ));
            match std::fs::File::create(&path) {
                Ok(f) => (path, std::io::BufWriter::with_capacity(1 << 20, f)),
                Err(e) => raise_code(
                    PgSqlErrorCode::ERRCODE_IO_ERROR,
                    format!(
                        "could not create temporary file \"{}\": {e}",
                        path.display()
                    ),
                    None,
                ),
            }
        });
        *used += chunk.len() as u64;
        if limit_kb >= 0 && *used > limit_kb as u64 * 1024 {
            raise_code(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "copying large object {} needs more than temp_file_limit ({limit_kb}kB) of temporary files",
                    lo.to_u32()
                ),
                Some("Raise temp_file_limit, or load the file from the server's disk."),
            );
        }
        if let Err(e) = w.write_all(&chunk) {
            raise_code(
                PgSqlErrorCode::ERRCODE_IO_ERROR,
                format!("could not write temporary file \"{}\": {e}", path.display()),
                None,
            );
        }
        offset += chunk.len() as i64;
        check_for_interrupts!();
        if chunk.len() < LO_CHUNK as usize {
            break;
        }
    }
    let Some((path, mut w)) = out else {
        unreachable!("the loop runs at least once")
    };
    if let Err(e) = w.flush() {
        raise_code(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("could not write temporary file \"{}\": {e}", path.display()),
            None,
        );
    }
    path
}

/// Load a Cell Ranger Matrix Market folder uploaded as large objects (`\lo_import` in
/// psql, `lo_import` in drivers; gzip-compressed or not): needs only read access to the
/// large objects and the right to create the table, no server-file privilege.
fn load_10x_objects(
    matrix: pg_sys::Oid,
    features: pg_sys::Oid,
    barcodes: pg_sys::Oid,
    annotations: Option<pg_sys::Oid>,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    crate::gucs::apply_limits();
    let dir = TempDir::new();
    let mut used = 0u64;
    let files = pinned(|| {
        copy_large_object(matrix, &dir, "matrix.mtx", &mut used);
        copy_large_object(features, &dir, "features.tsv", &mut used);
        copy_large_object(barcodes, &dir, "barcodes.tsv", &mut used);
        if let Some(a) = annotations {
            copy_large_object(a, &dir, "annotations.tsv", &mut used);
        }
        tenx::stream(&dir.0).map_err(|e| dir.relabel(e)).or_raise()
    });
    match files {
        Some(s) => load_streamed(s, &dir.0, table_name, &|e| dir.relabel(e)),
        None => raise_code(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "the uploaded matrix was not found in its temporary folder",
            None,
        ),
    }
}

/// `load_10x` for a Cell Ranger folder uploaded as large objects: the matrix
/// (`matrix.mtx[.gz]`), the features or genes list and the barcodes.
#[pg_extern(volatile, parallel_unsafe, name = "load_10x_lo")]
fn load_10x_lo3(
    matrix: pg_sys::Oid,
    features: pg_sys::Oid,
    barcodes: pg_sys::Oid,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    load_10x_objects(matrix, features, barcodes, None, table_name)
}

/// `load_10x_lo` with an `annotations.tsv` (header line, barcode first) uploaded too.
#[pg_extern(volatile, parallel_unsafe, name = "load_10x_lo")]
fn load_10x_lo4(
    matrix: pg_sys::Oid,
    features: pg_sys::Oid,
    barcodes: pg_sys::Oid,
    table_name: &str,
    annotations: pg_sys::Oid,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    load_10x_objects(matrix, features, barcodes, Some(annotations), table_name)
}

/// `load_10x` for a Cell Ranger HDF5 matrix (`filtered_feature_bc_matrix.h5`) uploaded as
/// a large object.
#[pg_extern(volatile, parallel_unsafe, name = "load_10x_lo")]
fn load_10x_lo_h5(
    h5: pg_sys::Oid,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    crate::gucs::apply_limits();
    let dir = TempDir::new();
    let mut used = 0u64;
    let path = pinned(|| copy_large_object(h5, &dir, "matrix.h5", &mut used));
    load(
        tenx::read(&path).map_err(|e| dir.relabel(e)).or_raise(),
        table_name,
    )
}

/// `load_h5ad` for an `.h5ad` file uploaded as a large object.
#[pg_extern(volatile, parallel_unsafe)]
fn load_h5ad_lo(
    h5ad: pg_sys::Oid,
    table_name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(cells, i64),
        name!(genes, i64),
        name!(nonzeros, i64),
        name!(label_columns, Vec<String>),
    ),
> {
    crate::gucs::apply_limits();
    let dir = TempDir::new();
    let mut used = 0u64;
    let path = pinned(|| copy_large_object(h5ad, &dir, "data.h5ad", &mut used));
    load(
        h5ad::read(&path).map_err(|e| dir.relabel(e)).or_raise(),
        table_name,
    )
}
