//! IP-Adapter end to end against diffusers: `graphs/tiny-sd1-ip` (the tiny SD 1 with the tiny plain
//! IP-Adapter and CLIP image encoder) must reproduce `StableDiffusionPipeline.load_ip_adapter` +
//! `ip_adapter_image` (graphs/fixtures/tiny-sd1-ip, written by
//! `python -m t2i_export.tiny_ip_set --out ../graphs` from `export/`).
//!
//! Tolerances: final latents relative L2 ≤ 1e-4 on ort-cpu and on tract (the project's pipeline
//! bound; the case runs 3 PNDM steps, so kernel-order differences have little room to compound).
//! The intermediate image embeddings and tokens, computed from the runtime's own preprocessing of
//! image.png, within 1e-5 relative L2 (graph_parity.rs's graph bound): preprocessing that is off by
//! one uint8 level anywhere moves the CLIP embedding by more than that.
//! `ip_scale` 0 must equal the run without an image bit for bit: the UNet adds `0 × attention`.

mod common;

use std::path::PathBuf;

use common::{graphs_dir, rel_l2};
use ndarray::{concatenate, Array4, ArrayD, Axis};
use serde::Deserialize;
use t2i_rt::adapter::ConditionSource;
use t2i_rt::backend::{BackendKind, TensorView};
use t2i_rt::clip_image::{clip_pixel_values, load_clip_image, ClipImageConfig};
use t2i_rt::manifest::Manifest;
use t2i_rt::{Error, Field, Limits, LoadOptions, Pipeline, Request};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance_scale: f32,
    ip_scale: f32,
}

fn set() -> PathBuf {
    graphs_dir().join("tiny-sd1-ip")
}

fn fixtures() -> PathBuf {
    graphs_dir().join("fixtures/tiny-sd1-ip")
}

fn case() -> Case {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("case.json")).unwrap()).unwrap()
}

fn npy(name: &str) -> ArrayD<f32> {
    ndarray_npy::read_npy(fixtures().join(name)).unwrap()
}

/// The fixture's request: its prompt, guidance, steps, scale and image, from diffusers' initial
/// latents.
fn request() -> Request {
    let case = case();
    let mut r = Request::new(case.prompt);
    r.negative_prompt = Some(case.negative_prompt);
    r.steps = case.steps;
    r.guidance = case.guidance_scale;
    r.latents = Some(npy("latents_init.npy").into_dimensionality().unwrap());
    r.ip_image = Some(ConditionSource::File(fixtures().join("image.png")));
    r.ip_scale = case.ip_scale;
    r
}

fn pipeline(backend: BackendKind) -> Pipeline {
    Pipeline::load(&set(), &LoadOptions { backend, ..LoadOptions::default() }).unwrap()
}

fn run(pipeline: &mut Pipeline, request: &Request) -> Array4<f32> {
    pipeline.run(request, &mut |_| true).unwrap().latents
}

fn check_final_latents(backend: BackendKind) {
    let mut p = pipeline(backend);
    let got = run(&mut p, &request()).into_dyn();
    let want = npy("latents.npy");
    let err = rel_l2(&got, &want);
    eprintln!("{backend} tiny-sd1-ip final latents: rel L2 {err:.3e}");
    assert!(err <= 1e-4, "{backend}: final latents rel L2 {err:.3e} > 1e-4");
    // The image matters: without it the latents land far from diffusers'.
    let mut without = request();
    without.ip_image = None;
    let off = rel_l2(&run(&mut p, &without).into_dyn(), &want);
    assert!(off > 1e-2, "{backend}: the IP image moves the result by only {off:.3e}");
}

#[test]
fn final_latents_match_diffusers_on_ort_cpu() {
    check_final_latents(BackendKind::OrtCpu);
}

#[test]
fn final_latents_match_diffusers_on_tract() {
    check_final_latents(BackendKind::Tract);
}

/// The runtime's preprocessing of image.png through the set's image encoder and projection gives
/// diffusers' `image_embeds` and `[negative; image]` tokens (negative = zero embeds, as the
/// manifest says).
#[test]
fn image_embeds_and_tokens_match_diffusers() {
    let manifest = Manifest::load(&set(), true).unwrap();
    let ip = manifest.ip_adapter.as_ref().unwrap();
    let pre = &ip.preprocess;
    let config = ClipImageConfig {
        image_mean: pre.mean,
        image_std: pre.std,
        rescale_factor: pre.rescale_factor,
        ..ClipImageConfig::default()
    };
    let image = load_clip_image(&fixtures().join("image.png"), &config, &Limits::default()).unwrap();
    let pixels = clip_pixel_values(&image, &config).unwrap().into_dyn();
    let backend = BackendKind::OrtCpu.create(None).unwrap();
    let encoder = backend.load("image_encoder", &manifest.resolve(&ip.image_encoder.file).unwrap()).unwrap();
    let embeds = encoder.session().unwrap().run(&[("pixel_values", TensorView::F32(pixels.view()))]).unwrap();
    let err = rel_l2(&embeds[0], &npy("image_embeds.npy"));
    eprintln!("image_embeds: rel L2 {err:.3e}");
    assert!(err <= 1e-5, "image_embeds rel L2 {err:.3e} > 1e-5");
    let rows = concatenate(Axis(0), &[ArrayD::zeros(embeds[0].raw_dim()).view(), embeds[0].view()]).unwrap();
    let projection = backend.load("image_projection", &manifest.resolve(&ip.image_projection.file).unwrap()).unwrap();
    let tokens = projection.session().unwrap().run(&[("image_embeds", TensorView::F32(rows.view()))]).unwrap();
    let err = rel_l2(&tokens[0], &npy("ip_tokens.npy"));
    eprintln!("ip_tokens: rel L2 {err:.3e}");
    assert!(err <= 1e-5, "ip_tokens rel L2 {err:.3e} > 1e-5");
}

/// `ip_scale` 0 is exactly no IP-Adapter; a repeated image (served from the embedding cache)
/// gives the same latents as the first run.
#[test]
fn scale_zero_is_no_image_bit_for_bit() {
    let mut p = pipeline(BackendKind::OrtCpu);
    let mut zero = request();
    zero.ip_scale = 0.0;
    let mut without = request();
    without.ip_image = None;
    assert_eq!(run(&mut p, &zero), run(&mut p, &without));
    let first = run(&mut p, &request());
    assert_eq!(run(&mut p, &request()), first);
}

#[test]
fn an_ip_image_needs_a_set_with_an_ip_adapter() {
    let manifest = Manifest::load(&graphs_dir().join("tiny-sd1"), false).unwrap();
    let mut r = request();
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
    let manifest = Manifest::load(&set(), false).unwrap();
    let dir = std::env::temp_dir().join(format!("t2i-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    for path in [broken, dir.join("missing.png")] {
        let mut r = request();
        r.ip_image = Some(ConditionSource::File(path.clone()));
        let e = r.check(&manifest, &Limits::default()).err().expect("refused").to_string();
        assert!(!e.contains('\n') && e.contains(&*path.to_string_lossy()), "{e}");
    }
    let mut r = request();
    r.ip_scale = f32::NAN;
    assert!(matches!(r.check(&manifest, &Limits::default()), Err(Error::InvalidRequest { field: Field::IpScale, .. })));
    std::fs::remove_dir_all(&dir).ok();
}
