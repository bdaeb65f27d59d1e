//! The SQL-facing functions, one module per concern.

pub mod load;
