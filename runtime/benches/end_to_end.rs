//! Whole requests through `Pipeline::run` (10 DDIM steps with guidance, with and without the
//! sketch adapter) on each CPU backend and precision: on the committed tiny set, on the "small"
//! benchmark set when `T2I_SMALL_SET` names one (`python -m t2i_export random --preset small --out
//! DIR`, see benches/README.md), and on a set with INT8 variants when `T2I_INT8_SET` names one
//! (`python -m t2i_export calibrate --graphs DIR --out DIR-int8`). A precision a backend or set
//! cannot run here (bf16 without bf16 instructions, int8 without variants) is skipped with a note.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::InferencePrecision;
use t2i_rt::{BackendKind, LoadOptions, Pipeline, Request};

fn sets() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sets = vec![("tiny-sd1".to_string(), root.join("graphs/tiny-sd1"))];
    for (label, var) in [("small", "T2I_SMALL_SET"), ("int8-set", "T2I_INT8_SET")] {
        if let Some(dir) = std::env::var_os(var) {
            sets.push((label.to_string(), PathBuf::from(dir)));
        }
    }
    sets
}

fn end_to_end(c: &mut Criterion) {
    let sketch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/fixtures/tiny-sd1/conditions/sketch.png");
    for (label, dir) in sets() {
        for (backend, precision) in BackendKind::CPU.into_iter().flat_map(|b| InferencePrecision::ALL.map(|p| (b, p))) {
            let mut options = LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() };
            options.settings.precision = precision;
            let mut pipeline = match Pipeline::load(&dir, &options) {
                Ok(pipeline) => pipeline,
                Err(e) if precision != InferencePrecision::F32 => {
                    eprintln!("end_to_end_{label}: {backend} {precision} skipped: {e}");
                    continue;
                }
                Err(e) => panic!("{label} on {backend}: {e}"),
            };
            let mut request = Request::new("a lighthouse on a cliff at sunset");
            request.steps = 10;
            // DDIM, as every recorded run of this bench used (a request without a sampler now runs
            // the graph set's own, PNDM for SD 1.x).
            request.scheduler = Some(t2i_rt::SchedulerKind::Ddim);
            let adapter = pipeline.manifest().adapters.first().map(|a| a.name.clone());
            // f32 keeps the group names of the runs recorded before precisions were benched.
            let suffix = if precision == InferencePrecision::F32 { String::new() } else { format!("_{precision}") };
            let mut group = c.benchmark_group(format!("end_to_end_{label}_{backend}{suffix}"));
            group.sample_size(10);
            group.bench_function("10_steps", |b| b.iter(|| pipeline.run(&request, &mut |_| true).unwrap()));
            if let Some(name) = adapter {
                let mut with_adapter = request.clone();
                with_adapter.adapters.push(AdapterRequest {
                    name,
                    image: ConditionSource::File(sketch.clone()),
                    weight: 1.0,
                    preprocess: Vec::new(),
                });
                group.bench_function("10_steps_adapter", |b| {
                    b.iter(|| pipeline.run(&with_adapter, &mut |_| true).unwrap())
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
