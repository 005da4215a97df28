//! `t2i-rt run` end to end through the binary: diffusers' initial latents in with `--latents`,
//! final latents out with `--save-latents`, equal to diffusers' (same tolerance as the library's
//! pipeline parity test: relative L2 ≤ 1e-4 on ort-cpu), and PNGs within 2/255; and `t2i-rt bench`.

mod common;

use std::process::Command;

use ndarray::ArrayD;
use serde_json::Value;

#[test]
fn run_reproduces_diffusers_through_the_cli() {
    let fixtures = common::tiny_sd1_fixtures();
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("cases.json")).unwrap()).unwrap();
    // Two adapters with weights, cond_tau < 1 and a negative prompt.
    let case = cases
        .iter()
        .find(|c| c["adapters"].as_array().unwrap().len() == 2 && c["cond_tau"].as_f64().unwrap() < 1.0)
        .unwrap();
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-run-{}", std::process::id()));
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
    cmd.arg("--latents").arg(fixtures.join(case["latents"].as_str().unwrap()));
    cmd.arg("--save-latents").arg(&latents_out).arg("--out").arg(&png);
    let output = cmd.output().unwrap();
    assert!(output.status.success(), "t2i-rt run failed: {}", String::from_utf8_lossy(&output.stderr));

    let expected: ArrayD<f32> =
        ndarray_npy::read_npy(fixtures.join(case["expected_latents"].as_str().unwrap())).unwrap();
    let actual: ArrayD<f32> = ndarray_npy::read_npy(&latents_out).unwrap();
    let rel = common::rel_l2(&actual, &expected);
    assert!(rel <= 1e-4, "latents rel L2 {rel:.3e} > 1e-4");
    let want = image::open(fixtures.join(case["expected_images"][0].as_str().unwrap())).unwrap().to_rgb8();
    let got = image::open(&png).unwrap().to_rgb8();
    let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "a pixel differs by {worst}/255");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// `t2i-rt bench --json` writes the documented shape, with and without adapters, on both backends.
#[test]
fn bench_writes_stage_statistics() {
    let out_dir = std::env::temp_dir().join(format!("t2i-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let sketch = common::tiny_sd1_fixtures().join("conditions/sketch.png");
    for backend in ["ort-cpu", "tract"] {
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
