//! The pure core of exceiver: the Exceiver model (arXiv 2210.14330), its preprocessing,
//! readers for single-cell files, and 2-D maps of embeddings ([`layout`], UMAP) drawn
//! as PNG scatter plots ([`plot`]). No PostgreSQL dependency: everything here is
//! tested with plain `cargo test`, and the pgrx crate maps SQL onto it.

pub mod accel;
pub mod coverage;
pub mod data;
pub mod device;
pub mod error;
pub mod knn;
pub mod layout;
pub mod limits;
pub mod mapping;
pub mod metrics;
pub mod model;
pub mod pca;
pub mod plot;
pub mod preprocess;
pub mod probe;
pub mod session;
pub mod synth;
pub mod train;

pub use error::{Error, Kind, Result};
