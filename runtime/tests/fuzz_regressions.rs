//! Replays every committed fuzz input through the fuzz targets' own bodies: the seed corpus
//! (`fuzz/corpus/NAME/`) and every input a fuzzing run ever crashed on (`fuzz/regressions/NAME/`,
//! committed once fixed). Runs on every `cargo test` without instrumentation; `scripts/fuzz.sh`
//! does the coverage-guided search.

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flat_map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed inputs for fuzz target {target}");
    for file in files {
        let data = std::fs::read(&file).unwrap();
        eprintln!("{target}: {}", file.display());
        run(&data);
    }
}

#[test]
fn manifest() {
    replay("manifest", targets::manifest);
}

#[test]
fn npy() {
    replay("npy", targets::npy);
}

#[test]
fn image() {
    replay("image", targets::image);
}

#[test]
fn request() {
    replay("request", targets::request);
}

#[test]
fn tokenizer() {
    replay("tokenizer", targets::tokenizer);
}

#[test]
fn onnx() {
    replay("onnx", targets::onnx);
}
