//! Heun (diffusers `schedulers/scheduling_heun_discrete.py`, `HeunDiscreteScheduler`): a
//! second-order (trapezoidal) solver with two model evaluations per step.
//!
//! As in diffusers, `timesteps()` holds every model evaluation (`2·steps − 1` of them: the first
//! timestep once, the others twice) and the step indices alternate between the two stages: even
//! indices take an Euler step and remember its derivative, odd ones redo it from the remembered
//! sample with the average of both derivatives. The last step (an even index) is a plain Euler
//! step to sigma 0. `num_steps()` is therefore the number of model calls.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::sigmas::{
    interp_sigmas, karras_schedule, scale_by_sigma, schedule_train_sigmas, sigma_init_noise, spaced_timesteps, SigmaX0,
};
use super::{
    check_same_shape, check_step_index, check_steps, index_for_timestep, torch_clamp, NoiseSource, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing, TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "heun";

/// `HeunDiscreteScheduler`'s config keys, resolved with its defaults.
///
/// Its `__init__` has no `rescale_betas_zero_snr`, so `from_config` ignores that key and so does
/// this (`train.rescale_betas_zero_snr` is always false).
#[derive(Debug, Clone, PartialEq)]
pub struct HeunConfig {
    /// Heun's own defaults: `beta_start` 0.00085, `beta_end` 0.012, `linear`. Its `exp` beta
    /// schedule is refused.
    pub train: TrainSchedule,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Karras et al. (2022) sigmas, rho = 7 (default false).
    pub use_karras_sigmas: bool,
    /// Karras sigma range; `None` takes the interpolated schedule's ends. Not `__init__` keys, but
    /// diffusers reads them from the config when present.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Clamp the predicted `x₀` to `±clip_sample_range` (default false, range 1).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Default linspace.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
}

impl HeunConfig {
    /// Resolves `config` the way `HeunDiscreteScheduler.from_config(config)` does. Errors name
    /// the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas"] {
            if r.bool(key, false)? {
                return Err(r.error(format!("`{key}` = true is not supported yet; accepted: false")));
            }
        }
        let mut train = TrainSchedule::read(&r)?;
        train.beta_start = r.float("beta_start", 0.00085)?;
        train.beta_end = r.float("beta_end", 0.012)?;
        train.rescale_betas_zero_snr = false;
        Ok(HeunConfig {
            train,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            sigma_min: r.opt_float("sigma_min")?,
            sigma_max: r.opt_float("sigma_max")?,
            clip_sample: r.bool("clip_sample", false)?,
            clip_sample_range: r.float("clip_sample_range", 1.0)?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
        })
    }
}

/// What the first stage of a step leaves for the second (diffusers' `prev_derivative`, `dt`,
/// `sample`).
#[derive(Debug, Clone)]
struct FirstStage {
    step: usize,
    derivative: ArrayD<f32>,
    dt: f32,
    sample: ArrayD<f32>,
}

/// Heun state for one request: `HeunDiscreteScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct HeunScheduler {
    /// `2·steps − 1` model evaluations.
    timesteps: Vec<f32>,
    /// `σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0`: the sigma at each step index, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    first_stage: Option<FirstStage>,
}

impl HeunScheduler {
    /// `HeunDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &HeunConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        let train_sigmas = schedule_train_sigmas(&config.train);
        let mut timesteps = spaced_timesteps(config.timestep_spacing, steps, num_train, config.steps_offset);
        let mut sigmas = interp_sigmas(&timesteps, &train_sigmas);
        if config.use_karras_sigmas {
            (sigmas, timesteps) =
                karras_schedule(NAME, &sigmas, steps, config.sigma_min, config.sigma_max, &train_sigmas)?;
        }
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        // Every sigma but the first and the final 0, and every timestep but the first, twice
        // (`repeat_interleave(2)`).
        let sigmas = repeat_inner(&sigmas, sigmas.len() - 1);
        let timesteps = repeat_inner(&timesteps, timesteps.len());
        let init_noise_sigma = sigma_init_noise(&sigmas, config.timestep_spacing);
        Ok(HeunScheduler {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
            clip_sample_range: config.clip_sample.then_some(config.clip_sample_range as f32),
            first_stage: None,
        })
    }
}

/// `cat([x[:1], x[1:end].repeat_interleave(2), x[end:]])`.
fn repeat_inner(x: &[f32], end: usize) -> Vec<f32> {
    x.iter().enumerate().flat_map(|(i, &v)| std::iter::repeat_n(v, if i == 0 || i >= end { 1 } else { 2 })).collect()
}

impl Scheduler for HeunScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Heun
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn order(&self) -> usize {
        2
    }

    /// The sigma at each step index (inner ones repeated, as diffusers holds them), then 0
    /// (`len() == num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// `sample / (sigma² + 1) ** 0.5` in float32, with the sigma of step index `step`.
    fn scale_model_input(&self, sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "heun: step index {step} out of range 0..{}", self.num_steps());
        scale_by_sigma(sample, self.sigmas[step]);
    }

    /// `HeunDiscreteScheduler.step(model_output, timesteps[step], sample)`, each float32 op in
    /// diffusers' order. An odd `step` is the second stage of the step begun at `step − 1`, which
    /// must be the previous call (an error otherwise).
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        let second_stage = step % 2 == 1;
        let first = if second_stage {
            match self.first_stage.as_ref() {
                // Kept on error, so the loop can still go on with the right index.
                Some(first) if first.step + 1 == step => self.first_stage.take(),
                _ => {
                    return Err(Error::Scheduler {
                        scheduler: NAME,
                        message: format!(
                            "step index {step} is the second model evaluation of a Heun step: call step {} first",
                            step - 1
                        ),
                    })
                }
            }
        } else {
            None
        };
        // First stage: sigma = sigmas[step], sigma_next = sigmas[step + 1], x₀ from sigma_hat =
        // sigma. Second stage: sigma_next = sigmas[step], and x₀ from sigma_next.
        let sigma_input = self.sigmas[step];
        let x0_at_input = SigmaX0::new(self.prediction_type, sigma_input);
        let clip = self.clip_sample_range;
        let predict_x0 = |s: f32, m: f32| {
            let x0 = x0_at_input.x0(s, m);
            clip.map_or(x0, |r| torch_clamp(x0, -r, r))
        };
        match first {
            None => {
                let dt = self.sigmas[step + 1] - sigma_input;
                let derivative =
                    Zip::from(&*sample).and(&model_output).map_collect(|&s, &m| (s - predict_x0(s, m)) / sigma_input);
                let first_sample = sample.clone();
                Zip::from(&mut *sample).and(&derivative).for_each(|x, &d| *x += d * dt);
                self.first_stage = Some(FirstStage { step, derivative, dt, sample: first_sample });
            }
            Some(FirstStage { derivative: prev, dt, sample: first_sample, .. }) => {
                Zip::from(&mut *sample).and(&model_output).and(&prev).and(&first_sample).for_each(|x, &m, &p, &s0| {
                    let d = (*x - predict_x0(*x, m)) / sigma_input;
                    let d = (p + d) / 2.0;
                    *x = s0 + d * dt;
                });
            }
        }
        Ok(())
    }

    /// `HeunDiscreteScheduler.add_noise`: `original + noise · σ`, at the step index diffusers
    /// looks `timesteps[step]` up at (the second of a repeated pair, which has the same sigma).
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "heun: step index {step} out of range 0..{}", self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "heun add_noise: noise and original shapes differ");
        let sigma = self.sigmas[index_for_timestep(&self.timesteps, step)];
        Zip::from(&original).and(&noise).map_collect(|&x, &n| x + n * sigma)
    }
}

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(HeunScheduler::new(&HeunConfig::from_config(config)?, steps)?))
}
