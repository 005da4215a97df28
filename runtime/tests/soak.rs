//! Load and soak through the Rust API: many threads, each with its own worker on one shared
//! [`Model`], run a mix of requests (samplers, adapters, guidance, sample counts). Every output must
//! equal, bit for bit, what one worker alone made for that request; cancelling from the progress
//! callback at a pseudo-random step must return [`Error::Cancelled`] and leave the worker usable;
//! resident memory must not grow once the workers are warm. ort-cpu also runs with one session per
//! graph shared by all workers.
//!
//! CI runs a short version (8 threads × 8 requests per backend). The long run is
//!
//! ```sh
//! T2I_SOAK_REQUESTS=50 cargo test --test soak -- --nocapture
//! ```
//!
//! (8 threads × 50 requests on ort-cpu and on tract); its figures are in benches/RESULTS.md.

mod common;

use std::sync::{Barrier, Mutex};

use t2i_rt::bench::current_rss_mb;
use t2i_rt::condition::ConditionImage;
use t2i_rt::scheduler::SchedulerKind;
use t2i_rt::{AdapterRequest, BackendKind, ConditionSource, Error, Generation, LoadOptions, Model, Request};

const THREADS: usize = 8;
/// Requests each thread has finished when the "warm" memory reading is taken.
const WARM_AFTER: usize = 5;

fn requests_per_thread() -> usize {
    std::env::var("T2I_SOAK_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(WARM_AFTER + 1)
}

/// The request mix: different samplers (deterministic and stochastic), adapters, guidance on and
/// off, one and two samples.
fn mix() -> Vec<Request> {
    let conditions = common::tiny_sd1_fixtures().join("conditions");
    let sketch = ConditionImage::open(&conditions.join("sketch.png"), t2i_rt::condition::ConditionKind::Gray).unwrap();
    let schedulers = [
        None,
        Some(SchedulerKind::Ddim),
        Some(SchedulerKind::Euler),
        Some(SchedulerKind::EulerAncestral),
        Some(SchedulerKind::DpmPp2m),
        Some(SchedulerKind::Heun),
    ];
    (0..schedulers.len())
        .map(|i| {
            let mut r = Request::new(format!("a lighthouse, variant {i}"));
            r.steps = 3;
            r.seed = 100 + i as u64;
            r.scheduler = schedulers[i];
            // diffusers' own generator for half the mix: its state must not leak between requests.
            if i % 2 == 1 {
                r.rng = t2i_rt::rng::RngKind::TorchCpu;
            }
            r.guidance = if i % 3 == 2 { 1.0 } else { 7.5 };
            r.n_samples = 1 + i % 2;
            if i % 2 == 0 {
                r.adapters.push(AdapterRequest {
                    name: "sketch".into(),
                    image: ConditionSource::Pixels(sketch.clone()),
                    weight: 0.5 + i as f32 * 0.1,
                    preprocess: Vec::new(),
                });
                r.adapters.push(AdapterRequest {
                    name: "color".into(),
                    image: ConditionSource::File(conditions.join("color.png")),
                    weight: 1.0,
                    preprocess: Vec::new(),
                });
                r.cond_tau = 0.5;
            }
            r
        })
        .collect()
}

/// A small deterministic generator (SplitMix64) for the cancellation points.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn same(a: &Generation, b: &Generation) -> bool {
    a.latents == b.latents && a.images.iter().map(|i| i.as_raw()).eq(b.images.iter().map(|i| i.as_raw()))
}

fn soak(backend: BackendKind, share_sessions: bool) {
    let per_thread = requests_per_thread();
    let mut options = LoadOptions { backend, verify_checksums: false, ..LoadOptions::default() };
    options.settings.share_sessions = share_sessions;
    let sharing = if share_sessions { " (shared sessions)" } else { "" };
    let model = Model::load(&common::tiny_sd1(), &options).unwrap();
    let mix = mix();
    let single: Vec<Generation> = {
        let mut worker = model.pipeline().unwrap();
        mix.iter().map(|r| worker.run(r, &mut |_| true).unwrap()).collect()
    };

    // Every thread stops at two points, with its worker alive, while the memory is read: after
    // request WARM_AFTER and after its last request.
    let (warm, warm_read) = (Barrier::new(THREADS + 1), Barrier::new(THREADS + 1));
    let (done, done_read) = (Barrier::new(THREADS + 1), Barrier::new(THREADS + 1));
    let tally = Mutex::new((0usize, 0usize)); // (completed, cancelled)
    let (warm_rss, end_rss) = std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (model, mix, single, tally) = (&model, &mix, &single, &tally);
            let (warm, warm_read, done, done_read) = (&warm, &warm_read, &done, &done_read);
            scope.spawn(move || {
                let mut worker = model.pipeline().unwrap();
                let mut rng = thread as u64 * 7919 + 1;
                for i in 0..per_thread {
                    let which = (thread * 5 + i * 3) % mix.len();
                    let request = &mix[which];
                    // About one request in four is cancelled at a random step, then rerun.
                    if splitmix(&mut rng).is_multiple_of(4) {
                        let stop_at = 1 + (splitmix(&mut rng) % 3) as usize;
                        let result = worker.run(request, &mut |p| p.step < stop_at);
                        assert!(matches!(result, Err(Error::Cancelled)), "{backend} thread {thread}: {result:?}");
                        tally.lock().unwrap().1 += 1;
                    }
                    let generation = worker.run(request, &mut |_| true).unwrap();
                    assert!(
                        same(&generation, &single[which]),
                        "{backend} thread {thread} request {i}: differs from the single-worker output"
                    );
                    tally.lock().unwrap().0 += 1;
                    if i + 1 == WARM_AFTER {
                        warm.wait();
                        warm_read.wait();
                    }
                }
                done.wait();
                done_read.wait();
            });
        }
        warm.wait();
        let warm_rss = current_rss_mb();
        warm_read.wait();
        done.wait();
        let end_rss = current_rss_mb();
        done_read.wait();
        (warm_rss, end_rss)
    });
    let (completed, cancelled) = *tally.lock().unwrap();
    assert_eq!(completed, THREADS * per_thread);
    assert!(cancelled > 0, "no request was cancelled");
    let mib = |rss: Option<f64>| rss.map_or("n/a".to_string(), |m| format!("{m:.1} MiB"));
    eprintln!(
        "{backend}{sharing}: {THREADS} threads x {per_thread} requests, {cancelled} cancelled and rerun, all equal \
         to the single-worker outputs; RSS after request {WARM_AFTER}: {}, after request {per_thread}: {}",
        mib(warm_rss),
        mib(end_rss)
    );
    if let (Some(warm), Some(end)) = (warm_rss, end_rss) {
        let growth = (end - warm) / warm;
        assert!(growth <= 0.05, "{backend}: resident memory grew {:.1} % after warm-up", growth * 100.0);
    }
}

/// One test for both backends, one after the other: resident memory is the process's, so the runs
/// must not overlap. ort-cpu runs twice: a session per worker, then one shared session per graph
/// (`BackendSettings::share_sessions`: one copy of the weights, calls taking turns).
#[test]
fn cpu_backends_under_load() {
    for backend in BackendKind::CPU {
        soak(backend, false);
    }
    soak(BackendKind::OrtCpu, true);
}
