//! Engine caches: what `t2i-rt build-engine` prepares ahead of time so that `run` starts without
//! re-optimizing (ort-cpu, ort-cuda: ONNX Runtime's optimized graph) or rebuilding (ort-trt:
//! TensorRT engines and timing cache, for the shape profiles asked for).
//!
//! Each graph's cache lives in `ROOT/GRAPH/KEY/`, where KEY hashes everything the prepared artefact
//! depends on ([`CacheKey`]): the graph's bytes (its manifest checksums, external data included),
//! the backend and its options, the ONNX Runtime build, and the hardware (CPU model and features, or
//! GPU name, compute capability and driver; TensorRT's version). A change to any of them selects a
//! new directory, so a stale artefact is never loaded; [`lookup`] tells which fields changed so the
//! user learns why a rebuild happens. The default ROOT is `.t2i-engines/` inside the graph set.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
pub use crate::manifest::BatchRule;
use crate::manifest::{ContextRange, Dim, GraphSpec};
use crate::size::Size;

/// The cache directory inside a graph set when none is given.
pub const DEFAULT_CACHE_DIR: &str = ".t2i-engines";
/// The file in each cache entry that records its key.
pub const KEY_FILE: &str = "key.json";
/// Largest image side a profile may name (the default [`Limits::max_side`](crate::Limits::max_side)).
const MAX_SIDE: u32 = 8192;
/// Largest batch a profile may name.
const MAX_BATCH: usize = 64;

/// One shape profile: an image size and a range of images per request (`--n-samples`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub width: u32,
    pub height: u32,
    pub batch_min: usize,
    pub batch_max: usize,
}

impl FromStr for Profile {
    type Err = Error;

    /// `WxH` or `WxH:MIN-MAX` (e.g. `1024x1024:1-4`); the batch range defaults to 1-1.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidOptions(format!("profile {s:?}: {why}; expected WxH[:MIN-MAX], e.g. 512x512:1-4"))
        };
        let (size, batch) = match s.split_once(':') {
            Some((size, batch)) => (size, Some(batch)),
            None => (s, None),
        };
        let size: Size = size.parse().map_err(|_| bad("no size"))?;
        for n in [size.width, size.height] {
            if n == 0 || n > MAX_SIDE {
                return Err(bad(&format!("sides must be between 1 and {MAX_SIDE}")));
            }
        }
        let (batch_min, batch_max) = match batch {
            None => (1, 1),
            Some(range) => {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                let count = |v: &str| -> Result<usize> { v.trim().parse().map_err(|_| bad("batch is not a number")) };
                (count(lo)?, count(hi)?)
            }
        };
        if batch_min == 0 || batch_min > batch_max || batch_max > MAX_BATCH {
            return Err(bad(&format!("batch range must satisfy 1 <= MIN <= MAX <= {MAX_BATCH}")));
        }
        Ok(Profile { width: size.width, height: size.height, batch_min, batch_max })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}:{}-{}", self.width, self.height, self.batch_min, self.batch_max)
    }
}

/// (min, opt, max) rows of a graph batched by `rule` for `profile`; opt is the common case
/// (guidance on, fewest images).
fn rows(rule: BatchRule, profile: &Profile) -> (usize, usize, usize) {
    match rule {
        BatchRule::Prompts | BatchRule::Images => (1, 2, 2),
        BatchRule::One => (1, 1, 1),
        BatchRule::GuidedSamples => (profile.batch_min, 2 * profile.batch_min, 2 * profile.batch_max),
        BatchRule::Samples => (profile.batch_min, profile.batch_min, profile.batch_max),
    }
}

/// One input's shapes in one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRange {
    pub input: String,
    pub min: Vec<i64>,
    pub opt: Vec<i64>,
    pub max: Vec<i64>,
}

/// Concrete min/opt/max shapes of every input of one graph, one entry per profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeRanges {
    /// Per profile, every input's range.
    pub profiles: Vec<Vec<InputRange>>,
}

impl ShapeRanges {
    /// The graph's profiles from the user's, resolving the manifest's symbolic dimensions (`batch`,
    /// `latent_height`, `latent_width`, `latent_height_divK`, `image_height`, `image_width`, and a
    /// style set's context length from `context`: [`Manifest::context_range`](crate::Manifest::context_range)).
    pub fn for_graph(
        graph: &str,
        spec: &GraphSpec,
        rule: BatchRule,
        latent_downscale: u32,
        profiles: &[Profile],
        context: Option<&ContextRange>,
    ) -> Result<ShapeRanges> {
        let mut out = Vec::with_capacity(profiles.len());
        for profile in profiles {
            let (bmin, bopt, bmax) = rows(rule, profile);
            let mut inputs = Vec::with_capacity(spec.inputs.len());
            for input in &spec.inputs {
                let shape = |batch: usize, length: Option<i64>| -> Result<Vec<i64>> {
                    input
                        .dims
                        .iter()
                        .map(|d| match (d, context, length) {
                            (Dim::Symbolic(name), Some(c), Some(length)) if *name == c.dim => Ok(length),
                            _ => resolve_dim(d, batch, profile, latent_downscale),
                        })
                        .collect::<std::result::Result<_, String>>()
                        .map_err(|why| Error::InvalidOptions(format!("graph {graph}, input {}: {why}", input.name)))
                };
                inputs.push(InputRange {
                    input: input.name.clone(),
                    min: shape(bmin, context.map(|c| c.min))?,
                    opt: shape(bopt, context.map(|c| c.opt))?,
                    max: shape(bmax, context.map(|c| c.max))?,
                });
            }
            out.push(inputs);
        }
        Ok(ShapeRanges { profiles: out })
    }

    /// ONNX Runtime's TensorRT option strings (`trt_profile_min_shapes`, `..._opt_...`,
    /// `..._max_...`): `input:1x4x64x64,other:...`, profiles one after another.
    pub fn trt_option_strings(&self) -> (String, String, String) {
        let join = |pick: fn(&InputRange) -> &Vec<i64>| -> String {
            let mut parts = Vec::new();
            for profile in &self.profiles {
                for entry in profile {
                    let dims: Vec<String> = pick(entry).iter().map(|d| d.to_string()).collect();
                    parts.push(format!("{}:{}", entry.input, dims.join("x")));
                }
            }
            parts.join(",")
        };
        (join(|e| &e.min), join(|e| &e.opt), join(|e| &e.max))
    }
}

fn resolve_dim(dim: &Dim, batch: usize, profile: &Profile, latent_downscale: u32) -> std::result::Result<i64, String> {
    let name = match dim {
        Dim::Fixed(n) => return Ok(*n),
        Dim::Symbolic(name) => name.as_str(),
    };
    let (base, div) = match name.rsplit_once("_div") {
        Some((base, k)) => (base, k.parse::<u32>().map_err(|_| format!("unknown dimension {name:?}"))?),
        None => (name, 1),
    };
    let value = match base {
        "batch" => return Ok(batch as i64),
        "image_height" => profile.height,
        "image_width" => profile.width,
        "latent_height" => profile.height / latent_downscale,
        "latent_width" => profile.width / latent_downscale,
        _ => return Err(format!("unknown dimension {name:?} (re-export the graph set)")),
    };
    if div == 0 || value % div != 0 {
        return Err(format!("dimension {name} = {value} / {div} is not whole: pick a size that is a multiple of the set's size_multiple"));
    }
    Ok(i64::from(value / div))
}

/// Everything a prepared artefact depends on, as named fields (so a stale cache can say which
/// changed). Its [`CacheKey::digest`] names the cache directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheKey {
    pub fields: BTreeMap<String, String>,
}

impl CacheKey {
    pub fn new() -> Self {
        CacheKey::default()
    }

    pub fn with(mut self, field: &str, value: impl Into<String>) -> Self {
        self.fields.insert(field.to_string(), value.into());
        self
    }

    /// The graph's identity: the manifest's checksums of the graph file and its external data.
    pub fn graph_digest(spec: &GraphSpec) -> String {
        let mut h = Sha256::new();
        for (file, sha) in
            std::iter::once((&spec.file, &spec.sha256)).chain(spec.external_data.iter().map(|d| (&d.file, &d.sha256)))
        {
            h.update(file.as_bytes());
            h.update([0]);
            h.update(sha.as_deref().unwrap_or("-").as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())
    }

    /// 16 hex digits of the SHA-256 of every field.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in &self.fields {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())[..16].to_string()
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.fields).expect("string map serializes") + "\n"
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the cache holds for one graph and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Prepared for exactly this key: use it.
    Fresh(PathBuf),
    /// Only entries for other keys exist; `changed` lists `field: old -> new` for the newest one.
    Stale { changed: Vec<String> },
    /// Nothing prepared for this graph.
    Missing,
}

/// The directory of `graph`'s entry for `key` under `root` (not created).
pub fn entry_dir(root: &Path, graph: &str, key: &CacheKey) -> PathBuf {
    root.join(graph).join(key.digest())
}

/// Looks `graph` up under `root`. An entry counts only once its key file is written (last, by
/// [`finish_entry`]), so an interrupted build is never taken for a finished one.
pub fn lookup(root: &Path, graph: &str, key: &CacheKey) -> Lookup {
    let dir = entry_dir(root, graph, key);
    if dir.join(KEY_FILE).is_file() {
        return Lookup::Fresh(dir);
    }
    let Ok(entries) = std::fs::read_dir(root.join(graph)) else { return Lookup::Missing };
    let newest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let key_file = e.path().join(KEY_FILE);
            let modified = key_file.metadata().and_then(|m| m.modified()).ok()?;
            Some((modified, key_file))
        })
        .max();
    let Some((_, key_file)) = newest else { return Lookup::Missing };
    let old: BTreeMap<String, String> =
        std::fs::read_to_string(&key_file).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    let mut changed = Vec::new();
    for (field, new) in &key.fields {
        match old.get(field) {
            Some(o) if o == new => {}
            Some(o) => changed.push(format!("{field}: {} -> {}", short(o), short(new))),
            None => changed.push(format!("{field}: (none) -> {}", short(new))),
        }
    }
    changed.extend(old.keys().filter(|f| !key.fields.contains_key(*f)).map(|f| format!("{f}: removed")));
    if changed.is_empty() {
        changed.push(format!("{} does not match its folder name", key_file.display()));
    }
    Lookup::Stale { changed }
}

/// Long values (hashes, build strings) shortened for messages.
fn short(value: &str) -> String {
    if value.chars().count() > 40 {
        format!("{}…", value.chars().take(40).collect::<String>())
    } else {
        value.to_string()
    }
}

/// Creates `graph`'s entry directory for `key` (emptied if a previous build was interrupted).
pub fn begin_entry(root: &Path, graph: &str, key: &CacheKey) -> Result<PathBuf> {
    let dir = entry_dir(root, graph, key);
    let io = |e: std::io::Error| Error::Io { path: dir.clone(), message: e.to_string() };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    std::fs::create_dir_all(&dir).map_err(io)?;
    Ok(dir)
}

/// Marks an entry complete by writing its key file (atomically, last).
pub fn finish_entry(dir: &Path, key: &CacheKey) -> Result<()> {
    let json = key.to_json();
    crate::atomic_file::write_atomically(&dir.join(KEY_FILE), |w| {
        std::io::Write::write_all(w, json.as_bytes()).map_err(|e| e.to_string())
    })
}

/// The CPU's identity for caches whose content depends on it (ONNX Runtime's optimized graphs use
/// the instruction set they were optimized on): model name and feature flags from /proc/cpuinfo.
pub fn cpu_identity() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let mut h = Sha256::new();
    h.update(flags.as_bytes());
    format!("{} / {} / flags {}", std::env::consts::ARCH, field("model name"), &hex(&h.finalize())[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DType, TensorSpec};

    fn spec(inputs: &[(&str, &[Dim])]) -> GraphSpec {
        GraphSpec {
            file: "unet.onnx".into(),
            sha256: Some("aa".into()),
            external_data: vec![],
            inputs: inputs
                .iter()
                .map(|(n, d)| TensorSpec { name: n.to_string(), dtype: DType::Float32, dims: d.to_vec() })
                .collect(),
            outputs: vec![],
            precision: Default::default(),
            batch: None,
            variants: Default::default(),
        }
    }

    fn sym(s: &str) -> Dim {
        Dim::Symbolic(s.into())
    }

    #[test]
    fn profiles_parse_and_refuse() {
        assert_eq!(
            "512x768".parse::<Profile>().unwrap(),
            Profile { width: 512, height: 768, batch_min: 1, batch_max: 1 }
        );
        assert_eq!("1024X1024:1-4".parse::<Profile>().unwrap().batch_max, 4);
        assert_eq!(
            "64x64:2".parse::<Profile>().unwrap(),
            Profile { width: 64, height: 64, batch_min: 2, batch_max: 2 }
        );
        for bad in ["512", "0x512", "512x512:0-1", "512x512:3-2", "512x512:1-999", "axb", "99999x64", "512x512:"] {
            let err = bad.parse::<Profile>().unwrap_err().to_string();
            assert!(err.contains("expected WxH[:MIN-MAX]"), "{bad}: {err}");
        }
    }

    #[test]
    fn unet_shapes_follow_the_pipeline_batches() {
        let unet = spec(&[
            ("sample", &[sym("batch"), Dim::Fixed(4), sym("latent_height"), sym("latent_width")]),
            ("encoder_hidden_states", &[sym("batch"), Dim::Fixed(77), Dim::Fixed(768)]),
            (
                "adapter_residual_2",
                &[sym("batch"), Dim::Fixed(1280), sym("latent_height_div4"), sym("latent_width_div4")],
            ),
        ]);
        let profiles = ["512x768:1-2".parse().unwrap()];
        let ranges = ShapeRanges::for_graph("unet", &unet, BatchRule::GuidedSamples, 8, &profiles, None).unwrap();
        let (min, opt, max) = ranges.trt_option_strings();
        assert_eq!(min, "sample:1x4x96x64,encoder_hidden_states:1x77x768,adapter_residual_2:1x1280x24x16");
        assert_eq!(opt, "sample:2x4x96x64,encoder_hidden_states:2x77x768,adapter_residual_2:2x1280x24x16");
        assert_eq!(max, "sample:4x4x96x64,encoder_hidden_states:4x77x768,adapter_residual_2:4x1280x24x16");

        let text = spec(&[("input_ids", &[sym("batch"), Dim::Fixed(77)])]);
        let two = ["512x512".parse().unwrap(), "1024x1024:1-4".parse().unwrap()];
        let (min, _, max) = ShapeRanges::for_graph("text_encoder", &text, BatchRule::Prompts, 8, &two, None)
            .unwrap()
            .trt_option_strings();
        assert_eq!(min, "input_ids:1x77,input_ids:1x77");
        assert_eq!(max, "input_ids:2x77,input_ids:2x77");
    }

    #[test]
    fn unknown_or_fractional_dims_are_refused() {
        let odd = spec(&[("x", &[sym("mystery")])]);
        let p = ["512x512".parse().unwrap()];
        let err = ShapeRanges::for_graph("unet", &odd, BatchRule::One, 8, &p, None).unwrap_err().to_string();
        assert!(err.contains("unknown dimension \"mystery\""), "{err}");
        let frac = spec(&[("x", &[sym("latent_height_div8")])]);
        let p = ["520x520".parse().unwrap()];
        let err = ShapeRanges::for_graph("unet", &frac, BatchRule::One, 8, &p, None).unwrap_err().to_string();
        assert!(err.contains("not whole"), "{err}");
        // A style set's context length is known only through its range.
        let context = spec(&[("encoder_hidden_states", &[sym("batch"), sym("context_length"), Dim::Fixed(768)])]);
        let err = ShapeRanges::for_graph("unet", &context, BatchRule::One, 8, &p, None).unwrap_err().to_string();
        assert!(err.contains("unknown dimension \"context_length\""), "{err}");
        let range = ContextRange { dim: "context_length".into(), min: 77, opt: 85, max: 149 };
        let ranges = ShapeRanges::for_graph("unet", &context, BatchRule::GuidedSamples, 8, &p, Some(&range)).unwrap();
        let (min, opt, max) = ranges.trt_option_strings();
        assert_eq!(
            (min.as_str(), opt.as_str(), max.as_str()),
            ("encoder_hidden_states:1x77x768", "encoder_hidden_states:2x85x768", "encoder_hidden_states:2x149x768")
        );
    }

    #[test]
    fn keys_change_with_every_field_and_lookup_says_what_changed() {
        let root = std::env::temp_dir().join(format!("t2i-engine-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let unet = spec(&[]);
        let key = CacheKey::new()
            .with("graph", CacheKey::graph_digest(&unet))
            .with("gpu", "NVIDIA H100 80GB HBM3 (sm_90)")
            .with("onnxruntime", "1.31.1");
        assert_eq!(lookup(&root, "unet", &key), Lookup::Missing);
        let dir = begin_entry(&root, "unet", &key).unwrap();
        // An entry without its key file (an interrupted build) is not found.
        assert_eq!(lookup(&root, "unet", &key), Lookup::Missing);
        finish_entry(&dir, &key).unwrap();
        assert_eq!(lookup(&root, "unet", &key), Lookup::Fresh(dir.clone()));

        let other_gpu = key.clone().with("gpu", "NVIDIA A100-SXM4-80GB (sm_80)");
        assert_ne!(other_gpu.digest(), key.digest());
        match lookup(&root, "unet", &other_gpu) {
            Lookup::Stale { changed } => {
                assert_eq!(changed, vec!["gpu: NVIDIA H100 80GB HBM3 (sm_90) -> NVIDIA A100-SXM4-80GB (sm_80)"])
            }
            other => panic!("{other:?}"),
        }
        let mut changed_graph = unet.clone();
        changed_graph.sha256 = Some("bb".into());
        let new_graph = key.clone().with("graph", CacheKey::graph_digest(&changed_graph));
        assert_ne!(new_graph.digest(), key.digest());
        assert!(
            matches!(lookup(&root, "unet", &new_graph), Lookup::Stale { changed } if changed[0].starts_with("graph: "))
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
