//! The ONNX Runtime backend (`ort` with `load-dynamic`): the library is found at run time, never
//! linked, so one binary serves machines with and without a GPU build of ONNX Runtime.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ndarray::{ArrayD, CowArray, IxDyn};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::{Backend, Graph, GraphSession, TensorView};
use crate::error::{Error, Result};
use crate::manifest::{DType, RealTensor};

/// The ONNX Runtime library file this runtime is built against (the `onnxruntime` 1.31.1 wheel's).
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

const BACKEND: &str = "ort-cpu";

/// Typed options of the ort backend. GPU execution providers will be fields here.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// Threads for one operator; `None` lets ONNX Runtime use one per physical core.
    pub intra_threads: Option<usize>,
    /// Explicit library path; `None` searches (see [`find_onnxruntime_library`]).
    pub library: Option<PathBuf>,
}

/// Runs graphs through ONNX Runtime's CPU execution provider.
pub struct OrtBackend {
    environment: Environment,
    options: OrtOptions,
}

impl OrtBackend {
    /// Loads the ONNX Runtime library (once per process) and creates the backend.
    pub fn new(options: OrtOptions) -> Result<Self> {
        let environment = environment(options.library.as_deref())?;
        Ok(OrtBackend { environment, options })
    }

    fn build_session(&self, graph: &str, path: &Path) -> Result<Session> {
        let err = |message: String| Error::Backend { backend: BACKEND, graph: graph.to_string(), message };
        // ort's builder errors carry the builder and are not Send/Sync: turn them into strings at once.
        let mut builder = Session::builder(&self.environment)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| err(e.to_string()))?;
        if let Some(threads) = self.options.intra_threads {
            builder = builder.with_intra_threads(threads).map_err(|e| err(e.to_string()))?;
        }
        builder.commit_from_file(path).map_err(|e| err(format!("cannot load {}: {e}", path.display())))
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>> {
        let session = self.build_session(graph, path)?;
        let inputs = session.inputs().iter().map(|o| real_tensor(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| real_tensor(o.name(), o.dtype())).collect();
        Ok(Arc::new(OrtGraph {
            name: graph.to_string(),
            path: path.to_path_buf(),
            backend: OrtBackend { environment: self.environment.clone(), options: self.options.clone() },
            inputs,
            outputs,
            first_session: Mutex::new(Some(session)),
        }))
    }
}

struct OrtGraph {
    name: String,
    path: PathBuf,
    backend: OrtBackend,
    inputs: Vec<RealTensor>,
    outputs: Vec<RealTensor>,
    /// The session built while loading, handed to the first worker so a single-worker pipeline
    /// never builds (and optimizes) a graph twice.
    first_session: Mutex<Option<Session>>,
}

impl Graph for OrtGraph {
    fn inputs(&self) -> &[RealTensor] {
        &self.inputs
    }

    fn outputs(&self) -> &[RealTensor] {
        &self.outputs
    }

    fn session(&self) -> Result<Box<dyn GraphSession>> {
        let reused = self.first_session.lock().ok().and_then(|mut s| s.take());
        let session = match reused {
            Some(session) => session,
            None => self.backend.build_session(&self.name, &self.path)?,
        };
        let output_names = self.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(Box::new(OrtSession { name: self.name.clone(), session, output_names }))
    }
}

struct OrtSession {
    name: String,
    session: Session,
    output_names: Vec<String>,
}

impl GraphSession for OrtSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        let err = |message: String| Error::Backend { backend: BACKEND, graph: self.name.clone(), message };
        // ONNX Runtime reads dense row-major buffers: borrow inputs that are (all of ours, in
        // practice), copy only views that are not.
        let dense: Vec<(&str, DenseInput<'_>)> = inputs
            .iter()
            .map(|(name, view)| {
                let dense = match view {
                    TensorView::F32(a) => DenseInput::F32(a.as_standard_layout()),
                    TensorView::I64(a) => DenseInput::I64(a.as_standard_layout()),
                };
                (*name, dense)
            })
            .collect();
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(dense.len());
        for (name, input) in &dense {
            let value: SessionInputValue<'_> = match input {
                DenseInput::F32(a) => TensorRef::from_array_view(a.view()).map_err(|e| err(e.to_string()))?.into(),
                DenseInput::I64(a) => TensorRef::from_array_view(a.view()).map_err(|e| err(e.to_string()))?.into(),
            };
            values.push((Cow::Borrowed(*name), value));
        }
        let outputs = self.session.run(values).map_err(|e| err(e.to_string()))?;
        self.output_names
            .iter()
            .map(|name| {
                let value = outputs.get(name).ok_or_else(|| err(format!("output {name} missing")))?;
                let array = value.try_extract_array::<f32>().map_err(|e| err(format!("output {name}: {e}")))?;
                Ok(array.to_owned())
            })
            .collect()
    }
}

enum DenseInput<'a> {
    F32(CowArray<'a, f32, IxDyn>),
    I64(CowArray<'a, i64, IxDyn>),
}

fn real_tensor(name: &str, dtype: &ValueType) -> RealTensor {
    match dtype {
        ValueType::Tensor { ty, shape, .. } => RealTensor {
            name: name.to_string(),
            dtype: match ty {
                TensorElementType::Float32 => Some(DType::Float32),
                TensorElementType::Float16 => Some(DType::Float16),
                TensorElementType::Int64 => Some(DType::Int64),
                TensorElementType::Int32 => Some(DType::Int32),
                _ => None,
            },
            dims: Some(shape.iter().map(|&d| (d >= 0).then_some(d)).collect()),
        },
        _ => RealTensor { name: name.to_string(), dtype: None, dims: None },
    }
}

/// The process-wide ONNX Runtime environment. The library can be loaded only once per process, so
/// the first successful load wins; a failed load is reported again to every caller.
fn environment(explicit: Option<&Path>) -> Result<Environment> {
    static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            let library = match explicit {
                Some(path) => path.to_path_buf(),
                None => find_onnxruntime_library()?,
            };
            let builder = ort::init_from(&library)
                .map_err(|e| format!("cannot load {} ({e}); {}", library.display(), install_hint()))?;
            builder.with_name("t2i-rt").build().map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .clone()
        .map_err(Error::RuntimeLibrary)
}

fn install_hint() -> String {
    format!(
        "set ORT_DYLIB_PATH to {ORT_LIBRARY_NAME} (inside the onnxruntime 1.31.1 wheel: onnxruntime/capi/), \
         put it next to the t2i-rt binary, run scripts/setup.sh in a checkout, or use --backend tract"
    )
}

/// Finds the ONNX Runtime shared library, in this order:
/// 1. `ORT_DYLIB_PATH` (the `ort` crate's convention): a file;
/// 2. next to the running executable, or in `lib/` beside it (how a deployment ships it);
/// 3. `.ort/` in the executable's directory or one of its ancestors (where `scripts/setup.sh`
///    puts it in a checkout, so `cargo run` and `cargo test` need no setting).
pub fn find_onnxruntime_library() -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("ORT_DYLIB_PATH={} is not a file; {}", path.display(), install_hint()))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot locate the running executable ({e}); {}", install_hint()))?;
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut candidates = vec![exe_dir.join(ORT_LIBRARY_NAME), exe_dir.join("lib").join(ORT_LIBRARY_NAME)];
    candidates.extend(exe_dir.ancestors().map(|dir| dir.join(".ort").join(ORT_LIBRARY_NAME)));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(install_hint)
}
