//! Sampler parity with diffusers 0.42.1, on the traces `export/t2i_export/scheduler_traces.py`
//! writes to `graphs/fixtures/schedulers/` as gzipped JSON (see its docstring for the exact loop and
//! encoding).
//!
//! Each trace is re-run here from its config JSON, noise and fake UNet, free-running (every step
//! takes the runtime's own previous sample, so errors would accumulate as in a real loop).
//!
//! Tolerances, and why:
//! * timesteps: bit-equal, except Karras and `continuous` timesteps, which diffusers derives from
//!   logs of the sigmas through numpy's float32 `np.log` / torch's `log` (SIMD and MKL code that is
//!   not correctly rounded): `TIMESTEP_TOL` relative (measured ≤ 6.2e-7, i.e. a few float32 ulps,
//!   over 1..=1000 Karras steps; a UNet cannot tell).
//! * sigmas and `init_noise_sigma`: `SIGMA_TOL` relative. diffusers takes them from torch CPU
//!   `sqrt`/`exp`, which run through MKL VML (high-accuracy mode, not correctly rounded: 6 of SD's
//!   1000 training sigmas are 1 ulp off the exact float32 square root); the runtime rounds
//!   correctly, so interpolated sigmas may differ by 1 ulp (measured ≤ 1.2e-7).
//! * every sample (the scaled UNet input and the sample after each step) and every `add_noise`
//!   result: relative L2 error `‖rust − diffusers‖₂ / ‖diffusers‖₂ ≤ 1e-5` per tensor, the
//!   runtime's parity target. The arithmetic mirrors diffusers' float32 op order, so most traces
//!   are bit-equal and the rest differ by those ulps of a coefficient; the test prints the
//!   measured maxima (`cargo test --test scheduler_parity -- --nocapture`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use ndarray::{ArrayD, IxDyn};
use serde_json::{json, Value};
use t2i_rt::scheduler::{NoiseSource, Scheduler, SchedulerConfig, SchedulerKind};
use t2i_rt::Error;

const REL_L2_TOL: f64 = 1e-5;
const TIMESTEP_TOL: f64 = 1e-5;
const SIGMA_TOL: f64 = 1e-6;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/fixtures/schedulers")
}

/// A `.json.gz` fixture.
fn read_json(path: &Path) -> Value {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    GzDecoder::new(file).read_to_string(&mut text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// 8 hex digits per float32: its IEEE-754 bits as a big-endian number.
fn decode_hex(s: &str) -> Vec<f32> {
    assert_eq!(s.len() % 8, 0, "hex tensor length {} is not a multiple of 8", s.len());
    (0..s.len() / 8)
        .map(|i| f32::from_bits(u32::from_str_radix(&s[8 * i..8 * i + 8], 16).expect("hex digits")))
        .collect()
}

fn tensor(v: &Value, shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), decode_hex(v.as_str().expect("hex string"))).expect("shape")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// The trace script's `fake_model`: `0.3 * x + 0.05 * sin(t / 100)` as torch computes it (the
/// Python-float constant is rounded to float32 once, then float32 multiply and add).
fn fake_model(x: &ArrayD<f32>, t: f32) -> ArrayD<f32> {
    let c = (0.05 * (t as f64 / 100.0).sin()) as f32;
    x.mapv(|v| 0.3f32 * v + c)
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| if g == w { 0.0 } else { ((g - w) as f64).abs() / (w as f64).abs().max(1e-30) })
        .fold(0.0, f64::max)
}

/// t2i-rt's name for the sampler the trace ran. Traces name diffusers' class by its usual sampler
/// name; a PNDM trace whose config has no `skip_prk_steps` ran the Runge-Kutta warm-up, which
/// t2i-rt calls `pndm-prk` (`pndm` is always PLMS).
fn kind_of(case: &Value) -> SchedulerKind {
    let kind: SchedulerKind = case["kind"].as_str().expect("kind").parse().expect("known kind");
    if kind == SchedulerKind::Pndm && case["config"]["skip_prk_steps"] != json!(true) {
        return SchedulerKind::PndmPrk;
    }
    kind
}

/// The case's config, with the `step` keyword arguments the trace passed (DDIM's `eta`) and the
/// request options it set.
fn config_of(case: &Value) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(&case["config"]);
    if let Some(eta) = case.get("step_kwargs").and_then(|k| k.get("eta")) {
        config.eta = eta.as_f64().expect("eta") as f32;
    }
    // A request's scheduler options, applied over the kind's preset.
    if let Some(Value::Object(options)) = case.get("options") {
        for (key, value) in options {
            config.set(key, value.clone());
        }
    }
    config
}

fn build(case: &Value) -> Box<dyn Scheduler> {
    let config = config_of(case);
    let steps = case["steps"].as_u64().expect("steps") as usize;
    config.build(kind_of(case), steps).unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

/// The timestep tolerance: configs whose timesteps diffusers derives from logs of sigmas.
fn timestep_tol(config: &Value) -> f64 {
    let from_logs = config["use_karras_sigmas"] == json!(true)
        || (config["timestep_type"] == json!("continuous") && config["prediction_type"] == json!("v_prediction"));
    if from_logs {
        TIMESTEP_TOL
    } else {
        0.0
    }
}

/// Replays the standard normal tensors diffusers' `randn_tensor` returned during the trace, in
/// order; each draw must be consumed whole by one request of the same size.
struct Replay {
    draws: Vec<Vec<f32>>,
    next: usize,
}

impl Replay {
    fn new(case: &Value) -> Self {
        let draws = match case.get("noise_draws") {
            Some(Value::Array(d)) => d.iter().map(|h| decode_hex(h.as_str().expect("hex"))).collect(),
            _ => Vec::new(),
        };
        Replay { draws, next: 0 }
    }
}

impl NoiseSource for Replay {
    fn fill_standard_normal(&mut self, out: &mut [f32]) {
        let draw = self.draws.get(self.next).unwrap_or_else(|| {
            panic!("the scheduler drew noise {} times; diffusers drew {}", self.next + 1, self.draws.len())
        });
        assert_eq!(draw.len(), out.len(), "noise draw {} has a different size than diffusers'", self.next);
        out.copy_from_slice(draw);
        self.next += 1;
    }
}

struct Measured {
    timesteps_max_rel: f64,
    sigmas_max_rel: f64,
    sample_max_rel_l2: f64,
    scaled_max_rel_l2: f64,
    add_noise_max_rel_l2: f64,
    bit_equal: bool,
}

fn check_trace(case: &Value) -> Measured {
    let name = case["name"].as_str().expect("name");
    let shape: Vec<usize> =
        case["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let mut scheduler = build(case);
    let time_tol = timestep_tol(&case["config"]);

    let want_t = floats(&case["timesteps"]);
    assert_eq!(scheduler.num_steps(), want_t.len(), "{name}: number of steps");
    let timesteps_max_rel = max_rel(scheduler.timesteps(), &want_t);
    assert!(timesteps_max_rel <= time_tol, "{name}: timesteps {:?} != {want_t:?}", scheduler.timesteps());

    let init = scheduler.init_noise_sigma();
    let want_init = case["init_noise_sigma"].as_f64().unwrap() as f32;
    let mut sigmas_max_rel = max_rel(&[init], &[want_init]);
    if let Some(sigmas) = case.get("sigmas") {
        let got = scheduler.sigmas().unwrap_or_else(|| panic!("{name}: diffusers has sigmas, the runtime none"));
        sigmas_max_rel = sigmas_max_rel.max(max_rel(got, &floats(sigmas)));
    }
    assert!(sigmas_max_rel <= SIGMA_TOL, "{name}: init_noise_sigma {init} vs {want_init} or sigmas");
    assert_eq!(scheduler.order() as u64, case["order"].as_u64().unwrap_or(1), "{name}: order");

    let noise = tensor(&case["noise"], &shape);
    let mut sample = noise.mapv(|x| x * init);
    let mut rng = Replay::new(case);
    let (mut sample_max, mut scaled_max) = (0.0f64, 0.0f64);
    let mut bit_equal = timesteps_max_rel == 0.0 && sigmas_max_rel == 0.0;
    let trajectory = case["trajectory"].as_array().expect("trajectory");
    assert_eq!(trajectory.len(), scheduler.num_steps(), "{name}: trajectory length");
    for (i, entry) in trajectory.iter().enumerate() {
        let mut scaled = sample.clone();
        scheduler.scale_model_input(&mut scaled, i);
        if let Some(want) = entry.get("scaled") {
            let want = tensor(want, &shape);
            let err = rel_l2(scaled.as_slice().unwrap(), want.as_slice().unwrap());
            bit_equal &= scaled == want;
            scaled_max = scaled_max.max(err);
            assert!(err <= REL_L2_TOL, "{name}: scaled input at step {i}: relative L2 error {err:e}");
        }
        let t = scheduler.timesteps()[i];
        let model_output = fake_model(&scaled, t);
        scheduler.step(model_output.view(), i, &mut sample, &mut rng).unwrap();
        let want = tensor(&entry["sample"], &shape);
        assert!(sample.iter().all(|x| x.is_finite()), "{name}: non-finite sample at step {i}");
        let err = rel_l2(sample.as_slice().unwrap(), want.as_slice().unwrap());
        bit_equal &= sample == want;
        sample_max = sample_max.max(err);
        assert!(err <= REL_L2_TOL, "{name}: sample after step {i}: relative L2 error {err:e}");
    }
    assert_eq!(rng.next, rng.draws.len(), "{name}: diffusers drew noise {} times", rng.draws.len());

    let original = tensor(&case["original"], &shape);
    let fresh = build(case);
    let mut add_noise_max = 0.0f64;
    for entry in case["add_noise"].as_array().expect("add_noise") {
        let k = entry["step"].as_u64().unwrap() as usize;
        let got = fresh.add_noise(original.view(), noise.view(), k);
        let want = tensor(&entry["result"], &shape);
        let err = rel_l2(got.as_slice().unwrap(), want.as_slice().unwrap());
        bit_equal &= got == want;
        add_noise_max = add_noise_max.max(err);
        assert!(err <= REL_L2_TOL, "{name}: add_noise at step {k}: relative L2 error {err:e}");
    }
    Measured {
        timesteps_max_rel,
        sigmas_max_rel,
        sample_max_rel_l2: sample_max,
        scaled_max_rel_l2: scaled_max,
        add_noise_max_rel_l2: add_noise_max,
        bit_equal,
    }
}

#[test]
fn traces_match_diffusers() {
    let mut paths: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .expect("graphs/fixtures/schedulers exists (python -m t2i_export.scheduler_traces)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz") && !p.ends_with("timestep_sweep.json.gz"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 16, "expected the scheduler traces, found {}", paths.len());
    println!(
        "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}  bit-equal",
        "trace", "steps", "t rel", "sigma rel", "sample L2", "scaled L2", "noise L2"
    );
    for path in &paths {
        let case = read_json(path);
        let m = check_trace(&case);
        println!(
            "{:<40} {:>6} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}  {}",
            case["name"].as_str().unwrap(),
            case["timesteps"].as_array().unwrap().len(),
            m.timesteps_max_rel,
            m.sigmas_max_rel,
            m.sample_max_rel_l2,
            m.scaled_max_rel_l2,
            m.add_noise_max_rel_l2,
            m.bit_equal
        );
    }
}

#[test]
fn timestep_sweep_matches_diffusers() {
    let sweep = read_json(&fixtures_dir().join("timestep_sweep.json.gz"));
    let cases = sweep["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40);
    for case in cases {
        let label = format!("{} with {} steps", case["name"], case["steps"]);
        if case.get("step_fails") == Some(&json!(true)) {
            // diffusers' `step` raises IndexError on this schedule; the runtime refuses to build it.
            let config = SchedulerConfig::new(&case["config"]);
            let steps = case["steps"].as_u64().unwrap() as usize;
            assert!(config.build(kind_of(case), steps).is_err(), "{label}: expected an error");
            continue;
        }
        let scheduler = build(case);
        let tol = timestep_tol(&case["config"]);
        let want = decode_hex(case["timesteps"].as_str().unwrap());
        let err = max_rel(scheduler.timesteps(), &want);
        assert!(err <= tol, "{label}: timesteps {:?} != {want:?}", scheduler.timesteps());
        if let Some(sigmas) = case.get("sigmas") {
            let got = scheduler.sigmas().unwrap_or_else(|| panic!("{label}: the runtime has no sigmas"));
            let err = max_rel(got, &decode_hex(sigmas.as_str().unwrap()));
            assert!(err <= SIGMA_TOL, "{label}: sigmas differ by {err:e}");
            let want_init = case["init_noise_sigma"].as_f64().unwrap() as f32;
            let err = max_rel(&[scheduler.init_noise_sigma()], &[want_init]);
            assert!(err <= SIGMA_TOL, "{label}: init_noise_sigma differs by {err:e}");
        }
    }
}

fn sd15() -> Value {
    json!({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false, "trained_betas": null
    })
}

fn scheduler_error(result: Result<Box<dyn Scheduler>, Error>) -> (&'static str, String) {
    match result {
        Err(Error::Scheduler { scheduler, message }) => (scheduler, message),
        Err(other) => panic!("expected a scheduler error, got {other}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn kind_names_round_trip_and_unknown_name_lists_valid_ones() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.as_str().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.as_str());
    }
    let err = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(err.contains("dpm++") && err.contains("ddim, pndm, pndm-prk, euler, euler-a,"), "{err}");
}

#[test]
fn bad_beta_schedule_names_key_and_accepted_values() {
    let mut config = sd15();
    config["beta_schedule"] = json!("sigmoid");
    let config = SchedulerConfig::new(&config);
    for kind in SchedulerKind::ALL {
        let (scheduler, message) = scheduler_error(config.build(kind, 10));
        assert_eq!(scheduler, kind.as_str());
        assert!(message.contains("beta_schedule") && message.contains("sigmoid"), "{message}");
        assert!(message.contains("linear, scaled_linear, squaredcos_cap_v2"), "{message}");
    }
    // diffusers ignores beta_schedule when trained_betas is given.
    let mut config = sd15();
    config["beta_schedule"] = json!("sigmoid");
    config["num_train_timesteps"] = json!(4);
    config["trained_betas"] = json!([0.1, 0.2, 0.3, 0.4]);
    SchedulerConfig::new(&config).build(SchedulerKind::Ddim, 2).unwrap();
}

#[test]
fn steps_out_of_range_are_rejected() {
    let config = SchedulerConfig::new(&sd15());
    for kind in SchedulerKind::ALL {
        let (_, message) = scheduler_error(config.build(kind, 0));
        assert!(message.contains("0 inference steps"), "{message}");
        let (_, message) = scheduler_error(config.build(kind, 1001));
        assert!(message.contains("1001") && message.contains("1000"), "{message}");
    }
    config.build(SchedulerKind::Euler, 1000).unwrap();
    config.build(SchedulerKind::Ddim, 999).unwrap();
    // Leading spacing with steps_offset 1 and 1000 steps reaches timestep 1000: diffusers fails
    // indexing alphas_cumprod; the runtime says so when building.
    let (_, message) = scheduler_error(config.build(SchedulerKind::Ddim, 1000));
    assert!(message.contains("timestep 1000"), "{message}");
}

#[test]
fn unsupported_values_are_clear_errors() {
    let cases = [
        (SchedulerKind::Ddim, "prediction_type", json!("flow"), "epsilon, v_prediction, sample"),
        (SchedulerKind::Ddim, "timestep_spacing", json!("uniform"), "leading, trailing, linspace"),
        (SchedulerKind::Ddim, "num_train_timesteps", json!(1000.5), "integer"),
        (SchedulerKind::Euler, "use_exponential_sigmas", json!(true), "not supported yet"),
        (SchedulerKind::Euler, "use_beta_sigmas", json!(true), "not supported yet"),
        (SchedulerKind::Euler, "interpolation_type", json!("cubic"), "linear, log_linear"),
        (SchedulerKind::Euler, "final_sigmas_type", json!("one"), "zero, sigma_min"),
        (SchedulerKind::Euler, "timestep_type", json!("edm"), "discrete, continuous"),
        (SchedulerKind::Euler, "trained_betas", json!([0.1]), "trained_betas"),
    ];
    for (kind, key, value, expect) in cases {
        let mut config = sd15();
        config[key] = value;
        let config = SchedulerConfig::new(&config);
        let (scheduler, message) = scheduler_error(config.build(kind, 10));
        assert_eq!(scheduler, kind.as_str());
        assert!(message.contains(key) && message.contains(expect), "{key}: {message}");
    }
    let mut config = SchedulerConfig::new(&sd15());
    config.eta = -0.5;
    let (_, message) = scheduler_error(config.build(SchedulerKind::Ddim, 10));
    assert!(message.contains("eta") && message.contains(">= 0"), "{message}");
    for kind in SchedulerKind::ALL {
        let (_, message) = scheduler_error(SchedulerConfig::new(&json!([1, 2])).build(kind, 10));
        assert!(message.contains("JSON object"), "{message}");
    }
}

#[test]
fn from_config_defaults_are_per_scheduler() {
    use t2i_rt::scheduler::{DdimConfig, EulerConfig, PredictionType, TimestepSpacing};
    // SD 1.5's config has no timestep_spacing: DDIM takes "leading", Euler "linspace".
    let config = SchedulerConfig::new(&sd15());
    let ddim = DdimConfig::from_config(&config).unwrap();
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    assert!(!ddim.clip_sample && !ddim.set_alpha_to_one && ddim.steps_offset == 1);
    assert_eq!(EulerConfig::from_config(&config).unwrap().timestep_spacing, TimestepSpacing::Linspace);
    // No keys at all: DDIM clips and sets alpha to one by default.
    let ddim = DdimConfig::from_config(&SchedulerConfig::default()).unwrap();
    assert!(ddim.clip_sample && ddim.set_alpha_to_one && ddim.steps_offset == 0);
    assert_eq!(ddim.prediction_type, PredictionType::Epsilon);
    // `_use_default_values` keys fall back to the target's default.
    let mut loaded = sd15();
    loaded["timestep_spacing"] = json!("leading");
    loaded["_use_default_values"] = json!(["timestep_spacing"]);
    let config = SchedulerConfig::new(&loaded);
    assert_eq!(EulerConfig::from_config(&config).unwrap().timestep_spacing, TimestepSpacing::Linspace);
}

#[test]
fn step_index_and_shapes_are_checked() {
    let config = SchedulerConfig::new(&sd15());
    let mut rng = rand::rng();
    for kind in SchedulerKind::ALL {
        let mut scheduler = config.build(kind, 4).unwrap();
        assert_eq!(scheduler.kind(), kind);
        let mut sample = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 2]));
        let output = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 2]));
        // Heun's 4 steps are 7 model evaluations: the first index past the end is num_steps().
        let end = scheduler.num_steps();
        let (_, message) = match scheduler.step(output.view(), end, &mut sample, &mut rng) {
            Err(Error::Scheduler { scheduler, message }) => (scheduler, message),
            other => panic!("{kind}: expected a scheduler error, got {other:?}"),
        };
        assert!(message.contains(&format!("step index {end}")), "{message}");
        let wrong = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 3]));
        assert!(scheduler.step(wrong.view(), 0, &mut sample, &mut rng).is_err());
        scheduler.step(output.view(), 0, &mut sample, &mut rng).unwrap();
    }
}

#[test]
#[should_panic(expected = "step index 4 out of range")]
fn scale_model_input_past_the_end_panics() {
    let scheduler = SchedulerConfig::new(&sd15()).build(SchedulerKind::Euler, 4).unwrap();
    scheduler.scale_model_input(&mut ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 2])), 4);
}

#[test]
fn euler_a_and_heun_refuse_what_diffusers_cannot_run() {
    let cases = [
        // diffusers raises NotImplementedError in `step` for it.
        (SchedulerKind::EulerAncestral, "prediction_type", json!("sample"), "epsilon, v_prediction"),
        (SchedulerKind::EulerAncestral, "timestep_spacing", json!("uniform"), "leading, trailing, linspace"),
        (SchedulerKind::Heun, "use_exponential_sigmas", json!(true), "not supported yet"),
        (SchedulerKind::Heun, "use_beta_sigmas", json!(true), "not supported yet"),
        (SchedulerKind::Heun, "beta_schedule", json!("exp"), "linear, scaled_linear, squaredcos_cap_v2"),
        (SchedulerKind::Heun, "prediction_type", json!("original_sample"), "epsilon, v_prediction, sample"),
    ];
    for (kind, key, value, expect) in cases {
        let mut config = sd15();
        config[key] = value;
        let (scheduler, message) = scheduler_error(SchedulerConfig::new(&config).build(kind, 10));
        assert_eq!(scheduler, kind.as_str());
        assert!(message.contains(key) && message.contains(expect), "{key}: {message}");
    }
}

#[test]
fn heun_second_stage_needs_its_first_and_add_noise_takes_the_repeated_sigma() {
    let config = SchedulerConfig::new(&sd15());
    let mut scheduler = config.build(SchedulerKind::Heun, 4).unwrap();
    assert_eq!((scheduler.num_steps(), scheduler.order()), (7, 2));
    let t = scheduler.timesteps().to_vec();
    assert!(t[1] == t[2] && t[3] == t[4] && t[5] == t[6] && t[0] != t[1], "{t:?}");
    let mut rng = rand::rng();
    let mut sample = ArrayD::<f32>::ones(IxDyn(&[1, 4, 2, 2]));
    let output = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2, 2]));
    let (_, message) = match scheduler.step(output.view(), 1, &mut sample, &mut rng) {
        Err(Error::Scheduler { scheduler, message }) => (scheduler, message),
        other => panic!("expected a scheduler error, got {other:?}"),
    };
    assert!(message.contains("step index 1") && message.contains("step 0 first"), "{message}");
    scheduler.step(output.view(), 0, &mut sample, &mut rng).unwrap();
    scheduler.step(output.view(), 1, &mut sample, &mut rng).unwrap();
    assert!(scheduler.step(output.view(), 3, &mut sample, &mut rng).is_err());
    // diffusers' add_noise looks the timestep up and takes its second occurrence: same sigma.
    let zeros = ArrayD::<f32>::zeros(IxDyn(&[2]));
    let ones = ArrayD::<f32>::ones(IxDyn(&[2]));
    let sigmas = scheduler.sigmas().unwrap().to_vec();
    for (k, &sigma) in sigmas[..scheduler.num_steps()].iter().enumerate() {
        assert_eq!(scheduler.add_noise(zeros.view(), ones.view(), k)[0], sigma, "step {k}");
    }
}

#[test]
fn pndm_lms_ddpm_refuse_what_they_do_not_support() {
    let cases = [
        (SchedulerKind::Pndm, "prediction_type", json!("sample"), 10, "epsilon, v_prediction"),
        (SchedulerKind::PndmPrk, "skip_prk_steps", json!(false), 3, "at least 4"),
        (SchedulerKind::Lms, "use_exponential_sigmas", json!(true), 10, "not supported yet"),
        (SchedulerKind::Lms, "use_beta_sigmas", json!(true), 10, "not supported yet"),
        (SchedulerKind::Lms, "prediction_type", json!("original_sample"), 10, "epsilon, v_prediction, sample"),
        (SchedulerKind::Ddpm, "variance_type", json!("learned_range"), 10, "predicts the variance"),
        (SchedulerKind::Ddpm, "variance_type", json!("fixed_large_log"), 10, "NaN"),
        (SchedulerKind::Ddpm, "variance_type", json!("other"), 10, "fixed_small, fixed_small_log, fixed_large"),
        (SchedulerKind::Ddpm, "timestep_spacing", json!("uniform"), 10, "leading, trailing, linspace"),
    ];
    for (kind, key, value, steps, expect) in cases {
        let mut config = sd15();
        config[key] = value;
        let (scheduler, message) = scheduler_error(SchedulerConfig::new(&config).build(kind, steps));
        assert_eq!(scheduler, kind.as_str());
        assert!(message.contains(key) && message.contains(expect), "{kind} {key}: {message}");
    }
    // Leading spacing with steps_offset 1 reaches timestep 1000 with 1000 steps, as for DDIM.
    let config = SchedulerConfig::new(&sd15());
    for kind in [SchedulerKind::Pndm, SchedulerKind::PndmPrk, SchedulerKind::Ddpm] {
        let (_, message) = scheduler_error(config.build(kind, 1000));
        assert!(message.contains("timestep 1000"), "{kind}: {message}");
    }
}

#[test]
fn pndm_evaluates_the_model_once_more_than_the_steps() {
    let config = SchedulerConfig::new(&sd15());
    for (steps, evaluations) in [(1, 1), (2, 3), (20, 21)] {
        assert_eq!(config.build(SchedulerKind::Pndm, steps).unwrap().num_steps(), evaluations);
    }
    // The Runge-Kutta warm-up: 4 evaluations for each of the first 3 steps.
    assert_eq!(config.build(SchedulerKind::PndmPrk, 20).unwrap().num_steps(), 29);
}

/// `pndm` is PLMS and `pndm-prk` adds the Runge-Kutta warm-up, whatever the checkpoint's config
/// says; a request option that contradicts the name is refused with the name that means it.
#[test]
fn pndm_names_mean_one_thing() {
    for skip in [json!(true), json!(false), Value::Null] {
        let mut config = sd15();
        config["skip_prk_steps"] = skip.clone();
        let config = SchedulerConfig::new(&config);
        let plms = config.build(SchedulerKind::Pndm, 20).unwrap();
        assert_eq!((plms.kind(), plms.num_steps()), (SchedulerKind::Pndm, 21), "config skip_prk_steps {skip}");
        let prk = config.build(SchedulerKind::PndmPrk, 20).unwrap();
        assert_eq!((prk.kind(), prk.num_steps()), (SchedulerKind::PndmPrk, 29), "config skip_prk_steps {skip}");
    }
    let mut config = SchedulerConfig::new(&sd15());
    config.set("skip_prk_steps", json!(false));
    let (scheduler, message) = scheduler_error(config.build(SchedulerKind::Pndm, 20));
    assert_eq!(scheduler, "pndm");
    assert!(message.contains("use the pndm-prk sampler instead"), "{message}");
}

/// Without a sampler, a request runs the checkpoint's own, as diffusers does: the config's class,
/// exactly as configured.
#[test]
fn the_default_sampler_is_the_checkpoints_own() {
    let cases = [
        (json!({"_class_name": "PNDMScheduler", "skip_prk_steps": true}), SchedulerKind::Pndm),
        (json!({"_class_name": "PNDMScheduler"}), SchedulerKind::PndmPrk),
        (json!({"_class_name": "EulerDiscreteScheduler"}), SchedulerKind::Euler),
        (json!({"_class_name": "DDIMScheduler"}), SchedulerKind::Ddim),
        (json!({"_class_name": "EulerAncestralDiscreteScheduler"}), SchedulerKind::EulerAncestral),
        (json!({"_class_name": "DPMSolverMultistepScheduler"}), SchedulerKind::DpmPp2m),
        (
            json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}),
            SchedulerKind::DpmPp2mSde,
        ),
        (json!({"_class_name": "UniPCMultistepScheduler"}), SchedulerKind::UniPc),
        (json!({"_class_name": "LCMScheduler"}), SchedulerKind::Lcm),
    ];
    for (config, kind) in cases {
        let config = SchedulerConfig::new(&config);
        assert_eq!(config.checkpoint_kind().unwrap(), kind);
        let (built_kind, scheduler) = config.build_checkpoint(10).unwrap();
        assert_eq!((built_kind, scheduler.kind()), (kind, kind));
    }
    // Built exactly as configured: a DPM-Solver config of order 3 stays order 3 (the dpmpp-2m
    // name would force order 2).
    let mut third = SchedulerConfig::new(&json!({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}));
    third.set("lower_order_final", json!(false));
    assert_eq!(third.values()["solver_order"], json!(3));
    let unknown = SchedulerConfig::new(&json!({"_class_name": "FlowMatchEulerDiscreteScheduler"}));
    let message = unknown.checkpoint_kind().unwrap_err().to_string();
    assert!(message.contains("FlowMatchEulerDiscreteScheduler") && message.contains("ddim, pndm"), "{message}");
}

#[test]
fn unipc_and_lcm_refuse_what_they_do_not_implement() {
    let cases = [
        (SchedulerKind::UniPc, json!({"use_flow_sigmas": true}), "use_flow_sigmas"),
        (SchedulerKind::UniPc, json!({"use_exponential_sigmas": true}), "use_exponential_sigmas"),
        (SchedulerKind::UniPc, json!({"use_beta_sigmas": true}), "use_beta_sigmas"),
        (SchedulerKind::UniPc, json!({"solver_p": {"_class_name": "DDIMScheduler"}}), "solver_p"),
        (SchedulerKind::UniPc, json!({"prediction_type": "flow_prediction"}), "epsilon, v_prediction, sample"),
        (SchedulerKind::UniPc, json!({"solver_type": "bh3"}), "bh1, bh2"),
        (SchedulerKind::UniPc, json!({"solver_order": 0}), "solver_order"),
        // diffusers' last step yields NaN / inf for these with a final sigma of 0.
        (SchedulerKind::UniPc, json!({"solver_type": "bh1"}), "sigma_min"),
        (SchedulerKind::UniPc, json!({"predict_x0": false}), "sigma_min"),
        (SchedulerKind::UniPc, json!({"lower_order_final": false}), "sigma_min"),
        (SchedulerKind::Lcm, json!({"prediction_type": "flow"}), "epsilon, v_prediction, sample"),
        (SchedulerKind::Lcm, json!({"original_inference_steps": 2000}), "original_inference_steps"),
    ];
    for (kind, overrides, expect) in cases {
        let mut config = sd15();
        for (k, v) in overrides.as_object().unwrap() {
            config[k] = v.clone();
        }
        let (scheduler, message) = scheduler_error(SchedulerConfig::new(&config).build(kind, 10));
        assert_eq!(scheduler, kind.as_str());
        assert!(message.contains(expect), "{overrides}: {message}");
    }
    // As diffusers: LCM's steps are a subset of its `original_inference_steps` (50) schedule.
    let config = SchedulerConfig::new(&sd15());
    let (_, message) = scheduler_error(config.build(SchedulerKind::Lcm, 51));
    assert!(message.contains("51") && message.contains("original_inference_steps"), "{message}");
    config.build(SchedulerKind::Lcm, 50).unwrap();
    let mut config = sd15();
    config["final_sigmas_type"] = json!("sigma_min");
    config["solver_type"] = json!("bh1");
    SchedulerConfig::new(&config).build(SchedulerKind::UniPc, 10).unwrap();
}

/// UniPC's multistep history is per request: starting mid-schedule (img2img) or running the same
/// schedule again gives what a fresh scheduler does from there.
#[test]
fn unipc_history_restarts_when_steps_do_not_follow() {
    let config = SchedulerConfig::new(&sd15());
    let run = |scheduler: &mut Box<dyn Scheduler>, from: usize| {
        let mut rng = rand::rng();
        let mut sample = ArrayD::from_shape_fn(IxDyn(&[1, 4, 2, 2]), |d| d[1] as f32 - 1.5 + 0.1 * d[3] as f32);
        for i in from..scheduler.num_steps() {
            let output = fake_model(&sample, scheduler.timesteps()[i]);
            scheduler.step(output.view(), i, &mut sample, &mut rng).unwrap();
        }
        sample
    };
    let mut reused = config.build(SchedulerKind::UniPc, 12).unwrap();
    let first = run(&mut reused, 0);
    assert_eq!(run(&mut reused, 0), first);
    let mid = run(&mut reused, 5);
    assert_eq!(run(&mut config.build(SchedulerKind::UniPc, 12).unwrap(), 5), mid);
    assert_ne!(mid, first);
}

/// diffusers accepts any positive `solver_order`; the order in use warms up from 1, so one above
/// the step count runs exactly as one equal to it. A huge one must neither allocate its window
/// (a fuzzed request asked for 399999999999) nor overflow the coefficients' factorials (orders
/// above 20 pass 20!, the u64 limit; above 33, 34!).
#[test]
fn unipc_orders_beyond_the_steps_run_as_the_step_count() {
    let run = |order: u64, steps: usize| -> Result<ArrayD<f32>, Error> {
        let mut config = sd15();
        config["solver_order"] = json!(order);
        let mut scheduler = SchedulerConfig::new(&config).build(SchedulerKind::UniPc, steps)?;
        let mut rng = rand::rng();
        let mut sample = ArrayD::from_shape_fn(IxDyn(&[1, 4, 2, 2]), |d| d[1] as f32 - 1.5 + 0.1 * d[3] as f32);
        for i in 0..steps {
            let output = fake_model(&sample, scheduler.timesteps()[i]);
            scheduler.step(output.view(), i, &mut sample, &mut rng)?;
        }
        Ok(sample)
    };
    let at_steps = run(6, 6).unwrap();
    assert_eq!(run(399_999_999_999, 6).unwrap(), at_steps);
    assert_ne!(run(2, 6).unwrap(), at_steps);
    // High orders are numerically meaningless but must end in a value or a typed error.
    for (order, steps) in [(24, 24), (40, 40)] {
        if let Ok(sample) = run(order, steps) {
            assert_eq!(sample.shape(), &[1, 4, 2, 2]);
        }
    }
}

#[test]
fn dpm_solver_refusals_name_key_and_accepted_values() {
    use t2i_rt::scheduler::dpm_solver::DpmSolverConfig;
    let cases = [
        ("variance_type", json!("learned_range"), "accepted: null"),
        ("use_exponential_sigmas", json!(true), "not supported yet"),
        ("use_flow_sigmas", json!(true), "not supported yet"),
        ("prediction_type", json!("flow_prediction"), "epsilon, v_prediction, sample"),
        ("final_sigmas_type", json!("one"), "zero, sigma_min"),
        ("solver_type", json!("euler"), "midpoint, heun"),
        ("lambda_min_clipped", json!(100.0), "lambda_min_clipped"),
    ];
    for (key, value, expect) in cases {
        let mut config = sd15();
        config[key] = value;
        let (scheduler, message) = scheduler_error(SchedulerConfig::new(&config).build(SchedulerKind::DpmPp2mSde, 10));
        assert_eq!(scheduler, "dpmpp-2m-sde");
        assert!(message.contains(key) && message.contains(expect), "{key}: {message}");
    }
    // A DDPM config's variance_type is not a learned one: ignored, as in diffusers.
    let mut config = sd15();
    config["variance_type"] = json!("fixed_small");
    SchedulerConfig::new(&config).build(SchedulerKind::DpmPp2m, 10).unwrap();
    let direct = [
        (json!({"solver_order": 4}), "1, 2, 3"),
        (json!({"algorithm_type": "dpmsolver"}), "accepted: sigma_min"),
        (json!({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}), "1, 2"),
        (json!({"algorithm_type": "unipc"}), "dpmsolver++, sde-dpmsolver++, dpmsolver, sde-dpmsolver"),
    ];
    for (config, expect) in direct {
        let err = DpmSolverConfig::from_config(&SchedulerConfig::new(&config), SchedulerKind::DpmPp2m).unwrap_err();
        assert!(err.to_string().contains(expect), "{config}: {err}");
    }
}
