//! Euler (diffusers `schedulers/scheduling_euler_discrete.py`, `EulerDiscreteScheduler`),
//! deterministic (`s_churn = 0`, so `sigma_hat == sigma`).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::sigmas::{
    interp_sigmas, karras_schedule, scale_by_sigma, schedule_train_sigmas, sigma_init_noise, spaced_timesteps, SigmaX0,
};
use super::{
    check_same_shape, check_step_index, check_steps, torch_linspace_f32, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, TimestepSpacing, TrainSchedule, SPACINGS,
};
use crate::error::Result;

const NAME: &str = "euler";

/// How the inference sigmas are taken from the training ones (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// `np.interp` of the training sigmas at the (fractional) timesteps.
    Linear,
    /// `exp(linspace(log σ_max, log σ_min, steps + 1))`, independent of the timesteps.
    LogLinear,
}

/// The sigma appended after the last step (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// 0: the last step lands on the denoised sample.
    Zero,
    /// The training schedule's smallest sigma.
    SigmaMin,
}

/// What is fed to the UNet as timestep (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// Training timesteps (possibly fractional).
    Discrete,
    /// `0.25 · ln σ`; diffusers only applies it with `v_prediction`, and neither does this.
    Continuous,
}

/// `EulerDiscreteScheduler`'s config keys, resolved with its defaults
/// (`EulerDiscreteScheduler.from_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct EulerConfig {
    pub train: TrainSchedule,
    /// Default epsilon (`original_sample` is read as `sample`, as diffusers does).
    pub prediction_type: PredictionType,
    /// Default linear.
    pub interpolation_type: InterpolationType,
    /// Karras et al. (2022) sigmas, rho = 7 (default false).
    pub use_karras_sigmas: bool,
    /// Karras sigma range; `None` takes the interpolated schedule's ends.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Default linspace (unlike DDIM).
    pub timestep_spacing: TimestepSpacing,
    /// Default discrete.
    pub timestep_type: TimestepType,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
    /// Default zero.
    pub final_sigmas_type: FinalSigmasType,
}

impl EulerConfig {
    /// Resolves `config` the way `EulerDiscreteScheduler.from_config(config)` does. Errors name
    /// the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas"] {
            if r.bool(key, false)? {
                return Err(r.error(format!("`{key}` = true is not supported yet; accepted: false")));
            }
        }
        Ok(EulerConfig {
            train: TrainSchedule::read(&r)?,
            prediction_type: r.choice(
                "prediction_type",
                PredictionType::Epsilon,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                    ("original_sample", PredictionType::Sample),
                ],
            )?,
            interpolation_type: r.choice(
                "interpolation_type",
                InterpolationType::Linear,
                &[("linear", InterpolationType::Linear), ("log_linear", InterpolationType::LogLinear)],
            )?,
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            sigma_min: r.opt_float("sigma_min")?,
            sigma_max: r.opt_float("sigma_max")?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            timestep_type: r.choice(
                "timestep_type",
                TimestepType::Discrete,
                &[("discrete", TimestepType::Discrete), ("continuous", TimestepType::Continuous)],
            )?,
            steps_offset: r.int("steps_offset", 0)?,
            final_sigmas_type: r.choice(
                "final_sigmas_type",
                FinalSigmasType::Zero,
                &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
            )?,
        })
    }
}

/// Euler state for one request: `EulerDiscreteScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    timesteps: Vec<f32>,
    /// One per step plus the final one (two more with `log_linear`, as in diffusers).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerScheduler {
    /// `EulerDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &EulerConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        // float32 torch ops: ((1 - ᾱ) / ᾱ) ** 0.5, indexed by training timestep.
        let train_sigmas = schedule_train_sigmas(&config.train);
        // numpy float32 timesteps of the spacing.
        let mut timesteps = spaced_timesteps(config.timestep_spacing, steps, num_train, config.steps_offset);

        // Sigmas in float64 (numpy) until the final float32 cast.
        let mut sigmas: Vec<f64> = match config.interpolation_type {
            InterpolationType::Linear => interp_sigmas(&timesteps, &train_sigmas),
            InterpolationType::LogLinear => {
                let (first, last) = (train_sigmas[0], train_sigmas[num_train - 1]);
                torch_linspace_f32(last.ln() as f64, first.ln() as f64, steps + 1)
                    .iter()
                    .map(|x| x.exp() as f64)
                    .collect()
            }
        };
        if config.use_karras_sigmas {
            (sigmas, timesteps) =
                karras_schedule(NAME, &sigmas, steps, config.sigma_min, config.sigma_max, &train_sigmas)?;
        }
        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([sigma_last]).collect();

        if config.timestep_type == TimestepType::Continuous && config.prediction_type == PredictionType::VPrediction {
            timesteps = sigmas[..sigmas.len() - 1].iter().map(|s| 0.25 * s.ln()).collect();
        }

        let init_noise_sigma = sigma_init_noise(&sigmas, config.timestep_spacing);
        Ok(EulerScheduler { timesteps, sigmas, init_noise_sigma, prediction_type: config.prediction_type })
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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

    /// The sigma at each step index, then the final one (`len() >= num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// `sample / (sigma² + 1) ** 0.5` in float32.
    fn scale_model_input(&self, sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "euler: step index {step} out of range 0..{}", self.num_steps());
        scale_by_sigma(sample, self.sigmas[step]);
    }

    /// `EulerDiscreteScheduler.step(model_output, timesteps[step], sample)` with `s_churn = 0`:
    /// `x + (x − x₀)/σ · (σ_next − σ)`, each float32 op in diffusers' order.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        let sigma = self.sigmas[step];
        // gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) = 0, so sigma_hat = sigma * 1.0.
        let sigma_hat = sigma;
        let dt = self.sigmas[step + 1] - sigma_hat;
        let x0 = SigmaX0::new(self.prediction_type, sigma_hat);
        Zip::from(sample).and(&model_output).for_each(|x, &m| {
            let s = *x;
            let x0 = x0.x0(s, m);
            let derivative = (s - x0) / sigma_hat;
            *x = s + derivative * dt;
        });
        Ok(())
    }

    /// `EulerDiscreteScheduler.add_noise`: `original + noise · σ[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "euler: step index {step} out of range 0..{}", self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "euler add_noise: noise and original shapes differ");
        let sigma = self.sigmas[step];
        Zip::from(&original).and(&noise).map_collect(|&x, &n| x + n * sigma)
    }
}
