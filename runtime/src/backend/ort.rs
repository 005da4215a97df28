//! The ONNX Runtime backend (`ort` with `load-dynamic`): the library is found at run time, never
//! linked, so one binary serves machines with and without a GPU build of ONNX Runtime.
//!
//! The execution provider is an option ([`Provider`]): CPU, CUDA, or TensorRT (with CUDA for the
//! nodes TensorRT does not take). A GPU provider must really start: if the library lacks it, the
//! driver or a CUDA/TensorRT library is missing, loading fails with what to install, unless the
//! user allowed the CPU fallback.
//!
//! Engine caches ([`crate::engine`]): for CPU and CUDA the entry is ONNX Runtime's optimized graph
//! (loaded with optimizations off, so start-up skips them); for TensorRT it is the provider's engine
//! and timing caches, built for the entry's shape profiles.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ndarray::{ArrayD, CowArray, IxDyn};
use ort::environment::{Environment, GlobalThreadPoolOptions};
#[cfg(feature = "ort-trt")]
use ort::ep::TensorRT;
#[cfg(feature = "ort-cuda")]
use ort::ep::{ExecutionProvider, CUDA};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use super::gpu;
use super::{Backend, BackendKind, CacheUse, Graph, GraphLoad, GraphSession, OwnedTensor, TensorView};
use crate::engine::{self, CacheKey, Lookup};
use crate::error::{Error, Result};
use crate::log::Logger;
use crate::manifest::{DType, RealTensor};

/// The ONNX Runtime library file this runtime is built against (the `onnxruntime` 1.31.1 wheel's;
/// for GPUs the `onnxruntime-gpu` 1.31.1 wheel's, with its provider libraries beside it).
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";
/// ONNX Runtime's optimized graph in a cache entry (CPU and CUDA).
const OPTIMIZED_GRAPH: &str = "optimized.onnx";
/// Its external data, when the source graph has some (graphs over 2 GB).
const OPTIMIZED_DATA: &str = "optimized.onnx.data";
/// The shape profiles a TensorRT entry was built for (TensorRT needs the same ones to reuse it).
const PROFILES_FILE: &str = "profiles.txt";

/// The execution provider graphs run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    #[default]
    Cpu,
    Cuda {
        device: u32,
    },
    /// TensorRT, with CUDA registered after it for the nodes TensorRT leaves.
    TensorRt {
        device: u32,
        fp16: bool,
        /// TensorRT's INT8 mode (`trt_int8_enable`), for graphs with quantize and dequantize pairs
        /// (a set's INT8 variants: TensorRT's explicit quantization takes their scales).
        int8: bool,
    },
}

impl Provider {
    fn backend_name(self) -> &'static str {
        let kind = match self {
            Provider::Cpu => BackendKind::OrtCpu,
            Provider::Cuda { .. } => BackendKind::OrtCuda,
            Provider::TensorRt { .. } => BackendKind::OrtTrt,
        };
        kind.as_str()
    }
}

/// Typed options of the ort backend.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// Threads for one operator; `None` lets ONNX Runtime use one per physical core.
    pub intra_threads: Option<usize>,
    /// Explicit library path; `None` searches (see [`find_onnxruntime_library`]).
    pub library: Option<PathBuf>,
    pub provider: Provider,
    /// When the GPU provider cannot start, warn and run on the CPU provider instead of failing.
    pub allow_cpu_fallback: bool,
    /// Where the fallback warning and engine-cache notes go.
    pub log: Logger,
    /// One session per graph for every worker (one copy of the weights; calls to a graph take
    /// turns) instead of one per worker ([`BackendSettings::share_sessions`](super::BackendSettings)).
    pub share_sessions: bool,
}

/// Runs graphs through ONNX Runtime.
#[derive(Clone)]
pub struct OrtBackend {
    environment: Environment,
    /// The loaded library, for messages.
    library: PathBuf,
    options: OrtOptions,
    /// The provider sessions really use: `options.provider`, or `Cpu` after an allowed fallback.
    provider: Provider,
    /// What prepared engines depend on besides the graph: the CPU, or the GPU and driver (and
    /// TensorRT's version); cache-key fields, found once at start-up.
    hardware: Vec<(&'static str, String)>,
}

impl OrtBackend {
    /// Loads the ONNX Runtime library (once per process) and creates the backend. For a GPU
    /// provider it checks, in this order, that the library has the provider, that the driver sees
    /// the GPU, and (TensorRT) that TensorRT 10 is installed.
    pub fn new(options: OrtOptions) -> Result<Self> {
        let gpu = options.provider != Provider::Cpu;
        let (environment, library) = environment(options.library.as_deref(), gpu, options.intra_threads)?;
        let mut backend =
            OrtBackend { environment, library, provider: options.provider, options, hardware: Vec::new() };
        match backend.check_provider() {
            Ok(hardware) => backend.hardware = hardware,
            Err(message) => {
                let name = backend.options.provider.backend_name();
                if !backend.options.allow_cpu_fallback {
                    return Err(Error::Provider { backend: name, message });
                }
                backend
                    .options
                    .log
                    .warn(&format!("{name}: {message}; running on the CPU instead (CPU fallback allowed)"));
                backend.provider = Provider::Cpu;
                backend.hardware = vec![("cpu", engine::cpu_identity())];
            }
        }
        Ok(backend)
    }

    /// Checks that the provider can start; returns the hardware fields of cache keys.
    fn check_provider(&self) -> std::result::Result<Vec<(&'static str, String)>, String> {
        let (device, trt) = match self.options.provider {
            Provider::Cpu => return Ok(vec![("cpu", engine::cpu_identity())]),
            Provider::Cuda { device } => (device, false),
            Provider::TensorRt { device, .. } => (device, true),
        };
        let has = |available: ort::Result<bool>, name: &str| -> std::result::Result<(), String> {
            match available {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!(
                    "the ONNX Runtime library {} was built without the {name}; use the onnxruntime-gpu 1.31.1 \
                     library (scripts/setup-ort.sh --gpu; docs/gpu.md)",
                    self.library.display()
                )),
                Err(e) => Err(format!("cannot list ONNX Runtime's providers: {e}")),
            }
        };
        if trt {
            has(tensorrt_available()?, "TensorRT execution provider")?;
        }
        has(cuda_available()?, "CUDA execution provider")?;
        let mut hardware = vec![("gpu", gpu::probe(device)?.describe())];
        if trt {
            hardware.push(("tensorrt", gpu::tensorrt_version()?));
        }
        Ok(hardware)
    }

    /// The provider sessions run on (after any allowed fallback).
    pub fn provider(&self) -> Provider {
        self.provider
    }

    fn err(&self, graph: &str, message: String) -> Error {
        Error::Backend { backend: self.provider.backend_name(), graph: graph.to_string(), message }
    }

    /// A session builder with threads, optimization level and the provider registered.
    fn builder(
        &self,
        graph: &str,
        level: GraphOptimizationLevel,
        trt_cache: Option<&TrtCache>,
    ) -> Result<SessionBuilder> {
        let err = |message: String| self.err(graph, message);
        // ort's builder errors carry the builder and are not Send/Sync: turn them into strings at once.
        let mut builder = Session::builder(&self.environment)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(level)
            .map_err(|e| err(e.to_string()))?;
        // Sessions share the environment's one intra-op thread pool when they ask for its thread
        // count: a pipeline alternates graphs (a ControlNet and the UNet at every step), and with a
        // pool per session the idle pool's spinning threads slow the busy one down.
        if self.options.intra_threads != global_pool_threads() {
            builder = builder.with_independent_thread_pool().map_err(|e| err(e.to_string()))?;
            if let Some(threads) = self.options.intra_threads {
                builder = builder.with_intra_threads(threads).map_err(|e| err(e.to_string()))?;
            }
        }
        let provider_error = |e: String, what: &str| {
            err(format!(
                "cannot start the {what} on GPU {}: {e}. It needs the provider libraries beside {} and CUDA 13 \
                 (libcudart, libcublas, libcublasLt, libcurand) and cuDNN 9 on the library path (docs/gpu.md); \
                 --allow-cpu-fallback runs on the CPU instead",
                self.device(),
                self.library.display()
            ))
        };
        match self.provider {
            Provider::Cpu => {}
            Provider::Cuda { device } => {
                register_cuda(&mut builder, device).map_err(|e| provider_error(e, "CUDA execution provider"))?;
            }
            Provider::TensorRt { device, fp16, int8 } => {
                register_tensorrt(&mut builder, device, fp16, int8, trt_cache)
                    .map_err(|e| provider_error(e, "TensorRT execution provider"))?;
                register_cuda(&mut builder, device).map_err(|e| provider_error(e, "CUDA execution provider"))?;
            }
        }
        Ok(builder)
    }

    fn device(&self) -> u32 {
        match self.options.provider {
            Provider::Cpu => 0,
            Provider::Cuda { device } | Provider::TensorRt { device, .. } => device,
        }
    }

    /// A session on the graph file, optimized at load (no cache).
    fn load_session(&self, graph: &str, path: &Path) -> Result<Session> {
        let builder = self.builder(graph, GraphOptimizationLevel::Level3, None)?;
        self.commit(graph, builder, path)
    }

    fn commit(&self, graph: &str, mut builder: SessionBuilder, path: &Path) -> Result<Session> {
        builder.commit_from_file(path).map_err(|e| self.err(graph, format!("cannot load {}: {e}", path.display())))
    }

    /// A session on a graph held in memory, optimized at load.
    fn session_from_bytes(&self, graph: &str, bytes: &[u8]) -> Result<Session> {
        let mut builder = self.builder(graph, GraphOptimizationLevel::Level3, None)?;
        builder.commit_from_memory(bytes).map_err(|e| self.err(graph, format!("cannot load the graph: {e}")))
    }

    /// A session on `source`, optimized at load.
    fn open(&self, graph: &str, source: &Source) -> Result<Session> {
        match source {
            Source::File(path) => self.load_session(graph, path),
            Source::Bytes(bytes) => self.session_from_bytes(graph, bytes),
        }
    }

    /// What a cache entry of this backend depends on besides the graph.
    fn cache_key(&self, request: &GraphLoad<'_>) -> CacheKey {
        let mut key = CacheKey::new()
            .with("graph", CacheKey::graph_digest(request.spec))
            .with("backend", self.provider.backend_name())
            .with("onnxruntime", ort::info());
        for (field, value) in &self.hardware {
            key = key.with(field, value.clone());
        }
        if let Provider::TensorRt { fp16, int8, .. } = self.provider {
            key = key.with("trt_fp16", fp16.to_string());
            // Only when on, so that entries prepared before INT8 existed stay fresh.
            if int8 {
                key = key.with("trt_int8", "true".to_string());
            }
        }
        key
    }

    /// Loads through the cache: build an entry (build-engine), or use a fresh one, or say why not.
    fn load_cached(&self, request: &GraphLoad<'_>, cache: &CacheUse<'_>) -> Result<Session> {
        let key = self.cache_key(request);
        let name = request.name;
        let io = |path: &Path, e: std::io::Error| Error::Io { path: path.to_path_buf(), message: e.to_string() };
        let trt = matches!(self.provider, Provider::TensorRt { .. });
        if cache.build {
            let dir = engine::begin_entry(cache.root, name, &key)?;
            let built = if trt {
                let profiles = cache.shapes.as_ref().map(|s| s.trt_option_strings());
                if let Some((min, opt, max)) = &profiles {
                    std::fs::write(dir.join(PROFILES_FILE), format!("{min}\n{opt}\n{max}\n"))
                        .map_err(|e| io(&dir.join(PROFILES_FILE), e))?;
                }
                self.builder(name, GraphOptimizationLevel::Level3, Some(&TrtCache { dir: dir.clone(), profiles }))
                    .and_then(|builder| self.commit(name, builder, request.path))
            } else {
                self.builder(name, GraphOptimizationLevel::Level3, None)
                    .and_then(|builder| {
                        let mut builder = builder
                            .with_optimized_model_path(dir.join(OPTIMIZED_GRAPH))
                            .map_err(|e| self.err(name, e.to_string()))?;
                        if !request.spec.external_data.is_empty() {
                            builder = builder
                                .with_config_entry(
                                    "session.optimized_model_external_initializers_file_name",
                                    OPTIMIZED_DATA,
                                )
                                .map_err(|e| self.err(name, e.to_string()))?;
                        }
                        Ok(builder)
                    })
                    .and_then(|builder| self.commit(name, builder, request.path))
            };
            // A failed build leaves nothing behind (an entry without its key is never used anyway).
            let session = built.inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
            engine::finish_entry(&dir, &key)?;
            return Ok(session);
        }
        match engine::lookup(cache.root, name, &key) {
            Lookup::Fresh(dir) if trt => {
                let profiles = std::fs::read_to_string(dir.join(PROFILES_FILE)).ok().and_then(|text| {
                    let lines: Vec<String> = text.lines().map(str::to_string).collect();
                    (lines.len() == 3).then(|| (lines[0].clone(), lines[1].clone(), lines[2].clone()))
                });
                let builder = self.builder(name, GraphOptimizationLevel::Level3, Some(&TrtCache { dir, profiles }))?;
                self.commit(name, builder, request.path)
            }
            Lookup::Fresh(dir) => {
                // Already optimized for this library and hardware: skip ONNX Runtime's optimizer.
                let builder = self.builder(name, GraphOptimizationLevel::Disable, None)?;
                self.commit(name, builder, &dir.join(OPTIMIZED_GRAPH))
            }
            lookup => {
                if let Lookup::Stale { changed } = &lookup {
                    self.options.log.warn(&format!(
                        "the prepared engine for {name} in {} is stale ({}); not using it. Run `t2i-rt \
                         build-engine` again to prepare one for this machine.",
                        cache.root.display(),
                        changed.join("; ")
                    ));
                }
                if trt {
                    self.options.log.info(&format!(
                        "no TensorRT engine prepared for {name}: TensorRT builds one now (minutes for a UNet). \
                         Prepare it once with `t2i-rt build-engine --backend ort-trt`."
                    ));
                }
                let builder = self.builder(name, GraphOptimizationLevel::Level3, None)?;
                self.commit(name, builder, request.path)
            }
        }
    }

    fn graph(&self, name: &str, source: Source, session: Session) -> Arc<dyn Graph> {
        let inputs = session.inputs().iter().map(|o| real_tensor(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| real_tensor(o.name(), o.dtype())).collect();
        let (first, shared) = match self.options.share_sessions {
            true => (None, Some(Arc::new(Mutex::new(session)))),
            false => (Some(session), None),
        };
        Arc::new(OrtGraph {
            name: name.to_string(),
            source,
            backend: self.clone(),
            inputs,
            outputs,
            first_session: Mutex::new(first),
            shared,
        })
    }
}

/// A TensorRT entry: its directory and, when known, its profiles (min, opt, max option strings).
#[cfg_attr(not(feature = "ort-trt"), allow(dead_code))]
struct TrtCache {
    dir: PathBuf,
    profiles: Option<(String, String, String)>,
}

// The providers, compiled in with the `ort-cuda` / `ort-trt` features (default on).

#[cfg(feature = "ort-cuda")]
fn cuda_available() -> std::result::Result<ort::Result<bool>, String> {
    Ok(CUDA::is_available())
}

#[cfg(feature = "ort-cuda")]
fn register_cuda(builder: &mut SessionBuilder, device: u32) -> std::result::Result<(), String> {
    CUDA::default().with_device_id(device as i32).register(builder).map_err(|e| e.to_string())
}

#[cfg(feature = "ort-trt")]
fn tensorrt_available() -> std::result::Result<ort::Result<bool>, String> {
    Ok(TensorRT::is_available())
}

#[cfg(feature = "ort-trt")]
fn register_tensorrt(
    builder: &mut SessionBuilder,
    device: u32,
    fp16: bool,
    int8: bool,
    cache: Option<&TrtCache>,
) -> std::result::Result<(), String> {
    let mut trt = TensorRT::default().with_device_id(device as i32).with_fp16(fp16).with_int8(int8);
    if let Some(cache) = cache {
        let dir = cache.dir.to_string_lossy();
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(&dir)
            .with_timing_cache(true)
            .with_timing_cache_path(&dir);
        if let Some((min, opt, max)) = &cache.profiles {
            trt = trt.with_profile_min_shapes(min).with_profile_opt_shapes(opt).with_profile_max_shapes(max);
        }
    }
    trt.register(builder).map_err(|e| e.to_string())
}

#[cfg(not(feature = "ort-cuda"))]
fn cuda_available() -> std::result::Result<ort::Result<bool>, String> {
    Err(MISSING_FEATURE.replace("FEATURE", "ort-cuda"))
}

#[cfg(not(feature = "ort-cuda"))]
fn register_cuda(_: &mut SessionBuilder, _: u32) -> std::result::Result<(), String> {
    Err(MISSING_FEATURE.replace("FEATURE", "ort-cuda"))
}

#[cfg(not(feature = "ort-trt"))]
fn tensorrt_available() -> std::result::Result<ort::Result<bool>, String> {
    Err(MISSING_FEATURE.replace("FEATURE", "ort-trt"))
}

#[cfg(not(feature = "ort-trt"))]
fn register_tensorrt(
    _: &mut SessionBuilder,
    _: u32,
    _: bool,
    _: bool,
    _: Option<&TrtCache>,
) -> std::result::Result<(), String> {
    Err(MISSING_FEATURE.replace("FEATURE", "ort-trt"))
}

#[cfg(not(all(feature = "ort-cuda", feature = "ort-trt")))]
const MISSING_FEATURE: &str =
    "this t2i-rt was built without the FEATURE feature; rebuild with `cargo build --release --features FEATURE`";

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        self.provider.backend_name()
    }

    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>> {
        let session = self.load_session(graph, path)?;
        Ok(self.graph(graph, Source::File(path.to_path_buf()), session))
    }

    fn load_bytes(&self, graph: &str, bytes: &[u8]) -> Result<Arc<dyn Graph>> {
        let session = self.session_from_bytes(graph, bytes)?;
        Ok(self.graph(graph, Source::Bytes(bytes.into()), session))
    }

    fn load_graph(&self, request: &GraphLoad<'_>) -> Result<Arc<dyn Graph>> {
        let Some(cache) = &request.cache else { return self.load(request.name, request.path) };
        let session = self.load_cached(request, cache)?;
        // Later sessions of this graph (more workers) are built from the original file.
        Ok(self.graph(request.name, Source::File(request.path.to_path_buf()), session))
    }
}

/// Where a graph's later sessions are built from.
enum Source {
    File(PathBuf),
    Bytes(Arc<[u8]>),
}

struct OrtGraph {
    name: String,
    source: Source,
    backend: OrtBackend,
    inputs: Vec<RealTensor>,
    outputs: Vec<RealTensor>,
    /// The session built while loading, handed to the first worker so a single-worker pipeline
    /// never builds (and optimizes) a graph twice.
    first_session: Mutex<Option<Session>>,
    /// With shared sessions: the one session every worker runs, one call at a time.
    shared: Option<Arc<Mutex<Session>>>,
}

impl Graph for OrtGraph {
    fn inputs(&self) -> &[RealTensor] {
        &self.inputs
    }

    fn outputs(&self) -> &[RealTensor] {
        &self.outputs
    }

    fn session(&self) -> Result<Box<dyn GraphSession>> {
        let output_names: Vec<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        if let Some(shared) = &self.shared {
            return Ok(Box::new(SharedOrtSession {
                name: self.name.clone(),
                backend: self.backend.name(),
                session: shared.clone(),
                output_names,
                bound: Vec::new(),
            }));
        }
        let reused = self.first_session.lock().ok().and_then(|mut s| s.take());
        let session = match reused {
            Some(session) => session,
            None => self.backend.open(&self.name, &self.source)?,
        };
        Ok(Box::new(OrtSession {
            name: self.name.clone(),
            backend: self.backend.name(),
            session,
            output_names,
            binding: None,
        }))
    }
}

struct OrtSession {
    name: String,
    backend: &'static str,
    session: Session,
    output_names: Vec<String>,
    /// Set while inputs are bound: ONNX Runtime's I/O binding, which holds them (on the GPU, in
    /// device memory: copied once when bound) with outputs bound to host memory.
    binding: Option<IoBinding>,
}

impl OrtSession {
    fn err(&self, message: String) -> Error {
        Error::Backend { backend: self.backend, graph: self.name.clone(), message }
    }

    /// `view` as a tensor ONNX Runtime owns (binding copies borrowed data anyway).
    fn owned_value(&self, view: &TensorView<'_>) -> Result<DynValue> {
        let value = match OwnedTensor::from_view(view) {
            OwnedTensor::F32(a) => Tensor::from_array(a).map(DynValue::from),
            OwnedTensor::I64(a) => Tensor::from_array(a).map(DynValue::from),
        };
        value.map_err(|e| self.err(e.to_string()))
    }

    /// Runs through the binding: `inputs` are bound for this call (replacing earlier ones of the
    /// same name), outputs come back in host memory.
    fn run_bound(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        let values =
            inputs.iter().map(|(name, view)| Ok((*name, self.owned_value(view)?))).collect::<Result<Vec<_>>>()?;
        let err = |message: String| Error::Backend { backend: self.backend, graph: self.name.clone(), message };
        let binding = self.binding.as_mut().expect("run_bound with a binding");
        for (name, value) in &values {
            binding.bind_input(*name, value).map_err(|e| err(format!("input {name}: {e}")))?;
        }
        let outputs = self.session.run_binding(binding).map_err(|e| err(e.to_string()))?;
        host_outputs(&outputs, &self.output_names, err)
    }
}

impl GraphSession for OrtSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        if self.binding.is_some() {
            return self.run_bound(inputs);
        }
        let backend = self.backend;
        let err = |message: String| Error::Backend { backend, graph: self.name.clone(), message };
        run_plain(&mut self.session, inputs, &self.output_names, err)
    }

    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        if self.binding.is_none() {
            let mut binding = self.session.create_binding().map_err(|e| self.err(e.to_string()))?;
            // Outputs to host memory: the sampler runs on the host.
            let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| self.err(e.to_string()))?;
            for name in &self.output_names {
                binding
                    .bind_output_to_device(name.as_str(), &host)
                    .map_err(|e| self.err(format!("output {name}: {e}")))?;
            }
            self.binding = Some(binding);
        }
        for (name, view) in inputs {
            let value = self.owned_value(view)?;
            let bound = self.binding.as_mut().expect("created above").bind_input(*name, &value);
            bound.map_err(|e| self.err(format!("input {name}: {e}")))?;
        }
        Ok(())
    }

    fn unbind(&mut self) {
        self.binding = None;
    }
}

/// A worker's handle on a session shared by all workers: inputs it binds are kept here (the
/// session is not this worker's to bind), and each call holds the session's lock.
struct SharedOrtSession {
    name: String,
    backend: &'static str,
    session: Arc<Mutex<Session>>,
    output_names: Vec<String>,
    bound: Vec<(String, OwnedTensor)>,
}

impl GraphSession for SharedOrtSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        let backend = self.backend;
        let err = |message: String| Error::Backend { backend, graph: self.name.clone(), message };
        let mut all: Vec<(&str, TensorView<'_>)> = inputs.iter().map(|(name, view)| (*name, view.reborrow())).collect();
        for (name, value) in &self.bound {
            if !inputs.iter().any(|(given, _)| given == name) {
                all.push((name.as_str(), value.view()));
            }
        }
        // A worker that panicked while holding the lock left the session as ONNX Runtime left it:
        // usable (a failed Run changes no state).
        let mut session = self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        run_plain(&mut session, &all, &self.output_names, err)
    }

    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        for (name, view) in inputs {
            self.bound.retain(|(bound, _)| bound != name);
            self.bound.push((name.to_string(), OwnedTensor::from_view(view)));
        }
        Ok(())
    }

    fn unbind(&mut self) {
        self.bound.clear();
    }
}

/// Runs `session` on `inputs` without I/O binding; outputs `names` in that order.
fn run_plain(
    session: &mut Session,
    inputs: &[(&str, TensorView<'_>)],
    names: &[String],
    err: impl Fn(String) -> Error,
) -> Result<Vec<ArrayD<f32>>> {
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
    let outputs = session.run(values).map_err(|e| err(e.to_string()))?;
    host_outputs(&outputs, names, err)
}

/// The outputs named `names`, in that order, as host arrays.
fn host_outputs(
    outputs: &SessionOutputs<'_>,
    names: &[String],
    err: impl Fn(String) -> Error,
) -> Result<Vec<ArrayD<f32>>> {
    names
        .iter()
        .map(|name| {
            let value = outputs.get(name).ok_or_else(|| err(format!("output {name} missing")))?;
            let array = value.try_extract_array::<f32>().map_err(|e| err(format!("output {name}: {e}")))?;
            Ok(array.to_owned())
        })
        .collect()
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
/// With `gpu`, an `.ort-gpu/` library (scripts/setup-ort.sh --gpu) is preferred to `.ort/`.
/// Returns the environment and the library's path.
/// Its global intra-op thread pool has the thread count the first backend asked for (`None`: one
/// per core, ONNX Runtime's default); sessions asking for that count share it, others get their own.
fn environment(explicit: Option<&Path>, gpu: bool, threads: Option<usize>) -> Result<(Environment, PathBuf)> {
    ENVIRONMENT
        .get_or_init(|| {
            let library = match explicit {
                Some(path) => path.to_path_buf(),
                None => search_library(gpu)?,
            };
            let builder = ort::init_from(&library)
                .map_err(|e| format!("cannot load {} ({e}); {}", library.display(), install_hint()))?;
            let pool = GlobalThreadPoolOptions::default()
                .with_intra_threads(threads.unwrap_or(0))
                .and_then(|pool| pool.with_inter_threads(1))
                .map_err(|e| format!("cannot set up ONNX Runtime's thread pool: {e}"))?;
            let environment = builder
                .with_name("t2i-rt")
                .with_global_thread_pool(pool)
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
            Ok((environment, library, threads))
        })
        .clone()
        .map(|(environment, library, _)| (environment, library))
        .map_err(|e| Error::RuntimeLibrary(format!("ONNX Runtime library not found: {e}")))
}

type EnvironmentSlot = std::result::Result<(Environment, PathBuf, Option<usize>), String>;
static ENVIRONMENT: OnceLock<EnvironmentSlot> = OnceLock::new();

/// The thread count of the environment's global pool.
fn global_pool_threads() -> Option<usize> {
    ENVIRONMENT.get().and_then(|slot| slot.as_ref().ok()).and_then(|(_, _, threads)| *threads)
}

fn install_hint() -> String {
    format!(
        "set ORT_DYLIB_PATH to {ORT_LIBRARY_NAME} (inside the onnxruntime 1.31.1 wheel: onnxruntime/capi/), \
         put it next to the t2i-rt binary, run `bash scripts/setup-ort.sh` in a checkout, or use --backend tract"
    )
}

/// Finds the ONNX Runtime shared library, in this order:
/// 1. `ORT_DYLIB_PATH` (the `ort` crate's convention): a file;
/// 2. next to the running executable, or in `lib/` beside it (how a deployment ships it);
/// 3. `.ort/` in the executable's directory or one of its ancestors (where `scripts/setup-ort.sh`
///    puts it in a checkout, so `cargo run` and `cargo test` need no setting); then `.ort-gpu/`
///    (the GPU build, `scripts/setup-ort.sh --gpu`), which GPU backends look in first.
pub fn find_onnxruntime_library() -> std::result::Result<PathBuf, String> {
    search_library(false)
}

fn search_library(gpu: bool) -> std::result::Result<PathBuf, String> {
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
    let folders = if gpu { [".ort-gpu", ".ort"] } else { [".ort", ".ort-gpu"] };
    for folder in folders {
        candidates.extend(exe_dir.ancestors().map(|dir| dir.join(folder).join(ORT_LIBRARY_NAME)));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(install_hint)
}
