//! The whole pipeline against diffusers (graphs/fixtures/tiny-*/cases.json): the same prompt,
//! negative prompt, condition images, adapter weights, cond_tau, sampler and initial latents must
//! give diffusers' final latents and images. SD 1.x against `StableDiffusionAdapterPipeline` (and
//! its loop with cond_tau), SD 2.x (v-prediction) against the same pipeline, SDXL against
//! `StableDiffusionXLAdapterPipeline` (one adapter; two adapters with cond_tau 0.5 and size/crop
//! conditioning). One SD 2.x case gives no size: the runtime takes the manifest's `default_size`
//! (768x768, SD 2.1 768-v's) and must land on diffusers' 768x768 result. In SD 1.x every
//! deterministic sampler has a case run through diffusers' own pipeline, with request scheduler
//! options and guidance_rescale too; every stochastic one has a case that passes diffusers no
//! latents but `generator=torch.Generator("cpu").manual_seed(seed)` (`"rng": "torch-cpu"` in
//! cases.json), which the runtime must reproduce from the seed alone with [`RngKind::TorchCpu`]:
//! the initial latents and then every step's noise.
//!
//! img2img and inpainting, all from a seed alone: `StableDiffusionImg2ImgPipeline` (the set's own
//! sampler and Euler with two images), `StableDiffusionXLImg2ImgPipeline`,
//! `StableDiffusionInpaintPipeline` with the 9-channel inpainting UNet of `tiny-sd1-inpaint` and
//! with the regular 4-channel UNet (latent blending; strength 1 and below),
//! `StableDiffusionXLInpaintPipeline`, and img2img + T2I-Adapter against a loop over diffusers'
//! components (no diffusers pipeline combines them). The VAE posterior sample, the noise and the
//! masked image's sample are drawn from the one generator in diffusers' order.
//!
//! ControlNets (cases with `controls`, when the set ships them) against
//! `StableDiffusionControlNetPipeline`: scales, `control_guidance_start/end`, guess mode and
//! several ControlNets at once, with the same tolerances.
//!
//! Tolerances (from the project's requirements): final latents relative L2 ≤ 1e-4 and every pixel
//! within 2/255 on ort-cpu and openvino (f32); tract ≤ 1e-3 relative L2 (its kernels sum in another order, and the
//! differences compound over the steps) and the same 2/255 pixel bound.
//!
//! The fp16 set (`tiny-sd1-fp16`, the same weights exported with `--precision fp16`) is held to the
//! fp32 diffusers fixtures within 5e-3 relative L2 and 2/255: diffusers' own fp16 pipeline is up to
//! 3.53e-3 from them on these cases (calibration/README.md), so the bound is "no further from fp32
//! than diffusers' fp16 is, with 40 % margin"; a wrong cast or an overflow lands far outside it.
//! One inpainting case where fp16 rounding alone exceeds that bound, in diffusers' fp16 too, is
//! not run on the fp16 set ([`FP16_ROUNDING_BOUND`]).

mod common;

use std::path::PathBuf;

use ndarray::{Array4, ArrayD};
use serde::Deserialize;
use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::BackendKind;
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::rng::RngKind;
use t2i_rt::scheduler::SchedulerKind;
use t2i_rt::{ControlRequest, LoadOptions, Pipeline, Request, SizeConditioning};

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    adapters: Vec<CaseAdapter>,
    cond_tau: f32,
    steps: usize,
    guidance: f32,
    scheduler: String,
    /// `null`: the request gives no size, so the runtime takes the manifest's `default_size`.
    width: Option<u32>,
    height: Option<u32>,
    n_samples: usize,
    /// `null`: diffusers drew the latents (and step noise) from `rng` seeded with `seed`.
    latents: Option<String>,
    seed: u64,
    rng: Option<String>,
    #[serde(default)]
    eta: f32,
    expected_latents: String,
    expected_images: Vec<String>,
    reference: String,
    #[serde(default)]
    scheduler_options: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    guidance_rescale: f32,
    #[serde(default)]
    size_cond: CaseSizeCond,
    /// img2img and inpainting: the picture to start from, the mask (white is repainted), strength.
    #[serde(default)]
    init_image: Option<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    strength: Option<f32>,
    /// ControlNets (`StableDiffusionControlNetPipeline`): name, control image, scale.
    #[serde(default)]
    controls: Vec<CaseControl>,
    #[serde(default)]
    control_start: Option<f32>,
    #[serde(default)]
    control_end: Option<f32>,
    #[serde(default)]
    guess_mode: Option<bool>,
}

#[derive(Deserialize)]
struct CaseControl {
    name: String,
    image: String,
    scale: f32,
}

/// diffusers' SDXL size conditioning: (height, width) / (top, left) pairs.
#[derive(Deserialize, Default)]
struct CaseSizeCond {
    original_size: Option<(u32, u32)>,
    crops_coords_top_left: Option<(u32, u32)>,
    target_size: Option<(u32, u32)>,
    negative_original_size: Option<(u32, u32)>,
    negative_crops_coords_top_left: Option<(u32, u32)>,
    negative_target_size: Option<(u32, u32)>,
}

#[derive(Deserialize)]
struct CaseAdapter {
    name: String,
    image: String,
    weight: f32,
}

fn cases(set: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(common::tiny_fixtures(set).join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_backend(backend: BackendKind, latent_tolerance: f64) {
    check_set(backend, latent_tolerance, "tiny-sd1");
}

fn check_set(backend: BackendKind, latent_tolerance: f64, set: &str) {
    check_graphs(backend, latent_tolerance, set, set);
}

/// Runs graph set `graphs` against the fixtures of `set` (the same weights: `tiny-sd1-fp16` is the
/// tiny SD1 checkpoint exported in fp16).
fn check_graphs(backend: BackendKind, latent_tolerance: f64, graphs: &str, set: &str) {
    let fixture = |path: &str| -> PathBuf { common::tiny_fixtures(set).join(path) };
    let mut pipeline =
        Pipeline::load(&common::tiny_set(graphs), &LoadOptions { backend, ..LoadOptions::default() }).unwrap();
    let cases = cases(set);
    for required in ["ddim", "euler"].into_iter().filter(|_| set == "tiny-sd1") {
        assert!(
            cases.iter().any(|c| c.scheduler == required
                && c.adapters.len() >= 2
                && c.cond_tau < 1.0
                && c.negative_prompt.is_some()),
            "no case with {required}, two adapters, cond_tau < 1 and a negative prompt"
        );
    }
    assert!(cases.iter().any(|c| c.reference == "pipeline"), "no case checked against diffusers' pipeline itself");
    for kind in SchedulerKind::ALL.into_iter().filter(|k| !k.is_stochastic() && set == "tiny-sd1") {
        assert!(
            cases.iter().any(|c| c.scheduler == kind.as_str() && c.reference == "pipeline"),
            "no case runs the {kind} sampler through diffusers' pipeline"
        );
    }
    for kind in SchedulerKind::ALL.into_iter().filter(|k| k.is_stochastic() && set == "tiny-sd1") {
        assert!(
            cases.iter().any(|c| c.scheduler == kind.as_str() && c.latents.is_none() && c.reference == "pipeline"),
            "no case runs the {kind} sampler through diffusers' pipeline with a seeded generator"
        );
    }
    if set == "tiny-sd2" {
        // SD 2.1 768-v's size, reached through the manifest's default_size (the image size check below)
        assert!(cases.iter().any(|c| c.width.is_none() && c.height.is_none()), "no case at the default size");
    }
    if set == "tiny-sd1" {
        assert!(cases.iter().any(|c| c.guidance_rescale > 0.0), "no guidance_rescale case");
        assert!(cases.iter().any(|c| !c.scheduler_options.is_empty()), "no case with scheduler options");
    }
    // img2img and inpainting, each from the seed alone (no latents): diffusers' pipelines where
    // they exist; img2img + adapter against a loop over diffusers' components.
    let img2img = |c: &&Case| c.init_image.is_some() && c.mask.is_none() && c.latents.is_none();
    let inpaint = |c: &&Case| c.mask.is_some() && c.latents.is_none();
    if set == "tiny-sd1" || set == "tiny-sdxl" {
        assert!(cases.iter().filter(img2img).any(|c| c.reference == "pipeline"), "{set}: no img2img case");
        assert!(cases.iter().filter(inpaint).any(|c| c.reference == "pipeline"), "{set}: no 4-channel inpaint case");
    }
    if set == "tiny-sd1" {
        assert!(cases.iter().filter(img2img).any(|c| !c.adapters.is_empty()), "no img2img + adapter case");
        assert!(cases.iter().filter(inpaint).any(|c| c.strength.is_some_and(|s| s < 1.0)), "no partial inpaint");
    }
    if set == "tiny-sd1-inpaint" {
        assert!(cases.iter().filter(inpaint).any(|c| c.reference == "pipeline"), "no 9-channel inpaint case");
    }
    // A set that ships ControlNets must prove them against diffusers' ControlNet pipeline.
    if !pipeline.manifest().controlnets.is_empty() && graphs == set {
        assert!(
            cases.iter().any(|c| !c.controls.is_empty() && c.reference == "pipeline"),
            "{set} has ControlNets but no ControlNet case"
        );
    }
    // A variant export of the same weights (the fp16 set) ships the same ControlNets and runs
    // their cases too.
    for case in
        cases.iter().filter(|c| !(graphs.ends_with("-fp16") && FP16_ROUNDING_BOUND.contains(&c.name.as_str())))
    {
        let mut request = Request::new(case.prompt.clone());
        request.negative_prompt = case.negative_prompt.clone();
        request.adapters = case
            .adapters
            .iter()
            .map(|a| {
                // Both condition sources must give diffusers' result: the gray sketch goes in as
                // decoded pixels (how a service passes an upload), the others as files.
                let image = if a.name == "sketch" || a.name == "canny" {
                    ConditionSource::Pixels(ConditionImage::open(&fixture(&a.image), ConditionKind::Gray).unwrap())
                } else {
                    ConditionSource::File(fixture(&a.image))
                };
                AdapterRequest { name: a.name.clone(), image, weight: a.weight, preprocess: Vec::new() }
            })
            .collect();
        request.cond_tau = case.cond_tau;
        request.steps = case.steps;
        request.guidance = case.guidance;
        request.scheduler = Some(case.scheduler.parse().unwrap());
        request.scheduler_options = case.scheduler_options.clone();
        request.guidance_rescale = case.guidance_rescale;
        request.width = case.width;
        request.height = case.height;
        request.n_samples = case.n_samples;
        request.eta = case.eta;
        match (&case.latents, &case.rng) {
            (Some(latents), _) => {
                request.latents = Some(ndarray_npy::read_npy::<_, Array4<f32>>(fixture(latents)).unwrap())
            }
            (None, Some(rng)) => {
                request.seed = case.seed;
                request.rng = rng.parse::<RngKind>().unwrap();
                assert_eq!(request.rng, RngKind::TorchCpu, "{}", case.name);
            }
            (None, None) => panic!("{}: neither latents nor a generator", case.name),
        }
        let sc = &case.size_cond;
        request.size_cond = SizeConditioning {
            original_size: sc.original_size,
            crops_coords_top_left: sc.crops_coords_top_left.unwrap_or((0, 0)),
            target_size: sc.target_size,
            negative_original_size: sc.negative_original_size,
            negative_crops_coords_top_left: sc.negative_crops_coords_top_left.unwrap_or((0, 0)),
            negative_target_size: sc.negative_target_size,
        };
        // The init image goes in as decoded pixels (a service's upload), the mask as a file.
        request.init_image = case
            .init_image
            .as_ref()
            .map(|path| ConditionSource::Pixels(ConditionImage::open(&fixture(path), ConditionKind::Rgb).unwrap()));
        request.mask = case.mask.as_ref().map(|path| ConditionSource::File(fixture(path)));
        request.strength = case.strength;
        request.controls = case
            .controls
            .iter()
            .map(|c| ControlRequest {
                name: c.name.clone(),
                image: ConditionSource::File(fixture(&c.image)),
                scale: c.scale,
                preprocess: Vec::new(),
            })
            .collect();
        if let Some(start) = case.control_start {
            request.control_start = start;
        }
        if let Some(end) = case.control_end {
            request.control_end = end;
        }
        request.guess_mode = case.guess_mode.unwrap_or(false);
        let generation = pipeline.run(&request, &mut |_| true).unwrap();

        let expected: ArrayD<f32> = ndarray_npy::read_npy(fixture(&case.expected_latents)).unwrap();
        let rel = common::rel_l2(&generation.latents.clone().into_dyn(), &expected);
        assert_eq!(generation.images.len(), case.expected_images.len(), "{}: image count", case.name);
        let mut worst_pixel = 0u8;
        for (image, path) in generation.images.iter().zip(&case.expected_images) {
            let want = image::open(fixture(path)).unwrap().to_rgb8();
            assert_eq!(image.dimensions(), want.dimensions(), "{}: image size", case.name);
            for (a, b) in image.as_raw().iter().zip(want.as_raw()) {
                worst_pixel = worst_pixel.max(a.abs_diff(*b));
            }
        }
        eprintln!(
            "{backend} {graphs} {} ({}): latents rel L2 {rel:.2e}, max pixel diff {worst_pixel}/255",
            case.name, case.reference
        );
        assert!(rel <= latent_tolerance, "{backend} {}: latents rel L2 {rel:.3e} > {latent_tolerance:e}", case.name);
        assert!(worst_pixel <= 2, "{backend} {}: a pixel differs by {worst_pixel}/255 > 2/255", case.name);
    }
}

#[test]
fn ort_cpu_pipeline_equals_diffusers() {
    check_backend(BackendKind::OrtCpu, 1e-4);
}

#[test]
fn tract_pipeline_equals_diffusers() {
    check_backend(BackendKind::Tract, 1e-3);
}

#[test]
fn ort_cpu_sdxl_pipeline_equals_diffusers() {
    check_set(BackendKind::OrtCpu, 1e-4, "tiny-sdxl");
}

#[test]
fn tract_sdxl_pipeline_equals_diffusers() {
    check_set(BackendKind::Tract, 1e-3, "tiny-sdxl");
}

#[test]
fn ort_cpu_sd2_pipeline_equals_diffusers() {
    check_set(BackendKind::OrtCpu, 1e-4, "tiny-sd2");
}

#[test]
fn tract_sd2_pipeline_equals_diffusers() {
    check_set(BackendKind::Tract, 1e-3, "tiny-sd2");
}

#[test]
fn ort_cpu_inpainting_unet_equals_diffusers() {
    check_set(BackendKind::OrtCpu, 1e-4, "tiny-sd1-inpaint");
}

#[test]
fn tract_inpainting_unet_equals_diffusers() {
    check_set(BackendKind::Tract, 1e-3, "tiny-sd1-inpaint");
}

#[test]
fn openvino_pipeline_equals_diffusers() {
    check_backend(BackendKind::OpenVino, 1e-4);
}

#[test]
fn openvino_sdxl_sd2_and_inpainting_pipelines_equal_diffusers() {
    for set in ["tiny-sdxl", "tiny-sd2", "tiny-sd1-inpaint"] {
        check_set(BackendKind::OpenVino, 1e-4, set);
    }
}

/// Cases where fp16 rounding alone moves pixels further than the fp16 bound, whatever computes
/// in fp16: in `z2_inpaint_euler_strength075_pipeline` (Euler, 4 of 6 steps, inpainting) diffusers'
/// own fp16 pipeline lands 3 to 8 levels from fp32 depending only on rounding order, and the fp16
/// set 4 to 7 (calibration/README.md: per-graph split, rounding spread, where the pixels differ).
/// The fp16 VAE encoder path it exercises is held to the bound by `z_inpaint_ddim_pipeline`.
const FP16_ROUNDING_BOUND: [&str; 1] = ["z2_inpaint_euler_strength075_pipeline"];

#[test]
fn ort_cpu_fp16_set_is_within_fp16_error_of_diffusers() {
    check_graphs(BackendKind::OrtCpu, 5e-3, "tiny-sd1-fp16", "tiny-sd1");
}

#[test]
fn openvino_fp16_set_is_within_fp16_error_of_diffusers() {
    check_graphs(BackendKind::OpenVino, 5e-3, "tiny-sd1-fp16", "tiny-sd1");
}

#[test]
fn tract_refuses_fp16_sets_clearly() {
    let options = LoadOptions { backend: BackendKind::Tract, ..LoadOptions::default() };
    let err = Pipeline::load(&common::tiny_set("tiny-sd1-fp16"), &options).err().expect("tract loaded an fp16 set");
    assert!(err.to_string().contains("tract cannot run fp16 graphs (text_encoder in "), "{err}");
}
