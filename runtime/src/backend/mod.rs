//! Graph execution behind one small seam, three levels deep (after tract's Runtime → Runnable →
//! State): a [`Backend`] loads a graph into a [`Graph`] (immutable, `Send + Sync`, shareable between
//! workers), and each worker opens its own [`GraphSession`] (mutable, `Send`) to run it.
//!
//! `ort-cpu` (ONNX Runtime) and `tract` (pure Rust) implement it here; GPU execution providers
//! will be options of the ort backend ([`OrtOptions`]), not new code paths.

mod ort;
mod tract;

use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD};

use crate::error::{Error, Result};
use crate::manifest::RealTensor;

pub use self::ort::{find_onnxruntime_library, OrtBackend, OrtOptions, ORT_LIBRARY_NAME};
pub use self::tract::TractBackend;

/// Most threads a graph call may be given.
pub const MAX_THREADS: usize = 1024;

/// Which implementation runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    OrtCpu,
    /// tract, the pure-Rust fallback: no shared library needed.
    Tract,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [BackendKind::OrtCpu, BackendKind::Tract];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::OrtCpu => "ort-cpu",
            BackendKind::Tract => "tract",
        }
    }

    /// Creates the backend, with `threads` per graph call (`None`: the backend's default). For
    /// ort this loads the ONNX Runtime library (see [`find_onnxruntime_library`]).
    pub fn create(self, threads: Option<usize>) -> Result<Arc<dyn Backend>> {
        if let Some(n) = threads.filter(|n| !(1..=MAX_THREADS).contains(n)) {
            return Err(Error::InvalidRequest(format!("threads {n} must be between 1 and {MAX_THREADS}")));
        }
        Ok(match self {
            BackendKind::OrtCpu => {
                Arc::new(OrtBackend::new(OrtOptions { intra_threads: threads, ..OrtOptions::default() })?)
            }
            BackendKind::Tract => Arc::new(TractBackend::new(threads)),
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BackendKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let valid: Vec<&str> = BackendKind::ALL.iter().map(|k| k.as_str()).collect();
            Error::InvalidRequest(format!("unknown backend {s:?}; valid backends: {}", valid.join(", ")))
        })
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A graph input: a borrowed tensor of one of the element types our graphs take.
#[derive(Debug, Clone)]
pub enum TensorView<'a> {
    F32(ArrayViewD<'a, f32>),
    I64(ArrayViewD<'a, i64>),
}

impl TensorView<'_> {
    pub fn shape(&self) -> &[usize] {
        match self {
            TensorView::F32(a) => a.shape(),
            TensorView::I64(a) => a.shape(),
        }
    }
}

/// Loads graphs.
pub trait Backend: Send + Sync {
    /// The name users pass to `--backend`.
    fn name(&self) -> &'static str;
    /// Loads the ONNX graph at `path` (external data beside it). `graph` names it in errors.
    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>>;
}

/// A loaded graph: immutable and shareable between workers.
pub trait Graph: Send + Sync {
    /// The graph's real inputs, as declared in the ONNX file.
    fn inputs(&self) -> &[RealTensor];
    /// The graph's real outputs.
    fn outputs(&self) -> &[RealTensor];
    /// Opens a session for one worker.
    fn session(&self) -> Result<Box<dyn GraphSession>>;
}

/// One worker's handle on a graph.
pub trait GraphSession: Send {
    /// Runs the graph. `inputs` are matched by name and must cover every graph input; the outputs
    /// come back in the graph's output order, as f32 (the dtype of every output our graphs have).
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>>;
}
