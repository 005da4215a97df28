//! img2img and inpainting requests are checked before anything runs, and refused with an error
//! naming the field to fix: images of another size than the output, a strength that leaves no
//! step, a mask without an image, a set without a VAE encoder, an inpainting UNet without a mask.
//! What the pipeline draws for good requests is proven against diffusers in pipeline_parity.rs.

mod common;

use t2i_rt::adapter::ConditionSource;
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::{Error, Field, Limits, Manifest, Request};

fn manifest(set: &str) -> Manifest {
    Manifest::load(&common::tiny_set(set), false).unwrap()
}

fn image(kind: ConditionKind, w: u32, h: u32) -> ConditionSource {
    let pixels = vec![200u8; (w * h) as usize * kind.channels()];
    ConditionSource::Pixels(ConditionImage::from_pixels(w, h, kind, pixels).unwrap())
}

fn img2img(w: u32, h: u32) -> Request {
    let mut r = Request::new("a red square");
    r.steps = 10;
    r.init_image = Some(image(ConditionKind::Rgb, w, h));
    r
}

/// The field an invalid request names, and its message.
fn refused(r: &Request, m: &Manifest) -> (Field, String) {
    match r.check(m, &Limits::default()) {
        Err(Error::InvalidRequest { field, message }) => (field, message),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn the_output_takes_the_init_images_size_and_strength_picks_the_first_step() {
    let m = manifest("tiny-sd1");
    let mut r = img2img(128, 64);
    r.scheduler = Some("ddim".parse().unwrap());
    let checked = r.check(&m, &Limits::default()).unwrap();
    assert_eq!((checked.width, checked.height), (128, 64));
    // diffusers' get_timesteps: int(10 × 0.8) = 8 steps run, from index 2.
    assert_eq!((checked.first_step, checked.model_calls()), (2, 8));
    r.strength = Some(0.3);
    assert_eq!(r.check(&m, &Limits::default()).unwrap().model_calls(), 3);
    // Python's int(10 * 0.7) is 7 (the decimal the user typed, not the f32 below it).
    r.strength = Some(0.7);
    assert_eq!(r.check(&m, &Limits::default()).unwrap().model_calls(), 7);
    // Heun makes two model calls per step: the start index doubles (timesteps[t_start * order:]).
    r.scheduler = Some("heun".parse().unwrap());
    let checked = r.check(&m, &Limits::default()).unwrap();
    assert_eq!(checked.first_step, 6);
    // Inpainting defaults to strength 1: every step runs.
    r.scheduler = Some("ddim".parse().unwrap());
    r.strength = None;
    r.mask = Some(image(ConditionKind::Gray, 128, 64));
    assert_eq!(r.check(&m, &Limits::default()).unwrap().model_calls(), 10);
}

#[test]
fn images_of_another_size_than_the_output_are_refused() {
    let m = manifest("tiny-sd1");
    let mut r = img2img(128, 64);
    r.width = Some(64);
    r.height = Some(64);
    let (field, message) = refused(&r, &m);
    assert_eq!(field, Field::InitImage);
    assert!(message.contains("128x64 but the output is 64x64"), "{message}");
    let mut r = img2img(64, 64);
    r.mask = Some(image(ConditionKind::Gray, 64, 128));
    let (field, message) = refused(&r, &m);
    assert_eq!(field, Field::Mask);
    assert!(message.contains("64x128 but the output is 64x64"), "{message}");
    // An RGB mask in memory is not silently converted: the caller says what it holds.
    r.mask = Some(image(ConditionKind::Rgb, 64, 64));
    assert_eq!(refused(&r, &m).0, Field::Mask);
    // A side that is no multiple of the set's is refused with a size to use.
    let (field, message) = refused(&img2img(100, 64), &m);
    assert_eq!(field, Field::Size);
    assert!(message.contains("init image (100x64)"), "{message}");
}

#[test]
fn a_strength_that_leaves_no_step_is_refused() {
    let m = manifest("tiny-sd1");
    for (strength, says) in
        [(0.0, "must be in (0, 1]"), (-0.5, "must be in (0, 1]"), (1.5, "must be in (0, 1]"), (f32::NAN, "must be in")]
    {
        let mut r = img2img(64, 64);
        r.strength = Some(strength);
        let (field, message) = refused(&r, &m);
        assert_eq!(field, Field::Strength);
        assert!(message.contains(says), "{strength}: {message}");
    }
    // int(10 × 0.05) is 0: diffusers would run no step at all.
    let mut r = img2img(64, 64);
    r.strength = Some(0.05);
    let (field, message) = refused(&r, &m);
    assert_eq!(field, Field::Strength);
    assert!(message.contains("leaves no step") && message.contains("at least 0.1"), "{message}");
}

#[test]
fn img2img_fields_without_an_init_image_are_refused() {
    let m = manifest("tiny-sd1");
    let mut r = Request::new("x");
    r.strength = Some(0.5);
    assert_eq!(refused(&r, &m).0, Field::Strength);
    let mut r = Request::new("x");
    r.mask = Some(image(ConditionKind::Gray, 64, 64));
    assert_eq!(refused(&r, &m).0, Field::Mask);
    let mut r = img2img(64, 64);
    r.latents = Some(ndarray::Array4::zeros((1, 4, 8, 8)));
    assert_eq!(refused(&r, &m).0, Field::Latents);
}

#[test]
fn a_set_without_a_vae_encoder_says_to_re_export() {
    let mut m = manifest("tiny-sd1");
    m.graphs.vae_encoder = None;
    match img2img(64, 64).check(&m, &Limits::default()) {
        Err(Error::Unsupported(message)) => assert!(message.contains("re-export"), "{message}"),
        other => panic!("{:?}", other.err()),
    }
    // txt2img still runs on it.
    assert!(Request::new("x").check(&m, &Limits::default()).is_ok());
}

#[test]
fn an_inpainting_unet_needs_an_image_and_a_mask() {
    let m = manifest("tiny-sd1-inpaint");
    assert!(m.inpainting_unet());
    let (field, message) = refused(&Request::new("x"), &m);
    assert_eq!(field, Field::InitImage);
    assert!(message.contains("inpainting UNet"), "{message}");
    let (field, _) = refused(&img2img(64, 64), &m);
    assert_eq!(field, Field::Mask);
}
