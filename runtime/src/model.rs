//! A loaded graph set: its manifest, tokenizers and every graph, held by role and shared by all
//! workers; and the options a load takes (backend, checksums, engine cache, limits, log).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, BackendKind, BackendSettings, CacheUse, Graph, GraphLoad, GraphSession};
use crate::conditioning::ConditionerSessions;
use crate::engine::{Profile, ShapeRanges, DEFAULT_CACHE_DIR};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::log::Logger;
use crate::manifest::{Manifest, Role};
use crate::pipeline::Pipeline;
use crate::record::RecordingGraph;
use crate::request::{CheckedRequest, Request};
use crate::tokenizer::PromptTokenizer;

/// How to load a graph set.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub backend: BackendKind,
    /// Hash every file and compare with the manifest (catches truncated or swapped files).
    pub verify_checksums: bool,
    /// Threads, GPU, CPU fallback, TensorRT precision and the log callback (see
    /// [`BackendSettings`]).
    pub settings: BackendSettings,
    /// Where `t2i-rt build-engine` puts prepared engines and `run` looks for them.
    pub engine_cache: EngineCache,
    /// How large a request may be; every request on the model is checked against them.
    pub limits: Limits,
    /// Write every graph call's inputs into this folder (missing or empty), for calibration
    /// (`python -m t2i_export calibrate`; layout in `record.rs`). Off by default.
    pub record_inputs: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: BackendKind::OrtCpu,
            verify_checksums: true,
            settings: BackendSettings::default(),
            engine_cache: EngineCache::InGraphSet,
            limits: Limits::default(),
            record_inputs: None,
        }
    }
}

impl LoadOptions {
    /// The set as it runs at the chosen precision: with `int8`, its INT8 variants (for ort-trt,
    /// only variants made for TensorRT).
    fn choose_variants(&self, manifest: Manifest) -> Result<Manifest> {
        let Some(precision) = self.settings.precision.graph_variant() else { return Ok(manifest) };
        if self.backend == BackendKind::OrtTrt {
            manifest.check_tensorrt_variants(precision)?;
        }
        manifest.with_variant(precision)
    }

    /// The log callback the backend and model report to ([`BackendSettings::log`]).
    pub fn with_log(mut self, log: Logger) -> Self {
        self.settings.log = log;
        self
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
    /// Every graph, in [`Manifest::set_graphs`] order.
    graphs: Vec<LoadedGraph>,
}

struct LoadedGraph {
    role: Role,
    /// The name inside the role ([`SetGraph::key`]).
    key: String,
    graph: Arc<dyn Graph>,
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
        options.settings.check(options.backend)?;
        let manifest = options.choose_variants(manifest)?;
        if let Some(dir) = &options.record_inputs {
            crate::record::prepare(dir)?;
        }
        if options.backend == BackendKind::Tract {
            if let Some(g) = manifest.set_graphs().into_iter().find(|g| g.spec.precision == "fp16") {
                // tract 0.23 mistypes fp16 Gemm (the UNet's time embedding) while planning.
                return Err(Error::Unsupported(format!(
                    "tract cannot run fp16 graphs ({} in {} is fp16); use the fp32 graph set with tract, or \
                     --backend ort-cpu",
                    g.name(),
                    manifest.dir.display()
                )));
            }
        }
        let backend = options.backend.create_with(&options.settings)?;
        let tokenizers = manifest
            .text_encoders
            .iter()
            .map(|e| PromptTokenizer::for_set(&manifest, &e.tokenizer))
            .collect::<Result<Vec<_>>>()?;
        let root = options.engine_cache.root(&manifest.dir);
        let graphs = manifest
            .set_graphs()
            .into_iter()
            .map(|g| {
                let name = g.name();
                let path = manifest.resolve(&g.spec.file)?;
                let cache = root.as_deref().map(|root| CacheUse { root, build: false, shapes: None });
                let graph = backend.load_graph(&GraphLoad { name: &name, path: &path, spec: g.spec, cache })?;
                g.spec
                    .check_io(&name, graph.inputs(), graph.outputs())
                    .map_err(|message| Error::GraphSet { dir: manifest.dir.clone(), message })?;
                let graph = match &options.record_inputs {
                    Some(dir) => RecordingGraph::wrap(graph, dir, &g.spec.file),
                    None => graph,
                };
                Ok(LoadedGraph { role: g.role, key: g.key.to_string(), graph })
            })
            .collect::<Result<Vec<_>>>()?;
        let limits = options.limits;
        Ok(Model(Arc::new(ModelInner { manifest, limits, backend, tokenizers, graphs })))
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
        options.settings.check(options.backend)?;
        if options.backend == BackendKind::Tract {
            return Err(Error::Unsupported(
                "tract has no engine cache: it plans each graph for the request's shapes when it first runs".into(),
            ));
        }
        if options.backend == BackendKind::OrtTrt && profiles.is_empty() {
            return Err(Error::InvalidOptions(
                "ort-trt needs at least one shape profile (WxH[:MIN-MAX]: the sizes and batch range the engines \
                 serve)"
                    .into(),
            ));
        }
        if options.backend != BackendKind::OrtTrt && !profiles.is_empty() {
            return Err(Error::InvalidOptions(format!(
                "shape profiles are a TensorRT build option; use them with ort-trt, not {}",
                options.backend
            )));
        }
        let manifest = options.choose_variants(Manifest::load(dir, options.verify_checksums)?)?;
        let root = options.engine_cache.root(&manifest.dir).ok_or_else(|| {
            Error::InvalidOptions("build-engine needs an engine cache; drop the option that turns it off".into())
        })?;
        for p in profiles {
            if p.width % manifest.size_multiple != 0 || p.height % manifest.size_multiple != 0 {
                return Err(Error::InvalidOptions(format!(
                    "profile {p}: width and height must be multiples of {} for this graph set",
                    manifest.size_multiple
                )));
            }
        }
        let backend = options.backend.create_with(&options.settings)?;
        let mut built = Vec::new();
        for g in manifest.set_graphs() {
            let name = g.name();
            progress(&name);
            let start = Instant::now();
            let shapes = if options.backend == BackendKind::OrtTrt {
                let context = manifest.context_range();
                Some(ShapeRanges::for_graph(
                    &name,
                    g.spec,
                    g.batch(),
                    manifest.latent.downscale,
                    profiles,
                    context.as_ref(),
                )?)
            } else {
                None
            };
            let path = manifest.resolve(&g.spec.file)?;
            let cache = Some(CacheUse { root: &root, build: true, shapes });
            backend.load_graph(&GraphLoad { name: &name, path: &path, spec: g.spec, cache })?;
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

    /// Checks `request` against this model's manifest and limits ([`Request::check`]); the result
    /// runs with [`Pipeline::run_checked`] without being checked again.
    pub fn check(&self, request: &Request) -> Result<CheckedRequest> {
        request.check(self.manifest(), self.limits())
    }

    pub(crate) fn tokenizers(&self) -> &[PromptTokenizer] {
        &self.0.tokenizers
    }

    /// Opens one worker's sessions. The first worker reuses the sessions built while loading; on
    /// ort every further worker builds its own sessions (ONNX Runtime keeps weights per session).
    pub fn pipeline(&self) -> Result<Pipeline> {
        Ok(Pipeline::new(self.clone(), self.sessions()?))
    }

    fn sessions(&self) -> Result<Sessions> {
        let open = |role: Role| -> Result<Vec<(String, Box<dyn GraphSession>)>> {
            self.0.graphs.iter().filter(|g| g.role == role).map(|g| Ok((g.key.clone(), g.graph.session()?))).collect()
        };
        let single = |role: Role| -> Result<Option<Box<dyn GraphSession>>> {
            Ok(open(role)?.into_iter().next().map(|(_, session)| session))
        };
        let missing = |role: Role| Error::GraphSet {
            dir: self.0.manifest.dir.clone(),
            message: format!("no {role:?} graph loaded"),
        };
        Ok(Sessions {
            text_encoders: open(Role::TextEncoder)?.into_iter().map(|(_, s)| s).collect(),
            unet: single(Role::Unet)?.ok_or_else(|| missing(Role::Unet))?,
            vae_decoder: single(Role::VaeDecoder)?.ok_or_else(|| missing(Role::VaeDecoder))?,
            vae_encoder: single(Role::VaeEncoder)?,
            conditioners: ConditionerSessions {
                adapters: open(Role::Adapter)?.into_iter().map(|(_, s)| s).collect(),
                controlnets: open(Role::ControlNet)?.into_iter().map(|(_, s)| s).collect(),
                image_encoder: single(Role::ImageEncoder)?,
                image_projection: single(Role::ImageProjection)?,
                style_encoder: single(Role::StyleEncoder)?,
                style_adapter: single(Role::StyleAdapter)?,
                ip_cache: Default::default(),
            },
        })
    }
}

/// One worker's sessions, by role. Conditioners borrow the sessions of their own role while the
/// denoising loop holds the UNet's.
pub(crate) struct Sessions {
    /// The manifest's text encoders, in manifest order.
    pub text_encoders: Vec<Box<dyn GraphSession>>,
    pub unet: Box<dyn GraphSession>,
    pub vae_decoder: Box<dyn GraphSession>,
    /// Absent in sets without one (format 2): txt2img only.
    pub vae_encoder: Option<Box<dyn GraphSession>>,
    /// The graphs of once-per-request and per-step conditioners.
    pub conditioners: ConditionerSessions,
}
