//! IP-Adapter end to end against diffusers' `load_ip_adapter` pipelines, on the generated sets of
//! `export/t2i_export/tiny_ip_set.py` (graphs/generated/NAME, fixtures in
//! graphs/generated/fixtures/NAME; generated, not committed: `bash scripts/generate-sets.sh`, which
//! scripts/test.sh runs first, writes them on this machine):
//! `tiny-sd1-ip` (the tiny SD 1 with the tiny plain IP-Adapter and CLIP image encoder) and
//! `tiny-sd1-ip-plus` (the same with the tiny IP-Adapter Plus: Resampler projection, the encoder's
//! penultimate hidden states, negative = the encoder on zero pixels) against
//! `StableDiffusionPipeline` + `ip_adapter_image`, and `tiny-sdxl-ip` / `tiny-sdxl-ip-plus` (the
//! tiny SDXL with a tiny plain / Plus IP-Adapter) against `StableDiffusionXLPipeline` +
//! `ip_adapter_image`.
//!
//! Tolerances: final latents relative L2 ≤ 1e-4 on ort-cpu, openvino and tract (the project's
//! pipeline bound; the cases run 3 to 5 steps, so kernel-order differences have little room to
//! compound).
//! The intermediate image embeddings (and Plus' negative embeddings) and tokens, computed from the
//! runtime's own preprocessing of image.png, within 1e-5 relative L2 (graph_parity.rs's graph
//! bound): preprocessing that is off by one uint8 level anywhere moves the CLIP embedding by more
//! than that. `ip_scale` 0 must equal the run without an image bit for bit: the UNet adds
//! `0 × attention`.
//!
//! Each set's case.json runs from diffusers' initial latents; its cases.json (written by
//! `export/t2i_export/ip_adapter_cases.py`) holds a text + IP case from a seed alone
//! (`RngKind::TorchCpu`: the runtime draws diffusers' `torch.Generator("cpu")` noise itself), and for
//! `tiny-sd1-ip` the IP-Adapter in combination, final latents within the same 1e-4 relative L2 on
//! both backends: with the set's "canny" ControlNet against `StableDiffusionControlNetPipeline`, with
//! img2img (strength 0.7) against `StableDiffusionImg2ImgPipeline`, both from a torch-cpu seed, and
//! with the "sketch" T2I-Adapter against a loop over diffusers' components
//! (`StableDiffusionAdapterPipeline` has no IP-Adapter support). Each case must also land far from
//! its own run without the IP image, and without its ControlNet / T2I-Adapter, so both take part.

mod common;

use std::path::PathBuf;

use common::combo_cases::{combo_cases, ComboCase};
use common::{generated_dir, graphs_dir, rel_l2};
use ndarray::{concatenate, Array4, ArrayD, Axis};
use serde::Deserialize;
use t2i_rt::adapter::ConditionSource;
use t2i_rt::backend::{BackendKind, TensorView};
use t2i_rt::clip_image::{clip_pixel_values, load_clip_image, ClipImageConfig};
use t2i_rt::manifest::{IpNegative, Manifest};
use t2i_rt::{Error, Field, Limits, LoadOptions, Pipeline, Request};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance_scale: f32,
    ip_scale: f32,
    /// "plain" or "plus"
    kind: String,
    /// diffusers' pipeline class
    pipeline: String,
}

/// The IP-Adapter fields of a cases.json entry (the rest: [`ComboCase`]).
#[derive(Deserialize)]
struct IpFields {
    ip_scale: f32,
    /// diffusers' pipeline class, or what stands in for one
    pipeline: String,
}

type IpCase = ComboCase<IpFields>;

/// A generated IP-Adapter set (`export/t2i_export/tiny_ip_set.py`) and its fixtures.
#[derive(Clone, Copy)]
enum IpSet {
    /// tiny-sd1 + the tiny plain IP-Adapter, with a T2I-Adapter and a ControlNet.
    Sd1,
    /// tiny-sd1 + the tiny IP-Adapter Plus.
    Sd1Plus,
    /// tiny-sdxl + a tiny plain IP-Adapter.
    Sdxl,
    /// tiny-sdxl + a tiny IP-Adapter Plus.
    SdxlPlus,
}

const IP_SETS: [IpSet; 4] = [IpSet::Sd1, IpSet::Sd1Plus, IpSet::Sdxl, IpSet::SdxlPlus];

impl IpSet {
    fn name(self) -> &'static str {
        match self {
            IpSet::Sd1 => "tiny-sd1-ip",
            IpSet::Sd1Plus => "tiny-sd1-ip-plus",
            IpSet::Sdxl => "tiny-sdxl-ip",
            IpSet::SdxlPlus => "tiny-sdxl-ip-plus",
        }
    }

    fn dir(self) -> PathBuf {
        generated_dir().join(self.name())
    }

    fn fixtures(self) -> PathBuf {
        generated_dir().join("fixtures").join(self.name())
    }

    fn case(self) -> Case {
        serde_json::from_str(&std::fs::read_to_string(self.fixtures().join("case.json")).unwrap()).unwrap()
    }

    fn npy(self, name: &str) -> ArrayD<f32> {
        ndarray_npy::read_npy(self.fixtures().join(name)).unwrap()
    }

    /// The fixture's request: its prompt, guidance, steps, scale and image, from diffusers' initial
    /// latents.
    fn request(self) -> Request {
        let case = self.case();
        let mut r = Request::new(case.prompt);
        r.negative_prompt = Some(case.negative_prompt);
        r.steps = case.steps;
        r.guidance = case.guidance_scale;
        r.latents = Some(self.npy("latents_init.npy").into_dimensionality().unwrap());
        r.ip_image = Some(ConditionSource::File(self.fixtures().join("image.png")));
        r.ip_scale = case.ip_scale;
        r
    }

    fn pipeline(self, backend: BackendKind) -> Pipeline {
        Pipeline::load(&self.dir(), &LoadOptions { backend, ..LoadOptions::default() }).unwrap()
    }
}

fn run(pipeline: &mut Pipeline, request: &Request) -> Array4<f32> {
    pipeline.run(request, &mut |_| true).unwrap().latents
}

fn check_final_latents(set: IpSet, backend: BackendKind) {
    let case = set.case();
    let kind = if set.name().contains("plus") { "plus" } else { "plain" };
    assert_eq!(case.kind, kind, "{}: case.json is of a {} IP-Adapter", set.name(), case.kind);
    let mut p = set.pipeline(backend);
    let got = run(&mut p, &set.request()).into_dyn();
    let want = set.npy("latents.npy");
    let err = rel_l2(&got, &want);
    eprintln!("{backend} {} final latents ({}): rel L2 {err:.3e}", set.name(), case.pipeline);
    assert!(err <= 1e-4, "{backend} {}: final latents rel L2 {err:.3e} > 1e-4", set.name());
    // The image matters: without it the latents land far from diffusers'.
    let mut without = set.request();
    without.ip_image = None;
    let off = rel_l2(&run(&mut p, &without).into_dyn(), &want);
    assert!(off > 1e-2, "{backend} {}: the IP image moves the result by only {off:.3e}", set.name());
}

fn combo_request(set: IpSet, case: &IpCase) -> Request {
    let mut r = case.request(&set.fixtures());
    r.ip_image = Some(ConditionSource::File(set.fixtures().join("image.png")));
    r.ip_scale = case.extra.ip_scale;
    r
}

/// Every case of `set`'s cases.json within 1e-4, each far from its run without the IP image (and
/// without its ControlNet / T2I-Adapter).
fn check_cases(set: IpSet, backend: BackendKind) {
    let cases: Vec<IpCase> = combo_cases(&set.fixtures());
    let has = |what: &str, f: &dyn Fn(&IpCase) -> bool| {
        assert!(cases.iter().any(f), "{}: no IP-Adapter case {what}", set.name())
    };
    has("of text alone from a torch-cpu seed through diffusers' text-to-image pipeline", &|c| {
        c.adapters.is_empty()
            && c.controls.is_empty()
            && c.init_image.is_none()
            && c.latents.is_none()
            && c.rng.as_deref() == Some("torch-cpu")
            && c.reference == "pipeline"
    });
    if let IpSet::Sd1 = set {
        has("with a ControlNet through diffusers' pipeline", &|c| !c.controls.is_empty() && c.reference == "pipeline");
        has("with img2img through diffusers' pipeline", &|c| c.init_image.is_some() && c.reference == "pipeline");
        has("with a T2I-Adapter", &|c| !c.adapters.is_empty());
    }
    let mut p = set.pipeline(backend);
    for case in &cases {
        let want = case.expected(&set.fixtures());
        let request = combo_request(set, case);
        let err = rel_l2(&run(&mut p, &request).into_dyn(), &want);
        eprintln!("{backend} {} {} ({}): final latents rel L2 {err:.3e}", set.name(), case.name, case.extra.pipeline);
        assert!(err <= 1e-4, "{backend} {} {}: final latents rel L2 {err:.3e} > 1e-4", set.name(), case.name);
        let mut without = request.clone();
        without.ip_image = None;
        let off = rel_l2(&run(&mut p, &without).into_dyn(), &want);
        assert!(off > 1e-2, "{backend} {} {}: the IP image moves the result by only {off:.3e}", set.name(), case.name);
        // and so do the ControlNet / T2I-Adapter beside it
        if !(request.controls.is_empty() && request.adapters.is_empty()) {
            let mut alone = request;
            alone.controls.clear();
            alone.adapters.clear();
            let off = rel_l2(&run(&mut p, &alone).into_dyn(), &want);
            assert!(off > 1e-2, "{backend} {}: the ControlNet / adapter moves the result by only {off:.3e}", case.name);
        }
    }
}

#[test]
fn combinations_match_diffusers_on_ort_cpu() {
    check_cases(IpSet::Sd1, BackendKind::OrtCpu);
}

#[test]
fn combinations_match_diffusers_on_tract() {
    check_cases(IpSet::Sd1, BackendKind::Tract);
}

#[test]
fn final_latents_match_diffusers_on_ort_cpu() {
    check_final_latents(IpSet::Sd1, BackendKind::OrtCpu);
}

#[test]
fn final_latents_match_diffusers_on_tract() {
    check_final_latents(IpSet::Sd1, BackendKind::Tract);
}

#[test]
fn plus_matches_diffusers_on_ort_cpu() {
    check_final_latents(IpSet::Sd1Plus, BackendKind::OrtCpu);
    check_cases(IpSet::Sd1Plus, BackendKind::OrtCpu);
}

#[test]
fn plus_matches_diffusers_on_tract() {
    check_final_latents(IpSet::Sd1Plus, BackendKind::Tract);
    check_cases(IpSet::Sd1Plus, BackendKind::Tract);
}

#[test]
fn sdxl_matches_diffusers_on_ort_cpu() {
    check_final_latents(IpSet::Sdxl, BackendKind::OrtCpu);
    check_cases(IpSet::Sdxl, BackendKind::OrtCpu);
    check_final_latents(IpSet::SdxlPlus, BackendKind::OrtCpu);
    check_cases(IpSet::SdxlPlus, BackendKind::OrtCpu);
}

#[test]
fn sdxl_matches_diffusers_on_tract() {
    check_final_latents(IpSet::Sdxl, BackendKind::Tract);
    check_cases(IpSet::Sdxl, BackendKind::Tract);
    check_final_latents(IpSet::SdxlPlus, BackendKind::Tract);
    check_cases(IpSet::SdxlPlus, BackendKind::Tract);
}

#[test]
fn every_ip_set_matches_diffusers_on_openvino() {
    for set in IP_SETS {
        check_final_latents(set, BackendKind::OpenVino);
        check_cases(set, BackendKind::OpenVino);
    }
}

/// The runtime's preprocessing of image.png through each set's image encoder and projection gives
/// diffusers' `image_embeds` and `[negative; image]` tokens, with the manifest's negative: zero
/// embeds (plain), or the encoder on zero pixels, checked against diffusers' `negative_image_embeds`
/// (Plus).
#[test]
fn image_embeds_and_tokens_match_diffusers() {
    for set in IP_SETS {
        let manifest = Manifest::load(&set.dir(), true).unwrap();
        let ip = manifest.ip_adapter.as_ref().unwrap();
        let pre = &ip.preprocess;
        let config = ClipImageConfig {
            image_mean: pre.mean,
            image_std: pre.std,
            rescale_factor: pre.rescale_factor,
            ..ClipImageConfig::default()
        };
        let image = load_clip_image(&set.fixtures().join("image.png"), &config, &Limits::default()).unwrap();
        let pixels = clip_pixel_values(&image, &config).unwrap().into_dyn();
        let rows = match ip.negative {
            IpNegative::ZeroEmbeds => pixels,
            IpNegative::ZeroPixelValues => {
                concatenate(Axis(0), &[ArrayD::zeros(pixels.raw_dim()).view(), pixels.view()]).unwrap()
            }
        };
        let backend = BackendKind::OrtCpu.create(None).unwrap();
        let encoder = backend.load("image_encoder", &manifest.resolve(&ip.image_encoder.file).unwrap()).unwrap();
        let encoded = encoder.session().unwrap().run(&[("pixel_values", TensorView::F32(rows.view()))]).unwrap();
        let encoded = &encoded[0];
        let last = encoded.shape()[0] - 1;
        let embeds = encoded.slice_axis(Axis(0), (last..).into()).to_owned();
        let err = rel_l2(&embeds, &set.npy("image_embeds.npy"));
        eprintln!("{} image_embeds: rel L2 {err:.3e}", set.name());
        assert!(err <= 1e-5, "{} image_embeds rel L2 {err:.3e} > 1e-5", set.name());
        let negative = match ip.negative {
            IpNegative::ZeroEmbeds => ArrayD::zeros(embeds.raw_dim()),
            IpNegative::ZeroPixelValues => {
                let negative = encoded.slice_axis(Axis(0), (..1).into()).to_owned();
                let err = rel_l2(&negative, &set.npy("negative_image_embeds.npy"));
                eprintln!("{} negative_image_embeds: rel L2 {err:.3e}", set.name());
                assert!(err <= 1e-5, "{} negative_image_embeds rel L2 {err:.3e} > 1e-5", set.name());
                negative
            }
        };
        let rows = concatenate(Axis(0), &[negative.view(), embeds.view()]).unwrap();
        let projection =
            backend.load("image_projection", &manifest.resolve(&ip.image_projection.file).unwrap()).unwrap();
        let tokens = projection.session().unwrap().run(&[("image_embeds", TensorView::F32(rows.view()))]).unwrap();
        let err = rel_l2(&tokens[0], &set.npy("ip_tokens.npy"));
        eprintln!("{} ip_tokens: rel L2 {err:.3e}", set.name());
        assert!(err <= 1e-5, "{} ip_tokens rel L2 {err:.3e} > 1e-5", set.name());
    }
}

/// `ip_scale` 0 is exactly no IP-Adapter; a repeated image (served from the embedding cache)
/// gives the same latents as the first run.
#[test]
fn scale_zero_is_no_image_bit_for_bit() {
    for set in IP_SETS {
        let mut p = set.pipeline(BackendKind::OrtCpu);
        let mut zero = set.request();
        zero.ip_scale = 0.0;
        let mut without = set.request();
        without.ip_image = None;
        assert_eq!(run(&mut p, &zero), run(&mut p, &without), "{}", set.name());
        let first = run(&mut p, &set.request());
        assert_eq!(run(&mut p, &set.request()), first, "{}", set.name());
    }
}

#[test]
fn an_ip_image_needs_a_set_with_an_ip_adapter() {
    let manifest = Manifest::load(&graphs_dir().join("tiny-sd1"), false).unwrap();
    let mut r = IpSet::Sd1.request();
    r.latents = None;
    match r.check(&manifest, &Limits::default()) {
        Err(Error::InvalidRequest { field: Field::IpImage, message }) => {
            assert!(message.contains("--ip-adapter"), "{message}")
        }
        other => panic!("expected an ip_image error, got {:?}", other.err()),
    }
}

#[test]
fn an_unreadable_ip_image_is_one_line() {
    let manifest = Manifest::load(&IpSet::Sd1.dir(), false).unwrap();
    let dir = std::env::temp_dir().join(format!("t2i-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    for path in [broken, dir.join("missing.png")] {
        let mut r = IpSet::Sd1.request();
        r.ip_image = Some(ConditionSource::File(path.clone()));
        let e = r.check(&manifest, &Limits::default()).err().expect("refused").to_string();
        assert!(!e.contains('\n') && e.contains(&*path.to_string_lossy()), "{e}");
    }
    let mut r = IpSet::Sd1.request();
    r.ip_scale = f32::NAN;
    assert!(matches!(r.check(&manifest, &Limits::default()), Err(Error::InvalidRequest { field: Field::IpScale, .. })));
    std::fs::remove_dir_all(&dir).ok();
}
