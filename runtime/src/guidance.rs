//! Classifier-free guidance: the UNet runs the unconditional and conditional halves of the batch
//! together, and their predictions are combined as diffusers does.

use ndarray::{ArrayD, ArrayViewD, Axis};

/// A request's guidance settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guidance {
    pub scale: f32,
    pub rescale: f32,
}

impl Guidance {
    /// Guidance is on above 1 (diffusers' `do_classifier_free_guidance`): the UNet batch has an
    /// unconditional half before the conditional one.
    pub fn on(&self) -> bool {
        self.scale > 1.0
    }

    /// The UNet's `sample` batch for `latents`: the latents twice with guidance, once without.
    pub fn batch(&self, latents: &ArrayD<f32>) -> ArrayD<f32> {
        if self.on() {
            ndarray::concatenate(Axis(0), &[latents.view(), latents.view()]).expect("two copies of one shape")
        } else {
            latents.clone()
        }
    }

    /// Combines the UNet's prediction for a batch of `n` samples: diffusers'
    /// `noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)`, then
    /// `rescale_noise_cfg` when `rescale > 0`. Without guidance the prediction is returned as is.
    pub fn combine(&self, noise_pred: ArrayD<f32>, n: usize) -> ArrayD<f32> {
        if !self.on() {
            return noise_pred;
        }
        let uncond = noise_pred.slice_axis(Axis(0), (0..n).into());
        let cond = noise_pred.slice_axis(Axis(0), (n..2 * n).into());
        let mut guided = &uncond + &((&cond - &uncond) * self.scale);
        if self.rescale > 0.0 {
            rescale_noise_cfg(&mut guided, cond.view(), self.rescale);
        }
        guided
    }
}

/// diffusers' `rescale_noise_cfg` (pipeline_stable_diffusion.py; arXiv 2305.08891 §3.4): per
/// sample, rescale the guided noise to the text branch's standard deviation (unbiased, over C, H,
/// W) and mix `guidance_rescale` of it with the plain guided noise.
fn rescale_noise_cfg(noise_cfg: &mut ArrayD<f32>, noise_pred_text: ArrayViewD<f32>, guidance_rescale: f32) {
    // torch's CPU std accumulates in double; the result is rounded to float32.
    fn std(x: ArrayViewD<f32>) -> f32 {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        var.sqrt() as f32
    }
    let keep = (1.0 - f64::from(guidance_rescale)) as f32;
    for (mut cfg, text) in noise_cfg.outer_iter_mut().zip(noise_pred_text.outer_iter()) {
        let ratio = std(text.view()) / std(cfg.view());
        cfg.mapv_inplace(|v| guidance_rescale * (v * ratio) + keep * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn guidance_combines_halves_in_diffusers_order() {
        let g = Guidance { scale: 3.0, rescale: 0.0 };
        // Rows: uncond = 1, cond = 2 → 1 + 3 × (2 − 1) = 4.
        let pred = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.0f32, 2.0]).unwrap();
        assert_eq!(g.combine(pred, 1).into_raw_vec_and_offset().0, vec![4.0]);
        let off = Guidance { scale: 1.0, rescale: 0.0 };
        let latents = ArrayD::from_elem(IxDyn(&[1, 2]), 5.0f32);
        assert_eq!(off.batch(&latents).shape(), &[1, 2]);
        assert_eq!(g.batch(&latents).shape(), &[2, 2]);
    }
}
