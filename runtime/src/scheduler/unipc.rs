//! UniPC (diffusers `schedulers/scheduling_unipc_multistep.py`, `UniPCMultistepScheduler`): the
//! multistep predictor UniP and corrector UniC of arXiv 2302.04867, deterministic.
//!
//! Every coefficient is a float32 scalar computed in diffusers' op order (its sigmas are a float32
//! tensor and each `log`, `expm1`, `pow` a 0-d float32 op); the small linear systems of orders ≥ 3
//! are solved in float32 by LU with partial pivoting, as LAPACK's `sgesv` behind
//! `torch.linalg.solve` does.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::euler::FinalSigmasType;
use super::sigmas::{alpha_sigma_t, karras_sigmas, numpy_interp_index, sigma_to_t, train_sigmas};
use super::{
    check_same_shape, check_step_index, check_steps, index_for_timestep, numpy_linspace, threshold_sample,
    trailing_timesteps, NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
    TrainSchedule, PREDICTION_TYPES, SPACINGS,
};
use crate::error::{Error, Result};

const NAME: &str = "unipc";

/// The B(h) of UniPC's update (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// `B(h) = h`; recommended by the authors for unconditional sampling under 10 steps.
    Bh1,
    /// `B(h) = e^h − 1` (default). diffusers maps `midpoint`, `heun` and `logrho` to it.
    Bh2,
}

/// `UniPCMultistepScheduler`'s config keys, resolved with its defaults
/// (`UniPCMultistepScheduler.from_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
    pub train: TrainSchedule,
    /// Order of the predictor, at least 1 (default 2; the corrector adds one).
    pub solver_order: usize,
    /// Default epsilon.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of `x₀` (default false; only with `predict_x0`): `Some((ratio, max))`.
    pub thresholding: Option<(f64, f64)>,
    /// Update on the predicted `x₀` (default true) rather than on the noise.
    pub predict_x0: bool,
    /// Default bh2.
    pub solver_type: SolverType,
    /// Lower the order over the last steps (default true).
    pub lower_order_final: bool,
    /// Step indices `i` whose corrector (applied at step `i + 1`) is skipped (default none).
    pub disable_corrector: Vec<usize>,
    /// Karras et al. (2022) sigmas, rho = 7 (default false); timesteps are then rounded.
    pub use_karras_sigmas: bool,
    /// Karras sigma range; `None` takes the training schedule's ends.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Default linspace, with UniPC's own rules (`steps + 1` points, the last dropped).
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (default 0).
    pub steps_offset: i64,
    /// Default zero.
    pub final_sigmas_type: FinalSigmasType,
}

impl UniPcConfig {
    /// Resolves `config` the way `UniPCMultistepScheduler.from_config(config)` does. Errors name
    /// the key; options this runtime does not implement (flow-matching sigmas, exponential and beta
    /// sigmas, dynamic shifting, `solver_p`) are refused, as are combinations for which diffusers
    /// 0.42's last step yields NaN or infinity.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let r = config.reader(NAME)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"] {
            if r.bool(key, false)? {
                return Err(r.error(format!("`{key}` = true is not supported yet; accepted: false")));
            }
        }
        for key in ["solver_p", "shift_terminal"] {
            if let Some(v) = r.values.get(key).filter(|v| !v.is_null()) {
                return Err(r.error(format!("`{key}` = {v} is not supported; accepted: null")));
            }
        }
        let order = r.int("solver_order", 2)?;
        let solver_order = usize::try_from(order)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| r.error(format!("`solver_order` must be at least 1, got {order}")))?;
        // Step indices are integers; a listed value that is not one can never match (Python's `in`).
        let disable_corrector = r
            .float_list("disable_corrector")?
            .unwrap_or_default()
            .into_iter()
            .filter(|x| *x >= 0.0 && x.fract() == 0.0)
            .map(|x| x as usize)
            .collect();
        let config = UniPcConfig {
            train: TrainSchedule::read(&r)?,
            solver_order,
            prediction_type: r.choice("prediction_type", PredictionType::Epsilon, &PREDICTION_TYPES)?,
            thresholding: r.thresholding()?,
            predict_x0: r.bool("predict_x0", true)?,
            solver_type: r.choice(
                "solver_type",
                SolverType::Bh2,
                &[
                    ("bh1", SolverType::Bh1),
                    ("bh2", SolverType::Bh2),
                    ("midpoint", SolverType::Bh2),
                    ("heun", SolverType::Bh2),
                    ("logrho", SolverType::Bh2),
                ],
            )?,
            lower_order_final: r.bool("lower_order_final", true)?,
            disable_corrector,
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            sigma_min: r.opt_float("sigma_min")?,
            sigma_max: r.opt_float("sigma_max")?,
            timestep_spacing: r.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?,
            steps_offset: r.int("steps_offset", 0)?,
            final_sigmas_type: r.choice(
                "final_sigmas_type",
                FinalSigmasType::Zero,
                &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
            )?,
        };
        if config.final_sigmas_type == FinalSigmasType::Zero {
            // A final sigma of 0 makes λ infinite at the last step; only bh2 on x₀ with a
            // first-order last step survives it in diffusers (the others give NaN or ±inf).
            let broken = if config.solver_type == SolverType::Bh1 {
                Some("`solver_type` = \"bh1\"")
            } else if !config.predict_x0 {
                Some("`predict_x0` = false")
            } else if !config.lower_order_final && config.solver_order > 1 {
                Some("`lower_order_final` = false with `solver_order` > 1")
            } else {
                None
            };
            if let Some(what) = broken {
                return Err(r.error(format!(
                    "{what} with `final_sigmas_type` = \"zero\" is not supported: diffusers' last step divides by \
                     an infinite log-SNR step and yields NaN or infinity; set `final_sigmas_type` = \"sigma_min\""
                )));
            }
        }
        Ok(config)
    }
}

/// UniPC state for one request: `UniPCMultistepScheduler` after `set_timesteps(steps)`, plus the
/// multistep history of the steps taken so far.
#[derive(Debug, Clone)]
pub struct UniPcScheduler {
    timesteps: Vec<f32>,
    /// One per step plus the final one.
    sigmas: Vec<f32>,
    config: UniPcConfig,
    /// The converted outputs (`x₀` or ε) of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<ArrayD<f32>>>,
    lower_order_nums: usize,
    /// The sample before the last predictor (the corrector's starting point).
    last_sample: Option<ArrayD<f32>>,
    /// The predictor order of the last step, which the next corrector reuses.
    this_order: usize,
    /// The step index the history expects next; any other index starts a fresh history.
    next_step: Option<usize>,
}

impl UniPcScheduler {
    /// `UniPCMultistepScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &UniPcConfig, steps: usize) -> Result<Self> {
        let num_train = config.train.num_train_timesteps;
        check_steps(NAME, steps, num_train)?;
        if config.use_karras_sigmas && num_train < 2 {
            return Err(Error::Scheduler {
                scheduler: NAME,
                message: "`use_karras_sigmas` = true needs `num_train_timesteps` >= 2".into(),
            });
        }
        let mut alphas_cumprod = config.train.alphas_cumprod();
        if config.train.rescale_betas_zero_snr {
            // Keeps the first sigma finite (diffusers sets it to 2**-24).
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = train_sigmas(&alphas_cumprod);

        // set_timesteps: `steps + 1` points, the last (timestep 0) dropped, for linspace and leading.
        let mut timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, (num_train - 1) as f64, steps + 1)
                .iter()
                .rev()
                .take(steps)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (num_train / (steps + 1)) as i64;
                (1..=steps as i64).rev().map(|i| i * ratio + config.steps_offset).collect()
            }
            TimestepSpacing::Trailing => trailing_timesteps(steps, num_train),
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= num_train as i64) {
            return Err(Error::Scheduler {
                scheduler: NAME,
                message: format!(
                    "{steps} steps with steps_offset {} give timestep {t}, outside the {num_train} training \
                     timesteps; lower `steps_offset`",
                    config.steps_offset
                ),
            });
        }

        let sigmas: Vec<f32> = if config.use_karras_sigmas {
            // Training sigmas flipped to descending, in float64; timesteps rounded to integers.
            let descending: Vec<f64> = train_sigmas.iter().rev().map(|&s| s as f64).collect();
            let sigmas = karras_sigmas(&descending, steps, config.sigma_min, config.sigma_max);
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as i64).collect();
            let last = match config.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => sigmas[sigmas.len() - 1],
            };
            sigmas.iter().chain([&last]).map(|&s| s as f32).collect()
        } else {
            // np.interp at integer timesteps (a timestep of -1, from `trailing`, clamps to the first).
            let last = match config.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => train_sigmas[0],
            };
            timesteps.iter().map(|&t| numpy_interp_index(t as f64, &train_sigmas) as f32).chain([last]).collect()
        };
        // The order in use never exceeds the steps taken (it warms up from 1), so a history of
        // `min(solver_order, steps)` outputs is diffusers' `solver_order` window without the slots
        // that stay empty (a `solver_order` of 10^12 is valid in diffusers and must not allocate).
        let window = config.solver_order.min(steps);
        Ok(UniPcScheduler {
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas,
            config: config.clone(),
            model_outputs: vec![None; window],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
            next_step: None,
        })
    }

    /// `_sigma_to_alpha_sigma_t` in float32: `α = 1 / sqrt(σ² + 1)`, `σ_t = σ·α`.
    fn alpha_sigma(&self, step: usize) -> (f32, f32) {
        alpha_sigma_t(self.sigmas[step])
    }

    /// The log-SNR `λ = log α − log σ_t` at a sigma index.
    fn lambda(&self, step: usize) -> f32 {
        let (alpha, sigma) = self.alpha_sigma(step);
        ln_f32(alpha) - ln_f32(sigma)
    }

    /// `convert_model_output`: the model's output as `x₀` (`predict_x0`, thresholded if asked) or ε.
    fn convert(&self, model_output: &ArrayViewD<f32>, sample: &ArrayD<f32>, step: usize) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = self.alpha_sigma(step);
        let prediction = self.config.prediction_type;
        let zip = Zip::from(sample).and(model_output);
        if self.config.predict_x0 {
            let mut x0 = zip.map_collect(|&s, &m| match prediction {
                PredictionType::Epsilon => (s - sigma_t * m) / alpha_t,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha_t * s - sigma_t * m,
            });
            if let Some((ratio, max_value)) = self.config.thresholding {
                threshold_sample(&mut x0, ratio, max_value);
            }
            x0
        } else {
            zip.map_collect(|&s, &m| match prediction {
                PredictionType::Epsilon => m,
                PredictionType::Sample => (s - alpha_t * m) / sigma_t,
                PredictionType::VPrediction => alpha_t * m + sigma_t * s,
            })
        }
    }

    /// The coefficients shared by UniP and UniC, from `s0` (the latest history point) to `t`:
    /// `(h, h·φ₁(h), B(h), rks, b)` with `rks` the history's log-SNR ratios, `(λ_si − λ_s0) / h`,
    /// for sigma indices `history` (newest first) followed by 1, and `b` the right-hand side.
    fn coefficients(&self, t: usize, s0: usize, history: &[usize], order: usize) -> (f32, f32, Vec<f32>, Vec<f32>) {
        let lambda_s0 = self.lambda(s0);
        let h = self.lambda(t) - lambda_s0;
        let mut rks: Vec<f32> = history.iter().map(|&si| (self.lambda(si) - lambda_s0) / h).collect();
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = exp_m1_f32(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match self.config.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => exp_m1_f32(hh),
        };
        // `factorial_i` is a Python integer: exact in u128 up to 34!, past which (orders above 33,
        // which need as many steps) float64 carries it, as torch does on multiplying by it.
        let mut factorial = Factorial::Exact(1);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u128 {
            b.push(h_phi_k * factorial.as_f32() / b_h);
            factorial = factorial.times(i + 1);
            // `1 / factorial_i` is a Python float, rounded to float32 by the tensor op.
            h_phi_k = h_phi_k / hh - (1.0 / factorial.as_f64()) as f32;
        }
        (h_phi_1, b_h, rks, b)
    }

    /// UniP (`multistep_uni_p_bh_update`) of the given order from step `step` to `step + 1`.
    fn predict(&self, sample: &ArrayD<f32>, step: usize, order: usize) -> Result<ArrayD<f32>> {
        let m0 = self.history(0);
        let history: Vec<usize> = (1..order).map(|i| step - i).collect();
        let (h_phi_1, b_h, rks, b) = self.coefficients(step + 1, step, &history, order);
        // (m_i − m0) / r_i for the older outputs.
        let d1s: Vec<ArrayD<f32>> = (1..order).map(|i| difference(self.history(i), m0, rks[i - 1])).collect();
        let rhos: Vec<f32> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                let r = powers(&rks[..order - 1], order - 1);
                self.solve(r, b[..order - 1].to_vec())?
            }
        };
        Ok(self.update(sample, m0, step, step + 1, h_phi_1, b_h, &d1s, &rhos, None))
    }

    /// UniC (`multistep_uni_c_bh_update`) of the given order: corrects `sample` (at step `step`)
    /// with the converted model output there, `model_t`, starting again from `last_sample`.
    fn correct(
        &self,
        model_t: &ArrayD<f32>,
        last_sample: &ArrayD<f32>,
        step: usize,
        order: usize,
    ) -> Result<ArrayD<f32>> {
        let m0 = self.history(0);
        let history: Vec<usize> = (1..order).map(|i| step - (i + 1)).collect();
        let (h_phi_1, b_h, rks, b) = self.coefficients(step, step - 1, &history, order);
        let d1s: Vec<ArrayD<f32>> = (1..order).map(|i| difference(self.history(i), m0, rks[i - 1])).collect();
        let rhos = if order == 1 { vec![0.5] } else { self.solve(powers(&rks, order), b)? };
        let (rho_t, rhos) = rhos.split_last().expect("at least one rho");
        let d1_t = Zip::from(model_t).and(m0).map_collect(|&m, &m0| m - m0);
        Ok(self.update(last_sample, m0, step - 1, step, h_phi_1, b_h, &d1s, rhos, Some((*rho_t, &d1_t))))
    }

    /// The update both share, from sigma index `s0` to `t`:
    /// `x_t = σ_t/σ_s0·x − α_t·h·φ₁·m0 − α_t·B(h)·(Σ ρ_k·D1_k [+ ρ_t·D1_t])` (α and σ swap roles
    /// without `predict_x0`), each scalar factor a float32 product in diffusers' order.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        x: &ArrayD<f32>,
        m0: &ArrayD<f32>,
        s0: usize,
        t: usize,
        h_phi_1: f32,
        b_h: f32,
        d1s: &[ArrayD<f32>],
        rhos: &[f32],
        corrector: Option<(f32, &ArrayD<f32>)>,
    ) -> ArrayD<f32> {
        let (alpha_t, sigma_t) = self.alpha_sigma(t);
        let (alpha_s0, sigma_s0) = self.alpha_sigma(s0);
        let (x_coef, m0_coef, res_coef) = if self.config.predict_x0 {
            (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
        } else {
            (alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h)
        };
        let mut out = Zip::from(x).and(m0).map_collect(|&x, &m0| x_coef * x - m0_coef * m0);
        // einsum("k,bkc...->bc...", rhos, D1s), summed in k order.
        let mut res: Option<ArrayD<f32>> = None;
        for (rho, d1) in rhos.iter().zip(d1s) {
            match &mut res {
                None => res = Some(d1.mapv(|d| rho * d)),
                Some(acc) => Zip::from(acc).and(d1).for_each(|a, &d| *a += rho * d),
            }
        }
        match (corrector, res) {
            (Some((rho_t, d1_t)), res) => {
                let mut total = d1_t.mapv(|d| rho_t * d);
                if let Some(res) = res {
                    Zip::from(&mut total).and(&res).for_each(|t, &r| *t += r);
                }
                Zip::from(&mut out).and(&total).for_each(|o, &r| *o -= res_coef * r);
            }
            (None, Some(res)) => Zip::from(&mut out).and(&res).for_each(|o, &r| *o -= res_coef * r),
            // `x_t_ - alpha_t * B_h * 0`: a no-op unless the coefficient is not finite.
            (None, None) => {
                let zero_term = res_coef * 0.0;
                if zero_term != 0.0 {
                    out.mapv_inplace(|o| o - zero_term);
                }
            }
        }
        out
    }

    /// The `back`-th newest converted output (0 is the newest).
    fn history(&self, back: usize) -> &ArrayD<f32> {
        self.model_outputs[self.model_outputs.len() - 1 - back].as_ref().expect("the warm-up bounds the order")
    }

    fn solve(&self, a: Vec<Vec<f32>>, b: Vec<f32>) -> Result<Vec<f32>> {
        solve_f32(a, b).ok_or_else(|| Error::Scheduler {
            scheduler: NAME,
            message: "the UniPC coefficient system is singular (torch.linalg.solve fails too): two steps share a \
                      noise level; use fewer steps or a lower `solver_order`"
                .into(),
        })
    }
}

/// `n!` for the UniPC coefficients: exact while it fits in u128, then float64.
#[derive(Clone, Copy)]
enum Factorial {
    Exact(u128),
    Approx(f64),
}

impl Factorial {
    fn times(self, k: u128) -> Self {
        match self {
            Factorial::Exact(n) => n.checked_mul(k).map_or(Factorial::Approx(n as f64 * k as f64), Factorial::Exact),
            Factorial::Approx(x) => Factorial::Approx(x * k as f64),
        }
    }

    /// Rounded once to float32, as torch casts an integer scalar to a float32 tensor's type.
    fn as_f32(self) -> f32 {
        match self {
            Factorial::Exact(n) => n as f32,
            Factorial::Approx(x) => x as f32,
        }
    }

    /// The nearest float64 (Python's `int.__float__`, while exact).
    fn as_f64(self) -> f64 {
        match self {
            Factorial::Exact(n) => n as f64,
            Factorial::Approx(x) => x,
        }
    }
}

/// torch's float32 `log`: nearly always the correctly rounded result, which the float64 one
/// rounded to float32 is too (glibc's `logf`, behind `f32::ln`, is 1 ulp off more often).
fn ln_f32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// torch's float32 `expm1` (SLEEF, 1 ulp), likewise closer to the rounded float64 result than to
/// glibc's `expm1f` (which differed in 19 of 300 UniPC coefficients).
fn exp_m1_f32(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

/// `(m_i − m0) / r`, elementwise in float32.
fn difference(mi: &ArrayD<f32>, m0: &ArrayD<f32>, r: f32) -> ArrayD<f32> {
    Zip::from(mi).and(m0).map_collect(|&mi, &m0| (mi - m0) / r)
}

/// `R[i][k] = rks[k] ** i` for `i < n` (`torch.pow` with integer exponents: 1, the value, squares...).
fn powers(rks: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            rks.iter()
                .map(|&r| match i {
                    0 => 1.0,
                    1 => r,
                    2 => r * r,
                    3 => r * r * r,
                    _ => r.powi(i as i32),
                })
                .collect()
        })
        .collect()
}

/// Solves `a · x = b` in float32 in the manner of LAPACK's `sgesv` (`torch.linalg.solve` on CPU,
/// MKL): LU with partial pivoting, multipliers scaled by the pivot's reciprocal, fused
/// multiply-adds in the updates, forward substitution with the unit lower factor, back
/// substitution multiplying by the diagonal's reciprocal. MKL's small-matrix kernels are not
/// documented; of the 126 systems of the UniPC traces (2×2 and 3×3) this variant reproduces 103
/// bit for bit, the best of the variants tried, and the rest differ by an ulp of a coefficient.
/// `None` if singular.
pub(crate) fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Option<Vec<f32>> {
    let n = b.len();
    for j in 0..n {
        // The first row with the largest |a[i][j]| (isamax).
        let p = (j..n).fold(j, |p, i| if a[i][j].abs() > a[p][j].abs() { i } else { p });
        if a[p][j] == 0.0 {
            return None;
        }
        a.swap(j, p);
        b.swap(j, p);
        let inv = 1.0 / a[j][j];
        for i in j + 1..n {
            a[i][j] *= inv;
            for k in j + 1..n {
                a[i][k] = (-a[i][j]).mul_add(a[j][k], a[i][k]);
            }
        }
    }
    for i in 0..n {
        for k in 0..i {
            b[i] = (-b[k]).mul_add(a[i][k], b[i]);
        }
    }
    for k in (0..n).rev() {
        b[k] *= 1.0 / a[k][k];
        for i in 0..k {
            b[i] = (-b[k]).mul_add(a[i][k], b[i]);
        }
    }
    Some(b)
}

impl Scheduler for UniPcScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPc
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// 1, as diffusers' class attribute (one model call per step; the history is internal).
    fn order(&self) -> usize {
        1
    }

    /// The sigma at each step index, then the final one (`len() == num_steps() + 1`).
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// Identity, as in diffusers.
    fn scale_model_input(&self, _sample: &mut ArrayD<f32>, step: usize) {
        assert!(step < self.num_steps(), "unipc: step index {step} out of range 0..{}", self.num_steps());
    }

    /// `UniPCMultistepScheduler.step(model_output, timesteps[step], sample)`: the corrector UniC on
    /// `sample` (from the second step on, unless disabled), then the predictor UniP to the next
    /// step, with the order warming up from 1 and, with `lower_order_final`, lowered over the last
    /// steps. Steps must be taken in order; a step index other than the next one starts a fresh
    /// history there, as diffusers' `set_begin_index` does (img2img starts mid-schedule).
    fn step(
        &mut self,
        model_output: ArrayViewD<f32>,
        step: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<()> {
        check_step_index(NAME, step, self.num_steps())?;
        check_same_shape(NAME, "model_output", model_output.shape(), sample.shape())?;
        if self.next_step != Some(step) {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
            self.last_sample = None;
        }
        let converted = self.convert(&model_output, sample, step);
        let corrector_on = step > 0 && !self.config.disable_corrector.contains(&(step - 1));
        if let Some(last_sample) = self.last_sample.take().filter(|_| corrector_on) {
            *sample = self.correct(&converted, &last_sample, step, self.this_order)?;
        }
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("solver_order >= 1") = Some(converted);

        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final { order.min(self.num_steps() - step) } else { order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predict(sample, step, self.this_order)?;
        self.last_sample = Some(std::mem::replace(sample, prev));
        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        self.next_step = Some(step + 1);
        Ok(())
    }

    /// `add_noise`: `α·original + σ_t·noise` at the sigma of `timesteps[step]`, found as diffusers'
    /// `index_for_timestep` does (the second of repeated timesteps, e.g. Karras' rounded ones).
    fn add_noise(&self, original: ArrayViewD<f32>, noise: ArrayViewD<f32>, step: usize) -> ArrayD<f32> {
        assert!(step < self.num_steps(), "unipc: step index {step} out of range 0..{}", self.num_steps());
        assert_eq!(noise.shape(), original.shape(), "unipc add_noise: noise and original shapes differ");
        let (alpha, sigma) = self.alpha_sigma(index_for_timestep(&self.timesteps, step));
        Zip::from(&original).and(&noise).map_collect(|&x, &n| alpha * x + sigma * n)
    }
}

pub(crate) fn build(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(UniPcScheduler::new(&UniPcConfig::from_config(config)?, steps)?))
}
