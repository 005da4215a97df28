//! The library's one error type. Every variant says what went wrong, where, and (in its message)
//! how to fix it; the CLI prints it as a single line.

use std::path::PathBuf;

/// Errors a caller of the library can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },

    /// The graph set directory or its manifest is missing, malformed or inconsistent with its graphs.
    #[error("graph set {}: {message}", dir.display())]
    GraphSet { dir: PathBuf, message: String },

    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("ONNX Runtime library not found: {0}")]
    RuntimeLibrary(String),

    /// A GPU execution provider cannot start (library without it, no driver or GPU, missing CUDA or
    /// TensorRT libraries).
    #[error("{backend}: {message}")]
    Provider { backend: &'static str, message: String },

    /// A backend failed to load or run a graph.
    #[error("{backend} backend, graph {graph}: {message}")]
    Backend { backend: &'static str, graph: String, message: String },

    /// The request cannot be served by this graph set (size, adapter, shape, option).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A condition or output image could not be decoded, converted or encoded.
    #[error("image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },

    /// A `.npy` file is unreadable or holds the wrong dtype or shape.
    #[error("npy {}: {message}", path.display())]
    Npy { path: PathBuf, message: String },

    /// A scheduler configuration key has a value this scheduler does not support.
    #[error("scheduler {scheduler}: {message}")]
    Scheduler { scheduler: &'static str, message: String },

    /// The tokenizer file could not be loaded or a prompt could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The caller's progress callback asked to stop.
    #[error("cancelled by the caller")]
    Cancelled,
}

/// Shorthand for results of this library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
