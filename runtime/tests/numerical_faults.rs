//! Numerical faults are errors, never pictures. NaN or infinity in a request's inputs is refused
//! before anything runs; NaN or infinity that a graph or the sampler produces stops the run with
//! [`Error::NumericalFault`], which names the stage and the fix. No image comes out of such a run
//! (the CLI's side of it, no PNG written, is in cli_errors).

mod common;

use ndarray::Array4;
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::{
    AdapterRequest, BackendKind, ConditionSource, Error, Limits, LoadOptions, Manifest, Pipeline, Request, Stage,
};

fn pipeline(set: &str, backend: BackendKind) -> Pipeline {
    let options = LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() };
    Pipeline::load(&common::tiny_set(set), &options).unwrap()
}

fn request() -> Request {
    let mut request = Request::new("a lighthouse at dusk");
    request.steps = 2;
    request.seed = 3;
    request
}

#[test]
fn non_finite_inputs_are_refused_before_the_run() {
    let manifest = Manifest::load(&common::tiny_sd1(), false).unwrap();
    let limits = Limits::default();
    let refused = |r: &Request, expect: &str| {
        let message = match r.check(&manifest, &limits) {
            Err(Error::InvalidRequest { message, .. }) => message,
            Err(other) => panic!("{expect}: wrong error {other}"),
            Ok(_) => panic!("{expect}: accepted"),
        };
        assert!(message.contains(expect), "{message:?} does not say {expect:?}");
    };
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut r = request();
        let mut latents = Array4::<f32>::zeros((1, 4, 8, 8));
        latents[[0, 2, 3, 4]] = bad;
        r.latents = Some(latents);
        refused(&r, "latents contain NaN or infinity");

        let mut r = request();
        let pixels = ConditionImage::from_pixels(64, 64, ConditionKind::Gray, vec![0; 64 * 64]).unwrap();
        r.adapters.push(AdapterRequest {
            name: "sketch".into(),
            image: ConditionSource::Pixels(pixels),
            weight: bad,
            preprocess: Vec::new(),
        });
        refused(&r, "is not a number");

        let mut r = request();
        r.guidance = bad;
        refused(&r, "guidance");
        let mut r = request();
        r.cond_tau = bad;
        refused(&r, "cond_tau");
        let mut r = request();
        r.guidance_rescale = bad;
        refused(&r, "guidance_rescale");
        let mut r = request();
        r.eta = bad;
        refused(&r, "eta");
    }
}

fn fault<T>(result: t2i_rt::Result<T>) -> Stage {
    match result {
        Err(Error::NumericalFault { stage }) => stage,
        Err(other) => panic!("expected a numerical fault, got {other}"),
        Ok(_) => panic!("expected a numerical fault, got a result"),
    }
}

/// The classic: latents beyond what an fp16 decoder holds (65504 is fp16's largest; SDXL's
/// original VAE overflows like this in fp16) give NaN, which must not become a black image.
#[test]
fn vae_decoder_overflow_is_an_error_not_a_black_image() {
    let mut fp16 = pipeline("tiny-sd1-fp16", BackendKind::OrtCpu);
    let large = Array4::<f32>::from_elem((1, 4, 8, 8), 2e4);
    let stage = fault(fp16.decode(&large));
    assert_eq!(stage, Stage::VaeDecoder);
    let message = Error::NumericalFault { stage }.to_string();
    assert!(message.contains("the VAE decoder produced NaN or infinity: keep the decoder fp32"), "{message}");
    // The worker is still usable.
    assert!(fp16.run(&request(), &mut |_| true).is_ok(), "worker broken after a fault");
}

/// Guidance so large that the guided noise, or what the sampler and the UNet make of it next,
/// overflows: the run stops at the first non-finite value, in the denoising loop, with its fix.
#[test]
fn extreme_guidance_stops_the_run() {
    for backend in BackendKind::CPU {
        let mut pipeline = pipeline("tiny-sd1", backend);
        let mut r = request();
        r.guidance = 3e38;
        let stage = fault(pipeline.run(&r, &mut |_| true));
        assert!(
            matches!(stage, Stage::Guidance { .. } | Stage::Sampler { .. } | Stage::Unet { .. }),
            "{backend}: {stage:?}"
        );
    }
}

#[test]
fn unet_overflow_names_the_unet() {
    let mut pipeline = pipeline("tiny-sd1-fp16", BackendKind::OrtCpu);
    let mut r = request();
    r.latents = Some(Array4::<f32>::from_elem((1, 4, 8, 8), 1e5));
    let stage = fault(pipeline.run(&r, &mut |_| true));
    assert!(matches!(stage, Stage::Unet { step: 1, .. }), "{stage:?}");
    let message = Error::NumericalFault { stage }.to_string();
    assert!(message.contains("use the fp32 graph set"), "{message}");
}
