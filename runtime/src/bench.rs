//! Latency measurement of whole requests, stage by stage: what `t2i-rt bench` and the end-to-end
//! criterion benches report. It only measures; nothing here asserts on time.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::{Pipeline, Request, Timings};

/// Median, 90th percentile (nearest rank) and minimum of a stage, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub p90: f64,
    pub min: f64,
}

impl Stats {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Stats> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
        let p90 = ms[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
        Some(Stats { median, p90, min: ms[0] })
    }
}

/// Per-stage statistics over several runs: once-per-request stages over the runs, per-step stages
/// (`unet_step`, `controlnet_step` when ControlNets ran, `scheduler_step`, `loop_other_step`) over
/// every step of every run. The conditioners' once-per-request stages (`adapters`, `ip_adapter`,
/// `style_adapter`); `ip_adapter` and `style_adapter` only over the runs that used them (an IP
/// image on a set with an IP-Adapter, style images). Also `orchestration_per_step`: per run, the
/// time outside graph execution (`total` minus text encoder, adapters, IP-Adapter, style adapter,
/// VAE encoder, UNet and ControlNet calls and VAE decode) divided by the number of model calls.
pub fn stage_stats(runs: &[Timings]) -> BTreeMap<&'static str, Stats> {
    let once = |f: fn(&Timings) -> Duration| runs.iter().map(f).collect::<Vec<_>>();
    let per_step =
        |f: fn(&Timings) -> &Vec<Duration>| runs.iter().flat_map(|t| f(t).iter().copied()).collect::<Vec<_>>();
    let orchestration: Vec<Duration> = runs
        .iter()
        .filter(|t| !t.unet.is_empty())
        .map(|t| {
            let graphs = t.text_encoder
                + t.adapters
                + t.ip_adapter
                + t.style_adapter
                + t.vae_encode
                + t.unet.iter().sum::<Duration>()
                + t.controlnet.iter().sum::<Duration>()
                + t.vae_decode;
            t.total.saturating_sub(graphs) / t.unet.len() as u32
        })
        .collect();
    // Only runs on a set with an IP-Adapter spend time there.
    let ip_adapter: Vec<Duration> = runs.iter().map(|t| t.ip_adapter).filter(|d| !d.is_zero()).collect();
    // Only runs with style images do.
    let style_adapter: Vec<Duration> = runs.iter().map(|t| t.style_adapter).filter(|d| !d.is_zero()).collect();
    let stages: [(&'static str, Vec<Duration>); 15] = [
        ("prepare", once(|t| t.prepare)),
        ("tokenize", once(|t| t.tokenize)),
        ("text_encoder", once(|t| t.text_encoder)),
        ("adapters", once(|t| t.adapters)),
        ("ip_adapter", ip_adapter),
        ("style_adapter", style_adapter),
        ("vae_encode", once(|t| t.vae_encode)),
        ("unet_step", per_step(|t| &t.unet)),
        ("controlnet_step", per_step(|t| &t.controlnet)),
        ("scheduler_step", per_step(|t| &t.scheduler)),
        ("loop_other_step", per_step(|t| &t.loop_other)),
        ("orchestration_per_step", orchestration),
        ("denoise_loop", once(|t| t.unet.iter().chain(&t.controlnet).chain(&t.scheduler).chain(&t.loop_other).sum())),
        ("vae_decode", once(|t| t.vae_decode)),
        ("total", once(|t| t.total)),
    ];
    stages.into_iter().filter_map(|(name, samples)| Stats::of(&samples).map(|s| (name, s))).collect()
}

/// One request of a benchmark.
pub struct BenchRequest<'a> {
    pub request: &'a Request,
    /// Clear the worker's caches ([`Pipeline::clear_caches`]) before each of its runs, so that it
    /// measures a first request for its reference images, not a repeat.
    pub cold: bool,
}

/// Runs each request `warmup` times unmeasured, then `iters` times, alternating between the
/// requests in every round so that machine noise (other load, frequency changes) falls on all of
/// them alike. Returns each request's measured timings, in `requests` order. `on_run` is called
/// after every run (warm-up included) for progress display.
pub fn measure(
    pipeline: &mut Pipeline,
    requests: &[BenchRequest<'_>],
    warmup: usize,
    iters: usize,
    on_run: &mut dyn FnMut(),
) -> Result<Vec<Vec<Timings>>> {
    let mut timings = vec![Vec::with_capacity(iters); requests.len()];
    for round in 0..warmup + iters {
        for (bench, measured) in requests.iter().zip(&mut timings) {
            if bench.cold {
                pipeline.clear_caches();
            }
            let generation = pipeline.run(bench.request, &mut |_| true)?;
            if round >= warmup {
                measured.push(generation.timings);
            }
            on_run();
        }
    }
    Ok(timings)
}

/// The process's peak resident set size in MiB (`VmHWM`); `None` where /proc is not available.
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Resident memory now, in MiB (Linux `VmRSS`); `None` elsewhere.
pub fn current_rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_millis(x)).collect()
    }

    #[test]
    fn stats_median_p90_min() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&ms(&[5])), Some(Stats { median: 5.0, p90: 5.0, min: 5.0 }));
        let s = Stats::of(&ms(&[10, 1, 9, 2, 8, 3, 7, 4, 6, 5])).unwrap();
        assert_eq!((s.median, s.p90, s.min), (5.5, 9.0, 1.0));
        let s = Stats::of(&ms(&[3, 1, 2])).unwrap();
        assert_eq!((s.median, s.p90, s.min), (2.0, 3.0, 1.0));
    }

    #[test]
    fn orchestration_is_what_graphs_do_not_explain() {
        let t = Timings {
            text_encoder: Duration::from_millis(10),
            adapters: Duration::from_millis(5),
            unet: ms(&[100, 100]),
            scheduler: ms(&[1, 1]),
            loop_other: ms(&[2, 2]),
            vae_decode: Duration::from_millis(20),
            total: Duration::from_millis(245),
            ..Timings::default()
        };
        let stats = stage_stats(std::slice::from_ref(&t));
        assert_eq!(stats["orchestration_per_step"].median, 5.0);
        assert_eq!(stats["unet_step"].median, 100.0);
        assert_eq!(stats["denoise_loop"].median, 206.0);
        assert!(!stats.contains_key("controlnet_step"));
        // ControlNet calls are graph time, not orchestration.
        let t = Timings { controlnet: ms(&[30, 30]), total: Duration::from_millis(305), ..t };
        let stats = stage_stats(&[t]);
        assert_eq!(stats["orchestration_per_step"].median, 5.0);
        assert_eq!(stats["controlnet_step"].median, 30.0);
        assert_eq!(stats["denoise_loop"].median, 266.0);
        assert!(!stats.contains_key("style_adapter"));
    }

    #[test]
    fn the_style_adapter_is_a_stage_and_graph_time() {
        let t = Timings {
            text_encoder: Duration::from_millis(10),
            style_adapter: Duration::from_millis(15),
            unet: ms(&[100, 100]),
            vae_decode: Duration::from_millis(20),
            total: Duration::from_millis(255),
            ..Timings::default()
        };
        let stats = stage_stats(&[t.clone(), Timings { style_adapter: Duration::ZERO, ..t }]);
        // Over the one run with style images, not averaged with the run without.
        assert_eq!(stats["style_adapter"], Stats { median: 15.0, p90: 15.0, min: 15.0 });
        // (255 - 10 - 15 - 200 - 20) / 2 and, without the style stage, (255 - 10 - 200 - 20) / 2.
        assert_eq!(stats["orchestration_per_step"].min, 5.0);
        assert_eq!(stats["orchestration_per_step"].p90, 12.5);
    }
}
