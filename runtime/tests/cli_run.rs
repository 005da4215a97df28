//! `t2i-rt run` end to end through the binary: diffusers' initial latents in with `--latents` (or,
//! for a case diffusers ran with `generator=torch.Generator("cpu").manual_seed(seed)`, only
//! `--seed seed --rng torch-cpu`; img2img and inpainting with `--init-image`, `--mask`,
//! `--strength`), final latents out with `--save-latents`, equal to diffusers' (same tolerance as the library's pipeline parity test: relative L2 ≤ 1e-4 on ort-cpu), and PNGs
//! within 2/255; and `t2i-rt bench`.

mod common;

use std::process::Command;

use ndarray::ArrayD;
use serde_json::Value;

/// The tiny-sd1 fixture case with two weighted adapters, cond_tau < 1 and a negative prompt.
fn two_adapters_tau(case: &Value) -> bool {
    case["adapters"].as_array().unwrap().len() == 2 && case["cond_tau"].as_f64().unwrap() < 1.0
}

/// Runs the first tiny-sd1 fixture case `pick` accepts (one image, a negative prompt) through
/// `t2i-rt run` plus `extra`; checks it against diffusers' latents and image and returns the final
/// latents and stderr.
fn run_fixture_case(name: &str, pick: fn(&Value) -> bool, extra: &[&str]) -> (ArrayD<f32>, String) {
    let fixtures = common::tiny_sd1_fixtures();
    let cases = common::fixture_cases(&fixtures);
    let case = cases.iter().find(|c| pick(c)).unwrap();
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-run-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (png, latents_out) = (out_dir.join("out.png"), out_dir.join("latents.npy"));

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t2i-rt"));
    cmd.arg("run").arg("--graph").arg(common::tiny_sd1().join("unet.onnx"));
    cmd.args(["--prompt", case["prompt"].as_str().unwrap()]);
    cmd.args(["--negative-prompt", case["negative_prompt"].as_str().unwrap()]);
    for adapter in case["adapters"].as_array().unwrap() {
        let image = fixtures.join(adapter["image"].as_str().unwrap());
        cmd.arg("--adapter").arg(format!(
            "{}={}:{}",
            adapter["name"].as_str().unwrap(),
            image.display(),
            adapter["weight"]
        ));
    }
    for (flag, key) in [
        ("--cond-tau", "cond_tau"),
        ("--steps", "steps"),
        ("--guidance", "guidance"),
        ("--width", "width"),
        ("--height", "height"),
    ] {
        cmd.arg(flag).arg(case[key].to_string());
    }
    cmd.args(["--scheduler", case["scheduler"].as_str().unwrap()]);
    match case["latents"].as_str() {
        Some(latents) => {
            cmd.arg("--latents").arg(fixtures.join(latents));
        }
        None => {
            cmd.args(["--seed", &case["seed"].to_string(), "--rng", case["rng"].as_str().unwrap()]);
        }
    }
    if let Some(eta) = case.get("eta") {
        cmd.args(["--eta", &eta.to_string()]);
    }
    for (flag, key) in [("--init-image", "init_image"), ("--mask", "mask")] {
        if let Some(path) = case.get(key).and_then(Value::as_str) {
            cmd.arg(flag).arg(fixtures.join(path));
        }
    }
    if let Some(strength) = case.get("strength").filter(|s| !s.is_null()) {
        cmd.args(["--strength", &strength.to_string()]);
    }
    cmd.arg("--save-latents").arg(&latents_out).arg("--out").arg(&png);
    cmd.args(extra);
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{name}: t2i-rt run failed: {stderr}");

    let expected: ArrayD<f32> =
        ndarray_npy::read_npy(fixtures.join(case["expected_latents"].as_str().unwrap())).unwrap();
    let actual: ArrayD<f32> = ndarray_npy::read_npy(&latents_out).unwrap();
    let rel = common::rel_l2(&actual, &expected);
    assert!(rel <= 1e-4, "{name}: latents rel L2 {rel:.3e} > 1e-4");
    let want = image::open(fixtures.join(case["expected_images"][0].as_str().unwrap())).unwrap().to_rgb8();
    let got = image::open(&png).unwrap().to_rgb8();
    let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "{name}: a pixel differs by {worst}/255");
    std::fs::remove_dir_all(&out_dir).unwrap();
    (actual, stderr)
}

#[test]
fn run_reproduces_diffusers_through_the_cli() {
    run_fixture_case("plain", two_adapters_tau, &[]);
}

/// `--record-inputs DIR`: every graph call's inputs, bound ones included, one folder per call, and
/// the run's result unchanged (run_fixture_case checks it against diffusers'). A second run into
/// the same folder is refused and leaves it as it was.
#[test]
fn run_records_every_graph_call_for_calibration() {
    let record = std::env::temp_dir().join(format!("t2i-cli-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&record);
    let record_arg = record.to_str().unwrap();
    run_fixture_case("record", two_adapters_tau, &["--record-inputs", record_arg]);

    let fixtures = common::tiny_sd1_fixtures();
    let cases = common::fixture_cases(&fixtures);
    let case = cases.iter().find(|c| two_adapters_tau(c)).unwrap();
    let calls = |graph: &str| -> Vec<std::path::PathBuf> {
        let mut dirs: Vec<_> = std::fs::read_dir(record.join(graph)).unwrap().map(|e| e.unwrap().path()).collect();
        dirs.sort();
        dirs
    };
    let unet = calls("unet.onnx");
    let timesteps = case["timesteps"].as_array().unwrap();
    assert_eq!(unet.len(), timesteps.len(), "one UNet call per step (CFG batched): {unet:?}");
    let names: Vec<String> = (0..unet.len()).map(|i| format!("{i:06}")).collect();
    assert_eq!(unet.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect::<Vec<_>>(), names);
    let load =
        |call: &std::path::Path, input: &str| -> ArrayD<f32> { ndarray_npy::read_npy(call.join(input)).unwrap() };
    for (call, t) in unet.iter().zip(timesteps) {
        let timestep = load(call, "timestep.npy");
        assert!(timestep.iter().all(|&v| v == t.as_f64().unwrap() as f32), "{call:?}: timestep {timestep:?}, want {t}");
        // Bound inputs (text embeddings, adapter residuals) are recorded with every call.
        for input in ["sample.npy", "encoder_hidden_states.npy", "adapter_residual_0.npy"] {
            assert!(call.join(input).is_file(), "{call:?} lacks {input}");
        }
    }
    // The first call's sample is the initial latents, once for each half of the CFG batch (DDIM's
    // init_noise_sigma is 1).
    let latents: ArrayD<f32> = ndarray_npy::read_npy(fixtures.join(case["latents"].as_str().unwrap())).unwrap();
    let sample = load(&unet[0], "sample.npy");
    let twice = ndarray::concatenate(ndarray::Axis(0), &[latents.view(), latents.view()]).unwrap();
    assert_eq!(sample, twice);
    for graph in ["adapter_sketch.onnx", "adapter_color.onnx", "vae_decoder.onnx"] {
        assert_eq!(calls(graph).len(), 1, "{graph}");
    }
    assert!(!calls("text_encoder.onnx").is_empty());

    let before = calls("unet.onnx");
    let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
        .args(["run", "--graphs"])
        .arg(common::tiny_sd1())
        .args(["--prompt", "a house", "--steps", "2", "--width", "64", "--height", "64", "--record-inputs", record_arg])
        .arg("--out")
        .arg(record.join("out.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.trim().lines().last().unwrap().contains("is not empty"), "{stderr}");
    assert_eq!(calls("unet.onnx"), before);
    assert!(!record.join("out.png").exists());
    std::fs::remove_dir_all(&record).unwrap();
}

/// `--seed S --rng torch-cpu` and no latents: what diffusers draws from
/// `generator=torch.Generator("cpu").manual_seed(S)`, initial latents and Euler a's step noise.
#[test]
fn run_with_torch_cpu_rng_reproduces_diffusers_from_the_seed() {
    let (_, stderr) = run_fixture_case("torch-cpu", |c| c["name"] == "r_euler_a_generator_pipeline", &[]);
    assert!(stderr.contains("(torch-cpu generator)"), "{stderr}");
}

/// `--init-image IMG --mask MASK --strength F --seed S --rng torch-cpu`: diffusers'
/// `StableDiffusionInpaintPipeline` (regular UNet, latents blended) from the seed alone, and
/// img2img with an adapter.
#[test]
fn run_inpaints_and_draws_img2img_as_diffusers() {
    run_fixture_case("inpaint", |c| c["name"] == "z2_inpaint_euler_strength075_pipeline", &[]);
    run_fixture_case("img2img", |c| c["name"] == "y_img2img_ddim_sketch_loop", &[]);
}

/// `build-engine --backend ort-cpu` saves ONNX Runtime's optimized graphs; `run` then loads them
/// (optimizer off) and draws the same image. A cache built for another machine is not used, and
/// `run` says which key field changed.
#[test]
fn prepared_engines_are_used_and_stale_ones_are_not() {
    check_prepared_engines("ort-cpu", |entry| entry.join("optimized.onnx").is_file());
}

/// The same for `--backend openvino`, whose entries hold OpenVINO's compiled models (`*.blob`).
#[test]
fn prepared_openvino_engines_are_used_and_stale_ones_are_not() {
    check_prepared_engines("openvino", |entry| {
        std::fs::read_dir(entry).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "blob"))
    });
}

/// Every file of the cache `entries` with its size and modification time.
fn entry_files(entries: &[std::path::PathBuf]) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut files: Vec<_> = entries
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()))
        .map(|path| {
            let meta = path.metadata().unwrap();
            (path, meta.len(), meta.modified().unwrap())
        })
        .collect();
    files.sort();
    files
}

/// `build-engine` on `backend` into a fresh cache: every graph gets one entry holding its
/// `artefact` and its key; `run` through the cache draws what it draws without; an entry whose key
/// no longer matches the machine is skipped with a note naming the changed field.
fn check_prepared_engines(backend: &str, artefact: fn(&std::path::Path) -> bool) {
    let cache = std::env::temp_dir().join(format!("t2i-cli-engines-{backend}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let cache_arg = cache.to_str().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
        .args(["build-engine", "--backend", backend, "--engine-cache", cache_arg, "--graphs"])
        .arg(common::tiny_sd1())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "build-engine failed: {stderr}");
    assert!(stderr.contains("start-up from the prepared engines"), "{stderr}");
    // One entry per graph, each with its prepared artefact and, last, its key.
    let graphs = ["text_encoder", "unet", "vae_decoder", "adapter_sketch", "adapter_color"];
    let mut entries = Vec::new();
    for graph in graphs {
        let dirs: Vec<_> = std::fs::read_dir(cache.join(graph)).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(dirs.len(), 1, "{graph}: {dirs:?}");
        assert!(artefact(&dirs[0]) && dirs[0].join("key.json").is_file(), "{dirs:?}");
        entries.push(dirs[0].clone());
    }

    let backend_args = ["--backend", backend];
    let (uncached, _) = run_fixture_case(
        &format!("{backend}-uncached"),
        two_adapters_tau,
        &[&backend_args[..], &["--no-engine-cache"]].concat(),
    );
    let written = entry_files(&entries);
    let (cached, stderr) = run_fixture_case(
        &format!("{backend}-cached"),
        two_adapters_tau,
        &[&backend_args[..], &["--engine-cache", cache_arg]].concat(),
    );
    assert!(!stderr.contains("stale"), "{stderr}");
    // Used, not rebuilt: OpenVINO rewrites a blob it cannot import (without its IR frontend) and
    // would quietly compile every graph again.
    assert_eq!(entry_files(&entries), written, "{backend}: run rewrote prepared engines instead of using them");
    let diff = common::rel_l2(&cached, &uncached);
    assert!(diff <= 1e-6, "prepared graphs changed the result: rel L2 {diff:.2e} against loading the originals");

    // The unet's entry as if built on another CPU: its folder name no longer matches this machine's key.
    let key_file = entries[1].join("key.json");
    let mut key: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    key.insert("cpu".into(), Value::String("another CPU".into()));
    std::fs::write(&key_file, serde_json::to_string(&key).unwrap()).unwrap();
    std::fs::rename(&entries[1], entries[1].with_file_name("0000000000000000")).unwrap();
    let (_, stderr) = run_fixture_case(
        &format!("{backend}-stale"),
        two_adapters_tau,
        &[&backend_args[..], &["--engine-cache", cache_arg]].concat(),
    );
    assert!(
        stderr.contains("prepared engine for unet") && stderr.contains("is stale (cpu: another CPU -> "),
        "{stderr}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `t2i-rt bench --json` writes the documented shape, with and without adapters, on the CPU backends.
#[test]
fn bench_writes_stage_statistics() {
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let sketch = common::tiny_sd1_fixtures().join("conditions/sketch.png");
    for backend in ["ort-cpu", "tract", "openvino"] {
        let json = out_dir.join(format!("{backend}.json"));
        let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
            .args(["bench", "--graphs"])
            .arg(common::tiny_sd1())
            .args(["--backend", backend, "--steps", "3", "--size", "64x128", "--scheduler", "heun"])
            .args(["--warmup", "0", "--iters", "2", "--threads", "1", "--adapter"])
            .arg(format!("sketch={}:0.8", sketch.display()))
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("adapter overhead: total with / without adapters = "), "{stdout}");
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["backend"], backend);
        assert_eq!(report["size"], serde_json::json!([64, 128]));
        assert_eq!((report["steps"].as_u64(), report["iters"].as_u64()), (Some(3), Some(2)));
        assert!(report["startup_ms"].as_f64().unwrap() > 0.0);
        assert!(report["peak_rss_mb"].as_f64().unwrap() > 0.0);
        assert!(report["adapter_overhead"].as_f64().unwrap() > 0.0);
        for stats in [&report["stages_ms"], &report["without_adapters"]["stages_ms"]] {
            for stage in ["tokenize", "text_encoder", "unet_step", "scheduler_step", "vae_decode", "total"] {
                let s = &stats[stage];
                let (median, p90, min) = (s["median"].as_f64(), s["p90"].as_f64(), s["min"].as_f64());
                assert!(
                    matches!((min, median, p90), (Some(a), Some(b), Some(c)) if a <= b && b <= c && a >= 0.0),
                    "{backend} {stage}: {s}"
                );
            }
        }
        assert!(report["stages_ms"]["adapters"]["median"].as_f64().unwrap() > 0.0);
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// `t2i-rt bench --ip-image` runs the request with the image embedding cached and with the cache
/// cleared, and reports the IP-Adapter's stage for both.
#[test]
fn bench_reports_the_ip_adapter_cold_and_warm() {
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-bench-ip-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let json = out_dir.join("ip.json");
    let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
        .args(["bench", "--graphs"])
        .arg(common::generated_dir().join("tiny-sd1-ip"))
        .args(["--steps", "2", "--warmup", "1", "--iters", "2", "--threads", "1", "--ip-scale", "0.6", "--ip-image"])
        .arg(common::generated_dir().join("fixtures/tiny-sd1-ip/image.png"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("IP image, cache warm:") && stdout.contains("IP image, cache cold:"), "{stdout}");
    assert!(stdout.contains("IP image: ip_adapter stage "), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for stats in [&report["stages_ms"], &report["ip_cache_cold"]["stages_ms"]] {
        assert!(stats["ip_adapter"]["median"].as_f64().unwrap() > 0.0, "{stats}");
        assert!(stats["total"]["median"].as_f64().unwrap() > 0.0, "{stats}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// `t2i-rt bench --style` runs the request with and without its style images and reports the style
/// adapter's stage (only where style images ran) and the overhead; beside an adapter, the style
/// images stay in both runs and the stage is still reported.
#[test]
fn bench_reports_the_style_adapter() {
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-bench-style-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let fixtures = common::generated_dir().join("fixtures/tiny-sd1-style");
    let style = |k: usize, weight: &str| format!("{}:{weight}", fixtures.join(format!("style_{k}.png")).display());
    let bench = |extra: &[String], json: &std::path::Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
            .args(["bench", "--graphs"])
            .arg(common::generated_dir().join("tiny-sd1-style"))
            .args(["--steps", "2", "--warmup", "1", "--iters", "2", "--threads", "1", "--style-cond-tau", "0.5"])
            .args(["--style", &style(0, "1.0"), "--style", &style(1, "0.5")])
            .args(extra)
            .arg("--json")
            .arg(json)
            .output()
            .unwrap();
        assert!(output.status.success(), "bench failed: {}", String::from_utf8_lossy(&output.stderr));
        let report: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        (String::from_utf8_lossy(&output.stdout).into_owned(), report)
    };
    let (stdout, report) = bench(&[], &out_dir.join("style.json"));
    assert!(stdout.contains("with style:") && stdout.contains("without style:"), "{stdout}");
    assert!(stdout.contains("style overhead: total with / without style images = "), "{stdout}");
    assert!(stdout.contains("style: style_adapter stage "), "{stdout}");
    assert!(report["stages_ms"]["style_adapter"]["median"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["without_style"]["stages_ms"].get("style_adapter").is_none(), "{report}");
    assert!(report["style_overhead"].as_f64().unwrap() > 0.0, "{report}");
    let sketch = common::generated_dir().join("fixtures/tiny-sd1-style/conditions/sketch.png");
    let adapter = ["--adapter".to_string(), format!("sketch={}", sketch.display())];
    let (stdout, report) = bench(&adapter, &out_dir.join("style-adapter.json"));
    assert!(stdout.contains("adapter overhead: "), "{stdout}");
    for stats in [&report["stages_ms"], &report["without_adapters"]["stages_ms"]] {
        assert!(stats["style_adapter"]["median"].as_f64().unwrap() > 0.0, "{stats}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// A ControlNet condition made from a photo: `--preprocess canny=canny` turns the photo into edges
/// (imageproc's Canny), `--save-conditions` writes exactly what the graphs see; a palette for the
/// color adapter, an inverted sketch. The run itself draws.
#[test]
fn conditions_from_photos_are_saved_as_the_graphs_see_them() {
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-conditions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let photo = common::graphs_dir().join("fixtures/conditions/photo.png");
    let sketch = common::tiny_sd1_fixtures().join("conditions/sketch.png");
    let saved = out_dir.join("conditions");
    let output = Command::new(env!("CARGO_BIN_EXE_t2i-rt"))
        .args(["run", "--graphs"])
        .arg(common::tiny_sd1())
        .args(["--prompt", "a town", "--steps", "2", "--seed", "1", "--width", "128", "--height", "64"])
        .arg("--control")
        .arg(format!("canny={}", photo.display()))
        .arg("--adapter")
        .arg(format!("color={}", photo.display()))
        .arg("--adapter")
        .arg(format!("sketch={}", sketch.display()))
        .args(["--preprocess", "canny=canny", "--preprocess", "color=palette", "--preprocess", "sketch=invert"])
        .arg("--save-conditions")
        .arg(&saved)
        .arg("--out")
        .arg(out_dir.join("out.png"))
        .output()
        .unwrap();
    assert!(output.status.success(), "run failed: {}", String::from_utf8_lossy(&output.stderr));
    let open = |name: &str| image::open(saved.join(name)).unwrap();
    let canny = open("controlnet_canny.png").to_rgb8();
    assert_eq!(canny.dimensions(), (128, 64));
    assert!(canny.pixels().all(|p| p[0] == p[1] && p[1] == p[2] && (p[0] == 0 || p[0] == 255)), "not an edge map");
    let edges = canny.pixels().filter(|p| p[0] == 255).count();
    assert!(edges > 100 && edges < 128 * 64 / 4, "{edges} edge pixels");
    // 128x64 at one color per 64x64 cell: two colors.
    let palette = open("adapter_color.png").to_rgb8();
    let colors: std::collections::BTreeSet<[u8; 3]> = palette.pixels().map(|p| p.0).collect();
    assert_eq!(colors.len(), 2, "{colors:?}");
    // The sketch adapter is gray: inverted, white-on-black becomes black-on-white.
    let inverted = open("adapter_sketch.png");
    assert_eq!(inverted.color(), image::ColorType::L8);
    let original =
        image::open(&sketch).unwrap().resize_exact(128, 64, image::imageops::FilterType::Lanczos3).to_luma8();
    let mean = |img: &image::GrayImage| img.pixels().map(|p| f64::from(p[0])).sum::<f64>() / f64::from(128 * 64);
    assert!(mean(&inverted.to_luma8()) > 200.0 && mean(&original) < 55.0);
    assert!(out_dir.join("out.png").is_file());
    let _ = std::fs::remove_dir_all(&out_dir);
}
