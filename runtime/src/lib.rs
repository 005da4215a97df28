//! t2i-rt: a deployment runtime for Stable Diffusion with T2I-Adapters and ControlNets.
//!
//! A graph set (ONNX graphs plus `manifest.json`, written by `python -m t2i_export`) is loaded into a
//! [`Pipeline`], which runs tokenizer, text encoder, adapters, sampler with classifier-free guidance
//! and VAE decoder on a [`backend`]: ONNX Runtime (`ort-cpu`) or tract.
//!
//! ```no_run
//! use t2i_rt::{AdapterRequest, LoadOptions, Model, Request};
//! # fn main() -> t2i_rt::Result<()> {
//! // Load once (shareable between threads), then open one pipeline per worker.
//! let model = Model::load("graphs/tiny-sd1".as_ref(), &LoadOptions::default())?;
//! let mut pipeline = model.pipeline()?;
//! let mut request = Request::new("a house on a hill");
//! request.adapters.push("sketch=edges.png:0.8".parse::<AdapterRequest>()?);
//! request.steps = 20;
//! let generation = pipeline.run(&request, &mut |_progress| true)?;
//! t2i_rt::output::write_png("house.png".as_ref(), &generation.images[0])?;
//! # Ok(())
//! # }
//! ```

pub mod adapter;
mod atomic_file;
pub mod backend;
pub mod bench;
pub mod clip_image;
pub mod condition;
mod conditioning;
mod controlnet;
pub mod engine;
pub mod error;
mod guidance;
mod ip_adapter;
mod latents;
pub mod limits;
pub mod log;
pub mod manifest;
pub mod model;
pub mod npy;
pub mod output;
pub mod pipeline;
pub mod preprocess;
mod record;
pub mod request;
pub mod resample;
pub mod rng;
pub mod scheduler;
pub mod size;
mod style_adapter;
mod text;
pub mod tokenizer;
mod vae;

pub use adapter::{AdapterRequest, AdapterSet, ConditionSource};
pub use backend::BackendKind;
pub use controlnet::ControlRequest;
pub use error::{Error, ErrorCode, Field, Result, Stage};
pub use limits::Limits;
pub use log::{LogLevel, Logger};
pub use manifest::Manifest;
pub use model::{EngineCache, LoadOptions, Model};
pub use pipeline::{Generation, Pipeline, Progress, Timings};
pub use request::{CheckedRequest, Request, SizeConditioning};
pub use rng::RngKind;
pub use scheduler::{SchedulerConfig, SchedulerKind};
pub use size::{Offset, Size};
pub use style_adapter::StyleRequest;
pub use text::TextEmbeddings;
