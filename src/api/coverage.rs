//! `exceiver.vocabulary_coverage`: how much of a model's gene vocabulary a cell table
//! expresses (the algorithm: `exceiver_core::coverage`).

use crate::api::bulk::{check_cell_table, column_type, relation_name};
use crate::api::model::get_model;
use crate::errors::OrRaise;
use crate::gucs;
use crate::security::PinnedSearchPath;
use exceiver_core::coverage::{warning, CoverageFit};
use pgrx::prelude::*;
use pgrx::spi::SpiError;

/// The share of `model`'s genes that the cells of `source` express, the share of their
/// counts on those genes (overall and the median cell), the cells with none, and the
/// most-counted genes the model does not know (a hint of mismatched identifiers).
/// Rows with NULL genes or counts are not counted. A WARNING when fewer than half of
/// the model's genes are expressed.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn vocabulary_coverage(
    model: &str,
    source: &str,
) -> TableIterator<
    'static,
    (
        name!(cells, i64),
        name!(model_genes, i32),
        name!(expressed_model_genes, i32),
        name!(vocabulary_coverage, f64),
        name!(table_genes, i32),
        name!(count_fraction, f64),
        name!(median_cell_fraction, f64),
        name!(cells_without_model_genes, i64),
        name!(unmatched_examples, Vec<String>),
    ),
> {
    gucs::apply_limits();
    let m = get_model(model);
    let rel = relation_name(source);
    let _search_path = PinnedSearchPath::new();
    check_cell_table(&rel);
    let mut fit = CoverageFit::new(&m.vocab);
    let name = if column_type(&rel, "cell_id").is_some() {
        "'cell \"' || cell_id::text || '\"'"
    } else {
        "'row ' || ctid::text"
    };
    Spi::connect(|c| {
        let mut cur = c.try_open_cursor(
            &format!("SELECT {name}, genes, counts::real[] FROM {rel} WHERE genes IS NOT NULL AND counts IS NOT NULL"),
            &[],
        )?;
        loop {
            let t = cur.fetch(1024)?;
            let _batch = crate::api::bulk::FetchedBatch::new();
            if t.is_empty() {
                break;
            }
            for r in t {
                let what: String = r.get(1)?.unwrap_or_default();
                let genes: Vec<Option<String>> = r.get(2)?.unwrap_or_default();
                let counts: Vec<Option<f32>> = r.get(3)?.unwrap_or_default();
                let g: Vec<Option<&str>> = genes.iter().map(|x| x.as_deref()).collect();
                fit.add_cell(&g, &counts)
                    .map_err(|e| e.context(what.clone()))
                    .or_raise();
            }
            exceiver_core::limits::check_bytes(fit.bytes() as u128, &format!("the coverage of {rel}"))
                .or_raise();
            check_for_interrupts!();
        }
        Ok::<_, SpiError>(())
    })
    .or_raise();
    let c = fit.finish();
    if let Some(w) = warning(&c, &format!("table {rel}")) {
        warning!("{w}");
    }
    TableIterator::once((
        c.cells as i64,
        c.model_genes as i32,
        c.expressed_model_genes as i32,
        c.vocabulary_coverage,
        c.table_genes as i32,
        c.count_fraction,
        c.median_cell_fraction,
        c.cells_without_model_genes as i64,
        c.unmatched_examples,
    ))
}
