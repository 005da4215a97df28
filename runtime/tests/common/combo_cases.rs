//! A generated set's `cases.json` (export/t2i_export/ip_adapter_cases.py, style_cases.py): one
//! request per entry that combines the set's own conditioner (IP image, style images) with
//! T2I-Adapters, ControlNets or an init image, and where the reference's final latents are.

use std::path::Path;

use ndarray::{Array4, ArrayD};
use serde::Deserialize;
use t2i_rt::adapter::{AdapterRequest, ConditionSource};
use t2i_rt::backend::BackendKind;
use t2i_rt::rng::RngKind;
use t2i_rt::{ControlRequest, LoadOptions, Pipeline, Request};

/// One entry of cases.json. `X` holds the fields of the set's own conditioner (flattened from the
/// same object), which only that set's test knows.
#[derive(Deserialize)]
pub struct ComboCase<X> {
    pub name: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub adapters: Vec<ComboCondition>,
    #[serde(default)]
    pub controls: Vec<ComboCondition>,
    pub init_image: Option<String>,
    pub strength: Option<f32>,
    /// `null`: the reference drew everything from `torch.Generator(rng).manual_seed(seed)`.
    pub latents: Option<String>,
    pub rng: Option<String>,
    pub seed: u64,
    pub reference: String,
    pub expected_latents: String,
    #[serde(flatten)]
    pub extra: X,
}

/// A T2I-Adapter (`weight`) or a ControlNet (`scale`) and its condition image.
#[derive(Deserialize)]
pub struct ComboCondition {
    pub name: String,
    pub image: String,
    #[serde(alias = "scale")]
    pub weight: f32,
}

/// `FIXTURES/cases.json`.
pub fn combo_cases<X: serde::de::DeserializeOwned>(fixtures: &Path) -> Vec<ComboCase<X>> {
    let path = fixtures.join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl<X> ComboCase<X> {
    /// The case's request without the set's own conditioner: prompt, guidance, steps, size,
    /// T2I-Adapters, ControlNets, init image and strength, and the reference's initial latents or
    /// its generator and seed. Paths are relative to `fixtures`.
    pub fn request(&self, fixtures: &Path) -> Request {
        let file = |rel: &str| ConditionSource::File(fixtures.join(rel));
        let mut r = Request::new(self.prompt.clone());
        r.negative_prompt = Some(self.negative_prompt.clone());
        r.steps = self.steps;
        r.guidance = self.guidance;
        r.width = Some(self.width);
        r.height = Some(self.height);
        r.adapters = self
            .adapters
            .iter()
            .map(|a| AdapterRequest {
                name: a.name.clone(),
                image: file(&a.image),
                weight: a.weight,
                preprocess: Vec::new(),
            })
            .collect();
        r.controls = self
            .controls
            .iter()
            .map(|c| ControlRequest {
                name: c.name.clone(),
                image: file(&c.image),
                scale: c.weight,
                preprocess: Vec::new(),
            })
            .collect();
        r.init_image = self.init_image.as_deref().map(file);
        r.strength = self.strength;
        match (&self.latents, &self.rng) {
            (Some(latents), _) => r.latents = Some(ndarray_npy::read_npy(fixtures.join(latents)).unwrap()),
            (None, Some(rng)) => {
                r.seed = self.seed;
                r.rng = rng.parse::<RngKind>().unwrap();
            }
            (None, None) => panic!("{}: neither latents nor a generator", self.name),
        }
        r
    }

    /// The reference's final latents.
    pub fn expected(&self, fixtures: &Path) -> ArrayD<f32> {
        ndarray_npy::read_npy(fixtures.join(&self.expected_latents)).unwrap()
    }
}

/// The graph set at `dir` on `backend`, with the default options otherwise.
pub fn load_pipeline(dir: &Path, backend: BackendKind) -> Pipeline {
    Pipeline::load(dir, &LoadOptions { backend, ..LoadOptions::default() }).unwrap()
}

/// The final latents of `request`, run to the end.
pub fn final_latents(pipeline: &mut Pipeline, request: &Request) -> Array4<f32> {
    pipeline.run(request, &mut |_| true).unwrap().latents
}
