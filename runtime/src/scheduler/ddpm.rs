//! DDPM (diffusers `schedulers/scheduling_ddpm.py`, `DDPMScheduler`): ancestral sampling of
//! "Denoising Diffusion Probabilistic Models", stochastic: every step from a timestep `t > 0`
//! adds seeded noise (so with `steps_offset` = 1 the last step does too, as in diffusers).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::{
    alpha_at, alpha_x0, check_same_shape, check_step_index, check_steps, leading_timesteps, limit_x0, numpy_linspace,
    randn, torch_clamp, trailing_timesteps, wrap_index, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    SchedulerKind, TimestepSpacing, TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "ddpm";

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DdpmScheduler::new(&DdpmConfig::from_config(config)?, steps)?))
}

/// The variance of the noise added at each step (`variance_type`). `fixed_large_log` (whose
/// `step` takes the square root of a log, NaN in diffusers) and `learned` / `learned_range` (they
/// need a UNet predicting the variance in extra output channels; SD's has 4) are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// The posterior variance `β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t` (σ² = β̃ in the paper).
    FixedSmall,
    /// The same through `exp(0.5 · log β̃_t)`, used directly as the standard deviation.
    FixedSmallLog,
    /// `β_t` (σ² = β in the paper).
    FixedLarge,
}

/// `DDPMScheduler`'s config keys, resolved with its defaults (`DDPMScheduler.from_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct DdpmConfig {
    pub train: TrainSchedule,
    /// Default fixed_small.
    pub variance_type: VarianceType,
    /// Clamp the predicted `x₀` to `±clip_sample_range` (default true); ignored with `thresholding`.
    pub clip_sample: bool,
    /// Default 1.0.
    pub clip_sample_range: f64,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of `x₀` (default false): `Some((dynamic_thresholding_ratio,
    /// sample_max_value))`, defaults 0.995 and 1.0.
    pub thresholding: Option<(f64, f64)>,
    /// Default leading.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
}

impl DdpmConfig {
    /// Resolves `config` the way `DDPMScheduler.from_config(config)` does. Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        match config.values().get("variance_type").and_then(|v| v.as_str()) {
            Some(v @ ("learned" | "learned_range")) => {
                return Err(r.error(format!(
                    "`variance_type` = \"{v}\" needs a UNet that predicts the variance (twice the latent \
                     channels); not supported; accepted: fixed_small, fixed_small_log, fixed_large"
                )))
            }
            Some("fixed_large_log") => {
                return Err(r.error(
                    "`variance_type` = \"fixed_large_log\" is not supported (diffusers' DDPM step takes the square \
                     root of its log and yields NaN); accepted: fixed_small, fixed_small_log, fixed_large"
                        .into(),
                ))
            }
            _ => {}
        }
        Ok(DdpmConfig {
            train: TrainSchedule::read(&r)?,
            variance_type: r.choice(
                "variance_type",
                VarianceType::FixedSmall,
                &[
                    ("fixed_small", VarianceType::FixedSmall),
                    ("fixed_small_log", VarianceType::FixedSmallLog),
                    ("fixed_large", VarianceType::FixedLarge),
                ],
            )?,
            clip_sample: r.bool("clip_sample", true)?,
            clip_sample_range: r.float("clip_sample_range", 1.0)?,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            thresholding: r.thresholding()?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Leading, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
        })
    }
}

/// DDPM state for one request: `DDPMScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    /// Training timesteps, descending (may end with -1 with `trailing`, see `trailing_timesteps`).
    train_timesteps: Vec<i64>,
    timesteps: Vec<f32>,
    variance_type: VarianceType,
    prediction_type: PredictionType,
    /// Clamp bounds for `x₀`, as float32 like torch's `clamp` scalars.
    clip: Option<(f32, f32)>,
    thresholding: Option<(f64, f64)>,
}

impl DdpmScheduler {
    /// `DDPMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &DdpmConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        let train_timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, (num_train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => leading_timesteps(steps, num_train, config.steps_offset),
            TimestepSpacing::Trailing => trailing_timesteps(steps, num_train),
        };
        if let Some(&t) = train_timesteps.iter().find(|&&t| wrap_index(t, num_train).is_none()) {
            return Err(Error::Scheduler {
                scheduler: NAME,
                message: format!(
                    "{steps} steps with steps_offset {} give timestep {t}, outside the {num_train} training \
                     timesteps; lower `steps_offset` or the step count",
                    config.steps_offset
                ),
            });
        }
        let clip = config.clip_sample.then(|| (-config.clip_sample_range as f32, config.clip_sample_range as f32));
        Ok(DdpmScheduler {
            alphas_cumprod: config.train.alphas_cumprod(),
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
            variance_type: config.variance_type,
            prediction_type: config.prediction_type,
            clip,
            thresholding: config.thresholding,
        })
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
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
        assert!(step < self.num_steps(), "ddpm: step index {step} out of range 0..{}", self.num_steps());
    }

    /// `DDPMScheduler.step(model_output, timesteps[step], sample)`: formula (7) of the DDPM paper
    /// from `t` to the next timestep of the schedule (`previous_timestep`; -1 after the last, whose
    /// ᾱ is 1), float32 scalars in diffusers' order. When `t > 0` it draws one standard normal
    /// tensor of the sample's shape from `noise` and adds it times the step's standard deviation.
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
        // `previous_timestep`: the schedule's next entry (timesteps are distinct), -1 after the end.
        let prev_t = self.train_timesteps.get(step + 1).copied().unwrap_or(-1);
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, t);
        let alpha_prod_t_prev = if prev_t >= 0 { alpha_at(&self.alphas_cumprod, prev_t) } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let prediction = self.prediction_type;
        let mut x0 = Zip::from(&*sample)
            .and(&model_output)
            .map_collect(|&s, &m| alpha_x0(prediction, sqrt_alpha, sqrt_beta, s, m));
        limit_x0(&mut x0, self.thresholding, self.clip);
        let x0_coeff = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        Zip::from(&mut *sample).and(&x0).for_each(|x, &x0| *x = x0_coeff * x0 + sample_coeff * *x);

        if t > 0 {
            let z = randn(noise, model_output.shape());
            // `_get_variance(t)`.
            let variance =
                torch_clamp((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t, 1e-20, f32::INFINITY);
            let std_dev = match self.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
            };
            Zip::from(sample).and(&z).for_each(|x, &z| *x += std_dev * z);
        }
        Ok(())
    }

    /// `DDPMScheduler.add_noise`: `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise` at `t = timesteps[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert_eq!(noise.shape(), original.shape(), "ddpm add_noise: noise and original shapes differ");
        let alpha = alpha_at(&self.alphas_cumprod, self.train_timesteps[step]);
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        Zip::from(&original).and(&noise).map_collect(|&x, &n| a * x + b * n)
    }
}
