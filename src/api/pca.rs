//! `exceiver.pca_embed`: the field's standard baseline embedding (normalise, log1p,
//! highly variable genes, scale, PCA; the algorithm: `exceiver_core::pca`) written into
//! a vector column, so that a model's metrics can be read beside PCA's.

use crate::api::bulk::{check_cell_table, column_type, ensure_target_column, relation_name};
use crate::api::load::quote_ident;
use crate::errors::{raise, OrRaise};
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::pca::{fit, Collect, GeneScan, PcaOptions};
use exceiver_core::Error;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use pgrx::{JsonB, PgMemoryContexts};
use serde_json::Value;
use std::time::Instant;

const KEYS: [&str; 5] = [
    "n_top_genes",
    "n_components",
    "max_value",
    "iterations",
    "seed",
];

fn bad(msg: String) -> ! {
    raise(Error::invalid(msg).with_hint(format!("Valid options: {}.", KEYS.join(", "))))
}

fn pca_options(v: &Value) -> PcaOptions {
    let Some(m) = v.as_object() else {
        bad(format!("options must be a JSON object, not {v}"))
    };
    if let Some(key) = m.keys().find(|key| !KEYS.contains(&key.as_str())) {
        bad(format!("unknown option \"{key}\""));
    }
    let int = |key: &str, lo: i64, hi: i64| -> Option<usize> {
        let v = m.get(key)?;
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Some(x as usize),
            Some(x) => bad(format!("option \"{key}\" = {x} is out of range {lo}..{hi}")),
            None => bad(format!("option \"{key}\" must be an integer, not {v}")),
        }
    };
    let d = PcaOptions::default();
    let o = PcaOptions {
        n_top_genes: int("n_top_genes", 1, 1_000_000).unwrap_or(d.n_top_genes),
        n_components: int("n_components", 1, 200).unwrap_or(d.n_components),
        iterations: int("iterations", 1, 100).unwrap_or(d.iterations),
        seed: int("seed", 0, i64::MAX).map_or(d.seed, |x| x as u64),
        max_value: match m.get("max_value") {
            None => d.max_value,
            Some(v) => v
                .as_f64()
                .unwrap_or_else(|| bad(format!("option \"max_value\" must be a number, not {v}"))),
        },
        threads: gucs::threads(),
    };
    o.check().or_raise();
    o
}

/// One cell row: its ctid, genes and counts (NULL arrays as `None`), and its name for
/// messages (`cell "<cell_id>"`, or `row <ctid>` without a cell_id column).
type Row = (
    String,
    Option<Vec<Option<String>>>,
    Option<Vec<Option<f32>>>,
    String,
);

/// Stream every row of `rel` to `each`, 1,024 at a time, with interrupts checked
/// between fetches; `lock` reads with FOR NO KEY UPDATE (the rows to be written).
fn scan_rows(rel: &str, lock: bool, each: &mut dyn FnMut(&Row)) {
    let name = if column_type(rel, "cell_id").is_some() {
        "'cell \"' || cell_id::text || '\"'"
    } else {
        "'row ' || ctid::text"
    };
    let q = format!(
        "SELECT ctid::text, genes, counts::real[], {name} FROM {rel}{}",
        if lock { " FOR NO KEY UPDATE" } else { "" }
    );
    // read-write: a locking read needs a non-read-only SPI connection
    Spi::connect_mut(|c| {
        let mut cur = c.try_open_cursor_mut(q.as_str(), &[])?;
        loop {
            let t = cur.fetch(1024)?;
            let _batch = crate::api::bulk::FetchedBatch::new();
            if t.is_empty() {
                break;
            }
            for r in t {
                let row: Row = (
                    r.get(1)?.unwrap_or_default(),
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?.unwrap_or_default(),
                );
                each(&row);
            }
            check_for_interrupts!();
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
}

/// The cell's genes and counts as the core reads them, or `None` for NULL arrays.
fn cell_of(row: &Row) -> Option<(Vec<Option<&str>>, &[Option<f32>])> {
    let (Some(g), Some(c)) = (&row.1, &row.2) else {
        return None;
    };
    Some((g.iter().map(|x| x.as_deref()).collect(), c.as_slice()))
}

/// The standard PCA baseline of cell table `source` into the vector column
/// `target_column` (created as `vector(n_components)` when missing): counts per 10,000
/// and log1p, the `n_top_genes` (2,000) most variable genes (scanpy's "seurat" rule),
/// each scaled to unit variance and clipped at `max_value` (10), the first
/// `n_components` (50) principal components. Rows with NULL genes or counts are left
/// NULL and counted. Two passes over the table, the chosen genes' values held sparse
/// (bounded by `exceiver.max_memory`).
#[pg_extern(volatile, parallel_unsafe)]
fn pca_embed(
    source: &str,
    target_column: default!(&str, "'pca'"),
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(cells, i64),
        name!(skipped, i64),
        name!(genes, i32),
        name!(components, i32),
        name!(variance_explained, f64),
        name!(seconds, f64),
    ),
> {
    let opts = pca_options(&options.0);
    let t0 = Instant::now();
    gucs::apply_limits();
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    let col = quote_ident(target_column);
    // the target's type first (before the passes over the table), its dimension once
    // the PCA knows how many components it found
    if column_type(&rel, target_column).is_some() {
        let mismatch = |t: &str, n: usize| {
            Error::data(format!(
                "column \"{target_column}\" of {rel} is {t} but the PCA asks for {} components",
                opts.n_components
            ))
            .with_hint(format!(
                "Use another column, or the option \"n_components\": {n}."
            ))
        };
        ensure_target_column(&rel, target_column, opts.n_components, mismatch);
    }
    // pass 1: every gene's statistics
    let mut scan = GeneScan::new();
    let mut skipped = 0i64;
    scan_rows(&rel, false, &mut |row| match cell_of(row) {
        None => skipped += 1,
        Some((g, c)) => scan
            .add_cell(&g, c)
            .map_err(|e| e.context(row.3.clone()))
            .or_raise(),
    });
    let sel = scan.select(opts.n_top_genes).or_raise();
    notice!(
        "pca_embed: the {} most variable of {} genes over {} cells",
        sel.names.len(),
        scan.genes(),
        scan.cells()
    );
    drop(scan);
    // pass 2: the chosen genes' values, rows locked for the write
    let mut collect = Collect::new(&sel, opts.max_value);
    let mut tids: Vec<String> = Vec::new();
    let mut tid_bytes = 0usize;
    scan_rows(&rel, true, &mut |row| {
        if let Some((g, c)) = cell_of(row) {
            collect
                .add_cell(&g, c)
                .map_err(|e| e.context(row.3.clone()))
                .or_raise();
            tid_bytes += row.0.len() + 24;
            tids.push(row.0.clone());
            if tids.len() % 1024 == 0 {
                exceiver_core::limits::check_bytes(
                    (collect.bytes() + tid_bytes) as u128,
                    &format!("holding the variable genes of {rel}"),
                )
                .or_raise();
            }
        }
    });
    let n = tids.len();
    let k = opts
        .n_components
        .min(sel.names.len())
        .min(n.saturating_sub(1));
    let l = (2 * k).max(k + 10);
    exceiver_core::limits::check_bytes(
        (collect.bytes() + tid_bytes + 8 * (n + 2 * sel.names.len()) * l) as u128,
        &format!("a PCA of {n} cells of {rel}"),
    )
    .or_raise();
    let mut last = Instant::now();
    let pca = fit(&collect, &opts, &mut |done, total| {
        check_for_interrupts!();
        if last.elapsed().as_secs_f64() >= 5.0 {
            notice!("pca_embed: iteration {done} of {total}");
            last = Instant::now();
        }
        Ok(())
    })
    .or_raise();
    let k = pca.variance.len();
    ensure_target_column(&rel, target_column, k, |t, n| {
        Error::data(format!(
            "column \"{target_column}\" of {rel} is {t} but the PCA has {k} components"
        ))
        .with_hint(format!(
            "Use another column, or the option \"n_components\": {n}."
        ))
    });
    let update = format!("UPDATE {rel} SET {col} = $2 WHERE ctid = $1::tid");
    let mut written = 0i64;
    let mut batch_mem = PgMemoryContexts::new("exceiver pca_embed batch");
    Spi::connect_mut(|client| {
        let stmt = client.prepare_mut(
            update.as_str(),
            &[pg_sys::TEXTOID.into(), pg_sys::FLOAT4ARRAYOID.into()],
        )?;
        for (b, chunk) in tids.chunks(1024).enumerate() {
            unsafe {
                // switched per row: each SPI call returns in SPI's procedure context,
                // where the next row's arguments would otherwise pile up until the end
                for (r, tid) in chunk.iter().enumerate() {
                    let i = b * 1024 + r;
                    let v = pca.scores[i * k..(i + 1) * k].to_vec();
                    written += batch_mem.switch_to(|_| {
                        client
                            .update(&stmt, None, &[tid.as_str().into(), v.into()])
                            .map(|t| t.len() as i64)
                    })?;
                }
                batch_mem.reset();
            }
            check_for_interrupts!();
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
    if written != n as i64 {
        raise(Error::internal(format!(
            "pca_embed wrote {written} rows of {n}"
        )));
    }
    if skipped > 0 {
        notice!("{skipped} cells with NULL genes or counts were left NULL");
    }
    let explained: f64 = pca.variance_ratio.iter().sum();
    notice!(
        "pca_embed: {k} components explain {:.1}% of the variance of the {} scaled genes",
        100.0 * explained,
        sel.names.len()
    );
    TableIterator::once((
        written,
        skipped,
        sel.names.len() as i32,
        k as i32,
        explained,
        t0.elapsed().as_secs_f64(),
    ))
}
