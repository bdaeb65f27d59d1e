//! The SQL-facing functions, one module per concern.

pub mod bulk;
pub mod coverage;
pub mod evaluate;
pub mod infer;
pub mod load;
pub mod map;
pub mod mapping;
pub mod model;
pub mod pca;
pub mod probe;
pub mod train;
pub mod trigger;
