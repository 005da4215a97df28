//! Style adapter end to end against the reference: `graphs/generated/tiny-sd1-style` (the tiny SD 1
//! with the tiny TencentARC style adapter and CLIP vision encoder) must reproduce a DDIM loop over
//! diffusers' UNet whose context is built by export/t2i_export/style_adapter.py's ports of
//! TencentARC's code (graphs/generated/fixtures/tiny-sd1-style). Both are generated, not committed:
//! `bash scripts/generate-sets.sh` (scripts/test.sh runs it first). Two style images, weights 1.0 and 0.5; `tau1` styles all 4 steps, `tau05` the
//! first 2 only (then the plain 77-token contexts), so both context phases run.
//!
//! Tolerances: final latents relative L2 ≤ 1e-4 on ort-cpu, openvino and tract (the project's pipeline
//! bound; 4 DDIM steps leave kernel-order differences little room to compound). The combined style
//! tokens, from the runtime's own preprocessing of the two PNGs through the set's graphs, within
//! 1e-5 relative L2 (graph_parity.rs's graph bound): preprocessing off by one uint8 level anywhere
//! moves the CLIP hidden states by more than that.
//!
//! The style adapter in combination (graphs/generated/fixtures/tiny-sd1-style/cases.json, written by
//! `export/t2i_export/style_cases.py` with the same reference loop), final latents within the same
//! 1e-4 relative L2 on both backends: with the set's "sketch" T2I-Adapter (style_cond_tau 0.5, from
//! explicit latents), and with img2img (strength 0.7 of 5 steps, style_cond_tau 0.7, so the run
//! starts styled and ends plain) from a seed alone (`RngKind::TorchCpu`: the runtime draws the VAE
//! sample and the noise of `StableDiffusionImg2ImgPipeline.prepare_latents` itself). Each case must
//! also land far from its own run without the style images, and without its T2I-Adapter, so both
//! take part. And beside an IP-Adapter: `graphs/generated/tiny-sd1-ip-style` (the same tiny SD 1,
//! style adapter and tiny plain IP-Adapter) against the same loop with the embeds of diffusers'
//! `load_ip_adapter` (style_cond_tau 0.5, IP scale 0.6), within the same bound and far from the run
//! without either.

mod common;

use std::path::{Path, PathBuf};

use common::combo_cases::{combo_cases, final_latents, load_pipeline, ComboCase};
use common::{generated_dir, graphs_dir, rel_l2};
use ndarray::{concatenate, Array4, ArrayD, Axis};
use serde::Deserialize;
use t2i_rt::adapter::ConditionSource;
use t2i_rt::backend::{BackendKind, TensorView};
use t2i_rt::clip_image::{clip_pixel_values, load_clip_image, ClipImageConfig};
use t2i_rt::manifest::Manifest;
use t2i_rt::{Error, Field, Limits, Pipeline, Request, SchedulerKind, StyleRequest};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance_scale: f32,
    weights: Vec<f32>,
    cases: std::collections::BTreeMap<String, f32>,
}

fn set() -> PathBuf {
    generated_dir().join("tiny-sd1-style")
}

fn fixtures() -> PathBuf {
    generated_dir().join("fixtures/tiny-sd1-style")
}

fn case() -> Case {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("case.json")).unwrap()).unwrap()
}

fn npy(name: &str) -> ArrayD<f32> {
    ndarray_npy::read_npy(fixtures().join(name)).unwrap()
}

/// FIXTURES/style_0.png, style_1.png, … with `weights`.
fn styles_with(fixtures: &Path, weights: &[f32]) -> Vec<StyleRequest> {
    weights
        .iter()
        .enumerate()
        .map(|(k, &weight)| StyleRequest {
            image: ConditionSource::File(fixtures.join(format!("style_{k}.png"))),
            weight,
        })
        .collect()
}

fn styles() -> Vec<StyleRequest> {
    styles_with(&fixtures(), &case().weights)
}

/// The fixture's request at `style_cond_tau`: its prompt, guidance, steps and style images, DDIM
/// (eta 0) from the reference's initial latents.
fn request(tau: f32) -> Request {
    let case = case();
    let mut r = Request::new(case.prompt);
    r.negative_prompt = Some(case.negative_prompt);
    r.steps = case.steps;
    r.guidance = case.guidance_scale;
    r.scheduler = Some(SchedulerKind::Ddim);
    r.latents = Some(npy("latents_init.npy").into_dimensionality().unwrap());
    r.styles = styles();
    r.style_cond_tau = tau;
    r
}

fn pipeline(backend: BackendKind) -> Pipeline {
    load_pipeline(&set(), backend)
}

fn run(pipeline: &mut Pipeline, request: &Request) -> Array4<f32> {
    final_latents(pipeline, request)
}

fn check_final_latents(backend: BackendKind) {
    let mut p = pipeline(backend);
    for (name, &tau) in &case().cases {
        let got = run(&mut p, &request(tau)).into_dyn();
        let want = npy(&format!("latents_{name}.npy"));
        let err = rel_l2(&got, &want);
        eprintln!("{backend} tiny-sd1-style {name} (style_cond_tau {tau}) final latents: rel L2 {err:.3e}");
        assert!(err <= 1e-4, "{backend} {name}: final latents rel L2 {err:.3e} > 1e-4");
    }
    // The style matters: without it the latents land far from the reference.
    let mut without = request(1.0);
    without.styles.clear();
    let off = rel_l2(&run(&mut p, &without).into_dyn(), &npy("latents_tau1.npy"));
    assert!(off > 1e-2, "{backend}: the style images move the result by only {off:.3e}");
}

/// What a case of cases.json adds to the shared fields: the style images' weights and tau, and in
/// tiny-sd1-ip-style's the IP image and scale.
#[derive(Deserialize)]
struct StyleFields {
    style_weights: Vec<f32>,
    style_cond_tau: f32,
    #[serde(default)]
    ip_image: Option<String>,
    #[serde(default)]
    ip_scale: Option<f32>,
}

/// The cases of `name`'s cases.json (a generated set and its fixtures), each against the
/// reference's final latents; each also lands far from its own run without the style images, and
/// without its T2I-Adapter / IP image.
/// Which cases a set's cases.json must hold, by what they cover.
type CaseFilter = fn(&ComboCase<StyleFields>) -> bool;

fn check_cases(backend: BackendKind, name: &str, expect: &[(&str, CaseFilter)]) {
    let fixtures = generated_dir().join("fixtures").join(name);
    let cases: Vec<ComboCase<StyleFields>> = combo_cases(&fixtures);
    for (what, f) in expect {
        assert!(cases.iter().any(f), "{name}: no style case {what}");
    }
    let mut p = load_pipeline(&generated_dir().join(name), backend);
    for case in &cases {
        let want = case.expected(&fixtures);
        let mut request = case.request(&fixtures);
        request.scheduler = Some(SchedulerKind::Ddim);
        request.styles = styles_with(&fixtures, &case.extra.style_weights);
        request.style_cond_tau = case.extra.style_cond_tau;
        request.ip_image = case.extra.ip_image.as_ref().map(|rel| ConditionSource::File(fixtures.join(rel)));
        request.ip_scale = case.extra.ip_scale.unwrap_or(1.0);
        let err = rel_l2(&run(&mut p, &request).into_dyn(), &want);
        eprintln!("{backend} {name} {} ({}): final latents rel L2 {err:.3e}", case.name, case.reference);
        assert!(err <= 1e-4, "{backend} {}: final latents rel L2 {err:.3e} > 1e-4", case.name);
        let mut without = request.clone();
        without.styles.clear();
        let off = rel_l2(&run(&mut p, &without).into_dyn(), &want);
        assert!(off > 1e-2, "{backend} {}: the style images move the result by only {off:.3e}", case.name);
        if !request.adapters.is_empty() || request.ip_image.is_some() {
            let mut alone = request;
            alone.adapters.clear();
            alone.ip_image = None;
            let off = rel_l2(&run(&mut p, &alone).into_dyn(), &want);
            assert!(
                off > 1e-2,
                "{backend} {}: the T2I-Adapter / IP image moves the result by only {off:.3e}",
                case.name
            );
        }
    }
}

fn check_combinations(backend: BackendKind) {
    check_cases(
        backend,
        "tiny-sd1-style",
        &[
            ("with a T2I-Adapter", |c| !c.adapters.is_empty()),
            ("with img2img from a torch-cpu seed", |c| {
                c.init_image.is_some() && c.latents.is_none() && c.rng.as_deref() == Some("torch-cpu")
            }),
        ],
    );
    check_cases(backend, "tiny-sd1-ip-style", &[("with an IP image", |c| c.extra.ip_image.is_some())]);
}

#[test]
fn combinations_match_the_reference_on_ort_cpu() {
    check_combinations(BackendKind::OrtCpu);
}

#[test]
fn combinations_match_the_reference_on_tract() {
    check_combinations(BackendKind::Tract);
}

#[test]
fn final_latents_match_the_reference_on_ort_cpu() {
    check_final_latents(BackendKind::OrtCpu);
}

#[test]
fn final_latents_match_the_reference_on_tract() {
    check_final_latents(BackendKind::Tract);
}

#[test]
fn final_latents_and_combinations_match_the_reference_on_openvino() {
    check_final_latents(BackendKind::OpenVino);
    check_combinations(BackendKind::OpenVino);
}

/// The runtime's preprocessing of the two PNGs through the set's style encoder and adapter, times
/// the weights and concatenated, gives the reference's tokens.
#[test]
fn style_tokens_match_the_reference() {
    let manifest = Manifest::load(&set(), true).unwrap();
    let style = manifest.style_adapter.as_ref().unwrap();
    let pre = &style.preprocess;
    let config = ClipImageConfig {
        image_mean: pre.mean,
        image_std: pre.std,
        rescale_factor: pre.rescale_factor,
        ..ClipImageConfig::default()
    };
    let backend = BackendKind::OrtCpu.create(None).unwrap();
    let encoder = backend.load("style_encoder", &manifest.resolve(&style.style_encoder.file).unwrap()).unwrap();
    let adapter = backend.load("style_adapter", &manifest.resolve(&style.style_adapter.file).unwrap()).unwrap();
    let mut tokens = Vec::new();
    for (k, weight) in case().weights.iter().enumerate() {
        let image = load_clip_image(&fixtures().join(format!("style_{k}.png")), &config, &Limits::default()).unwrap();
        let pixels = clip_pixel_values(&image, &config).unwrap().into_dyn();
        let hidden = encoder.session().unwrap().run(&[("pixel_values", TensorView::F32(pixels.view()))]).unwrap();
        let out = adapter.session().unwrap().run(&[("last_hidden_state", TensorView::F32(hidden[0].view()))]).unwrap();
        tokens.push(&out[0] * *weight);
    }
    let views: Vec<_> = tokens.iter().map(|t| t.view()).collect();
    let got = concatenate(Axis(1), &views).unwrap();
    let err = rel_l2(&got, &npy("style_tokens.npy"));
    eprintln!("style_tokens: rel L2 {err:.3e}");
    assert!(err <= 1e-5, "style_tokens rel L2 {err:.3e} > 1e-5");
}

#[test]
fn styles_need_a_set_with_a_style_adapter() {
    let manifest = Manifest::load(&graphs_dir().join("tiny-sd1"), false).unwrap();
    let mut r = request(1.0);
    r.latents = None;
    match r.check(&manifest, &Limits::default()) {
        Err(Error::InvalidRequest { field: Field::Styles, message }) => {
            assert!(message.contains("--style-adapter"), "{message}")
        }
        other => panic!("expected a styles error, got {:?}", other.err()),
    }
}

#[test]
fn bad_style_requests_are_refused_in_one_line() {
    let manifest = Manifest::load(&set(), false).unwrap();
    let dir = std::env::temp_dir().join(format!("t2i-style-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let missing = dir.join("missing.png");
    for path in [broken, missing.clone()] {
        let mut r = request(1.0);
        r.styles[1].image = ConditionSource::File(path.clone());
        let e = r.check(&manifest, &Limits::default()).err().expect("refused").to_string();
        assert!(!e.contains('\n') && e.contains(&*path.to_string_lossy()), "{e}");
    }
    let mut r = request(1.0);
    r.styles[0].image = ConditionSource::File(missing);
    let e = r.check(&manifest, &Limits::default()).err().expect("refused").to_string();
    assert!(e.contains("style image not found"), "{e}");
    let mut r = request(1.0);
    r.styles = vec![r.styles[0].clone(); 10];
    let e = r.check(&manifest, &Limits::default()).err().expect("refused");
    assert!(
        matches!(&e, Error::InvalidRequest { field: Field::Styles, message } if message.contains("at most 9")),
        "{e}"
    );
    for tau in [-0.1, 1.5, f32::NAN] {
        let r = request(tau);
        assert!(matches!(
            r.check(&manifest, &Limits::default()),
            Err(Error::InvalidRequest { field: Field::StyleCondTau, .. })
        ));
    }
    let mut r = request(1.0);
    r.styles[0].weight = f32::INFINITY;
    assert!(matches!(r.check(&manifest, &Limits::default()), Err(Error::InvalidRequest { field: Field::Styles, .. })));
    std::fs::remove_dir_all(&dir).ok();
}
