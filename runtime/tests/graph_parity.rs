//! Every graph of every tiny set (SD 1.x, SD 2.x, SDXL), run by each backend on the inputs diffusers
//! saw, equals the torch module's outputs (graphs/fixtures/tiny-*/graph_*/, written by
//! `python -m t2i_export tiny`). Graphs are found through `Manifest::set_graphs`, so adapters
//! (`graph_adapter_NAME/`) and ControlNets (`graph_controlnet_NAME/`) are checked alike.
//!
//! Tolerance: relative L2 ≤ 1e-5 and max abs ≤ 1e-4 × max(1, max |expected|). Both sides compute
//! in float32; the only differences are summation order and kernel choice (im2col, GEMM blocking,
//! fused softmax), which for graphs this small stay around 1e-6 relative.

mod common;

use common::{max_abs, rel_l2, tiny_fixtures, tiny_set, TINY_SETS};
use ndarray::ArrayD;
use t2i_rt::backend::{BackendKind, TensorView};
use t2i_rt::manifest::{DType, Manifest};

fn check_backend(kind: BackendKind) {
    for set in TINY_SETS {
        check_set(kind, set);
    }
}

fn check_set(kind: BackendKind, set: &str) {
    let manifest = Manifest::load(&tiny_set(set), true).expect("tiny graph set loads");
    let backend = kind.create(None).expect("backend starts");
    let mut checked = 0;
    for g in manifest.set_graphs() {
        let (name, spec) = (g.name(), g.spec);
        let dir = tiny_fixtures(set).join(format!("graph_{name}"));
        assert!(dir.is_dir(), "no fixture for graph {name} at {}", dir.display());
        let graph = backend.load(&name, &manifest.resolve(&spec.file).unwrap()).unwrap();
        spec.check_io(&name, graph.inputs(), graph.outputs()).unwrap();
        let mut f32_inputs: Vec<(String, ArrayD<f32>)> = Vec::new();
        let mut i64_inputs: Vec<(String, ArrayD<i64>)> = Vec::new();
        for input in &spec.inputs {
            let path = dir.join(format!("in_{}.npy", input.name));
            match input.dtype {
                DType::Int64 => i64_inputs.push((input.name.clone(), ndarray_npy::read_npy(&path).unwrap())),
                _ => f32_inputs.push((input.name.clone(), ndarray_npy::read_npy(&path).unwrap())),
            }
        }
        let mut views: Vec<(&str, TensorView<'_>)> = Vec::new();
        views.extend(f32_inputs.iter().map(|(n, a)| (n.as_str(), TensorView::F32(a.view()))));
        views.extend(i64_inputs.iter().map(|(n, a)| (n.as_str(), TensorView::I64(a.view()))));
        let outputs = graph.session().unwrap().run(&views).unwrap();
        assert_eq!(outputs.len(), spec.outputs.len());
        for (output, out_spec) in outputs.iter().zip(&spec.outputs) {
            let expected: ArrayD<f32> = ndarray_npy::read_npy(dir.join(format!("out_{}.npy", out_spec.name))).unwrap();
            let scale = expected.iter().fold(1f64, |m, v| m.max(f64::from(v.abs())));
            let (rel, abs) = (rel_l2(output, &expected), max_abs(output, &expected));
            eprintln!("{kind} {set} {name}.{}: rel L2 {rel:.2e}, max abs {abs:.2e}", out_spec.name);
            assert!(rel <= 1e-5, "{kind} {set} {name}.{}: rel L2 {rel:.3e} > 1e-5", out_spec.name);
            assert!(
                abs <= 1e-4 * scale,
                "{kind} {set} {name}.{}: max abs {abs:.3e} > {:.3e}",
                out_spec.name,
                1e-4 * scale
            );
        }
        checked += 1;
    }
    let encoder = usize::from(manifest.graphs.vae_encoder.is_some());
    assert_eq!(
        checked,
        manifest.text_encoders.len() + 2 + encoder + manifest.adapters.len() + manifest.controlnets.len()
    );
    // Every family set ships adapters; the inpainting set is a UNet variant without any.
    assert!(!manifest.adapters.is_empty() || manifest.inpainting_unet(), "{set} has no adapters");
}

#[test]
fn ort_cpu_graphs_equal_diffusers() {
    check_backend(BackendKind::OrtCpu);
}

#[test]
fn tract_graphs_equal_diffusers() {
    check_backend(BackendKind::Tract);
}

#[test]
fn openvino_graphs_equal_diffusers() {
    check_backend(BackendKind::OpenVino);
}
