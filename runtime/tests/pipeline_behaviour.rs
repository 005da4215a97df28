//! Pipeline behaviour that has no diffusers counterpart: seeded noise is reproducible on a backend
//! (and a different seed gives a different result), also for the stochastic samplers' step noise,
//! and the progress callback can cancel a run.

mod common;

use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::scheduler::SchedulerKind;
use t2i_rt::{
    AdapterRequest, BackendKind, ConditionSource, ControlRequest, Error, LoadOptions, Model, Pipeline, Request,
};

fn request(seed: u64) -> Request {
    let mut request = Request::new("a lighthouse at dusk");
    request.steps = 3;
    request.scheduler = Some(SchedulerKind::Ddim);
    request.seed = seed;
    request
}

#[test]
fn seed_makes_runs_reproducible() {
    for backend in BackendKind::CPU {
        let mut pipeline = Pipeline::load(
            &common::tiny_sd1(),
            &LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() },
        )
        .unwrap();
        let a = pipeline.run(&request(7), &mut |_| true).unwrap();
        let b = pipeline.run(&request(7), &mut |_| true).unwrap();
        let c = pipeline.run(&request(8), &mut |_| true).unwrap();
        assert_eq!(a.latents, b.latents, "{backend}: same seed, different latents");
        assert_eq!(a.images[0].as_raw(), b.images[0].as_raw(), "{backend}: same seed, different image");
        let diff = common::rel_l2(&c.latents.clone().into_dyn(), &a.latents.clone().into_dyn());
        assert!(diff > 0.1, "{backend}: seeds 7 and 8 gave nearly the same latents (rel L2 {diff:.2e})");
    }
}

#[test]
fn progress_reports_every_step_and_can_cancel() {
    let mut pipeline = Pipeline::load(&common::tiny_sd1(), &LoadOptions::default()).unwrap();
    let mut seen = Vec::new();
    pipeline
        .run(&request(1), &mut |p| {
            seen.push((p.step, p.total));
            true
        })
        .unwrap();
    assert_eq!(seen, [(1, 3), (2, 3), (3, 3)]);

    let mut calls = 0;
    let result = pipeline.run(&request(1), &mut |_| {
        calls += 1;
        calls < 2
    });
    assert!(matches!(result, Err(Error::Cancelled)), "cancel was ignored: {result:?}");
    assert_eq!(calls, 2, "the run went on after the callback asked to stop");
}

#[test]
fn workers_share_one_model_across_threads() {
    for backend in BackendKind::CPU {
        let model = Model::load(
            &common::tiny_sd1(),
            &LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() },
        )
        .unwrap();
        let single = model.pipeline().unwrap().run(&request(3), &mut |_| true).unwrap();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let mut worker = model.pipeline().unwrap();
                    scope.spawn(move || worker.run(&request(3), &mut |_| true).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for generation in results {
            assert_eq!(generation.latents, single.latents, "{backend}: a concurrent worker differs");
        }
    }
}

/// Stochastic samplers draw their step noise from the request's seed: with the initial latents
/// fixed, the same seed repeats the image exactly and another seed changes it. (Their arithmetic is
/// checked draw for draw against diffusers in scheduler_parity.)
#[test]
fn stochastic_samplers_follow_the_seed() {
    let mut pipeline = Pipeline::load(&common::tiny_sd1(), &LoadOptions::default()).unwrap();
    let latents =
        ndarray::Array4::<f32>::from_shape_fn((1, 4, 8, 8), |(_, c, y, x)| ((c * 64 + y * 8 + x) as f32).sin());
    let mut runs: Vec<(String, Request)> = SchedulerKind::ALL
        .into_iter()
        .filter(|k| k.is_stochastic())
        .map(|kind| {
            let mut r = request(0);
            r.scheduler = Some(kind);
            (kind.to_string(), r)
        })
        .collect();
    let mut ddim_eta = request(0);
    ddim_eta.eta = 1.0;
    runs.push(("ddim eta=1".into(), ddim_eta));
    assert!(runs.len() >= 5);
    for (name, mut r) in runs {
        r.steps = 4;
        r.latents = Some(latents.clone());
        let mut with_seed = |seed| {
            r.seed = seed;
            pipeline.run(&r, &mut |_| true).unwrap_or_else(|e| panic!("{name}: {e}")).latents
        };
        let (a, b, c) = (with_seed(5), with_seed(5), with_seed(6));
        assert_eq!(a, b, "{name}: the same seed gave different latents");
        assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite latents");
        let diff = common::rel_l2(&c.into_dyn(), &a.into_dyn());
        assert!(diff > 1e-3, "{name}: seeds 5 and 6 gave the same latents (rel L2 {diff:.2e}): no step noise drawn");
    }
}

/// A request without a size is drawn at the size diffusers' adapter pipelines pick: the first
/// condition image's (`_default_height_width`), else the graph set's default size.
#[test]
fn missing_size_comes_from_the_first_condition_image_as_in_diffusers() {
    let manifest = t2i_rt::Manifest::load(&common::tiny_sd1(), false).unwrap();
    let gray = |w: u32, h: u32| {
        let image = ConditionImage::from_pixels(w, h, ConditionKind::Gray, vec![128; (w * h) as usize]).unwrap();
        AdapterRequest {
            name: "sketch".into(),
            image: ConditionSource::Pixels(image),
            weight: 1.0,
            preprocess: Vec::new(),
        }
    };
    let mut r = request(0);
    assert_eq!(r.size(&manifest).unwrap(), (manifest.default_size[0], manifest.default_size[1]));
    r.adapters = vec![gray(128, 192)];
    assert_eq!(r.size(&manifest).unwrap(), (128, 192));
    assert_eq!(r.check(&manifest, &t2i_rt::Limits::default()).unwrap().width, 128);
    r.width = Some(64);
    assert_eq!(r.size(&manifest).unwrap(), (64, 192), "a given side wins, the other comes from the image");
    r.width = None;
    r.adapters = vec![gray(100, 90)];
    let err = r.size(&manifest).unwrap_err().to_string();
    assert!(err.contains("first condition image") && err.contains("(100x90)"), "{err}");
    assert!(err.contains("give a width and height (e.g. 128x64)"), "{err}");
}

/// The seam's promise for per-step conditioners: a ControlNet at scale 0 (or outside its
/// start..end range) is exactly no ControlNet, bit for bit (the UNet adds zeros), and at scale 1 it
/// moves the result.
#[test]
fn controlnet_at_scale_0_is_exactly_none() {
    let control = common::tiny_fixtures("tiny-sd1").join("conditions/control.png");
    for backend in BackendKind::CPU {
        let mut pipeline = Pipeline::load(
            &common::tiny_sd1(),
            &LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() },
        )
        .unwrap();
        let with = |scale: f32, start: f32| {
            let mut r = request(3);
            r.width = Some(64);
            r.height = Some(64);
            r.controls = vec![ControlRequest {
                name: "canny".into(),
                image: ConditionSource::File(control.clone()),
                scale,
                preprocess: Vec::new(),
            }];
            r.control_start = start;
            r
        };
        let mut none = request(3);
        (none.width, none.height) = (Some(64), Some(64));
        let none = pipeline.run(&none, &mut |_| true).unwrap();
        let zero = pipeline.run(&with(0.0, 0.0), &mut |_| true).unwrap();
        // 3 calls, start 0.9: i / 3 < 0.9 for every call, so the ControlNet never applies.
        let outside = pipeline.run(&with(1.0, 0.9), &mut |_| true).unwrap();
        let one = pipeline.run(&with(1.0, 0.0), &mut |_| true).unwrap();
        assert_eq!(zero.latents, none.latents, "{backend}: scale 0 is not exactly no ControlNet");
        assert_eq!(outside.latents, none.latents, "{backend}: outside start..end is not exactly no ControlNet");
        let diff = common::rel_l2(&one.latents.clone().into_dyn(), &none.latents.clone().into_dyn());
        assert!(diff > 0.05, "{backend}: the ControlNet barely moved the result (rel L2 {diff:.2e})");
        assert_eq!(one.timings.controlnet.len(), 3, "{backend}: one ControlNet time per call");
        assert!(none.timings.controlnet.is_empty());
    }
}
