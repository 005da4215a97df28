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

    /// A runtime's shared library (ONNX Runtime, OpenVINO) could not be found, loaded or started;
    /// the message names which and how to install it.
    #[error("{0}")]
    RuntimeLibrary(String),

    /// A GPU execution provider cannot start (library without it, no driver or GPU, missing CUDA or
    /// TensorRT libraries).
    #[error("{backend}: {message}")]
    Provider { backend: &'static str, message: String },

    /// A backend failed to load or run a graph.
    #[error("{backend} backend, graph {graph}: {message}")]
    Backend { backend: &'static str, graph: String, message: String },

    /// A request field is out of range, malformed, or does not fit this graph set (a size that is
    /// not a multiple of the set's, an adapter it does not have). `field` names the field to fix.
    #[error("invalid request ({field}): {message}")]
    InvalidRequest { field: Field, message: String },

    /// Load or build options that contradict each other or the backend (a GPU ordinal for the CPU
    /// backend, zero threads).
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// The graph set or backend cannot do what was asked, whatever the request's values: img2img
    /// with a set that has no VAE encoder, fp16 graphs on tract, an engine cache for tract.
    #[error("not supported: {0}")]
    Unsupported(String),

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

    /// A request (or a file it names) is larger than one of the [`Limits`](crate::Limits) the model
    /// was loaded with; nothing was allocated for it. `limit` is the field of `Limits` to raise.
    #[error("{what} is {value}, over the limit of {max} (limits.{limit}); {fix}")]
    LimitExceeded { what: String, value: u64, max: u64, limit: &'static str, fix: &'static str },

    /// A graph or the sampler produced NaN or infinity during a run. The run stops there: no image
    /// is made from it.
    #[error("{stage} produced NaN or infinity: {}", stage.fix())]
    NumericalFault { stage: Stage },
}

impl Error {
    /// An [`Error::InvalidRequest`] about `field`.
    pub fn request(field: Field, message: impl Into<String>) -> Error {
        Error::InvalidRequest { field, message: message.into() }
    }

    /// A stable number for each kind of error, for status codes across an FFI boundary. Codes are
    /// never reused; new kinds get new numbers.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Io { .. } => ErrorCode::Io,
            Error::GraphSet { .. } => ErrorCode::GraphSet,
            Error::RuntimeLibrary(_) => ErrorCode::RuntimeLibrary,
            Error::Provider { .. } => ErrorCode::Provider,
            Error::Backend { .. } => ErrorCode::Backend,
            Error::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            Error::InvalidOptions(_) => ErrorCode::InvalidOptions,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::Image { .. } => ErrorCode::Image,
            Error::Npy { .. } => ErrorCode::Npy,
            Error::Scheduler { .. } => ErrorCode::Scheduler,
            Error::Tokenizer(_) => ErrorCode::Tokenizer,
            Error::Cancelled => ErrorCode::Cancelled,
            Error::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            Error::NumericalFault { .. } => ErrorCode::NumericalFault,
        }
    }
}

/// [`Error::code`]: one number per error kind (0 is success in a C API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Io = 1,
    GraphSet = 2,
    RuntimeLibrary = 3,
    Provider = 4,
    Backend = 5,
    InvalidRequest = 6,
    InvalidOptions = 7,
    Unsupported = 8,
    Image = 9,
    Npy = 10,
    Scheduler = 11,
    Tokenizer = 12,
    Cancelled = 13,
    LimitExceeded = 14,
    NumericalFault = 15,
}

/// The request field an [`Error::InvalidRequest`] is about ([`Request`](crate::Request)'s field
/// names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Prompt,
    NegativePrompt,
    /// `width` and `height`.
    Size,
    NSamples,
    Steps,
    Guidance,
    GuidanceRescale,
    CondTau,
    Eta,
    /// `scheduler` and `scheduler_options`.
    Scheduler,
    Rng,
    Latents,
    /// An entry of `adapters`: its name, weight or condition image.
    Adapters,
    /// An entry of `controls`: its ControlNet name, scale or control image.
    Controls,
    /// `control_start` and `control_end`.
    ControlRange,
    GuessMode,
    /// `--preprocess`: the operation, or which condition it applies to.
    Preprocess,
    SizeConditioning,
    InitImage,
    Mask,
    Strength,
    /// `ip_image`: the IP-Adapter reference image, or a set without an IP-Adapter.
    IpImage,
    /// `ip_scale`.
    IpScale,
    /// An entry of `styles`: its image or weight, their count, or a set without a style adapter.
    Styles,
    /// `style_cond_tau`.
    StyleCondTau,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Field::Prompt => "prompt",
            Field::NegativePrompt => "negative_prompt",
            Field::Size => "width/height",
            Field::NSamples => "n_samples",
            Field::Steps => "steps",
            Field::Guidance => "guidance",
            Field::GuidanceRescale => "guidance_rescale",
            Field::CondTau => "cond_tau",
            Field::Eta => "eta",
            Field::Scheduler => "scheduler",
            Field::Rng => "rng",
            Field::Latents => "latents",
            Field::Adapters => "adapters",
            Field::Controls => "controls",
            Field::ControlRange => "control_start/control_end",
            Field::GuessMode => "guess_mode",
            Field::Preprocess => "preprocess",
            Field::SizeConditioning => "size_cond",
            Field::InitImage => "init_image",
            Field::Mask => "mask",
            Field::Strength => "strength",
            Field::IpImage => "ip_image",
            Field::IpScale => "ip_scale",
            Field::Styles => "styles",
            Field::StyleCondTau => "style_cond_tau",
        })
    }
}

/// `Err(NumericalFault)` at `stage` when any value of `outputs` is NaN or infinite. A scan costs
/// far less than the graph call that made the values (one pass over its output).
pub(crate) fn check_finite(outputs: &[ndarray::ArrayD<f32>], stage: impl FnOnce() -> Stage) -> Result<()> {
    if outputs.iter().any(|o| o.iter().any(|v| !v.is_finite())) {
        return Err(Error::NumericalFault { stage: stage() });
    }
    Ok(())
}

/// Where in a run a value went non-finite ([`Error::NumericalFault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// The named text encoder graph.
    TextEncoder(String),
    /// The named adapter graph.
    Adapter(String),
    /// The named ControlNet's residuals at model call `step` (1-based) of `total`.
    ControlNet { name: String, step: usize, total: usize },
    /// The UNet's noise prediction at model call `step` (1-based) of `total`.
    Unet { step: usize, total: usize },
    /// Classifier-free guidance (`uncond + scale × (cond − uncond)`) at model call `step` of `total`.
    Guidance { step: usize, total: usize },
    /// The sampler's update at step `step` (1-based) of `total`.
    Sampler { step: usize, total: usize },
    /// The VAE decoder graph.
    VaeDecoder,
    /// The VAE encoder graph (img2img and inpainting).
    VaeEncoder,
    /// The named IP-Adapter graph (`image_encoder`, `image_projection`).
    IpAdapter(String),
    /// The named style-adapter graph (`style_encoder`, `style_adapter`).
    StyleAdapter(String),
}

impl Stage {
    /// What usually causes a non-finite value at this stage, and what to do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Stage::TextEncoder(_) => {
                "the text encoder graph is broken or overflows in fp16; export the text encoder in fp32"
            }
            Stage::Adapter(_) => {
                "the adapter graph is broken or overflows in fp16; export the adapter in fp32, or lower its weight"
            }
            Stage::ControlNet { .. } => {
                "the ControlNet graph is broken or overflows in fp16; export the ControlNet in fp32, or lower its \
                 scale"
            }
            Stage::Unet { .. } => {
                "the UNet overflowed (fp16 graphs, or very large latents or guidance); use the fp32 graph set, \
                 lower the guidance, or check the initial latents"
            }
            Stage::Guidance { .. } => "the guidance scale is too large; lower it (7.5 is typical)",
            Stage::Sampler { .. } => {
                "the denoising diverged; lower the guidance, and check the scheduler options (e.g. \
                 prediction_type, timestep_spacing) against the checkpoint"
            }
            Stage::VaeDecoder => "keep the decoder fp32 or export an fp16-safe VAE (e.g. sdxl-vae-fp16-fix)",
            Stage::VaeEncoder => "keep the encoder fp32 or export an fp16-safe VAE (e.g. sdxl-vae-fp16-fix)",
            Stage::IpAdapter(_) => "the IP-Adapter graph is broken or overflows in fp16; export it in fp32",
            Stage::StyleAdapter(_) => "the style adapter graph is broken or overflows in fp16; export it in fp32",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::TextEncoder(name) => write!(f, "the text encoder {name}"),
            Stage::Adapter(name) => write!(f, "adapter {name}"),
            Stage::ControlNet { name, step, total } => {
                write!(f, "ControlNet {name} (model call {step} of {total})")
            }
            Stage::Unet { step, total } => write!(f, "the UNet (model call {step} of {total})"),
            Stage::Guidance { step, total } => write!(f, "classifier-free guidance (model call {step} of {total})"),
            Stage::Sampler { step, total } => write!(f, "the sampler (step {step} of {total})"),
            Stage::VaeDecoder => f.write_str("the VAE decoder"),
            Stage::VaeEncoder => f.write_str("the VAE encoder"),
            Stage::IpAdapter(graph) => write!(f, "the IP-Adapter's {graph}"),
            Stage::StyleAdapter(graph) => write!(f, "the style adapter's {graph}"),
        }
    }
}

/// Shorthand for results of this library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
