//! One worker running requests: **prepare** (text, the once-per-request conditioners, the initial
//! latents from noise or an image) → **steps** (each UNet call takes what the conditioners feed it,
//! then guidance and the sampler; inpainting blends) → **decode**. It follows diffusers'
//! `StableDiffusionAdapterPipeline.__call__` (pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py)
//! step for step, `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` for the
//! start, plus `cond_tau` with the semantics of `StableDiffusionXLAdapterPipeline`'s
//! `adapter_conditioning_factor`, and `StableDiffusionControlNetPipeline` for ControlNets
//! (per-step conditioners, [`crate::controlnet`]).
//!
//! SD 1.x, SD 2.x and SDXL run through this one loop: what differs comes from the manifest.

use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array4, ArrayD, IxDyn};

use crate::backend::TensorView;
use crate::conditioning::{adapter_calls, Call, Conditioner, Feed, T2iAdapters};
use crate::controlnet::{ControlNets, ControlParams};
use crate::error::{check_finite, Error, Result, Stage};
use crate::guidance::Guidance;
use crate::ip_adapter::IpAdapter;
use crate::latents::{start, Inpainting, StartParams};
use crate::manifest::Manifest;
use crate::model::{LoadOptions, Model, Sessions};
use crate::request::{CheckedRequest, Request};
use crate::scheduler::{NoiseSource, Scheduler, SchedulerKind};
use crate::style_adapter::{style_calls, StyleAdapter};
use crate::text::{encode_ids, encode_request, token_ids, TextConditioning, TextEmbeddings};
use crate::vae;

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

/// Wall time of each stage of one run. Per-step entries have one value per model call.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Checking the request: sizes, scheduler build, loading and resizing images.
    pub prepare: Duration,
    pub tokenize: Duration,
    /// The text encoder graph.
    pub text_encoder: Duration,
    /// The adapter graphs, and summing their weighted features.
    pub adapters: Duration,
    /// The IP-Adapter's image encoder and projection (zero when the set has no IP-Adapter).
    pub ip_adapter: Duration,
    /// The style adapter's encoder and adapter graphs (zero when the request has no style image).
    pub style_adapter: Duration,
    /// The VAE encoder (img2img, inpainting) and the initial latents.
    pub vae_encode: Duration,
    /// The UNet graph, per model call.
    pub unet: Vec<Duration>,
    /// The ControlNet graphs and summing their residuals, per model call; empty when the request
    /// has no ControlNet.
    pub controlnet: Vec<Duration>,
    /// `scale_model_input` + `step`, per model call.
    pub scheduler: Vec<Duration>,
    /// Everything else in the loop, per model call: the guidance batch, binding conditioner inputs,
    /// combining the guidance halves, inpainting, progress.
    pub loop_other: Vec<Duration>,
    /// The VAE decoder graph and conversion to 8-bit images.
    pub vae_decode: Duration,
    pub total: Duration,
}

/// Progress reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Model calls finished, 1-based.
    pub step: usize,
    /// Model calls this run makes (fewer than the steps with an init image).
    pub total: usize,
}

/// One worker: a [`Model`] with its own sessions, running one request at a time. `Send`, so a
/// worker can move between threads; open one per concurrent request.
pub struct Pipeline {
    model: Model,
    sessions: Sessions,
}

/// What prepare hands to the steps.
struct Prepared {
    text: TextConditioning,
    conditioners: Vec<Box<dyn Conditioner>>,
    latents: ArrayD<f32>,
    inpainting: Option<Inpainting>,
    scheduler: Box<dyn Scheduler>,
    rng: Box<dyn NoiseSource>,
    guidance: Guidance,
    first_step: usize,
    n: usize,
}

impl Pipeline {
    pub(crate) fn new(model: Model, sessions: Sessions) -> Pipeline {
        Pipeline { model, sessions }
    }

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

    /// Forgets what this worker cached across requests (the IP-Adapter's image embeddings), so the
    /// next request pays for everything again: what a benchmark of a cold cache needs.
    pub fn clear_caches(&mut self) {
        self.sessions.conditioners.ip_cache = Default::default();
    }

    /// Token ids for `prompt` with the first text encoder's tokenizer, padded and truncated to the
    /// manifest's `max_length`.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<i64>> {
        self.model.tokenizers()[0].encode(prompt)
    }

    /// Checks and runs one request ([`Model::check`] then [`run_checked`](Self::run_checked)).
    /// `progress` is called after every step; returning `false` cancels the run with
    /// [`Error::Cancelled`].
    pub fn run(&mut self, request: &Request, progress: &mut dyn FnMut(Progress) -> bool) -> Result<Generation> {
        let start = Instant::now();
        let checked = self.model.check(request)?;
        self.run_from(checked, start, progress)
    }

    /// Runs a request already checked against this model ([`Model::check`]), without checking it
    /// again.
    pub fn run_checked(
        &mut self,
        checked: CheckedRequest,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generation> {
        self.run_from(checked, Instant::now(), progress)
    }

    fn run_from(
        &mut self,
        checked: CheckedRequest,
        start: Instant,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generation> {
        let mut timings = Timings { prepare: start.elapsed(), ..Timings::default() };
        let kind = checked.scheduler();
        let prepared = self.prepare(checked, &mut timings)?;
        let latents = self.steps(prepared, progress, &mut timings)?;
        let clock = Instant::now();
        // Finite latents so large that scaling overflows them: the denoising diverged.
        let total = timings.unet.len();
        let images = vae::decode(self.model.manifest(), self.sessions.vae_decoder.as_mut(), &latents, || {
            Error::NumericalFault { stage: Stage::Sampler { step: total, total } }
        })?;
        timings.vae_decode = clock.elapsed();
        timings.total = start.elapsed();
        Ok(Generation { latents, images, scheduler: kind, timings })
    }

    /// Text encoding, the once-per-request conditioners, and the initial latents.
    fn prepare(&mut self, checked: CheckedRequest, timings: &mut Timings) -> Result<Prepared> {
        let model = self.model.clone();
        let manifest = model.manifest();
        let CheckedRequest {
            request,
            width,
            height,
            adapters,
            controls,
            scheduler,
            first_step,
            init,
            ip_pixels,
            styles,
        } = checked;
        let guidance = Guidance { scale: request.guidance, rescale: request.guidance_rescale };
        let n = request.n_samples;
        let batch = if guidance.on() { 2 * n } else { n };
        let ds = manifest.latent.downscale;
        let latent_hw = ((height / ds) as usize, (width / ds) as usize);

        let (text, tokenize, encode) = encode_request(
            manifest,
            model.tokenizers(),
            &mut self.sessions.text_encoders,
            &request,
            (width, height),
            guidance.on(),
        )?;
        timings.tokenize = tokenize;
        timings.text_encoder = encode;

        let clock = Instant::now();
        let calls = adapter_calls(request.steps, request.cond_tau);
        let t2i = T2iAdapters::prepare(manifest, &adapters, &mut self.sessions.conditioners, batch, latent_hw, calls)?;
        let mut conditioners: Vec<Box<dyn Conditioner>> = vec![Box::new(t2i)];
        timings.adapters = clock.elapsed();
        if let Some(ip) = &manifest.ip_adapter {
            let clock = Instant::now();
            let scale = if ip_pixels.is_some() { request.ip_scale } else { 0.0 };
            let sessions = &mut self.sessions.conditioners;
            conditioners.push(Box::new(IpAdapter::prepare(ip, ip_pixels.as_ref(), scale, sessions, guidance.on(), n)?));
            timings.ip_adapter = clock.elapsed();
        }
        if let (Some(spec), false) = (&manifest.style_adapter, styles.is_empty()) {
            let clock = Instant::now();
            let calls = style_calls(scheduler.num_steps(), first_step, request.style_cond_tau);
            let sessions = &mut self.sessions.conditioners;
            let style = StyleAdapter::prepare(spec, &styles, sessions, &text.hidden, guidance.on(), n, calls)?;
            conditioners.push(Box::new(style));
            timings.style_adapter = clock.elapsed();
        }
        if !manifest.control_slots.is_empty() {
            let params = ControlParams {
                start: request.control_start,
                end: request.control_end,
                guess_mode: request.guess_mode,
                guided: guidance.on(),
                n,
                latent_hw,
                total: scheduler.num_steps() - first_step,
            };
            conditioners.push(Box::new(ControlNets::prepare(manifest, controls, text.clone(), &params)));
        }

        let clock = Instant::now();
        let mut rng = request.rng.generator(request.seed);
        let given = request.latents.as_ref().map(|l| l.clone().into_dyn());
        let params = StartParams {
            n_samples: n,
            latent_hw,
            latents: given.as_ref(),
            init: init.as_ref(),
            first_step,
            full_strength: request.strength.is_none_or(|s| s >= 1.0) && init.as_ref().is_some_and(|i| i.mask.is_some()),
            unet_batch: batch,
        };
        let start = start(manifest, self.sessions.vae_encoder.as_mut(), scheduler.as_ref(), &params, rng.as_mut())?;
        timings.vae_encode = clock.elapsed();
        Ok(Prepared {
            text,
            conditioners,
            latents: start.latents,
            inpainting: start.inpainting,
            scheduler,
            rng,
            guidance,
            first_step,
            n,
        })
    }

    /// The denoising loop, from the first step to the last.
    fn steps(
        &mut self,
        prepared: Prepared,
        progress: &mut dyn FnMut(Progress) -> bool,
        timings: &mut Timings,
    ) -> Result<Array4<f32>> {
        let Prepared {
            text,
            mut conditioners,
            mut latents,
            inpainting,
            mut scheduler,
            mut rng,
            guidance,
            first_step,
            n,
        } = prepared;
        let sessions = &mut self.sessions;
        // The text conditioning stays the same for every call: bound once (on a GPU, copied once).
        sessions.unet.bind(&text.inputs())?;
        let total = scheduler.num_steps() - first_step;
        let mut run = || -> Result<()> {
            for index in 0..total {
                let step = first_step + index;
                let step_start = Instant::now();
                let t = scheduler.timesteps()[step];
                let mut model_input = guidance.batch(&latents);
                let clock = Instant::now();
                scheduler.scale_model_input(&mut model_input, step);
                let mut scheduler_time = clock.elapsed();
                // ControlNets take the scaled latents before an inpainting UNet's extra channels
                // (pipeline_controlnet_inpaint.py: `control_model_input = latent_model_input`).
                let call = Call { index, timestep: t, sample: model_input.view() };
                let mut graph_time: Option<Duration> = None;
                for conditioner in conditioners.iter_mut() {
                    let feed = conditioner.feed(&call, &mut sessions.conditioners)?;
                    if let Some(time) = conditioner.graph_time() {
                        graph_time = Some(graph_time.unwrap_or_default() + time);
                    }
                    if let Feed::Bind(inputs) = feed {
                        let views: Vec<(&str, TensorView<'_>)> =
                            inputs.iter().map(|(name, value)| (name.as_str(), TensorView::F32(value.view()))).collect();
                        sessions.unet.bind(&views)?;
                    }
                }
                if let Some(inpainting) = &inpainting {
                    model_input = inpainting.extend_input(model_input)?;
                }
                let timestep = ArrayD::from_elem(IxDyn(&[model_input.shape()[0]]), t);
                let inputs =
                    [("sample", TensorView::F32(model_input.view())), ("timestep", TensorView::F32(timestep.view()))];
                let clock = Instant::now();
                let noise_pred = first(sessions.unet.run(&inputs)?, "unet")?;
                let unet_time = clock.elapsed();
                let (call_no, stage_total) = (index + 1, total);
                check_finite(std::slice::from_ref(&noise_pred), || Stage::Unet { step: call_no, total: stage_total })?;
                let noise_pred = guidance.combine(noise_pred, n);
                check_finite(std::slice::from_ref(&noise_pred), || Stage::Guidance {
                    step: call_no,
                    total: stage_total,
                })?;
                let clock = Instant::now();
                scheduler.step(noise_pred.view(), step, &mut latents, rng.as_mut())?;
                scheduler_time += clock.elapsed();
                if let Some(inpainting) = &inpainting {
                    inpainting.blend(&mut latents, scheduler.as_ref(), step);
                }
                check_finite(std::slice::from_ref(&latents), || Stage::Sampler { step: call_no, total: stage_total })?;
                if !progress(Progress { step: call_no, total }) {
                    return Err(Error::Cancelled);
                }
                timings.unet.push(unet_time);
                timings.scheduler.push(scheduler_time);
                let conditioner_time = graph_time.unwrap_or_default();
                if let Some(time) = graph_time {
                    timings.controlnet.push(time);
                }
                timings
                    .loop_other
                    .push(step_start.elapsed().saturating_sub(unet_time + scheduler_time + conditioner_time));
            }
            Ok(())
        };
        let ran = run();
        sessions.unet.unbind();
        ran?;
        latents.into_dimensionality().map_err(|e| Error::Backend {
            backend: "pipeline",
            graph: "unet".into(),
            message: format!("latents lost their shape: {e}"),
        })
    }

    /// Decodes final latents into images (diffusers' `decode_latents` + `numpy_to_pil`).
    /// Latents that are not finite once scaled are [`Error::InvalidRequest`]; a decoder that
    /// produces NaN or infinity is [`Error::NumericalFault`] at [`Stage::VaeDecoder`].
    pub fn decode(&mut self, latents: &Array4<f32>) -> Result<Vec<RgbImage>> {
        vae::decode(self.model.manifest(), self.sessions.vae_decoder.as_mut(), latents, || {
            Error::request(
                crate::error::Field::Latents,
                "latents to decode contain NaN or infinity (after scaling by 1 / vae.scaling_factor)",
            )
        })
    }

    /// Text embeddings for `prompts`: one call per text encoder, their hidden outputs concatenated
    /// on the last axis ([prompts, max_length, ΣD]), and the pooled output the UNet takes, if any.
    pub fn encode_text(&mut self, prompts: &[&str]) -> Result<TextEmbeddings> {
        let ids = token_ids(self.model.tokenizers(), prompts)?;
        encode_ids(self.model.manifest(), &mut self.sessions.text_encoders, &ids)
    }
}

fn first(outputs: Vec<ArrayD<f32>>, graph: &str) -> Result<ArrayD<f32>> {
    outputs.into_iter().next().ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: graph.to_string(),
        message: "graph returned no output".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Graph};

    /// A worker owns its pipeline and may move between threads; loaded graphs are shared by all.
    #[test]
    fn threading_contract() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync + ?Sized>() {}
        send::<Pipeline>();
        send_sync::<Model>();
        send::<Request>();
        send::<CheckedRequest>();
        send_sync::<dyn Graph>();
        send_sync::<dyn Backend>();
    }
}
