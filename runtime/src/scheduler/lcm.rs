//! LCM (diffusers `schedulers/scheduling_lcm.py`, `LCMScheduler`): multistep consistency sampling
//! for latent consistency models (LCM, LCM-LoRA), stochastic between steps.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::{
    alpha_x0, check_same_shape, check_step_index, check_steps, limit_x0, randn, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, TrainSchedule, PREDICTION_TYPES,
};
use crate::error::{Error, Result};

const NAME: &str = "lcm";

/// `LCMScheduler`'s config keys, resolved with its defaults (`LCMScheduler.from_config`). Its
/// training-schedule defaults are Stable Diffusion's (`scaled_linear`, 0.00085 to 0.012), unlike
/// the other schedulers'.
///
/// `timestep_spacing` and `steps_offset` are keys of the class but diffusers' `set_timesteps`
/// never reads them (the LCM schedule is its own), so they are ignored here too.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmConfig {
    pub train: TrainSchedule,
    /// Length of the distillation schedule the inference timesteps are taken from (default 50).
    pub original_inference_steps: usize,
    /// Clamp the predicted `x₀` to `±clip_sample_range` (default false); ignored with `thresholding`.
    pub clip_sample: bool,
    /// Default 1.0.
    pub clip_sample_range: f64,
    /// The last step's "previous" ᾱ is 1 (default true) instead of `alphas_cumprod[0]`. It never
    /// reaches a sample: the last step adds no noise and every other one steps to a timestep ≥ 0.
    pub set_alpha_to_one: bool,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of `x₀` (default false): `Some((ratio, max))`.
    pub thresholding: Option<(f64, f64)>,
    /// Multiplies the timestep in the boundary-condition scalings `c_skip`, `c_out` (default 10).
    pub timestep_scaling: f64,
}

impl LcmConfig {
    /// Resolves `config` the way `LCMScheduler.from_config(config)` does. Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        // LCMScheduler's own training defaults (Stable Diffusion's), before the shared reader's.
        let mut defaults = config.clone();
        for (key, value) in [
            ("beta_start", serde_json::json!(0.00085)),
            ("beta_end", serde_json::json!(0.012)),
            ("beta_schedule", serde_json::json!("scaled_linear")),
        ] {
            if !config.values().contains_key(key) {
                defaults.set(key, value);
            }
        }
        let train = TrainSchedule::read(&defaults.reader(NAME)?)?;
        let original = r.int("original_inference_steps", 50)?;
        let original_inference_steps =
            usize::try_from(original).ok().filter(|&n| n >= 1 && n <= train.num_train_timesteps).ok_or_else(|| {
                r.error(format!(
                    "`original_inference_steps` = {original} must be between 1 and `num_train_timesteps` ({})",
                    train.num_train_timesteps
                ))
            })?;
        Ok(LcmConfig {
            train,
            original_inference_steps,
            clip_sample: r.bool("clip_sample", false)?,
            clip_sample_range: r.float("clip_sample_range", 1.0)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", true)?,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            thresholding: r.thresholding()?,
            timestep_scaling: r.float("timestep_scaling", 10.0)?,
        })
    }
}

/// LCM state for one request: `LCMScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    /// Training timesteps, in sampling order.
    train_timesteps: Vec<usize>,
    timesteps: Vec<f32>,
    config: LcmConfig,
}

impl LcmScheduler {
    /// `LCMScheduler(**config)` followed by `set_timesteps(steps)` (strength 1, no custom
    /// timesteps). Errors if `steps` exceeds `original_inference_steps`, as diffusers does: the
    /// schedule is a subset of the distillation one.
    pub fn new(config: &LcmConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        let original = config.original_inference_steps;
        if steps > original {
            return Err(Error::Scheduler {
                scheduler: NAME,
                message: format!(
                    "{steps} inference steps requested but `original_inference_steps` is {original}: LCM's timesteps \
                     are a subset of its distillation schedule; use at most {original} steps (LCM needs 2 to 8)"
                ),
            });
        }
        let alphas_cumprod = config.train.alphas_cumprod();
        // The distillation schedule `(1..=original) * k - 1`, reversed, sampled at
        // floor(linspace(0, original, steps, endpoint=False)).
        let k = num_train / original;
        let step = original as f64 / steps as f64;
        let train_timesteps: Vec<usize> = (0..steps)
            .map(|i| {
                let index = (i as f64 * step).floor() as usize;
                (original - index) * k - 1
            })
            .collect();
        Ok(LcmScheduler {
            alphas_cumprod,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
            config: config.clone(),
        })
    }

    /// `get_scalings_for_boundary_condition_discrete` with the timestep as a tensor (as pipelines
    /// pass it): float32 `c_skip = 0.25 / (s² + 0.25)` (a reciprocal times 0.25, Python's
    /// `float / tensor`) and `c_out = s / sqrt(s² + 0.25)`, `s = t · timestep_scaling`.
    fn scalings(&self, t: usize) -> (f32, f32) {
        let sigma_data_sq = 0.25f32;
        let scaled = t as f32 * self.config.timestep_scaling as f32;
        let denom = scaled * scaled + sigma_data_sq;
        let c_skip = (1.0 / denom) * sigma_data_sq;
        let c_out = scaled / denom.sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for LcmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    /// Identity, as in diffusers.
    fn scale_model_input(&self, _sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "lcm: step index {step} out of range 0..{}", self.num_steps());
    }

    /// `LCMScheduler.step(model_output, timesteps[step], sample)`: the consistency function's
    /// `denoised = c_out·x₀ + c_skip·sample`, then, except at the last step, fresh noise to the next
    /// timestep's level, `sqrt(ᾱ_prev)·denoised + sqrt(1 − ᾱ_prev)·z`, with one standard normal
    /// tensor of the sample's shape drawn from `noise`.
    ///
    /// diffusers returns `(prev_sample, denoised)`; `sample` becomes `prev_sample`, which at the
    /// last step is `denoised` itself (diffusers assigns `prev_sample = denoised` there), so the
    /// loop's final sample is the denoised one, as the LCM pipelines decode it.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        let t = self.train_timesteps[step];
        let last = step + 1 == self.num_steps();
        let alpha_prod_t = self.alphas_cumprod[t];
        // diffusers takes the current timestep as "previous" at the last step (unused: no noise is
        // added there); LCM timesteps are >= 0, so `final_alpha_cumprod` is never used.
        let alpha_prod_t_prev = if last { alpha_prod_t } else { self.alphas_cumprod[self.train_timesteps[step + 1]] };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (c_skip, c_out) = self.scalings(t);
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let prediction = self.config.prediction_type;
        let mut x0 = Zip::from(&*sample)
            .and(&model_output)
            .map_collect(|&s, &m| alpha_x0(prediction, sqrt_alpha, sqrt_beta, s, m));
        let range = self.config.clip_sample_range as f32;
        limit_x0(&mut x0, self.config.thresholding, self.config.clip_sample.then_some((-range, range)));
        // denoised = c_out * x0 + c_skip * sample
        Zip::from(&mut *sample).and(&x0).for_each(|s, &x0| *s = c_out * x0 + c_skip * *s);
        if !last {
            let z = randn(noise, sample.shape());
            let (a, b) = (alpha_prod_t_prev.sqrt(), beta_prod_t_prev.sqrt());
            Zip::from(sample).and(&z).for_each(|s, &z| *s = a * *s + b * z);
        }
        Ok(())
    }

    /// `add_noise` (DDPM's): `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise` at `t = timesteps[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert_eq!(noise.shape(), original.shape(), "lcm add_noise: noise and original shapes differ");
        let alpha = self.alphas_cumprod[self.train_timesteps[step]];
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        Zip::from(&original).and(&noise).map_collect(|&x, &n| a * x + b * n)
    }
}

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(LcmScheduler::new(&LcmConfig::from_config(config)?, steps)?))
}
