//! Each sampler's per-step cost (`scale_model_input` + `step`) on a 1×4×128×128 latent (SD 1.5 at
//! 1024², or SDXL at 1024² per sample), measured over a whole 30-step loop with a fixed model
//! output so multistep history and Heun's two stages are included. Compare with a UNet step from
//! `t2i-rt bench` (benches/RESULTS.md): the sampler must be a negligible share of it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::SeedableRng;
use t2i_rt::scheduler::{SchedulerConfig, SchedulerKind};

const STEPS: usize = 30;

fn sd15_config() -> SchedulerConfig {
    SchedulerConfig::new(&serde_json::json!({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false
    }))
}

fn scheduler_steps(c: &mut Criterion) {
    let config = sd15_config();
    let shape = [1, 4, 128, 128];
    let start = ArrayD::from_shape_fn(IxDyn(&shape), |ix| ((ix[1] * 7 + ix[2] * 3 + ix[3]) as f32 * 0.01).sin());
    let model_output = start.mapv(|x| 0.3 * x + 0.01);
    let mut group = c.benchmark_group("scheduler_30_steps_4x128x128");
    for kind in SchedulerKind::ALL {
        let calls = config.build(kind, STEPS).expect("SD 1.5 config builds every kind").num_steps();
        // One element per model call: criterion's throughput line then reads as calls per second.
        group.throughput(Throughput::Elements(calls as u64));
        group.bench_function(kind.as_str(), |b| {
            b.iter(|| {
                let mut scheduler = config.build(kind, STEPS).unwrap();
                let mut rng = StdRng::seed_from_u64(0);
                let mut sample = start.clone();
                for i in 0..scheduler.num_steps() {
                    let mut input = sample.clone();
                    scheduler.scale_model_input(&mut input, i);
                    scheduler.step(model_output.view(), i, &mut sample, &mut rng).unwrap();
                }
                sample
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scheduler_steps);
criterion_main!(benches);
