//! Bulk embedding of a whole cell table: `exceiver.embed_table`.
//!
//! Reads the table through a cursor in batches, embeds each batch on
//! `exceiver.threads` worker threads (which never call PostgreSQL), writes the
//! embeddings into a `vector(n)` column, checks for interrupts between batches and
//! reports progress. Memory is bounded by the batch, not the table.

use crate::api::load::quote_ident;
use crate::api::model::{cell_input_iter, get_model, CellInput, Loaded};
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::accel::DeviceModel;
use exceiver_core::coverage::{warning as coverage_warning, CoverageFit};
use exceiver_core::device::Device;
use exceiver_core::{Error, Kind};
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use pgrx::{PgMemoryContexts, PgSqlErrorCode};
use std::time::Instant;

/// A relation given as text (schema-qualified or not), resolved with the caller's
/// search_path as a table name in SQL would be, returned fully qualified and quoted
/// (`"public"."cells"`), so that it means the same under [`crate::security::pinned`].
/// Call it before pinning the search path.
pub(crate) fn relation_name(source: &str) -> String {
    Spi::connect(|c| {
        c.select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) \
             FROM pg_catalog.pg_class c, pg_catalog.pg_namespace n \
             WHERE c.oid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass \
               AND n.oid OPERATOR(pg_catalog.=) c.relnamespace",
            Some(1),
            &[source.into()],
        )?
        .first()
        .get::<String>(1)
    })
    .or_raise()
    .unwrap_or_else(|| {
        raise(Error::new(
            Kind::UndefinedObject,
            format!("relation \"{source}\" does not exist"),
        ))
    })
}

/// The quoted schema of pgvector's `vector` type (it need not be on the search_path).
pub(crate) fn vector_schema() -> String {
    Spi::connect(|c| {
        c.select(
            "SELECT quote_ident(n.nspname) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.typname = 'vector' AND t.typtype = 'b' ORDER BY n.oid LIMIT 1",
            Some(1),
            &[],
        )?
        .first()
        .get::<String>(1)
    })
    .or_raise()
    .unwrap_or_else(|| raise(Error::new(Kind::UndefinedObject, "type \"vector\" does not exist").with_hint("CREATE EXTENSION vector;")))
}

/// The type of `column` in `rel` (`format_type` form, e.g. `text[]`; pgvector's types
/// without their schema, e.g. `vector(512)`, wherever pgvector lives), if it exists.
pub(crate) fn column_type(rel: &str, column: &str) -> Option<String> {
    Spi::connect(|c| {
        c.select(
            "SELECT (SELECT CASE WHEN t.typname IN ('vector', 'halfvec', 'sparsevec') AND t.typtype = 'b' \
                                 THEN t.typname::text || CASE WHEN a.atttypmod >= 0 THEN '(' || a.atttypmod || ')' ELSE '' END \
                                 ELSE format_type(a.atttypid, a.atttypmod) END \
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                     WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped)",
            Some(1),
            &[rel.into(), column.into()],
        )?
        .first()
        .get::<String>(1)
    })
    .or_raise()
}

/// The dimension of a pgvector dense type as [`column_type`] writes it: `Some(Some(n))`
/// for `vector(n)` / `halfvec(n)`, `Some(None)` for either without a dimension, `None`
/// for any other type.
pub(crate) fn dense_vector_dim(t: &str) -> Option<Option<usize>> {
    for base in ["vector", "halfvec"] {
        if t == base {
            return Some(None);
        }
        if let Some(n) = t
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.strip_suffix(')'))
        {
            return n.parse().ok().map(Some);
        }
    }
    None
}

/// Refuse (42804) an embedding column that is neither a pgvector `vector` / `halfvec`
/// nor a `real[]` / `double precision[]`; `t` is its type from [`column_type`].
pub(crate) fn check_embedding_type(rel: &str, column: &str, t: &str) {
    if dense_vector_dim(t).is_none() && t != "real[]" && t != "double precision[]" {
        raise_code(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{column}\" of {rel} is {t}, not a vector, halfvec or real[]"),
            None,
        );
    }
}

/// Check the column that a bulk function writes `dim`-dimensional rows into: false when
/// it is missing; a `vector` or `halfvec` of that dimension (or of none) is true
/// (`halfvec` stores half precision: pgvector's assignment cast rounds each value);
/// another dimension is a data error built by `mismatch(type, n)`; any other type is 42804.
pub(crate) fn check_target_column(
    rel: &str,
    column: &str,
    dim: usize,
    mismatch: impl Fn(&str, usize) -> Error,
) -> bool {
    let Some(t) = column_type(rel, column) else {
        return false;
    };
    match dense_vector_dim(&t) {
        Some(None) => true,
        Some(Some(n)) if n == dim => true,
        Some(Some(n)) => raise(mismatch(&t, n)),
        None => raise_code(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{column}\" of {rel} is {t}, not a pgvector vector or halfvec"),
            None,
        ),
    }
}

/// [`check_target_column`], adding the column as `vector(dim)` when it is missing.
pub(crate) fn ensure_target_column(
    rel: &str,
    column: &str,
    dim: usize,
    mismatch: impl Fn(&str, usize) -> Error,
) {
    if !check_target_column(rel, column, dim, mismatch) {
        Spi::run(&format!(
            "ALTER TABLE {rel} ADD COLUMN {} {}.vector({dim})",
            quote_ident(column),
            vector_schema()
        ))
        .or_raise();
    }
}

/// One fetched batch of a cursor, freed when this guard drops: the SPI tuple table of
/// the fetch just made and every value read from its rows. pgrx's `get` converts a value
/// in the *parent* of the current memory context (so that it outlives SPI), so the guard
/// makes a context and a child of it and runs in the child: what the rows' values
/// allocate (detoasted arrays, copies) lands in the parent, which the guard deletes.
/// Without it a scan keeps every row it read until the function returns: one
/// `embed_table` over 100,000 cells peaked at 3.1 GB, 2 GB of it in SPI's procedure
/// context. Create it right after `fetch`, before reading the rows.
pub(crate) struct FetchedBatch {
    table: *mut pg_sys::SPITupleTable,
    /// The context the rows' values go to (its child is current while the guard lives).
    cx: Option<PgMemoryContexts>,
    previous: pg_sys::MemoryContext,
}

impl FetchedBatch {
    pub(crate) fn new() -> FetchedBatch {
        let cx = PgMemoryContexts::new("exceiver fetched batch");
        // SAFETY: reading SPI's result pointer and switching to contexts we own; the child
        // is deleted with its parent (its wrapper is forgotten, not dropped)
        unsafe {
            let table = pg_sys::SPI_tuptable;
            let previous = pg_sys::MemoryContextSwitchTo(cx.value());
            let child = PgMemoryContexts::new("exceiver fetched batch (reading)");
            pg_sys::MemoryContextSwitchTo(child.value());
            std::mem::forget(child);
            FetchedBatch {
                table,
                cx: Some(cx),
                previous,
            }
        }
    }
}

impl Drop for FetchedBatch {
    fn drop(&mut self) {
        // SAFETY: the previous context outlives the guard; the tuple table belongs to
        // the SPI connection that is still open (the guard lives inside it)
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.previous);
            if std::thread::panicking() {
                // an error is on its way: the transaction's abort frees both
                std::mem::forget(self.cx.take());
                return;
            }
            if !self.table.is_null() {
                pg_sys::SPI_freetuptable(self.table);
            }
        }
        drop(self.cx.take());
    }
}

/// Check that `rel` has the cell-table columns a function reads.
pub(crate) fn check_cell_table(rel: &str) {
    for (col, want) in [("genes", "text[]"), ("counts", "")] {
        match column_type(rel, col) {
            None => raise_code(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("table {rel} has no column \"{col}\""),
                Some("A cell table has columns cell_id text, genes text[] and counts real[] (see exceiver.load_10x)."),
            ),
            Some(t) if !want.is_empty() && t != want => raise_code(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("column \"{col}\" of {rel} is {t}, expected {want}"),
                None,
            ),
            Some(t) if col == "counts" && !t.ends_with("[]") => raise_code(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("column \"counts\" of {rel} is {t}, expected real[]"),
                None,
            ),
            _ => {}
        }
    }
}

/// Embed every row of cell table `source` with `model` into the `vector` (or `halfvec`)
/// column `target_column` (created as `vector(n)` when missing). Rows whose cells have no
/// counts on the model's genes, or NULL genes/counts, are left NULL and counted. On a
/// table with foreign partitions each shard embeds its own cells ([`embed_on_shards`]).
#[pg_extern(volatile, parallel_unsafe)]
fn embed_table(
    model: &str,
    source: &str,
    target_column: default!(&str, "'embedding'"),
    batch_size: default!(i32, 512),
) -> TableIterator<
    'static,
    (
        name!(cells, i64),
        name!(skipped, i64),
        name!(seconds, f64),
        name!(cells_per_s, f64),
    ),
> {
    if !(1..=100_000).contains(&batch_size) {
        raise(Error::invalid(format!(
            "batch_size must be between 1 and 100000, not {batch_size}"
        )));
    }
    let device = gucs::device();
    device.check_supported().or_raise();
    gucs::apply_precision();
    let m = get_model(model);
    let dim = m.model.embedding_len();
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    let col = quote_ident(target_column);
    let mismatch = |t: &str, _: usize| {
        Error::data(format!(
            "column \"{target_column}\" of {rel} is {t} but model \"{model}\" gives {dim} dimensions"
        ))
        .with_hint(format!(
            "Use another column, or ALTER TABLE {rel} ALTER COLUMN {col} TYPE {}({dim}).",
            if t.starts_with("halfvec") { "halfvec" } else { "vector" }
        ))
    };
    let start = Instant::now();
    let shards = foreign_parts(&rel);
    let (written, skipped) = if shards > 0 {
        if !check_target_column(&rel, target_column, dim, mismatch) {
            raise_code(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{target_column}\" of {rel} does not exist"),
                Some(&format!(
                    "{rel} has {shards} foreign partitions: add the column to each shard's table and here (ALTER TABLE ... ADD COLUMN {col} vector({dim})); an ALTER here does not reach the shards."
                )),
            )
        }
        embed_on_shards(model, m.stamp.version, &rel, &col, shards)
    } else {
        ensure_target_column(&rel, target_column, dim, mismatch);
        // exceiver.device: a GPU (cuda builds) gets the batched candle model; the CPU keeps
        // the hand-written one on worker threads
        let on_device = match device {
            Device::Cpu => None,
            d => Some(DeviceModel::from_exceiver(&m.model, &d.open().or_raise()).or_raise()),
        };
        embed_in_place(&m, on_device.as_ref(), &rel, &col, batch_size)
    };
    let s = start.elapsed().as_secs_f64();
    TableIterator::once((written, skipped, s, written as f64 / s.max(1e-9)))
}

/// The scan of `embed_table` on a local table: the rows are read through a cursor in
/// batches of `batch_size`, embedded on `exceiver.threads` worker threads (or the device
/// model), and written back by key; interrupts are checked and progress reported between
/// batches. Returns the rows written and the rows skipped.
fn embed_in_place(
    m: &Loaded,
    on_device: Option<&DeviceModel>,
    rel: &str,
    col: &str,
    batch_size: i32,
) -> (i64, i64) {
    let dim = m.model.embedding_len();
    let total = Spi::connect(|c| {
        c.select(&format!("SELECT count(*) FROM {rel}"), Some(1), &[])?
            .first()
            .get::<i64>(1)
    })
    .or_raise()
    .unwrap_or(0);
    let threads = gucs::threads();
    // Each row is locked as the cursor reads it (FOR NO KEY UPDATE): a row that another
    // session updated meanwhile is read in its newest version, so its ctid names exactly
    // the row version this function then writes, and no concurrent update can move it
    // in between. Every write is counted from what UPDATE reports.
    // (tableoid, ctid) names a row in a partitioned table too, where ctids repeat
    let query = format!(
        "SELECT ctid::text, genes, counts::real[], tableoid::oid::text FROM {rel} FOR NO KEY UPDATE"
    );
    let update = format!("UPDATE {rel} SET {col} = $2 WHERE ctid = $1::tid AND tableoid = $3::oid");
    let start = Instant::now();
    let (mut done, mut skipped, mut written) = (0i64, 0i64, 0i64);
    let mut next_report = total / 10;
    let mut coverage = CoverageFit::new(&m.vocab);
    // One SPI connection for the whole scan (a cursor does not outlive it); the update
    // arguments of each batch live in a memory context reset after the batch.
    let mut batch_mem = PgMemoryContexts::new("exceiver embed_table batch");
    Spi::connect_mut(|client| {
        let mut cur = client.try_open_cursor_mut(query.as_str(), &[])?;
        let stmt = client.prepare_mut(
            update.as_str(),
            &[pg_sys::TEXTOID.into(), pg_sys::FLOAT4ARRAYOID.into(), pg_sys::TEXTOID.into()],
        )?;
        loop {
            // Read one batch as owned copies; the tuple table is freed at once.
            type Row = (String, Option<Vec<Option<String>>>, Option<Vec<Option<f32>>>, String);
            let rows: Vec<Row> = {
                let t = cur.fetch(batch_size as _)?;
                let _batch = FetchedBatch::new();
                let mut out = Vec::with_capacity(t.len());
                for r in t {
                    let tid: String = r.get(1)?.unwrap_or_default();
                    let part: String = r.get(4)?.unwrap_or_default();
                    out.push((tid, r.get::<Vec<Option<String>>>(2)?, r.get::<Vec<Option<f32>>>(3)?, part));
                }
                out
            };
            if rows.is_empty() {
                break;
            }
            let mut inputs: Vec<(usize, CellInput)> = Vec::with_capacity(rows.len());
            for (k, (tid, genes, counts, _)) in rows.iter().enumerate() {
                let (Some(g), Some(c)) = (genes, counts) else {
                    skipped += 1;
                    continue;
                };
                if g.len() != c.len() {
                    raise(Error::shape(format!(
                        "row {tid}: genes has {} elements but counts has {}",
                        g.len(),
                        c.len()
                    )));
                }
                // coverage of the model's genes, for the warning at the end (a cell it
                // cannot read fails just below with the same message)
                let names: Vec<Option<&str>> = g.iter().map(|x| x.as_deref()).collect();
                let _ = coverage.add_cell(&names, c);
                match cell_input_iter(m, g.len(), g.iter().map(|x| x.as_deref()), c.iter().copied()) {
                    Ok((cell, _)) => inputs.push((k, cell)),
                    Err(e) if e.kind == Kind::InvalidParameter => skipped += 1,
                    Err(e) => raise(e.context(format!("row {tid}"))),
                }
            }
            let cells: Vec<(&[u32], &[f32])> =
                inputs.iter().map(|(_, c)| (c.genes.as_slice(), c.values.as_slice())).collect();
            // Worker threads: pure Rust, no PostgreSQL calls.
            let embs = match on_device {
                Some(dm) => dm.embed_batch(&cells),
                None => m.model.embed_batch(&cells, threads),
            }
            .or_raise();
            unsafe {
                // switched per row: each SPI call returns in SPI's procedure context,
                // where the next row's arguments would otherwise pile up until the end
                for (j, (k, _)) in inputs.iter().enumerate() {
                    let v = embs[j * dim..(j + 1) * dim].to_vec();
                    written += batch_mem.switch_to(|_| {
                        client
                            .update(
                                &stmt,
                                None,
                                &[rows[*k].0.as_str().into(), v.into(), rows[*k].3.as_str().into()],
                            )
                            .map(|t| t.len() as i64)
                    })?;
                }
                batch_mem.reset();
            }
            done += rows.len() as i64;
            check_for_interrupts!();
            if done >= next_report && done < total {
                let s = start.elapsed().as_secs_f64();
                let rate = done as f64 / s.max(1e-9);
                notice!(
                    "embed_table: {done} of {total} cells ({:.0}%), {rate:.0} cells/s, about {:.0} s left",
                    100.0 * done as f64 / total.max(1) as f64,
                    (total - done) as f64 / rate.max(1e-9)
                );
                next_report = done + total / 10;
            }
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
    notice_skipped(skipped);
    if let Some(w) = coverage_warning(&coverage.finish(), &format!("table {rel}")) {
        warning!("{w}");
    }
    if written != done - skipped {
        raise(Error::internal(format!(
            "embed_table wrote {written} rows but embedded {} cells",
            done - skipped
        )));
    }
    (written, skipped)
}

/// How many of the leaf partitions of `rel` (or `rel` itself) are foreign tables.
pub(crate) fn foreign_parts(rel: &str) -> i64 {
    Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass) t \
         JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid \
         WHERE t.isleaf AND c.relkind OPERATOR(pg_catalog.=) 'f'",
        &[rel.into()],
    )
    .or_raise()
    .unwrap_or(0)
}

/// `embed_table` over a table whose partitions are (or which is) `postgres_fdw` foreign
/// tables: one `UPDATE` that sets the column `col` (quoted, checked by the caller) to
/// `exceiver.embed_at` with the model pinned at `version`. The function is IMMUTABLE and
/// the servers list exceiver in their `extensions` option, so the planner ships the whole
/// statement to each shard (a direct modification) and the cells never leave their shard.
/// Returns the rows written and the rows left NULL.
fn embed_on_shards(model: &str, version: i64, rel: &str, col: &str, shards: i64) -> (i64, i64) {
    notice!("embed_table: {rel} has {shards} foreign partitions: each shard embeds its own cells");
    let update =
        format!("UPDATE {rel} SET {col} = exceiver.embed_at($1, {version}, genes, counts::real[])");
    let (written, skipped) = Spi::connect_mut(|c| {
        let n = c.update(update.as_str(), None, &[model.into()])?.len() as i64;
        let nulls = c
            .select(
                &format!("SELECT count(*) FROM {rel} WHERE {col} IS NULL"),
                Some(1),
                &[],
            )?
            .first()
            .get::<i64>(1)?
            .unwrap_or(0);
        Ok::<_, SpiError>((n - nulls, nulls))
    })
    .or_raise();
    notice_skipped(skipped);
    (written, skipped)
}

/// The NOTICE for cells `embed_table` left NULL.
fn notice_skipped(skipped: i64) {
    if skipped > 0 {
        notice!("{skipped} cells had no counts on the model's genes (or NULL arrays) and were left NULL");
    }
}

/// Embeddings read from a table: one row per cell with a non-NULL embedding (and
/// non-NULL values in the label columns asked for), in `cell_id` order (physical order
/// where the table has no `cell_id`).
pub(crate) struct Embeddings {
    /// `cell_id`, or the row's `ctid` where the table has no `cell_id` column.
    pub ids: Vec<String>,
    /// The label columns' values as text, one vector per column asked for.
    pub labels: Vec<Vec<String>>,
    /// Row-major, `ids.len() × dim`.
    pub data: Vec<f32>,
    pub dim: usize,
}

/// Read `cell_id` and the embeddings in `column` (a pgvector `vector` or a `real[]`)
/// of `rel` (a name from [`relation_name`]; call with the search path pinned), and the
/// text of each column of `labels`, through a cursor. Rows with a NULL embedding or
/// label are skipped with a NOTICE; embeddings of different lengths, NULL elements,
/// non-finite values and, with `refuse_zero` (its hint), zero vectors (no cosine
/// distance) are errors naming the cell. The memory is checked against
/// `exceiver.max_memory` after each fetch of 1,024 rows; interrupts are checked between
/// fetches.
pub(crate) fn read_embeddings(
    rel: &str,
    column: &str,
    labels: &[&str],
    refuse_zero: Option<&str>,
) -> Embeddings {
    gucs::apply_limits();
    let col = quote_ident(column);
    let id = if column_type(rel, "cell_id").is_some() {
        "cell_id"
    } else {
        "ctid"
    };
    let labs: String = labels
        .iter()
        .map(|l| format!(", {}::text", quote_ident(l)))
        .collect();
    let (e, null_emb, null_label) = Spi::connect(|c| {
        let mut e = Embeddings {
            ids: Vec::new(),
            labels: vec![Vec::new(); labels.len()],
            data: Vec::new(),
            dim: 0,
        };
        let (mut null_emb, mut null_label) = (0i64, 0i64);
        let mut bytes = 0u128;
        let mut cur = c.try_open_cursor(
            &format!("SELECT {id}::text, {col}::real[]{labs} FROM {rel} ORDER BY {id}"),
            &[],
        )?;
        let mut row_labels: Vec<String> = Vec::with_capacity(labels.len());
        loop {
            let rows = cur.fetch(1024)?;
            let _batch = FetchedBatch::new();
            if rows.is_empty() {
                break;
            }
            'rows: for row in rows {
                let id = row.get::<String>(1)?.unwrap_or_default();
                let Some(v) = row.get::<Vec<Option<f32>>>(2)? else {
                    null_emb += 1;
                    continue;
                };
                row_labels.clear();
                for c in 0..labels.len() {
                    let Some(l) = row.get::<String>(3 + c)? else {
                        null_label += 1;
                        continue 'rows;
                    };
                    row_labels.push(l);
                }
                check_embedding(&id, &v, &mut e.dim, e.ids.is_empty(), refuse_zero);
                bytes += (v.len() * 4
                    + id.len()
                    + row_labels.iter().map(|s| s.len() + 24).sum::<usize>()
                    + 48) as u128;
                e.data.extend(v.into_iter().flatten());
                e.ids.push(id);
                for (out, l) in e.labels.iter_mut().zip(row_labels.drain(..)) {
                    out.push(l);
                }
            }
            // checked once a fetch: past the limit by at most one batch of rows
            exceiver_core::limits::check_bytes(bytes, &format!("reading the embeddings of {rel}"))
                .or_raise();
            check_for_interrupts!();
        }
        Ok::<_, SpiError>((e, null_emb, null_label))
    })
    .or_raise();
    if null_emb > 0 {
        notice!("{null_emb} cells of {rel} with a NULL embedding were skipped");
    }
    if null_label > 0 {
        notice!("{null_label} cells of {rel} with a NULL label were skipped");
    }
    if e.dim == 0 && !e.ids.is_empty() {
        raise(Error::data(format!(
            "the embeddings in \"{column}\" of {rel} are empty"
        )));
    }
    e
}

/// Labels as indices into their sorted distinct values: `(indices, names)`.
pub(crate) fn label_indices(labels: &[String]) -> (Vec<u32>, Vec<String>) {
    let mut names = labels.to_vec();
    names.sort();
    names.dedup();
    let idx = labels
        .iter()
        .map(|l| names.binary_search(l).map_or(0, |i| i as u32))
        .collect();
    (idx, names)
}

fn check_embedding(
    id: &str,
    v: &[Option<f32>],
    dim: &mut usize,
    first: bool,
    refuse_zero: Option<&str>,
) {
    if first {
        *dim = v.len();
    } else if v.len() != *dim {
        raise(Error::shape(format!(
            "embedding of cell \"{id}\" has {} dimensions, the first one {dim}",
            v.len()
        )));
    }
    if v.iter().any(Option::is_none) {
        raise(Error::new(
            Kind::NullValue,
            format!("embedding of cell \"{id}\" has a NULL element"),
        ));
    }
    if let Some(x) = v.iter().flatten().find(|x| !x.is_finite()) {
        raise(Error::data(format!(
            "embedding of cell \"{id}\" has a non-finite value {x}"
        )));
    }
    if let Some(hint) = refuse_zero {
        if v.iter().flatten().all(|&x| x == 0.0) {
            raise(
                Error::data(format!(
                    "embedding of cell \"{id}\" is a zero vector, for which cosine distance is undefined"
                ))
                .with_hint(hint),
            );
        }
    }
}
