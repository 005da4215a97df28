//! The C API of t2i-rt, for C and C++ services: load a graph set once (`t2i_model`, shareable
//! between threads), open one `t2i_ctx` per worker thread, and generate. `include/t2i_rt.h` is
//! generated from this file by cbindgen (`cargo test -p t2i-rt-capi` fails when it is stale; run
//! `T2I_WRITE_HEADER=1 cargo test -p t2i-rt-capi --test header` to rewrite it).
//!
//! Conventions (shared/STYLE.md, "The C API"):
//! - every call returns a `t2i_status`; on failure `t2i_last_error()` gives this thread's message;
//! - every params struct begins with `struct_size` and is filled with defaults by its
//!   `*_params_init()`; the library reads as many bytes as the caller's `struct_size` says, so a
//!   struct can grow without breaking callers built against an older header;
//! - callbacks (log, progress with cancel) carry a `user_data` pointer and belong to a model or a
//!   context, never to the process;
//! - everything the library hands out has its own free function, and every free accepts NULL;
//! - no panic crosses into C: every entry point that does more than read or write plain data runs
//!   inside `catch_unwind` and returns `T2I_ERR_INTERNAL` (frees drop inside it too).
//!
//! Strings are NUL-terminated UTF-8; pointers inside params only need to stay valid for the call.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use image::RgbImage;
use ndarray::Array4;
use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::{BackendKind, BackendSettings, InferencePrecision};
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::preprocess::Preprocess;
use t2i_rt::{
    ControlRequest, EngineCache, Error, ErrorCode, LoadOptions, LogLevel, Logger, Model, Pipeline, Request, RngKind,
    SchedulerKind, StyleRequest,
};

/// What a call returned. The values 1–15 are the library's error kinds (`t2i_rt::ErrorCode`);
/// they are never renumbered.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum t2i_status {
    T2I_OK = 0,
    /// A file could not be read or written.
    T2I_ERR_IO = 1,
    /// The graph set is missing, malformed or inconsistent with its graphs.
    T2I_ERR_GRAPH_SET = 2,
    /// The ONNX Runtime library could not be found or loaded.
    T2I_ERR_RUNTIME_LIBRARY = 3,
    /// A GPU execution provider cannot start.
    T2I_ERR_PROVIDER = 4,
    /// A backend failed to load or run a graph.
    T2I_ERR_BACKEND = 5,
    /// A request field is out of range or does not fit the graph set.
    T2I_ERR_INVALID_REQUEST = 6,
    /// Model params that contradict each other or the backend.
    T2I_ERR_INVALID_OPTIONS = 7,
    /// The graph set or backend cannot do what was asked (e.g. img2img without a VAE encoder).
    T2I_ERR_UNSUPPORTED = 8,
    /// An image could not be decoded or encoded.
    T2I_ERR_IMAGE = 9,
    T2I_ERR_NPY = 10,
    /// A scheduler option has an unsupported value.
    T2I_ERR_SCHEDULER = 11,
    T2I_ERR_TOKENIZER = 12,
    /// The progress callback returned false.
    T2I_ERR_CANCELLED = 13,
    /// The request is larger than the model's limits.
    T2I_ERR_LIMIT_EXCEEDED = 14,
    /// A graph or the sampler produced NaN or infinity.
    T2I_ERR_NUMERICAL_FAULT = 15,
    /// A NULL pointer, a `struct_size` smaller than this library's struct, a string that is not
    /// UTF-8, an unknown enum value.
    T2I_ERR_INVALID_ARGUMENT = 100,
    /// A bug in the library (a caught panic). Please report it with the message.
    T2I_ERR_INTERNAL = 101,
}

/// `t2i_model_params.backend`: ONNX Runtime's CPU execution provider.
pub const T2I_BACKEND_ORT_CPU: u32 = 0;
/// ONNX Runtime's CUDA execution provider (NVIDIA GPUs, the onnxruntime-gpu library).
pub const T2I_BACKEND_ORT_CUDA: u32 = 1;
/// ONNX Runtime's TensorRT execution provider.
pub const T2I_BACKEND_ORT_TRT: u32 = 2;
/// tract, pure Rust: no shared library needed.
pub const T2I_BACKEND_TRACT: u32 = 3;
/// OpenVINO's runtime on the CPU (the openvino 2026.4 wheel's libraries: scripts/setup-openvino.sh).
pub const T2I_BACKEND_OPENVINO: u32 = 4;

/// `t2i_model_params.precision`: compute in f32.
pub const T2I_PRECISION_F32: u32 = 0;
/// bf16 (T2I_BACKEND_OPENVINO on CPUs with bf16 instructions: AVX512_BF16 or AMX).
pub const T2I_PRECISION_BF16: u32 = 1;
/// The set's INT8 graphs (T2I_BACKEND_ORT_CPU, T2I_BACKEND_OPENVINO; T2I_BACKEND_ORT_TRT in
/// TensorRT's INT8 mode, not yet run on a GPU), made with `python -m t2i_export calibrate`.
pub const T2I_PRECISION_INT8: u32 = 2;

/// `t2i_request_params.rng`: the runtime's own generator (fast; not diffusers' draws).
pub const T2I_RNG_FAST: u32 = 0;
/// `torch.Generator("cpu").manual_seed(seed)` as diffusers draws from it (torch's AVX2 kernels).
pub const T2I_RNG_TORCH_CPU: u32 = 1;
/// The same with torch's DEFAULT-capability kernels.
pub const T2I_RNG_TORCH_CPU_DEFAULT: u32 = 2;

/// `t2i_log_fn`'s level: something the caller may want to know.
pub const T2I_LOG_INFO: u32 = 0;
/// Something went differently from what was asked (CPU fallback, a stale engine not used).
pub const T2I_LOG_WARNING: u32 = 1;

/// Receives the library's notes. May be called from any thread that uses the model, so it must be
/// thread-safe. `message` is valid only during the call.
pub type t2i_log_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, level: u32, message: *const c_char)>;

/// Called after every denoising step of a `t2i_generate` on the context it was set on, on the
/// calling thread; `step` counts from 1 to `total`. Return false to cancel the request
/// (`t2i_generate` then returns `T2I_ERR_CANCELLED`).
pub type t2i_progress_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, step: u32, total: u32) -> bool>;

/// How to load a graph set. Fill it with `t2i_model_params_init`, then change what you need.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_model_params {
    /// `sizeof(t2i_model_params)`, set by `t2i_model_params_init`.
    pub struct_size: u32,
    /// `T2I_BACKEND_*` (default `T2I_BACKEND_ORT_CPU`).
    pub backend: u32,
    /// Threads per graph call; 0: the backend's default.
    pub threads: u32,
    /// GPU ordinal for the GPU backends.
    pub device: u32,
    /// GPU backends: run on the CPU, with a warning, when the GPU provider cannot start.
    pub allow_cpu_fallback: bool,
    /// ort-trt: let TensorRT use fp16 kernels.
    pub trt_fp16: bool,
    /// Hash every graph file against the manifest while loading (default true).
    pub verify_checksums: bool,
    /// Neither read nor write prepared engines.
    pub no_engine_cache: bool,
    /// ONNX Runtime backends: one session per graph for all contexts of the model, so the weights
    /// are held once (four contexts on SD 1.5: one copy instead of four) and calls to the same
    /// graph take turns. Default false: each context opens its own sessions and runs in parallel.
    /// tract's and OpenVINO's contexts always share one copy.
    pub share_weights: bool,
    /// Where prepared engines live; NULL: `.t2i-engines` inside the graph set.
    pub engine_cache_dir: *const c_char,
    /// The model's log callback (NULL: notes are dropped) and its user data.
    pub log: t2i_log_fn,
    pub log_user_data: *mut c_void,
    /// `T2I_PRECISION_*` (default `T2I_PRECISION_F32`).
    pub precision: u32,
}

/// An input image: a file (PNG or JPEG) when `path` is not NULL, else `width × height` 8-bit
/// pixels, `channels` (1: gray, 3: RGB) per pixel, rows top to bottom, copied during the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_image_input {
    pub path: *const c_char,
    pub pixels: *const u8,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
}

/// One T2I-Adapter of a request: its name in the graph set, its condition image (gray or RGB as
/// the adapter takes it) and its weight.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_adapter_input {
    pub name: *const c_char,
    pub image: t2i_image_input,
    pub weight: f32,
}

/// One ControlNet of a request: its name in the graph set, its control image (RGB), its
/// conditioning scale, and how to make the condition from the image.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_control_input {
    pub name: *const c_char,
    pub image: t2i_image_input,
    /// Multiplies the ControlNet's residuals (diffusers' `controlnet_conditioning_scale`; 1.0 is
    /// the usual strength).
    pub scale: f32,
    /// Conditions made from the image after it is resized to the output size, comma-separated
    /// and applied in order, as `t2i-rt run --preprocess` takes them: `"canny"`,
    /// `"canny:50:150"`, `"palette"`, `"invert"`, `"invert,canny"`; NULL or "": the image already
    /// is the condition.
    pub preprocess: *const c_char,
}

/// One style image of a request (TencentARC's style adapter): the image (RGB or gray, any size:
/// it is resized and center-cropped for the set's CLIP vision encoder) and its weight, which
/// multiplies the image's style tokens (1.0 is the adapter as trained; finite).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_style_input {
    pub image: t2i_image_input,
    pub weight: f32,
}

/// One generation request. Fill it with `t2i_request_params_init` (diffusers' defaults), then set
/// at least `prompt`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_request_params {
    /// `sizeof(t2i_request_params)`, set by `t2i_request_params_init`.
    pub struct_size: u32,
    /// What to draw (required).
    pub prompt: *const c_char,
    /// NULL: the empty prompt, as in diffusers.
    pub negative_prompt: *const c_char,
    /// `n_adapters` adapters (NULL when 0).
    pub adapters: *const t2i_adapter_input,
    pub n_adapters: u32,
    /// Fraction of the steps that get adapter residuals, in [0, 1] (default 1).
    pub cond_tau: f32,
    /// Denoising steps (default 50).
    pub steps: u32,
    /// Classifier-free guidance scale (default 7.5; ≤ 1 turns guidance off).
    pub guidance: f32,
    /// diffusers' guidance_rescale in [0, 1] (default 0).
    pub guidance_rescale: f32,
    /// A sampler name as `t2i-rt run --scheduler` takes it (`euler`, `dpmpp-2m-karras`, ...);
    /// NULL: the graph set's own.
    pub scheduler: *const c_char,
    /// diffusers scheduler config overrides as a JSON object (`{"timestep_spacing": "trailing"}`);
    /// NULL: none.
    pub scheduler_options_json: *const c_char,
    /// DDIM's eta (default 0).
    pub eta: f32,
    pub seed: u64,
    /// `T2I_RNG_*` (default `T2I_RNG_FAST`).
    pub rng: u32,
    /// Images per prompt (default 1).
    pub n_samples: u32,
    /// Output size; 0: as diffusers picks it (the init image's, the first condition image's, or
    /// the graph set's default).
    pub width: u32,
    pub height: u32,
    /// img2img and inpainting: the picture to start from (RGB), of the output size; NULL: txt2img.
    pub init_image: *const t2i_image_input,
    /// Inpainting: white (≥ 128) is drawn anew; same size as the init image; NULL: none.
    pub mask: *const t2i_image_input,
    /// In (0, 1]; negative (the default): 0.8 for img2img, 1.0 with a mask.
    pub strength: f32,
    /// Keep the final latents in the result (`t2i_result_latents`).
    pub want_latents: bool,
    /// `n_controls` ControlNets (NULL when 0), run at every step and summed.
    pub controls: *const t2i_control_input,
    pub n_controls: u32,
    /// The fraction of the steps in which the ControlNets act: from `control_start` to
    /// `control_end` (diffusers' `control_guidance_start` / `_end`; defaults 0 and 1).
    pub control_start: f32,
    pub control_end: f32,
    /// diffusers' guess mode: with guidance the ControlNets see only the conditional half, and
    /// their residuals ramp from 0.1 (shallowest) to 1.0 (deepest) (default false).
    pub guess_mode: bool,
    /// The IP-Adapter's reference image (RGB or gray; NULL: none), for a graph set exported with
    /// `--ip-adapter`. A context keeps the embeddings of its last 8 reference images, keyed by
    /// content, so a service that reuses reference images runs the image encoder once per image.
    pub ip_image: *const t2i_image_input,
    /// How strongly the reference image steers the result (diffusers' `set_ip_adapter_scale`;
    /// default 1.0; 0 is exactly no IP-Adapter).
    pub ip_scale: f32,
    /// `n_styles` style images (NULL when 0), for a graph set exported with `--style-adapter`: each
    /// adds its weighted tokens to the text context, at most the set's `max_images` (9 for the
    /// released adapter).
    pub styles: *const t2i_style_input,
    pub n_styles: u32,
    /// The fraction of the steps, from the first (noisiest), that see the style images, in [0, 1]
    /// (TencentARC's `style_cond_tau`; default 1.0: every step).
    pub style_cond_tau: f32,
}

/// An image the library holds: RGB8, rows top to bottom, `width × 3` bytes per row. Valid until
/// its result is freed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_image_view {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub pixels: *const u8,
}

/// Final latents [n, c, h, w], float32, C order. Valid until their result is freed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct t2i_latents_view {
    pub shape: [u32; 4],
    pub data: *const f32,
}

/// A loaded graph set. Load once, share between threads; free with `t2i_model_free` after every
/// context on it is freed.
pub struct t2i_model {
    model: Model,
}

/// One worker: sessions of a model, running one request at a time. Use it from one thread at a
/// time; open one per worker thread.
pub struct t2i_ctx {
    pipeline: Pipeline,
    progress: t2i_progress_fn,
    progress_user_data: *mut c_void,
}

/// What `t2i_generate` made: images and, on request, latents.
pub struct t2i_result {
    images: Vec<RgbImage>,
    latents: Option<Array4<f32>>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: its status and message.
struct Failure(t2i_status, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        // Exhaustive: a new error kind does not compile until it has its status.
        let status = match e.code() {
            ErrorCode::Io => t2i_status::T2I_ERR_IO,
            ErrorCode::GraphSet => t2i_status::T2I_ERR_GRAPH_SET,
            ErrorCode::RuntimeLibrary => t2i_status::T2I_ERR_RUNTIME_LIBRARY,
            ErrorCode::Provider => t2i_status::T2I_ERR_PROVIDER,
            ErrorCode::Backend => t2i_status::T2I_ERR_BACKEND,
            ErrorCode::InvalidRequest => t2i_status::T2I_ERR_INVALID_REQUEST,
            ErrorCode::InvalidOptions => t2i_status::T2I_ERR_INVALID_OPTIONS,
            ErrorCode::Unsupported => t2i_status::T2I_ERR_UNSUPPORTED,
            ErrorCode::Image => t2i_status::T2I_ERR_IMAGE,
            ErrorCode::Npy => t2i_status::T2I_ERR_NPY,
            ErrorCode::Scheduler => t2i_status::T2I_ERR_SCHEDULER,
            ErrorCode::Tokenizer => t2i_status::T2I_ERR_TOKENIZER,
            ErrorCode::Cancelled => t2i_status::T2I_ERR_CANCELLED,
            ErrorCode::LimitExceeded => t2i_status::T2I_ERR_LIMIT_EXCEEDED,
            ErrorCode::NumericalFault => t2i_status::T2I_ERR_NUMERICAL_FAULT,
        };
        debug_assert_eq!(status as u32, e.code() as u32, "statuses 1-15 are the library's error codes");
        Failure(status, e.to_string())
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure(t2i_status::T2I_ERR_INVALID_ARGUMENT, message.into())
}

/// Runs an entry point's body: a panic becomes `T2I_ERR_INTERNAL`, a failure is recorded as this
/// thread's last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> t2i_status {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Failure(t2i_status::T2I_ERR_INTERNAL, format!("internal error (please report): {what}")))
    });
    match outcome {
        Ok(()) => t2i_status::T2I_OK,
        Err(Failure(status, message)) => {
            let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
            LAST_ERROR.with(|last| *last.borrow_mut() = message);
            status
        }
    }
}

/// A required, NUL-terminated UTF-8 string.
unsafe fn string(ptr: *const c_char, what: &str) -> Result<String, Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string valid for the call (the API's contract).
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().map(str::to_string).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// An optional string (NULL: none).
unsafe fn optional_string(ptr: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: as for `string`.
        unsafe { string(ptr, what) }.map(Some)
    }
}

/// Reads a params struct the caller filled: `struct_size` bytes of it, at least this library's
/// struct (a caller built against a newer header may pass more; the rest is ignored).
unsafe fn read_params<T: Copy>(ptr: *const T, what: &str) -> Result<T, Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: every params struct starts with a u32 `struct_size`, and `ptr` is non-NULL and
    // points at a struct the caller filled (the API's contract).
    let size = unsafe { (ptr as *const u32).read_unaligned() } as usize;
    if size < std::mem::size_of::<T>() {
        return Err(invalid(format!(
            "{what}.struct_size is {size}, smaller than this library's {} bytes: fill the struct with its \
             *_params_init() from the header this library came with",
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the caller's struct holds at least size_of::<T>() bytes laid out as T (checked above,
    // and `T` is `repr(C)` as in the header).
    Ok(unsafe { ptr.read_unaligned() })
}

/// A `t2i_image_input` as the library's image source, `kind` when it is pixels (1 channel: gray,
/// 3: RGB).
unsafe fn image_source(input: &t2i_image_input, what: &str) -> Result<ConditionSource, Failure> {
    // SAFETY: as for `optional_string`.
    if let Some(path) = unsafe { optional_string(input.path, &format!("{what}.path")) }? {
        return Ok(ConditionSource::File(PathBuf::from(path)));
    }
    if input.pixels.is_null() {
        return Err(invalid(format!("{what}: give a path or pixels")));
    }
    let kind = match input.channels {
        1 => ConditionKind::Gray,
        3 => ConditionKind::Rgb,
        c => return Err(invalid(format!("{what}.channels is {c}; it must be 1 (gray) or 3 (RGB)"))),
    };
    let len = (input.width as usize)
        .checked_mul(input.height as usize)
        .and_then(|n| n.checked_mul(input.channels as usize))
        .filter(|&n| n > 0 && n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("{what}: {}x{} is not a valid size", input.width, input.height)))?;
    // SAFETY: the caller's buffer holds width × height × channels bytes (the API's contract).
    let pixels = unsafe { std::slice::from_raw_parts(input.pixels, len) }.to_vec();
    let image = ConditionImage::from_pixels(input.width, input.height, kind, pixels)
        .ok_or_else(|| invalid(format!("{what}: buffer does not match its size")))?;
    Ok(ConditionSource::Pixels(image))
}

/// The library's version, e.g. "0.1.0". Static; never freed.
#[no_mangle]
pub extern "C" fn t2i_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// This thread's message for its last failed call ("" if none). Valid until the next failing call
/// on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn t2i_last_error() -> *const c_char {
    // `try_with`: after this thread's locals are torn down (a call from a thread-exit hook), "".
    LAST_ERROR.try_with(|last| last.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// Fills `params` with the defaults (ort-cpu, default threads, checksums verified, the graph set's
/// engine cache, no log callback) and sets its `struct_size`.
///
/// # Safety
/// `params` is NULL (nothing happens) or points to a writable `t2i_model_params`.
#[no_mangle]
pub unsafe extern "C" fn t2i_model_params_init(params: *mut t2i_model_params) {
    if params.is_null() {
        return;
    }
    let defaults = t2i_model_params {
        struct_size: std::mem::size_of::<t2i_model_params>() as u32,
        backend: T2I_BACKEND_ORT_CPU,
        threads: 0,
        device: 0,
        allow_cpu_fallback: false,
        trt_fp16: false,
        verify_checksums: true,
        no_engine_cache: false,
        share_weights: false,
        engine_cache_dir: std::ptr::null(),
        log: None,
        log_user_data: std::ptr::null_mut(),
        precision: T2I_PRECISION_F32,
    };
    // SAFETY: non-NULL and writable (the contract above). A plain write of plain data: nothing here
    // can panic.
    unsafe { params.write_unaligned(defaults) };
}

/// The caller's log callback and user data, called from whichever thread logs.
#[derive(Clone, Copy)]
struct LogSink {
    log: unsafe extern "C" fn(*mut c_void, u32, *const c_char),
    user_data: *mut c_void,
}

impl LogSink {
    fn call(&self, level: u32, message: &CStr) {
        // SAFETY: the caller's callback with its own user data (t2i_log_fn's contract).
        unsafe { (self.log)(self.user_data, level, message.as_ptr()) };
    }
}

// SAFETY: the API requires the log callback to be thread-safe with its user data (t2i_log_fn).
unsafe impl Send for LogSink {}
// SAFETY: as above.
unsafe impl Sync for LogSink {}

/// Loads the graph set in `graph_set_dir` (checks its manifest and every graph) into `*out`.
///
/// # Safety
/// `graph_set_dir` is a NUL-terminated string; `params` is NULL (defaults) or was filled by
/// `t2i_model_params_init`; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn t2i_model_load(
    graph_set_dir: *const c_char,
    params: *const t2i_model_params,
    out: *mut *mut t2i_model,
) -> t2i_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: `out` is writable (contract); cleared first so a failure leaves NULL.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: the contract above.
        let dir = unsafe { string(graph_set_dir, "graph_set_dir") }?;
        let params = if params.is_null() {
            let mut p = std::mem::MaybeUninit::<t2i_model_params>::uninit();
            // SAFETY: init writes the whole struct.
            unsafe {
                t2i_model_params_init(p.as_mut_ptr());
                p.assume_init()
            }
        } else {
            // SAFETY: the contract above.
            unsafe { read_params(params, "params") }?
        };
        let backend = match params.backend {
            T2I_BACKEND_ORT_CPU => BackendKind::OrtCpu,
            T2I_BACKEND_ORT_CUDA => BackendKind::OrtCuda,
            T2I_BACKEND_ORT_TRT => BackendKind::OrtTrt,
            T2I_BACKEND_TRACT => BackendKind::Tract,
            T2I_BACKEND_OPENVINO => BackendKind::OpenVino,
            other => return Err(invalid(format!("params.backend {other} is not a T2I_BACKEND_* value"))),
        };
        let precision = match params.precision {
            T2I_PRECISION_F32 => InferencePrecision::F32,
            T2I_PRECISION_BF16 => InferencePrecision::Bf16,
            T2I_PRECISION_INT8 => InferencePrecision::Int8,
            other => return Err(invalid(format!("params.precision {other} is not a T2I_PRECISION_* value"))),
        };
        // SAFETY: the contract above.
        let cache_dir = unsafe { optional_string(params.engine_cache_dir, "params.engine_cache_dir") }?;
        let engine_cache = match (params.no_engine_cache, cache_dir) {
            (true, _) => EngineCache::Off,
            (false, Some(dir)) => EngineCache::Dir(dir.into()),
            (false, None) => EngineCache::InGraphSet,
        };
        let log = match params.log {
            Some(log) => {
                let sink = LogSink { log, user_data: params.log_user_data };
                Logger::new(move |level, message| {
                    let level = match level {
                        LogLevel::Info => T2I_LOG_INFO,
                        LogLevel::Warning => T2I_LOG_WARNING,
                    };
                    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
                    sink.call(level, &message);
                })
            }
            None => Logger::default(),
        };
        let options = LoadOptions {
            backend,
            verify_checksums: params.verify_checksums,
            settings: BackendSettings {
                threads: (params.threads > 0).then_some(params.threads as usize),
                device: params.device,
                allow_cpu_fallback: params.allow_cpu_fallback,
                trt_fp16: params.trt_fp16,
                log,
                share_sessions: params.share_weights,
                precision,
            },
            engine_cache,
            ..LoadOptions::default()
        };
        let model = Model::load(dir.as_ref(), &options)?;
        // SAFETY: `out` is writable (checked above).
        unsafe { out.write(Box::into_raw(Box::new(t2i_model { model }))) };
        Ok(())
    })
}

/// Frees a model. Free every context on it first.
///
/// # Safety
/// `model` is NULL or came from `t2i_model_load` and is not used after this call.
#[no_mangle]
pub unsafe extern "C" fn t2i_model_free(model: *mut t2i_model) {
    if !model.is_null() {
        // SAFETY: from Box::into_raw in t2i_model_load, freed once (contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// Opens one worker's context on `model` into `*out`. Many contexts may share a model, one per
/// thread.
///
/// # Safety
/// `model` came from `t2i_model_load` and outlives the context; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn t2i_ctx_new(model: *const t2i_model, out: *mut *mut t2i_ctx) -> t2i_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: writable (contract); cleared first so a failure leaves NULL.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or a live model (contract).
        let model = unsafe { model.as_ref() }.ok_or_else(|| invalid("model is NULL"))?;
        let pipeline = model.model.pipeline()?;
        let ctx = t2i_ctx { pipeline, progress: None, progress_user_data: std::ptr::null_mut() };
        // SAFETY: writable (checked above).
        unsafe { out.write(Box::into_raw(Box::new(ctx))) };
        Ok(())
    })
}

/// Frees a context.
///
/// # Safety
/// `ctx` is NULL or came from `t2i_ctx_new` and is not used after this call.
#[no_mangle]
pub unsafe extern "C" fn t2i_ctx_free(ctx: *mut t2i_ctx) {
    if !ctx.is_null() {
        // SAFETY: from Box::into_raw in t2i_ctx_new, freed once (contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(ctx) })));
    }
}

/// Sets the progress callback of `ctx` (NULL: none), called after every step of its requests.
///
/// # Safety
/// `ctx` came from `t2i_ctx_new`.
#[no_mangle]
pub unsafe extern "C" fn t2i_ctx_set_progress(
    ctx: *mut t2i_ctx,
    progress: t2i_progress_fn,
    user_data: *mut c_void,
) -> t2i_status {
    guard(|| {
        // SAFETY: NULL or a live context used by this thread only (contract).
        let ctx = unsafe { ctx.as_mut() }.ok_or_else(|| invalid("ctx is NULL"))?;
        ctx.progress = progress;
        ctx.progress_user_data = user_data;
        Ok(())
    })
}

/// Fills `params` with diffusers' defaults (50 steps, guidance 7.5, the graph set's sampler, one
/// image, default size and strength, seed 0 with the fast generator) and sets its `struct_size`.
///
/// # Safety
/// `params` is NULL (nothing happens) or points to a writable `t2i_request_params`.
#[no_mangle]
pub unsafe extern "C" fn t2i_request_params_init(params: *mut t2i_request_params) {
    if params.is_null() {
        return;
    }
    let defaults = t2i_request_params {
        struct_size: std::mem::size_of::<t2i_request_params>() as u32,
        prompt: std::ptr::null(),
        negative_prompt: std::ptr::null(),
        adapters: std::ptr::null(),
        n_adapters: 0,
        cond_tau: 1.0,
        steps: 50,
        guidance: 7.5,
        guidance_rescale: 0.0,
        scheduler: std::ptr::null(),
        scheduler_options_json: std::ptr::null(),
        eta: 0.0,
        seed: 0,
        rng: T2I_RNG_FAST,
        n_samples: 1,
        width: 0,
        height: 0,
        init_image: std::ptr::null(),
        mask: std::ptr::null(),
        strength: -1.0,
        want_latents: false,
        controls: std::ptr::null(),
        n_controls: 0,
        control_start: 0.0,
        control_end: 1.0,
        guess_mode: false,
        ip_image: std::ptr::null(),
        ip_scale: 1.0,
        styles: std::ptr::null(),
        n_styles: 0,
        style_cond_tau: 1.0,
    };
    // SAFETY: non-NULL and writable (the contract above).
    unsafe { params.write_unaligned(defaults) };
}

/// The library's request for C params.
unsafe fn request(p: &t2i_request_params) -> Result<Request, Failure> {
    // SAFETY (every block below): pointers in params are valid for the call (the API's contract).
    let mut r = Request::new(unsafe { string(p.prompt, "params.prompt") }?);
    r.negative_prompt = unsafe { optional_string(p.negative_prompt, "params.negative_prompt") }?;
    if p.n_adapters > 0 {
        if p.adapters.is_null() {
            return Err(invalid("params.adapters is NULL but n_adapters is not 0"));
        }
        let adapters = unsafe { std::slice::from_raw_parts(p.adapters, p.n_adapters as usize) };
        for (i, a) in adapters.iter().enumerate() {
            let name = unsafe { string(a.name, &format!("params.adapters[{i}].name")) }?;
            let image = unsafe { image_source(&a.image, &format!("params.adapters[{i}].image")) }?;
            r.adapters.push(AdapterRequest { name, image, weight: a.weight, preprocess: Vec::new() });
        }
    }
    if p.n_controls > 0 {
        if p.controls.is_null() {
            return Err(invalid("params.controls is NULL but n_controls is not 0"));
        }
        let controls = unsafe { std::slice::from_raw_parts(p.controls, p.n_controls as usize) };
        for (i, c) in controls.iter().enumerate() {
            let what = format!("params.controls[{i}]");
            let name = unsafe { string(c.name, &format!("{what}.name")) }?;
            let image = unsafe { image_source(&c.image, &format!("{what}.image")) }?;
            let preprocess = match unsafe { optional_string(c.preprocess, &format!("{what}.preprocess")) }? {
                Some(ops) if !ops.is_empty() => {
                    ops.split(',').map(str::parse::<Preprocess>).collect::<t2i_rt::Result<_>>()?
                }
                _ => Vec::new(),
            };
            r.controls.push(ControlRequest { name, image, scale: c.scale, preprocess });
        }
    }
    r.control_start = p.control_start;
    r.control_end = p.control_end;
    r.guess_mode = p.guess_mode;
    r.cond_tau = p.cond_tau;
    r.steps = p.steps as usize;
    r.guidance = p.guidance;
    r.guidance_rescale = p.guidance_rescale;
    r.scheduler = match unsafe { optional_string(p.scheduler, "params.scheduler") }? {
        Some(name) => Some(name.parse::<SchedulerKind>()?),
        None => None,
    };
    if let Some(json) = unsafe { optional_string(p.scheduler_options_json, "params.scheduler_options_json") }? {
        r.scheduler_options = match serde_json::from_str::<serde_json::Value>(&json) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Err(invalid(format!("params.scheduler_options_json {json:?} is not a JSON object"))),
        };
    }
    r.eta = p.eta;
    r.seed = p.seed;
    r.rng = match p.rng {
        T2I_RNG_FAST => RngKind::Fast,
        T2I_RNG_TORCH_CPU => RngKind::TorchCpu,
        T2I_RNG_TORCH_CPU_DEFAULT => RngKind::TorchCpuDefault,
        other => return Err(invalid(format!("params.rng {other} is not a T2I_RNG_* value"))),
    };
    r.n_samples = p.n_samples as usize;
    r.width = (p.width > 0).then_some(p.width);
    r.height = (p.height > 0).then_some(p.height);
    if let Some(init) = unsafe { p.init_image.as_ref() } {
        r.init_image = Some(unsafe { image_source(init, "params.init_image") }?);
    }
    if let Some(mask) = unsafe { p.mask.as_ref() } {
        r.mask = Some(unsafe { image_source(mask, "params.mask") }?);
    }
    if let Some(ip) = unsafe { p.ip_image.as_ref() } {
        r.ip_image = Some(unsafe { image_source(ip, "params.ip_image") }?);
    }
    r.ip_scale = p.ip_scale;
    if p.n_styles > 0 {
        if p.styles.is_null() {
            return Err(invalid("params.styles is NULL but n_styles is not 0"));
        }
        let styles = unsafe { std::slice::from_raw_parts(p.styles, p.n_styles as usize) };
        for (i, style) in styles.iter().enumerate() {
            let image = unsafe { image_source(&style.image, &format!("params.styles[{i}].image")) }?;
            r.styles.push(StyleRequest { image, weight: style.weight });
        }
    }
    r.style_cond_tau = p.style_cond_tau;
    r.strength = (p.strength >= 0.0 || p.strength.is_nan()).then_some(p.strength);
    Ok(r)
}

/// Runs one request on `ctx` and puts its images (and latents, with `want_latents`) in `*out`.
/// Blocks until done, cancelled by the context's progress callback, or failed.
///
/// # Safety
/// `ctx` came from `t2i_ctx_new` and is used by one thread at a time; `params` was filled by
/// `t2i_request_params_init` and its pointers are valid for the call; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn t2i_generate(
    ctx: *mut t2i_ctx,
    params: *const t2i_request_params,
    out: *mut *mut t2i_result,
) -> t2i_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: writable (contract); cleared first so a failure leaves NULL.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or a live context used by this thread only (contract).
        let ctx = unsafe { ctx.as_mut() }.ok_or_else(|| invalid("ctx is NULL"))?;
        // SAFETY: the contract above.
        let params = unsafe { read_params(params, "params") }?;
        // SAFETY: the contract above.
        let request = unsafe { request(&params) }?;
        let (progress, user_data) = (ctx.progress, ctx.progress_user_data);
        let generation = ctx.pipeline.run(&request, &mut |p| match progress {
            // SAFETY: the caller's callback with its own user data (t2i_progress_fn's contract).
            Some(f) => unsafe { f(user_data, p.step as u32, p.total as u32) },
            None => true,
        })?;
        let result =
            t2i_result { images: generation.images, latents: params.want_latents.then_some(generation.latents) };
        // SAFETY: writable (checked above).
        unsafe { out.write(Box::into_raw(Box::new(result))) };
        Ok(())
    })
}

/// How many images `result` holds (n_samples of the request); 0 for NULL.
///
/// # Safety
/// `result` is NULL or came from `t2i_generate`.
#[no_mangle]
pub unsafe extern "C" fn t2i_result_image_count(result: *const t2i_result) -> u32 {
    // SAFETY: NULL or a live result (contract).
    unsafe { result.as_ref() }.map_or(0, |r| r.images.len() as u32)
}

/// Image `index` of `result` as an RGB8 view, valid until the result is freed.
///
/// # Safety
/// `result` came from `t2i_generate`; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn t2i_result_image(
    result: *const t2i_result,
    index: u32,
    out: *mut t2i_image_view,
) -> t2i_status {
    guard(|| {
        // SAFETY: NULL or a live result (contract).
        let result = unsafe { result.as_ref() }.ok_or_else(|| invalid("result is NULL"))?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let image = result.images.get(index as usize).ok_or_else(|| {
            invalid(format!("image index {index} is out of range: the result holds {}", result.images.len()))
        })?;
        let view = t2i_image_view { width: image.width(), height: image.height(), channels: 3, pixels: image.as_ptr() };
        // SAFETY: writable (checked above).
        unsafe { out.write(view) };
        Ok(())
    })
}

/// The final latents of `result`, valid until it is freed; `T2I_ERR_INVALID_ARGUMENT` when the
/// request did not ask for them (`want_latents`).
///
/// # Safety
/// `result` came from `t2i_generate`; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn t2i_result_latents(result: *const t2i_result, out: *mut t2i_latents_view) -> t2i_status {
    guard(|| {
        // SAFETY: NULL or a live result (contract).
        let result = unsafe { result.as_ref() }.ok_or_else(|| invalid("result is NULL"))?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let latents = result.latents.as_ref().ok_or_else(|| invalid("the request did not set want_latents"))?;
        if !latents.is_standard_layout() {
            return Err(Failure(t2i_status::T2I_ERR_INTERNAL, "latents are not in C order".into()));
        }
        let s = latents.shape();
        let view =
            t2i_latents_view { shape: [s[0] as u32, s[1] as u32, s[2] as u32, s[3] as u32], data: latents.as_ptr() };
        // SAFETY: writable (checked above).
        unsafe { out.write(view) };
        Ok(())
    })
}

/// Frees a result and every view into it.
///
/// # Safety
/// `result` is NULL or came from `t2i_generate` and is not used after this call.
#[no_mangle]
pub unsafe extern "C" fn t2i_result_free(result: *mut t2i_result) {
    if !result.is_null() {
        // SAFETY: from Box::into_raw in t2i_generate, freed once (contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(result) })));
    }
}

/// Writes an RGB8 image (e.g. a `t2i_result_image` view) as a PNG file, atomically: the file is
/// whole or absent. The same encoder as `t2i-rt run`, so the same pixels give the same bytes.
///
/// # Safety
/// `image` points to a view whose pixels hold `width × height × 3` bytes; `path` is a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn t2i_write_png(image: *const t2i_image_view, path: *const c_char) -> t2i_status {
    guard(|| {
        // SAFETY: NULL or a valid view (contract).
        let image = unsafe { image.as_ref() }.ok_or_else(|| invalid("image is NULL"))?;
        // SAFETY: the contract above.
        let path = unsafe { string(path, "path") }?;
        if image.channels != 3 || image.pixels.is_null() {
            return Err(invalid("image must be an RGB8 view (channels 3) with pixels"));
        }
        let len = (image.width as usize) * (image.height as usize) * 3;
        // SAFETY: the view's pixels hold width × height × 3 bytes (contract).
        let pixels = unsafe { std::slice::from_raw_parts(image.pixels, len) }.to_vec();
        let rgb = RgbImage::from_raw(image.width, image.height, pixels)
            .ok_or_else(|| invalid("image size does not match its pixels"))?;
        t2i_rt::output::write_png(path.as_ref(), &rgb)?;
        Ok(())
    })
}
