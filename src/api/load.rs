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
use std::path::Path;

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

/// Write `m` into a new table `qname` (from [`qualified_name`]).
fn write_table(m: &CellMatrix, qname: &str) {
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

    if !m.gene_ids.is_empty() {
        write_gene_ids(m, qname);
    }

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
    let qname = qualified_name(table);
    pinned(|| write_table(&m, &qname));
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
    crate::gucs::apply_limits();
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
    crate::gucs::apply_limits();
    let m = h5ad::read(Path::new(path)).or_raise();
    load(m, table_name)
}
