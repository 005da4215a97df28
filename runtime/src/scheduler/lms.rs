//! LMS (diffusers `schedulers/scheduling_lms_discrete.py`, `LMSDiscreteScheduler`): the linear
//! multistep sampler of k-diffusion on Karras-style sigmas, order 4 by default. Deterministic.
//!
//! Its sigma schedule and timesteps are Euler's (`EulerDiscreteScheduler` with linear
//! interpolation and a final sigma of 0; the diffusers code is the same), so they are built by
//! [`EulerScheduler`].

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::euler::{EulerConfig, EulerScheduler, FinalSigmasType, InterpolationType, TimestepType};
use super::sigmas::{scale_by_sigma, SigmaX0};
use super::{
    check_same_shape, check_step_index, check_steps, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    SchedulerKind, TimestepSpacing, TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "lms";

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(LmsScheduler::new(&LmsConfig::from_config(config)?, steps)?))
}

/// `LMSDiscreteScheduler`'s config keys, resolved with its defaults
/// (`LMSDiscreteScheduler.from_config`), plus the `order` argument of its `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct LmsConfig {
    /// `rescale_betas_zero_snr` is not a key of `LMSDiscreteScheduler` and is always false here.
    pub train: TrainSchedule,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Karras et al. (2022) sigmas, rho = 7, over the interpolated schedule's range (default false).
    pub use_karras_sigmas: bool,
    /// Default linspace.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
    /// The multistep order, diffusers' `step(..., order=4)` argument (not a config key): at most
    /// this many past derivatives are combined. 4 when built from a [`SchedulerConfig`].
    pub order: usize,
}

impl LmsConfig {
    /// Resolves `config` the way `LMSDiscreteScheduler.from_config(config)` does, with order 4.
    /// Errors name the key.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas"] {
            if r.bool(key, false)? {
                return Err(r.error(format!("`{key}` = true is not supported yet; accepted: false")));
            }
        }
        let mut train = TrainSchedule::read(&r)?;
        // Not an `__init__` key of LMSDiscreteScheduler: from_config drops it.
        train.rescale_betas_zero_snr = false;
        Ok(LmsConfig {
            train,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
            order: 4,
        })
    }
}

/// LMS state for one request: `LMSDiscreteScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct LmsScheduler {
    timesteps: Vec<f32>,
    /// One per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    order: usize,
    /// The last `order` derivatives `(x − x₀) / σ`, oldest first.
    derivatives: Vec<ArrayD<f32>>,
}

impl LmsScheduler {
    /// `LMSDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &LmsConfig, steps: usize) -> Result<Self> {
        let err = |message: String| Error::Scheduler { scheduler: NAME, message };
        check_steps(NAME, steps, config.train.num_train_timesteps)?;
        if config.order == 0 {
            return Err(err("`order` must be at least 1 (diffusers' default is 4)".into()));
        }
        if config.use_karras_sigmas && config.train.num_train_timesteps < 2 {
            return Err(err("`use_karras_sigmas` = true needs `num_train_timesteps` >= 2".into()));
        }
        let euler = EulerScheduler::new(
            &EulerConfig {
                train: config.train.clone(),
                prediction_type: config.prediction_type,
                interpolation_type: InterpolationType::Linear,
                use_karras_sigmas: config.use_karras_sigmas,
                sigma_min: None,
                sigma_max: None,
                timestep_spacing: config.timestep_spacing,
                timestep_type: TimestepType::Discrete,
                steps_offset: config.steps_offset,
                final_sigmas_type: FinalSigmasType::Zero,
            },
            steps,
        )?;
        Ok(LmsScheduler {
            timesteps: euler.timesteps().to_vec(),
            sigmas: euler.sigmas().unwrap_or_default().to_vec(),
            init_noise_sigma: euler.init_noise_sigma(),
            prediction_type: config.prediction_type,
            order: config.order,
            derivatives: Vec::new(),
        })
    }
}

/// `get_lms_coefficient(order, t, j)`: the integral over `[σ_t, σ_{t+1}]` of the Lagrange basis
/// polynomial that is 1 at `σ_{t−j}` and 0 at the other `σ_{t−k}`, `k < order`.
///
/// diffusers integrates it numerically (`scipy.integrate.quad`, 21-point Gauss–Kronrod, exact for
/// this polynomial of degree ≤ 3 up to rounding) while evaluating the integrand in float32 (the
/// sigmas are torch scalars); this integrates the polynomial exactly in float64, around `σ_t` for
/// conditioning. The two agree to a few float32 ulps of the coefficient, which `step` rounds to
/// float32 anyway.
fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, j: usize) -> f64 {
    let a = sigmas[t] as f64;
    let h = sigmas[t + 1] as f64 - a;
    let node = |k: usize| sigmas[t - k] as f64;
    // Coefficients (lowest degree first) of ∏_{k≠j} (u − (σ_{t−k} − σ_t)), u = τ − σ_t.
    let mut poly = vec![1.0f64];
    let mut denom = 1.0f64;
    for k in (0..order).filter(|&k| k != j) {
        let root = node(k) - a;
        let mut next = vec![0.0f64; poly.len() + 1];
        for (i, &c) in poly.iter().enumerate() {
            next[i + 1] += c;
            next[i] -= c * root;
        }
        poly = next;
        denom *= node(j) - node(k);
    }
    // ∫₀ʰ Σ cᵢ uⁱ du = Σ cᵢ h^(i+1) / (i+1), by Horner.
    let integral = poly.iter().enumerate().rev().fold(0.0f64, |acc, (i, &c)| acc * h + c / (i + 1) as f64) * h;
    integral / denom
}

impl Scheduler for LmsScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lms
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

    /// The sigma at each step index, then the final 0 (`len() == num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// `sample / (sigma² + 1) ** 0.5` in float32.
    fn scale_model_input(&self, sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "lms: step index {step} out of range 0..{}", self.num_steps());
        scale_by_sigma(sample, self.sigmas[step]);
    }

    /// `LMSDiscreteScheduler.step(model_output, timesteps[step], sample, order)`: the derivative
    /// `(x − x₀)/σ` joins the history, and `x` moves by `Σ coeffⱼ · derivativeⱼ` over the
    /// `min(step + 1, order)` latest ones, each coefficient rounded to float32 as torch does.
    ///
    /// As in diffusers, the effective order follows the step index, not the history length: a loop
    /// starting at a later index (img2img) combines only the derivatives it has, with that
    /// order's coefficients.
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
        let x0 = SigmaX0::new(self.prediction_type, sigma);
        let derivative = Zip::from(&*sample).and(&model_output).map_collect(|&s, &m| (s - x0.x0(s, m)) / sigma);
        self.derivatives.push(derivative);
        if self.derivatives.len() > self.order {
            self.derivatives.remove(0);
        }
        let order = (step + 1).min(self.order);
        // sum(coeff * derivative for ...) starts from Python's 0, so the first term is the sum.
        let mut total: Option<ArrayD<f32>> = None;
        for (j, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let coeff = lms_coefficient(&self.sigmas, order, step, j) as f32;
            match &mut total {
                None => total = Some(derivative.mapv(|d| coeff * d)),
                Some(acc) => Zip::from(acc).and(derivative).for_each(|a, &d| *a += coeff * d),
            }
        }
        if let Some(total) = total {
            Zip::from(sample).and(&total).for_each(|x, &d| *x += d);
        }
        Ok(())
    }

    /// `LMSDiscreteScheduler.add_noise`: `original + noise · σ[step]`.
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "lms: step index {step} out of range 0..{}", self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "lms add_noise: noise and original shapes differ");
        let sigma = self.sigmas[step];
        Zip::from(&original).and(&noise).map_collect(|&x, &n| x + n * sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Order 1 is Euler: the one coefficient is `σ_{t+1} − σ_t`.
    #[test]
    fn order_one_coefficient_is_the_step() {
        let sigmas = [14.6f32, 9.7, 3.2, 0.0];
        for t in 0..3 {
            let c = lms_coefficient(&sigmas, 1, t, 0);
            assert_eq!(c as f32, sigmas[t + 1] - sigmas[t]);
        }
    }

    /// The basis polynomials sum to 1, so the coefficients sum to the interval's length.
    #[test]
    fn coefficients_sum_to_the_step() {
        let sigmas = [14.6f32, 9.7, 6.1, 3.2, 1.5, 0.0];
        for order in 1..=4 {
            let t = 4;
            let sum: f64 = (0..order).map(|j| lms_coefficient(&sigmas, order, t, j)).sum();
            let step = sigmas[t + 1] as f64 - sigmas[t] as f64;
            assert!((sum - step).abs() <= 1e-12 * step.abs(), "order {order}: {sum} vs {step}");
        }
    }
}
