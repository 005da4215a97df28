//! The pipeline owns the whole request: tokenize → text encoder → adapters (once) → denoising loop
//! with classifier-free guidance → VAE decode. It follows diffusers'
//! `StableDiffusionAdapterPipeline.__call__` (pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py)
//! step for step, plus `cond_tau` with the semantics of `StableDiffusionXLAdapterPipeline`'s
//! `adapter_conditioning_factor`: with `cond_tau < 1`, residuals only for model calls
//! `i < int(steps × cond_tau)`; with `cond_tau = 1`, for every call, as the SD 1.x pipeline does.
//!
//! SD 1.x, SD 2.x and SDXL run through this one loop: how many text encoders there are, which of
//! their outputs form `encoder_hidden_states`, whether the UNet takes SDXL's `text_embeds` and
//! `time_ids` (`StableDiffusionXLAdapterPipeline`), and whether a missing negative prompt means zero
//! embeddings all come from the manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array4, ArrayD, Axis, IxDyn};
use serde_json::{Map, Value};

use crate::adapter::{round_to, AdapterRequest, AdapterSet, ConditionSource};
use crate::backend::{Backend, BackendKind, BackendSettings, CacheUse, Graph, GraphLoad, GraphSession, TensorView};
use crate::engine::{BatchRule, Profile, ShapeRanges, DEFAULT_CACHE_DIR};
use crate::error::{check_finite, Error, Result, Stage};
use crate::limits::Limits;
use crate::manifest::{GraphSpec, Manifest, ResidualSlot, TextEncoderSpec};
use crate::output::decoder_output_to_images;
use crate::rng::RngKind;
use crate::scheduler::{randn, Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::PromptTokenizer;

/// How to load a graph set.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub backend: BackendKind,
    /// Hash every file and compare with the manifest (catches truncated or swapped files).
    pub verify_checksums: bool,
    /// Threads, GPU, CPU fallback and TensorRT precision (see [`BackendSettings`]).
    pub settings: BackendSettings,
    /// Where `t2i-rt build-engine` puts prepared engines and `run` looks for them.
    pub engine_cache: EngineCache,
    /// How large a request may be; every request on the model is checked against them.
    pub limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: BackendKind::OrtCpu,
            verify_checksums: true,
            settings: BackendSettings::default(),
            engine_cache: EngineCache::InGraphSet,
            limits: Limits::default(),
        }
    }
}

/// The engine cache a load reads (see [`crate::engine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineCache {
    /// `.t2i-engines/` inside the graph set.
    InGraphSet,
    Dir(PathBuf),
    /// Neither read nor written.
    Off,
}

impl EngineCache {
    fn root(&self, set_dir: &Path) -> Option<PathBuf> {
        match self {
            EngineCache::InGraphSet => Some(set_dir.join(DEFAULT_CACHE_DIR)),
            EngineCache::Dir(dir) => Some(dir.clone()),
            EngineCache::Off => None,
        }
    }
}

/// One graph `t2i-rt build-engine` prepared, and how long that took.
#[derive(Debug, Clone)]
pub struct BuiltEngine {
    pub graph: String,
    pub seconds: f64,
}

/// One generation request. [`Request::new`] gives diffusers' defaults.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// `None` is the empty prompt, as in diffusers.
    pub negative_prompt: Option<String>,
    pub adapters: Vec<AdapterRequest>,
    /// Fraction of the steps that get adapter residuals, in [0, 1] (diffusers'
    /// `adapter_conditioning_factor`): 1 is every model call; below 1, the calls with index
    /// `i < int(steps × cond_tau)`, computed as Python does from the decimal value (0.7 × 10 is 7).
    /// Samplers with two model calls per step (Heun) count calls, as diffusers' loop does.
    pub cond_tau: f32,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at ≤ 1 (one UNet batch half instead of two).
    pub guidance: f32,
    /// diffusers' `guidance_rescale` (arXiv 2305.08891 §3.4), in [0, 1]: 0 is plain guidance; 0.7
    /// is the paper's value for zero-terminal-SNR models. Only applies with guidance on.
    pub guidance_rescale: f32,
    /// The sampler; `None` runs the graph set's own (its scheduler config's class, exactly as
    /// configured), as a diffusers pipeline does ([`SchedulerConfig::checkpoint_kind`]).
    pub scheduler: Option<SchedulerKind>,
    /// diffusers scheduler config keys that override the graph set's scheduler config for this
    /// request, like `XScheduler.from_config(config, **options)`: e.g. `"use_karras_sigmas": true`,
    /// `"timestep_spacing": "trailing"`. Values are checked when the scheduler is built.
    pub scheduler_options: Map<String, Value>,
    /// DDIM's `eta` (≥ 0; 0 is deterministic). Ignored by the other samplers, as in diffusers.
    pub eta: f32,
    /// Seeds the initial noise (when `latents` is `None`) and any stochastic sampler, through
    /// the generator `rng` names.
    pub seed: u64,
    /// Which generator `seed` drives: the runtime's own (default), or torch's CPU generator, so
    /// that a seed gives what diffusers gives with `generator=torch.Generator("cpu").manual_seed(seed)`
    /// (see [`RngKind`]). One generator per run: first the initial latents (unless `latents` is
    /// given, as diffusers skips that draw too), then each stochastic sampler step's noise.
    pub rng: RngKind,
    /// Images per prompt (diffusers' `num_images_per_prompt`).
    pub n_samples: usize,
    /// Image size; `None` as diffusers: the first condition image's, else the manifest's
    /// `default_size` (see [`Request::size`]).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Initial noise [n_samples, C, H/8, W/8], exactly as diffusers' `latents=` (before it is
    /// scaled by the scheduler's `init_noise_sigma`).
    pub latents: Option<Array4<f32>>,
    /// SDXL's size/crop conditioning (`time_ids`); ignored by graph sets without it.
    pub size_cond: SizeConditioning,
}

/// SDXL's micro-conditioning, with diffusers' names and defaults
/// (`StableDiffusionXLAdapterPipeline.__call__`). Pairs are (height, width) and (top, left) as in
/// diffusers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizeConditioning {
    /// Default: the output (height, width).
    pub original_size: Option<(u32, u32)>,
    /// Default: (0, 0).
    pub crops_coords_top_left: (u32, u32),
    /// Default: the output (height, width).
    pub target_size: Option<(u32, u32)>,
    /// Used for the unconditional half only when both negative sizes are given (diffusers);
    /// otherwise the negative time ids equal the positive ones.
    pub negative_original_size: Option<(u32, u32)>,
    pub negative_crops_coords_top_left: (u32, u32),
    pub negative_target_size: Option<(u32, u32)>,
}

impl SizeConditioning {
    /// `(positive, negative)` time ids: original_size + crops_coords_top_left + target_size.
    pub fn time_ids(&self, width: u32, height: u32) -> ([f32; 6], [f32; 6]) {
        let ids = |o: (u32, u32), c: (u32, u32), t: (u32, u32)| [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f32);
        let output = (height, width);
        let positive =
            ids(self.original_size.unwrap_or(output), self.crops_coords_top_left, self.target_size.unwrap_or(output));
        let negative = match (self.negative_original_size, self.negative_target_size) {
            (Some(o), Some(t)) => ids(o, self.negative_crops_coords_top_left, t),
            _ => positive,
        };
        (positive, negative)
    }
}

impl Request {
    pub fn new(prompt: impl Into<String>) -> Self {
        Request {
            prompt: prompt.into(),
            negative_prompt: None,
            adapters: Vec::new(),
            cond_tau: 1.0,
            steps: 50,
            guidance: 7.5,
            guidance_rescale: 0.0,
            scheduler: None,
            scheduler_options: Map::new(),
            eta: 0.0,
            seed: 0,
            rng: RngKind::default(),
            n_samples: 1,
            width: None,
            height: None,
            latents: None,
            size_cond: SizeConditioning::default(),
        }
    }

    /// The output size, as diffusers picks it: a missing width or height comes from the first
    /// adapter's condition image when there are adapters (`StableDiffusion(XL)AdapterPipeline.
    /// _default_height_width`), else from the graph set's `default_size` (the UNet's sample size).
    /// diffusers rounds an image side down to the adapter's pixel-unshuffle factor, which divides
    /// the set's size multiple; a side that is not already such a multiple would give a size this
    /// set cannot draw (or one other than diffusers'), so it is an error naming the fix.
    pub fn size(&self, m: &Manifest) -> Result<(u32, u32)> {
        if let (Some(w), Some(h)) = (self.width, self.height) {
            return Ok((w, h));
        }
        let Some(first) = self.adapters.first() else {
            return Ok((self.width.unwrap_or(m.default_size[0]), self.height.unwrap_or(m.default_size[1])));
        };
        let (iw, ih) = match &first.image {
            ConditionSource::File(path) => image::image_dimensions(path)
                .map_err(|e| Error::Image { path: path.clone(), message: e.to_string() })?,
            ConditionSource::Pixels(image) => (image.width(), image.height()),
        };
        let pick = |given: Option<u32>, side: u32, flag: &str| -> Result<u32> {
            match given {
                Some(v) => Ok(v),
                None if side > 0 && side.is_multiple_of(m.size_multiple) => Ok(side),
                None => Err(Error::InvalidRequest(format!(
                    "no {flag} given, so it comes from the first condition image ({iw}x{ih}, as diffusers' adapter \
                     pipelines do), which is not a multiple of {}; pass --width and --height (e.g. {}x{})",
                    m.size_multiple,
                    round_to(iw.max(1), m.size_multiple),
                    round_to(ih.max(1), m.size_multiple)
                ))),
            }
        };
        Ok((pick(self.width, iw, "--width")?, pick(self.height, ih, "--height")?))
    }

    /// Checks this request against a graph set's manifest and `limits` without running anything:
    /// sizes, counts and lengths against the limits first (nothing is allocated for a request that
    /// exceeds one), then steps, guidance, cond_tau, latents shape and values, sampler configuration,
    /// adapter names, weights and condition images. The result carries what the run needs.
    pub fn check(&self, m: &Manifest, limits: &Limits) -> Result<Checked> {
        let request = self;
        limits.check_steps(request.steps)?;
        limits.check_adapters(request.adapters.len())?;
        limits.check_prompt("prompt", &request.prompt)?;
        if let Some(negative) = &request.negative_prompt {
            limits.check_prompt("negative prompt", negative)?;
        }
        let (width, height) = request.size(m)?;
        limits.check_images(width, height, request.n_samples)?;
        let multiple = m.size_multiple;
        if width == 0 || height == 0 || !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
            return Err(Error::InvalidRequest(format!(
                "size {width}x{height} is not a multiple of {multiple}, which this graph set needs; try {}x{}",
                round_to(width, multiple),
                round_to(height, multiple)
            )));
        }
        if request.steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if request.n_samples == 0 {
            return Err(Error::InvalidRequest("n_samples must be at least 1".into()));
        }
        if !request.guidance.is_finite() {
            return Err(Error::InvalidRequest(format!("guidance {} is not a number", request.guidance)));
        }
        if !(0.0..=1.0).contains(&request.cond_tau) {
            return Err(Error::InvalidRequest(format!("cond_tau {} must be in [0, 1]", request.cond_tau)));
        }
        if !(0.0..=1.0).contains(&request.guidance_rescale) {
            return Err(Error::InvalidRequest(format!(
                "guidance_rescale {} must be in [0, 1] (0 is off; 0.7 is typical)",
                request.guidance_rescale
            )));
        }
        if !(request.eta.is_finite() && request.eta >= 0.0) {
            return Err(Error::InvalidRequest(format!("eta {} must be a number ≥ 0", request.eta)));
        }
        if let Some(latents) = &request.latents {
            let ds = m.latent.downscale;
            let expected = [request.n_samples, m.latent.channels, (height / ds) as usize, (width / ds) as usize];
            if latents.shape() != expected {
                return Err(Error::InvalidRequest(format!(
                    "latents have shape {:?}, but {} sample(s) at {width}x{height} need {expected:?} (n_samples, channels, height/{ds}, width/{ds})",
                    latents.shape(),
                    request.n_samples
                )));
            }
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidRequest("latents contain NaN or infinity".into()));
            }
        }
        let (kind, scheduler) = request.sampler(m)?;
        if request.eta != 0.0 && kind != SchedulerKind::Ddim {
            return Err(Error::InvalidRequest(format!(
                "eta only applies to the ddim sampler (diffusers ignores it elsewhere), and this request runs {kind}; \
                 drop eta or choose ddim"
            )));
        }
        let karras = request.scheduler_options.get("use_karras_sigmas").and_then(Value::as_bool) == Some(true);
        if karras && !kind.takes_karras_sigmas() {
            return Err(Error::InvalidRequest(format!(
                "the {kind} sampler ({}) has no Karras sigmas; use them with euler, heun, lms, dpmpp-2m, dpmpp-2m-sde \
                 or unipc",
                kind.diffusers_class()
            )));
        }
        let adapters = AdapterSet::build_within(m, &request.adapters, width, height, limits)?;
        Ok(Checked { width, height, adapters, scheduler })
    }

    /// The sampler this request runs on graph set `m`, built for its steps: the named one, or the
    /// set's own ([`Request::scheduler`]).
    pub fn sampler(&self, m: &Manifest) -> Result<(SchedulerKind, Box<dyn Scheduler>)> {
        let config = self.scheduler_config(m);
        match self.scheduler {
            Some(kind) => Ok((kind, config.build(kind, self.steps)?)),
            None => config.build_checkpoint(self.steps),
        }
    }
}

impl Request {
    /// The graph set's scheduler config with this request's `scheduler_options` and `eta`.
    pub fn scheduler_config(&self, m: &Manifest) -> SchedulerConfig {
        let mut config = SchedulerConfig::new(&m.scheduler);
        for (key, value) in &self.scheduler_options {
            config.set(key, value.clone());
        }
        config.eta = self.eta;
        config
    }
}

/// What a request produces.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Final latents [n_samples, C, h, w], what diffusers returns with `output_type="latent"`.
    pub latents: Array4<f32>,
    /// Decoded images, one per sample.
    pub images: Vec<RgbImage>,
    /// The sampler that ran (the request's, or the graph set's own).
    pub scheduler: SchedulerKind,
    /// Where the time went.
    pub timings: Timings,
}

/// Wall time of each stage of one [`Pipeline::run`]. Per-step entries have one value per model
/// call (`Scheduler::num_steps`).
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Checking the request: sizes, scheduler build, loading and resizing condition images.
    pub prepare: Duration,
    pub tokenize: Duration,
    /// The text encoder graph.
    pub text_encoder: Duration,
    /// The adapter graphs, and summing their weighted features.
    pub adapters: Duration,
    /// The UNet graph, per model call.
    pub unet: Vec<Duration>,
    /// `scale_model_input` + `step`, per model call.
    pub scheduler: Vec<Duration>,
    /// Everything else in the loop, per model call: building the CFG batch, timesteps and
    /// residual inputs, combining the guidance halves, progress.
    pub loop_other: Vec<Duration>,
    /// The VAE decoder graph and conversion to 8-bit images.
    pub vae_decode: Duration,
    pub total: Duration,
}

/// Progress reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps finished, 1-based.
    pub step: usize,
    pub total: usize,
}

/// A loaded graph set: manifest, tokenizer and every graph, loaded once and shared by all workers.
/// `Send + Sync` and cheap to clone (an `Arc`); each worker opens its own [`Pipeline`] from it.
#[derive(Clone)]
pub struct Model(Arc<ModelInner>);

struct ModelInner {
    manifest: Manifest,
    limits: Limits,
    backend: Arc<dyn Backend>,
    /// One tokenizer per text encoder, in manifest order.
    tokenizers: Vec<PromptTokenizer>,
    text_encoders: Vec<Arc<dyn Graph>>,
    unet: Arc<dyn Graph>,
    vae_decoder: Arc<dyn Graph>,
    /// The manifest's adapters, in manifest order.
    adapters: Vec<Arc<dyn Graph>>,
}

impl Model {
    /// Loads the graph set in `dir`: checks the manifest, loads every graph on the backend and
    /// checks each graph's real inputs and outputs against the manifest.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Model> {
        let manifest = Manifest::load(dir, options.verify_checksums)?;
        Model::from_manifest(manifest, options)
    }

    /// Loads the graphs of an already loaded manifest (e.g. after checking a request against it with
    /// [`Request::check`], so that a bad request fails before seconds of graph loading).
    pub fn from_manifest(manifest: Manifest, options: &LoadOptions) -> Result<Model> {
        if options.backend == BackendKind::Tract {
            if let Some((name, _, _)) = set_graphs(&manifest).into_iter().find(|(_, spec, _)| spec.precision == "fp16")
            {
                // tract 0.23 mistypes fp16 Gemm (the UNet's time embedding) while planning.
                return Err(Error::InvalidRequest(format!(
                    "tract cannot run fp16 graphs ({name} in {} is fp16); use the fp32 graph set with tract, or \
                     --backend ort-cpu",
                    manifest.dir.display()
                )));
            }
        }
        let backend = options.backend.create_with(&options.settings)?;
        let tokenizers = manifest
            .text_encoders
            .iter()
            .map(|e| PromptTokenizer::load(&manifest.resolve(&e.tokenizer.file)?, &e.tokenizer))
            .collect::<Result<Vec<_>>>()?;
        let root = options.engine_cache.root(&manifest.dir);
        let mut graphs = set_graphs(&manifest)
            .into_iter()
            .map(|(name, spec, _)| {
                let path = manifest.resolve(&spec.file)?;
                let cache = root.as_deref().map(|root| CacheUse { root, build: false, shapes: None });
                let graph = backend.load_graph(&GraphLoad { name: &name, path: &path, spec, cache })?;
                spec.check_io(&name, graph.inputs(), graph.outputs())
                    .map_err(|message| Error::GraphSet { dir: manifest.dir.clone(), message })?;
                Ok(graph)
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        // `set_graphs` order: text encoders, unet, vae_decoder, adapters.
        let text_encoders: Vec<_> = graphs.by_ref().take(manifest.text_encoders.len()).collect();
        let (unet, vae_decoder) = (graphs.next().expect("unet"), graphs.next().expect("vae_decoder"));
        let adapters = graphs.collect();
        let limits = options.limits;
        Ok(Model(Arc::new(ModelInner {
            manifest,
            limits,
            backend,
            tokenizers,
            text_encoders,
            unet,
            vae_decoder,
            adapters,
        })))
    }

    /// `t2i-rt build-engine`: prepares every graph of the set in `dir` for `options.backend` into
    /// the engine cache (replacing what it held for the same key), for TensorRT with shape
    /// `profiles` (at least one). `progress` is told each graph's name before it is built.
    pub fn build_engines(
        dir: &Path,
        options: &LoadOptions,
        profiles: &[Profile],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<BuiltEngine>> {
        if options.backend == BackendKind::Tract {
            return Err(Error::InvalidRequest(
                "tract has no engine cache: it plans each graph for the request's shapes when it first runs".into(),
            ));
        }
        if options.backend == BackendKind::OrtTrt && profiles.is_empty() {
            return Err(Error::InvalidRequest(
                "ort-trt needs at least one --profile WxH[:MIN-MAX] (the sizes and batch range the engines serve)"
                    .into(),
            ));
        }
        let manifest = Manifest::load(dir, options.verify_checksums)?;
        let root = options.engine_cache.root(&manifest.dir).ok_or_else(|| {
            Error::InvalidRequest("build-engine needs an engine cache; drop the option that turns it off".into())
        })?;
        for p in profiles {
            if p.width % manifest.size_multiple != 0 || p.height % manifest.size_multiple != 0 {
                return Err(Error::InvalidRequest(format!(
                    "profile {p}: width and height must be multiples of {} for this graph set",
                    manifest.size_multiple
                )));
            }
        }
        let backend = options.backend.create_with(&options.settings)?;
        let mut built = Vec::new();
        for (name, spec, rule) in set_graphs(&manifest) {
            progress(&name);
            let start = Instant::now();
            let shapes = if options.backend == BackendKind::OrtTrt {
                Some(ShapeRanges::for_graph(&name, spec, rule, manifest.latent.downscale, profiles)?)
            } else {
                None
            };
            let path = manifest.resolve(&spec.file)?;
            let cache = Some(CacheUse { root: &root, build: true, shapes });
            backend.load_graph(&GraphLoad { name: &name, path: &path, spec, cache })?;
            built.push(BuiltEngine { graph: name, seconds: start.elapsed().as_secs_f64() });
        }
        Ok(built)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.0.manifest
    }

    /// The bounds every request on this model is checked against ([`LoadOptions::limits`]).
    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// The backend's name (`ort-cpu`, `tract`).
    pub fn backend_name(&self) -> &'static str {
        self.0.backend.name()
    }

    /// Opens one worker's sessions. The first worker reuses the sessions built while loading; on
    /// ort every further worker builds its own sessions (ONNX Runtime keeps weights per session).
    pub fn pipeline(&self) -> Result<Pipeline> {
        let m = &self.0;
        Ok(Pipeline {
            model: self.clone(),
            text_encoders: m.text_encoders.iter().map(|g| g.session()).collect::<Result<Vec<_>>>()?,
            unet: m.unet.session()?,
            vae_decoder: m.vae_decoder.session()?,
            adapters: m.adapters.iter().map(|g| g.session()).collect::<Result<Vec<_>>>()?,
        })
    }
}

/// Every graph of a set ([`Manifest::graph_specs`]: text encoders, unet, vae_decoder, adapters),
/// with how the pipeline batches it.
fn set_graphs(manifest: &Manifest) -> Vec<(String, &GraphSpec, BatchRule)> {
    let rule = |name: &str| match name {
        "unet" => BatchRule::GuidedSamples,
        "vae_decoder" => BatchRule::Samples,
        _ if name.starts_with("adapter_") => BatchRule::One,
        _ => BatchRule::Prompts,
    };
    manifest
        .graph_specs()
        .into_iter()
        .map(|(name, spec)| {
            let batch = rule(&name);
            (name, spec, batch)
        })
        .collect()
}

/// One worker: a [`Model`] with its own sessions, running one request at a time. `Send`, so a
/// worker can move between threads; open one per concurrent request.
pub struct Pipeline {
    model: Model,
    /// Sessions for the manifest's text encoders, in manifest order.
    text_encoders: Vec<Box<dyn GraphSession>>,
    unet: Box<dyn GraphSession>,
    vae_decoder: Box<dyn GraphSession>,
    /// Sessions for the manifest's adapters, in manifest order.
    adapters: Vec<Box<dyn GraphSession>>,
}

impl Pipeline {
    /// Loads the graph set in `dir` and opens one worker on it ([`Model::load`] then
    /// [`Model::pipeline`]).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Pipeline> {
        Model::load(dir, options)?.pipeline()
    }

    /// The shared model this worker runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn manifest(&self) -> &Manifest {
        self.model.manifest()
    }

    /// The backend's name (`ort-cpu`, `tract`).
    pub fn backend_name(&self) -> &'static str {
        self.model.backend_name()
    }

    /// Token ids for `prompt` with the first text encoder's tokenizer, padded and truncated to the
    /// manifest's `max_length`.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<i64>> {
        self.model.0.tokenizers[0].encode(prompt)
    }

    /// Runs one request. `progress` is called after every step; returning `false` cancels the run
    /// with [`Error::Cancelled`].
    pub fn run(&mut self, request: &Request, progress: &mut dyn FnMut(Progress) -> bool) -> Result<Generation> {
        let start = Instant::now();
        let mut timings = Timings::default();
        let model = self.model.clone();
        let manifest = model.manifest();
        let Checked { width, height, adapters, mut scheduler } = request.check(manifest, &model.0.limits)?;
        let kind = scheduler.kind();
        let n = request.n_samples;
        let mut noise = request.rng.generator(request.seed);
        timings.prepare = start.elapsed();

        // Text: [negative × n, prompt × n] with guidance, [prompt × n] without (diffusers' order).
        // With `force_zeros_for_empty_prompt` and no negative prompt, the negative row is zeros.
        let guided = request.guidance > 1.0;
        let zero_negative = guided && request.negative_prompt.is_none() && manifest.force_zeros_for_empty_prompt;
        let negative = request.negative_prompt.as_deref().unwrap_or("");
        let prompts: Vec<&str> =
            if guided && !zero_negative { vec![negative, &request.prompt] } else { vec![&request.prompt] };
        let clock = Instant::now();
        let ids = self.token_ids(&prompts)?;
        timings.tokenize = clock.elapsed();
        let clock = Instant::now();
        let mut embeddings = self.encode_ids(&ids)?;
        timings.text_encoder = clock.elapsed();
        if zero_negative {
            embeddings = embeddings.with_zero_row_first()?;
        }
        let rows: Vec<usize> = (0..if guided { 2 } else { 1 }).flat_map(|i| std::iter::repeat_n(i, n)).collect();
        let text = embeddings.hidden.select(Axis(0), &rows);
        let text_embeds = embeddings.pooled.as_ref().map(|p| p.select(Axis(0), &rows));
        let batch = rows.len();
        // diffusers: `torch.cat([negative_add_time_ids, add_time_ids]).repeat(batch_size * n, 1)`:
        // the [negative, positive] pair is tiled, so for n > 1 rows alternate (unlike the embeddings).
        let time_ids = manifest.added_cond.time_ids.as_ref().map(|_| {
            let (positive, negative) = request.size_cond.time_ids(width, height);
            let pair: Vec<[f32; 6]> = if guided { vec![negative, positive] } else { vec![positive] };
            let values: Vec<f32> = (0..batch).flat_map(|r| pair[r % pair.len()]).collect();
            ArrayD::from_shape_vec(IxDyn(&[batch, 6]), values).expect("batch × 6 values")
        });

        // Adapters run once; their summed features are repeated over the batch like the text.
        let (lh, lw) = ((height / manifest.latent.downscale) as usize, (width / manifest.latent.downscale) as usize);
        let clock = Instant::now();
        let residuals = adapters.residuals(manifest, &mut self.adapters)?;
        timings.adapters = clock.elapsed();
        let residuals: Vec<ArrayD<f32>> = residuals
            .into_iter()
            .zip(&manifest.residual_slots)
            .map(|(features, slot)| match features {
                Some(features) => features.select(Axis(0), &vec![0; batch]),
                None => ArrayD::zeros(IxDyn(&[
                    batch,
                    slot.channels,
                    lh / slot.downscale as usize,
                    lw / slot.downscale as usize,
                ])),
            })
            .collect();
        let zero_residuals: Vec<ArrayD<f32>> = residuals.iter().map(|r| ArrayD::zeros(r.raw_dim())).collect();
        let adapter_steps = adapter_calls(adapters.is_empty(), request.steps, request.cond_tau);

        let channels = manifest.latent.channels;
        let mut latents: ArrayD<f32> = match &request.latents {
            Some(l) => l.clone().into_dyn(),
            // diffusers' prepare_latents: randn_tensor((n, C, H/8, W/8), generator), one draw.
            None => randn(noise.as_mut(), &[n, channels, lh, lw]),
        };
        latents *= scheduler.init_noise_sigma();

        // What stays the same for many steps is bound to the UNet once (on a GPU: copied to the
        // device once): the text conditioning, and the residuals until the adapters' last step.
        let mut constant = vec![("encoder_hidden_states", TensorView::F32(text.view()))];
        if let Some(text_embeds) = &text_embeds {
            constant.push(("text_embeds", TensorView::F32(text_embeds.view())));
        }
        if let Some(time_ids) = &time_ids {
            constant.push(("time_ids", TensorView::F32(time_ids.view())));
        }
        constant.extend(residual_inputs(
            &manifest.residual_slots,
            if adapter_steps > 0 { &residuals } else { &zero_residuals },
        ));
        self.unet.bind(&constant)?;
        let total = scheduler.timesteps().len();
        let unet = &mut self.unet;
        let mut denoise = || -> Result<()> {
            for step in 0..total {
                if step == adapter_steps && adapter_steps > 0 {
                    unet.bind(&residual_inputs(&manifest.residual_slots, &zero_residuals))?;
                }
                let step_start = Instant::now();
                let t = scheduler.timesteps()[step];
                let mut model_input = if guided { concat(&[latents.view(), latents.view()])? } else { latents.clone() };
                let clock = Instant::now();
                scheduler.scale_model_input(&mut model_input, step);
                let mut scheduler_time = clock.elapsed();
                let timestep = ArrayD::from_elem(IxDyn(&[batch]), t);
                let inputs =
                    [("sample", TensorView::F32(model_input.view())), ("timestep", TensorView::F32(timestep.view()))];
                let clock = Instant::now();
                let noise_pred = first(unet.run(&inputs)?, "unet")?;
                let unet_time = clock.elapsed();
                check_finite(std::slice::from_ref(&noise_pred), || Stage::Unet { step: step + 1, total })?;
                let noise_pred = if guided {
                    let uncond = noise_pred.slice_axis(Axis(0), (0..n).into());
                    let cond = noise_pred.slice_axis(Axis(0), (n..2 * n).into());
                    // diffusers: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    let mut guided_noise = &uncond + &((&cond - &uncond) * request.guidance);
                    if request.guidance_rescale > 0.0 {
                        rescale_noise_cfg(&mut guided_noise, cond.view(), request.guidance_rescale);
                    }
                    check_finite(std::slice::from_ref(&guided_noise), || Stage::Guidance { step: step + 1, total })?;
                    guided_noise
                } else {
                    noise_pred
                };
                let clock = Instant::now();
                scheduler.step(noise_pred.view(), step, &mut latents, noise.as_mut())?;
                scheduler_time += clock.elapsed();
                check_finite(std::slice::from_ref(&latents), || Stage::Sampler { step: step + 1, total })?;
                if !progress(Progress { step: step + 1, total }) {
                    return Err(Error::Cancelled);
                }
                timings.unet.push(unet_time);
                timings.scheduler.push(scheduler_time);
                timings.loop_other.push(step_start.elapsed().saturating_sub(unet_time + scheduler_time));
            }
            Ok(())
        };
        let denoised = denoise();
        self.unet.unbind();
        denoised?;

        let latents: Array4<f32> = latents
            .into_dimensionality()
            .map_err(|e| Error::InvalidRequest(format!("latents lost their shape: {e}")))?;
        let clock = Instant::now();
        // Finite latents so large that scaling overflows them: the denoising diverged.
        let images =
            self.decode_or(&latents, || Error::NumericalFault { stage: Stage::Sampler { step: total, total } })?;
        timings.vae_decode = clock.elapsed();
        timings.total = start.elapsed();
        Ok(Generation { latents, images, scheduler: kind, timings })
    }

    /// Decodes final latents into images (diffusers' `decode_latents` + `numpy_to_pil`).
    /// Latents that are not finite once scaled are [`Error::InvalidRequest`]; a decoder that
    /// produces NaN or infinity is [`Error::NumericalFault`] at [`Stage::VaeDecoder`].
    pub fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<RgbImage>> {
        self.decode_or(latents, || {
            Error::InvalidRequest(
                "latents to decode contain NaN or infinity (after scaling by 1 / vae.scaling_factor)".into(),
            )
        })
    }

    /// [`decode`](Self::decode), with `overflow` the error for latents that overflow when scaled.
    fn decode_or(&mut self, latents: &Array4<f32>, overflow: impl FnOnce() -> Error) -> Result<Vec<RgbImage>> {
        let manifest = self.model.manifest();
        // diffusers: `1 / self.vae.config.scaling_factor * latents`, the reciprocal taken in double.
        let scaled = latents * ((1.0 / manifest.vae.scaling_factor) as f32);
        if scaled.iter().any(|v| !v.is_finite()) {
            return Err(overflow());
        }
        let decoded = first(
            self.vae_decoder.run(&[("latent_sample", TensorView::F32(scaled.view().into_dyn()))])?,
            "vae_decoder",
        )?;
        check_finite(std::slice::from_ref(&decoded), || Stage::VaeDecoder)?;
        let decoded: Array4<f32> = decoded.into_dimensionality().map_err(|_| {
            Error::InvalidRequest("vae_decoder output is not 4-dimensional; re-export the graph set".into())
        })?;
        decoder_output_to_images(decoded.view())
    }

    /// Text embeddings for `prompts`: one call per text encoder, their hidden outputs concatenated
    /// on the last axis ([prompts, max_length, ΣD]), and the pooled output the UNet takes, if any.
    pub fn encode_text(&mut self, prompts: &[&str]) -> Result<TextEmbeddings> {
        let ids = self.token_ids(prompts)?;
        self.encode_ids(&ids)
    }

    /// Token ids [prompts, max_length] for `prompts`, one batch per text encoder.
    fn token_ids(&self, prompts: &[&str]) -> Result<Vec<ArrayD<i64>>> {
        self.model
            .0
            .tokenizers
            .iter()
            .map(|tokenizer| {
                let length = tokenizer.max_length();
                let mut ids = Vec::with_capacity(prompts.len() * length);
                for prompt in prompts {
                    ids.extend(tokenizer.encode(prompt)?);
                }
                ArrayD::from_shape_vec(IxDyn(&[prompts.len(), length]), ids)
                    .map_err(|e| Error::Tokenizer(format!("token batch: {e}")))
            })
            .collect()
    }

    /// Runs every text encoder on its token batch (see [`encode_text`](Self::encode_text)).
    fn encode_ids(&mut self, ids: &[ArrayD<i64>]) -> Result<TextEmbeddings> {
        let model = self.model.clone();
        let manifest = model.manifest();
        let mut hidden = Vec::with_capacity(manifest.text_encoders.len());
        let mut pooled = None;
        for (i, (spec, ids)) in manifest.text_encoders.iter().zip(ids).enumerate() {
            let outputs = self.text_encoders[i].run(&[("input_ids", TensorView::I64(ids.view()))])?;
            check_finite(&outputs, || Stage::TextEncoder(spec.name.clone()))?;
            hidden.push(output(spec, outputs.clone(), &spec.hidden_output)?);
            if manifest.added_cond.text_embeds.as_ref() == Some(&spec.name) {
                if let Some(name) = &spec.pooled_output {
                    pooled = Some(output(spec, outputs, name)?);
                }
            }
        }
        let hidden = if hidden.len() == 1 {
            hidden.pop().expect("one encoder")
        } else {
            let views: Vec<_> = hidden.iter().map(|h| h.view()).collect();
            ndarray::concatenate(Axis(hidden[0].ndim() - 1), &views)
                .map_err(|e| Error::InvalidRequest(format!("text encoders' hidden states do not concatenate: {e}")))?
        };
        Ok(TextEmbeddings { hidden, pooled })
    }
}

/// What the text encoders give for a batch of prompts.
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    /// `encoder_hidden_states` rows [prompts, max_length, D].
    pub hidden: ArrayD<f32>,
    /// `text_embeds` rows [prompts, P] when the UNet takes them (SDXL).
    pub pooled: Option<ArrayD<f32>>,
}

impl TextEmbeddings {
    /// Prepends an all-zero row: diffusers' `force_zeros_for_empty_prompt` negative embeddings.
    fn with_zero_row_first(self) -> Result<TextEmbeddings> {
        let prepend = |a: ArrayD<f32>| -> Result<ArrayD<f32>> {
            let zeros = ArrayD::zeros(a.slice_axis(Axis(0), (0..1).into()).raw_dim());
            concat(&[zeros.view(), a.view()])
        };
        Ok(TextEmbeddings { hidden: prepend(self.hidden)?, pooled: self.pooled.map(prepend).transpose()? })
    }
}

/// The output called `name` of a text encoder's run (outputs come in the graph's output order).
fn output(spec: &TextEncoderSpec, outputs: Vec<ArrayD<f32>>, name: &str) -> Result<ArrayD<f32>> {
    let index = spec.graph.outputs.iter().position(|o| o.name == name);
    index.and_then(|i| outputs.into_iter().nth(i)).ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: spec.name.clone(),
        message: format!("graph returned no output {name}; re-export the graph set"),
    })
}

/// A request that passed [`Request::check`]: its image size, adapters and sampler, ready to run.
pub struct Checked {
    pub width: u32,
    pub height: u32,
    pub adapters: AdapterSet,
    /// Built for the request's steps; its [`kind`](crate::scheduler::Scheduler::kind) is what runs.
    pub scheduler: Box<dyn Scheduler>,
}

/// The UNet's adapter-residual inputs for `residuals` (in slot order).
fn residual_inputs<'a>(slots: &'a [ResidualSlot], residuals: &'a [ArrayD<f32>]) -> Vec<(&'a str, TensorView<'a>)> {
    slots.iter().zip(residuals).map(|(s, r)| (s.input.as_str(), TensorView::F32(r.view()))).collect()
}

fn first(outputs: Vec<ArrayD<f32>>, graph: &str) -> Result<ArrayD<f32>> {
    outputs.into_iter().next().ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: graph.to_string(),
        message: "graph returned no output".into(),
    })
}

fn concat(views: &[ndarray::ArrayViewD<'_, f32>]) -> Result<ArrayD<f32>> {
    ndarray::concatenate(Axis(0), views).map_err(|e| Error::InvalidRequest(format!("batch concat: {e}")))
}

/// diffusers' `rescale_noise_cfg` (pipeline_stable_diffusion.py; arXiv 2305.08891 §3.4): per
/// sample, rescale the guided noise to the text branch's standard deviation (unbiased, over C, H,
/// W) and mix `guidance_rescale` of it with the plain guided noise.
fn rescale_noise_cfg(noise_cfg: &mut ArrayD<f32>, noise_pred_text: ndarray::ArrayViewD<f32>, guidance_rescale: f32) {
    // torch's CPU std accumulates in double; the result is rounded to float32.
    fn std(x: ndarray::ArrayViewD<f32>) -> f32 {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        var.sqrt() as f32
    }
    let keep = (1.0 - f64::from(guidance_rescale)) as f32;
    for (mut cfg, text) in noise_cfg.outer_iter_mut().zip(noise_pred_text.outer_iter()) {
        let ratio = std(text.view()) / std(cfg.view());
        cfg.mapv_inplace(|v| guidance_rescale * (v * ratio) + keep * v);
    }
}

/// How many model calls (from the first) get adapter residuals. `cond_tau = 1` is every call:
/// `StableDiffusionAdapterPipeline` has no factor and always adds them (with Heun's two calls per
/// step too). Below 1 it is the XL pipeline's `int(num_inference_steps * adapter_conditioning_factor)`
/// with the factor as the Python float the user would type: an f32 such as 0.7 is widened through
/// its shortest decimal form, so 10 steps × 0.7 gives 7 like Python, not 6.
fn adapter_calls(no_adapters: bool, steps: usize, cond_tau: f32) -> usize {
    if no_adapters {
        return 0;
    }
    if cond_tau >= 1.0 {
        return usize::MAX;
    }
    let tau: f64 = cond_tau.to_string().parse().unwrap_or(f64::from(cond_tau));
    (steps as f64 * tau) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker owns its pipeline and may move between threads; loaded graphs are shared by all.
    #[test]
    fn threading_contract() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync + ?Sized>() {}
        send::<Pipeline>();
        send_sync::<Model>();
        send::<Request>();
        send_sync::<dyn Graph>();
        send_sync::<dyn Backend>();
    }

    #[test]
    fn adapter_calls_follow_python_arithmetic() {
        assert_eq!(adapter_calls(true, 10, 1.0), 0);
        assert_eq!(adapter_calls(false, 10, 1.0), usize::MAX);
        // Python: int(10 * 0.7) == 7, int(10 * 0.3) == 3, int(6 * 0.5) == 3, int(30 * 0.1) == 3.
        assert_eq!(adapter_calls(false, 10, 0.7), 7);
        assert_eq!(adapter_calls(false, 10, 0.3), 3);
        assert_eq!(adapter_calls(false, 6, 0.5), 3);
        assert_eq!(adapter_calls(false, 30, 0.1), 3);
        assert_eq!(adapter_calls(false, 10, 0.0), 0);
    }
}
