//! Sigma schedules shared by the Karras-style samplers (Euler, Euler Ancestral, Heun, LMS, the
//! DPM-Solver family, UniPC): training sigmas, interpolation at fractional timesteps, Karras
//! sigmas and the inverse map from a sigma back to a timestep, each with numpy's float64 /
//! float32 flow as diffusers runs it.

use super::numpy_linspace;

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
