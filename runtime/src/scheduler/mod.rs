//! Samplers (diffusers "schedulers"): a [`SchedulerConfig`] parsed once from the checkpoint's
//! scheduler config builds a per-request [`Scheduler`] for a given number of steps.
//!
//! diffusers is the oracle: a scheduler built here for `(kind, steps)` reproduces
//! `XScheduler.from_config(config)` followed by `set_timesteps(steps)`, `scale_model_input` and
//! `step` of diffusers 0.42, including its float32/float64 dtype flow, so trajectories match to
//! float32 rounding. Schedulers are stepped by index (`0..num_steps()`), never by looking a
//! timestep up in the schedule, and take their randomness from the caller's RNG.
//!
//! The beta/alpha schedule and the timestep spacings every scheduler shares live here, once.
//!
//! ```
//! use t2i_rt::scheduler::SchedulerConfig;
//!
//! // The checkpoint's scheduler_config.json (manifest.json's "scheduler").
//! let config = SchedulerConfig::new(&serde_json::json!({
//!     "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
//!     "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1
//! }));
//! let mut scheduler = config.build("euler".parse()?, 20)?;
//! let mut rng = rand::rng();
//! let noise = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 4, 8, 8]));
//! let mut latents = noise * scheduler.init_noise_sigma();
//! for i in 0..scheduler.num_steps() {
//!     let mut input = latents.clone();
//!     scheduler.scale_model_input(&mut input, i);
//!     let noise_pred = input.clone(); // the UNet's output for (input, scheduler.timesteps()[i])
//!     scheduler.step(noise_pred.view(), i, &mut latents, &mut rng)?;
//! }
//! # Ok::<(), t2i_rt::Error>(())
//! ```

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub(crate) mod sigmas;
pub mod unipc;

use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayD, ArrayViewD};
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Map, Value};

use crate::error::{Error, Field, Result};

pub use ddim::{DdimConfig, DdimScheduler};
pub use euler::{EulerConfig, EulerScheduler};

/// The samplers this runtime implements, by the names users know them by. Several names are one
/// diffusers class with a preset (`dpmpp-2m-karras` is `DPMSolverMultistepScheduler` with
/// `use_karras_sigmas = true`): see [`preset`](Self::preset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler`; `eta` > 0 ([`SchedulerConfig::eta`]) makes it stochastic.
    Ddim,
    /// PLMS: `PNDMScheduler` with `skip_prk_steps = true`, whatever the checkpoint's config says
    /// (SD 1.5's default sampler).
    Pndm,
    /// `PNDMScheduler` with `skip_prk_steps = false`: three Runge-Kutta warm-up steps (4 model
    /// calls each), then PLMS. What diffusers runs for a PNDM config without `skip_prk_steps`.
    PndmPrk,
    /// `EulerDiscreteScheduler` (`s_churn = 0`): SDXL's default.
    Euler,
    /// `EulerAncestralDiscreteScheduler` ("Euler a"), stochastic.
    EulerAncestral,
    /// `HeunDiscreteScheduler`: two model calls per step.
    Heun,
    /// `LMSDiscreteScheduler` (order 4).
    Lms,
    /// `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2 ("DPM++ 2M").
    DpmPp2m,
    /// "DPM++ 2M Karras": the same with `use_karras_sigmas = true`.
    DpmPp2mKarras,
    /// "DPM++ 2M SDE": `algorithm_type = sde-dpmsolver++`, stochastic.
    DpmPp2mSde,
    /// `UniPCMultistepScheduler` (`bh2`).
    UniPc,
    /// `LCMScheduler` (latent consistency models), stochastic between steps.
    Lcm,
    /// `DDPMScheduler`, stochastic.
    Ddpm,
}

impl SchedulerKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [SchedulerKind; 13] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::PndmPrk,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::DpmPp2mSde,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
        SchedulerKind::Ddpm,
    ];

    /// The name used on the command line and in requests (`"ddim"`, `"euler-a"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::PndmPrk => "pndm-prk",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Lms => "lms",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SchedulerKind::DpmPp2mSde => "dpmpp-2m-sde",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    /// The diffusers class whose semantics this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm | SchedulerKind::PndmPrk => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::DpmPp2mSde => {
                "DPMSolverMultistepScheduler"
            }
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
        }
    }

    /// Config keys this name forces on top of the checkpoint's config (diffusers'
    /// `XScheduler.from_config(config, **preset)`); request overrides still apply after them.
    pub fn preset(self) -> Vec<(&'static str, Value)> {
        match self {
            SchedulerKind::Pndm => vec![("skip_prk_steps", true.into())],
            SchedulerKind::PndmPrk => vec![("skip_prk_steps", false.into())],
            SchedulerKind::DpmPp2m => {
                vec![("algorithm_type", "dpmsolver++".into()), ("solver_order", 2.into())]
            }
            SchedulerKind::DpmPp2mKarras => vec![
                ("algorithm_type", "dpmsolver++".into()),
                ("solver_order", 2.into()),
                ("use_karras_sigmas", true.into()),
            ],
            SchedulerKind::DpmPp2mSde => {
                vec![("algorithm_type", "sde-dpmsolver++".into()), ("solver_order", 2.into())]
            }
            _ => Vec::new(),
        }
    }

    /// Whether `use_karras_sigmas` is a key of this kind's diffusers class (what `--karras` sets).
    pub fn takes_karras_sigmas(self) -> bool {
        !matches!(
            self,
            SchedulerKind::Ddim
                | SchedulerKind::Pndm
                | SchedulerKind::PndmPrk
                | SchedulerKind::EulerAncestral
                | SchedulerKind::Lcm
                | SchedulerKind::Ddpm
        )
    }

    /// Whether the kind draws noise while stepping (with the default config; DDIM only with
    /// `eta` > 0).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SchedulerKind::EulerAncestral | SchedulerKind::DpmPp2mSde | SchedulerKind::Lcm | SchedulerKind::Ddpm
        )
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        SchedulerKind::ALL.into_iter().find(|k| k.as_str() == name).ok_or_else(|| {
            let valid: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
            Error::request(Field::Scheduler, format!("unknown scheduler \"{name}\"; valid names: {}", valid.join(", ")))
        })
    }
}

/// Parses a scheduler config override `KEY=VALUE` (what `--scheduler-option` takes): VALUE is
/// JSON (`true`, `0`, `"trailing"`) or else a bare string (`trailing`).
pub fn parse_option(arg: &str) -> Result<(String, Value)> {
    let bad = || {
        Error::request(
            Field::Scheduler,
            format!("scheduler option {arg:?}: expected KEY=VALUE, e.g. timestep_spacing=trailing"),
        )
    };
    let (key, value) = arg.split_once('=').ok_or_else(bad)?;
    if key.is_empty() {
        return Err(bad());
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

/// Where stochastic samplers take their noise from. Any [`rand::RngCore`] is one (standard
/// normal draws through `rand_distr::StandardNormal`, in element order);
/// [`TorchCpuGenerator`](crate::rng::TorchCpuGenerator) draws what torch's CPU generator does;
/// tests replay the exact draws diffusers made.
///
/// Every draw of a tensor is one call with the whole tensor (row-major), as diffusers calls
/// `randn_tensor` once per tensor: torch's values depend on how draws are split into calls.
pub trait NoiseSource {
    /// Fills `out` with independent standard normal draws: one tensor of `out.len()` elements.
    fn fill_standard_normal(&mut self, out: &mut [f32]);
}

impl<R: rand::RngCore + ?Sized> NoiseSource for R {
    fn fill_standard_normal(&mut self, out: &mut [f32]) {
        for x in out {
            *x = StandardNormal.sample(self);
        }
    }
}

/// A standard normal tensor of `shape` drawn from `noise` in one call (diffusers' `randn_tensor`).
pub(crate) fn randn(noise: &mut dyn NoiseSource, shape: &[usize]) -> ArrayD<f32> {
    let mut out = ArrayD::<f32>::zeros(shape);
    if let Some(slice) = out.as_slice_mut() {
        noise.fill_standard_normal(slice);
    }
    out
}

/// One request's sampler state, built by [`SchedulerConfig::build`] (diffusers' `set_timesteps`).
///
/// The denoising loop, for `i in 0..num_steps()`:
/// 1. `x = sample.clone(); scale_model_input(&mut x, i)`;
/// 2. `model_output = unet(x, timesteps()[i])`;
/// 3. `step(model_output, i, &mut sample, rng)`.
///
/// The initial sample is unit-variance noise multiplied by [`init_noise_sigma`](Self::init_noise_sigma).
/// Samples are float32 tensors of any shape (`[batch, channels, h, w]` latents; the classifier-free
/// guidance batch may be scaled at once, every op is elementwise); `model_output` must have the
/// sample's shape. Step indices must be `< num_steps()`: `step` returns an error otherwise, while
/// `scale_model_input` and `add_noise` panic like an out-of-bounds slice index (a loop bug, never
/// request data).
pub trait Scheduler: Send {
    /// Which sampler this is.
    fn kind(&self) -> SchedulerKind;

    /// The timestep fed to the UNet at each step index, in sampling order (`len() == num_steps()`).
    /// Integer-valued for DDIM; fractional for Euler with `linspace` spacing.
    fn timesteps(&self) -> &[f32];

    /// Standard deviation of the initial noise: the pipeline multiplies unit noise by it.
    fn init_noise_sigma(&self) -> f32;

    /// diffusers' `order`: model evaluations per step of the solver (2 for Heun, whose
    /// `timesteps()` hold both evaluations of each step; 1 for most others).
    fn order(&self) -> usize;

    /// Number of step indices, `timesteps().len()`. Usually the requested steps; diffusers'
    /// `trailing` spacing yields one more for some step counts (e.g. 61), and that is kept.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Scales the sample in place into the UNet's input at step index `step` (identity for DDIM,
    /// `x / sqrt(sigma² + 1)` for Euler). Panics if `step >= num_steps()`.
    fn scale_model_input(&self, sample: &mut ArrayD<f32>, step: usize);

    /// Advances the sample in place from step index `step` to the next one (`sample` becomes
    /// diffusers' `prev_sample`), given the model's output for the scaled input at `step`.
    /// Errors if `step >= num_steps()` or the shapes differ. `noise` feeds stochastic samplers
    /// (pass the request's seeded RNG); the deterministic ones never draw from it.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<()>;

    /// The sigma schedule of Karras-style samplers (one per step index plus the final one), as
    /// diffusers' `scheduler.sigmas`; `None` for the ᾱ-based ones (DDIM, PNDM, DDPM, LCM).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// Forward diffusion of `original` to the noise level of step index `step` (img2img): diffusers'
    /// `add_noise(original, noise, timesteps[step:step+1])`. Panics if `step >= num_steps()` or
    /// `noise` does not have `original`'s shape.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32>;
}

/// A checkpoint's scheduler configuration (its `scheduler_config.json`, e.g. SD 1.5's
/// `PNDMScheduler` one), from which any [`SchedulerKind`] can be built, plus a request's overrides.
///
/// diffusers' `XScheduler.from_config(config, **overrides)` semantics: each key the target
/// scheduler's `__init__` takes gets the override's value, else the config's; a missing key, or
/// one listed in the config's `_use_default_values`, gets that scheduler's own default. Defaults
/// differ between schedulers (DDIM's `timestep_spacing` is `leading`, Euler's `linspace`), so the
/// JSON is kept and resolved per kind by each `XConfig::from_config`; unknown keys are ignored.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The checkpoint's keys.
    values: Map<String, Value>,
    /// A request's keys ([`set`](Self::set), also in `values`): re-applied after the kind's preset
    /// when building, so they win over it.
    overrides: Map<String, Value>,
    /// Set when the JSON is not an object; reported by every build.
    not_an_object: Option<String>,
    /// The checkpoint's `_class_name` (`PNDMScheduler`, ...): the sampler diffusers runs for it.
    class_name: Option<String>,
    /// DDIM's `eta` (a `step` argument in diffusers, not a config key): 0 is deterministic DDIM,
    /// > 0 adds seeded noise (1 is DDPM-like). Defaults to 0.
    pub eta: f32,
}

impl Default for SchedulerConfig {
    /// A config with no keys: every scheduler takes its diffusers defaults.
    fn default() -> Self {
        SchedulerConfig { values: Map::new(), overrides: Map::new(), not_an_object: None, class_name: None, eta: 0.0 }
    }
}

impl SchedulerConfig {
    /// Takes a diffusers scheduler config (manifest.json's `scheduler`, a JSON object). Nothing is
    /// checked here: key values are checked when a scheduler is built, against that scheduler's
    /// accepted values (a key one scheduler rejects may not matter to another).
    pub fn new(config: &Value) -> Self {
        let Value::Object(map) = config else {
            return SchedulerConfig { not_an_object: Some(config.to_string()), ..SchedulerConfig::default() };
        };
        // configuration_utils.py `extract_init_dict`: keys whose value was a default of the class
        // that wrote the config are dropped, so the target class's own default applies; private
        // keys (`_class_name`, ...) are never passed on.
        let use_defaults: Vec<&str> = match map.get("_use_default_values") {
            Some(Value::Array(keys)) => keys.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let values = map
            .iter()
            .filter(|(k, _)| !k.starts_with('_') && !use_defaults.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let class_name = map.get("_class_name").and_then(Value::as_str).map(str::to_owned);
        SchedulerConfig { values, overrides: Map::new(), not_an_object: None, class_name, eta: 0.0 }
    }

    /// Overrides one config key for this request, as a keyword argument of diffusers'
    /// `from_config` does; it wins over the checkpoint's value and over the kind's preset (so
    /// `dpmpp-2m` with `solver_order` 3 is third order). Values are checked when a scheduler is
    /// built.
    pub fn set(&mut self, key: &str, value: Value) {
        self.values.insert(key.to_owned(), value.clone());
        self.overrides.insert(key.to_owned(), value);
    }

    /// The effective keys: the checkpoint's (private `_…` keys and `_use_default_values` entries
    /// removed) with the overrides applied.
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// Builds the per-request state for `steps` inference steps (diffusers' `set_timesteps`): the
    /// checkpoint's keys, then the kind's [`preset`](SchedulerKind::preset), then the overrides.
    /// Errors on `steps == 0`, `steps >
    /// num_train_timesteps`, or a config value the scheduler does not support.
    pub fn build(&self, kind: SchedulerKind, steps: usize) -> Result<Box<dyn Scheduler>> {
        let mut config = self.clone();
        for (key, value) in kind.preset() {
            config.values.insert(key.to_owned(), value);
        }
        // `pndm` is PLMS and `pndm-prk` is not: an override that contradicts the name is refused.
        // (Other presets are starting points a request may override: `dpmpp-2m` with
        // `solver_order` 3 is third order, as documented.)
        let fixed =
            if matches!(kind, SchedulerKind::Pndm | SchedulerKind::PndmPrk) { kind.preset() } else { Vec::new() };
        for (key, value) in fixed {
            if let Some(given) = config.overrides.get(key).filter(|given| **given != value) {
                let other = SchedulerKind::ALL.into_iter().find(|k| {
                    k.diffusers_class() == kind.diffusers_class() && k.preset().contains(&(key, given.clone()))
                });
                return Err(Error::Scheduler {
                    scheduler: kind.as_str(),
                    message: format!(
                        "`{key}` = {given} contradicts this sampler, which is `{key}` = {value}{}",
                        other.map(|k| format!("; use the {k} sampler instead")).unwrap_or_default()
                    ),
                });
            }
        }
        config.values.extend(std::mem::take(&mut config.overrides));
        config.build_exact(kind, steps)
    }

    /// The sampler diffusers runs for this checkpoint by default: the config's `_class_name`, with
    /// the config's own keys and the request's overrides (no preset): `PNDMScheduler` is
    /// [`Pndm`](SchedulerKind::Pndm) or [`PndmPrk`](SchedulerKind::PndmPrk) by its `skip_prk_steps`,
    /// `DPMSolverMultistepScheduler` is `dpmpp-2m-sde` for `sde-dpmsolver++` and `dpmpp-2m` otherwise.
    pub fn checkpoint_kind(&self) -> Result<SchedulerKind> {
        let class = self.class_name.as_deref().unwrap_or("");
        let flag = |key: &str| self.values.get(key).and_then(Value::as_bool).unwrap_or(false);
        let kind = match class {
            "PNDMScheduler" if flag("skip_prk_steps") => SchedulerKind::Pndm,
            "PNDMScheduler" => SchedulerKind::PndmPrk,
            "DPMSolverMultistepScheduler"
                if self.values.get("algorithm_type").and_then(Value::as_str) == Some("sde-dpmsolver++") =>
            {
                SchedulerKind::DpmPp2mSde
            }
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            _ => match SchedulerKind::ALL.into_iter().find(|k| k.diffusers_class() == class) {
                Some(kind) => kind,
                None => {
                    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err(Error::Scheduler {
                        scheduler: "default",
                        message: format!(
                            "the graph set's scheduler config names class {class:?}, which t2i-rt does not implement; \
                             choose a sampler by name ({})",
                            names.join(", ")
                        ),
                    });
                }
            },
        };
        Ok(kind)
    }

    /// Builds the checkpoint's own sampler ([`checkpoint_kind`](Self::checkpoint_kind)) exactly as
    /// configured, as diffusers' pipeline runs it when no scheduler is swapped in.
    pub fn build_checkpoint(&self, steps: usize) -> Result<(SchedulerKind, Box<dyn Scheduler>)> {
        let kind = self.checkpoint_kind()?;
        let mut config = self.clone();
        config.values.extend(std::mem::take(&mut config.overrides));
        Ok((kind, config.build_exact(kind, steps)?))
    }

    /// `kind`'s implementation on exactly these values (preset and overrides already applied).
    fn build_exact(&self, kind: SchedulerKind, steps: usize) -> Result<Box<dyn Scheduler>> {
        let config = self;
        Ok(match kind {
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(&DdimConfig::from_config(config)?, steps)?),
            SchedulerKind::Pndm | SchedulerKind::PndmPrk => pndm::build(config, steps)?,
            SchedulerKind::Euler => Box::new(EulerScheduler::new(&EulerConfig::from_config(config)?, steps)?),
            SchedulerKind::EulerAncestral => euler_ancestral::build(config, steps)?,
            SchedulerKind::Heun => heun::build(config, steps)?,
            SchedulerKind::Lms => lms::build(config, steps)?,
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::DpmPp2mSde => {
                dpm_solver::build(config, steps, kind)?
            }
            SchedulerKind::UniPc => unipc::build(config, steps)?,
            SchedulerKind::Lcm => lcm::build(config, steps)?,
            SchedulerKind::Ddpm => ddpm::build(config, steps)?,
        })
    }

    pub(crate) fn reader(&self, scheduler: &'static str) -> Result<ConfigReader<'_>> {
        if let Some(json) = &self.not_an_object {
            return Err(Error::Scheduler {
                scheduler,
                message: format!("the scheduler config must be a JSON object, got {json}"),
            });
        }
        Ok(ConfigReader { scheduler, values: &self.values })
    }
}

/// Typed access to config keys with a per-scheduler default, and errors naming the key.
pub(crate) struct ConfigReader<'a> {
    pub(crate) scheduler: &'static str,
    values: &'a Map<String, Value>,
}

impl ConfigReader<'_> {
    pub(crate) fn error(&self, message: String) -> Error {
        Error::Scheduler { scheduler: self.scheduler, message }
    }

    pub(crate) fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.values.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| self.error(format!("`{key}` must be an integer, got {v}"))),
        }
    }

    pub(crate) fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.values.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.error(format!("`{key}` must be a number, got {v}"))),
        }
    }

    pub(crate) fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| self.error(format!("`{key}` must be a number or null, got {v}")))
            }
        }
    }

    /// `null` reads as false, as Python's truthiness does for `None`.
    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.values.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    /// A string key with a closed set of accepted values.
    pub(crate) fn choice<T: Copy>(&self, key: &str, default: T, accepted: &[(&str, T)]) -> Result<T> {
        let Some(v) = self.values.get(key) else {
            return Ok(default);
        };
        if let Some(s) = v.as_str() {
            if let Some((_, t)) = accepted.iter().find(|(name, _)| *name == s) {
                return Ok(*t);
            }
        }
        let names: Vec<&str> = accepted.iter().map(|(n, _)| *n).collect();
        Err(self.error(format!("`{key}` = {v} is not supported; accepted: {}", names.join(", "))))
    }

    /// `thresholding` (default false) with `dynamic_thresholding_ratio` (0.995) and
    /// `sample_max_value` (1.0), as the schedulers that have dynamic thresholding take them.
    pub(crate) fn thresholding(&self) -> Result<Option<(f64, f64)>> {
        if !self.bool("thresholding", false)? {
            return Ok(None);
        }
        let ratio = self.float("dynamic_thresholding_ratio", 0.995)?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(self.error(format!("`dynamic_thresholding_ratio` = {ratio} must be in [0, 1]")));
        }
        Ok(Some((ratio, self.float("sample_max_value", 1.0)?)))
    }

    pub(crate) fn float_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| x.as_f64().ok_or_else(|| self.error(format!("`{key}` must hold numbers, got {x}"))))
                .collect::<Result<Vec<f64>>>()
                .map(Some),
            Some(v) => Err(self.error(format!("`{key}` must be a list of numbers or null, got {v}"))),
        }
    }
}

/// How the training betas are generated (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))²`: Stable Diffusion's.
    ScaledLinear,
    /// The Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredcosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity `sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀` (SD 2.x 768).
    VPrediction,
    /// The denoised sample `x₀`.
    Sample,
}

/// How inference timesteps are spread over the training ones (`timestep_spacing`, Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `arange(0, n) * (N // n) + steps_offset`, reversed.
    Leading,
    /// `round(arange(N, 0, -N / n)) - 1`.
    Trailing,
    /// `linspace(0, N - 1, n)`, reversed.
    Linspace,
}

pub(crate) const BETA_SCHEDULES: [(&str, BetaSchedule); 3] = [
    ("linear", BetaSchedule::Linear),
    ("scaled_linear", BetaSchedule::ScaledLinear),
    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
];

/// `prediction_type` values of most schedulers (Euler also reads `original_sample` as `sample`).
pub(crate) const PREDICTION_TYPES: [(&str, PredictionType); 3] = [
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
    ("sample", PredictionType::Sample),
];

pub(crate) const SPACINGS: [(&str, TimestepSpacing); 3] = [
    ("leading", TimestepSpacing::Leading),
    ("trailing", TimestepSpacing::Trailing),
    ("linspace", TimestepSpacing::Linspace),
];

/// Largest `num_train_timesteps` accepted (models train with 1000); the schedules are tables of
/// that length.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The training noise schedule keys every scheduler shares, with diffusers' common defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// Ignored (and not validated, as in diffusers) when `trained_betas` is set.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when set, `beta_start`, `beta_end` and `beta_schedule` are ignored.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale betas to zero terminal SNR (`rescale_zero_terminal_snr`).
    pub rescale_betas_zero_snr: bool,
}

impl TrainSchedule {
    pub(crate) fn read(r: &ConfigReader<'_>) -> Result<Self> {
        let n = r.int("num_train_timesteps", 1000)?;
        let num_train_timesteps =
            usize::try_from(n).ok().filter(|&n| (1..=MAX_TRAIN_TIMESTEPS).contains(&n)).ok_or_else(|| {
                r.error(format!("`num_train_timesteps` must be between 1 and {MAX_TRAIN_TIMESTEPS}, got {n}"))
            })?;
        let trained_betas = r.float_list("trained_betas")?;
        // diffusers only looks at beta_schedule when trained_betas is absent.
        let beta_schedule = match &trained_betas {
            Some(b) if b.len() != num_train_timesteps => {
                return Err(r.error(format!(
                    "`trained_betas` has {} values but `num_train_timesteps` is {num_train_timesteps}",
                    b.len()
                )))
            }
            Some(_) => r.choice("beta_schedule", BetaSchedule::Linear, &BETA_SCHEDULES).unwrap_or(BetaSchedule::Linear),
            None => r.choice("beta_schedule", BetaSchedule::Linear, &BETA_SCHEDULES)?,
        };
        Ok(TrainSchedule {
            num_train_timesteps,
            beta_start: r.float("beta_start", 0.0001)?,
            beta_end: r.float("beta_end", 0.02)?,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr", false)?,
        })
    }

    /// The float32 betas, as the schedulers' `__init__` builds `self.betas`.
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas = if let Some(b) = &self.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
                BetaSchedule::ScaledLinear => torch_linspace_f32(self.beta_start.powf(0.5), self.beta_end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar_cosine(n),
            }
        };
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        }
    }

    /// `alphas_cumprod = cumprod(1 - betas)`, float32 like diffusers' tensor.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let alphas: Vec<f32> = self.betas().iter().map(|b| 1.0 - b).collect();
        torch_cumprod_f32(&alphas)
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit-exact: the bounds are
/// rounded to float32, and ATen's kernel (RangeFactoriesKernel.cpp) computes `start + step * i` for
/// the first half and `end - step * (steps - i - 1)` for the rest, which the compiler contracts
/// into FMAs in the AVX2/AVX512 builds (verified against torch 2.15: plain mul-then-add differs
/// in ~15% of the betas).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 tensor on CPU: ATen accumulates in `acc_type<float>` = double and
/// rounds each partial product to float32 (a float32 running product differs from it).
pub(crate) fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// scheduling_ddpm.py `betas_for_alpha_bar` with the cosine transform, in Python floats, then
/// float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// scheduling_ddim.py `rescale_zero_terminal_snr` (Algorithm 1 of arXiv 2305.08891), in float32
/// torch ops.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    (0..bar.len()).map(|i| if i == 0 { bar[0] } else { bar[i] / bar[i - 1] }).map(|a| 1.0 - a).collect()
}

/// `np.linspace(start, stop, num)` in float64 (numpy's `_core/function_base.py`): `i * step +
/// start` with the last element set to `stop`; `num == 1` gives `[start]`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            let y = if step == 0.0 { i as f64 / div * delta } else { i as f64 * step };
            y + start
        })
        .collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// Integer training timesteps of the `leading` spacing, in sampling order:
/// `(arange(0, n) * (N // n))[::-1] + steps_offset`.
pub(crate) fn leading_timesteps(n: usize, num_train: usize, steps_offset: i64) -> Vec<i64> {
    let ratio = (num_train / n) as i64;
    (0..n as i64).rev().map(|i| i * ratio + steps_offset).collect()
}

/// Integer training timesteps of the `trailing` spacing: `round(np.arange(N, 0, -N / n)) - 1`.
///
/// numpy's float `arange` has `ceil(-N / -(N / n))` elements, which is `n + 1` for some `n`
/// (61, 103, 121, …); the extra last element rounds to 0 and becomes timestep -1. diffusers keeps
/// it (and indexes `alphas_cumprod[-1]`, the last entry), so this does too.
pub(crate) fn trailing_timesteps(n: usize, num_train: usize) -> Vec<i64> {
    let start = num_train as f64;
    let step = -(num_train as f64 / n as f64);
    // PyArray_ArangeObj: length from the true division; values from the first two elements
    // (`start`, `start + step`) through the dtype's `fill`: `start + i * (second - start)`.
    let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect()
}

/// Python-style index into a schedule of training timesteps: diffusers indexes torch tensors
/// with the timestep, so -1 is the last entry. Out-of-range timesteps are rejected when a
/// scheduler is built.
/// ᾱ at training timestep `t`, Python-indexed; NaN past the schedule (the samplers that use it
/// validate their timesteps when built).
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64) -> f32 {
    wrap_index(t, alphas_cumprod.len()).map_or(f32::NAN, |i| alphas_cumprod[i])
}

pub(crate) fn wrap_index(t: i64, len: usize) -> Option<usize> {
    let len = len as i64;
    let i = if t < 0 { t + len } else { t };
    (0..len).contains(&i).then_some(i as usize)
}

pub(crate) fn check_steps(scheduler: &'static str, steps: usize, num_train: usize) -> Result<()> {
    if steps == 0 || steps > num_train {
        return Err(Error::Scheduler {
            scheduler,
            message: format!(
                "{steps} inference steps requested; must be between 1 and num_train_timesteps ({num_train})"
            ),
        });
    }
    Ok(())
}

pub(crate) fn check_step_index(scheduler: &'static str, step: usize, num_steps: usize) -> Result<()> {
    if step >= num_steps {
        return Err(Error::Scheduler {
            scheduler,
            message: format!("step index {step} is out of range: this schedule has {num_steps} steps"),
        });
    }
    Ok(())
}

pub(crate) fn check_same_shape(scheduler: &'static str, what: &str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::Scheduler {
            scheduler,
            message: format!("{what} has shape {a:?} but the sample has shape {b:?}; they must match"),
        });
    }
    Ok(())
}

/// torch's `clamp(x, lo, hi)` on a float32: NaN stays NaN, otherwise `min(max(x, lo), hi)` (so
/// `lo > hi` gives `hi`).
pub(crate) fn torch_clamp(x: f32, lo: f32, hi: f32) -> f32 {
    if x.is_nan() {
        x
    } else {
        x.max(lo).min(hi)
    }
}

/// `pred_original_sample` of the ᾱ-parameterised samplers (DDIM, DDPM, LCM) from the sample `s`
/// and model output `m`, with `sqrt_alpha = ᾱ_t ** 0.5`, `sqrt_beta = (1 - ᾱ_t) ** 0.5`.
pub(crate) fn alpha_x0(prediction: PredictionType, sqrt_alpha: f32, sqrt_beta: f32, s: f32, m: f32) -> f32 {
    match prediction {
        PredictionType::Epsilon => (s - sqrt_beta * m) / sqrt_alpha,
        PredictionType::Sample => m,
        PredictionType::VPrediction => sqrt_alpha * s - sqrt_beta * m,
    }
}

/// diffusers' treatment of a predicted `x₀` before it is used: dynamic thresholding when
/// configured, else clamping to `clip = (lo, hi)` when `clip_sample` is on.
pub(crate) fn limit_x0(x0: &mut ArrayD<f32>, thresholding: Option<(f64, f64)>, clip: Option<(f32, f32)>) {
    if let Some((ratio, max_value)) = thresholding {
        threshold_sample(x0, ratio, max_value);
    } else if let Some((lo, hi)) = clip {
        x0.mapv_inplace(|x| torch_clamp(x, lo, hi));
    }
}

/// Dynamic thresholding of a predicted `x₀` (`_threshold_sample` in diffusers' DDIM, DDPM,
/// DPM-Solver, UniPC and LCM schedulers; Imagen, arXiv 2205.08891): per batch item, `s` is the
/// `ratio` quantile of `|x₀|` clamped to `[1, max_value]`, and `x₀` becomes `clamp(x₀, -s, s) / s`.
/// The quantile is `torch.quantile`'s linear interpolation in float32.
pub(crate) fn threshold_sample(x0: &mut ArrayD<f32>, ratio: f64, max_value: f64) {
    let batch = x0.shape().first().copied().unwrap_or(1).max(1);
    let per_item = x0.len() / batch;
    if per_item == 0 {
        return;
    }
    let mut flat: Vec<f32> = x0.iter().copied().collect();
    for item in flat.chunks_mut(per_item) {
        let mut sorted: Vec<f32> = item.iter().map(|x| x.abs()).collect();
        // torch sorts NaN last; a NaN row makes the quantile NaN.
        sorted.sort_by(|a, b| a.total_cmp(b));
        let last = (per_item - 1) as f32;
        let rank = if sorted.iter().any(|x| x.is_nan()) { last } else { ratio as f32 * last };
        let below = rank as usize;
        let weight = rank - below as f32;
        let above = rank.ceil() as usize;
        let (lo, hi) = (sorted[below], sorted[above.min(per_item - 1)]);
        // ATen's lerp: exact at both ends.
        let q = if weight.abs() < 0.5 { lo + weight * (hi - lo) } else { hi - (hi - lo) * (1.0 - weight) };
        // torch.clamp(s, min=1, max=sample_max_value), NaN propagating.
        let s = torch_clamp(q, 1.0, max_value as f32);
        for x in item.iter_mut() {
            *x = torch_clamp(*x, -s, s) / s;
        }
    }
    for (dst, src) in x0.iter_mut().zip(flat) {
        *dst = src;
    }
}

// ---- Euler Ancestral, Heun: `add_noise`'s timestep lookup ----

/// The step index diffusers' `add_noise(original, noise, timesteps[step:step+1])` takes its sigma
/// from (`index_for_timestep`): the first index holding `timesteps[step]`'s value, or the second
/// when the value occurs more than once (Heun's repeated timesteps; diffusers picks the second so
/// img2img does not skip a sigma).
pub(crate) fn index_for_timestep(timesteps: &[f32], step: usize) -> usize {
    let t = timesteps[step];
    let mut matches = timesteps.iter().enumerate().filter(|&(_, &u)| u == t).map(|(i, _)| i);
    match (matches.next(), matches.next()) {
        (_, Some(second)) => second,
        (Some(first), None) => first,
        // NaN matches nothing (diffusers raises IndexError); keep the requested index.
        (None, None) => step,
    }
}

// DPM-Solver (dpm_solver.rs): its `trailing` spacing starts at a clipped last timestep
// (`lambda_min_clipped`), so it needs numpy's float `arange` with any start.

/// `np.arange(start, stop, step)` in float64 (numpy's `PyArray_ArangeObj`): `ceil((stop - start) /
/// step)` elements, the first two `start` and `start + step`, the rest `start + i * delta` with
/// `delta = (start + step) - start`.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}
