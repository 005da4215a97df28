//! Each graph of the tiny SD 1.x set on each CPU backend, on the parity fixtures' inputs
//! (graphs/fixtures/tiny-sd1/graph_*/in_*.npy: batch 2, 64×128 images).

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::ArrayD;
use t2i_rt::backend::{BackendKind, TensorView};
use t2i_rt::manifest::Manifest;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

enum Input {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

fn graphs(c: &mut Criterion) {
    let set = root().join("graphs/tiny-sd1");
    let manifest = Manifest::load(&set, false).expect("graphs/tiny-sd1 loads");
    for backend_kind in BackendKind::CPU {
        let backend = backend_kind.create(None).expect("backend starts");
        let mut group = c.benchmark_group(format!("graph_{backend_kind}"));
        for g in manifest.set_graphs() {
            let (name, spec) = (g.name(), g.spec);
            let dir = root().join("graphs/fixtures/tiny-sd1").join(format!("graph_{name}"));
            if !dir.is_dir() {
                continue;
            }
            let inputs: Vec<(String, Input)> = spec
                .inputs
                .iter()
                .map(|input| {
                    let path = dir.join(format!("in_{}.npy", input.name));
                    let value = match ndarray_npy::read_npy::<_, ArrayD<f32>>(&path) {
                        Ok(a) => Input::F32(a),
                        Err(_) => Input::I64(ndarray_npy::read_npy(&path).expect("f32 or i64 input")),
                    };
                    (input.name.clone(), value)
                })
                .collect();
            let graph = backend.load(&name, &manifest.resolve(&spec.file).unwrap()).unwrap();
            let mut session = graph.session().unwrap();
            let views: Vec<(&str, TensorView)> = inputs
                .iter()
                .map(|(n, v)| {
                    let view = match v {
                        Input::F32(a) => TensorView::F32(a.view()),
                        Input::I64(a) => TensorView::I64(a.view()),
                    };
                    (n.as_str(), view)
                })
                .collect();
            session.run(&views).unwrap(); // tract plans for these shapes on the first call
            group.bench_function(name.as_str(), |b| b.iter(|| session.run(&views).unwrap()));
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = graphs
}
criterion_main!(benches);
