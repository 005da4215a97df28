//! Graph execution behind one small seam, three levels deep (after tract's Runtime → Runnable →
//! State): a [`Backend`] loads a graph into a [`Graph`] (immutable, `Send + Sync`, shareable between
//! workers), and each worker opens its own [`GraphSession`] (mutable, `Send`) to run it.
//!
//! ONNX Runtime (`ort-cpu`, and on NVIDIA GPUs `ort-cuda` and `ort-trt`: execution providers of
//! the same backend, [`OrtOptions`]), OpenVINO (`openvino`, CPU, f32 or bf16) and tract (pure Rust)
//! implement it here.

pub mod gpu;
mod openvino;
mod ort;
mod tract;

use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD};

use crate::engine::ShapeRanges;
use crate::error::{Error, Result};
use crate::log::Logger;
use crate::manifest::{GraphSpec, RealTensor};

pub use self::openvino::{find_openvino_library, OpenVinoBackend, OPENVINO_LIBRARY_NAME};
pub use self::ort::{find_onnxruntime_library, OrtBackend, OrtOptions, Provider, ORT_LIBRARY_NAME};
pub use self::tract::TractBackend;

/// Most threads a graph call may be given.
pub const MAX_THREADS: usize = 1024;

/// Which implementation runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    OrtCpu,
    /// ONNX Runtime's CUDA execution provider (NVIDIA GPUs; the `onnxruntime-gpu` library).
    OrtCuda,
    /// ONNX Runtime's TensorRT execution provider, with CUDA for what TensorRT does not take.
    OrtTrt,
    /// tract, the pure-Rust fallback: no shared library needed.
    Tract,
    /// OpenVINO's own runtime on the CPU (the `openvino` wheel's library), f32 or bf16.
    OpenVino,
}

/// What the graphs compute in. (fp16 graph sets are a different thing: graphs exported in fp16,
/// chosen by the graph set.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InferencePrecision {
    #[default]
    F32,
    /// bfloat16 matrix products and convolutions, f32 elsewhere: OpenVINO on CPUs with bf16
    /// instructions (AVX512_BF16, AMX). Issue 17 measured a UNet call on a Zen 5 EPYC at 0.46x the
    /// f32 time, 1.8e-2 relative error in its output.
    Bf16,
    /// The set's INT8 variants (`python -m t2i_export calibrate`: quantize and dequantize pairs
    /// around the calibrated layers) where it has them, f32 elsewhere: ort-cpu, openvino, and
    /// ort-trt (TensorRT's INT8 mode; not yet run on a GPU).
    Int8,
}

impl InferencePrecision {
    pub const ALL: [InferencePrecision; 3] =
        [InferencePrecision::F32, InferencePrecision::Bf16, InferencePrecision::Int8];

    pub fn as_str(self) -> &'static str {
        match self {
            InferencePrecision::F32 => "f32",
            InferencePrecision::Bf16 => "bf16",
            InferencePrecision::Int8 => "int8",
        }
    }

    /// The graph variant this precision runs (`GraphSpec::variants`), if it takes one.
    pub fn graph_variant(self) -> Option<&'static str> {
        match self {
            InferencePrecision::Int8 => Some("int8"),
            InferencePrecision::F32 | InferencePrecision::Bf16 => None,
        }
    }

    /// The value of OpenVINO's `INFERENCE_PRECISION_HINT`: INT8 variants carry their precision in
    /// the graph, and OpenVINO runs the quantized layers in int8 under the f32 hint.
    fn openvino_name(self) -> &'static str {
        match self {
            InferencePrecision::F32 | InferencePrecision::Int8 => "f32",
            InferencePrecision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for InferencePrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        InferencePrecision::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::InvalidOptions(format!("unknown precision {s:?}; valid precisions: f32, bf16, int8")))
    }
}

impl std::fmt::Display for InferencePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a backend is created: threads, GPU and fallback choices. `Default` is the backend's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSettings {
    /// Threads per graph call (CPU work); `None`: the backend's default.
    pub threads: Option<usize>,
    /// GPU ordinal for `ort-cuda` and `ort-trt`.
    pub device: u32,
    /// Run on ONNX Runtime's CPU provider when the GPU provider cannot start, with a warning,
    /// instead of failing.
    pub allow_cpu_fallback: bool,
    /// `ort-trt`: let TensorRT pick fp16 kernels (`trt_fp16_enable`).
    pub trt_fp16: bool,
    /// Where the backend's notes go (CPU fallback, stale or missing prepared engines).
    pub log: Logger,
    /// ort: one session per graph shared by every worker of a model, so the weights are held once
    /// (four workers on SD 1.5: one copy instead of four), and calls to the same graph take turns.
    /// Off (the default): one session per worker, calls in parallel, I/O binding on GPUs. tract's
    /// workers always share one copy of the weights.
    pub share_sessions: bool,
    /// What the graphs compute in: bf16 is an `openvino` option, int8 (the set's INT8 variants) one
    /// of `ort-cpu`, `openvino` and `ort-trt`.
    pub precision: InferencePrecision,
}

impl BackendSettings {
    /// Checks that the settings make sense for `backend`: thread count in range, GPU-only
    /// settings only with a GPU backend, TensorRT's fp16 only with TensorRT.
    pub fn check(&self, backend: BackendKind) -> Result<()> {
        if let Some(n) = self.threads.filter(|n| !(1..=MAX_THREADS).contains(n)) {
            return Err(Error::InvalidOptions(format!("threads {n} must be between 1 and {MAX_THREADS}")));
        }
        if !backend.is_gpu() && (self.device != 0 || self.allow_cpu_fallback) {
            return Err(Error::InvalidOptions(format!(
                "a device ordinal and CPU fallback are for the GPU backends (ort-cuda, ort-trt), not {backend}"
            )));
        }
        if self.trt_fp16 && backend != BackendKind::OrtTrt {
            return Err(Error::InvalidOptions(format!("TensorRT fp16 is an ort-trt option, not one of {backend}")));
        }
        if self.precision == InferencePrecision::Bf16 && backend != BackendKind::OpenVino {
            return Err(Error::InvalidOptions(format!(
                "precision bf16 is an openvino option, not one of {backend} (ort-trt has --trt-fp16; fp16 graph sets \
                 run on every ort backend)"
            )));
        }
        let int8_backends = [BackendKind::OrtCpu, BackendKind::OpenVino, BackendKind::OrtTrt];
        if self.precision == InferencePrecision::Int8 && !int8_backends.contains(&backend) {
            return Err(Error::InvalidOptions(format!(
                "precision int8 runs a set's INT8 graphs on ort-cpu, openvino and ort-trt, not on {backend}"
            )));
        }
        Ok(())
    }
}

impl BackendKind {
    pub const ALL: [BackendKind; 5] =
        [BackendKind::OrtCpu, BackendKind::OrtCuda, BackendKind::OrtTrt, BackendKind::Tract, BackendKind::OpenVino];
    /// The backends every machine can run (what the parity tests and CPU benches cover).
    pub const CPU: [BackendKind; 3] = [BackendKind::OrtCpu, BackendKind::Tract, BackendKind::OpenVino];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::OrtCpu => "ort-cpu",
            BackendKind::OrtCuda => "ort-cuda",
            BackendKind::OrtTrt => "ort-trt",
            BackendKind::Tract => "tract",
            BackendKind::OpenVino => "openvino",
        }
    }

    /// Whether this backend runs on an NVIDIA GPU.
    pub fn is_gpu(self) -> bool {
        matches!(self, BackendKind::OrtCuda | BackendKind::OrtTrt)
    }

    /// Creates the backend with default settings and `threads` per graph call.
    pub fn create(self, threads: Option<usize>) -> Result<Arc<dyn Backend>> {
        self.create_with(&BackendSettings { threads, ..BackendSettings::default() })
    }

    /// Creates the backend. For ort this loads the ONNX Runtime library (see
    /// [`find_onnxruntime_library`]) and, for the GPU kinds, checks that the library has the
    /// provider and that the GPU exists, so a missing piece fails here with what to install.
    pub fn create_with(self, settings: &BackendSettings) -> Result<Arc<dyn Backend>> {
        settings.check(self)?;
        let provider = match self {
            BackendKind::Tract => return Ok(Arc::new(TractBackend::new(settings.threads))),
            BackendKind::OpenVino => {
                return Ok(Arc::new(OpenVinoBackend::new(settings.threads, settings.precision, settings.log.clone())?))
            }
            BackendKind::OrtCpu => Provider::Cpu,
            BackendKind::OrtCuda => Provider::Cuda { device: settings.device },
            BackendKind::OrtTrt => Provider::TensorRt {
                device: settings.device,
                fp16: settings.trt_fp16,
                int8: settings.precision == InferencePrecision::Int8,
            },
        };
        Ok(Arc::new(OrtBackend::new(OrtOptions {
            intra_threads: settings.threads,
            provider,
            allow_cpu_fallback: settings.allow_cpu_fallback,
            log: settings.log.clone(),
            share_sessions: settings.share_sessions,
            ..OrtOptions::default()
        })?))
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BackendKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let valid: Vec<&str> = BackendKind::ALL.iter().map(|k| k.as_str()).collect();
            Error::InvalidOptions(format!("unknown backend {s:?}; valid backends: {}", valid.join(", ")))
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
    /// The same tensor, borrowed for a shorter time.
    pub fn reborrow(&self) -> TensorView<'_> {
        match self {
            TensorView::F32(a) => TensorView::F32(a.view()),
            TensorView::I64(a) => TensorView::I64(a.view()),
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            TensorView::F32(a) => a.shape(),
            TensorView::I64(a) => a.shape(),
        }
    }
}

/// One graph to load, with what engine caches need to know about it.
#[derive(Debug, Clone)]
pub struct GraphLoad<'a> {
    /// The graph's name in the set (`unet`, `adapter_sketch`, ...), used in errors and cache paths.
    pub name: &'a str,
    pub path: &'a Path,
    pub spec: &'a GraphSpec,
    /// Where prepared engines live (`None`: no cache is read or written).
    pub cache: Option<CacheUse<'a>>,
}

/// How a graph load uses the engine cache.
#[derive(Debug, Clone)]
pub struct CacheUse<'a> {
    /// The cache root (default: `.t2i-engines/` in the graph set).
    pub root: &'a Path,
    /// `t2i-rt build-engine`: prepare (and replace) this graph's entry instead of only reading it.
    pub build: bool,
    /// TensorRT shape profiles to build for (only with `build`).
    pub shapes: Option<ShapeRanges>,
}

/// Loads graphs.
pub trait Backend: Send + Sync {
    /// The name users pass to `--backend`.
    fn name(&self) -> &'static str;
    /// Loads the ONNX graph at `path` (external data beside it). `graph` names it in errors.
    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>>;
    /// Loads an ONNX graph held in memory (no external data). Malformed bytes are an error, never
    /// a crash.
    fn load_bytes(&self, graph: &str, bytes: &[u8]) -> Result<Arc<dyn Graph>>;
    /// Loads a graph of a set, using (or, when building, filling) its engine cache where the
    /// backend has one. Backends without caches load the file.
    fn load_graph(&self, request: &GraphLoad<'_>) -> Result<Arc<dyn Graph>> {
        self.load(request.name, request.path)
    }
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
    /// Runs the graph. `inputs` are matched by name and, with the bound inputs, must cover every
    /// graph input; the outputs come back in the graph's output order, as f32 (the dtype of every
    /// output our graphs have).
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>>;

    /// Binds `inputs` for every following [`GraphSession::run`] until [`GraphSession::unbind`]:
    /// the backend takes them once (ONNX Runtime on a GPU copies them to the device once) rather
    /// than on every call, and `run` is then given only the inputs that change. Binding a name
    /// again replaces it. The pipeline binds a request's text embeddings and adapter residuals.
    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()>;

    /// Drops every bound input (and the memory it holds).
    fn unbind(&mut self);
}

/// An input owned by a session (a bound one).
#[derive(Debug, Clone)]
pub(crate) enum OwnedTensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl OwnedTensor {
    pub(crate) fn from_view(view: &TensorView<'_>) -> Self {
        match view {
            TensorView::F32(a) => OwnedTensor::F32(a.to_owned()),
            TensorView::I64(a) => OwnedTensor::I64(a.to_owned()),
        }
    }

    pub(crate) fn view(&self) -> TensorView<'_> {
        match self {
            OwnedTensor::F32(a) => TensorView::F32(a.view()),
            OwnedTensor::I64(a) => TensorView::I64(a.view()),
        }
    }
}
