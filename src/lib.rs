//! exceiver: the Exceiver single-cell expression model inside PostgreSQL.
//!
//! This crate is the thin SQL skin: it maps SQL calls onto `exceiver-core` (model,
//! preprocessing, file readers) and core errors onto SQLSTATEs. See README.md.

::pgrx::pg_module_magic!(name, version);

mod api;
mod errors;
mod gucs;
mod security;

#[allow(non_snake_case)]
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
