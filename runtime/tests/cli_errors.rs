//! Bad input never panics and never writes output: `t2i-rt run` exits non-zero with one line on
//! stderr that names the problem, and leaves no file behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("t2i-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the tiny graph set so a test can break it.
fn copy_set(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    for entry in std::fs::read_dir(common::tiny_sd1()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}

/// Runs `t2i-rt run` with a small valid request plus `extra`, expecting failure whose message
/// contains `expect`.
fn fails(name: &str, graphs: &Path, extra: &[&str], env: &[(&str, &str)], expect: &str) {
    let out = match extra.iter().position(|a| *a == "--out") {
        Some(i) => PathBuf::from(extra[i + 1]),
        None => temp_dir(&format!("{name}-out")).join("out.png"),
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t2i-rt"));
    cmd.args(["run", "--graphs"]).arg(graphs).args(["--prompt", "a cat", "--seed", "1"]);
    if !extra.contains(&"--steps") {
        cmd.args(["--steps", "2"]);
    }
    if !extra.contains(&"--out") {
        cmd.arg("--out").arg(&out);
    }
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{name}: succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: panicked: {stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "{name}: want one error line, got: {stderr}");
    assert!(error_lines[0].contains(expect), "{name}: error {:?} does not mention {expect:?}", error_lines[0]);
    assert!(!out.exists(), "{name}: wrote {} despite the error", out.display());
    if let Ok(entries) = std::fs::read_dir(out.parent().unwrap()) {
        let leftovers: Vec<_> = entries.collect();
        assert!(leftovers.is_empty(), "{name}: left files behind: {leftovers:?}");
        let _ = std::fs::remove_dir_all(out.parent().unwrap());
    }
}

fn sketch_arg() -> String {
    format!("--adapter=sketch={}", fixture("conditions/sketch.png"))
}

fn fixture(path: &str) -> String {
    common::tiny_sd1_fixtures().join(path).to_string_lossy().into_owned()
}

#[test]
fn request_errors_are_one_line_and_write_nothing() {
    let set = common::tiny_sd1();
    let sketch = format!("sketch={}", fixture("conditions/sketch.png"));
    fails("missing-set", Path::new("/nonexistent/set"), &[], &[], "not a directory");
    fails(
        "unknown-adapter",
        &set,
        &["--adapter", &format!("lineart={}", fixture("conditions/sketch.png"))],
        &[],
        "unknown adapter \"lineart\"; this graph set has: ",
    );
    fails("unreadable-image", &set, &["--adapter", "sketch=/nonexistent.png"], &[], "/nonexistent.png");
    let edges = fixture("conditions/sketch.png");
    fails(
        "unknown-control",
        &set,
        &["--control", &format!("softedge={edges}")],
        &[],
        "unknown ControlNet \"softedge\"; this graph set has: ",
    );
    fails("bad-control-arg", &set, &["--control", "canny"], &[], "must look like NAME=IMAGE[:SCALE]");
    fails("unreadable-control-image", &set, &["--control", "canny=/nonexistent.png"], &[], "/nonexistent.png");
    fails("control-range", &set, &["--control-start", "0.5", "--control-end", "0.5"], &[], "0 ≤ start < end ≤ 1");
    fails("control-end-above-1", &set, &["--control-end", "1.5"], &[], "control_start 0 and control_end 1.5");
    fails("guess-mode-alone", &set, &["--guess-mode"], &[], "attach a control or drop guess_mode");
    fails(
        "preprocess-no-such-condition",
        &set,
        &["--preprocess", "canny=canny"],
        &[],
        "no --adapter or --control named \"canny\"",
    );
    fails("preprocess-bad-op", &set, &[&sketch_arg(), "--preprocess", "sketch=blur"], &[], "is not one of canny");
    fails(
        "preprocess-bad-thresholds",
        &set,
        &[&sketch_arg(), "--preprocess", "sketch=canny:200:100"],
        &[],
        "need 0 ≤ LOW ≤ HIGH",
    );
    fails(
        "save-conditions-none",
        &set,
        &["--save-conditions", "/tmp"],
        &[],
        "this request has no --adapter or --control",
    );
    let not_image = temp_dir("not-image").join("x.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    fails("not-an-image", &set, &["--adapter", &format!("sketch={}", not_image.display())], &[], "x.png");
    fails("bad-size", &set, &["--width", "100", "--height", "64"], &[], "not a multiple of 64");
    fails("bad-size-adapter", &set, &["--width", "96", "--height", "64", "--adapter", &sketch], &[], "not a multiple");
    fails("huge-size", &set, &["--width", "65536", "--height", "64"], &[], "over the limit of 8192 (limits.max_side)");
    fails("too-many-pixels", &set, &["--width", "4096", "--height", "4096"], &[], "(limits.max_pixels)");
    fails("too-many-steps", &set, &["--steps", "100000"], &[], "(limits.max_steps)");
    fails("too-many-samples", &set, &["--n-samples", "1000"], &[], "(limits.max_samples)");
    let bomb = temp_dir("bomb").join("bomb.png");
    std::fs::write(&bomb, common::png_bomb(100_000, 100_000)).unwrap();
    fails(
        "decompression-bomb",
        &set,
        &["--width", "64", "--height", "64", "--adapter", &format!("sketch={}", bomb.display())],
        &[],
        "pixel count of condition image",
    );
    fails(
        "pndm-contradiction",
        &set,
        &["--scheduler", "pndm", "--scheduler-option", "skip_prk_steps=false"],
        &[],
        "use the pndm-prk sampler instead",
    );
    let init = fixture("conditions/init.png");
    fails(
        "init-image-size",
        &set,
        &["--init-image", &init, "--width", "128", "--height", "64"],
        &[],
        "init_image is 64x64 but the output is 128x64",
    );
    fails("strength-zero", &set, &["--init-image", &init, "--strength", "0"], &[], "strength 0 must be in (0, 1]");
    fails("strength-no-step", &set, &["--init-image", &init, "--strength", "0.1"], &[], "leaves no step to run");
    fails(
        "mask-without-image",
        &set,
        &["--mask", &fixture("conditions/mask.png")],
        &[],
        "needs the init image it masks",
    );
    fails("strength-without-image", &set, &["--strength", "0.5"], &[], "give an init image");
    fails("bad-scheduler", &set, &["--scheduler", "plms2"], &[], "ddim, pndm, pndm-prk, euler, euler-a, heun");
    fails("karras-on-ddim", &set, &["--scheduler", "ddim", "--karras"], &[], "has no Karras sigmas");
    fails("eta-on-euler", &set, &["--scheduler", "euler", "--eta", "0.5"], &[], "eta only applies to the ddim");
    fails("eta-on-default", &set, &["--eta", "0.5"], &[], "this request runs pndm");
    fails("bad-scheduler-option", &set, &["--scheduler-option", "spacing"], &[], "expected KEY=VALUE");
    fails(
        "bad-scheduler-value",
        &set,
        &["--scheduler", "euler", "--scheduler-option", "timestep_spacing=sideways"],
        &[],
        "`timestep_spacing` = \"sideways\" is not supported; accepted: leading, trailing, linspace",
    );
    fails("bad-guidance-rescale", &set, &["--guidance-rescale", "2"], &[], "guidance_rescale 2 must be in [0, 1]");
    fails("bad-backend", &set, &["--backend", "cuda9"], &[], "ort-cpu");
    fails("bad-cond-tau", &set, &["--cond-tau", "1.5"], &[], "cond_tau");
    let latents = temp_dir("bad-latents").join("latents.npy");
    ndarray_npy::write_npy(&latents, &ndarray::Array4::<f32>::zeros((1, 4, 4, 4))).unwrap();
    fails("bad-latents", &set, &["--latents", latents.to_str().unwrap()], &[], "latents have shape [1, 4, 4, 4]");
    let mut nan = ndarray::Array4::<f32>::zeros((1, 4, 8, 8));
    nan[[0, 1, 2, 3]] = f32::NAN;
    let nan_latents = temp_dir("nan-latents").join("latents.npy");
    ndarray_npy::write_npy(&nan_latents, &nan).unwrap();
    fails("nan-latents", &set, &["--latents", nan_latents.to_str().unwrap()], &[], "NaN or infinity");
    // The classic fp16 overflow: no PNG, one line that names the stage and the fix.
    let huge = temp_dir("huge-latents").join("latents.npy");
    ndarray_npy::write_npy(&huge, &ndarray::Array4::<f32>::from_elem((1, 4, 8, 8), 1e5)).unwrap();
    fails(
        "fp16-overflow",
        &common::tiny_set("tiny-sd1-fp16"),
        &["--latents", huge.to_str().unwrap()],
        &[],
        "produced NaN or infinity: ",
    );
    fails("missing-out-dir", &set, &["--out", "/nonexistent/dir/x.png"], &[], "does not exist");
    fails(
        "no-ort",
        &set,
        &[],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        "ONNX Runtime library not found",
    );
    fails(
        "no-openvino",
        &set,
        &["--backend", "openvino"],
        &[("T2I_OPENVINO_LIB", "/nonexistent/libopenvino_c.so.2640")],
        "OpenVINO library not found: T2I_OPENVINO_LIB=/nonexistent/libopenvino_c.so.2640 is not a file",
    );
    fails(
        "bf16-on-ort",
        &set,
        &["--precision", "bf16"],
        &[],
        "precision bf16 is an openvino option, not one of ort-cpu",
    );
    fails(
        "int8-on-tract",
        &set,
        &["--precision", "int8", "--backend", "tract"],
        &[],
        "int8 runs a set's INT8 graphs on ort-cpu, openvino and ort-trt, not on tract",
    );
    fails(
        "int8-without-variants",
        &set,
        &["--precision", "int8"],
        &[],
        "has no int8 graphs; make a set that has them with `python -m t2i_export calibrate",
    );
    let a_file = set.join("manifest.json").to_string_lossy().to_string();
    fails("record-into-a-file", &set, &["--record-inputs", &a_file], &[], "Not a directory");
    for dir in
        [not_image.parent(), latents.parent(), bomb.parent(), nan_latents.parent(), huge.parent()].into_iter().flatten()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// --style: a set without a style adapter names the export flag; a missing image, too many images,
/// a tau outside [0, 1] and --style-cond-tau without --style are refused in one line.
#[test]
fn style_errors_are_one_line_and_write_nothing() {
    let style = common::generated_dir().join("tiny-sd1-style");
    let image = common::generated_dir().join("fixtures/tiny-sd1-style/style_0.png");
    let image = image.to_string_lossy().to_string();
    fails("style-no-adapter", &common::tiny_sd1(), &["--style", &image], &[], "--style-adapter");
    fails("style-missing", &style, &["--style", "/nonexistent/style.png:0.5"], &[], "style image not found");
    let ten: Vec<&str> = (0..10).flat_map(|_| ["--style", image.as_str()]).collect();
    fails("style-too-many", &style, &ten, &[], "at most 9");
    fails("style-tau", &style, &["--style", &image, "--style-cond-tau", "1.5"], &[], "style_cond_tau 1.5");
    fails("style-tau-alone", &style, &["--style-cond-tau", "0.5"], &[], "required arguments were not provided");
}

/// The CPU build of ONNX Runtime that scripts/setup-ort.sh puts in `.ort/` (a checkout may also
/// have the GPU build in `.ort-gpu/`, which the GPU backends would prefer).
fn cpu_library() -> String {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ort/libonnxruntime.so.1.31.1");
    lib.to_string_lossy().into_owned()
}

/// The GPU backends never quietly run on the CPU: with the CPU build of ONNX Runtime they fail at
/// start-up and say which library to install.
#[test]
fn gpu_backends_fail_clearly_without_the_gpu_library() {
    let set = common::tiny_sd1();
    let env = [("ORT_DYLIB_PATH", cpu_library())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fails("cuda-on-cpu-lib", &set, &["--backend", "ort-cuda"], &env, "was built without the CUDA execution provider");
    fails("trt-on-cpu-lib", &set, &["--backend", "ort-trt"], &env, "onnxruntime-gpu 1.31.1");
    fails(
        "device-on-cpu",
        &set,
        &["--device", "1"],
        &env,
        "a device ordinal and CPU fallback are for the GPU backends (ort-cuda, ort-trt), not ort-cpu",
    );
}

/// Runs `t2i-rt build-engine` with `args` on the CPU build of ONNX Runtime; returns (success, stderr).
fn build_engine(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
        .arg("build-engine")
        .args(args)
        .env("ORT_DYLIB_PATH", cpu_library())
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn build_engine_refuses_what_it_cannot_build() {
    let set = common::tiny_sd1();
    let set = set.to_str().unwrap();
    let cache = temp_dir("engine-refusals");
    let cache = cache.to_str().unwrap();
    for (args, expect) in [
        (vec!["--backend", "tract"], "tract has no engine cache"),
        (vec!["--backend", "ort-cpu", "--profile", "512x512"], "shape profiles are a TensorRT build option"),
        (vec!["--backend", "ort-trt", "--profile", "512x512:4-2"], "batch range must satisfy"),
        (vec!["--backend", "ort-trt", "--profile", "512x512"], "was built without the TensorRT execution provider"),
        (vec!["--backend", "ort-trt"], "ort-trt needs at least one shape profile"),
    ] {
        let mut all = vec!["--graphs", set, "--engine-cache", cache];
        all.extend(args.iter().copied());
        let (ok, stderr) = build_engine(&all);
        assert!(!ok, "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr:?} does not mention {expect:?}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(cache).unwrap().collect();
    assert!(leftovers.is_empty(), "refused builds left {leftovers:?}");
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn broken_graph_sets_are_refused() {
    let escape = copy_set("escape");
    edit_manifest(&escape, |m| m["graphs"]["unet"]["file"] = "../unet.onnx".into());
    fails("path-escape", &escape, &[], &[], "leaves the graph set");

    let renamed = copy_set("renamed-input");
    edit_manifest(&renamed, |m| m["graphs"]["unet"]["inputs"][0]["name"] = "latents".into());
    fails("no-sample", &renamed, &["--no-verify"], &[], "the unet graph has no sample input");

    let resized = copy_set("resized-input");
    edit_manifest(&resized, |m| m["graphs"]["unet"]["inputs"][2]["dims"][2] = 8.into());
    fails("io-mismatch", &resized, &["--no-verify"], &[], "does not match the manifest");

    let corrupt = copy_set("corrupt");
    let unet = corrupt.join("unet.onnx");
    let mut bytes = std::fs::read(&unet).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&unet, bytes).unwrap();
    fails("checksum", &corrupt, &[], &[], "does not match its manifest checksum");

    let missing = copy_set("missing-graph");
    std::fs::remove_file(missing.join("vae_decoder.onnx")).unwrap();
    fails("missing-graph", &missing, &[], &[], "vae_decoder.onnx is listed in the manifest but missing");

    let no_slots = copy_set("controlnet-no-slots");
    edit_manifest(&no_slots, |m| {
        m["control_slots"] = serde_json::json!([]);
        m["controlnets"] = serde_json::json!([{
            "name": "canny", "conditioning_channels": 3, "guess_mode_scales": [],
            "graph": { "file": "unet.onnx", "inputs": [], "outputs": [] }
        }]);
    });
    fails("controlnet-no-slots", &no_slots, &["--no-verify"], &[], "lists controlnets but no control_slots");

    let version = copy_set("version");
    edit_manifest(&version, |m| m["format_version"] = 99.into());
    fails("format-version", &version, &[], &[], "format_version 99");
    for dir in [escape, renamed, corrupt, missing, no_slots, version] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
