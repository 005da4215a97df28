//! `manifest.json`, the one contract between the exporter and the runtime (docs/manifest.md).
//!
//! Loading a manifest checks everything that can be checked without running a graph: the format
//! version, that every path stays inside the graph set, that the files exist (and, on request, match
//! their checksums), and that adapters and residual slots agree with each other. Agreement with the
//! graphs' real inputs and outputs is checked by [`GraphSpec::check_io`] once a backend has loaded them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tokenizer::BuiltinTokenizer;

/// The manifest format this runtime writes and reads. Version 4 adds built-in tokenizers; version
/// 3 (a tokenizer file for every encoder) is the same otherwise; version 2 (before graph roles had
/// batch rules and sets had a VAE encoder) is read too: its batch rules are the roles' defaults,
/// and without a `vae_encoder` it serves txt2img only.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest manifest format this runtime reads.
pub const OLDEST_FORMAT_VERSION: u32 = 2;
/// The manifest's file name inside a graph set.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A parsed and checked `manifest.json`, with the graph-set directory it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Model family: `sd1`, `sd2` or `sdxl`. Informational: everything the runtime does follows from
    /// the fields below, never from this label.
    pub family: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub exporter: BTreeMap<String, serde_json::Value>,
    #[serde(default = "default_precision")]
    pub precision: String,
    /// The text encoders, run in this order on the same prompt; their `hidden_output`s are
    /// concatenated on the last axis into the UNet's `encoder_hidden_states`.
    pub text_encoders: Vec<TextEncoderSpec>,
    /// diffusers' `force_zeros_for_empty_prompt` (SDXL): with guidance and no negative prompt, the
    /// unconditional embeddings (hidden and pooled) are zeros instead of the encoded empty prompt.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
    /// Extra UNet conditioning (diffusers' `added_cond_kwargs`); empty for SD 1.x/2.x.
    #[serde(default)]
    pub added_cond: AddedCond,
    pub latent: LatentSpec,
    /// Image width and height must be multiples of this.
    pub size_multiple: u32,
    /// `[width, height]` used when a request names no size.
    pub default_size: [u32; 2],
    pub vae: VaeSpec,
    /// The checkpoint's scheduler config, verbatim.
    pub scheduler: serde_json::Value,
    /// The UNet's adapter-residual inputs, in diffusers' `down_intrablock_additional_residuals` order.
    pub residual_slots: Vec<ResidualSlot>,
    pub graphs: Graphs,
    #[serde(default)]
    pub adapters: Vec<AdapterSpec>,
    /// The UNet's ControlNet-residual inputs, in diffusers' `down_block_res_samples` order, the
    /// mid-block residual (`mid_block_additional_residual`) last. Empty in sets without ControlNets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control_slots: Vec<ResidualSlot>,
    /// The set's ControlNets (per-step conditioners); their outputs feed [`Manifest::control_slots`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnets: Vec<ControlNetSpec>,
    /// The set's IP-Adapter (a once-per-request image conditioner); absent in sets exported
    /// without `--ip-adapter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter: Option<IpAdapterSpec>,
    /// The set's TencentARC style adapter (a once-per-request conditioner that lengthens the UNet's
    /// text context); absent in sets exported without `--style-adapter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_adapter: Option<StyleAdapterSpec>,
    /// The directory the manifest was loaded from; every path above is relative to it.
    #[serde(skip)]
    pub dir: PathBuf,
}

fn default_precision() -> String {
    "fp32".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// The tokenizer file in the graph set; absent when `builtin` names one instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Of `file`'s bytes; with `builtin`, of the tokenizer JSON text the builtin stands for.
    #[serde(default)]
    pub sha256: Option<String>,
    /// A tokenizer built into the runtime (format 4): the exporter names one when the
    /// checkpoint's tokenizer is, byte for byte, that builtin's JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinTokenizer>,
    /// Token sequences are truncated and padded to exactly this length.
    pub max_length: usize,
    pub pad_token_id: u32,
}

/// Where a [`TokenizerSpec`]'s tokenizer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerSource<'a> {
    /// A file of the graph set (relative to it).
    File(&'a str),
    /// One built into the runtime.
    Builtin(BuiltinTokenizer),
}

impl TokenizerSpec {
    /// The file or the builtin; an entry with both or neither is an error (said without the
    /// encoder's name, which the caller adds).
    pub fn source(&self) -> std::result::Result<TokenizerSource<'_>, String> {
        match (&self.file, self.builtin) {
            (Some(file), None) => Ok(TokenizerSource::File(file)),
            (None, Some(builtin)) => Ok(TokenizerSource::Builtin(builtin)),
            (None, None) => Err("names neither a file nor a builtin".into()),
            (Some(file), Some(builtin)) => Err(format!(
                "names both a file ({file:?}) and the builtin {:?}; re-export the graph set",
                builtin.as_str()
            )),
        }
    }
}

/// One text encoder: its tokenizer, its graph and which of the graph's outputs are used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextEncoderSpec {
    /// Graph name (`text_encoder`, `text_encoder_2`).
    pub name: String,
    pub tokenizer: TokenizerSpec,
    /// The output concatenated into `encoder_hidden_states` (`last_hidden_state` or
    /// `penultimate_hidden_state`).
    pub hidden_output: String,
    /// The pooled projection output (`text_embeds`), if the UNet takes it.
    #[serde(default)]
    pub pooled_output: Option<String>,
    pub graph: GraphSpec,
}

/// The UNet's added conditioning inputs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AddedCond {
    /// Feed UNet input `text_embeds` with this encoder's `pooled_output`.
    #[serde(default)]
    pub text_embeds: Option<String>,
    /// Feed UNet input `time_ids` [batch, 2 × len] with these (a, b) pairs, in this order; the only
    /// order the runtime knows is [`TIME_IDS`] (diffusers' `_get_add_time_ids`).
    #[serde(default)]
    pub time_ids: Option<Vec<String>>,
}

/// SDXL's size and crop conditioning, in diffusers' `add_time_ids` order: (height, width),
/// (top, left), (height, width).
pub const TIME_IDS: [&str; 3] = ["original_size", "crops_coords_top_left", "target_size"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatentSpec {
    pub channels: usize,
    /// Image size = latent size × downscale.
    pub downscale: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeSpec {
    /// Latents are divided by this before decoding.
    pub scaling_factor: f64,
    /// The decoder graph's compute precision (`fp32` or `fp16`); its inputs and outputs are float32
    /// either way. Informational for the CPU backends; lets GPU deployments pick a set.
    #[serde(default = "default_precision")]
    pub precision: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResidualSlot {
    /// The UNet input fed by this slot.
    pub input: String,
    pub channels: usize,
    /// Spatial downscale relative to the latent.
    pub downscale: u32,
}

/// The set's single graphs, each under its role's name (`"unet"`, `"vae_decoder"`,
/// `"vae_encoder"`). Text encoders and adapters, of which a set has several, are listed with their
/// own settings in [`Manifest::text_encoders`] and [`Manifest::adapters`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Graphs {
    pub unet: GraphSpec,
    pub vae_decoder: GraphSpec,
    /// Image → latent distribution (img2img, inpainting): input `image` in [-1, 1], outputs
    /// `latent_mean` and `latent_std`. Absent in sets exported before format 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_encoder: Option<GraphSpec>,
}

/// What a graph does in the pipeline. The manifest declares every graph under its role, and the
/// runtime finds graphs by role ([`Manifest::set_graphs`]), never by file or display name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Prompt token ids → hidden states (and SDXL's pooled embedding); one per text encoder.
    TextEncoder,
    /// A T2I-Adapter: condition image → residual features, once per request.
    Adapter,
    /// A ControlNet: noisy latents, text and a control image → UNet residuals, at every step.
    ControlNet,
    /// The denoiser, called at every step.
    Unet,
    /// Latents → image.
    VaeDecoder,
    /// Image → latent distribution (img2img, inpainting).
    VaeEncoder,
    /// The IP-Adapter's CLIP image encoder: `pixel_values` → `image_embeds`, once per request.
    ImageEncoder,
    /// The IP-Adapter's image projection: `image_embeds` → the UNet's image tokens.
    ImageProjection,
    /// The style adapter's CLIP vision encoder: `pixel_values` → `last_hidden_state`, per request.
    StyleEncoder,
    /// The style adapter: `last_hidden_state` → `style_tokens`, appended to the text context.
    StyleAdapter,
}

impl Role {
    /// How the pipeline batches a graph of this role when the manifest does not say (format 2).
    pub fn default_batch(self) -> BatchRule {
        match self {
            Role::TextEncoder => BatchRule::Prompts,
            Role::Adapter | Role::VaeEncoder => BatchRule::One,
            Role::Unet | Role::ControlNet => BatchRule::GuidedSamples,
            Role::VaeDecoder => BatchRule::Samples,
            Role::ImageEncoder | Role::ImageProjection | Role::StyleEncoder | Role::StyleAdapter => BatchRule::Images,
        }
    }
}

/// How many rows the pipeline calls a graph with for `n` images per request (the manifest's
/// per-graph `batch`); TensorRT profiles are built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchRule {
    /// Text encoders: the prompt, and the negative prompt with guidance (1 or 2 rows, any `n`).
    Prompts,
    /// Adapters and the VAE encoder: one image per request.
    One,
    /// UNet: `n` rows, twice that with classifier-free guidance.
    GuidedSamples,
    /// VAE decoder: `n` rows.
    Samples,
    /// IP-Adapter graphs: one row per image row, `[negative, positive]` with guidance, `[positive]`
    /// without (1 or 2 rows, any `n`).
    Images,
}

/// One graph of a set as the pipeline addresses it: its role, a display name unique in the set
/// (`text_encoder_2`, `unet`, `adapter_sketch`; used in errors and engine-cache paths), its spec,
/// and its batch rule.
#[derive(Debug, Clone, Copy)]
pub struct SetGraph<'a> {
    pub role: Role,
    /// For text encoders, adapters and ControlNets, the name inside the role (`text_encoder_2`,
    /// `sketch`, `canny`).
    pub key: &'a str,
    pub spec: &'a GraphSpec,
}

impl SetGraph<'_> {
    /// The display name: `adapter_NAME` for adapters, `controlnet_NAME` for ControlNets, the
    /// role's or encoder's name otherwise.
    pub fn name(&self) -> String {
        match self.role {
            Role::Adapter => format!("adapter_{}", self.key),
            Role::ControlNet => format!("controlnet_{}", self.key),
            Role::ImageEncoder | Role::ImageProjection => format!("ip_adapter_{}", self.key),
            _ => self.key.to_string(),
        }
    }

    /// The manifest's batch rule, or the role's default.
    pub fn batch(&self) -> BatchRule {
        self.spec.batch.unwrap_or(self.role.default_batch())
    }
}

/// How an adapter wants its condition image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionChannels {
    /// Three channels, like PIL's `convert("RGB")`.
    Rgb,
    /// One channel, like PIL's `convert("L")`.
    Gray,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub name: String,
    #[serde(default)]
    pub adapter_type: String,
    pub condition: ConditionChannels,
    pub in_channels: usize,
    /// Image width and height must be multiples of this (`T2IAdapter.total_downscale_factor`).
    pub downscale_factor: u32,
    /// Feature `i` of this adapter feeds `residual_slots[i]`.
    pub residual_slots: Vec<usize>,
    pub graph: GraphSpec,
}

/// One ControlNet (diffusers' `ControlNetModel`), exported as a graph with inputs `sample`,
/// `timestep`, `encoder_hidden_states` (SDXL: also `text_embeds`, `time_ids`), `controlnet_cond`
/// [b, 3, H, W] in [0, 1] and `scales` [slots], and one output per control slot, named like the
/// UNet input it feeds: the residuals at `conditioning_scale = 1`, output `i` times `scales[i]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlNetSpec {
    pub name: String,
    /// Channels of the control image (3: RGB, diffusers' `control_image_processor`).
    pub conditioning_channels: usize,
    /// diffusers' guess-mode scales, `torch.logspace(-1, 0, slots)` as float32, one per control
    /// slot (the mid-block residual's last).
    pub guess_mode_scales: Vec<f32>,
    pub graph: GraphSpec,
}

/// One h94-layout IP-Adapter (diffusers' `load_ip_adapter` semantics; docs/manifest.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpAdapterSpec {
    pub kind: IpAdapterKind,
    /// Image tokens per image (the projection's second output dimension).
    pub num_tokens: usize,
    /// What `image_encoder` computes (informational: the graph output is `image_embeds` either way).
    pub image_encoder_output: String,
    /// What the guidance row's image embedding is.
    pub negative: IpNegative,
    /// How the image becomes `pixel_values` (transformers' `CLIPImageProcessor`).
    pub preprocess: IpPreprocess,
    /// The UNet inputs the image tokens and the scale feed.
    pub unet_inputs: IpUnetInputs,
    /// `pixel_values` [b, 3, H, W] → `image_embeds`.
    pub image_encoder: GraphSpec,
    /// `image_embeds` → `ip_tokens` [b, num_tokens, cross_attention_dim].
    pub image_projection: GraphSpec,
}

/// Which image projection an IP-Adapter has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpAdapterKind {
    /// diffusers' `ImageProjection` on the projected CLIP embedding.
    Plain,
    /// IP-Adapter Plus: a Resampler on the penultimate hidden states.
    Plus,
}

/// The image embedding of the guidance (unconditional) row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpNegative {
    /// Zeros in place of the image encoder's output (plain IP-Adapters).
    ZeroEmbeds,
    /// The image encoder run on all-zero `pixel_values` (Plus).
    ZeroPixelValues,
}

/// `CLIPImageProcessor`'s steps as the manifest states them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpPreprocess {
    pub convert_rgb: bool,
    /// Resize so the shorter side is this; `None`: no resize.
    pub shortest_edge: Option<u32>,
    /// Pillow filter name: `bicubic` or `lanczos`.
    pub resample: String,
    /// Center crop `[width, height]`; `None`: none.
    pub crop: Option<[u32; 2]>,
    pub rescale_factor: f64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// The lengths a symbolic context axis takes (TensorRT profiles): [`Manifest::context_range`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextRange {
    /// The symbolic dimension's name (`context_length`).
    pub dim: String,
    pub min: i64,
    pub opt: i64,
    pub max: i64,
}

/// TencentARC's T2I style adapter (its original code's semantics; docs/manifest.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StyleAdapterSpec {
    /// Style tokens per style image (the adapter output's second dimension).
    pub num_tokens: usize,
    /// The most style images a request may use: the negative context pads itself with its own last
    /// `num_tokens × images` tokens, so at most text length / `num_tokens`.
    pub max_images: usize,
    /// Where and how the tokens join the UNet's context.
    pub context: StyleContext,
    /// How a style image becomes `pixel_values` (as the IP-Adapter's).
    pub preprocess: IpPreprocess,
    /// `pixel_values` [b, 3, H, W] → `last_hidden_state` [b, L, W].
    pub style_encoder: GraphSpec,
    /// `last_hidden_state` → `style_tokens` [b, num_tokens, cross_attention_dim].
    pub style_adapter: GraphSpec,
}

/// How style tokens extend the UNet's text context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StyleContext {
    /// The UNet input the tokens join (`encoder_hidden_states`).
    pub unet_input: String,
    /// The symbolic name of that input's token axis (text + style tokens).
    pub sequence_dim: String,
    pub append: StyleAppend,
    pub negative_padding: StyleNegativePadding,
}

/// What is appended to the conditional context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StyleAppend {
    /// Each image's tokens times its weight, concatenated in request order.
    WeightedTokens,
}

/// What pads the unconditional context to the conditional one's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StyleNegativePadding {
    /// Its own last P tokens (`uncond[:, -P:]`), P the style tokens appended.
    OwnLastTokens,
}

/// The UNet graph's IP-Adapter inputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpUnetInputs {
    /// `[batch, num_tokens, cross_attention_dim]`, rows like the UNet's.
    pub tokens: String,
    /// `[1]`: 0 is exactly no IP-Adapter.
    pub scale: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphSpec {
    pub file: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub external_data: Vec<FileSpec>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Compute precision (`fp32` or `fp16`); the graph's inputs and outputs are float32 either way
    /// (casts inside the graph). Absent in sets exported before per-graph precision: fp32.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// How the pipeline batches this graph; absent (format 2): its role's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchRule>,
    /// The same graph in other precisions, by name: `int8`, written by `python -m t2i_export
    /// calibrate` and run with `--precision int8`. Same inputs and outputs. Absent: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, GraphVariant>,
}

/// A graph's variant in another precision: its files, and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphVariant {
    pub file: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub external_data: Vec<FileSpec>,
    /// What the exporter recorded: format, types, calibration, the layers kept in float and the
    /// error measured. Informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileSpec {
    pub file: String,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// One graph input or output as the manifest declares it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

/// Element types graphs may use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
    Float16,
    Int64,
    Int32,
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
        })
    }
}

/// A fixed or symbolic dimension.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// A graph's real input or output, as a backend reports it after loading.
#[derive(Debug, Clone, PartialEq)]
pub struct RealTensor {
    pub name: String,
    /// `None` when the backend cannot tell before a run (tract's outputs) or reports a type the
    /// runtime does not use. Inputs must have a known, matching type; outputs are checked when known
    /// and again when a run returns them.
    pub dtype: Option<DType>,
    /// `None` when the rank is unknown before a run (tract's outputs); inside, `None` for a
    /// dimension the graph leaves dynamic.
    pub dims: Option<Vec<Option<i64>>>,
}

impl Manifest {
    /// Reads `dir/manifest.json` and checks it (see the module docs). With `verify_checksums`, every
    /// file is hashed and compared with the manifest's sha256 (seconds for a multi-GB UNet).
    pub fn load(dir: &Path, verify_checksums: bool) -> Result<Manifest> {
        let err = |message: String| Error::GraphSet { dir: dir.to_path_buf(), message };
        if !dir.is_dir() {
            return Err(err(
                "not a directory; pass the folder written by `python -m t2i_export` (it holds manifest.json)".into(),
            ));
        }
        let path = dir.join(MANIFEST_FILE);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size > MAX_MANIFEST_BYTES {
            return Err(err(format!(
                "{MANIFEST_FILE} is {size} bytes; a manifest is a few kilobytes (at most {MAX_MANIFEST_BYTES}), re-export the graph set"
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            err(format!("cannot read {MANIFEST_FILE} ({e}); is this a graph set written by `python -m t2i_export`?"))
        })?;
        let manifest = Manifest::parse(&text, dir)?;
        for file in manifest.files() {
            let path = manifest.resolve(file.file)?;
            if !path.is_file() {
                return Err(err(format!(
                    "{} is listed in the manifest but missing; re-export the graph set",
                    file.file
                )));
            }
            if verify_checksums {
                if let Some(expected) = file.sha256 {
                    let actual = sha256_file(&path)?;
                    if !actual.eq_ignore_ascii_case(expected) {
                        return Err(err(format!(
                            "{} does not match its manifest checksum (the file changed or is truncated); re-export the graph set",
                            file.file
                        )));
                    }
                }
            }
        }
        Ok(manifest)
    }

    /// Parses and checks the text of a `manifest.json` for a graph set in `dir`, without touching
    /// the files it names: format version, consistency between its parts, and the bounds on its
    /// sizes ([`MANIFEST_BOUNDS`]). [`load`](Self::load) adds the file checks.
    pub fn parse(text: &str, dir: &Path) -> Result<Manifest> {
        let err = |message: String| Error::GraphSet { dir: dir.to_path_buf(), message };
        let mut manifest: Manifest = serde_json::from_str(text)
            .map_err(|e| err(format!("{MANIFEST_FILE} is malformed: {e}; re-export the graph set")))?;
        manifest.dir = dir.to_path_buf();
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(err(format!(
                "manifest format_version {} but this runtime reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}; \
                 re-export with a matching t2i_export",
                manifest.format_version
            )));
        }
        manifest.check_consistency().map_err(err)?;
        Ok(manifest)
    }

    /// Every file the manifest names, with its expected checksum.
    pub fn files(&self) -> Vec<FileRef<'_>> {
        let mut files: Vec<FileRef<'_>> = Vec::new();
        for tokenizer in self.text_encoders.iter().map(|e| &e.tokenizer) {
            if let Some(file) = &tokenizer.file {
                if !files.iter().any(|f| f.file == file) {
                    files.push(FileRef { file, sha256: tokenizer.sha256.as_deref() });
                }
            }
        }
        for graph in self.set_graphs() {
            let variants = graph.spec.variants.values().map(|v| (&v.file, &v.sha256, &v.external_data));
            for (file, sha256, external_data) in
                std::iter::once((&graph.spec.file, &graph.spec.sha256, &graph.spec.external_data)).chain(variants)
            {
                files.push(FileRef { file, sha256: sha256.as_deref() });
                for data in external_data {
                    files.push(FileRef { file: &data.file, sha256: data.sha256.as_deref() });
                }
            }
        }
        files
    }

    /// The set as it runs in `precision` (`int8`): every graph with a variant of that name takes
    /// the variant's files and precision. Refused when no graph has one.
    pub fn with_variant(mut self, precision: &str) -> Result<Manifest> {
        let mut chosen = 0;
        for spec in self.graph_specs_mut() {
            if let Some(variant) = spec.variants.get(precision).cloned() {
                spec.file = variant.file;
                spec.sha256 = variant.sha256;
                spec.external_data = variant.external_data;
                spec.precision = precision.to_string();
                chosen += 1;
            }
        }
        if chosen == 0 {
            return Err(Error::GraphSet {
                dir: self.dir.clone(),
                message: format!(
                    "has no {precision} graphs; make a set that has them with `python -m t2i_export calibrate --graphs \
                     {dir} --out {dir}-{precision}`, or run in f32",
                    dir = self.dir.display()
                ),
            });
        }
        Ok(self)
    }

    /// Checks that every `precision` variant of the set is one TensorRT can build from: Q/DQ with
    /// zero point 0 (`python -m t2i_export calibrate --activations int8` records
    /// `tensorrt_explicit_quantization: true`). The CPU default, uint8 activations, is not.
    pub fn check_tensorrt_variants(&self, precision: &str) -> Result<()> {
        for g in self.set_graphs() {
            let Some(variant) = g.spec.variants.get(precision) else { continue };
            let explicit = variant.quantization.as_ref().and_then(|q| q.get("tensorrt_explicit_quantization"));
            if explicit != Some(&serde_json::Value::Bool(true)) {
                return Err(Error::GraphSet {
                    dir: self.dir.clone(),
                    message: format!(
                        "the {precision} variant of {} ({}) is not made for TensorRT, which takes only Q/DQ with zero \
                         point 0; make a set for ort-trt with `python -m t2i_export calibrate --activations int8`, or \
                         run this one on ort-cpu or openvino",
                        g.name(),
                        variant.file
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every graph spec, mutably, in [`Manifest::set_graphs`] order.
    fn graph_specs_mut(&mut self) -> Vec<&mut GraphSpec> {
        let mut specs: Vec<&mut GraphSpec> = self.text_encoders.iter_mut().map(|e| &mut e.graph).collect();
        specs.push(&mut self.graphs.unet);
        specs.push(&mut self.graphs.vae_decoder);
        specs.extend(self.graphs.vae_encoder.as_mut());
        specs.extend(self.adapters.iter_mut().map(|a| &mut a.graph));
        specs.extend(self.controlnets.iter_mut().map(|c| &mut c.graph));
        if let Some(ip) = &mut self.ip_adapter {
            specs.extend([&mut ip.image_encoder, &mut ip.image_projection]);
        }
        if let Some(style) = &mut self.style_adapter {
            specs.extend([&mut style.style_encoder, &mut style.style_adapter]);
        }
        specs
    }

    /// Every graph of the set, by role: the text encoders in manifest order, the UNet, the VAE
    /// decoder and encoder, the adapters, then the ControlNets, in manifest order, then the
    /// IP-Adapter's image encoder and image projection. The one place (with
    /// [`Manifest::graph_specs_mut`], which must follow it) that knows where each role lives in the
    /// manifest.
    pub fn set_graphs(&self) -> Vec<SetGraph<'_>> {
        let mut graphs: Vec<SetGraph<'_>> = self
            .text_encoders
            .iter()
            .map(|e| SetGraph { role: Role::TextEncoder, key: &e.name, spec: &e.graph })
            .collect();
        graphs.push(SetGraph { role: Role::Unet, key: "unet", spec: &self.graphs.unet });
        graphs.push(SetGraph { role: Role::VaeDecoder, key: "vae_decoder", spec: &self.graphs.vae_decoder });
        if let Some(spec) = &self.graphs.vae_encoder {
            graphs.push(SetGraph { role: Role::VaeEncoder, key: "vae_encoder", spec });
        }
        graphs.extend(self.adapters.iter().map(|a| SetGraph { role: Role::Adapter, key: &a.name, spec: &a.graph }));
        graphs.extend(self.controlnets.iter().map(|c| SetGraph {
            role: Role::ControlNet,
            key: &c.name,
            spec: &c.graph,
        }));
        if let Some(ip) = &self.ip_adapter {
            graphs.push(SetGraph { role: Role::ImageEncoder, key: "image_encoder", spec: &ip.image_encoder });
            graphs.push(SetGraph { role: Role::ImageProjection, key: "image_projection", spec: &ip.image_projection });
        }
        if let Some(style) = &self.style_adapter {
            graphs.push(SetGraph { role: Role::StyleEncoder, key: "style_encoder", spec: &style.style_encoder });
            graphs.push(SetGraph { role: Role::StyleAdapter, key: "style_adapter", spec: &style.style_adapter });
        }
        graphs
    }

    /// The range of the UNet context's symbolic token axis in a set with a style adapter: the text
    /// alone (min), with one style image (opt), with `max_images` (max). `None` without one.
    pub fn context_range(&self) -> Option<ContextRange> {
        let style = self.style_adapter.as_ref()?;
        let text = self.text_encoders.first()?.tokenizer.max_length as i64;
        let tokens = style.num_tokens as i64;
        Some(ContextRange {
            dim: style.context.sequence_dim.clone(),
            min: text,
            opt: text + tokens,
            max: text + tokens * style.max_images as i64,
        })
    }

    /// The channels of the UNet's `sample` input: the latent channels for a plain UNet, `2 × C + 1`
    /// for an inpainting UNet (latents, mask, masked-image latents); `None` if the manifest leaves
    /// the dimension symbolic.
    pub fn unet_sample_channels(&self) -> Option<usize> {
        let sample = self.graphs.unet.inputs.iter().find(|t| t.name == "sample")?;
        match sample.dims.get(1)? {
            Dim::Fixed(c) => usize::try_from(*c).ok(),
            Dim::Symbolic(_) => None,
        }
    }

    /// Whether the UNet is an inpainting UNet (diffusers' 9-channel `in_channels`: latents, mask and
    /// masked-image latents concatenated on the channel axis).
    pub fn inpainting_unet(&self) -> bool {
        self.unet_sample_channels() == Some(2 * self.latent.channels + 1)
    }

    /// The ControlNet called `name`, if the graph set has one.
    pub fn controlnet(&self, name: &str) -> Option<&ControlNetSpec> {
        self.controlnets.iter().find(|c| c.name == name)
    }

    /// The adapter called `name`, if the graph set has one.
    pub fn adapter(&self, name: &str) -> Option<&AdapterSpec> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Resolves a manifest path inside the graph set, refusing any path that could leave it
    /// (absolute, `..`, or a symbolic link pointing outside).
    pub fn resolve(&self, relative: &str) -> Result<PathBuf> {
        let err = |message: String| Error::GraphSet { dir: self.dir.clone(), message };
        let rel = Path::new(relative);
        let plain = !relative.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(err(format!(
                "manifest path {relative:?} leaves the graph set; only plain relative paths are allowed"
            )));
        }
        let path = self.dir.join(rel);
        if let (Ok(real), Ok(root)) = (path.canonicalize(), self.dir.canonicalize()) {
            if !real.starts_with(&root) {
                return Err(err(format!("manifest path {relative:?} is a link that leaves the graph set")));
            }
        }
        Ok(path)
    }

    /// A tokenizer is a file or a builtin, not both; a builtin is the one this runtime holds.
    fn check_tokenizer_source(&self, e: &TextEncoderSpec) -> std::result::Result<(), String> {
        let tokenizer = &e.tokenizer;
        match tokenizer.source().map_err(|why| format!("text encoder {}'s tokenizer {why}", e.name))? {
            TokenizerSource::File(_) => Ok(()),
            TokenizerSource::Builtin(_) if self.format_version < 4 => Err(format!(
                "text encoder {}'s tokenizer is a builtin, which format_version {} cannot have; re-export the graph set",
                e.name, self.format_version
            )),
            TokenizerSource::Builtin(builtin) => match tokenizer.sha256.as_deref() {
                Some(digest) if digest != builtin.json_sha256() => Err(format!(
                    "text encoder {}'s builtin {:?} tokenizer has sha256 {digest}, this runtime's is {}; \
                     use a t2i-rt as recent as the exporter, or re-export the graph set",
                    e.name,
                    builtin.as_str(),
                    builtin.json_sha256()
                )),
                _ => Ok(()),
            },
        }
    }

    /// Text encoders and added conditioning: the outputs named exist, the UNet takes exactly the
    /// added inputs the manifest feeds, and the sequences have one length (they are concatenated).
    fn check_text_conditioning(&self) -> std::result::Result<(), String> {
        let first = self.text_encoders.first().ok_or("the manifest lists no text_encoders")?;
        let length = first.tokenizer.max_length;
        let mut names = std::collections::HashSet::new();
        for e in &self.text_encoders {
            if !names.insert(e.name.as_str()) || ["unet", "vae_decoder", "vae_encoder"].contains(&e.name.as_str()) {
                return Err(format!("text encoder name {:?} is used twice", e.name));
            }
            self.check_tokenizer_source(e)?;
            if e.tokenizer.max_length == 0 || e.tokenizer.max_length != length {
                return Err(format!(
                    "text encoder {} has tokenizer max_length {}, the first has {length}; they must agree and be > 0",
                    e.name, e.tokenizer.max_length
                ));
            }
            for output in std::iter::once(&e.hidden_output).chain(&e.pooled_output) {
                if !e.graph.outputs.iter().any(|o| &o.name == output) {
                    return Err(format!(
                        "text encoder {} names output {output}, which its graph does not have",
                        e.name
                    ));
                }
            }
        }
        let unet_takes = |name: &str| self.graphs.unet.inputs.iter().any(|t| t.name == name);
        match &self.added_cond.text_embeds {
            Some(encoder) => {
                let pooled =
                    self.text_encoders.iter().find(|e| &e.name == encoder).and_then(|e| e.pooled_output.as_ref());
                if pooled.is_none() {
                    return Err(format!(
                        "added_cond.text_embeds names {encoder:?}, which is no text encoder with a pooled_output"
                    ));
                }
                if !unet_takes("text_embeds") {
                    return Err("added_cond.text_embeds is set but the unet graph has no text_embeds input".into());
                }
            }
            None if unet_takes("text_embeds") => {
                return Err("the unet graph takes text_embeds but added_cond.text_embeds names no encoder".into())
            }
            None => {}
        }
        match &self.added_cond.time_ids {
            Some(ids) if ids.iter().map(String::as_str).ne(TIME_IDS) => {
                return Err(format!("added_cond.time_ids is {ids:?}; this runtime builds only {TIME_IDS:?}"))
            }
            Some(_) if !unet_takes("time_ids") => {
                return Err("added_cond.time_ids is set but the unet graph has no time_ids input".into())
            }
            None if unet_takes("time_ids") => {
                return Err("the unet graph takes time_ids but added_cond.time_ids is not set".into())
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the parts of the manifest that must agree with each other.
    fn check_consistency(&self) -> std::result::Result<(), String> {
        self.check_bounds()?;
        self.check_text_conditioning()?;
        if self.size_multiple == 0
            || self.latent.downscale == 0
            || !self.size_multiple.is_multiple_of(self.latent.downscale)
        {
            return Err(format!(
                "size_multiple {} must be a positive multiple of latent.downscale {}",
                self.size_multiple, self.latent.downscale
            ));
        }
        if !(self.vae.scaling_factor.is_finite() && self.vae.scaling_factor > 0.0) {
            return Err(format!("vae.scaling_factor {} must be positive", self.vae.scaling_factor));
        }
        self.check_latent_graphs()?;
        let unet_inputs: Vec<&str> = self.graphs.unet.inputs.iter().map(|t| t.name.as_str()).collect();
        for slot in &self.residual_slots {
            if !unet_inputs.contains(&slot.input.as_str()) {
                return Err(format!("residual slot {} is not an input of the unet graph", slot.input));
            }
        }
        let mut names = std::collections::HashSet::new();
        for adapter in &self.adapters {
            let valid = !adapter.name.is_empty()
                && adapter.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(format!("adapter name {:?} must match [A-Za-z0-9_-]+", adapter.name));
            }
            if !names.insert(adapter.name.as_str()) {
                return Err(format!("adapter name {:?} appears twice", adapter.name));
            }
            let expected_channels = match adapter.condition {
                ConditionChannels::Rgb => 3,
                ConditionChannels::Gray => 1,
            };
            if adapter.in_channels != expected_channels {
                return Err(format!(
                    "adapter {} has condition {:?} but in_channels {}",
                    adapter.name, adapter.condition, adapter.in_channels
                ));
            }
            if adapter.downscale_factor == 0 {
                return Err(format!("adapter {} has downscale_factor 0", adapter.name));
            }
            if adapter.residual_slots.len() != adapter.graph.outputs.len() {
                return Err(format!(
                    "adapter {} has {} outputs but feeds {} residual slots",
                    adapter.name,
                    adapter.graph.outputs.len(),
                    adapter.residual_slots.len()
                ));
            }
            for &slot in &adapter.residual_slots {
                if slot >= self.residual_slots.len() {
                    return Err(format!(
                        "adapter {} feeds residual slot {slot}, but the unet has {}",
                        adapter.name,
                        self.residual_slots.len()
                    ));
                }
            }
        }
        // The style adapter first: it refuses any ControlNet, however well-formed.
        self.check_style_adapter()?;
        self.check_controlnets()?;
        self.check_ip_adapter()
    }

    /// The style adapter: the UNet's context input really has a symbolic token axis (sets without a
    /// style adapter fix it at the text length), the graphs map what the conditioner feeds to what
    /// it reads, and the preprocessing is one this runtime reproduces.
    fn check_style_adapter(&self) -> std::result::Result<(), String> {
        let Some(style) = &self.style_adapter else {
            return Ok(());
        };
        let fix = "re-export the graph set with --style-adapter";
        if !self.controlnets.is_empty() {
            // TencentARC's style adapter never ran beside a ControlNet: which context a ControlNet
            // should see is undefined (the exporter refuses the combination too).
            return Err("a set with a style_adapter cannot have controlnets (the original defines no such \
                        combination); export them as separate sets"
                .into());
        }
        let input = &style.context.unet_input;
        let context = self.graphs.unet.inputs.iter().find(|t| &t.name == input).ok_or_else(|| {
            format!("style_adapter.context.unet_input {input:?} is not an input of the unet graph; {fix}")
        })?;
        if context.dims.len() != 3 || context.dims[1] != Dim::Symbolic(style.context.sequence_dim.clone()) {
            return Err(format!(
                "the unet's {input} input has dims {:?}, expected [batch, {:?}, cross_attention_dim] (a symbolic \
                 token axis for text + style tokens); {fix}",
                context.dims, style.context.sequence_dim
            ));
        }
        if style.num_tokens == 0 || style.num_tokens > 4096 {
            return Err(format!("style_adapter.num_tokens {} must be in 1..=4096; {fix}", style.num_tokens));
        }
        // The negative context pads itself with its own last P tokens, so P may not exceed the text.
        let text = self.text_encoders.first().map_or(0, |e| e.tokenizer.max_length);
        if style.max_images == 0 || style.max_images.saturating_mul(style.num_tokens) > text {
            return Err(format!(
                "style_adapter.max_images {} must be at least 1 and allow at most the text's {text} tokens of \
                 style ({} per image); {fix}",
                style.max_images, style.num_tokens
            ));
        }
        fn has<'a>(tensors: &'a [TensorSpec], name: &str) -> Option<&'a TensorSpec> {
            tensors.iter().find(|t| t.name == name)
        }
        for (graph, spec, input, output) in [
            ("style_encoder", &style.style_encoder, "pixel_values", "last_hidden_state"),
            ("style_adapter", &style.style_adapter, "last_hidden_state", "style_tokens"),
        ] {
            if has(&spec.inputs, input).is_none() || has(&spec.outputs, output).is_none() {
                return Err(format!("the style_adapter {graph} graph must map {input} to {output}; {fix}"));
            }
        }
        let tokens = has(&style.style_adapter.outputs, "style_tokens").map(|t| &t.dims);
        let fits = |dims: &Vec<Dim>| {
            dims.len() == 3
                && !matches!(dims[1], Dim::Fixed(n) if n != style.num_tokens as i64)
                && match (&dims[2], &context.dims[2]) {
                    (Dim::Fixed(a), Dim::Fixed(b)) => a == b,
                    _ => true,
                }
        };
        if !tokens.is_some_and(fits) {
            return Err(format!(
                "the style_adapter graph's style_tokens have dims {:?}, expected [batch, {}, {:?}] like the unet's \
                 context; {fix}",
                tokens, style.num_tokens, context.dims[2]
            ));
        }
        check_preprocess("style_adapter", &style.preprocess)
    }

    /// The IP-Adapter: the UNet takes its named inputs (tokens of `num_tokens` rows, a `[1]`
    /// scale), its graphs have the inputs and outputs the pipeline feeds and reads, and its
    /// preprocessing is one this runtime reproduces.
    fn check_ip_adapter(&self) -> std::result::Result<(), String> {
        let unet = &self.graphs.unet.inputs;
        let Some(ip) = &self.ip_adapter else {
            return Ok(());
        };
        let fix = "re-export the graph set with --ip-adapter";
        let tokens = unet.iter().find(|t| t.name == ip.unet_inputs.tokens).ok_or_else(|| {
            format!(
                "ip_adapter.unet_inputs.tokens {:?} is not an input of the unet graph; {fix}",
                ip.unet_inputs.tokens
            )
        })?;
        let scale = unet.iter().find(|t| t.name == ip.unet_inputs.scale).ok_or_else(|| {
            format!("ip_adapter.unet_inputs.scale {:?} is not an input of the unet graph; {fix}", ip.unet_inputs.scale)
        })?;
        if scale.dims != [Dim::Fixed(1)] {
            return Err(format!("the unet's {} input has dims {:?}, expected [1]; {fix}", scale.name, scale.dims));
        }
        if ip.num_tokens == 0 || ip.num_tokens > 4096 {
            return Err(format!("ip_adapter.num_tokens {} must be in 1..=4096; {fix}", ip.num_tokens));
        }
        if tokens.dims.len() != 3 || matches!(tokens.dims[1], Dim::Fixed(n) if n != ip.num_tokens as i64) {
            return Err(format!(
                "the unet's {} input has dims {:?}, expected [batch, {}, cross_attention_dim]; {fix}",
                tokens.name, tokens.dims, ip.num_tokens
            ));
        }
        let has = |tensors: &[TensorSpec], name: &str| tensors.iter().any(|t| t.name == name);
        for (graph, spec, input, output) in [
            ("image_encoder", &ip.image_encoder, "pixel_values", "image_embeds"),
            ("image_projection", &ip.image_projection, "image_embeds", tokens.name.as_str()),
        ] {
            if !has(&spec.inputs, input) || !has(&spec.outputs, output) {
                return Err(format!("the ip_adapter {graph} graph must map {input} to {output}; {fix}"));
            }
        }
        check_preprocess("ip_adapter", &ip.preprocess)
    }

    /// ControlNets and their slots: valid unique names, slots that are UNet inputs, graphs that
    /// take what the pipeline feeds and give one output per slot, named like it.
    fn check_controlnets(&self) -> std::result::Result<(), String> {
        let unet = &self.graphs.unet.inputs;
        let unet_takes = |name: &str| unet.iter().any(|t| t.name == name);
        let mut inputs = std::collections::HashSet::new();
        for slot in &self.control_slots {
            if !unet_takes(&slot.input) {
                return Err(format!("control slot {} is not an input of the unet graph", slot.input));
            }
            if !inputs.insert(slot.input.as_str()) || self.residual_slots.iter().any(|r| r.input == slot.input) {
                return Err(format!("control slot input {} is used twice; re-export the graph set", slot.input));
            }
        }
        if !self.controlnets.is_empty() && self.control_slots.is_empty() {
            return Err("the manifest lists controlnets but no control_slots; re-export the graph set".into());
        }
        let mut names = std::collections::HashSet::new();
        for net in &self.controlnets {
            let valid =
                !net.name.is_empty() && net.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(format!("controlnet name {:?} must match [A-Za-z0-9_-]+", net.name));
            }
            if !names.insert(net.name.as_str()) {
                return Err(format!("controlnet name {:?} appears twice", net.name));
            }
            if net.conditioning_channels != 3 {
                return Err(format!(
                    "controlnet {} has conditioning_channels {}; this runtime feeds RGB control images (3)",
                    net.name, net.conditioning_channels
                ));
            }
            if net.guess_mode_scales.len() != self.control_slots.len() {
                return Err(format!(
                    "controlnet {} has {} guess_mode_scales but the set has {} control_slots; re-export the graph set",
                    net.name,
                    net.guess_mode_scales.len(),
                    self.control_slots.len()
                ));
            }
            if net.guess_mode_scales.iter().any(|s| !s.is_finite()) {
                return Err(format!("controlnet {} has a guess_mode_scale that is not a number", net.name));
            }
            let takes = |name: &str| net.graph.inputs.iter().any(|t| t.name == name);
            for name in ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "scales"] {
                if !takes(name) {
                    return Err(format!(
                        "the controlnet_{} graph has no {name} input; re-export the graph set",
                        net.name
                    ));
                }
            }
            for name in ["text_embeds", "time_ids"] {
                if takes(name) != unet_takes(name) {
                    return Err(format!(
                        "the controlnet_{} graph {} {name} but the unet {}; re-export the graph set",
                        net.name,
                        if takes(name) { "takes" } else { "does not take" },
                        if unet_takes(name) { "does" } else { "does not" }
                    ));
                }
            }
            let outputs: Vec<&str> = net.graph.outputs.iter().map(|t| t.name.as_str()).collect();
            let slots: Vec<&str> = self.control_slots.iter().map(|s| s.input.as_str()).collect();
            if outputs != slots {
                return Err(format!(
                    "the controlnet_{} graph's outputs ({}) must be the control slots in order ({}); re-export the \
                     graph set",
                    net.name,
                    outputs.join(", "),
                    slots.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Bounds on a manifest's sizes, far above any real model's (SDXL: 4 latent channels, residual
/// channels up to 1280, 77 tokens) and low enough that nothing sized from a manifest can exhaust
/// memory: `(field, maximum)`.
pub const MANIFEST_BOUNDS: [(&str, u64); 7] = [
    ("latent.channels", 64),
    ("latent.downscale", 64),
    ("size_multiple", 1024),
    ("residual_slots[].channels", 16384),
    ("residual_slots[].downscale", 64),
    ("tokenizer.max_length", 4096),
    ("graphs (text encoders + adapters + controlnets)", 256),
];

/// Largest `manifest.json` accepted, in bytes (real ones are under 100 KB).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

impl Manifest {
    /// Every size in the manifest within [`MANIFEST_BOUNDS`] (and at least 1 where 0 is meaningless).
    /// The UNet's `sample` takes the latents (or, for an inpainting UNet, latents + mask +
    /// masked-image latents), and the VAE encoder has the inputs and outputs the pipeline feeds.
    fn check_latent_graphs(&self) -> std::result::Result<(), String> {
        let c = self.latent.channels;
        let has = |tensors: &[TensorSpec], name: &str| tensors.iter().any(|t| t.name == name);
        for name in ["sample", "timestep", "encoder_hidden_states"] {
            if !has(&self.graphs.unet.inputs, name) {
                return Err(format!("the unet graph has no {name} input"));
            }
        }
        match self.unet_sample_channels() {
            Some(s) if s != c && s != 2 * c + 1 => {
                return Err(format!(
                    "the unet's sample input has {s} channels; it must have latent.channels ({c}), or {} for an \
                     inpainting unet",
                    2 * c + 1
                ))
            }
            _ => {}
        }
        if let Some(encoder) = &self.graphs.vae_encoder {
            if !has(&encoder.inputs, "image")
                || !has(&encoder.outputs, "latent_mean")
                || !has(&encoder.outputs, "latent_std")
            {
                return Err("the vae_encoder graph must take `image` and give `latent_mean` and `latent_std`; \
                            re-export the graph set"
                    .into());
            }
        }
        Ok(())
    }

    fn check_bounds(&self) -> std::result::Result<(), String> {
        let within = |field: &str, value: u64| -> std::result::Result<(), String> {
            let max = MANIFEST_BOUNDS.iter().find(|(f, _)| *f == field).map_or(u64::MAX, |(_, m)| *m);
            if value == 0 || value > max {
                return Err(format!("{field} is {value}; it must be between 1 and {max}"));
            }
            Ok(())
        };
        within("latent.channels", self.latent.channels as u64)?;
        within("latent.downscale", self.latent.downscale.into())?;
        within("size_multiple", self.size_multiple.into())?;
        for slot in self.residual_slots.iter().chain(&self.control_slots) {
            within("residual_slots[].channels", slot.channels as u64)?;
            within("residual_slots[].downscale", slot.downscale.into())?;
        }
        for encoder in &self.text_encoders {
            within("tokenizer.max_length", encoder.tokenizer.max_length as u64)?;
        }
        within(
            "graphs (text encoders + adapters + controlnets)",
            (self.text_encoders.len() + self.adapters.len() + self.controlnets.len()).max(1) as u64,
        )?;
        for adapter in &self.adapters {
            if !(1..=1024).contains(&adapter.downscale_factor) {
                return Err(format!(
                    "adapter {} has downscale_factor {}; it must be between 1 and 1024",
                    adapter.name, adapter.downscale_factor
                ));
            }
        }
        let [w, h] = self.default_size;
        if w == 0 || h == 0 || w > 16384 || h > 16384 {
            return Err(format!("default_size {w}x{h} must be between 1 and 16384 on each side"));
        }
        Ok(())
    }
}

/// A file named by the manifest and its expected checksum.
#[derive(Debug, Clone, Copy)]
pub struct FileRef<'a> {
    pub file: &'a str,
    pub sha256: Option<&'a str>,
}

impl GraphSpec {
    /// Checks that a loaded graph's real inputs and outputs are the ones the manifest declares:
    /// same names, element types and ranks, and equal fixed dimensions.
    pub fn check_io(
        &self,
        graph: &str,
        inputs: &[RealTensor],
        outputs: &[RealTensor],
    ) -> std::result::Result<(), String> {
        check_side(graph, "input", &self.inputs, inputs)?;
        check_side(graph, "output", &self.outputs, outputs)
    }
}

fn check_side(
    graph: &str,
    side: &str,
    declared: &[TensorSpec],
    real: &[RealTensor],
) -> std::result::Result<(), String> {
    let mismatch = |what: String| {
        format!("graph {graph} does not match the manifest: {what}; the graph file and manifest.json come from different exports, re-export the graph set")
    };
    for spec in declared {
        let Some(actual) = real.iter().find(|r| r.name == spec.name) else {
            let names: Vec<&str> = real.iter().map(|r| r.name.as_str()).collect();
            return Err(mismatch(format!("{side} {} is missing (the graph has {})", spec.name, names.join(", "))));
        };
        let type_known = actual.dtype.is_some() || side == "input";
        if type_known && actual.dtype != Some(spec.dtype) {
            let real_dtype = actual.dtype.map_or("an unsupported type".to_string(), |d| d.to_string());
            return Err(mismatch(format!("{side} {} is {real_dtype}, manifest says {}", spec.name, spec.dtype)));
        }
        let Some(dims) = &actual.dims else { continue };
        if dims.len() != spec.dims.len() {
            return Err(mismatch(format!(
                "{side} {} has rank {}, manifest says {}",
                spec.name,
                dims.len(),
                spec.dims.len()
            )));
        }
        for (axis, (dim, real_dim)) in spec.dims.iter().zip(dims).enumerate() {
            if let (Dim::Fixed(want), Some(have)) = (dim, real_dim) {
                if want != have {
                    return Err(mismatch(format!("{side} {} axis {axis} is {have}, manifest says {want}", spec.name)));
                }
            }
        }
    }
    if let Some(extra) = real.iter().find(|r| !declared.iter().any(|d| d.name == r.name)) {
        if side == "input" {
            return Err(mismatch(format!("{side} {} is not declared", extra.name)));
        }
    }
    Ok(())
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io_err = |e: std::io::Error| Error::Io { path: path.to_path_buf(), message: e.to_string() };
    let mut file = File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A `CLIPImageProcessor` configuration this runtime reproduces (`owner`: the manifest entry).
fn check_preprocess(owner: &str, pre: &IpPreprocess) -> std::result::Result<(), String> {
    if !["bicubic", "lanczos"].contains(&pre.resample.as_str()) {
        return Err(format!(
            "{owner}.preprocess.resample {:?}: this runtime reproduces bicubic and lanczos",
            pre.resample
        ));
    }
    let zero = pre.shortest_edge == Some(0) || pre.crop.is_some_and(|[w, h]| w == 0 || h == 0);
    if zero || pre.shortest_edge.is_some_and(|e| e > 4096) || pre.crop.is_some_and(|[w, h]| w > 4096 || h > 4096) {
        return Err(format!("{owner}.preprocess sizes {:?} / {:?} must be in 1..=4096", pre.shortest_edge, pre.crop));
    }
    let finite = pre.rescale_factor.is_finite() && pre.mean.iter().chain(&pre.std).all(|v| v.is_finite());
    if !finite || pre.std.contains(&0.0) {
        return Err(format!(
            "{owner}.preprocess has a rescale_factor, mean or std that is not a number (or a zero std)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_in(dir: &Path) -> Manifest {
        Manifest {
            format_version: 1,
            family: "sd1".into(),
            name: String::new(),
            exporter: BTreeMap::new(),
            precision: "fp32".into(),
            text_encoders: vec![TextEncoderSpec {
                name: "text_encoder".into(),
                tokenizer: TokenizerSpec {
                    file: Some("tokenizer.json".into()),
                    sha256: None,
                    builtin: None,
                    max_length: 77,
                    pad_token_id: 0,
                },
                hidden_output: "last_hidden_state".into(),
                pooled_output: None,
                graph: GraphSpec {
                    outputs: vec![TensorSpec { name: "last_hidden_state".into(), dtype: DType::Float32, dims: vec![] }],
                    ..graph("text_encoder.onnx")
                },
            }],
            force_zeros_for_empty_prompt: false,
            added_cond: AddedCond::default(),
            latent: LatentSpec { channels: 4, downscale: 8 },
            size_multiple: 64,
            default_size: [64, 64],
            vae: VaeSpec { scaling_factor: 0.18215, precision: "fp32".into() },
            scheduler: serde_json::json!({}),
            residual_slots: vec![],
            graphs: Graphs { unet: unet(4), vae_decoder: graph("vae_decoder.onnx"), vae_encoder: None },
            adapters: vec![],
            control_slots: vec![],
            controlnets: vec![],
            ip_adapter: None,
            style_adapter: None,
            dir: dir.to_path_buf(),
        }
    }

    fn graph(file: &str) -> GraphSpec {
        GraphSpec {
            file: file.into(),
            sha256: None,
            external_data: vec![],
            inputs: vec![],
            outputs: vec![],
            precision: "fp32".into(),
            batch: None,
            variants: BTreeMap::new(),
        }
    }

    fn tensor(name: &str, dims: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: DType::Float32, dims }
    }

    /// A UNet taking `channels` sample channels.
    fn unet(channels: i64) -> GraphSpec {
        let b = || Dim::Symbolic("batch".into());
        GraphSpec {
            inputs: vec![
                tensor("sample", vec![b(), Dim::Fixed(channels), Dim::Symbolic("h".into()), Dim::Symbolic("w".into())]),
                tensor("timestep", vec![b()]),
                tensor("encoder_hidden_states", vec![b(), Dim::Fixed(77), Dim::Fixed(8)]),
            ],
            ..graph("unet.onnx")
        }
    }

    #[test]
    fn paths_must_stay_inside_the_graph_set() {
        let m = manifest_in(Path::new("/tmp/set"));
        assert!(m.resolve("unet.onnx").is_ok());
        assert!(m.resolve("sub/unet.onnx").is_ok());
        for bad in ["../unet.onnx", "/etc/passwd", "a/../../b", "", "./x/../../y"] {
            assert!(m.resolve(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn io_mismatch_is_reported_with_the_fix() {
        let spec = GraphSpec {
            inputs: vec![TensorSpec {
                name: "sample".into(),
                dtype: DType::Float32,
                dims: vec![Dim::Symbolic("b".into()), Dim::Fixed(4)],
            }],
            ..graph("unet.onnx")
        };
        let ok = [RealTensor { name: "sample".into(), dtype: Some(DType::Float32), dims: Some(vec![None, Some(4)]) }];
        assert!(spec.check_io("unet", &ok, &[]).is_ok());
        let wrong_dim =
            [RealTensor { name: "sample".into(), dtype: Some(DType::Float32), dims: Some(vec![None, Some(8)]) }];
        let message = spec.check_io("unet", &wrong_dim, &[]).unwrap_err();
        assert!(message.contains("axis 1 is 8") && message.contains("re-export"), "{message}");
        let wrong_type =
            [RealTensor { name: "sample".into(), dtype: Some(DType::Int64), dims: Some(vec![None, Some(4)]) }];
        assert!(spec.check_io("unet", &wrong_type, &[]).unwrap_err().contains("int64"));
        assert!(spec.check_io("unet", &[], &[]).unwrap_err().contains("missing"));
    }

    #[test]
    fn adapter_slots_must_exist() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        m.adapters.push(AdapterSpec {
            name: "sketch".into(),
            adapter_type: "full_adapter".into(),
            condition: ConditionChannels::Gray,
            in_channels: 1,
            downscale_factor: 64,
            residual_slots: vec![0],
            graph: GraphSpec {
                outputs: vec![TensorSpec { name: "feature_0".into(), dtype: DType::Float32, dims: vec![] }],
                ..graph("adapter_sketch.onnx")
            },
        });
        assert!(m.check_consistency().unwrap_err().contains("residual slot 0"));
    }

    #[test]
    fn added_conditioning_must_match_the_unet() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        assert!(m.check_consistency().is_ok());
        m.added_cond.time_ids = Some(TIME_IDS.iter().map(|s| s.to_string()).collect());
        assert!(m.check_consistency().unwrap_err().contains("no time_ids input"));
        m.added_cond = AddedCond { text_embeds: Some("text_encoder".into()), time_ids: None };
        assert!(m.check_consistency().unwrap_err().contains("pooled_output"));
        m.added_cond = AddedCond::default();
        m.graphs.unet.inputs.push(TensorSpec { name: "time_ids".into(), dtype: DType::Float32, dims: vec![] });
        assert!(m.check_consistency().unwrap_err().contains("time_ids is not set"));
    }

    #[test]
    fn graphs_are_found_by_role_with_their_batch_rules() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        m.graphs.vae_encoder = Some(GraphSpec { batch: Some(BatchRule::One), ..graph("vae_encoder.onnx") });
        let roles: Vec<(Role, String, BatchRule)> =
            m.set_graphs().iter().map(|g| (g.role, g.name(), g.batch())).collect();
        assert_eq!(
            roles,
            [
                (Role::TextEncoder, "text_encoder".to_string(), BatchRule::Prompts),
                (Role::Unet, "unet".to_string(), BatchRule::GuidedSamples),
                (Role::VaeDecoder, "vae_decoder".to_string(), BatchRule::Samples),
                (Role::VaeEncoder, "vae_encoder".to_string(), BatchRule::One),
            ]
        );
    }

    #[test]
    fn a_precision_variant_takes_the_place_of_its_graph() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        with_controlnet(&mut m);
        let variant = |file: &str| GraphVariant {
            file: file.into(),
            sha256: Some("bb".into()),
            external_data: vec![FileSpec { file: format!("{file}.data"), sha256: None }],
            quantization: None,
        };
        m.graphs.unet.variants.insert("int8".into(), variant("unet.int8.onnx"));
        m.controlnets[0].graph.variants.insert("int8".into(), variant("controlnet_canny.int8.onnx"));
        // Loading checks the variants' files like every other.
        let files: Vec<&str> = m.files().iter().map(|f| f.file).collect();
        for file in ["unet.onnx", "unet.int8.onnx", "unet.int8.onnx.data", "controlnet_canny.int8.onnx"] {
            assert!(files.contains(&file), "{file} not in {files:?}");
        }
        let mut outside = m.clone();
        outside.graphs.unet.variants.get_mut("int8").unwrap().file = "../unet.int8.onnx".into();
        assert!(outside.files().iter().any(|f| outside.resolve(f.file).is_err()));

        let int8 = m.clone().with_variant("int8").unwrap();
        let chosen: Vec<(String, &str, &str)> =
            int8.set_graphs().iter().map(|g| (g.name(), g.spec.file.as_str(), g.spec.precision.as_str())).collect();
        assert_eq!(
            chosen,
            [
                ("text_encoder".to_string(), "text_encoder.onnx", "fp32"),
                ("unet".to_string(), "unet.int8.onnx", "int8"),
                ("vae_decoder".to_string(), "vae_decoder.onnx", "fp32"),
                ("controlnet_canny".to_string(), "controlnet_canny.int8.onnx", "int8"),
            ]
        );
        assert_eq!(int8.graphs.unet.sha256.as_deref(), Some("bb"));
        assert_eq!(int8.graphs.unet.external_data[0].file, "unet.int8.onnx.data");

        // TensorRT takes only the variants made for it.
        let refused = m.check_tensorrt_variants("int8").unwrap_err().to_string();
        assert!(refused.contains("--activations int8"), "{refused}");
        let mut for_trt = m.clone();
        for spec in [&mut for_trt.graphs.unet, &mut for_trt.controlnets[0].graph] {
            spec.variants.get_mut("int8").unwrap().quantization =
                Some(serde_json::json!({"tensorrt_explicit_quantization": true}));
        }
        for_trt.check_tensorrt_variants("int8").unwrap();

        let plain = manifest_in(Path::new("/tmp/set"));
        let refused = plain.with_variant("int8").unwrap_err().to_string();
        assert!(refused.contains("has no int8 graphs") && refused.contains("t2i_export calibrate"), "{refused}");
    }

    /// A UNet with control inputs and a ControlNet that feeds them.
    fn with_controlnet(m: &mut Manifest) {
        let slots = ["control_down_0", "control_mid"];
        m.control_slots =
            slots.iter().map(|s| ResidualSlot { input: s.to_string(), channels: 8, downscale: 1 }).collect();
        m.graphs.unet.inputs.extend(slots.iter().map(|s| tensor(s, vec![])));
        m.controlnets.push(ControlNetSpec {
            name: "canny".into(),
            conditioning_channels: 3,
            guess_mode_scales: vec![0.1, 1.0],
            graph: GraphSpec {
                inputs: ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "scales"]
                    .iter()
                    .map(|n| tensor(n, vec![]))
                    .collect(),
                outputs: slots.iter().map(|s| tensor(s, vec![])).collect(),
                ..graph("controlnet_canny.onnx")
            },
        });
    }

    #[test]
    fn controlnets_are_checked_against_their_slots() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        with_controlnet(&mut m);
        assert!(m.check_consistency().is_ok());
        let g = m.set_graphs().into_iter().find(|g| g.role == Role::ControlNet).unwrap();
        assert_eq!((g.name(), g.batch()), ("controlnet_canny".to_string(), BatchRule::GuidedSamples));
        assert!(m.files().iter().any(|f| f.file == "controlnet_canny.onnx"));
        type Break = fn(&mut Manifest);
        let broken: [(&str, Break); 7] = [
            ("no control_slots", |m| m.control_slots.clear()),
            ("2 control_slots", |m| m.controlnets[0].guess_mode_scales.push(1.0)),
            ("must match [A-Za-z0-9_-]+", |m| m.controlnets[0].name = "../x".into()),
            ("appears twice", |m| m.controlnets.push(m.controlnets[0].clone())),
            ("no controlnet_cond input", |m| m.controlnets[0].graph.inputs.retain(|t| t.name != "controlnet_cond")),
            ("must be the control slots in order", |m| m.controlnets[0].graph.outputs.reverse()),
            ("is not an input of the unet", |m| m.graphs.unet.inputs.retain(|t| t.name != "control_mid")),
        ];
        for (expect, breaks) in broken {
            let mut m = m.clone();
            breaks(&mut m);
            let message = m.check_consistency().unwrap_err();
            assert!(message.contains(expect), "{expect}: {message}");
        }
        let mut outside = m.clone();
        outside.controlnets[0].graph.file = "../controlnet.onnx".into();
        assert!(outside.files().iter().any(|f| outside.resolve(f.file).is_err()));
    }

    #[test]
    fn unet_sample_channels_decide_inpainting() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        assert!(!m.inpainting_unet());
        m.graphs.unet = unet(9);
        assert!(m.inpainting_unet());
        assert!(m.check_consistency().is_ok());
        m.graphs.unet = unet(5);
        assert!(m.check_consistency().unwrap_err().contains("5 channels"));
    }

    #[test]
    fn the_vae_encoder_must_give_the_latent_distribution() {
        let mut m = manifest_in(Path::new("/tmp/set"));
        m.graphs.vae_encoder = Some(GraphSpec {
            inputs: vec![tensor("image", vec![])],
            outputs: vec![tensor("latent_mean", vec![])],
            ..graph("vae_encoder.onnx")
        });
        assert!(m.check_consistency().unwrap_err().contains("latent_std"));
        if let Some(e) = m.graphs.vae_encoder.as_mut() {
            e.outputs.push(tensor("latent_std", vec![]));
        }
        assert!(m.check_consistency().is_ok());
    }

    /// The committed IP-Adapter set's manifest, and what its checks refuse.
    #[test]
    fn ip_adapter_entries_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/generated/tiny-sd1-ip");
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE))
            .expect("graphs/generated/tiny-sd1-ip is generated, not committed: run bash scripts/generate-sets.sh");
        let m = Manifest::parse(&text, &dir).unwrap();
        let ip = m.ip_adapter.as_ref().unwrap();
        assert_eq!((ip.kind, ip.negative, ip.num_tokens), (IpAdapterKind::Plain, IpNegative::ZeroEmbeds, 4));
        assert_eq!(ip.preprocess.crop, Some([224, 224]));
        let names: Vec<String> = m.set_graphs().iter().map(|g| g.name()).collect();
        assert!(names.ends_with(&["ip_adapter_image_encoder".into(), "ip_adapter_image_projection".into()]));
        assert!(m.set_graphs().iter().rev().take(2).all(|g| g.batch() == BatchRule::Images));
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
            edit(&mut json);
            Manifest::parse(&json.to_string(), &dir).unwrap_err().to_string()
        };
        let e = refused(&|j| j["ip_adapter"]["unet_inputs"]["tokens"] = "nope".into());
        assert!(e.contains("\"nope\" is not an input of the unet graph"), "{e}");
        let e = refused(&|j| j["ip_adapter"]["num_tokens"] = 16.into());
        assert!(e.contains("expected [batch, 16, cross_attention_dim]"), "{e}");
        let e = refused(&|j| j["ip_adapter"]["image_encoder"]["outputs"][0]["name"] = "x".into());
        assert!(e.contains("image_encoder graph must map pixel_values to image_embeds"), "{e}");
        let e = refused(&|j| j["ip_adapter"]["preprocess"]["resample"] = "nearest".into());
        assert!(e.contains("bicubic and lanczos"), "{e}");
        let e = refused(&|j| j["ip_adapter"]["negative"] = "zero".into());
        assert!(e.contains("malformed"), "{e}");
        // Paths are resolved inside the set like every graph's.
        let mut outside = m.clone();
        outside.ip_adapter.as_mut().unwrap().image_encoder.file = "../tiny-sd1/unet.onnx".into();
        assert!(outside.files().iter().any(|f| outside.resolve(f.file).is_err()));
        // Without the entry nothing changes.
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("ip_adapter");
        json["graphs"]["unet"]["inputs"]
            .as_array_mut()
            .unwrap()
            .retain(|t| !t["name"].as_str().unwrap().starts_with("ip_"));
        assert!(Manifest::parse(&json.to_string(), &dir).unwrap().ip_adapter.is_none());
    }

    /// The committed style-adapter set's manifest, and what its checks refuse.
    #[test]
    fn style_adapter_entries_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/generated/tiny-sd1-style");
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE))
            .expect("graphs/generated/tiny-sd1-style is generated, not committed: run bash scripts/generate-sets.sh");
        let m = Manifest::parse(&text, &dir).unwrap();
        let style = m.style_adapter.as_ref().unwrap();
        assert_eq!((style.num_tokens, style.max_images), (8, 9));
        assert_eq!(style.context.sequence_dim, "context_length");
        assert_eq!(style.preprocess.crop, Some([224, 224]));
        let names: Vec<String> = m.set_graphs().iter().map(|g| g.name()).collect();
        assert!(names.ends_with(&["style_encoder".into(), "style_adapter".into()]));
        assert!(m.set_graphs().iter().rev().take(2).all(|g| g.batch() == BatchRule::Images));
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
            edit(&mut json);
            Manifest::parse(&json.to_string(), &dir).unwrap_err().to_string()
        };
        let e = refused(&|j| j["style_adapter"]["context"]["unet_input"] = "nope".into());
        assert!(e.contains("\"nope\" is not an input of the unet graph"), "{e}");
        // A fixed 77-token context cannot take the style tokens.
        let e = refused(&|j| j["graphs"]["unet"]["inputs"][2]["dims"][1] = 77.into());
        assert!(e.contains("symbolic token axis"), "{e}");
        let e = refused(&|j| j["style_adapter"]["num_tokens"] = 4.into());
        assert!(e.contains("expected [batch, 4,"), "{e}");
        let e = refused(&|j| j["style_adapter"]["max_images"] = 0.into());
        assert!(e.contains("max_images 0"), "{e}");
        let e = refused(&|j| j["style_adapter"]["max_images"] = 10.into());
        assert!(e.contains("at most the text's 77 tokens"), "{e}");
        let range = m.context_range().unwrap();
        assert_eq!((range.dim.as_str(), range.min, range.opt, range.max), ("context_length", 77, 85, 149));
        let e = refused(&|j| j["style_adapter"]["style_encoder"]["outputs"][0]["name"] = "x".into());
        assert!(e.contains("style_encoder graph must map pixel_values to last_hidden_state"), "{e}");
        let e = refused(&|j| j["style_adapter"]["preprocess"]["resample"] = "nearest".into());
        assert!(e.contains("style_adapter.preprocess.resample"), "{e}");
        let e = refused(&|j| j["style_adapter"]["context"]["negative_padding"] = "zeros".into());
        assert!(e.contains("malformed"), "{e}");
        let mut with_controlnet = m.clone();
        let graph = m.graphs.unet.clone();
        with_controlnet.controlnets.push(ControlNetSpec {
            name: "canny".into(),
            conditioning_channels: 3,
            guess_mode_scales: vec![],
            graph,
        });
        assert!(with_controlnet.check_consistency().unwrap_err().contains("cannot have controlnets"));
        // Paths are resolved inside the set like every graph's.
        let mut outside = m.clone();
        outside.style_adapter.as_mut().unwrap().style_adapter.file = "../tiny-sd1/unet.onnx".into();
        assert!(outside.files().iter().any(|f| outside.resolve(f.file).is_err()));
    }

    #[test]
    fn format_versions_2_to_4_are_read() {
        let m = manifest_in(Path::new("/tmp/set"));
        for (version, ok) in [(1, false), (2, true), (3, true), (4, true), (5, false)] {
            let text = serde_json::to_string(&Manifest { format_version: version, ..m.clone() }).unwrap();
            assert_eq!(Manifest::parse(&text, Path::new("/tmp/set")).is_ok(), ok, "version {version}");
        }
    }

    /// A tokenizer is a file or a builtin (format 4), and a builtin is this runtime's, by digest.
    #[test]
    fn a_tokenizer_is_a_file_or_a_known_builtin() {
        let dir = Path::new("/tmp/set");
        let with = |version: u32, file: Option<&str>, builtin: Option<BuiltinTokenizer>, sha256: Option<&str>| {
            let mut m = Manifest { format_version: version, ..manifest_in(dir) };
            m.text_encoders[0].tokenizer = TokenizerSpec {
                file: file.map(String::from),
                sha256: sha256.map(String::from),
                builtin,
                ..m.text_encoders[0].tokenizer.clone()
            };
            Manifest::parse(&serde_json::to_string(&m).unwrap(), dir).map_err(|e| e.to_string())
        };
        let clip = Some(BuiltinTokenizer::Clip);
        let digest = BuiltinTokenizer::Clip.json_sha256();
        assert!(with(4, None, clip, Some(digest)).is_ok());
        assert!(with(4, None, clip, None).is_ok());
        assert!(with(4, Some("tokenizer.json.gz"), None, None).is_ok());
        let refused = [
            (with(3, None, clip, Some(digest)), "format_version 3"),
            (with(4, None, None, None), "neither a file nor a builtin"),
            (with(4, Some("tokenizer.json.gz"), clip, None), "both a file"),
            (with(4, None, clip, Some(BuiltinTokenizer::OpenClip.json_sha256())), "re-export"),
        ];
        for (result, expect) in refused {
            let message = result.unwrap_err();
            assert!(message.contains(expect), "{message}");
        }
        // An unknown builtin name is a parse error that says where.
        let text = serde_json::to_string(&manifest_in(dir))
            .unwrap()
            .replace(r#""file":"tokenizer.json""#, r#""builtin":"t5""#);
        let message = Manifest::parse(&text.replace(r#""format_version":1"#, r#""format_version":4"#), dir)
            .unwrap_err()
            .to_string();
        assert!(message.contains("t5") && message.contains("clip"), "{message}");
    }
}
