//! Core errors become PostgreSQL errors with a real SQLSTATE, detail and hint.

use exceiver_core::{Error, Kind};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub fn sqlstate(kind: Kind) -> PgSqlErrorCode {
    match kind {
        Kind::InvalidParameter => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        Kind::Data => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        Kind::FileFormat => PgSqlErrorCode::ERRCODE_BAD_COPY_FILE_FORMAT,
        Kind::FileNotFound => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
        Kind::Io => PgSqlErrorCode::ERRCODE_IO_ERROR,
        Kind::Limit => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        Kind::ArrayShape => PgSqlErrorCode::ERRCODE_ARRAY_ELEMENT_ERROR,
        Kind::NullValue => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        Kind::UndefinedObject => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        Kind::Internal => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
    }
}

/// Raise `e` as an ERROR. Never returns.
pub fn raise(e: Error) -> ! {
    let mut r = ErrorReport::new(sqlstate(e.kind), e.message, "exceiver");
    if let Some(d) = e.detail {
        r = r.set_detail(d);
    }
    if let Some(h) = e.hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Raise an ERROR with an explicit SQLSTATE.
pub fn raise_code(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut r = ErrorReport::new(code, message.into(), "exceiver");
    if let Some(h) = hint {
        r = r.set_hint(h.to_string());
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Unwrap a core result or raise its error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}

impl<T> OrRaise<T> for Result<T, pgrx::spi::SpiError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise_code(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("SPI: {e}"),
                None,
            ),
        }
    }
}
