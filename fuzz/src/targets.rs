//! Fuzz target bodies: each takes arbitrary bytes, hands them to one parser of outside input the
//! way the runtime does, and must return, whatever the bytes, without a panic, an abort, a hang or
//! an unbounded allocation. Errors are the expected outcome for most inputs; where a parse
//! succeeds, the target checks what the parser promises.
//!
//! Shared by the libFuzzer binaries (`fuzz/fuzz_targets/`) and the regression test that replays the
//! committed corpus (`runtime/tests/fuzz_regressions.rs`, which includes this file by path), so it
//! uses only `t2i_rt` and `std`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::{Backend, BackendKind};
use t2i_rt::condition::{ConditionImage, ConditionKind};
use t2i_rt::engine::Profile;
use t2i_rt::manifest::Manifest;
use t2i_rt::tokenizer::PromptTokenizer;
use t2i_rt::{Limits, Offset, Request, SchedulerKind, Size};

/// The repository root (the fuzz crate and the runtime crate are both one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The committed tiny SD 1.x graph set, whose manifest and tokenizer the targets use.
fn tiny_set() -> PathBuf {
    repo().join("graphs/tiny-sd1")
}

/// The tiny set's manifest, loaded once (files checked, checksums not: the tests check those).
fn tiny_manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| Manifest::load(&tiny_set(), false).expect("graphs/tiny-sd1 loads"))
}

/// Limits for fuzzing: the defaults, but condition images held to 1024² pixels so that a valid
/// header declaring a large image decodes in milliseconds (the bound's logic is the same; the
/// default-limit bomb is a test of its own).
fn fuzz_limits() -> Limits {
    Limits { max_image_pixels: 1024 * 1024, max_image_file_bytes: 1 << 20, ..Limits::default() }
}

/// `manifest.json` text: parsed and checked; an accepted manifest must answer every question the
/// runtime asks it before loading graphs (files, paths, sizes, the default request's check with
/// its scheduler config) without a panic.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = Path::new("/nonexistent/t2i-rt-fuzz-set");
    let Ok(m) = Manifest::parse(text, dir) else { return };
    for file in m.files() {
        if let Ok(path) = m.resolve(file.file) {
            assert!(path.starts_with(dir), "{path:?} left the graph set");
        }
    }
    let _ = m.set_graphs();
    let _ = m.inpainting_unet();
    let mut request = Request::new("a red square");
    request.steps = 3;
    let _ = request.check(&m, &Limits::default());
    request.guidance = 1.0;
    request.n_samples = 2;
    let _ = request.check(&m, &Limits::default());
    let _ = t2i_rt::SchedulerConfig::new(&m.scheduler).checkpoint_kind();
}

/// A `.npy` latents file.
pub fn npy(data: &[u8]) {
    if let Ok(latents) = t2i_rt::npy::parse_latents(data) {
        assert_eq!(latents.ndim(), 4);
        assert!(latents.len() * 4 <= data.len(), "more values than bytes");
    }
}

/// A condition image (PNG or JPEG bytes), decoded for a gray or an RGB adapter (the first byte
/// picks), then resized and made a tensor as the pipeline does.
pub fn image(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let kind = if pick & 1 == 0 { ConditionKind::Gray } else { ConditionKind::Rgb };
    let Ok(image) = ConditionImage::decode(bytes, kind, &fuzz_limits()) else { return };
    assert_eq!(image.pixels().len(), image.width() as usize * image.height() as usize * kind.channels());
    let (w, h) = (u32::from(pick >> 1) % 48 + 1, u32::from(pick) % 40 + 1);
    let tensor = image.resized(w, h).to_tensor();
    assert_eq!(tensor.shape(), &[1, kind.channels(), h as usize, w as usize]);
    assert!(tensor.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// Request strings, one per line, as the command line and a service's API pass them:
/// `KEY:VALUE` where KEY picks the parser (`adapter`, `size`, `offset`, `option`, `scheduler`, `rng`,
/// `profile`, `backend`, `steps`, `samples`, `guidance`, `tau`, `eta`, `rescale`, `prompt`,
/// `negative`). Every line is parsed; the parsed values then form one request, checked against the
/// tiny graph set (scheduler options reach the sampler's config this way).
pub fn request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut request = Request::new("");
    request.steps = 4;
    for line in text.lines().take(64) {
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        match key {
            "adapter" => {
                if let Ok(mut adapter) = value.parse::<AdapterRequest>() {
                    // The parse is what is fuzzed; the image is always a committed condition image
                    // (a fuzzed path could name /dev/stdin and wait forever, as any reader would).
                    adapter.image =
                        ConditionSource::File(repo().join("graphs/fixtures/tiny-sd1/conditions/sketch.png"));
                    request.adapters.push(adapter);
                }
            }
            "size" => {
                if let Ok(size) = value.parse::<Size>() {
                    assert_eq!(size.to_string().parse::<Size>().ok(), Some(size));
                    request.width = Some(size.width);
                    request.height = Some(size.height);
                }
            }
            "offset" => {
                if let Ok(offset) = value.parse::<Offset>() {
                    request.size_cond.crops_coords_top_left = offset.top_left();
                }
            }
            "option" => {
                if let Ok((key, value)) = t2i_rt::scheduler::parse_option(value) {
                    request.scheduler_options.insert(key, value);
                }
            }
            "scheduler" => request.scheduler = value.parse::<SchedulerKind>().ok(),
            "rng" => request.rng = value.parse().unwrap_or(request.rng),
            "profile" => {
                let _ = value.parse::<Profile>();
            }
            "backend" => {
                let _ = value.parse::<BackendKind>();
            }
            "steps" => request.steps = value.parse().unwrap_or(request.steps),
            "samples" => request.n_samples = value.parse().unwrap_or(request.n_samples),
            "guidance" => request.guidance = value.parse().unwrap_or(request.guidance),
            "tau" => request.cond_tau = value.parse().unwrap_or(request.cond_tau),
            "eta" => request.eta = value.parse().unwrap_or(request.eta),
            "rescale" => request.guidance_rescale = value.parse().unwrap_or(request.guidance_rescale),
            "strength" => request.strength = value.parse().ok(),
            // An init image or mask of a side given in the value, in memory.
            "init" | "mask" => {
                let side: u32 = value.parse().unwrap_or(64).min(256);
                let kind = if key == "init" { ConditionKind::Rgb } else { ConditionKind::Gray };
                let pixels = vec![128u8; (side * side) as usize * kind.channels()];
                let image = ConditionImage::from_pixels(side, side, kind, pixels).map(ConditionSource::Pixels);
                if key == "init" {
                    request.init_image = image;
                } else {
                    request.mask = image;
                }
            }
            "prompt" => request.prompt = value.to_string(),
            "negative" => request.negative_prompt = Some(value.to_string()),
            _ => {}
        }
    }
    if let Ok(checked) = request.check(tiny_manifest(), &fuzz_limits()) {
        assert!(checked.width > 0 && checked.height > 0);
        assert!(checked.model_calls() >= 1);
    }
}

/// Prompt text through the real CLIP tokenizer (the tiny set's, built into the runtime): always
/// exactly `max_length` ids, each in the vocabulary.
pub fn tokenizer(data: &[u8]) {
    static TOKENIZER: OnceLock<PromptTokenizer> = OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| {
        let manifest = tiny_manifest();
        PromptTokenizer::for_set(manifest, &manifest.text_encoders[0].tokenizer).expect("the tiny set's tokenizer loads")
    });
    let prompt = String::from_utf8_lossy(data);
    if let Ok(ids) = tokenizer.encode(&prompt) {
        assert_eq!(ids.len(), tokenizer.max_length());
        assert!(ids.iter().all(|&id| (0..49408).contains(&id)), "id out of the vocabulary");
    }
}

/// ONNX graph bytes, loaded by both backends (ONNX Runtime, when its library is found, and
/// tract), as `Backend::load_bytes` does for a service's in-memory graphs; a loaded graph also
/// opens a session.
pub fn onnx(data: &[u8]) {
    static BACKENDS: OnceLock<Vec<Arc<dyn Backend>>> = OnceLock::new();
    let backends = BACKENDS.get_or_init(|| {
        // libfuzzer-sys's panic hook aborts on every panic, even one the library catches: the tract
        // backend turns tract's panics on malformed graphs into errors. Back to std's hook; a panic
        // that escapes still fails the run (libfuzzer-sys aborts on it after unwinding).
        drop(std::panic::take_hook());
        // ONNX Runtime is optional here (the tract half still runs without its library).
        let mut backends = vec![BackendKind::Tract.create(Some(1)).expect("tract starts")];
        backends.extend(BackendKind::OrtCpu.create(Some(1)).ok());
        backends
    });
    for backend in backends {
        if let Ok(graph) = backend.load_bytes("fuzzed", data) {
            let _ = graph.inputs().len() + graph.outputs().len();
            let _ = graph.session();
        }
    }
}
