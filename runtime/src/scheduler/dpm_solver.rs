//! DPM-Solver multistep (diffusers `schedulers/scheduling_dpmsolver_multistep.py`,
//! `DPMSolverMultistepScheduler`): DPM-Solver++ ("DPM++ 2M", "DPM++ 2M Karras"), its SDE variant
//! ("DPM++ 2M SDE", stochastic) and the original DPM-Solver, of order 1, 2 or 3.
//!
//! The three runtime kinds are this one class with a preset (`SchedulerKind::preset`); the config
//! handed to [`DpmSolverConfig::from_config`] already carries it. Steps are multistep: each
//! `step` keeps the converted model output for the next ones (per-request state).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::euler::FinalSigmasType;
use super::sigmas::{alpha_sigma_t, karras_sigmas, numpy_interp_index, sigma_to_t, train_sigmas};
use super::{
    check_same_shape, check_step_index, check_steps, index_for_timestep, leading_timesteps, numpy_arange,
    numpy_linspace, randn, threshold_sample, BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    SchedulerKind, TimestepSpacing, TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

/// Which solver (`algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmType {
    /// DPM-Solver++: integrates the data (x₀) prediction. The default; `deis` is read as this.
    DpmSolverPp,
    /// The SDE variant of DPM-Solver++: draws noise every step.
    SdeDpmSolverPp,
    /// The original DPM-Solver (noise prediction); deprecated in diffusers.
    DpmSolver,
    /// Its SDE variant (orders 1 and 2 only, as in diffusers); deprecated in diffusers.
    SdeDpmSolver,
}

impl AlgorithmType {
    fn is_sde(self) -> bool {
        matches!(self, AlgorithmType::SdeDpmSolverPp | AlgorithmType::SdeDpmSolver)
    }

    /// Whether the solver works on x₀ (`++`) rather than ε.
    fn is_data_prediction(self) -> bool {
        matches!(self, AlgorithmType::DpmSolverPp | AlgorithmType::SdeDpmSolverPp)
    }
}

/// The second-order update's form (`solver_type`); the third-order update has one form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// The default; `logrho`, `bh1` and `bh2` are read as this, as in diffusers.
    Midpoint,
    Heun,
}

/// How the inference sigmas are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSchedule {
    /// The training sigmas at the spaced timesteps (`timestep_spacing`).
    Spaced,
    /// Karras et al. (2022), rho = 7 (`use_karras_sigmas`); timesteps rounded from the sigmas.
    Karras,
    /// Uniform in log sigma (`use_lu_lambdas`); timesteps rounded from the sigmas.
    LuLambdas,
}

/// `DPMSolverMultistepScheduler`'s config keys, resolved with its defaults
/// (`DPMSolverMultistepScheduler.from_config`, after the kind's preset).
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverConfig {
    /// The runtime name this config was resolved for (errors and `Scheduler::kind` report it).
    pub kind: SchedulerKind,
    pub train: TrainSchedule,
    /// 1, 2 (default) or 3.
    pub solver_order: usize,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of x₀: `Some((dynamic_thresholding_ratio, sample_max_value))`.
    pub thresholding: Option<(f64, f64)>,
    /// Default dpmsolver++.
    pub algorithm_type: AlgorithmType,
    /// Default midpoint.
    pub solver_type: SolverType,
    /// Lower the order of the last steps when there are fewer than 15 (default true).
    pub lower_order_final: bool,
    /// First-order last step whatever the step count (default false).
    pub euler_at_final: bool,
    /// Spaced (default), `use_karras_sigmas` or `use_lu_lambdas` (Karras wins if both are set).
    pub sigma_schedule: SigmaSchedule,
    /// Karras sigma range. Not keys of this class: diffusers reads them from the config only when
    /// another scheduler's config carried them (`hasattr(self.config, "sigma_min")`).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Default zero; the non-`++` algorithms require sigma_min, as in diffusers.
    pub final_sigmas_type: FinalSigmasType,
    /// Training timesteps whose log-SNR λ is below this are not sampled (default −∞; `null` reads
    /// as −∞ since JSON has no infinity).
    pub lambda_min_clipped: f64,
    /// Default linspace (rounded, see [`DpmSolverScheduler::new`]).
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
}

impl DpmSolverConfig {
    /// Resolves `config` the way `DPMSolverMultistepScheduler.from_config(config)` does; errors
    /// name the key and `kind`.
    pub fn from_config(config: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        let r = config.reader(kind.as_str())?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"] {
            if r.bool(key, false)? {
                return Err(r.error(format!("`{key}` = true is not supported yet; accepted: false")));
            }
        }
        // `variance_type` only matters (the model output carrying a variance) for these two.
        if let Some(v) = config.values().get("variance_type") {
            if matches!(v.as_str(), Some("learned" | "learned_range")) {
                return Err(r.error(format!(
                    "`variance_type` = {v} (a model that predicts its variance) is not supported; accepted: null"
                )));
            }
        }
        let solver_order = r.int("solver_order", 2)?;
        let solver_order = match solver_order {
            1..=3 => solver_order as usize,
            _ => return Err(r.error(format!("`solver_order` = {solver_order} is not supported; accepted: 1, 2, 3"))),
        };
        // diffusers maps `deis` to dpmsolver++ (but checks final_sigmas_type against `deis`).
        let algorithm_name = config.values().get("algorithm_type").and_then(|v| v.as_str()).unwrap_or("");
        let algorithm_type = r.choice(
            "algorithm_type",
            AlgorithmType::DpmSolverPp,
            &[
                ("dpmsolver++", AlgorithmType::DpmSolverPp),
                ("sde-dpmsolver++", AlgorithmType::SdeDpmSolverPp),
                ("dpmsolver", AlgorithmType::DpmSolver),
                ("sde-dpmsolver", AlgorithmType::SdeDpmSolver),
                ("deis", AlgorithmType::DpmSolverPp),
            ],
        )?;
        let final_sigmas_type = r.choice(
            "final_sigmas_type",
            FinalSigmasType::Zero,
            &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
        )?;
        let plus_plus = algorithm_name.is_empty() || algorithm_name.ends_with("++");
        if !plus_plus && final_sigmas_type == FinalSigmasType::Zero {
            return Err(r.error(format!(
                "`final_sigmas_type` = \"zero\" is not supported with `algorithm_type` = \"{algorithm_name}\"; \
                 accepted: sigma_min"
            )));
        }
        if algorithm_type == AlgorithmType::SdeDpmSolver && solver_order == 3 {
            // diffusers has no third-order sde-dpmsolver update (its step fails).
            return Err(r.error(
                "`solver_order` = 3 is not supported with `algorithm_type` = \"sde-dpmsolver\"; accepted: 1, 2".into(),
            ));
        }
        let sigma_schedule = if r.bool("use_karras_sigmas", false)? {
            SigmaSchedule::Karras
        } else if r.bool("use_lu_lambdas", false)? {
            SigmaSchedule::LuLambdas
        } else {
            SigmaSchedule::Spaced
        };
        Ok(DpmSolverConfig {
            kind,
            train: TrainSchedule::read(&r)?,
            solver_order,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            thresholding: r.thresholding()?,
            algorithm_type,
            solver_type: r.choice(
                "solver_type",
                SolverType::Midpoint,
                &[
                    ("midpoint", SolverType::Midpoint),
                    ("heun", SolverType::Heun),
                    ("logrho", SolverType::Midpoint),
                    ("bh1", SolverType::Midpoint),
                    ("bh2", SolverType::Midpoint),
                ],
            )?,
            lower_order_final: r.bool("lower_order_final", true)?,
            euler_at_final: r.bool("euler_at_final", false)?,
            sigma_schedule,
            sigma_min: r.opt_float("sigma_min")?,
            sigma_max: r.opt_float("sigma_max")?,
            final_sigmas_type,
            lambda_min_clipped: r.opt_float("lambda_min_clipped")?.unwrap_or(f64::NEG_INFINITY),
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
        })
    }
}

/// DPM-Solver state for one request: `DPMSolverMultistepScheduler` after `set_timesteps(steps)`,
/// with its multistep history.
#[derive(Debug, Clone)]
pub struct DpmSolverScheduler {
    kind: SchedulerKind,
    /// Training timesteps as the UNet gets them (`trailing` may end with -1, which samples
    /// sigma[0]).
    timesteps: Vec<f32>,
    /// One per step plus the final one.
    sigmas: Vec<f32>,
    solver_order: usize,
    prediction_type: PredictionType,
    thresholding: Option<(f64, f64)>,
    algorithm_type: AlgorithmType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last `solver_order` converted model outputs, oldest first (`model_outputs`).
    model_outputs: Vec<ArrayD<f32>>,
    /// Steps taken so far, capped at `solver_order` (`lower_order_nums`).
    lower_order_nums: usize,
}

/// `λ = log α − log σ_t` (∞ at σ = 0).
fn lambda((alpha, sigma): (f32, f32)) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverScheduler {
    /// `DPMSolverMultistepScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &DpmSolverConfig, steps: usize) -> Result<Self> {
        let name = config.kind.as_str();
        let error = |message: String| Error::Scheduler { scheduler: name, message };
        let num_train = config.train.num_train_timesteps;
        check_steps(name, steps, num_train)?;
        let mut alphas_cumprod = config.train.alphas_cumprod();
        if config.train.rescale_betas_zero_snr {
            // Keeps the last sigma finite (diffusers sets ᾱ to 2**-24).
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&alphas_cumprod);

        let (train_timesteps, sigmas): (Vec<i64>, Vec<f64>) = match config.sigma_schedule {
            SigmaSchedule::Spaced => {
                let t = spaced_timesteps(config, &alphas_cumprod, steps).map_err(error)?;
                // np.interp at integer timesteps; -1 (trailing) clamps to sigma[0].
                let sigmas = t.iter().map(|&t| numpy_interp_index(t as f64, &train_sigmas)).collect();
                (t, sigmas)
            }
            schedule => {
                if num_train < 2 {
                    return Err(error("`use_karras_sigmas` / `use_lu_lambdas` need `num_train_timesteps` >= 2".into()));
                }
                // numpy float32 `np.log` of the float32 sigmas.
                let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
                let sigmas: Vec<f64> = if schedule == SigmaSchedule::Karras {
                    let flipped: Vec<f64> = train_sigmas.iter().rev().map(|&s| s as f64).collect();
                    karras_sigmas(&flipped, steps, config.sigma_min, config.sigma_max)
                } else {
                    // `_convert_to_lu` (rho = 1) of the flipped log sigmas, then exp.
                    let (lambda_min, lambda_max) = (log_sigmas[0] as f64, log_sigmas[num_train - 1] as f64);
                    numpy_linspace(0.0, 1.0, steps)
                        .iter()
                        .map(|ramp| (lambda_max + ramp * (lambda_min - lambda_max)).exp())
                        .collect()
                };
                // Rounded, except for the cosine schedule whose float timesteps torch truncates.
                let round = config.train.beta_schedule != BetaSchedule::SquaredcosCapV2;
                let timesteps = sigmas
                    .iter()
                    .map(|&s| {
                        let t = sigma_to_t(s, &log_sigmas);
                        (if round { t.round_ties_even() } else { t.trunc() }) as i64
                    })
                    .collect();
                (timesteps, sigmas)
            }
        };
        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([sigma_last]).collect();
        Ok(DpmSolverScheduler {
            kind: config.kind,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            sigmas,
            solver_order: config.solver_order,
            prediction_type: config.prediction_type,
            thresholding: config.thresholding,
            algorithm_type: config.algorithm_type,
            solver_type: config.solver_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: Vec::with_capacity(config.solver_order),
            lower_order_nums: 0,
        })
    }

    /// `convert_model_output`: x₀ for the `++` solvers, ε for the others, with thresholding.
    fn convert_model_output(&self, model_output: ArrayViewD<f32>, sample: &ArrayD<f32>, step: usize) -> ArrayD<f32> {
        let (alpha, sigma) = alpha_sigma_t(self.sigmas[step]);
        let prediction = self.prediction_type;
        if self.algorithm_type.is_data_prediction() {
            let mut x0 = Zip::from(sample).and(&model_output).map_collect(|&s, &m| match prediction {
                PredictionType::Epsilon => (s - sigma * m) / alpha,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha * s - sigma * m,
            });
            if let Some((ratio, max_value)) = self.thresholding {
                threshold_sample(&mut x0, ratio, max_value);
            }
            x0
        } else {
            let eps = Zip::from(sample).and(&model_output).map_collect(|&s, &m| match prediction {
                PredictionType::Epsilon => m,
                PredictionType::Sample => (s - alpha * m) / sigma,
                PredictionType::VPrediction => alpha * m + sigma * s,
            });
            let Some((ratio, max_value)) = self.thresholding else {
                return eps;
            };
            let mut x0 = Zip::from(sample).and(&eps).map_collect(|&s, &e| (s - sigma * e) / alpha);
            threshold_sample(&mut x0, ratio, max_value);
            Zip::from(sample).and(&x0).map_collect(|&s, &x| (s - alpha * x) / sigma)
        }
    }

    /// The update's float32 coefficients from step index `step` with `order` model outputs.
    fn coefficients(&self, step: usize, order: usize) -> Coefficients {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma_t(self.sigmas[step]);
        let lambda_t = lambda((alpha_t, sigma_t));
        let lambda_at = |i: usize| lambda(alpha_sigma_t(self.sigmas[i]));
        let lambda_s0 = lambda((alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let (mut c, mut d) = (Coefficients::default(), [0.0f32; 3]);
        if order >= 2 {
            let lambda_s1 = lambda_at(step - 1);
            let r0 = (lambda_s0 - lambda_s1) / h;
            if order == 2 {
                d[0] = 1.0 / r0;
            } else {
                let r1 = (lambda_s1 - lambda_at(step - 2)) / h;
                d = [1.0 / r0, 1.0 / r1, r0 / (r0 + r1)];
                c.d2_scale = 1.0 / (r0 + r1);
            }
        }
        c.d1_scales = d;
        // The diffusers formulas, each coefficient in its op order; a subtracted term's
        // coefficient is negated (exact), so the update is sample·c + Σ cₖ·Dₖ (+ noise).
        let em1 = (-h).exp() - 1.0; // exp(-h) - 1
        let ep1 = h.exp() - 1.0; // exp(h) - 1
        let one_minus_e2 = 1.0 - (-2.0 * h).exp(); // 1 - exp(-2h)
        match self.algorithm_type {
            AlgorithmType::DpmSolverPp => {
                c.sample = sigma_t / sigma_s0;
                c.d[0] = -(alpha_t * em1);
                c.d[1] = match (order, self.solver_type) {
                    (2, SolverType::Midpoint) => -(0.5 * (alpha_t * em1)),
                    _ => alpha_t * (em1 / h + 1.0),
                };
                c.d[2] = -(alpha_t * ((em1 + h) / (h * h) - 0.5));
            }
            AlgorithmType::DpmSolver => {
                c.sample = alpha_t / alpha_s0;
                c.d[0] = -(sigma_t * ep1);
                c.d[1] = match (order, self.solver_type) {
                    (2, SolverType::Midpoint) => -(0.5 * (sigma_t * ep1)),
                    _ => -(sigma_t * (ep1 / h - 1.0)),
                };
                c.d[2] = -(sigma_t * ((ep1 - h) / (h * h) - 0.5));
            }
            AlgorithmType::SdeDpmSolverPp => {
                c.sample = sigma_t / sigma_s0 * (-h).exp();
                c.d[0] = alpha_t * one_minus_e2;
                c.d[1] = match (order, self.solver_type) {
                    (2, SolverType::Midpoint) => 0.5 * (alpha_t * one_minus_e2),
                    _ => alpha_t * (one_minus_e2 / (-2.0 * h) + 1.0),
                };
                let two_h = 2.0 * h;
                c.d[2] = alpha_t * ((one_minus_e2 - two_h) / (two_h * two_h) - 0.5);
                c.noise = sigma_t * one_minus_e2.sqrt();
            }
            AlgorithmType::SdeDpmSolver => {
                c.sample = alpha_t / alpha_s0;
                c.d[0] = -(2.0 * (sigma_t * ep1));
                c.d[1] = match self.solver_type {
                    SolverType::Midpoint => -(sigma_t * ep1),
                    SolverType::Heun => -(2.0 * (sigma_t * (ep1 / h - 1.0))),
                };
                c.noise = sigma_t * ((2.0 * h).exp() - 1.0).sqrt();
            }
        }
        c
    }
}

/// An update `x_t = c.sample·x + c.d[0]·D0 (+ c.d[1]·D1 + c.d[2]·D2) + c.noise·z`, where
/// `D1 = d1_scales[0]·(m0 − m1)` at order 2 and, at order 3, `D1_0 = d1_scales[0]·(m0 − m1)`,
/// `D1_1 = d1_scales[1]·(m1 − m2)`, `D1 = D1_0 + d1_scales[2]·(D1_0 − D1_1)`,
/// `D2 = d2_scale·(D1_0 − D1_1)`.
#[derive(Debug, Default)]
struct Coefficients {
    sample: f32,
    d: [f32; 3],
    d1_scales: [f32; 3],
    d2_scale: f32,
    noise: f32,
}

/// The integer timesteps of `timestep_spacing` (this class's own variants: `linspace` and
/// `leading` space `steps + 1` points and drop the last), below the `lambda_min_clipped` cut.
fn spaced_timesteps(
    config: &DpmSolverConfig,
    alphas_cumprod: &[f32],
    steps: usize,
) -> std::result::Result<Vec<i64>, String> {
    let num_train = config.train.num_train_timesteps;
    // searchsorted(flip(λ), lambda_min_clipped) compares in float32: the λ below the cut.
    let clip = config.lambda_min_clipped as f32;
    let clipped = alphas_cumprod.iter().filter(|&&a| lambda((a.sqrt(), (1.0 - a).sqrt())) < clip).count();
    let last_timestep = num_train - clipped;
    if last_timestep == 0 {
        return Err(format!(
            "`lambda_min_clipped` = {} clips every training timestep; accepted: a value below the schedule's log-SNR",
            config.lambda_min_clipped
        ));
    }
    Ok(match config.timestep_spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
            .iter()
            .rev()
            .take(steps)
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let mut t = leading_timesteps(steps + 1, last_timestep, config.steps_offset);
            t.truncate(steps);
            t
        }
        TimestepSpacing::Trailing => numpy_arange(last_timestep as f64, 0.0, -(num_train as f64 / steps as f64))
            .iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    })
}

impl Scheduler for DpmSolverScheduler {
    fn kind(&self) -> SchedulerKind {
        self.kind
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// 1: the schedule is sigma-based but the model takes the unscaled sample.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    /// The sigma at each step index, then the final one (`len() == num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// Identity, as in diffusers.
    fn scale_model_input(&self, _sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "{}: step index {step} out of range 0..{}", self.kind, self.num_steps());
    }

    /// `DPMSolverMultistepScheduler.step(model_output, timesteps[step], sample)`: converts the
    /// output, keeps it in the history and takes a first-, second- or third-order step (lower at
    /// the start, and at the end as `lower_order_final` / `euler_at_final` / a zero final sigma
    /// say). The SDE algorithms draw one standard normal tensor of the sample's shape per step.
    /// Steps are meant to be taken in order from 0; the history never reaches before index 0.
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        let name = self.kind.as_str();
        check_step_index(name, step, self.num_steps())?;
        check_same_shape(name, "model_output", model_output.shape(), sample.shape())?;
        let n = self.num_steps();
        let few_steps = self.lower_order_final && n < 15;
        let lower_order_final = step == n - 1 && (self.euler_at_final || few_steps || self.final_sigma_zero);
        let lower_order_second = n >= 2 && step == n - 2 && few_steps;

        let converted = self.convert_model_output(model_output, sample, step);
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(converted);
        let z = self.algorithm_type.is_sde().then(|| randn(noise, sample.shape()));

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let order = order.min(step + 1).min(self.model_outputs.len());
        let c = self.coefficients(step, order);
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let mut next = Zip::from(&*sample).and(m0).map_collect(|&x, &m0| c.sample * x + c.d[0] * m0);
        if order == 2 {
            let m1 = &self.model_outputs[k - 2];
            Zip::from(&mut next).and(m0).and(m1).for_each(|x, &m0, &m1| {
                let d1 = c.d1_scales[0] * (m0 - m1);
                *x += c.d[1] * d1;
            });
        } else if order == 3 {
            let (m1, m2) = (&self.model_outputs[k - 2], &self.model_outputs[k - 3]);
            Zip::from(&mut next).and(m0).and(m1).and(m2).for_each(|x, &m0, &m1, &m2| {
                let d1_0 = c.d1_scales[0] * (m0 - m1);
                let d1_1 = c.d1_scales[1] * (m1 - m2);
                let d1 = d1_0 + c.d1_scales[2] * (d1_0 - d1_1);
                let d2 = c.d2_scale * (d1_0 - d1_1);
                *x = *x + c.d[1] * d1 + c.d[2] * d2;
            });
        }
        if let Some(z) = z {
            Zip::from(&mut next).and(&z).for_each(|x, &z| *x += c.noise * z);
        }
        *sample = next;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(())
    }

    /// `DPMSolverMultistepScheduler.add_noise`: `α·original + σ_t·noise` at the sigma of
    /// `timesteps[step]`, found as diffusers' `index_for_timestep` finds it (the second occurrence
    /// of a repeated timestep, e.g. Karras' `1, 1` near the end of long schedules).
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "{}: step index {step} out of range 0..{}", self.kind, self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "{} add_noise: noise and original shapes differ", self.kind);
        let (alpha, sigma) = alpha_sigma_t(self.sigmas[index_for_timestep(self.timesteps(), step)]);
        Zip::from(&original).and(&noise).map_collect(|&x, &n| alpha * x + sigma * n)
    }
}

pub(crate) fn build(config: &SchedulerConfig, steps: usize, kind: SchedulerKind) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DpmSolverScheduler::new(&DpmSolverConfig::from_config(config, kind)?, steps)?))
}
