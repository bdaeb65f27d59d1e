//! Embed on insert: `exceiver.embed_trigger(model, column)`, a row trigger that keeps a
//! cell table's embedding column current as `INSERT`, `COPY` and `UPDATE` change cells.
//!
//! ```sql
//! CREATE TRIGGER cells_embed BEFORE INSERT OR UPDATE OF genes, counts ON cells
//!   FOR EACH ROW EXECUTE FUNCTION exceiver.embed_trigger('pbmc', 'embedding');
//! ```
//!
//! The cell goes through the same contract as `exceiver.embed` and `embed_table`; a cell
//! with no counts on the model's genes (or NULL arrays) gets a NULL embedding, as
//! `embed_table` leaves it. The embedding is converted to the column's type by the
//! assignment cast PostgreSQL finds from `real[]` (pgvector's `vector` or `halfvec`).

use crate::api::model::{cell_input_iter, get_model};
use crate::errors::{raise, raise_code, OrRaise};
use exceiver_core::{Error, Kind};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CStr;
use std::num::NonZeroUsize;

/// A column of the triggering table: its number, type and type modifier.
struct Column {
    attno: NonZeroUsize,
    typid: pg_sys::Oid,
    typmod: i32,
}

fn find_column(tuple: &PgHeapTuple<'_, impl WhoAllocated>, name: &str, table: &str) -> Column {
    for (attno, att) in tuple.attributes() {
        if !att.attisdropped && att.name() == name {
            return Column {
                attno,
                typid: att.atttypid,
                typmod: att.atttypmod,
            };
        }
    }
    raise_code(
        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
        format!("table {table} has no column \"{name}\""),
        Some("exceiver.embed_trigger reads columns genes text[] and counts real[] and writes the column its second argument names."),
    )
}

/// The type's name without its schema (`vector`, `halfvec`, `real[]`).
fn type_name(typid: pg_sys::Oid) -> String {
    // format_type_be_qualified: always schema-qualified, whatever the search_path
    let q = unsafe { CStr::from_ptr(pg_sys::format_type_be_qualified(typid)) }
        .to_string_lossy()
        .into_owned();
    match q.rsplit_once('.') {
        Some((_, t)) if !q.ends_with("[]") => t.trim_matches('"').to_string(),
        _ => unsafe { CStr::from_ptr(pg_sys::format_type_be(typid)) }
            .to_string_lossy()
            .into_owned(),
    }
}

/// Is `new` a change of the cell (genes or counts) from `old`?
fn cell_changed(
    old: &PgHeapTuple<'_, AllocatedByPostgres>,
    new: &PgHeapTuple<'_, AllocatedByPostgres>,
) -> bool {
    let (g, c) = (cell_arrays(old), cell_arrays(new));
    let bits = |c: Option<Vec<Option<f32>>>| {
        c.map(|v| {
            v.into_iter()
                .map(|x| x.map(f32::to_bits))
                .collect::<Vec<_>>()
        })
    };
    g.0 != c.0 || bits(g.1) != bits(c.1)
}

/// The row's genes and counts (None where NULL or not readable as text[] / real[]).
type CellArrays = (Option<Vec<Option<String>>>, Option<Vec<Option<f32>>>);

fn cell_arrays(t: &PgHeapTuple<'_, AllocatedByPostgres>) -> CellArrays {
    let genes = t
        .get_by_name::<Array<'_, &str>>("genes")
        .ok()
        .flatten()
        .map(|a| a.iter().map(|x| x.map(str::to_string)).collect());
    let counts = t
        .get_by_name::<Array<'_, f32>>("counts")
        .ok()
        .flatten()
        .map(|a| a.iter().collect());
    (genes, counts)
}

/// Row trigger: embeds the new or updated cell with the model named by the trigger's
/// first argument into the `vector` / `halfvec` column named by its second.
#[pg_trigger]
fn embed_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    let usage = "CREATE TRIGGER … BEFORE INSERT OR UPDATE OF genes, counts ON cells FOR EACH ROW \
                 EXECUTE FUNCTION exceiver.embed_trigger('model', 'embedding');";
    let protocol = |msg: String| -> ! {
        raise_code(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            msg,
            Some(usage),
        )
    };
    let name = trigger.name().unwrap_or("?").to_string();
    if !matches!(trigger.level(), PgTriggerLevel::Row)
        || !matches!(trigger.when(), Ok(PgTriggerWhen::Before))
    {
        protocol(format!(
            "trigger \"{name}\": exceiver.embed_trigger must run BEFORE, FOR EACH ROW"
        ));
    }
    let args = trigger.extra_args().unwrap_or_default();
    let [model, column] = args.as_slice() else {
        raise_code(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "trigger \"{name}\": exceiver.embed_trigger takes 2 arguments (model, column), not {}",
                args.len()
            ),
            Some(usage),
        )
    };
    let table = match (trigger.table_schema(), trigger.table_name()) {
        (Ok(s), Ok(t)) => format!("{s}.{t}"),
        _ => "?".to_string(),
    };
    let Some(new) = trigger.new() else {
        protocol(format!(
            "trigger \"{name}\": exceiver.embed_trigger fires on INSERT or UPDATE only"
        ))
    };
    for (col, want) in [
        ("genes", pg_sys::TEXTARRAYOID),
        ("counts", pg_sys::FLOAT4ARRAYOID),
    ] {
        let c = find_column(&new, col, &table);
        if c.typid != want {
            raise_code(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "column \"{col}\" of {table} is {}, exceiver.embed_trigger reads {}",
                    type_name(c.typid),
                    type_name(want)
                ),
                None,
            );
        }
    }
    let target = find_column(&new, column, &table);
    if let Some(old) = trigger.old() {
        // An UPDATE that leaves the cell as it was (of other columns, embed_table's own
        // write included) keeps the embedding it has; one with none gets it computed
        // (`UPDATE cells SET genes = genes` fills a column the trigger was added after).
        let td = trigger.trigger_data();
        let has_embedding = unsafe {
            !pg_sys::heap_attisnull(
                td.tg_newtuple,
                target.attno.get() as i32,
                (*td.tg_relation).rd_att,
            )
        };
        if has_embedding && !cell_changed(&old, &new) {
            return Ok(Some(new.into_owned()));
        }
    }
    let tname = type_name(target.typid);
    if tname != "vector" && tname != "halfvec" {
        raise_code(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{column}\" of {table} is {tname}, not a pgvector vector or halfvec"),
            None,
        );
    }
    let m = get_model(model);
    let dim = m.model.embedding_len();
    if target.typmod >= 0 && target.typmod as usize != dim {
        raise(Error::data(format!(
            "column \"{column}\" of {table} is {tname}({}) but model \"{model}\" gives {dim} dimensions",
            target.typmod
        )));
    }
    let (genes, counts) = cell_arrays(&new);
    let embedding: Option<Vec<f32>> = match (genes, counts) {
        (Some(g), Some(c)) => {
            if g.len() != c.len() {
                raise(Error::shape(format!(
                    "genes has {} elements but counts has {}",
                    g.len(),
                    c.len()
                )));
            }
            match cell_input_iter(
                &m,
                g.len(),
                g.iter().map(|x| x.as_deref()),
                c.iter().copied(),
            ) {
                Ok((cell, _)) => Some(m.model.embed(&cell.genes, &cell.values).or_raise()),
                Err(e) if e.kind == Kind::InvalidParameter => None,
                Err(e) => raise(e.context(format!("trigger \"{name}\" on {table}"))),
            }
        }
        _ => None,
    };
    let datum = embedding.and_then(|v| {
        let arr = v.into_datum()?;
        let mut func = pg_sys::InvalidOid;
        let path = unsafe {
            pg_sys::find_coercion_pathway(
                target.typid,
                pg_sys::FLOAT4ARRAYOID,
                pg_sys::CoercionContext::COERCION_ASSIGNMENT,
                &mut func,
            )
        };
        if path != pg_sys::CoercionPathType::COERCION_PATH_FUNC {
            raise(Error::internal(format!(
                "no assignment cast from real[] to {tname}"
            )));
        }
        // pgvector's array_to_vector / array_to_halfvec (array, typmod, is_explicit)
        Some(unsafe {
            pg_sys::OidFunctionCall3Coll(
                func,
                pg_sys::InvalidOid,
                arr,
                pg_sys::Datum::from(target.typmod),
                pg_sys::Datum::from(false),
            )
        })
    });
    let mut out = new.into_owned();
    unsafe { out.set_by_index_unchecked(target.attno, datum) };
    Ok(Some(out))
}
