//! The OpenVINO backend (`--backend openvino`): Intel's OpenVINO runtime, read through its C API
//! (the `openvino` crate, loaded at run time like ONNX Runtime: nothing is linked), running the same
//! ONNX graphs as ort and tract on the CPU, in f32 or bf16.
//!
//! Why its own runtime and not ONNX Runtime's OpenVINO execution provider (the three routes of
//! issue 17, measured in benches/RESULTS.md): the provider lives in a separate ONNX Runtime build
//! (`onnxruntime-openvino`, 1.24 with OpenVINO 2025.4 inside), so a process would load a second
//! `libonnxruntime` instead of the one `ort-cpu` uses, and its bf16 needs a raw `load_config`; the
//! plugin package registers no device on AMD CPUs. OpenVINO's own runtime (the `openvino` wheel,
//! 2026.4) was as fast as the provider in f32 on a Zen 3 EPYC and 0.82× ONNX Runtime's CPU provider
//! on a Zen 5, takes bf16 as a plain property, and sits beside ort in one process.
//!
//! A loaded graph is one compiled model (weights held once) shared by every worker; each worker's
//! session is an infer request of it. Shapes stay dynamic: OpenVINO compiles once and runs any
//! input shape the graph allows.
//!
//! Engine caches ([`crate::engine`]): the entry is OpenVINO's own model cache (`CACHE_DIR`: the
//! compiled model as a blob), so start-up imports instead of compiling: the small preset starts in
//! 1.4 s instead of 2.9 s (benches/RESULTS.md). The key adds OpenVINO's build, the CPU, precision
//! and threads. Importing needs OpenVINO's IR frontend beside the library: without it OpenVINO
//! silently compiles again (and rewrites the blob).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ndarray::{ArrayD, IxDyn};
use openvino::{CompiledModel, Core, DeviceType, ElementType, InferRequest, Model, PropertyKey, RwPropertyKey};

use super::{Backend, CacheUse, Graph, GraphLoad, GraphSession, InferencePrecision, TensorView};
use crate::engine::{self, CacheKey, Lookup};
use crate::error::{Error, Result};
use crate::log::Logger;
use crate::manifest::{DType, RealTensor};

const BACKEND: &str = "openvino";

/// The OpenVINO C library this runtime is built against (the `openvino` 2026.4 wheel's
/// `openvino/libs/`; `libopenvino.so.2640`, the ONNX frontend, the CPU plugin and TBB beside it).
pub const OPENVINO_LIBRARY_NAME: &str = "libopenvino_c.so.2640";

/// Runs graphs with OpenVINO on the CPU.
pub struct OpenVinoBackend {
    /// OpenVINO's core: reads and compiles models. Compiling is rare (model load), so one lock.
    core: Mutex<Core>,
    precision: InferencePrecision,
    threads: Option<usize>,
    /// OpenVINO's build string (engine-cache keys).
    version: String,
    /// Where stale engine-cache notes go.
    log: Logger,
}

impl OpenVinoBackend {
    /// Loads the OpenVINO library (once per process; see [`find_openvino_library`]) and creates
    /// the backend: `threads` per graph call (`None`: OpenVINO's default, one per physical core),
    /// computing in `precision`. bf16 needs a CPU with bf16 instructions (AVX512_BF16 or AMX):
    /// elsewhere OpenVINO would quietly compute in f32, so that is an error here.
    pub fn new(threads: Option<usize>, precision: InferencePrecision, log: Logger) -> Result<Self> {
        let library = load_library()?;
        let mut core = Core::new()
            .map_err(|e| Error::RuntimeLibrary(format!("cannot start OpenVINO from {}: {e}", library.display())))?;
        let cpu = DeviceType::CPU;
        let mut set = |key: RwPropertyKey, value: &str| {
            core.set_property(&cpu, &key, value).map_err(|e| Error::Backend {
                backend: BACKEND,
                graph: String::new(),
                message: format!("{e}"),
            })
        };
        // One request at a time per worker, as fast as it goes (OpenVINO's default on the CPU is
        // also latency, stated so a changed default cannot turn it into throughput streams).
        set(RwPropertyKey::Other("PERFORMANCE_HINT".into()), "LATENCY")?;
        if let Some(n) = threads {
            set(RwPropertyKey::InferenceNumThreads, &n.to_string())?;
        }
        // Stated for f32 too: on CPUs with bf16 instructions OpenVINO defaults to bf16.
        set(RwPropertyKey::Other("INFERENCE_PRECISION_HINT".into()), precision.openvino_name())?;
        if precision == InferencePrecision::Bf16 {
            let capabilities =
                core.get_property(&cpu, &PropertyKey::Other("OPTIMIZATION_CAPABILITIES".into())).unwrap_or_default();
            if !capabilities.split_whitespace().any(|c| c == "BF16") {
                return Err(Error::Unsupported(format!(
                    "--precision bf16 needs a CPU with bf16 instructions (AVX512_BF16 or AMX); OpenVINO reports \
                     this one can do only {capabilities:?} and would compute in f32; use --precision f32"
                )));
            }
        }
        let version = openvino::version().build_number;
        Ok(OpenVinoBackend { core: Mutex::new(core), precision, threads, version, log })
    }

    fn cache_key(&self, request: &GraphLoad<'_>) -> CacheKey {
        CacheKey::new()
            .with("graph", CacheKey::graph_digest(request.spec))
            .with("backend", BACKEND)
            .with("openvino", self.version.clone())
            .with("cpu", engine::cpu_identity())
            .with("precision", self.precision.as_str())
            .with("threads", self.threads.map_or("default".into(), |n| n.to_string()))
    }

    /// Loads through the cache: build an entry (build-engine), or use a fresh one, or say why not.
    fn load_cached(&self, request: &GraphLoad<'_>, cache: &CacheUse<'_>) -> Result<Arc<dyn Graph>> {
        let (name, path) = (request.name, request.path);
        let key = self.cache_key(request);
        if cache.build {
            let dir = engine::begin_entry(cache.root, name, &key)?;
            // A failed build leaves nothing behind (an entry without its key is never used anyway).
            let graph = self.compile(name, &path.display(), ReadModel::File(path), Some(&dir)).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
            engine::finish_entry(&dir, &key)?;
            return Ok(graph);
        }
        match engine::lookup(cache.root, name, &key) {
            Lookup::Fresh(dir) => self.compile(name, &path.display(), ReadModel::File(path), Some(&dir)),
            lookup => {
                if let Lookup::Stale { changed } = &lookup {
                    self.log.warn(&format!(
                        "the prepared engine for {name} in {} is stale ({}); not using it. Run `t2i-rt build-engine \
                         --backend openvino` again to prepare one for this machine.",
                        cache.root.display(),
                        changed.join("; ")
                    ));
                }
                self.compile(name, &path.display(), ReadModel::File(path), None)
            }
        }
    }

    /// Reads and compiles a graph; with `cache_dir`, through OpenVINO's model cache there (imported
    /// when it holds this graph compiled with these settings, else compiled and written there).
    fn compile(
        &self,
        graph: &str,
        what: &dyn std::fmt::Display,
        read: ReadModel<'_>,
        cache_dir: Option<&Path>,
    ) -> Result<Arc<dyn Graph>> {
        let error = |message: String| Error::Backend { backend: BACKEND, graph: graph.to_string(), message };
        let mut core = self.core.lock().map_err(|_| error("OpenVINO core lock poisoned".into()))?;
        let model = match read {
            ReadModel::File(path) => {
                let path = path.to_str().ok_or_else(|| error(format!("{what}: the path is not UTF-8")))?;
                core.read_model_from_file(path, "")
            }
            ReadModel::Bytes(bytes) => core.read_model_from_buffer(bytes, None),
        }
        .map_err(|e| error(format!("cannot read {what}: {e}")))?;
        let (inputs, outputs) = guarded(|| ports(&model)).map_err(|e| error(format!("{what}: {e}")))?;
        let compiled = match cache_dir {
            None => core.compile_model(&model, DeviceType::CPU),
            Some(dir) => {
                let dir = dir.to_str().ok_or_else(|| error(format!("{}: the path is not UTF-8", dir.display())))?;
                let cache = RwPropertyKey::CacheDir;
                core.set_property(&DeviceType::CPU, &cache, dir).and_then(|()| {
                    let compiled = core.compile_model(&model, DeviceType::CPU);
                    // The cache directory is the core's setting: later graphs choose their own.
                    core.set_property(&DeviceType::CPU, &cache, "").and(compiled)
                })
            }
        }
        .map_err(|e| error(format!("cannot compile {what}: {e}")))?;
        drop(core);
        // OpenVINO takes a precision hint it cannot honour without a word; check what it compiled.
        let precision = compiled
            .get_property(&PropertyKey::Other("INFERENCE_PRECISION_HINT".into()))
            .map(|p| p.to_string())
            .unwrap_or_default();
        if precision != self.precision.openvino_name() {
            return Err(error(format!(
                "OpenVINO compiled {what} for precision {precision:?}, not the {} asked for",
                self.precision.openvino_name()
            )));
        }
        Ok(Arc::new(OpenVinoGraph(Arc::new(Inner {
            name: graph.to_string(),
            compiled: Mutex::new(compiled),
            inputs,
            outputs,
        }))))
    }
}

enum ReadModel<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

impl Backend for OpenVinoBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>> {
        self.compile(graph, &path.display(), ReadModel::File(path), None)
    }

    fn load_bytes(&self, graph: &str, bytes: &[u8]) -> Result<Arc<dyn Graph>> {
        self.compile(graph, &"the graph", ReadModel::Bytes(bytes), None)
    }

    fn load_graph(&self, request: &GraphLoad<'_>) -> Result<Arc<dyn Graph>> {
        match &request.cache {
            Some(cache) => self.load_cached(request, cache),
            None => self.load(request.name, request.path),
        }
    }
}

/// Runs `f`, turning a panic into an error: the `openvino` crate panics on what it cannot
/// represent (an element type it does not know, a rank beyond `usize`), and a strange graph must
/// never take a service down.
fn guarded<T>(f: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err("the graph has inputs or outputs of a type or rank OpenVINO's bindings do not know".into())
    })
}

/// The model's inputs and outputs, with their types and the dims the graph fixes.
fn ports(model: &Model) -> std::result::Result<(Vec<RealTensor>, Vec<RealTensor>), String> {
    let real = |port: openvino::Node| -> std::result::Result<RealTensor, String> {
        let name = port.get_name().map_err(|e| format!("a port without a name: {e}"))?;
        let dtype = port.get_element_type().ok().and_then(dtype_of);
        let shape = port.get_partial_shape().map_err(|e| format!("{name}: {e}"))?;
        let rank = shape.get_rank();
        let dims = (!rank.is_dynamic())
            .then(|| shape.get_dimensions().iter().map(|d| (!d.is_dynamic()).then(|| d.get_min())).collect());
        Ok(RealTensor { name, dtype, dims })
    };
    let count = |n: std::result::Result<usize, openvino::InferenceError>| n.map_err(|e| e.to_string());
    let inputs = (0..count(model.get_inputs_len())?)
        .map(|i| real(model.get_input_by_index(i).map_err(|e| e.to_string())?))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let outputs = (0..count(model.get_outputs_len())?)
        .map(|i| real(model.get_output_by_index(i).map_err(|e| e.to_string())?))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((inputs, outputs))
}

fn dtype_of(element: ElementType) -> Option<DType> {
    match element {
        ElementType::F32 => Some(DType::Float32),
        ElementType::F16 => Some(DType::Float16),
        ElementType::I64 => Some(DType::Int64),
        ElementType::I32 => Some(DType::Int32),
        _ => None,
    }
}

struct OpenVinoGraph(Arc<Inner>);

struct Inner {
    name: String,
    /// Creating an infer request needs the compiled model mutably; requests then run on their own.
    compiled: Mutex<CompiledModel>,
    inputs: Vec<RealTensor>,
    outputs: Vec<RealTensor>,
}

impl Inner {
    fn error(&self, message: String) -> Error {
        Error::Backend { backend: BACKEND, graph: self.name.clone(), message }
    }
}

impl Graph for OpenVinoGraph {
    fn inputs(&self) -> &[RealTensor] {
        &self.0.inputs
    }

    fn outputs(&self) -> &[RealTensor] {
        &self.0.outputs
    }

    fn session(&self) -> Result<Box<dyn GraphSession>> {
        let graph = &self.0;
        let request = graph
            .compiled
            .lock()
            .map_err(|_| graph.error("compiled model lock poisoned".into()))?
            .create_infer_request()
            .map_err(|e| graph.error(format!("cannot create an infer request: {e}")))?;
        Ok(Box::new(OpenVinoSession { graph: graph.clone(), request, bound: Vec::new() }))
    }
}

struct OpenVinoSession {
    graph: Arc<Inner>,
    request: InferRequest,
    /// Bound inputs, already in OpenVINO tensors: set on the request again at every run (no copy).
    bound: Vec<(String, openvino::Tensor)>,
}

/// `view` copied into a new OpenVINO tensor.
fn tensor(view: &TensorView<'_>) -> std::result::Result<openvino::Tensor, openvino::InferenceError> {
    fn fill<T: Copy>(out: &mut [T], values: ndarray::ArrayViewD<'_, T>) {
        match values.as_slice() {
            Some(s) => out.copy_from_slice(s),
            None => out.iter_mut().zip(values.iter()).for_each(|(o, v)| *o = *v),
        }
    }
    let dims: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let shape = openvino::Shape::new(&dims)?;
    let mut t = match view {
        TensorView::F32(_) => openvino::Tensor::new(ElementType::F32, &shape)?,
        TensorView::I64(_) => openvino::Tensor::new(ElementType::I64, &shape)?,
    };
    match view {
        TensorView::F32(a) => fill(t.get_data_mut::<f32>()?, a.view()),
        TensorView::I64(a) => fill(t.get_data_mut::<i64>()?, a.view()),
    }
    Ok(t)
}

impl GraphSession for OpenVinoSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        let graph = &self.graph;
        for spec in &graph.inputs {
            let name = spec.name.as_str();
            let given = inputs.iter().find(|(n, _)| *n == name);
            let result = match given {
                Some((_, view)) => tensor(view).and_then(|t| self.request.set_tensor(name, &t)),
                None => match self.bound.iter().find(|(n, _)| n == name) {
                    Some((_, t)) => self.request.set_tensor(name, t),
                    None => return Err(graph.error(format!("input {name} was not given"))),
                },
            };
            result.map_err(|e| graph.error(format!("input {name}: {e}")))?;
        }
        self.request.infer().map_err(|e| graph.error(format!("{e}")))?;
        (0..graph.outputs.len())
            .map(|i| {
                let out = self.request.get_output_tensor_by_index(i).map_err(|e| graph.error(format!("{e}")))?;
                let name = &graph.outputs[i].name;
                if !matches!(out.get_element_type(), Ok(ElementType::F32)) {
                    return Err(graph.error(format!("output {name} is not f32")));
                }
                let shape = out.get_shape().map_err(|e| graph.error(format!("{e}")))?;
                let dims: Vec<usize> = shape.get_dimensions().iter().map(|&d| d as usize).collect();
                let data = out.get_data::<f32>().map_err(|e| graph.error(format!("{e}")))?;
                ArrayD::from_shape_vec(IxDyn(&dims), data.to_vec())
                    .map_err(|e| graph.error(format!("output {name}: {e}")))
            })
            .collect()
    }

    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        for (name, view) in inputs {
            let t = tensor(view).map_err(|e| self.graph.error(format!("input {name}: {e}")))?;
            self.bound.retain(|(n, _)| n != name);
            self.bound.push((name.to_string(), t));
        }
        Ok(())
    }

    fn unbind(&mut self) {
        self.bound.clear();
    }
}

fn install_hint() -> String {
    format!(
        "set T2I_OPENVINO_LIB to {OPENVINO_LIBRARY_NAME} (inside the openvino 2026.4 wheel: openvino/libs/, with the \
         libraries beside it), put it in lib/ next to the t2i-rt binary, or run `bash scripts/setup-openvino.sh` \
         in a checkout"
    )
}

/// Finds the OpenVINO C library, in this order:
/// 1. `T2I_OPENVINO_LIB`: a file;
/// 2. next to the running executable, or in `lib/` beside it (how a deployment ships it, with
///    `libopenvino.so.2640`, `libopenvino_onnx_frontend.so.2640`, `libopenvino_ir_frontend.so.2640`
///    (for prepared engines), `libopenvino_intel_cpu_plugin.so` and `libtbb.so.12` in the same
///    folder);
/// 3. `.openvino/` in the executable's directory or one of its ancestors (where
///    `scripts/setup-openvino.sh` puts it in a checkout, so `cargo run` and `cargo test` need no
///    setting).
pub fn find_openvino_library() -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("T2I_OPENVINO_LIB") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("T2I_OPENVINO_LIB={} is not a file; {}", path.display(), install_hint()))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot locate the running executable ({e}); {}", install_hint()))?;
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut candidates = vec![exe_dir.join(OPENVINO_LIBRARY_NAME), exe_dir.join("lib").join(OPENVINO_LIBRARY_NAME)];
    candidates.extend(exe_dir.ancestors().map(|dir| dir.join(".openvino").join(OPENVINO_LIBRARY_NAME)));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(install_hint)
}

/// Loads the library once per process; later calls get the first call's outcome.
fn load_library() -> Result<PathBuf> {
    static LIBRARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let path = find_openvino_library().map_err(|e| format!("OpenVINO library not found: {e}"))?;
            openvino_sys::library::load_from(&path)
                .map_err(|e| format!("cannot load OpenVINO from {}: {e}; {}", path.display(), install_hint()))?;
            Ok(path)
        })
        .clone()
        .map_err(Error::RuntimeLibrary)
}
