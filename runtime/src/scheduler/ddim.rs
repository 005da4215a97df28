//! DDIM (diffusers `schedulers/scheduling_ddim.py`, `DDIMScheduler`): deterministic with `eta = 0`,
//! adding seeded noise with `eta > 0`.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::{
    alpha_at, alpha_x0, check_same_shape, check_step_index, check_steps, leading_timesteps, numpy_linspace, randn,
    threshold_sample, torch_clamp, trailing_timesteps, wrap_index, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, TimestepSpacing, TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "ddim";

/// `DDIMScheduler`'s config keys, resolved with its defaults (`DDIMScheduler.from_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    pub train: TrainSchedule,
    /// Clamp the predicted `x₀` to `±clip_sample_range` (default true); ignored with `thresholding`.
    pub clip_sample: bool,
    /// Default 1.0.
    pub clip_sample_range: f64,
    /// The last step's "previous" ᾱ is 1 (default true) instead of `alphas_cumprod[0]`.
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (default 0; SD 1.x configs say 1).
    pub steps_offset: i64,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Default leading.
    pub timestep_spacing: TimestepSpacing,
    /// Dynamic thresholding of `x₀` (default false): `Some((dynamic_thresholding_ratio,
    /// sample_max_value))`, defaults 0.995 and 1.0.
    pub thresholding: Option<(f64, f64)>,
    /// The `eta` of `step` ([`SchedulerConfig::eta`]): 0 is deterministic, > 0 adds `eta · σ_t`
    /// times seeded noise.
    pub eta: f32,
}

impl DdimConfig {
    /// Resolves `config` the way `DDIMScheduler.from_config(config)` does. Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        let eta = config.eta;
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(r.error(format!("eta = {eta} must be a number >= 0 (0 is deterministic DDIM)")));
        }
        Ok(DdimConfig {
            train: TrainSchedule::read(&r)?,
            clip_sample: r.bool("clip_sample", true)?,
            clip_sample_range: r.float("clip_sample_range", 1.0)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", true)?,
            steps_offset: r.int("steps_offset", 0)?,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Leading, &SPACINGS)?,
            thresholding: r.thresholding()?,
            eta,
        })
    }
}

/// DDIM state for one request: `DDIMScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    /// ᾱ used as "previous" once the previous timestep is negative.
    final_alpha_cumprod: f32,
    /// Training timesteps (may include -1 with `trailing`, see `trailing_timesteps`).
    train_timesteps: Vec<i64>,
    timesteps: Vec<f32>,
    /// `num_train_timesteps // steps`: `step` goes from `t` to `t - step_ratio`, whatever the
    /// spacing (so `trailing` may step to a timestep that is not the next one in the list).
    step_ratio: i64,
    prediction_type: PredictionType,
    /// Clamp bounds for `x₀`, as float32 like torch's `clamp` scalars.
    clip: Option<(f32, f32)>,
    thresholding: Option<(f64, f64)>,
    eta: f32,
}

impl DdimScheduler {
    /// `DDIMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &DdimConfig, steps: usize) -> Result<Self> {
        let r_err = |message: String| Error::Scheduler { scheduler: NAME, message };
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        let alphas_cumprod = config.train.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };

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
            return Err(r_err(format!(
                "{steps} steps with steps_offset {} give timestep {t}, outside the {num_train} training \
                 timesteps; lower `steps_offset` or the step count",
                config.steps_offset
            )));
        }
        let clip = config.clip_sample.then(|| (-config.clip_sample_range as f32, config.clip_sample_range as f32));
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
            step_ratio: (num_train / steps) as i64,
            prediction_type: config.prediction_type,
            clip,
            thresholding: config.thresholding,
            eta: config.eta,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
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
        assert!(step < self.num_steps(), "ddim: step index {step} out of range 0..{}", self.num_steps());
    }

    /// `DDIMScheduler.step(model_output, timesteps[step], sample, eta)`, formulas (12) and (16)
    /// of the DDIM paper, with every coefficient a float32 scalar computed in diffusers' order.
    /// With `eta > 0` it draws one standard normal tensor of the sample's shape from `noise`.
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
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, t);
        let alpha_prod_t_prev =
            if prev_t >= 0 { alpha_at(&self.alphas_cumprod, prev_t) } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        // `_get_variance`; with eta = 0 it only matters if it is NaN, as in diffusers.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction_coef = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt();

        let prediction = self.prediction_type;
        let split = |s: f32, m: f32| {
            let x0 = alpha_x0(prediction, sqrt_alpha, sqrt_beta, s, m);
            let eps = match prediction {
                PredictionType::Epsilon => m,
                PredictionType::Sample => (s - sqrt_alpha * m) / sqrt_beta,
                PredictionType::VPrediction => sqrt_alpha * m + sqrt_beta * s,
            };
            (x0, eps)
        };
        if let Some((ratio, max_value)) = self.thresholding {
            // Thresholding looks at all of x₀ at once; ε is the unthresholded one, as in diffusers.
            let mut x0 = Zip::from(&*sample).and(&model_output).map_collect(|&s, &m| split(s, m).0);
            threshold_sample(&mut x0, ratio, max_value);
            Zip::from(&mut *sample).and(&model_output).and(&x0).for_each(|x, &m, &x0| {
                let eps = split(*x, m).1;
                *x = sqrt_alpha_prev * x0 + direction_coef * eps;
            });
        } else {
            let clip = self.clip;
            Zip::from(&mut *sample).and(&model_output).for_each(|x, &m| {
                let (x0, eps) = split(*x, m);
                let x0 = clip.map_or(x0, |(lo, hi)| torch_clamp(x0, lo, hi));
                *x = sqrt_alpha_prev * x0 + direction_coef * eps;
            });
        }
        if self.eta > 0.0 {
            let z = randn(noise, sample.shape());
            Zip::from(sample).and(&z).for_each(|x, &z| *x += std_dev_t * z);
        }
        Ok(())
    }

    /// `DDIMScheduler.add_noise`: `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise` at `t = timesteps[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert_eq!(noise.shape(), original.shape(), "ddim add_noise: noise and original shapes differ");
        let alpha = alpha_at(&self.alphas_cumprod, self.train_timesteps[step]);
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        Zip::from(&original).and(&noise).map_collect(|&x, &n| a * x + b * n)
    }
}
