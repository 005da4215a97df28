//! One denoising step of an SDXL-size UNet graph (diffusers' SDXL UNet config, ~2.6B parameters,
//! weights in ONNX external data) at 1024×1024 on ort-cpu, through the runtime's backend.
//!
//! Ignored by default: it needs the graph (written by the exporter, ~10 GB) and ~20 GB of memory.
//! `T2I_LARGE_UNET=/path/unet_xl.onnx cargo test --release --test large_unet -- --ignored --nocapture`

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use t2i_rt::backend::{BackendKind, TensorView};

#[test]
#[ignore]
fn sdxl_size_unet_step_at_1024() {
    let Ok(path) = std::env::var("T2I_LARGE_UNET") else {
        eprintln!("T2I_LARGE_UNET is not set; nothing to do");
        return;
    };
    let start = Instant::now();
    let graph = BackendKind::OrtCpu.create(None).unwrap().load("unet", path.as_ref()).unwrap();
    let mut session = graph.session().unwrap();
    eprintln!("loaded in {:.1}s", start.elapsed().as_secs_f64());
    let fill = |shape: &[usize], v: f32| ArrayD::from_elem(IxDyn(shape), v);
    let sample =
        ArrayD::from_shape_fn(IxDyn(&[1, 4, 128, 128]), |i| ((i[2] * 7 + i[3] * 3 + i[1]) % 17) as f32 / 17.0 - 0.5);
    let timestep = fill(&[1], 999.0);
    let ehs = fill(&[1, 77, 2048], 0.1);
    let text_embeds = fill(&[1, 1280], 0.1);
    let time_ids = ArrayD::from_shape_vec(IxDyn(&[1, 6]), vec![1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).unwrap();
    let residuals = [
        fill(&[1, 320, 64, 64], 0.01),
        fill(&[1, 640, 64, 64], 0.01),
        fill(&[1, 1280, 32, 32], 0.01),
        fill(&[1, 1280, 32, 32], 0.01),
    ];
    let mut inputs = vec![
        ("sample", TensorView::F32(sample.view())),
        ("timestep", TensorView::F32(timestep.view())),
        ("encoder_hidden_states", TensorView::F32(ehs.view())),
        ("text_embeds", TensorView::F32(text_embeds.view())),
        ("time_ids", TensorView::F32(time_ids.view())),
    ];
    let names = ["adapter_residual_0", "adapter_residual_1", "adapter_residual_2", "adapter_residual_3"];
    for (name, r) in names.iter().zip(&residuals) {
        inputs.push((name, TensorView::F32(r.view())));
    }
    let start = Instant::now();
    let out = session.run(&inputs).unwrap();
    eprintln!("one UNet step at 1024x1024 (batch 1) in {:.1}s", start.elapsed().as_secs_f64());
    assert_eq!(out[0].shape(), &[1, 4, 128, 128]);
    assert!(out[0].iter().all(|v| v.is_finite()));
}
