//! Draws the demo grid: the demo-shapes model (`graphs/demo-shapes`, trained by
//! `python -m t2i_export train-demo`) on its example scenes, without and with T2I-Adapters.
//!
//! One row per example in `graphs/demo-shapes/examples/examples.json`; columns: the sketch, the
//! color palette, then the same prompt and seed drawn with no adapter, with the sketch adapter, and
//! with sketch + color. Run by `scripts/demo.sh`:
//!
//! ```sh
//! cargo run --release --example demo_grid -- --graphs graphs/demo-shapes --out out/demo-grid.png
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use image::RgbImage;
use serde::Deserialize;
use t2i_rt::{AdapterRequest, BackendKind, LoadOptions, Pipeline, Request};

#[derive(Parser)]
#[command(
    about = "Draw the demo-shapes grid: sketch | palette | no adapter | sketch | sketch + color, one row per example"
)]
struct Args {
    /// The demo graph set (with examples/examples.json).
    #[arg(long, default_value = "graphs/demo-shapes")]
    graphs: PathBuf,
    /// Output PNG.
    #[arg(long, default_value = "out/demo-grid.png")]
    out: PathBuf,
    /// ort-cpu or tract.
    #[arg(long, default_value = "ort-cpu")]
    backend: BackendKind,
    /// Seed of every drawing (the same in every column, so only the adapters differ).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
}

#[derive(Deserialize)]
struct Example {
    prompt: String,
    sketch: String,
    color: String,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let folder = args.graphs.join("examples");
    let listing = folder.join("examples.json");
    let examples: Vec<Example> = serde_json::from_str(
        &std::fs::read_to_string(&listing)
            .map_err(|e| format!("{}: {e} (is this the demo-shapes set?)", listing.display()))?,
    )
    .map_err(|e| format!("{}: {e}", listing.display()))?;
    let mut pipeline = Pipeline::load(&args.graphs, &LoadOptions { backend: args.backend, ..LoadOptions::default() })?;
    let mut cells = Vec::new();
    for example in &examples {
        let sketch = folder.join(&example.sketch);
        let color = folder.join(&example.color);
        cells.push(load_rgb(&sketch)?);
        cells.push(load_rgb(&color)?);
        for adapters in [vec![], vec![("sketch", &sketch)], vec![("sketch", &sketch), ("color", &color)]] {
            let mut request = Request::new(example.prompt.clone());
            request.steps = args.steps;
            request.guidance = args.guidance;
            request.seed = args.seed;
            for (name, path) in adapters {
                request.adapters.push(format!("{name}={}", path.display()).parse::<AdapterRequest>()?);
            }
            let generation = pipeline.run(&request, &mut |_| true)?;
            cells.extend(generation.images);
        }
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    t2i_rt::output::write_png(&args.out, &t2i_rt::output::grid(&cells, 5))?;
    println!(
        "wrote {} ({} examples: sketch | palette | no adapter | sketch | sketch + color)",
        args.out.display(),
        examples.len()
    );
    Ok(())
}

fn load_rgb(path: &Path) -> Result<RgbImage, Box<dyn std::error::Error>> {
    Ok(image::open(path).map_err(|e| format!("{}: {e}", path.display()))?.to_rgb8())
}
