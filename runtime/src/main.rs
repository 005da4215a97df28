//! `t2i-rt`: the command-line front end. It parses arguments and calls the library; all the work is
//! in [`t2i_rt::Pipeline`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use t2i_rt::adapter::AdapterRequest;
use t2i_rt::backend::BackendKind;
use t2i_rt::manifest::{Manifest, TensorSpec, MANIFEST_FILE};
use t2i_rt::output::{grid, write_png};
use t2i_rt::pipeline::{Model, Request, SizeConditioning};
use t2i_rt::scheduler::SchedulerKind;

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
}

#[derive(Args)]
#[command(
    group(clap::ArgGroup::new("source").required(true).args(["graphs", "graph"])),
    after_help = "Examples:\n  \
    t2i-rt run --graphs sd15-t2i --prompt \"a castle, oil painting\" --adapter sketch=castle.png --out castle.png\n  \
    t2i-rt run --graph sd15-t2i/unet.onnx --prompt \"a castle\" --negative-prompt \"blurry\" \\\n      \
    --adapter sketch=castle.png:1.0 --adapter color=palette.png:1.2 --cond-tau 0.5 \\\n      \
    --steps 30 --scheduler euler --seed 7 --n-samples 4 --out castles.png\n  \
    t2i-rt run --graph sdxl-t2i/unet_xl.onnx --prompt \"a castle\" --adapter canny=castle_edges.png:0.8 \\\n      \
    --adapter openpose=pose.png:1.0 --cond-tau 0.5 --width 1024 --height 1024 --steps 30 --out castle-xl.png\n\n\
Adapter names are those the graph set was exported with (see `t2i-rt inspect DIR`). SDXL sets take\n\
--original-size/--crop-top-left/--target-size (diffusers' defaults: the output size, 0,0); without\n\
--negative-prompt an SDXL set uses zero embeddings (force_zeros_for_empty_prompt), as diffusers does."
)]
struct RunArgs {
    /// Graph-set folder (holds manifest.json).
    #[arg(long, value_name = "DIR")]
    graphs: Option<PathBuf>,
    /// A graph file of the set (e.g. DIR/unet.onnx, DIR/unet_xl.onnx); the rest is found beside it.
    #[arg(long, value_name = "FILE")]
    graph: Option<PathBuf>,
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
    /// Fraction of the steps that get adapter guidance (the first floor(steps × cond_tau) steps).
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    cond_tau: f32,
    /// Denoising steps.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5, value_name = "F")]
    guidance: f32,
    /// Sampler.
    #[arg(long, default_value = "ddim", value_name = "NAME", help = scheduler_help())]
    scheduler: SchedulerKind,
    /// Seed for the initial noise (default: drawn at random and printed, so a run can be repeated).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Images to draw for the prompt.
    #[arg(long, default_value_t = 1, value_name = "N")]
    n_samples: usize,
    /// Image width in pixels (default: the graph set's default size).
    #[arg(long, value_name = "W")]
    width: Option<u32>,
    /// Image height in pixels (default: the graph set's default size).
    #[arg(long, value_name = "H")]
    height: Option<u32>,
    /// Execution backend: ort-cpu (ONNX Runtime) or tract (pure Rust, no library needed).
    #[arg(long, default_value = "ort-cpu", value_name = "B")]
    backend: BackendKind,
    /// Initial noise as .npy [n_samples, 4, H/8, W/8], exactly like diffusers' `latents=`.
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Write the final latents as .npy (what diffusers returns with output_type="latent").
    #[arg(long, value_name = "FILE")]
    save_latents: Option<PathBuf>,
    /// Output PNG. With --n-samples > 1 this is a grid, and each sample is written as NAME-i.png.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Skip checking graph files against their manifest checksums (faster start-up for large sets).
    #[arg(long)]
    no_verify: bool,
    /// SDXL: `original_size` conditioning (default: the output size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    original_size: Option<(u32, u32)>,
    /// SDXL: `crops_coords_top_left` conditioning (default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    crop_top_left: Option<(u32, u32)>,
    /// SDXL: `target_size` conditioning (default: the output size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    target_size: Option<(u32, u32)>,
    /// SDXL: `negative_original_size` (used with --negative-target-size, as in diffusers).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    negative_original_size: Option<(u32, u32)>,
    /// SDXL: `negative_crops_coords_top_left` (default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    negative_crop_top_left: Option<(u32, u32)>,
    /// SDXL: `negative_target_size` (used with --negative-original-size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    negative_target_size: Option<(u32, u32)>,
}

/// `WxH` → diffusers' (height, width).
fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1024x1024"))?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1024x1024"));
    Ok((parse(h)?, parse(w)?))
}

/// `A,B` → (A, B).
fn parse_pair(s: &str) -> std::result::Result<(u32, u32), String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("{s:?}: expected TOP,LEFT, e.g. 0,0"))?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{s:?}: expected TOP,LEFT, e.g. 0,0"));
    Ok((parse(a)?, parse(b)?))
}

#[derive(Args)]
struct InspectArgs {
    /// Graph-set folder (or a graph file inside it).
    path: PathBuf,
    /// Backend used to read the graphs' real inputs and outputs.
    #[arg(long, default_value = "ort-cpu", value_name = "B")]
    backend: BackendKind,
}

fn scheduler_help() -> String {
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
    format!("Sampler: {}", names.join(", "))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Inspect(args) => inspect(args),
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

fn run(args: RunArgs) -> Result<()> {
    let dir = graph_set_dir(args.graphs, args.graph)?;
    let mut request = Request::new(args.prompt);
    request.negative_prompt = args.negative_prompt;
    request.adapters = args.adapters;
    request.cond_tau = args.cond_tau;
    request.steps = args.steps;
    request.guidance = args.guidance;
    request.scheduler = args.scheduler;
    request.n_samples = args.n_samples;
    request.width = args.width;
    request.height = args.height;
    request.size_cond = SizeConditioning {
        original_size: args.original_size,
        crops_coords_top_left: args.crop_top_left.unwrap_or((0, 0)),
        target_size: args.target_size,
        negative_original_size: args.negative_original_size,
        negative_crops_coords_top_left: args.negative_crop_top_left.unwrap_or((0, 0)),
        negative_target_size: args.negative_target_size,
    };
    request.seed = args
        .seed
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    if let Some(path) = &args.latents {
        request.latents = Some(t2i_rt::npy::read_latents(path)?);
    } else {
        eprintln!("seed {}", request.seed);
    }
    let out_paths = output_paths(&args.out, args.n_samples)?;
    for path in out_paths.iter().chain(args.save_latents.as_ref()) {
        check_writable(path)?;
    }

    // Check the request against the manifest first: a typo should not wait for the graphs to load.
    let start = Instant::now();
    let manifest = Manifest::load(&dir, !args.no_verify)?;
    request.check(&manifest)?;
    let mut pipeline = Model::from_manifest(manifest, args.backend)?.pipeline()?;
    eprintln!("loaded {} on {} in {:.1}s", dir.display(), pipeline.backend_name(), start.elapsed().as_secs_f64());

    let bar = ProgressBar::with_draw_target(Some(request.steps as u64), progress_target());
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let generation = pipeline.run(&request, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();
    eprintln!("{} step(s) in {:.2}s", request.steps, start.elapsed().as_secs_f64());

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
            e.tokenizer.file,
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
    println!("scheduler   {class} config; samplers: {}", scheduler_help().trim_start_matches("Sampler: "));
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
    let backend = args.backend.create()?;
    println!("checksums   ok\n\ngraphs (as read by {}):", backend.name());
    for (name, spec) in manifest.graph_specs() {
        let graph = backend.load(&name, &manifest.resolve(&spec.file)?)?;
        let status = match spec.check_io(&name, graph.inputs(), graph.outputs()) {
            Ok(()) => "matches manifest".to_string(),
            Err(e) => format!("MISMATCH: {e}"),
        };
        println!(
            "  {name}  ({}{})  {status}",
            spec.file,
            if spec.external_data.is_empty() { "" } else { " + external data" }
        );
        print_tensors("in ", &spec.inputs);
        print_tensors("out", &spec.outputs);
    }
    Ok(())
}

fn print_tensors(side: &str, tensors: &[TensorSpec]) {
    for t in tensors {
        let dims: Vec<String> = t.dims.iter().map(ToString::to_string).collect();
        println!("    {side} {:<24} {:<8} [{}]", t.name, t.dtype.to_string(), dims.join(", "));
    }
}
