//! Euler Ancestral, "Euler a" (diffusers `schedulers/scheduling_euler_ancestral_discrete.py`,
//! `EulerAncestralDiscreteScheduler`): an Euler step down to `sigma_down`, then fresh noise of
//! standard deviation `sigma_up`, so `sigma_down² + sigma_up² = sigma_next²`. Stochastic: one
//! `randn` per step, the last included.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::sigmas::{
    interp_sigmas, scale_by_sigma, schedule_train_sigmas, sigma_init_noise, spaced_timesteps, SigmaX0,
};
use super::{
    check_same_shape, check_step_index, check_steps, index_for_timestep, randn, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, TimestepSpacing, TrainSchedule, SPACINGS,
};
use crate::error::Result;

const NAME: &str = "euler-a";

/// `EulerAncestralDiscreteScheduler`'s config keys, resolved with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerAncestralConfig {
    /// Includes `rescale_betas_zero_snr` (the last training sigma is then about 4096, as diffusers
    /// sets `alphas_cumprod[-1] = 2**-24`).
    pub train: TrainSchedule,
    /// Default epsilon; `sample` is refused (diffusers raises `NotImplementedError` in `step`).
    pub prediction_type: PredictionType,
    /// Default linspace.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
}

impl EulerAncestralConfig {
    /// Resolves `config` the way `EulerAncestralDiscreteScheduler.from_config(config)` does.
    /// Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        Ok(EulerAncestralConfig {
            train: TrainSchedule::read(&r)?,
            prediction_type: r.choice(
                "prediction_type",
                PredictionType::Epsilon,
                &[("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction)],
            )?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
        })
    }
}

/// Euler Ancestral state for one request: `EulerAncestralDiscreteScheduler` after
/// `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f32>,
    /// One per step, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerAncestralScheduler {
    /// `EulerAncestralDiscreteScheduler(**config)` followed by `set_timesteps(steps)`: the same
    /// timesteps and (linearly interpolated) sigmas as Euler's defaults.
    pub fn new(config: &EulerAncestralConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        let train_sigmas = schedule_train_sigmas(&config.train);
        let timesteps = spaced_timesteps(config.timestep_spacing, steps, num_train, config.steps_offset);
        let sigmas: Vec<f32> =
            interp_sigmas(&timesteps, &train_sigmas).iter().map(|&s| s as f32).chain([0.0]).collect();
        let init_noise_sigma = sigma_init_noise(&sigmas, config.timestep_spacing);
        Ok(EulerAncestralScheduler { timesteps, sigmas, init_noise_sigma, prediction_type: config.prediction_type })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn order(&self) -> usize {
        1
    }

    /// The sigma at each step index, then 0 (`len() == num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// `sample / (sigma² + 1) ** 0.5` in float32.
    fn scale_model_input(&self, sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "euler-a: step index {step} out of range 0..{}", self.num_steps());
        scale_by_sigma(sample, self.sigmas[step]);
    }

    /// `EulerAncestralDiscreteScheduler.step(model_output, timesteps[step], sample, generator)`,
    /// each float32 op in diffusers' order; draws one standard normal tensor of the sample's shape.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        let (sigma, sigma_to) = (self.sigmas[step], self.sigmas[step + 1]);
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        // (`Sample` is refused when the config is read.)
        let x0 = SigmaX0::new(self.prediction_type, sigma);
        Zip::from(&mut *sample).and(&model_output).for_each(|x, &m| {
            let s = *x;
            let x0 = x0.x0(s, m);
            let derivative = (s - x0) / sigma;
            *x = s + derivative * dt;
        });
        let draw = randn(noise, model_output.shape());
        Zip::from(sample).and(&draw).for_each(|x, &n| *x += n * sigma_up);
        Ok(())
    }

    /// `EulerAncestralDiscreteScheduler.add_noise`: `original + noise · σ`, at the step index
    /// diffusers looks `timesteps[step]` up at.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "euler-a: step index {step} out of range 0..{}", self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "euler-a add_noise: noise and original shapes differ");
        let sigma = self.sigmas[index_for_timestep(&self.timesteps, step)];
        Zip::from(&original).and(&noise).map_collect(|&x, &n| x + n * sigma)
    }
}

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(EulerAncestralScheduler::new(&EulerAncestralConfig::from_config(config)?, steps)?))
}
