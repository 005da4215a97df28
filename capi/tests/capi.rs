//! The C API from Rust, as a C caller uses it: a request through `t2i_generate` gives exactly what
//! the library's `Pipeline::run` gives (and so diffusers' result), every input field is mapped, and
//! every misuse is a status with a message, never a crash. examples/cpp/run.sh drives it from C++
//! under AddressSanitizer.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use ndarray::{ArrayD, IxDyn};
use t2i_rt::adapter::ConditionSource;
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::{ControlRequest, LoadOptions, Pipeline, Request, RngKind, SchedulerKind, StyleRequest};
use t2i_rt_c::*;

fn graphs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> String {
    // SAFETY: t2i_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(t2i_last_error()) }.to_string_lossy().into_owned()
}

fn load(set: &str) -> *mut t2i_model {
    let mut model = null_mut();
    let dir = c(graphs().join(set).to_str().unwrap());
    // SAFETY: valid string and out pointer; NULL params take the defaults.
    let status = unsafe { t2i_model_load(dir.as_ptr(), null(), &mut model) };
    assert_eq!(status, t2i_status::T2I_OK, "{}", last_error());
    model
}

fn request_params() -> t2i_request_params {
    let mut params = std::mem::MaybeUninit::uninit();
    // SAFETY: init fills the whole struct.
    unsafe {
        t2i_request_params_init(params.as_mut_ptr());
        params.assume_init()
    }
}

/// Runs `params` (with `want_latents`) on a live `ctx` and returns the final latents.
fn generate_latents(ctx: *mut t2i_ctx, params: &t2i_request_params) -> ArrayD<f32> {
    let mut result = null_mut();
    // SAFETY: live ctx, params filled by init, pointers valid for the call.
    assert_eq!(unsafe { t2i_generate(ctx, params, &mut result) }, t2i_status::T2I_OK, "{}", last_error());
    let mut latents = t2i_latents_view { shape: [0; 4], data: null() };
    // SAFETY: a live result.
    assert_eq!(unsafe { t2i_result_latents(result, &mut latents) }, t2i_status::T2I_OK);
    let shape: Vec<usize> = latents.shape.iter().map(|&d| d as usize).collect();
    // SAFETY: the view holds product(shape) floats while the result lives.
    let data = unsafe { std::slice::from_raw_parts(latents.data, shape.iter().product()) };
    let ours = ArrayD::from_shape_vec(IxDyn(&shape), data.to_vec()).unwrap();
    // SAFETY: a live result, freed once.
    unsafe { t2i_result_free(result) };
    ours
}

/// The case called `name` in a fixtures folder's cases.json.
fn fixture_case(fixtures: &Path, name: &str) -> serde_json::Value {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("cases.json")).unwrap()).unwrap();
    cases.into_iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name} in {}", fixtures.display()))
}

/// The fixture case z2 (inpainting a regular UNet, Euler, strength 0.75, seeded torch-cpu
/// generator) through the C API, with the init image as pixels in memory and the mask as a file.
#[test]
fn generate_equals_the_library_and_diffusers() {
    let fixtures = graphs().join("fixtures/tiny-sd1");
    let case = fixture_case(&fixtures, "z2_inpaint_euler_strength075_pipeline");
    let init = ConditionImage::open(&fixtures.join(case["init_image"].as_str().unwrap()), ConditionKind::Rgb).unwrap();
    let mask_path = fixtures.join(case["mask"].as_str().unwrap());

    let model = load("tiny-sd1");
    let mut ctx = null_mut();
    // SAFETY: a live model and an out pointer.
    assert_eq!(unsafe { t2i_ctx_new(model, &mut ctx) }, t2i_status::T2I_OK, "{}", last_error());
    let (prompt, negative) = (c(case["prompt"].as_str().unwrap()), c(case["negative_prompt"].as_str().unwrap()));
    let (scheduler, mask) = (c(case["scheduler"].as_str().unwrap()), c(mask_path.to_str().unwrap()));
    let init_input = t2i_image_input {
        path: null(),
        pixels: init.pixels().as_ptr(),
        width: init.width(),
        height: init.height(),
        channels: 3,
    };
    let mask_input = t2i_image_input { path: mask.as_ptr(), pixels: null(), width: 0, height: 0, channels: 0 };
    let mut params = request_params();
    params.prompt = prompt.as_ptr();
    params.negative_prompt = negative.as_ptr();
    params.steps = case["steps"].as_u64().unwrap() as u32;
    params.guidance = case["guidance"].as_f64().unwrap() as f32;
    params.scheduler = scheduler.as_ptr();
    params.seed = case["seed"].as_u64().unwrap();
    params.rng = T2I_RNG_TORCH_CPU;
    params.init_image = &init_input;
    params.mask = &mask_input;
    params.strength = case["strength"].as_f64().unwrap() as f32;
    params.want_latents = true;
    let mut result = null_mut();
    // SAFETY: live ctx, params filled by init, pointers valid for the call.
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_OK, "{}", last_error());

    let mut latents = t2i_latents_view { shape: [0; 4], data: null() };
    // SAFETY: a live result.
    assert_eq!(unsafe { t2i_result_latents(result, &mut latents) }, t2i_status::T2I_OK);
    let shape: Vec<usize> = latents.shape.iter().map(|&d| d as usize).collect();
    // SAFETY: the view holds product(shape) floats while the result lives.
    let data = unsafe { std::slice::from_raw_parts(latents.data, shape.iter().product()) };
    let ours = ArrayD::from_shape_vec(IxDyn(&shape), data.to_vec()).unwrap();
    let expected: ArrayD<f32> =
        ndarray_npy::read_npy(fixtures.join(case["expected_latents"].as_str().unwrap())).unwrap();
    let rel = rel_l2(&ours, &expected);
    assert!(rel <= 1e-4, "latents rel L2 {rel:.3e} > 1e-4");

    // The same request through the library on the same backend: the same bits.
    let mut request = Request::new(case["prompt"].as_str().unwrap());
    request.negative_prompt = Some(case["negative_prompt"].as_str().unwrap().into());
    request.steps = params.steps as usize;
    request.guidance = params.guidance;
    request.scheduler = Some(case["scheduler"].as_str().unwrap().parse().unwrap());
    request.seed = params.seed;
    request.rng = RngKind::TorchCpu;
    request.init_image = Some(ConditionSource::Pixels(init.clone()));
    request.mask = Some(ConditionSource::File(mask_path));
    request.strength = Some(params.strength);
    let mut pipeline = Pipeline::load(&graphs().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let generation = pipeline.run(&request, &mut |_| true).unwrap();
    assert_eq!(ours, generation.latents.into_dyn(), "the C API and the library differ");
    // SAFETY: a live result.
    assert_eq!(unsafe { t2i_result_image_count(result) }, 1);
    let mut image = t2i_image_view { width: 0, height: 0, channels: 0, pixels: null() };
    // SAFETY: a live result.
    assert_eq!(unsafe { t2i_result_image(result, 0, &mut image) }, t2i_status::T2I_OK);
    // SAFETY: the view holds width × height × 3 bytes while the result lives.
    let pixels = unsafe { std::slice::from_raw_parts(image.pixels, (image.width * image.height * 3) as usize) };
    assert_eq!(pixels, generation.images[0].as_raw().as_slice());
    // SAFETY: a live result; index 1 is out of range.
    assert_eq!(unsafe { t2i_result_image(result, 1, &mut image) }, t2i_status::T2I_ERR_INVALID_ARGUMENT);

    // SAFETY: each freed once, ctx before its model.
    unsafe {
        t2i_result_free(result);
        t2i_ctx_free(ctx);
        t2i_model_free(model);
    }
}

/// ControlNets through the C API: fixture case cf (no size given, so the control image's; euler-a,
/// two images, seeded torch-cpu generator) against diffusers, then every control field (two nets,
/// one from a photo through canny, start/end, guess mode) against the library, bit for bit.
#[test]
fn controlnets_equal_the_library_and_diffusers() {
    let fixtures = graphs().join("fixtures/tiny-sd1");
    let case = fixture_case(&fixtures, "cf_controlnet_default_size_euler_a_generator_pipeline");
    let control = &case["controls"][0];
    let control_path = fixtures.join(control["image"].as_str().unwrap());
    let photo_path = graphs().join("fixtures/conditions/photo.png");

    let model = load("tiny-sd1");
    let mut ctx = null_mut();
    // SAFETY: a live model and an out pointer.
    assert_eq!(unsafe { t2i_ctx_new(model, &mut ctx) }, t2i_status::T2I_OK, "{}", last_error());
    let (prompt, scheduler) = (c(case["prompt"].as_str().unwrap()), c(case["scheduler"].as_str().unwrap()));
    let (name, control_file, photo, canny) =
        (c("canny"), c(control_path.to_str().unwrap()), c(photo_path.to_str().unwrap()), c("canny:80:160"));
    let file =
        |path: &CString| t2i_image_input { path: path.as_ptr(), pixels: null(), width: 0, height: 0, channels: 0 };
    let mut controls = vec![t2i_control_input {
        name: name.as_ptr(),
        image: file(&control_file),
        scale: control["scale"].as_f64().unwrap() as f32,
        preprocess: null(),
    }];
    let mut params = request_params();
    params.prompt = prompt.as_ptr();
    params.steps = case["steps"].as_u64().unwrap() as u32;
    params.guidance = case["guidance"].as_f64().unwrap() as f32;
    params.scheduler = scheduler.as_ptr();
    params.seed = case["seed"].as_u64().unwrap();
    params.rng = T2I_RNG_TORCH_CPU;
    params.n_samples = case["n_samples"].as_u64().unwrap() as u32;
    params.controls = controls.as_ptr();
    params.n_controls = 1;
    params.want_latents = true;

    let mut pipeline = Pipeline::load(&graphs().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let mut request = Request::new(case["prompt"].as_str().unwrap());
    request.steps = params.steps as usize;
    request.guidance = params.guidance;
    request.scheduler = Some(case["scheduler"].as_str().unwrap().parse().unwrap());
    request.seed = params.seed;
    request.rng = RngKind::TorchCpu;
    request.n_samples = params.n_samples as usize;
    request.controls = vec![ControlRequest {
        name: "canny".into(),
        image: ConditionSource::File(control_path),
        scale: controls[0].scale,
        preprocess: Vec::new(),
    }];
    let generate = |params: &t2i_request_params| generate_latents(ctx, params);

    let ours = generate(&params);
    let expected: ArrayD<f32> =
        ndarray_npy::read_npy(fixtures.join(case["expected_latents"].as_str().unwrap())).unwrap();
    assert_eq!(ours.shape(), expected.shape(), "the size is not the control image's");
    let rel = rel_l2(&ours, &expected);
    assert!(rel <= 1e-4, "latents rel L2 {rel:.3e} > 1e-4");
    assert_eq!(ours, pipeline.run(&request, &mut |_| true).unwrap().latents.into_dyn());

    // Every other control field: a second net from a photo through canny, start/end, guess mode.
    controls.push(t2i_control_input {
        name: name.as_ptr(),
        image: file(&photo),
        scale: 0.6,
        preprocess: canny.as_ptr(),
    });
    params.controls = controls.as_ptr();
    params.n_controls = 2;
    params.control_start = 0.2;
    params.control_end = 0.8;
    params.guess_mode = true;
    request.controls.push(ControlRequest {
        name: "canny".into(),
        image: ConditionSource::File(photo_path),
        scale: 0.6,
        preprocess: vec!["canny:80:160".parse().unwrap()],
    });
    request.control_start = 0.2;
    request.control_end = 0.8;
    request.guess_mode = true;
    let both = generate(&params);
    assert_ne!(both, ours, "the control fields changed nothing");
    assert_eq!(
        both,
        pipeline.run(&request, &mut |_| true).unwrap().latents.into_dyn(),
        "the C API and the library differ"
    );

    // A preprocessing the library does not know: a request error naming it.
    let bad = c("canny:9");
    controls[1].preprocess = bad.as_ptr();
    params.controls = controls.as_ptr();
    let mut result = null_mut();
    // SAFETY: as above.
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_REQUEST);
    assert!(last_error().contains("\"canny:9\""), "{}", last_error());
    params.controls = null();
    // SAFETY: as above; NULL controls with n_controls 2 is the misuse under test.
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("params.controls is NULL"), "{}", last_error());

    // SAFETY: each freed once, ctx before its model.
    unsafe {
        t2i_ctx_free(ctx);
        t2i_model_free(model);
    }
}

/// The IP-Adapter through the C API: the reference image as a file and as pixels in memory give
/// the library's latents bit for bit, and move them; `ip_scale` 0 is exactly no image; a
/// reference image for a set without an IP-Adapter is a request error. (The pipeline against
/// diffusers is runtime/tests/ip_adapter_parity.rs.)
#[test]
fn ip_adapter_equals_the_library() {
    // Generated, not committed: scripts/generate-sets.sh.
    let fixtures = graphs().join("generated/fixtures/tiny-sd1-ip");
    let image_path = fixtures.join("image.png");
    let image = ConditionImage::open(&image_path, ConditionKind::Rgb).unwrap();
    let model = load("generated/tiny-sd1-ip");
    let mut ctx = null_mut();
    // SAFETY: a live model and an out pointer.
    assert_eq!(unsafe { t2i_ctx_new(model, &mut ctx) }, t2i_status::T2I_OK, "{}", last_error());
    let (prompt, path) = (c("a red house by the sea"), c(image_path.to_str().unwrap()));
    let file = t2i_image_input { path: path.as_ptr(), pixels: null(), width: 0, height: 0, channels: 0 };
    let pixels = t2i_image_input {
        path: null(),
        pixels: image.pixels().as_ptr(),
        width: image.width(),
        height: image.height(),
        channels: 3,
    };
    let mut params = request_params();
    params.prompt = prompt.as_ptr();
    params.steps = 3;
    params.seed = 7;
    params.rng = T2I_RNG_TORCH_CPU;
    params.want_latents = true;
    let plain = generate_latents(ctx, &params);
    params.ip_image = &file;
    params.ip_scale = 0.6;
    let from_file = generate_latents(ctx, &params);
    params.ip_image = &pixels;
    let from_pixels = generate_latents(ctx, &params);
    params.ip_scale = 0.0;
    let scale_zero = generate_latents(ctx, &params);

    let mut pipeline = Pipeline::load(&graphs().join("generated/tiny-sd1-ip"), &LoadOptions::default()).unwrap();
    let mut request = Request::new("a red house by the sea");
    request.steps = 3;
    request.seed = 7;
    request.rng = RngKind::TorchCpu;
    request.ip_image = Some(ConditionSource::File(image_path.clone()));
    request.ip_scale = 0.6;
    let library = pipeline.run(&request, &mut |_| true).unwrap().latents.into_dyn();
    assert_eq!(from_file, library, "the C API and the library differ");
    assert_eq!(from_pixels, library, "pixels in memory and the file differ");
    assert!(rel_l2(&from_file, &plain) > 1e-2, "the reference image changed nothing");
    assert_eq!(scale_zero, plain, "ip_scale 0 is not exactly no IP-Adapter");

    let other = load("tiny-sd1");
    let mut other_ctx = null_mut();
    // SAFETY: as above.
    assert_eq!(unsafe { t2i_ctx_new(other, &mut other_ctx) }, t2i_status::T2I_OK, "{}", last_error());
    params.ip_image = &file;
    let mut result = null_mut();
    // SAFETY: as above; the set has no IP-Adapter, the error under test.
    assert_eq!(unsafe { t2i_generate(other_ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_REQUEST);
    assert!(last_error().contains("--ip-adapter"), "{}", last_error());
    // SAFETY: each freed once, contexts before their models.
    unsafe {
        t2i_ctx_free(other_ctx);
        t2i_model_free(other);
        t2i_ctx_free(ctx);
        t2i_model_free(model);
    }
}

/// The style adapter through the C API: the style + img2img case of
/// graphs/generated/fixtures/tiny-sd1-style/cases.json (two style images with weights, style_cond_tau,
/// DDIM, init image, strength, seeded torch-cpu generator: everything a C caller can give) against
/// the reference loop, and bit for bit against the library; a style image as pixels in memory
/// equals the file. Style images for a set without a style adapter, a bad tau or weight are
/// request errors; NULL styles with a count is an argument error.
#[test]
fn style_adapter_equals_the_library_and_the_reference() {
    // Generated, not committed: scripts/generate-sets.sh.
    let fixtures = graphs().join("generated/fixtures/tiny-sd1-style");
    let case = fixture_case(&fixtures, "style_img2img_strength07");
    assert_eq!(case["rng"], "torch-cpu");
    let text = |key: &str| case[key].as_str().unwrap().to_string();
    let weights: Vec<f32> =
        case["style_weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap() as f32).collect();
    let style_paths: Vec<PathBuf> = (0..weights.len()).map(|k| fixtures.join(format!("style_{k}.png"))).collect();
    let init_path = fixtures.join(text("init_image"));

    let model = load("generated/tiny-sd1-style");
    let mut ctx = null_mut();
    // SAFETY: a live model and an out pointer.
    assert_eq!(unsafe { t2i_ctx_new(model, &mut ctx) }, t2i_status::T2I_OK, "{}", last_error());
    let (prompt, negative, scheduler) = (c(&text("prompt")), c(&text("negative_prompt")), c("ddim"));
    let init = c(init_path.to_str().unwrap());
    let init_input = t2i_image_input { path: init.as_ptr(), pixels: null(), width: 0, height: 0, channels: 0 };
    let style_files: Vec<CString> = style_paths.iter().map(|p| c(p.to_str().unwrap())).collect();
    let mut styles: Vec<t2i_style_input> = style_files
        .iter()
        .zip(&weights)
        .map(|(path, &weight)| t2i_style_input {
            image: t2i_image_input { path: path.as_ptr(), pixels: null(), width: 0, height: 0, channels: 0 },
            weight,
        })
        .collect();
    let mut params = request_params();
    assert_eq!((params.styles, params.n_styles, params.style_cond_tau), (null(), 0, 1.0));
    params.prompt = prompt.as_ptr();
    params.negative_prompt = negative.as_ptr();
    params.steps = case["steps"].as_u64().unwrap() as u32;
    params.guidance = case["guidance"].as_f64().unwrap() as f32;
    params.scheduler = scheduler.as_ptr();
    params.seed = case["seed"].as_u64().unwrap();
    params.rng = T2I_RNG_TORCH_CPU;
    params.width = case["width"].as_u64().unwrap() as u32;
    params.height = case["height"].as_u64().unwrap() as u32;
    params.init_image = &init_input;
    params.strength = case["strength"].as_f64().unwrap() as f32;
    params.styles = styles.as_ptr();
    params.n_styles = styles.len() as u32;
    params.style_cond_tau = case["style_cond_tau"].as_f64().unwrap() as f32;
    params.want_latents = true;
    let ours = generate_latents(ctx, &params);
    let expected: ArrayD<f32> = ndarray_npy::read_npy(fixtures.join(text("expected_latents"))).unwrap();
    let rel = rel_l2(&ours, &expected);
    eprintln!("C API tiny-sd1-style {}: final latents rel L2 {rel:.3e}", text("name"));
    assert!(rel <= 1e-4, "latents rel L2 {rel:.3e} > 1e-4");

    // The second style image as pixels in memory: the same bits.
    let second = ConditionImage::open(&style_paths[1], ConditionKind::Rgb).unwrap();
    styles[1].image = t2i_image_input {
        path: null(),
        pixels: second.pixels().as_ptr(),
        width: second.width(),
        height: second.height(),
        channels: 3,
    };
    params.styles = styles.as_ptr();
    assert_eq!(generate_latents(ctx, &params), ours, "a style image as pixels and as a file differ");
    params.n_styles = 0;
    assert!(rel_l2(&generate_latents(ctx, &params), &ours) > 1e-2, "the style images changed nothing");
    params.n_styles = styles.len() as u32;

    // The same request through the library on the same backend: the same bits.
    let mut request = Request::new(text("prompt"));
    request.negative_prompt = Some(text("negative_prompt"));
    request.steps = params.steps as usize;
    request.guidance = params.guidance;
    request.scheduler = Some(SchedulerKind::Ddim);
    request.seed = params.seed;
    request.rng = RngKind::TorchCpu;
    request.width = Some(params.width);
    request.height = Some(params.height);
    request.init_image = Some(ConditionSource::File(init_path));
    request.strength = Some(params.strength);
    request.styles = style_paths
        .iter()
        .zip(&weights)
        .map(|(path, &weight)| StyleRequest { image: ConditionSource::File(path.clone()), weight })
        .collect();
    request.style_cond_tau = params.style_cond_tau;
    let mut pipeline = Pipeline::load(&graphs().join("generated/tiny-sd1-style"), &LoadOptions::default()).unwrap();
    let library = pipeline.run(&request, &mut |_| true).unwrap().latents.into_dyn();
    assert_eq!(ours, library, "the C API and the library differ");

    // Refused, with the library's typed codes.
    let mut result = null_mut();
    params.style_cond_tau = 1.5;
    // SAFETY (every generate below): live ctx, params filled by init, pointers valid for the call.
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_REQUEST);
    assert!(last_error().contains("style_cond_tau 1.5"), "{}", last_error());
    params.style_cond_tau = 1.0;
    styles[0].weight = f32::NAN;
    params.styles = styles.as_ptr();
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_REQUEST);
    assert!(last_error().contains("style weight NaN"), "{}", last_error());
    styles[0].weight = 1.0;
    params.styles = null();
    assert_eq!(unsafe { t2i_generate(ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("params.styles is NULL"), "{}", last_error());
    params.styles = styles.as_ptr();
    let other = load("tiny-sd1");
    let mut other_ctx = null_mut();
    // SAFETY: as above.
    assert_eq!(unsafe { t2i_ctx_new(other, &mut other_ctx) }, t2i_status::T2I_OK, "{}", last_error());
    // The set has no style adapter, the error under test.
    assert_eq!(unsafe { t2i_generate(other_ctx, &params, &mut result) }, t2i_status::T2I_ERR_INVALID_REQUEST);
    assert!(last_error().contains("--style-adapter"), "{}", last_error());
    assert!(result.is_null());
    // SAFETY: each freed once, contexts before their models.
    unsafe {
        t2i_ctx_free(other_ctx);
        t2i_model_free(other);
        t2i_ctx_free(ctx);
        t2i_model_free(model);
    }
}

/// Relative L2 distance of `a` from `b`.
fn rel_l2(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    let diff = (a - b).mapv(|v| f64::from(v).powi(2)).sum().sqrt();
    diff / b.mapv(|v| f64::from(v).powi(2)).sum().sqrt()
}

unsafe extern "C" fn cancel_at_two(user_data: *mut c_void, step: u32, _total: u32) -> bool {
    // SAFETY: the test passes a live u32 counter.
    unsafe { *(user_data as *mut u32) = step };
    step < 2
}

/// Misuse is a status and a message on the calling thread, never a crash; frees accept NULL.
#[test]
fn errors_are_statuses_with_thread_local_messages() {
    let mut model = null_mut();
    // SAFETY (every call below): pointers are NULL or valid, as each case intends.
    unsafe {
        assert_eq!(t2i_model_load(null(), null(), &mut model), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("graph_set_dir is NULL"), "{}", last_error());
        let missing = c("/nonexistent/set");
        assert_eq!(t2i_model_load(missing.as_ptr(), null(), &mut model), t2i_status::T2I_ERR_GRAPH_SET);
        assert!(model.is_null());
        assert_eq!(t2i_model_load(missing.as_ptr(), null(), null_mut()), t2i_status::T2I_ERR_INVALID_ARGUMENT);

        let mut params = std::mem::MaybeUninit::<t2i_model_params>::uninit();
        t2i_model_params_init(params.as_mut_ptr());
        let mut params = params.assume_init();
        params.backend = 99;
        let dir = c(graphs().join("tiny-sd1").to_str().unwrap());
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("T2I_BACKEND_"), "{}", last_error());
        params.backend = T2I_BACKEND_ORT_CPU;
        params.precision = 7;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("T2I_PRECISION_"), "{}", last_error());
        params.precision = T2I_PRECISION_BF16;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_INVALID_OPTIONS);
        assert!(last_error().contains("bf16 is an openvino option"), "{}", last_error());
        // INT8 is the set's variants: a set without any says how to make them.
        params.precision = T2I_PRECISION_INT8;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_GRAPH_SET);
        assert!(last_error().contains("t2i_export calibrate"), "{}", last_error());
        params.precision = T2I_PRECISION_F32;
        params.device = 1;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_INVALID_OPTIONS);
        params.device = 0;
        params.struct_size = 8;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("struct_size is 8"), "{}", last_error());

        // A caller built against a newer, larger struct: the library reads what it knows.
        #[repr(C)]
        struct Newer {
            params: t2i_model_params,
            more: [u64; 4],
        }
        let mut newer = Newer { params, more: [7; 4] };
        newer.params.struct_size = std::mem::size_of::<Newer>() as u32;
        newer.params.backend = T2I_BACKEND_TRACT;
        assert_eq!(t2i_model_load(dir.as_ptr(), &newer.params, &mut model), t2i_status::T2I_OK, "{}", last_error());

        let mut ctx = null_mut();
        assert_eq!(t2i_ctx_new(model, &mut ctx), t2i_status::T2I_OK);
        let mut result = null_mut();
        let mut request = request_params();
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("params.prompt is NULL"), "{}", last_error());
        let prompt = c("a red house");
        request.prompt = prompt.as_ptr();
        request.steps = 3;
        let bad_scheduler = c("plms2");
        request.scheduler = bad_scheduler.as_ptr();
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_INVALID_REQUEST);
        request.scheduler = null();
        let bad_json = c("[1, 2]");
        request.scheduler_options_json = bad_json.as_ptr();
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        let options = c(r#"{"timestep_spacing": "sideways"}"#);
        request.scheduler_options_json = options.as_ptr();
        request.scheduler = c("euler").into_raw();
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_SCHEDULER);
        drop(CString::from_raw(request.scheduler as *mut _));
        request.scheduler = null();
        request.scheduler_options_json = null();
        request.strength = 0.0;
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_INVALID_REQUEST);
        assert!(last_error().contains("strength"), "{}", last_error());
        request.strength = -1.0;
        let pixels = [0u8; 5];
        let adapter = t2i_adapter_input {
            name: c("sketch").into_raw(),
            image: t2i_image_input { path: null(), pixels: pixels.as_ptr(), width: 2, height: 2, channels: 2 },
            weight: 1.0,
        };
        request.adapters = &adapter;
        request.n_adapters = 1;
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("channels is 2"), "{}", last_error());
        drop(CString::from_raw(adapter.name as *mut _));
        request.adapters = null();
        request.n_adapters = 0;

        // Messages are per thread: another thread's failure does not overwrite this one's.
        let mine = last_error();
        std::thread::spawn(|| {
            assert_eq!(t2i_ctx_new(null(), &mut null_mut()), t2i_status::T2I_ERR_INVALID_ARGUMENT);
            assert!(last_error().contains("model is NULL"));
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), mine);

        // Cancelled from the progress callback after step 2: no result.
        let mut last_step = 0u32;
        assert_eq!(
            t2i_ctx_set_progress(ctx, Some(cancel_at_two), &mut last_step as *mut u32 as *mut c_void),
            t2i_status::T2I_OK
        );
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_ERR_CANCELLED);
        assert!(result.is_null());
        assert_eq!(last_step, 2);
        assert_eq!(t2i_ctx_set_progress(ctx, None, null_mut()), t2i_status::T2I_OK);
        assert_eq!(t2i_generate(ctx, &request, &mut result), t2i_status::T2I_OK, "{}", last_error());
        let mut latents = t2i_latents_view { shape: [0; 4], data: null() };
        assert_eq!(t2i_result_latents(result, &mut latents), t2i_status::T2I_ERR_INVALID_ARGUMENT);

        t2i_result_free(result);
        t2i_ctx_free(ctx);
        t2i_model_free(model);
        t2i_result_free(null_mut());
        t2i_ctx_free(null_mut());
        t2i_model_free(null_mut());
        t2i_model_params_init(null_mut());
        t2i_request_params_init(null_mut());
    }
    // SAFETY: a static string.
    let version = unsafe { CStr::from_ptr(t2i_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// The model's log callback receives the library's notes (here: a stale prepared engine).
#[test]
fn the_log_callback_gets_the_models_notes() {
    unsafe extern "C" fn collect(user_data: *mut c_void, level: u32, message: *const std::ffi::c_char) {
        // SAFETY: the test passes a live Mutex<Vec<_>> and the library a valid message.
        let seen = unsafe { &*(user_data as *const std::sync::Mutex<Vec<(u32, String)>>) };
        let message = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
        seen.lock().unwrap().push((level, message));
    }
    let seen = std::sync::Mutex::new(Vec::<(u32, String)>::new());
    let dir = c(graphs().join("tiny-sd1").to_str().unwrap());
    // A cache entry for another machine: the load notes that it is stale and does not use it.
    let cache = std::env::temp_dir().join(format!("t2i-capi-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let options = LoadOptions { engine_cache: t2i_rt::EngineCache::Dir(cache.clone()), ..LoadOptions::default() };
    t2i_rt::Model::build_engines(&graphs().join("tiny-sd1"), &options, &[], &mut |_| {}).unwrap();
    // The unet's entry as if built on another CPU: its folder name no longer matches this machine's.
    let entry = std::fs::read_dir(cache.join("unet")).unwrap().next().unwrap().unwrap().path();
    let key_file = entry.join("key.json");
    let mut key: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    key.insert("cpu".into(), "another CPU".into());
    std::fs::write(&key_file, serde_json::to_string(&key).unwrap()).unwrap();
    std::fs::rename(&entry, entry.with_file_name("0000000000000000")).unwrap();
    let cache_c = c(cache.to_str().unwrap());
    let mut params = std::mem::MaybeUninit::<t2i_model_params>::uninit();
    let mut model = null_mut();
    // SAFETY: params filled by init; pointers valid for the call; the log state outlives the model.
    unsafe {
        t2i_model_params_init(params.as_mut_ptr());
        let mut params = params.assume_init();
        params.engine_cache_dir = cache_c.as_ptr();
        params.log = Some(collect);
        params.log_user_data = &seen as *const _ as *mut c_void;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_OK, "{}", last_error());
        t2i_model_free(model);
    }
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().any(|(level, m)| *level == T2I_LOG_WARNING && m.contains("is stale")),
        "no stale-engine warning in {seen:?}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `T2I_BACKEND_OPENVINO` runs the model on OpenVINO: the same bits as the library on it.
#[test]
fn openvino_backend_equals_the_library_on_openvino() {
    let mut params = std::mem::MaybeUninit::<t2i_model_params>::uninit();
    let mut model = null_mut();
    let dir = c(graphs().join("tiny-sd1").to_str().unwrap());
    // SAFETY: init fills the whole struct; valid string and out pointer.
    let params = unsafe {
        t2i_model_params_init(params.as_mut_ptr());
        let mut params = params.assume_init();
        params.backend = T2I_BACKEND_OPENVINO;
        assert_eq!(t2i_model_load(dir.as_ptr(), &params, &mut model), t2i_status::T2I_OK, "{}", last_error());
        params
    };
    assert_eq!(params.precision, T2I_PRECISION_F32);
    let mut ctx = null_mut();
    // SAFETY: a live model and an out pointer.
    assert_eq!(unsafe { t2i_ctx_new(model, &mut ctx) }, t2i_status::T2I_OK, "{}", last_error());
    let prompt = c("a red house");
    let mut request = request_params();
    request.prompt = prompt.as_ptr();
    request.steps = 3;
    request.seed = 5;
    request.want_latents = true;
    let ours = generate_latents(ctx, &request);

    let options = LoadOptions { backend: t2i_rt::backend::BackendKind::OpenVino, ..LoadOptions::default() };
    let mut pipeline = Pipeline::load(&graphs().join("tiny-sd1"), &options).unwrap();
    let mut library = Request::new("a red house");
    library.steps = 3;
    library.seed = 5;
    let generation = pipeline.run(&library, &mut |_| true).unwrap();
    assert_eq!(ours, generation.latents.into_dyn(), "the C API and the library differ on openvino");
    // SAFETY: live handles, freed once.
    unsafe {
        t2i_ctx_free(ctx);
        t2i_model_free(model);
    }
}
