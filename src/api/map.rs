//! A picture of an embedding: `exceiver.embedding_map` lays a table's embeddings out in
//! 2-D with UMAP (x/y columns a BI tool can plot), `exceiver.map_png` draws such a map
//! as a PNG scatter coloured by a label column, and `exceiver.save_png` writes a PNG
//! on the server.

use crate::api::bulk::{column_type, read_embeddings, relation_name};
use crate::api::load::quote_ident;
use crate::errors::{raise, raise_code, OrRaise};
use crate::gucs;
use crate::security::{check_server_files, FileAccess, PinnedSearchPath};
use exceiver_core::layout::{umap_2d_with_progress, MapOptions, Metric, Progress, Stage};
use exceiver_core::plot::{scatter_png, PlotOptions};
use exceiver_core::Error;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::{Map, Value};
use std::time::Instant;

const MAP_KEYS: [&str; 5] = ["n_neighbors", "min_dist", "metric", "epochs", "seed"];

fn bad(msg: String) -> ! {
    raise(Error::invalid(msg).with_hint(format!("Valid options: {}.", MAP_KEYS.join(", "))))
}

fn map_options(v: &Value) -> MapOptions {
    let Some(m) = v.as_object() else {
        bad(format!("options must be a JSON object, not {v}"))
    };
    if let Some(k) = m.keys().find(|k| !MAP_KEYS.contains(&k.as_str())) {
        bad(format!("unknown option \"{k}\""));
    }
    let int = |m: &Map<String, Value>, k: &str, lo: i64, hi: i64| -> Option<i64> {
        let v = m.get(k)?;
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Some(x),
            Some(x) => bad(format!("option \"{k}\" = {x} is out of range {lo}..{hi}")),
            None => bad(format!("option \"{k}\" must be an integer, not {v}")),
        }
    };
    let mut o = MapOptions {
        threads: gucs::threads(),
        ..MapOptions::default()
    };
    if let Some(x) = int(m, "n_neighbors", 2, 200) {
        o.n_neighbors = x as usize;
    }
    if let Some(x) = int(m, "epochs", 1, 10_000) {
        o.epochs = Some(x as usize);
    }
    if let Some(x) = int(m, "seed", 0, i64::MAX) {
        o.seed = x as u64;
    }
    if let Some(v) = m.get("min_dist") {
        match v.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => o.min_dist = x as f32,
            Some(x) => bad(format!("option \"min_dist\" = {x} is out of range 0..1")),
            None => bad(format!("option \"min_dist\" must be a number, not {v}")),
        }
    }
    if let Some(v) = m.get("metric") {
        match v.as_str() {
            Some(s) => o.metric = s.parse::<Metric>().or_raise(),
            None => bad(format!("option \"metric\" must be a string, not {v}")),
        }
    }
    o
}

pub(crate) fn require_column(rel: &str, col: &str) -> String {
    column_type(rel, col).unwrap_or_else(|| {
        raise_code(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {rel} has no column \"{col}\""),
            None,
        )
    })
}

/// A 2-D UMAP map of the embeddings in `embedding_column` (a pgvector `vector` or a
/// `real[]`) of `source`: one row per cell with a non-NULL embedding, `(cell_id, x, y)`.
/// Deterministic for a given `seed` option (default 42). Progress as NOTICEs;
/// interrupts are honoured between neighbour-search blocks and between epochs.
#[pg_extern(volatile, parallel_unsafe)]
fn embedding_map(
    source: &str,
    embedding_column: default!(&str, "'embedding'"),
    options: default!(JsonB, "'{}'"),
) -> TableIterator<'static, (name!(cell_id, String), name!(x, f32), name!(y, f32))> {
    let opts = map_options(&options.0);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    require_column(&rel, "cell_id");
    let t = require_column(&rel, embedding_column);
    crate::api::bulk::check_embedding_type(&rel, embedding_column, &t);
    let t0 = Instant::now();
    let e = read_embeddings(
        &rel,
        embedding_column,
        &[],
        (opts.metric == Metric::Cosine)
            .then_some("Leave zero vectors out, or use the option \"metric\": \"euclidean\"."),
    );
    let (ids, data, dim) = (e.ids, e.data, e.dim);
    let n = ids.len();
    notice!(
        "mapping {n} embeddings of {dim} dimensions ({} neighbours, {} epochs)",
        opts.n_neighbors,
        opts.epochs
            .unwrap_or_else(|| exceiver_core::layout::default_epochs(n))
    );
    let mut last = Instant::now();
    let mut stage_seen: Option<Stage> = None;
    let points = umap_2d_with_progress(&data, n, dim.max(1), &opts, &mut |p: Progress| {
        check_for_interrupts!();
        let new_stage = stage_seen != Some(p.stage);
        if new_stage || last.elapsed().as_secs_f64() >= 5.0 {
            notice!(
                "{}: {} of {} ({:.0} s)",
                p.stage.name(),
                p.done,
                p.total,
                t0.elapsed().as_secs_f64()
            );
            last = Instant::now();
            stage_seen = Some(p.stage);
        }
        Ok(())
    })
    .or_raise();
    notice!(
        "map of {n} cells done in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    TableIterator::new(ids.into_iter().zip(points).map(|(id, p)| (id, p[0], p[1])))
}

/// A PNG scatter plot of the 2-D map in `source` (columns `x_column`, `y_column`),
/// coloured by `label_column` (NULL: one colour), with a legend and a title.
#[pg_extern(volatile, parallel_restricted)]
fn map_png(
    source: &str,
    label_column: default!(Option<&str>, "NULL"),
    title: default!(Option<&str>, "NULL"),
    x_column: default!(&str, "'x'"),
    y_column: default!(&str, "'y'"),
    width: default!(i32, 1200),
    height: default!(i32, 900),
) -> Vec<u8> {
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    require_column(&rel, x_column);
    require_column(&rel, y_column);
    let label_sql = match label_column {
        Some(l) => {
            require_column(&rel, l);
            format!("{}::text", quote_ident(l))
        }
        None => "NULL::text".to_string(),
    };
    let (points, labels) = Spi::connect(|c| {
        let mut points: Vec<[f32; 2]> = Vec::new();
        let mut labels: Vec<Option<String>> = Vec::new();
        let mut cur = c.try_open_cursor(
            &format!(
                "SELECT {}::real, {}::real, {label_sql} FROM {rel} WHERE {0} IS NOT NULL AND {1} IS NOT NULL",
                quote_ident(x_column),
                quote_ident(y_column)
            ),
            &[],
        )?;
        loop {
            let rows = cur.fetch(4096)?;
            let _batch = crate::api::bulk::FetchedBatch::new();
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let x = row.get::<f32>(1)?.unwrap_or(f32::NAN);
                let y = row.get::<f32>(2)?.unwrap_or(f32::NAN);
                points.push([x, y]);
                labels.push(row.get::<String>(3)?);
            }
            check_for_interrupts!();
        }
        Ok::<_, pgrx::spi::SpiError>((points, labels))
    })
    .or_raise();
    let side = |name: &str, v: i32| -> u32 {
        u32::try_from(v).unwrap_or_else(|_| bad(format!("{name} {v} must be positive")))
    };
    let opts = PlotOptions {
        width: side("width", width),
        height: side("height", height),
        legend_title: label_column.map(str::to_string),
        ..PlotOptions::default()
    };
    let default_title = format!("{rel}: {} cells", points.len());
    scatter_png(&points, &labels, title.unwrap_or(&default_title), &opts).or_raise()
}

/// Write `data` (e.g. a PNG from `map_png`) to the server file `path`, replacing it;
/// returns the bytes written. Superusers and members of `pg_write_server_files` only.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn save_png(data: &[u8], path: &str) -> i64 {
    check_server_files(
        FileAccess::Write,
        "; or fetch the bytes of exceiver.map_png() with a client (psql: \\lo_export of lo_from_bytea(0, ...))",
    );
    if !std::path::Path::new(path).is_absolute() {
        raise(Error::invalid(format!("path \"{path}\" is not absolute")));
    }
    if data.len() < 8 || &data[..8] != b"\x89PNG\r\n\x1a\n" {
        raise(Error::invalid(format!(
            "the data ({} bytes) is not a PNG image",
            data.len()
        )));
    }
    std::fs::write(path, data).unwrap_or_else(|e| {
        raise(Error::new(
            exceiver_core::Kind::Io,
            format!("could not write file \"{path}\": {e}"),
        ))
    });
    data.len() as i64
}
