//! darts' dataset parsers, compiled from the main crate's sources (they need no libtorch), for the fuzz
//! targets in `fuzz_targets/`.
#[allow(dead_code)]
#[path = "../../src/data/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../src/data/formats/mod.rs"]
pub mod formats;
pub use error::DataError;
