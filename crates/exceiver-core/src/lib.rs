//! The pure core of exceiver: the Exceiver model (arXiv 2210.14330), its preprocessing,
//! and readers for single-cell files. No PostgreSQL dependency: everything here is
//! tested with plain `cargo test`, and the pgrx crate maps SQL onto it.

pub mod accel;
pub mod data;
pub mod device;
pub mod error;
pub mod model;
pub mod preprocess;
pub mod train;

pub use error::{Error, Kind, Result};
