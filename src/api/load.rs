//! `exceiver.load_10x` and `exceiver.load_h5ad`: single-cell files into cell tables.
//!
//! A cell table has one row per cell:
//! `cell_id text PRIMARY KEY, genes text[] NOT NULL, counts real[] NOT NULL`, then one
//! column per label (text for categories, bigint / double precision / boolean for
//! numbers and flags). `genes` and `counts` have the same length, genes are unique
//! within a cell, and only non-zero counts are stored.

use crate::errors::{raise_code, OrRaise};
use exceiver_core::data::{h5ad, tenx, CellMatrix, ObsValues};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::path::Path;

/// Rows inserted per SPI connection; memory is released between batches.
const INSERT_BATCH: usize = 512;

/// Names a label column may not take, because the cell table already uses them.
const RESERVED: [&str; 3] = ["cell_id", "genes", "counts"];

/// Reading server files is a privileged act, as for `COPY FROM` a file.
pub(crate) fn check_file_access() {
    check_server_files("read", "");
}

/// Superusers and members of `pg_read_server_files` / `pg_write_server_files` only
/// (`what`: "read" or "write"; `more`: appended to the hint).
pub(crate) fn check_server_files(what: &str, more: &str) {
    let ok = Spi::get_one_with_args::<bool>(
        "SELECT (SELECT rolsuper FROM pg_roles WHERE oid = current_user::regrole) \
         OR pg_has_role(current_user, 'pg_' || $1 || '_server_files', 'MEMBER')",
        &[what.into()],
    )
    .or_raise()
    .unwrap_or(false);
    if !ok {
        let verb = if what == "read" { "load" } else { "write" };
        raise_code(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {what} server files"),
            Some(&format!(
                "Only superusers and members of pg_{what}_server_files may {verb} files on the server{more}."
            )),
        );
    }
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A possibly schema-qualified table name, quoted part by part.
pub(crate) fn qualified_name(name: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT string_agg(quote_ident(p), '.') FROM unnest(parse_ident($1)) p",
        &[name.into()],
    )
    .or_raise()
    .unwrap_or_else(|| quote_ident(name))
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

/// Write `m` into a new table `table`; returns the quoted table name.
fn write_table(m: &CellMatrix, table: &str) -> String {
    let qname = qualified_name(table);
    let labels = label_columns(m);
    let mut ddl = format!("CREATE TABLE {qname} (cell_id text PRIMARY KEY, genes text[] NOT NULL, counts real[] NOT NULL");
    for (c, name) in m.obs.iter().zip(&labels) {
        ddl.push_str(&format!(", {} {}", quote_ident(name), c.values.sql_type()));
    }
    ddl.push(')');
    Spi::run(&ddl).or_raise();
    Spi::run(&format!(
        "COMMENT ON TABLE {qname} IS 'exceiver cell table: {} cells x {} genes, {} non-zero counts'",
        m.n_cells(),
        m.n_genes(),
        m.nnz()
    ))
    .or_raise();

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
    for c in &m.obs {
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

    let n = m.n_cells();
    let mut start = 0;
    while start < n {
        let end = (start + INSERT_BATCH).min(n);
        Spi::connect_mut(|client| {
            let stmt = client.prepare_mut(insert.as_str(), &oids).or_raise();
            for c in start..end {
                let (idx, val) = m.cell(c);
                let genes: Vec<&str> = idx.iter().map(|&g| m.genes[g as usize].as_str()).collect();
                let mut args: Vec<DatumWithOid> = vec![
                    m.barcodes[c].as_str().into(),
                    genes.into(),
                    val.to_vec().into(),
                ];
                for col in &m.obs {
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
        check_for_interrupts!();
        start = end;
    }
    qname
}

fn load(
    m: CellMatrix,
    table: &str,
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
    if m.renamed_genes > 0 {
        notice!(
            "made {} duplicate gene symbols unique by adding -1, -2, ... suffixes (as scanpy does)",
            m.renamed_genes
        );
    }
    let qname = write_table(&m, table);
    TableIterator::once((
        qname,
        m.n_cells() as i64,
        m.n_genes() as i64,
        m.nnz() as i64,
        label_columns(&m),
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
    let m = tenx::read(Path::new(path)).or_raise();
    load(m, table_name)
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
    let m = h5ad::read(Path::new(path)).or_raise();
    load(m, table_name)
}
