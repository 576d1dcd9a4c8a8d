//! Data errors: what is wrong, and with which file. Kept apart from the loaders (no libtorch), so that the
//! parsers and their fuzz targets (`fuzz/`) can be built alone.

/// Data problems, each naming the file and saying how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file that should exist does not.
    #[error("dataset file not found: {file}")]
    Missing {
        /// The path looked for.
        file: String,
    },
    /// A file that exists but is not what it should be.
    #[error("{file}: {problem}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A file that could not be read.
    #[error("{file}: {error}")]
    Io {
        /// The file.
        file: String,
        /// The OS error.
        error: String,
    },
    /// No folder given and none found.
    #[error("{0}")]
    NotFound(String),
}
