//! One generation request, its defaults (diffusers'), and its one check against a graph set:
//! [`Request::check`] turns a request into a [`CheckedRequest`] that holds everything a run needs
//! (size, decoded images, adapters, the built sampler, the first step), so nothing is checked,
//! decoded or built twice.

use ndarray::{Array4, Axis};
use serde_json::{Map, Value};

use crate::adapter::{round_to, AdapterRequest, AdapterSet, ConditionSource};
use crate::condition::{ConditionImage, ConditionKind};
use crate::conditioning::python_float;
use crate::controlnet::{ControlRequest, ControlSet};
use crate::error::{Error, Field, Result};
use crate::limits::Limits;
use crate::manifest::Manifest;
use crate::rng::RngKind;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::style_adapter::{StylePixels, StyleRequest};

/// img2img's default strength (diffusers' `StableDiffusionImg2ImgPipeline`; its SDXL pipeline
/// defaults to 0.3, pass that for SDXL parity).
pub const DEFAULT_IMG2IMG_STRENGTH: f32 = 0.8;
/// Inpainting's default strength (`StableDiffusionInpaintPipeline`): the masked area is drawn anew.
pub const DEFAULT_INPAINT_STRENGTH: f32 = 1.0;

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
    /// Samplers with two model calls per step (Heun) count calls, as diffusers' loop does. With an
    /// init image, calls count from the first one that runs.
    pub cond_tau: f32,
    /// ControlNets, each with a control image and a scale (diffusers' `controlnet_conditioning_scale`);
    /// several are summed like diffusers' `MultiControlNetModel`. Names are the graph set's
    /// (`Manifest::controlnets`).
    pub controls: Vec<ControlRequest>,
    /// The fraction of the model calls at which the ControlNets start and stop applying, with
    /// `0 ≤ start < end ≤ 1` (diffusers' `control_guidance_start` / `control_guidance_end`): call `i`
    /// of `total` is skipped when `i / total < start` or `(i + 1) / total > end`, in Python's float
    /// arithmetic on the decimals given. Calls count as in `cond_tau`.
    pub control_start: f32,
    pub control_end: f32,
    /// diffusers' `guess_mode`: the ControlNets see only the conditional half of the guidance
    /// batch (the unconditional half gets no residuals), and their residuals are scaled from 0.1
    /// (first down block) to 1.0 (mid block). Needs at least one control.
    pub guess_mode: bool,
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
    /// Seeds every random draw of the run through the generator `rng` names.
    pub seed: u64,
    /// Which generator `seed` drives: the runtime's own (default), or torch's CPU generator, so
    /// that a seed gives what diffusers gives with `generator=torch.Generator("cpu").manual_seed(seed)`
    /// (see [`RngKind`]). One generator per run, drawn in diffusers' order: the VAE posterior
    /// sample of the init image (img2img, inpainting), the initial noise (unless `latents` is
    /// given, as diffusers skips that draw too), the masked image's posterior sample (inpainting),
    /// then each stochastic sampler step's noise.
    pub rng: RngKind,
    /// Images per prompt (diffusers' `num_images_per_prompt`).
    pub n_samples: usize,
    /// Image size; `None` as diffusers: the init image's, else the first condition image's, else
    /// the manifest's `default_size` (see [`Request::size`]).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Initial noise [n_samples, C, H/8, W/8], exactly as diffusers' `latents=` (before it is
    /// scaled by the scheduler's `init_noise_sigma`). txt2img only.
    pub latents: Option<Array4<f32>>,
    /// SDXL's size/crop conditioning (`time_ids`); ignored by graph sets without it.
    pub size_cond: SizeConditioning,
    /// img2img and inpainting: the picture to start from (RGB; alpha is dropped), of exactly the
    /// output size. Needs a graph set with a VAE encoder.
    pub init_image: Option<ConditionSource>,
    /// Inpainting: which pixels of `init_image` to draw anew, of the output size. It is converted
    /// to gray like Pillow's `convert("L")`; values ≥ 128 (white) are repainted, the rest kept, as
    /// diffusers binarizes masks at 0.5. With a regular UNet the kept area is blended back after
    /// every step; an inpainting UNet (9 input channels) also sees the mask and masked image.
    pub mask: Option<ConditionSource>,
    /// How far the init image is noised, in (0, 1]: the sampler runs the last
    /// `int(steps × strength)` of its `steps` (diffusers' `get_timesteps`). `None`:
    /// [`DEFAULT_IMG2IMG_STRENGTH`], or [`DEFAULT_INPAINT_STRENGTH`] with a mask.
    pub strength: Option<f32>,
    /// An IP-Adapter reference image (diffusers' `ip_adapter_image`): encoded once with the graph
    /// set's CLIP image encoder, its tokens attended to by every cross-attention layer. Needs a
    /// graph set exported with an IP-Adapter ([`Manifest::ip_adapter`]).
    pub ip_image: Option<ConditionSource>,
    /// How strongly the reference image steers (diffusers' `set_ip_adapter_scale`): 0 is exactly no
    /// IP-Adapter, 1 the adapter as trained (default), 0.5-0.7 keeps more of the prompt. Finite;
    /// unused without `ip_image`.
    pub ip_scale: f32,
    /// Style images for TencentARC's style adapter, in order (each image's tokens times its
    /// weight join the text context). Needs a graph set exported with a style adapter
    /// ([`Manifest::style_adapter`]); at most its `max_images`.
    pub styles: Vec<StyleRequest>,
    /// The fraction of the steps, from the first (noisiest), that see the style tokens: step `i` of
    /// `T` does when `T - i - 1 >= int((1 - style_cond_tau) × T)` (TencentARC's `style_cond_tau`).
    /// In [0, 1]; 1 (default) styles every step. Unused without `styles`.
    pub style_cond_tau: f32,
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
        let output = (height, width);
        let positive =
            ids(self.original_size.unwrap_or(output), self.crops_coords_top_left, self.target_size.unwrap_or(output));
        let negative = match (self.negative_original_size, self.negative_target_size) {
            (Some(o), Some(t)) => ids(o, self.negative_crops_coords_top_left, t),
            _ => positive,
        };
        (positive, negative)
    }

    /// `(positive, negative)` time ids as diffusers' SDXL img2img and inpaint pipelines build
    /// them: each negative size defaults to its positive one on its own, and the negative ids use
    /// the positive `crops_coords_top_left` (`negative_crops_coords_top_left` is unused there).
    pub fn img2img_time_ids(&self, width: u32, height: u32) -> ([f32; 6], [f32; 6]) {
        let output = (height, width);
        let original = self.original_size.unwrap_or(output);
        let target = self.target_size.unwrap_or(output);
        let crop = self.crops_coords_top_left;
        let positive = ids(original, crop, target);
        let negative =
            ids(self.negative_original_size.unwrap_or(original), crop, self.negative_target_size.unwrap_or(target));
        (positive, negative)
    }
}

/// One row of `time_ids`: original size, crop top-left and target size, each pair as diffusers
/// orders it.
fn ids(original: (u32, u32), crop: (u32, u32), target: (u32, u32)) -> [f32; 6] {
    [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|v| v as f32)
}

/// A request that passed [`Request::check`], ready to run: what the run needs, decoded and built
/// once. Run it with [`Pipeline::run_checked`](crate::Pipeline::run_checked).
pub struct CheckedRequest {
    pub(crate) request: Request,
    pub width: u32,
    pub height: u32,
    pub(crate) adapters: AdapterSet,
    pub(crate) controls: ControlSet,
    /// Built for the request's steps; its [`kind`](crate::scheduler::Scheduler::kind) is what runs.
    pub(crate) scheduler: Box<dyn Scheduler>,
    /// The first step index the sampler runs: 0 for txt2img, later with an init image.
    pub first_step: usize,
    pub(crate) init: Option<InitImage>,
    /// The IP-Adapter image as the image encoder's `pixel_values` [1, 3, H, W].
    pub(crate) ip_pixels: Option<Array4<f32>>,
    /// The style images as the style encoder's `pixel_values`, with their weights.
    pub(crate) styles: Vec<StylePixels>,
}

impl CheckedRequest {
    /// The sampler that will run.
    pub fn scheduler(&self) -> SchedulerKind {
        self.scheduler.kind()
    }

    /// Model calls the run makes (the sampler's step indices from [`first_step`](Self::first_step)).
    pub fn model_calls(&self) -> usize {
        self.scheduler.num_steps() - self.first_step
    }

    /// The request as given.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// What the adapter and ControlNet graphs will see, as 8-bit images (the tensors are these
    /// values / 255): after channel conversion, resizing and preprocessing. Named
    /// `adapter_NAME` / `controlnet_NAME`, in request order, with `_2`, `_3`, ... on a name the
    /// request uses again.
    pub fn condition_images(&self, m: &Manifest) -> Vec<(String, ConditionImage)> {
        let adapters = self.adapters.conditions().map(|(i, t)| (format!("adapter_{}", m.adapters[i].name), t));
        let controls = self.controls.conditions().map(|(i, t)| (format!("controlnet_{}", m.controlnets[i].name), t));
        let mut seen: Vec<String> = Vec::new();
        adapters
            .chain(controls)
            .filter_map(|(name, tensor)| {
                let repeat = seen.iter().filter(|n| **n == name).count();
                seen.push(name.clone());
                let name = if repeat == 0 { name } else { format!("{name}_{}", repeat + 1) };
                Some((name, tensor_image(tensor)?))
            })
            .collect()
    }
}

/// A [1, C, H, W] tensor of 8-bit values / 255 back as the image (C = 1 or 3).
fn tensor_image(tensor: &Array4<f32>) -> Option<ConditionImage> {
    let (_, c, h, w) = tensor.dim();
    let kind = match c {
        1 => ConditionKind::Gray,
        3 => ConditionKind::Rgb,
        _ => return None,
    };
    let pixels = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |ch| (y, x, ch))))
        .map(|(y, x, ch)| (tensor[[0, ch, y, x]] * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    ConditionImage::from_pixels(w as u32, h as u32, kind, pixels)
}

/// The init image and mask as the pipeline uses them.
pub(crate) struct InitImage {
    /// [1, 3, H, W] in [-1, 1]: diffusers' `VaeImageProcessor.preprocess` (x / 255 × 2 − 1, in f32).
    pub pixels: Array4<f32>,
    /// [1, 1, H, W], 0 (keep) or 1 (repaint): `mask_processor.preprocess` (gray, / 255, ≥ 0.5).
    pub mask: Option<Array4<f32>>,
}

impl Request {
    pub fn new(prompt: impl Into<String>) -> Self {
        Request {
            prompt: prompt.into(),
            negative_prompt: None,
            adapters: Vec::new(),
            cond_tau: 1.0,
            controls: Vec::new(),
            control_start: 0.0,
            control_end: 1.0,
            guess_mode: false,
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
            init_image: None,
            mask: None,
            strength: None,
            ip_image: None,
            ip_scale: 1.0,
            styles: Vec::new(),
            style_cond_tau: 1.0,
        }
    }

    /// The output size, as diffusers picks it: a missing width or height comes from the init
    /// image when there is one (img2img and inpainting keep the image's size), else from the first
    /// adapter's condition image (`StableDiffusion(XL)AdapterPipeline._default_height_width`), else
    /// from the first control image (diffusers' ControlNet pipelines take its size), else
    /// from the graph set's `default_size` (the UNet's sample size). diffusers rounds an image side
    /// down to a multiple of what the model needs; a side that is not already such a multiple would
    /// give a size this set cannot draw (or one other than diffusers'), so it is an error naming the
    /// fix.
    pub fn size(&self, m: &Manifest) -> Result<(u32, u32)> {
        if let (Some(w), Some(h)) = (self.width, self.height) {
            return Ok((w, h));
        }
        let (source, what) = match (&self.init_image, self.adapters.first(), self.controls.first()) {
            (Some(init), _, _) => (init, "the init image"),
            (None, Some(first), _) => (&first.image, "the first condition image (as diffusers' adapter pipelines do)"),
            (None, None, Some(first)) => {
                (&first.image, "the first control image (as diffusers' ControlNet pipelines do)")
            }
            (None, None, None) => {
                return Ok((self.width.unwrap_or(m.default_size[0]), self.height.unwrap_or(m.default_size[1])))
            }
        };
        let (iw, ih) = match source {
            ConditionSource::File(path) => image::image_dimensions(path)
                .map_err(|e| Error::Image { path: path.clone(), message: e.to_string() })?,
            ConditionSource::Pixels(image) => (image.width(), image.height()),
        };
        let pick = |given: Option<u32>, side: u32| -> Result<u32> {
            match given {
                Some(v) => Ok(v),
                None if side > 0 && side.is_multiple_of(m.size_multiple) => Ok(side),
                None => Err(Error::request(
                    Field::Size,
                    format!(
                        "no size given, so it comes from {what} ({iw}x{ih}), which is not a multiple of {}; give a \
                         width and height (e.g. {}x{}) and images of that size",
                        m.size_multiple,
                        round_to(iw.max(1), m.size_multiple),
                        round_to(ih.max(1), m.size_multiple)
                    ),
                )),
            }
        };
        Ok((pick(self.width, iw)?, pick(self.height, ih)?))
    }

    /// Checks this request against a graph set's manifest and `limits` without running anything,
    /// and prepares what the run needs. Sizes, counts and lengths are checked against the limits
    /// first (nothing is allocated for a request that exceeds one), then steps, guidance,
    /// cond_tau, the control range and guess mode, latents, sampler configuration, strength, init
    /// image and mask, adapter names, weights and condition images, ControlNet names, scales and
    /// control images.
    pub fn check(&self, m: &Manifest, limits: &Limits) -> Result<CheckedRequest> {
        limits.check_steps(self.steps)?;
        limits.check_adapters(self.adapters.len())?;
        limits.check_controls(self.controls.len())?;
        limits.check_prompt("prompt", &self.prompt)?;
        if let Some(negative) = &self.negative_prompt {
            limits.check_prompt("negative prompt", negative)?;
        }
        let (width, height) = self.size(m)?;
        limits.check_images(width, height, self.n_samples)?;
        let multiple = m.size_multiple;
        if width == 0 || height == 0 || !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
            return Err(Error::request(
                Field::Size,
                format!(
                    "size {width}x{height} is not a multiple of {multiple}, which this graph set needs; try {}x{}",
                    round_to(width, multiple),
                    round_to(height, multiple)
                ),
            ));
        }
        self.check_numbers()?;
        if let Some(latents) = &self.latents {
            let ds = m.latent.downscale;
            let expected = [self.n_samples, m.latent.channels, (height / ds) as usize, (width / ds) as usize];
            if latents.shape() != expected {
                return Err(Error::request(
                    Field::Latents,
                    format!(
                        "latents have shape {:?}, but {} sample(s) at {width}x{height} need {expected:?} (n_samples, \
                         channels, height/{ds}, width/{ds})",
                        latents.shape(),
                        self.n_samples
                    ),
                ));
            }
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(Error::request(Field::Latents, "latents contain NaN or infinity"));
            }
        }
        let (kind, scheduler) = self.sampler(m)?;
        if self.eta != 0.0 && kind != SchedulerKind::Ddim {
            return Err(Error::request(
                Field::Eta,
                format!(
                    "eta only applies to the ddim sampler (diffusers ignores it elsewhere), and this request runs \
                     {kind}; drop eta or choose ddim"
                ),
            ));
        }
        let karras = self.scheduler_options.get("use_karras_sigmas").and_then(Value::as_bool) == Some(true);
        if karras && !kind.takes_karras_sigmas() {
            return Err(Error::request(
                Field::Scheduler,
                format!(
                    "the {kind} sampler ({}) has no Karras sigmas; use them with euler, heun, lms, dpmpp-2m, \
                     dpmpp-2m-sde or unipc",
                    kind.diffusers_class()
                ),
            ));
        }
        let first_step = self.first_step(m, scheduler.as_ref())?;
        let init = self.init_image(m, limits, width, height)?;
        let adapters = AdapterSet::build_within(m, &self.adapters, width, height, limits)?;
        let controls = ControlSet::build(m, &self.controls, width, height, limits)?;
        let ip_pixels = crate::ip_adapter::pixel_values(m, self.ip_image.as_ref(), limits)?;
        let styles = crate::style_adapter::style_pixels(m, &self.styles, limits)?;
        Ok(CheckedRequest {
            request: self.clone(),
            width,
            height,
            adapters,
            controls,
            scheduler,
            first_step,
            init,
            ip_pixels,
            styles,
        })
    }

    /// The scalar fields' ranges.
    fn check_numbers(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::request(Field::Steps, "steps must be at least 1"));
        }
        if self.n_samples == 0 {
            return Err(Error::request(Field::NSamples, "n_samples must be at least 1"));
        }
        if !self.guidance.is_finite() {
            return Err(Error::request(Field::Guidance, format!("guidance {} is not a number", self.guidance)));
        }
        if !(0.0..=1.0).contains(&self.cond_tau) {
            return Err(Error::request(Field::CondTau, format!("cond_tau {} must be in [0, 1]", self.cond_tau)));
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(Error::request(
                Field::GuidanceRescale,
                format!("guidance_rescale {} must be in [0, 1] (0 is off; 0.7 is typical)", self.guidance_rescale),
            ));
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(Error::request(Field::Eta, format!("eta {} must be a number ≥ 0", self.eta)));
        }
        let (start, end) = (self.control_start, self.control_end);
        if !(0.0 <= start && start < end && end <= 1.0) {
            return Err(Error::request(
                Field::ControlRange,
                format!(
                    "control_start {start} and control_end {end} must satisfy 0 ≤ start < end ≤ 1 (the fractions of \
                     the steps where the ControlNets apply; defaults 0 and 1)"
                ),
            ));
        }
        if !self.ip_scale.is_finite() {
            return Err(Error::request(
                Field::IpScale,
                format!("ip_scale {} is not a number; give a finite scale (1 is the default, 0 is off)", self.ip_scale),
            ));
        }
        if !(0.0..=1.0).contains(&self.style_cond_tau) {
            return Err(Error::request(
                Field::StyleCondTau,
                format!(
                    "style_cond_tau {} must be in [0, 1] (the fraction of the steps, from the first, that see the \
                     style; 1 is every step)",
                    self.style_cond_tau
                ),
            ));
        }
        if self.guess_mode && self.controls.is_empty() {
            return Err(Error::request(
                Field::GuessMode,
                "guess_mode changes how ControlNets apply, and this request has none; attach a control or drop \
                 guess_mode",
            ));
        }
        Ok(())
    }

    /// The first step index the sampler runs: diffusers' `get_timesteps` —
    /// `init_timestep = min(int(steps × strength), steps)`, `t_start = steps − init_timestep`, and
    /// the sampler starts at `t_start × order` (`set_begin_index`). 0 without an init image.
    fn first_step(&self, m: &Manifest, scheduler: &dyn Scheduler) -> Result<usize> {
        if self.init_image.is_none() {
            if self.strength.is_some() {
                return Err(Error::request(
                    Field::Strength,
                    "strength applies to img2img and inpainting; give an init image, or drop strength",
                ));
            }
            if self.mask.is_some() {
                return Err(Error::request(Field::Mask, "a mask needs the init image it masks; give an init image"));
            }
            if m.inpainting_unet() {
                return Err(Error::request(
                    Field::InitImage,
                    "this graph set's UNet is an inpainting UNet (9 input channels): give an init image and a mask",
                ));
            }
            return Ok(0);
        }
        let default = if self.mask.is_some() { DEFAULT_INPAINT_STRENGTH } else { DEFAULT_IMG2IMG_STRENGTH };
        let strength = self.strength.unwrap_or(default);
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::request(
                Field::Strength,
                format!(
                    "strength {strength} must be in (0, 1]: the fraction of the steps run on the noised init image \
                     (1 starts from pure noise)"
                ),
            ));
        }
        // Python's float arithmetic on the decimal the user typed (0.7 × 10 is 7), as `adapter_calls`.
        let init_timestep = ((self.steps as f64 * python_float(strength)) as usize).min(self.steps);
        if init_timestep == 0 {
            return Err(Error::request(
                Field::Strength,
                format!(
                    "strength {strength} of {} steps leaves no step to run (int(steps × strength) is 0); raise \
                     strength to at least {} or the steps",
                    self.steps,
                    1.0 / self.steps as f64
                ),
            ));
        }
        let first = (self.steps - init_timestep) * scheduler.order();
        if first >= scheduler.num_steps() {
            return Err(Error::request(
                Field::Strength,
                format!("strength {strength} leaves no step of the {} sampler to run; raise it", scheduler.kind()),
            ));
        }
        Ok(first)
    }

    /// Decodes the init image and mask, checked against the output size and the graph set.
    fn init_image(&self, m: &Manifest, limits: &Limits, width: u32, height: u32) -> Result<Option<InitImage>> {
        let Some(source) = &self.init_image else { return Ok(None) };
        if m.graphs.vae_encoder.is_none() {
            return Err(Error::Unsupported(format!(
                "img2img and inpainting need a VAE encoder, and graph set {} has none (it was exported before \
                 format 3); re-export it with this t2i_export",
                m.dir.display()
            )));
        }
        if self.latents.is_some() {
            return Err(Error::request(
                Field::Latents,
                "latents are txt2img's initial noise; img2img and inpainting start from the init image (drop one)",
            ));
        }
        let image = load_image(source, ConditionKind::Rgb, Field::InitImage, limits, width, height)?;
        let pixels = image.to_tensor().mapv(|v| 2.0 * v - 1.0);
        let mask =
            match &self.mask {
                Some(source) => {
                    let mask = load_image(source, ConditionKind::Gray, Field::Mask, limits, width, height)?;
                    Some(mask.to_tensor().mapv(|v| if v < 0.5 { 0.0 } else { 1.0 }))
                }
                None if m.inpainting_unet() => return Err(Error::request(
                    Field::Mask,
                    "this graph set's UNet is an inpainting UNet (9 input channels): give a mask (white is repainted)",
                )),
                None => None,
            };
        debug_assert!(pixels.len_of(Axis(1)) == 3);
        Ok(Some(InitImage { pixels, mask }))
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

/// An init image or mask, decoded within `limits` and converted to `kind`; it must have the output
/// size (diffusers would resize it; resizing silently changes what is kept, so it is refused).
fn load_image(
    source: &ConditionSource,
    kind: ConditionKind,
    field: Field,
    limits: &Limits,
    width: u32,
    height: u32,
) -> Result<ConditionImage> {
    let image = match source {
        ConditionSource::File(path) => ConditionImage::open_within(path, kind, limits)?,
        ConditionSource::Pixels(image) if image.kind() == kind => image.clone(),
        ConditionSource::Pixels(image) => {
            return Err(Error::request(
                field,
                format!("{field} takes {} pixels, got {} channel(s)", kind.pil_mode(), image.kind().channels()),
            ))
        }
    };
    if (image.width(), image.height()) != (width, height) {
        return Err(Error::request(
            field,
            format!(
                "{field} is {}x{} but the output is {width}x{height}; give an image of the output size (or drop the \
                 width and height, and the output takes the init image's size)",
                image.width(),
                image.height()
            ),
        ));
    }
    Ok(image)
}
