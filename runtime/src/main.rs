//! `t2i-rt`: the command-line front end. It parses arguments and calls the library; all the work is
//! in [`t2i_rt::Pipeline`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::{BackendKind, BackendSettings, InferencePrecision};
use t2i_rt::bench::{measure, peak_rss_mb, stage_stats, BenchRequest, Stats};
use t2i_rt::engine::Profile;
use t2i_rt::manifest::{Manifest, TensorSpec, TokenizerSource, MANIFEST_FILE};
use t2i_rt::output::{grid, write_png};
use t2i_rt::preprocess::Preprocess;
use t2i_rt::rng::RngKind;
use t2i_rt::scheduler::SchedulerKind;
use t2i_rt::size::{Offset, Size};
use t2i_rt::{ControlRequest, EngineCache, LoadOptions, Logger, Model, Request, SizeConditioning, StyleRequest};

#[derive(Parser)]
#[command(
    name = "t2i-rt",
    version,
    about = "Run Stable Diffusion with T2I-Adapters from exported ONNX graph sets, without Python",
    long_about = "Run Stable Diffusion with T2I-Adapters from exported ONNX graph sets, without Python.\n\n\
A graph set is a folder written by `python -m t2i_export pipeline --model CHECKPOINT --adapter NAME=DIR --out DIR`:\n\
ONNX graphs plus manifest.json, which tells t2i-rt everything about the model.\n\n\
Examples:\n  t2i-rt run --graphs graphs/tiny-sd1 --prompt \"a house\" --adapter sketch=edges.png:0.8 --out house.png\n  \
t2i-rt run --graph sdxl-t2i/unet_xl.onnx --prompt \"a house\" --adapter canny=edges.png:0.8 --cond-tau 0.5 \\\n      \
--width 1024 --height 1024 --out house.png"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt and optional adapter condition images.
    Run(Box<RunArgs>),
    /// Print a graph set's manifest and every graph's inputs and outputs.
    Inspect(InspectArgs),
    /// Measure latency per stage (median / p90 / min over runs), start-up time and peak memory.
    Bench(Box<BenchArgs>),
    /// Prepare engines ahead of time: optimized graphs (ort-cpu, ort-cuda), TensorRT engines (ort-trt).
    BuildEngine(Box<BuildEngineArgs>),
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    t2i-rt run --graphs sd15-t2i --prompt \"a castle, oil painting\" --adapter sketch=castle.png --out castle.png\n  \
    t2i-rt run --graph sd15-t2i/unet.onnx --prompt \"a castle\" --negative-prompt \"blurry\" \\\n      \
    --adapter sketch=castle.png:1.0 --adapter color=palette.png:1.2 --cond-tau 0.5 \\\n      \
    --steps 30 --scheduler euler --seed 7 --n-samples 4 --out castles.png\n  \
    t2i-rt run --graph sdxl-t2i/unet_xl.onnx --prompt \"a castle\" --adapter canny=castle_edges.png:0.8 \\\n      \
    --adapter openpose=pose.png:1.0 --cond-tau 0.5 --width 1024 --height 1024 --steps 30 --out castle-xl.png\n  \
    t2i-rt run --graphs sd15-t2i --prompt \"a castle at night\" --init-image castle.png --strength 0.6 --out night.png\n  \
    t2i-rt run --graphs sd15-inpainting --prompt \"a dragon\" --init-image castle.png --mask sky.png --out dragon.png\n  \
    t2i-rt run --graphs sd15-cn --prompt \"a castle\" --control canny=castle_edges.png:0.8 --control-end 0.6 \\\n      \
    --control depth=castle_depth.png:0.5 --out castle-cn.png\n  \
    t2i-rt run --graphs sd15-ip --prompt \"a cat, best quality\" --ip-image style.png --ip-scale 0.6 --out cat.png\n\n\
Adapter and ControlNet names are those the graph set was exported with (see `t2i-rt inspect DIR`). SDXL sets take\n\
--original-size/--crop-top-left/--target-size (diffusers' defaults: the output size, 0,0); without\n\
--negative-prompt an SDXL set uses zero embeddings (force_zeros_for_empty_prompt), as diffusers does.")]
struct RunArgs {
    #[command(flatten)]
    source: SetSource,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (default: the empty prompt, as in diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Attach an adapter: its name in the graph set, a condition image (PNG/JPEG, resized to the
    /// output size) and an optional weight (default 1.0). Repeat to combine adapters.
    #[arg(long = "adapter", value_name = "NAME=IMAGE[:WEIGHT]")]
    adapters: Vec<AdapterRequest>,
    /// Fraction of the steps that get adapter guidance: the first int(steps × F) model calls, all at 1.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    cond_tau: f32,
    #[command(flatten)]
    control: ControlArgs,
    /// Denoising steps.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    guidance: f32,
    /// diffusers' guidance_rescale in [0, 1] (0.7 for zero-terminal-SNR models; 0 is off).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    guidance_rescale: f32,
    #[arg(long, value_name = "NAME", help = "Sampler (default: the graph set's own; see below)", long_help = scheduler_long_help())]
    scheduler: Option<SchedulerKind>,
    /// Karras sigmas (use_karras_sigmas) for the samplers that have them: euler, heun, lms,
    /// dpmpp-2m, dpmpp-2m-sde, unipc.
    #[arg(long)]
    karras: bool,
    /// DDIM's eta: 0 is deterministic; 1 adds as much seeded noise as DDPM.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    eta: f32,
    /// Override a key of the graph set's scheduler config (diffusers' names), VALUE as JSON or a
    /// bare string, e.g. timestep_spacing=trailing, steps_offset=0, prediction_type=v_prediction.
    /// Repeatable.
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE", value_parser = t2i_rt::scheduler::parse_option)]
    scheduler_options: Vec<(String, serde_json::Value)>,
    /// Seed for the initial noise and stochastic samplers (default: drawn at random and printed, so a
    /// run can be repeated).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    #[arg(long, default_value = "fast", value_name = "NAME", help = "Generator the seed drives (torch-cpu: diffusers' draws; see below)", long_help = rng_long_help())]
    rng: RngKind,
    /// Images to draw for the prompt.
    #[arg(long, default_value_t = 1, value_name = "N")]
    n_samples: usize,
    /// Image width in pixels (default, as diffusers: the first condition image's, else the graph
    /// set's default size).
    #[arg(long, value_name = "W")]
    width: Option<u32>,
    /// Image height in pixels (default, as diffusers: the first condition image's, else the graph
    /// set's default size).
    #[arg(long, value_name = "H")]
    height: Option<u32>,
    /// img2img: start from this picture (PNG/JPEG of the output size; the output takes its size
    /// when --width/--height are not given). Needs a graph set with a VAE encoder.
    #[arg(long, value_name = "IMAGE")]
    init_image: Option<PathBuf>,
    /// How far the init image is noised, in (0, 1]: the last int(steps × F) steps run (default
    /// 0.8, as diffusers' StableDiffusionImg2ImgPipeline; 1.0 with --mask; diffusers' SDXL img2img
    /// pipeline defaults to 0.3).
    #[arg(long, value_name = "F")]
    strength: Option<f32>,
    /// Inpainting: white pixels (≥ 128 in gray) of the init image are drawn anew, the rest kept.
    /// Same size as the init image. Works with inpainting UNets (9 input channels) and regular ones.
    #[arg(long, value_name = "IMAGE")]
    mask: Option<PathBuf>,
    /// IP-Adapter: a reference image (PNG/JPEG, any size) whose content and style steer the
    /// result, like diffusers' ip_adapter_image. It is resized and center-cropped for the set's
    /// CLIP image encoder, so keep the subject near the middle. Needs a graph set exported with
    /// `python -m t2i_export pipeline --ip-adapter FILE --image-encoder DIR`.
    #[arg(long, value_name = "IMG")]
    ip_image: Option<PathBuf>,
    /// How strongly --ip-image steers, like diffusers' set_ip_adapter_scale: 1.0 (default) is the
    /// adapter as trained, 0.5-0.7 leaves more room for the prompt, 0 ignores the image.
    #[arg(long, value_name = "F", default_value_t = 1.0, requires = "ip_image")]
    ip_scale: f32,
    /// Style adapter (TencentARC's T2I style adapter): a style image (PNG/JPEG, any size) whose
    /// look the result takes on, with an optional weight (default 1.0; 0.5 is a lighter touch).
    /// Repeat to blend styles, up to the set's max_images (9 for the released adapter); each image
    /// adds 8 tokens to the text context. Images are resized and center-cropped for the set's CLIP
    /// vision encoder. Needs a graph set exported with
    /// `python -m t2i_export pipeline --style-adapter FILE --style-encoder DIR`.
    #[arg(long = "style", value_name = "IMG[:WEIGHT]")]
    styles: Vec<StyleRequest>,
    /// Fraction of the steps, from the first (noisiest), that see the style (TencentARC's
    /// style_cond_tau): 1.0 (default) styles every step; 0.5 styles the first half, fixing the
    /// composition's style early and leaving the details to the prompt.
    #[arg(long, value_name = "F", default_value_t = 1.0, requires = "styles")]
    style_cond_tau: f32,
    #[command(flatten)]
    exec: ExecArgs,
    /// Initial noise as .npy [n_samples, 4, H/8, W/8], exactly like diffusers' `latents=`.
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Write the final latents as .npy (what diffusers returns with output_type="latent").
    #[arg(long, value_name = "FILE")]
    save_latents: Option<PathBuf>,
    /// Write every graph call's inputs into DIR (new or empty) as DIR/GRAPH_FILE/NNNNNN/INPUT.npy:
    /// calibration data, every timestep of the run included. `python -m t2i_export calibrate` drives
    /// this; a 30-step run of SD 1.5 at 512x512 records about 1 GB.
    #[arg(long, value_name = "DIR")]
    record_inputs: Option<PathBuf>,
    /// Make a condition from a photo: apply OPS to the image of every --adapter and --control named
    /// NAME, after it is resized to the output size. OPS is one or more of canny[:LOW:HIGH] (edges,
    /// default 100:200 as controlnet_aux), palette (TencentARC's color palette: bicubic down by 64,
    /// nearest up), invert (for sketches drawn dark on light), comma-separated, applied in order.
    /// E.g. --control canny=photo.jpg --preprocess canny=canny; --adapter color=photo.jpg
    /// --preprocess color=palette.
    #[arg(long = "preprocess", value_name = "NAME=OPS", value_parser = parse_preprocess)]
    preprocess: Vec<(String, Vec<Preprocess>)>,
    /// Write every condition image exactly as the adapter and ControlNet graphs see it (converted,
    /// resized, preprocessed) into DIR as adapter_NAME.png / controlnet_NAME.png, before generating.
    #[arg(long, value_name = "DIR")]
    save_conditions: Option<PathBuf>,
    /// Output PNG. With --n-samples > 1 this is a grid, and each sample is written as NAME-i.png.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Skip checking graph files against their manifest checksums (faster start-up for large sets).
    #[arg(long)]
    no_verify: bool,
    /// SDXL: `original_size` conditioning (default: the output size).
    #[arg(long, value_name = "WxH")]
    original_size: Option<Size>,
    /// SDXL: `crops_coords_top_left` conditioning (default 0,0).
    #[arg(long, value_name = "TOP,LEFT")]
    crop_top_left: Option<Offset>,
    /// SDXL: `target_size` conditioning (default: the output size).
    #[arg(long, value_name = "WxH")]
    target_size: Option<Size>,
    /// SDXL: `negative_original_size` (used with --negative-target-size, as in diffusers).
    #[arg(long, value_name = "WxH")]
    negative_original_size: Option<Size>,
    /// SDXL: `negative_crops_coords_top_left` (default 0,0).
    #[arg(long, value_name = "TOP,LEFT")]
    negative_crop_top_left: Option<Offset>,
    /// SDXL: `negative_target_size` (used with --negative-original-size).
    #[arg(long, value_name = "WxH")]
    negative_target_size: Option<Size>,
}

#[derive(Args)]
#[command(
    after_help = "Stages: prepare (request checks, condition images), tokenize, text_encoder, adapters (once per \
request), unet_step, scheduler_step and loop_other_step (per model call), orchestration_per_step (all time \
outside graph execution, per model call), vae_decode, total.\n\n\
With --adapter (or --control) the same request also runs without adapters (and ControlNets), alternating \
run by run, and the overhead is printed as a ratio of the median totals. controlnet_step (per model call) \
appears with --control. With --ip-image alone, the request runs with the image embedding cached (warm) and \
with the cache cleared (cold), alternating; ip_adapter is the IP-Adapter's once-per-request stage. With --style \
(and no --adapter, --control or --ip-image), the request also runs without its style images, alternating; \
style_adapter is the style encoder and adapter's once-per-request stage (beside adapters, ControlNets or an IP \
image, the style images stay in every run and style_adapter is still reported).\n\n\
Example:\n  t2i-rt bench --graphs graphs/tiny-sd1 --steps 30 --adapter sketch=edges.png --iters 10 --json bench.json"
)]
struct BenchArgs {
    #[command(flatten)]
    source: SetSource,
    #[command(flatten)]
    exec: ExecArgs,
    /// Denoising steps per run.
    #[arg(long, default_value_t = 30, value_name = "N")]
    steps: usize,
    /// Image size (default: the graph set's default size).
    #[arg(long, value_name = "WxH")]
    size: Option<Size>,
    /// Attach an adapter, as for `run`. Repeatable.
    #[arg(long = "adapter", value_name = "NAME=IMAGE[:WEIGHT]")]
    adapters: Vec<AdapterRequest>,
    #[command(flatten)]
    control: ControlArgs,
    /// An IP-Adapter reference image, as for `run`. The request then runs twice per round: with
    /// the image embedding cached from the previous run (warm: what a service reusing reference
    /// images pays) and with the cache cleared first (cold: a new image).
    #[arg(long, value_name = "IMG")]
    ip_image: Option<PathBuf>,
    /// The IP-Adapter scale, as for `run`.
    #[arg(long, value_name = "F", default_value_t = 1.0, requires = "ip_image")]
    ip_scale: f32,
    /// A style image with an optional weight, as for `run`. Repeatable.
    #[arg(long = "style", value_name = "IMG[:WEIGHT]")]
    styles: Vec<StyleRequest>,
    /// The fraction of the steps that see the style, as for `run`.
    #[arg(long, value_name = "F", default_value_t = 1.0, requires = "styles")]
    style_cond_tau: f32,
    /// Sampler, as for `run` (default: the graph set's own; `t2i-rt run --help` lists them).
    #[arg(long, value_name = "NAME")]
    scheduler: Option<SchedulerKind>,
    /// Generator for the noise, as for `run` (fast, torch-cpu, torch-cpu-default).
    #[arg(long, default_value = "fast", value_name = "NAME")]
    rng: RngKind,
    /// Classifier-free guidance scale (> 1: a batch of 2 per UNet call).
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    guidance: f32,
    /// The prompt (its length does not change the cost: it is padded to 77 tokens).
    #[arg(long, default_value = "a photo of a lighthouse on a cliff at sunset", value_name = "TEXT")]
    prompt: String,
    /// Unmeasured runs first (session warm-up, tract's per-shape planning).
    #[arg(long, default_value_t = 1, value_name = "N")]
    warmup: usize,
    /// Measured runs.
    #[arg(long, default_value_t = 5, value_name = "N")]
    iters: usize,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// ControlNets: shared by run and bench.
#[derive(Args)]
struct ControlArgs {
    /// Attach a ControlNet: its name in the graph set, a control image (PNG/JPEG, e.g. canny edges;
    /// converted to RGB and resized to the output size) and an optional scale (diffusers'
    /// controlnet_conditioning_scale, default 1.0). Repeat to combine ControlNets (their residuals
    /// are summed, as diffusers' MultiControlNetModel does).
    #[arg(long = "control", value_name = "NAME=IMAGE[:SCALE]")]
    controls: Vec<ControlRequest>,
    /// ControlNets apply from this fraction of the model calls on (diffusers'
    /// control_guidance_start): call i of N is skipped when i/N < F.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    control_start: f32,
    /// ControlNets apply up to this fraction of the model calls (diffusers' control_guidance_end):
    /// call i of N is skipped when (i+1)/N > F. Must be above --control-start.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    control_end: f32,
    /// diffusers' guess_mode: the ControlNets see only the prompt half of the guidance batch and
    /// their residuals are scaled from 0.1 (shallow) to 1.0 (mid block), so the control image leads
    /// even with an empty prompt (try --guidance 3 to 5). Needs --control.
    #[arg(long)]
    guess_mode: bool,
}

impl ControlArgs {
    fn apply(self, request: &mut Request) {
        request.controls = self.controls;
        request.control_start = self.control_start;
        request.control_end = self.control_end;
        request.guess_mode = self.guess_mode;
    }
}

/// Which graph set: shared by run, bench and build-engine.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct SetSource {
    /// Graph-set folder (holds manifest.json).
    #[arg(long, value_name = "DIR")]
    graphs: Option<PathBuf>,
    /// A graph file of the set (e.g. DIR/unet.onnx, DIR/unet_xl.onnx); the rest is found beside it.
    #[arg(long, value_name = "FILE")]
    graph: Option<PathBuf>,
}

/// Where graphs run: shared by run, bench and build-engine.
#[derive(Args)]
struct ExecArgs {
    /// Execution backend: ort-cpu (ONNX Runtime), ort-cuda and ort-trt (ONNX Runtime's CUDA and
    /// TensorRT providers, NVIDIA GPUs: docs/gpu.md), openvino (OpenVINO's runtime on the CPU, f32 or
    /// bf16; `bash scripts/setup-openvino.sh` installs it), tract (pure Rust, no library needed).
    #[arg(long, default_value = "ort-cpu", value_name = "B")]
    backend: BackendKind,
    /// What the graphs compute in: f32; bf16 (openvino on CPUs with bf16 instructions: AVX512_BF16
    /// or AMX; on a Zen 5 EPYC a UNet call took 0.46x the f32 time with 1.8e-2 relative error); or
    /// int8, the set's INT8 graphs (ort-cpu, openvino; ort-trt in TensorRT's INT8 mode, not yet run on a
    /// GPU), made from a graph set with `python -m t2i_export calibrate --graphs DIR --out DIR-int8`
    /// (calibration/README.md).
    #[arg(long, default_value = "f32", value_name = "P")]
    precision: InferencePrecision,
    /// Threads per graph call (default: ONNX Runtime and OpenVINO one per physical core; tract every
    /// core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// GPU number for ort-cuda and ort-trt.
    #[arg(long, default_value_t = 0, value_name = "N")]
    device: u32,
    /// If the GPU provider cannot start, warn and run on the CPU instead of failing.
    #[arg(long)]
    allow_cpu_fallback: bool,
    /// Engine cache folder (default: DIR/.t2i-engines, where build-engine writes).
    #[arg(long, value_name = "DIR", conflicts_with = "no_engine_cache")]
    engine_cache: Option<PathBuf>,
    /// Neither read nor write prepared engines.
    #[arg(long)]
    no_engine_cache: bool,
    /// ort-trt: let TensorRT use fp16 kernels (give the same choice to build-engine and run: it is
    /// part of the engine-cache key).
    #[arg(long)]
    trt_fp16: bool,
}

impl ExecArgs {
    fn load_options(&self, verify_checksums: bool) -> Result<LoadOptions> {
        let engine_cache = match (&self.engine_cache, self.no_engine_cache) {
            (_, true) => EngineCache::Off,
            (Some(dir), false) => EngineCache::Dir(dir.clone()),
            (None, false) => EngineCache::InGraphSet,
        };
        Ok(LoadOptions {
            backend: self.backend,
            verify_checksums,
            settings: BackendSettings {
                threads: self.threads,
                device: self.device,
                allow_cpu_fallback: self.allow_cpu_fallback,
                trt_fp16: self.trt_fp16,
                precision: self.precision,
                log: Logger::new(|level, message| eprintln!("{level}: {message}")),
                // One worker per process here: nothing to share.
                share_sessions: false,
            },
            engine_cache,
            limits: t2i_rt::Limits::default(),
            record_inputs: None,
        })
    }
}

#[derive(Args)]
#[command(
    after_help = "What is prepared, per backend (into DIR/.t2i-engines unless --engine-cache says otherwise):\n  \
    ort-cpu, ort-cuda  ONNX Runtime's optimized graphs: start-up skips graph optimization\n  \
    ort-trt            TensorRT engines and timing cache for the --profile sizes and batch ranges\n  \
    openvino           OpenVINO's compiled models (its model cache): start-up imports instead of compiling\n\n\
Each graph's entry is keyed by the graph's checksums, the backend and its options, the ONNX Runtime\n\
or OpenVINO build, and the CPU (ort-cpu, openvino) or GPU, driver and TensorRT version; `run` uses an entry only when all of\n\
them match, and says which changed when one is stale.\n\n\
Examples:\n  \
t2i-rt build-engine --graphs sd15-t2i --backend ort-cpu\n  \
t2i-rt build-engine --graphs sdxl-t2i --backend ort-trt --profile 1024x1024:1-2 --profile 768x1344 --trt-fp16"
)]
struct BuildEngineArgs {
    #[command(flatten)]
    source: SetSource,
    #[command(flatten)]
    exec: ExecArgs,
    /// ort-trt: an image size and a range of images per request the engines serve (repeatable;
    /// the batch range defaults to 1-1; with guidance the UNet sees twice as many rows).
    #[arg(long = "profile", value_name = "WxH[:MIN-MAX]")]
    profiles: Vec<Profile>,
    /// Skip checking graph files against their manifest checksums.
    #[arg(long)]
    no_verify: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Graph-set folder (or a graph file inside it).
    path: PathBuf,
    /// Backend used to read the graphs' real inputs and outputs.
    #[arg(long, default_value = "ort-cpu", value_name = "B")]
    backend: BackendKind,
}

fn scheduler_names() -> String {
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
    names.join(", ")
}

fn scheduler_long_help() -> String {
    let mut help = String::from(
        "Sampler, by the name UIs use. Without it, the graph set's own runs, as in diffusers: its scheduler \
         config's class exactly as configured (`t2i-rt inspect` shows which; SD 1.5's is pndm, SDXL's euler). \
         Each name reproduces the diffusers scheduler below, built from the graph set's scheduler config with \
         the keys in parentheses set, then --karras / --scheduler-option (which may change them, except \
         pndm's and pndm-prk's skip_prk_steps):\n",
    );
    for kind in SchedulerKind::ALL {
        let preset: Vec<String> = kind.preset().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let preset = if preset.is_empty() { String::new() } else { format!(" ({})", preset.join(", ")) };
        let noise = if kind.is_stochastic() { ", stochastic (seeded)" } else { "" };
        help.push_str(&format!("  {:<16} {}{preset}{noise}\n", kind.as_str(), kind.diffusers_class()));
    }
    help.push_str("pndm is PLMS (SD 1.5's sampler, \"PLMS\" in UIs); pndm-prk adds the Runge-Kutta warm-up (3 steps of 4 model calls).\n");
    help
}

fn rng_long_help() -> String {
    let mut help = String::from(
        "Generator the seed drives, for the initial noise and then every stochastic sampler step, in \
         diffusers' order:\n",
    );
    for kind in RngKind::ALL {
        let default = if kind == RngKind::default() { " (default)" } else { "" };
        help.push_str(&format!("  {:<18} {}{default}\n", kind.as_str(), kind.describe()));
    }
    help.push_str(
        "With torch-cpu, --seed S gives what diffusers gives for generator=torch.Generator(\"cpu\").manual_seed(S) \
         and no latents= (fp32 pipeline). torch-cuda (torch.Generator(\"cuda\")) is not implemented yet.",
    );
    help
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Inspect(args) => inspect(args),
        Command::Bench(args) => bench(*args),
        Command::BuildEngine(args) => build_engine(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The graph-set folder for `--graphs DIR` or `--graph DIR/file.onnx`.
fn graph_set_dir(graphs: Option<PathBuf>, graph: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = graphs {
        return Ok(dir);
    }
    let file = graph.context("pass --graphs DIR or --graph FILE")?;
    if file.is_dir() {
        return Ok(file);
    }
    if !file.is_file() {
        bail!("--graph {}: no such file", file.display());
    }
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if !dir.join(MANIFEST_FILE).is_file() {
        bail!("--graph {}: no {MANIFEST_FILE} beside it; pass the graph-set folder with --graphs", file.display());
    }
    Ok(dir)
}

/// `--preprocess NAME=OPS`.
fn parse_preprocess(text: &str) -> std::result::Result<(String, Vec<Preprocess>), String> {
    let (name, ops) = text
        .split_once('=')
        .filter(|(name, ops)| !name.is_empty() && !ops.is_empty())
        .ok_or_else(|| format!("{text:?} must look like NAME=OPS, e.g. canny=canny:100:200 or color=palette"))?;
    let ops =
        ops.split(',').map(str::parse::<Preprocess>).collect::<t2i_rt::Result<Vec<_>>>().map_err(|e| e.to_string())?;
    Ok((name.to_string(), ops))
}

/// Gives each `--preprocess NAME=OPS` to the request's adapters and ControlNets named NAME.
fn attach_preprocessing(request: &mut Request, preprocess: Vec<(String, Vec<Preprocess>)>) -> Result<()> {
    for (name, ops) in preprocess {
        let mut found = false;
        for adapter in request.adapters.iter_mut().filter(|a| a.name == name) {
            adapter.preprocess.extend(ops.iter().copied());
            found = true;
        }
        for control in request.controls.iter_mut().filter(|c| c.name == name) {
            control.preprocess.extend(ops.iter().copied());
            found = true;
        }
        if !found {
            bail!("--preprocess {name}=...: this request has no --adapter or --control named {name:?}");
        }
    }
    Ok(())
}

/// `--save-conditions DIR`.
fn save_conditions(dir: &Path, checked: &t2i_rt::CheckedRequest, manifest: &Manifest) -> Result<()> {
    let images = checked.condition_images(manifest);
    if images.is_empty() {
        bail!("--save-conditions {}: this request has no --adapter or --control", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, image) in images {
        let path = dir.join(format!("{name}.png"));
        t2i_rt::output::write_condition_png(&path, &image)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let dir = graph_set_dir(args.source.graphs, args.source.graph)?;
    let mut request = Request::new(args.prompt);
    request.negative_prompt = args.negative_prompt;
    request.adapters = args.adapters;
    request.cond_tau = args.cond_tau;
    args.control.apply(&mut request);
    attach_preprocessing(&mut request, args.preprocess)?;
    request.steps = args.steps;
    request.guidance = args.guidance;
    request.guidance_rescale = args.guidance_rescale;
    request.scheduler = args.scheduler;
    request.eta = args.eta;
    if args.karras {
        request.scheduler_options.insert("use_karras_sigmas".into(), true.into());
    }
    request.scheduler_options.extend(args.scheduler_options);
    request.n_samples = args.n_samples;
    request.width = args.width;
    request.height = args.height;
    request.size_cond = SizeConditioning {
        original_size: args.original_size.map(Size::hw),
        crops_coords_top_left: args.crop_top_left.unwrap_or_default().top_left(),
        target_size: args.target_size.map(Size::hw),
        negative_original_size: args.negative_original_size.map(Size::hw),
        negative_crops_coords_top_left: args.negative_crop_top_left.unwrap_or_default().top_left(),
        negative_target_size: args.negative_target_size.map(Size::hw),
    };
    request.init_image = args.init_image.map(ConditionSource::File);
    request.mask = args.mask.map(ConditionSource::File);
    request.strength = args.strength;
    request.ip_image = args.ip_image.map(ConditionSource::File);
    request.ip_scale = args.ip_scale;
    request.styles = args.styles;
    request.style_cond_tau = args.style_cond_tau;
    request.rng = args.rng;
    request.seed = args
        .seed
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    let options = LoadOptions { record_inputs: args.record_inputs, ..args.exec.load_options(!args.no_verify)? };
    if let Some(path) = &args.latents {
        request.latents = Some(t2i_rt::npy::read_latents(path, &options.limits)?);
    } else {
        eprintln!("seed {} ({} generator)", request.seed, request.rng);
    }
    let out_paths = output_paths(&args.out, args.n_samples)?;
    for path in out_paths.iter().chain(args.save_latents.as_ref()) {
        check_writable(path)?;
    }

    // Check the request against the manifest first, once: a typo should not wait for the graphs
    // to load.
    let start = Instant::now();
    let manifest = Manifest::load(&dir, !args.no_verify)?;
    let checked = request.check(&manifest, &options.limits)?;
    if let Some(dir) = &args.save_conditions {
        save_conditions(dir, &checked, &manifest)?;
    }
    let calls = checked.model_calls();
    let mut pipeline = Model::from_manifest(manifest, &options)?.pipeline()?;
    eprintln!("loaded {} on {} in {:.1}s", dir.display(), pipeline.backend_name(), start.elapsed().as_secs_f64());

    let bar = ProgressBar::with_draw_target(Some(calls as u64), progress_target());
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let generation = pipeline.run_checked(checked, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{} model call(s) of {}{} in {:.2}s",
        calls,
        generation.scheduler,
        if request.scheduler.is_none() { " (the graph set's own sampler)" } else { "" },
        start.elapsed().as_secs_f64()
    );

    if let Some(path) = &args.save_latents {
        t2i_rt::npy::write_f32(path, &generation.latents.clone().into_dyn())?;
        eprintln!("wrote {}", path.display());
    }
    let images = &generation.images;
    if images.len() == 1 {
        write_png(&args.out, &images[0])?;
    } else {
        for (path, image) in out_paths.iter().skip(1).zip(images) {
            write_png(path, image)?;
            eprintln!("wrote {}", path.display());
        }
        let columns = (images.len() as f64).sqrt().ceil() as usize;
        write_png(&args.out, &grid(images, columns))?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dir = graph_set_dir(args.source.graphs, args.source.graph)?;
    let mut request = Request::new(args.prompt);
    request.steps = args.steps;
    request.guidance = args.guidance;
    request.scheduler = args.scheduler;
    request.rng = args.rng;
    request.adapters = args.adapters;
    request.ip_image = args.ip_image.map(ConditionSource::File);
    request.ip_scale = args.ip_scale;
    request.styles = args.styles;
    request.style_cond_tau = args.style_cond_tau;
    args.control.apply(&mut request);
    request.width = args.size.map(|s| s.width);
    request.height = args.size.map(|s| s.height);
    let manifest = Manifest::load(&dir, true)?;
    let options = args.exec.load_options(false)?;
    let checked = request.check(&manifest, &options.limits)?;
    let (scheduler, width, height) = (checked.scheduler(), checked.width, checked.height);
    let graphs = dir.display().to_string();

    // Start-up: what a service pays before its first request (checksums excluded).
    let start = Instant::now();
    let manifest = Manifest::load(&dir, false)?;
    let mut pipeline = Model::from_manifest(manifest, &options)?.pipeline()?;
    let startup = start.elapsed();

    let ip = request.ip_image.is_some();
    let configs: Vec<(&str, Request)> = match (request.adapters.is_empty(), request.controls.is_empty()) {
        (true, true) if ip => vec![("IP image, cache warm", request.clone()), ("IP image, cache cold", request)],
        (true, true) if !request.styles.is_empty() => {
            let mut bare = request.clone();
            bare.styles.clear();
            vec![("with style", request), ("without style", bare)]
        }
        (true, true) => vec![("", request)],
        (false, true) => {
            let mut bare = request.clone();
            bare.adapters.clear();
            vec![("with adapters", request), ("without adapters", bare)]
        }
        _ => {
            let mut bare = request.clone();
            bare.adapters.clear();
            bare.controls.clear();
            bare.guess_mode = false;
            vec![("with conditioning", request), ("without conditioning", bare)]
        }
    };
    let runs = configs.len() * (args.warmup + args.iters);
    let bar = ProgressBar::with_draw_target(Some(runs as u64), progress_target());
    bar.set_style(
        ProgressStyle::with_template("{spinner} run {pos}/{len} [{bar:30}] {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let requests: Vec<BenchRequest> =
        configs.iter().map(|(label, request)| BenchRequest { request, cold: label.ends_with("cache cold") }).collect();
    let timings = measure(&mut pipeline, &requests, args.warmup, args.iters, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let results: Vec<_> = configs.iter().zip(&timings).map(|((label, _), t)| (*label, stage_stats(t))).collect();
    let peak_rss = peak_rss_mb();

    println!(
        "{} on {} ({} thread(s)), {width}x{height}, {} steps of {}, guidance {}, {} measured run(s) after {} warm-up",
        graphs,
        args.exec.backend,
        args.exec.threads.map_or("default".to_string(), |n| n.to_string()),
        args.steps,
        scheduler,
        args.guidance,
        args.iters,
        args.warmup
    );
    println!(
        "start-up {:.1} ms; peak RSS {}",
        startup.as_secs_f64() * 1e3,
        peak_rss.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    for (label, stats) in &results {
        if !label.is_empty() {
            println!("\n{label}:");
        }
        println!("{:<24} {:>12} {:>12} {:>12}", "stage (ms)", "median", "p90", "min");
        for (stage, s) in stats {
            println!("{stage:<24} {:>12.3} {:>12.3} {:>12.3}", s.median, s.p90, s.min);
        }
        if let (Some(o), Some(u)) = (stats.get("orchestration_per_step"), stats.get("unet_step")) {
            println!("orchestration: {:.3}% of a UNet step (median)", 100.0 * o.median / u.median);
        }
    }
    let overhead = match results.as_slice() {
        [(_, warm), (_, cold)] if configs[1].0.ends_with("cache cold") => {
            let stage =
                |stats: &std::collections::BTreeMap<&str, Stats>| stats.get("ip_adapter").map_or(0.0, |s| s.median);
            println!(
                "\nIP image: ip_adapter stage {:.3} ms cold, {:.3} ms warm (median); total cold / warm = {:.4}",
                stage(cold),
                stage(warm),
                cold["total"].median / warm["total"].median
            );
            None
        }
        [(_, with), (_, without)] => {
            let ratio = with["total"].median / without["total"].median;
            let (what, dropped) = if configs[0].0 == "with style" {
                ("style", "style images")
            } else if configs[0].1.controls.is_empty() {
                ("adapter", "adapters")
            } else {
                ("conditioning", "adapters and ControlNets")
            };
            println!("\n{what} overhead: total with / without {dropped} = {ratio:.4} ({:+.2}%)", (ratio - 1.0) * 100.0);
            if let Some(style) = with.get("style_adapter") {
                println!("style: style_adapter stage {:.3} ms (median)", style.median);
            }
            Some(ratio)
        }
        _ => None,
    };

    if let Some(path) = &args.json {
        let stages = |stats: &std::collections::BTreeMap<&str, Stats>| serde_json::to_value(stats).unwrap_or_default();
        let mut json = serde_json::json!({
            "backend": args.exec.backend.as_str(),
            "graphs": graphs,
            "size": [width, height],
            "steps": args.steps,
            "scheduler": scheduler.as_str(),
            "guidance": args.guidance,
            "threads": args.exec.threads,
            "warmup": args.warmup,
            "iters": args.iters,
            "stages_ms": stages(&results[0].1),
            "startup_ms": startup.as_secs_f64() * 1e3,
            "peak_rss_mb": peak_rss,
        });
        if ip && configs.len() == 2 && configs[1].0.ends_with("cache cold") {
            json["ip_cache_cold"] = serde_json::json!({ "stages_ms": stages(&results[1].1) });
        }
        if let (Some(ratio), Some((_, without))) = (overhead, results.get(1)) {
            let (without_key, overhead_key) = if configs[0].0 == "with style" {
                ("without_style", "style_overhead")
            } else {
                ("without_adapters", "adapter_overhead")
            };
            json[without_key] = serde_json::json!({ "stages_ms": stages(without) });
            json[overhead_key] = ratio.into();
        }
        let text = serde_json::to_string_pretty(&json).context("serializing the results")? + "\n";
        t2i_rt::output::write_file_atomic(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `out` alone for one sample; for several, `out` (the grid) then `STEM-i.EXT` per sample.
fn output_paths(out: &Path, n: usize) -> Result<Vec<PathBuf>> {
    if out.extension().map(|e| !e.eq_ignore_ascii_case("png")).unwrap_or(true) {
        bail!("--out {}: must name a .png file", out.display());
    }
    let mut paths = vec![out.to_path_buf()];
    if n > 1 {
        let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        paths.extend((0..n).map(|i| out.with_file_name(format!("{stem}-{i}.png"))));
    }
    Ok(paths)
}

/// Fails early, before minutes of compute, when an output could not be written.
fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("cannot write {}: directory {} does not exist", path.display(), dir.display());
    }
    if path.is_dir() {
        bail!("cannot write {}: it is a directory", path.display());
    }
    Ok(())
}

fn progress_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

fn inspect(args: InspectArgs) -> Result<()> {
    let dir = graph_set_dir(None, Some(args.path))?;
    let manifest = Manifest::load(&dir, true)?;
    println!("graph set   {}", dir.display());
    println!("name        {}", manifest.name);
    println!("family      {}  (format {}, {})", manifest.family, manifest.format_version, manifest.precision);
    println!(
        "size        default {}x{}, multiples of {}",
        manifest.default_size[0], manifest.default_size[1], manifest.size_multiple
    );
    println!(
        "latent      {} channels, 1/{} of the image; VAE scaling {}",
        manifest.latent.channels, manifest.latent.downscale, manifest.vae.scaling_factor
    );
    for e in &manifest.text_encoders {
        println!(
            "text        {}: {} ({}, max length {}, pad id {}){}",
            e.name,
            e.hidden_output,
            match e.tokenizer.source() {
                Ok(TokenizerSource::Builtin(builtin)) => format!("built-in {} tokenizer", builtin.as_str()),
                Ok(TokenizerSource::File(file)) => file.to_string(),
                Err(why) => format!("a tokenizer that {why}"),
            },
            e.tokenizer.max_length,
            e.tokenizer.pad_token_id,
            e.pooled_output.as_ref().map(|p| format!(" + pooled {p}")).unwrap_or_default()
        );
    }
    if manifest.force_zeros_for_empty_prompt {
        println!("            no negative prompt: zero embeddings (force_zeros_for_empty_prompt)");
    }
    if let Some(ids) = &manifest.added_cond.time_ids {
        println!("added cond  text_embeds from {:?}, time_ids {}", manifest.added_cond.text_embeds, ids.join(" + "));
    }
    println!("vae         decoder precision {}", manifest.vae.precision);
    let class = manifest.scheduler.get("_class_name").and_then(|v| v.as_str()).unwrap_or("?");
    let default = match t2i_rt::SchedulerConfig::new(&manifest.scheduler).checkpoint_kind() {
        Ok(kind) => format!("default sampler {kind}"),
        Err(e) => format!("no default sampler ({e})"),
    };
    println!("scheduler   {class} config, {default}; samplers: {}", scheduler_names());
    println!(
        "residuals   {}",
        manifest
            .residual_slots
            .iter()
            .map(|s| format!("{}({}ch, /{})", s.input, s.channels, s.downscale))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for a in &manifest.adapters {
        println!(
            "adapter     {} ({}, {} condition, size multiple {}, feeds slots {:?})",
            a.name,
            a.adapter_type,
            if a.in_channels == 1 { "gray" } else { "rgb" },
            a.downscale_factor,
            a.residual_slots
        );
    }
    if !manifest.control_slots.is_empty() {
        println!(
            "controls    {}",
            manifest
                .control_slots
                .iter()
                .map(|s| format!("{}({}ch, /{})", s.input, s.channels, s.downscale))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for c in &manifest.controlnets {
        println!(
            "controlnet  {} (rgb control image of the output size, {}-channel condition, feeds every control slot)",
            c.name, c.conditioning_channels
        );
    }
    if let Some(ip) = &manifest.ip_adapter {
        println!(
            "ip_adapter  {:?}, {} tokens per image, negative {:?} (use --ip-image IMG --ip-scale F)",
            ip.kind, ip.num_tokens, ip.negative
        );
    }
    if let Some(style) = &manifest.style_adapter {
        println!(
            "style       {} tokens per image, at most {} images (use --style IMG[:WEIGHT] --style-cond-tau F)",
            style.num_tokens, style.max_images
        );
    }
    let backend = args.backend.create(None)?;
    println!("checksums   ok\n\ngraphs (as read by {}):", backend.name());
    for g in manifest.set_graphs() {
        let (name, spec) = (g.name(), g.spec);
        let graph = backend.load(&name, &manifest.resolve(&spec.file)?)?;
        let status = match spec.check_io(&name, graph.inputs(), graph.outputs()) {
            Ok(()) => "matches manifest".to_string(),
            Err(e) => format!("MISMATCH: {e}"),
        };
        println!(
            "  {name}  ({}{}, {}, batch {:?})  {status}",
            spec.file,
            if spec.external_data.is_empty() { "" } else { " + external data" },
            spec.precision,
            g.batch()
        );
        for (precision, variant) in &spec.variants {
            println!("      {precision} variant: {} (--precision {precision})", variant.file);
        }
        print_tensors("in ", &spec.inputs);
        print_tensors("out", &spec.outputs);
    }
    Ok(())
}

fn build_engine(args: BuildEngineArgs) -> Result<()> {
    let dir = graph_set_dir(args.source.graphs, args.source.graph)?;
    let options = args.exec.load_options(!args.no_verify)?;
    let start = Instant::now();
    let built = Model::build_engines(&dir, &options, &args.profiles, &mut |graph| {
        eprintln!("preparing {graph} ...");
    })?;
    for b in &built {
        eprintln!("  {:<20} {:>8.2} s", b.graph, b.seconds);
    }
    eprintln!("prepared {} graphs for {} in {:.1} s", built.len(), args.exec.backend, start.elapsed().as_secs_f64());
    // Load once through the cache: proves the entries are usable and shows the start-up they give.
    let start = Instant::now();
    Model::load(&dir, &LoadOptions { verify_checksums: false, ..options })?.pipeline()?;
    eprintln!("start-up from the prepared engines: {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn print_tensors(side: &str, tensors: &[TensorSpec]) {
    for t in tensors {
        let dims: Vec<String> = t.dims.iter().map(ToString::to_string).collect();
        println!("    {side} {:<24} {:<8} [{}]", t.name, t.dtype.to_string(), dims.join(", "));
    }
}
