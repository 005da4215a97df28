//! Sigma schedules shared by the Karras-style samplers (Euler, Euler Ancestral, Heun, LMS, the
//! DPM-Solver family, UniPC): training sigmas, interpolation at fractional timesteps, Karras
//! sigmas and the inverse map from a sigma back to a timestep, each with numpy's float64 /
//! float32 flow as diffusers runs it.

use ndarray::ArrayD;

use super::{leading_timesteps, numpy_linspace, trailing_timesteps, PredictionType, TimestepSpacing, TrainSchedule};
use crate::error::{Error, Result};

/// The training sigmas `((1 - ᾱ) / ᾱ) ** 0.5` as float32 torch ops, indexed by training timestep.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` (numpy `compiled_base.c`), in float64: ends clamp, exact
/// grid points return the grid value, otherwise `slope * (x - j) + fp[j]`.
pub(crate) fn numpy_interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if j as f64 == x {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    let y = slope * (x - j as f64) + y0;
    if y.is_nan() {
        let y = slope * (x - (j + 1) as f64) + y1;
        if y.is_nan() && y0 == y1 {
            return y0;
        }
        return y;
    }
    y
}

/// `_convert_to_karras` (k-diffusion's `get_sigmas_karras`, rho = 7), in float64.
pub(crate) fn karras_sigmas(
    in_sigmas: &[f64],
    steps: usize,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
) -> Vec<f64> {
    let rho = 7.0f64;
    let sigma_min = sigma_min.unwrap_or(in_sigmas[in_sigmas.len() - 1]);
    let sigma_max = sigma_max.unwrap_or(in_sigmas[0]);
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, steps)
        .iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep of `sigma` by linear interpolation in log
/// sigma. `log_sigmas` are float32 (numpy `np.log` of the float32 sigmas), so `low - high` is a
/// float32 difference while the rest is float64, as in numpy.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index with log_sigma >= log_sigmas[i], else 0.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

// ---- The `set_timesteps` schedule of Euler, Euler Ancestral and Heun ----
// scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py and scheduling_heun_discrete.py
// build their timesteps and sigmas with the same numpy code; it lives here once.

/// The training sigmas of `train`, with the zero-terminal-SNR fix of the Euler samplers:
/// `alphas_cumprod[-1] = 2**-24` when `rescale_betas_zero_snr` is set, so the last sigma stays
/// finite (about 4096).
pub(crate) fn schedule_train_sigmas(train: &TrainSchedule) -> Vec<f32> {
    let mut alphas_cumprod = train.alphas_cumprod();
    if train.rescale_betas_zero_snr {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    train_sigmas(&alphas_cumprod)
}

/// The numpy float32 timesteps of `spacing` for `steps` inference steps, in sampling order
/// (`steps_offset` only moves `leading` ones).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    num_train: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => {
            numpy_linspace(0.0, (num_train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            leading_timesteps(steps, num_train, 0).iter().map(|&t| t as f32 + steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => trailing_timesteps(steps, num_train).iter().map(|&t| t as f32).collect(),
    }
}

/// `np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)`, float64.
pub(crate) fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps.iter().map(|&t| numpy_interp_index(t as f64, train_sigmas)).collect()
}

/// `use_karras_sigmas`: the Karras sigmas spanning `sigmas` (or `[sigma_min, sigma_max]`) and
/// their fractional timesteps (`_convert_to_karras`, then `_sigma_to_t` on the float32 log
/// training sigmas). Errors for `scheduler` when the training schedule is too short to invert.
pub(crate) fn karras_schedule(
    scheduler: &'static str,
    sigmas: &[f64],
    steps: usize,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    train_sigmas: &[f32],
) -> Result<(Vec<f64>, Vec<f32>)> {
    if train_sigmas.len() < 2 {
        return Err(Error::Scheduler {
            scheduler,
            message: "`use_karras_sigmas` = true needs `num_train_timesteps` >= 2".into(),
        });
    }
    let sigmas = karras_sigmas(sigmas, steps, sigma_min, sigma_max);
    let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
    let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
    Ok((sigmas, timesteps))
}

/// The `init_noise_sigma` property: the largest sigma for `linspace` / `trailing` spacing,
/// `(max² + 1) ** 0.5` for `leading`, in float32.
pub(crate) fn sigma_init_noise(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

// ---- The step arithmetic Euler, Euler Ancestral, Heun and LMS share ----

/// Their `scale_model_input`: `sample / (sigma² + 1) ** 0.5` in float32.
pub(crate) fn scale_by_sigma(sample: &mut ArrayD<f32>, sigma: f32) {
    let denom = (sigma * sigma + 1.0).sqrt();
    sample.mapv_inplace(|x| x / denom);
}

/// Their `pred_original_sample` at noise level `sigma`: `x₀` from the sample `s` and the model
/// output `m`, each float32 op in diffusers' order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigmaX0 {
    prediction: PredictionType,
    sigma: f32,
    /// `sigma² + 1` and `-sigma / (sigma² + 1) ** 0.5`, for v-prediction.
    v_in: f32,
    v_out: f32,
}

impl SigmaX0 {
    pub(crate) fn new(prediction: PredictionType, sigma: f32) -> Self {
        let v_in = sigma * sigma + 1.0;
        SigmaX0 { prediction, sigma, v_in, v_out: -sigma / v_in.sqrt() }
    }

    pub(crate) fn x0(&self, s: f32, m: f32) -> f32 {
        match self.prediction {
            PredictionType::Epsilon => s - self.sigma * m,
            PredictionType::VPrediction => m * self.v_out + s / self.v_in,
            PredictionType::Sample => m,
        }
    }
}

/// DPM-Solver's and UniPC's `_sigma_to_alpha_sigma_t`: `α = 1 / sqrt(σ² + 1)`, `σ_t = σ·α`, as
/// float32 torch scalars.
pub(crate) fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}
