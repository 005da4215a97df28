//! Where a run starts: the initial latents from noise (txt2img), from the init image (img2img:
//! `StableDiffusionImg2ImgPipeline.prepare_latents`), or for inpainting
//! (`StableDiffusionInpaintPipeline.prepare_latents` and `prepare_mask_latents`), with every draw
//! from the request's one generator in diffusers' order; and what inpainting does at each step.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::backend::GraphSession;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::request::InitImage;
use crate::scheduler::{randn, NoiseSource, Scheduler};
use crate::vae::encode_sample;

/// The latents the first step starts from, and the inpainting state the steps need.
pub(crate) struct Start {
    pub latents: ArrayD<f32>,
    pub inpainting: Option<Inpainting>,
}

/// Inpainting at each step.
pub(crate) struct Inpainting {
    /// An inpainting UNet's extra input channels, [UNet batch, 1 + C, h, w]: the latent-size mask
    /// and the masked image's latents, repeated over the batch (both guidance halves).
    extra_channels: Option<ArrayD<f32>>,
    /// A regular UNet's blending: the kept area is put back after each step.
    blend: Option<Blend>,
}

struct Blend {
    /// [n, 1, h, w]: 1 where the image is repainted, and its complement (what is kept).
    mask: ArrayD<f32>,
    keep: ArrayD<f32>,
    /// The init image's latents and the noise drawn for them, [n, C, h, w].
    image_latents: ArrayD<f32>,
    noise: ArrayD<f32>,
}

/// What the start needs to know about the request.
pub(crate) struct StartParams<'a> {
    pub n_samples: usize,
    /// The latent size (h, w).
    pub latent_hw: (usize, usize),
    /// The request's own initial noise (txt2img only).
    pub latents: Option<&'a ArrayD<f32>>,
    pub init: Option<&'a InitImage>,
    /// The first step index that runs (from strength); 0 for txt2img.
    pub first_step: usize,
    /// Strength 1: the latents start from pure noise even with an init image.
    pub full_strength: bool,
    /// The UNet batch (n, or 2n with guidance).
    pub unet_batch: usize,
}

/// Builds the initial latents. Draws, in diffusers' order: the init image's posterior sample
/// (img2img always; inpainting unless an inpainting UNet runs at strength 1), the noise, the
/// masked image's posterior sample (inpainting).
pub(crate) fn start(
    manifest: &Manifest,
    vae_encoder: Option<&mut Box<dyn GraphSession>>,
    scheduler: &dyn Scheduler,
    p: &StartParams<'_>,
    rng: &mut dyn NoiseSource,
) -> Result<Start> {
    let (n, c) = (p.n_samples, manifest.latent.channels);
    let (h, w) = p.latent_hw;
    let shape = [n, c, h, w];
    let Some(init) = p.init else {
        // diffusers' prepare_latents: randn_tensor((n, C, H/8, W/8), generator), one draw, unless
        // latents are given; then `latents * init_noise_sigma`.
        let noise = match p.latents {
            Some(latents) => latents.clone(),
            None => randn(rng, &shape),
        };
        return Ok(Start { latents: noise * scheduler.init_noise_sigma(), inpainting: None });
    };
    let encoder = vae_encoder.ok_or_else(|| {
        Error::Unsupported("img2img and inpainting need a VAE encoder, and this graph set has none".into())
    })?;
    let inpainting_unet = manifest.inpainting_unet();
    // Inpainting encodes the image only when it needs it: for a regular UNet (to blend) or below
    // full strength (to noise it); img2img always does.
    let encode_image = init.mask.is_none() || !inpainting_unet || !p.full_strength;
    let image_latents = if encode_image {
        let latents = encode_sample(manifest, encoder.as_mut(), &init.pixels, rng)?;
        Some(repeat_rows(&latents, n, "init image latents")?)
    } else {
        None
    };
    let noise = randn(rng, &shape);
    let latents = match (&image_latents, init.mask.is_some() && p.full_strength) {
        // Inpainting at strength 1: pure noise, `noise * init_noise_sigma`.
        (_, true) => &noise * scheduler.init_noise_sigma(),
        (Some(image), false) => scheduler.add_noise(image.view(), noise.view(), p.first_step),
        (None, false) => return Err(internal("the init image is encoded below full strength".into())),
    };
    let Some(mask) = &init.mask else { return Ok(Start { latents, inpainting: None }) };

    // prepare_mask_latents: the masked image `init * (mask < 0.5)` is encoded (one more draw), and
    // the mask is resized to the latent size with `interpolate(mode="nearest")`.
    let masked = &init.pixels * &mask.mapv(|m| if m < 0.5 { 1.0f32 } else { 0.0 });
    let masked_latents = encode_sample(manifest, encoder.as_mut(), &masked, rng)?;
    let mask_latent = nearest(&mask.view().into_dyn(), h, w);
    let inpainting = if inpainting_unet {
        let mask_rows = repeat_rows(&mask_latent, p.unet_batch, "mask")?;
        let masked_rows = repeat_rows(&masked_latents, p.unet_batch, "masked image latents")?;
        let extra = ndarray::concatenate(Axis(1), &[mask_rows.view(), masked_rows.view()])
            .map_err(|e| internal(format!("mask and masked latents do not concatenate: {e}")))?;
        Inpainting { extra_channels: Some(extra), blend: None }
    } else {
        let image_latents = image_latents.ok_or_else(|| internal("a regular UNet blends the image latents".into()))?;
        let mask = repeat_rows(&mask_latent, n, "mask")?;
        let keep = mask.mapv(|m| 1.0 - m);
        Inpainting { extra_channels: None, blend: Some(Blend { mask, keep, image_latents, noise }) }
    };
    Ok(Start { latents, inpainting: Some(inpainting) })
}

impl Inpainting {
    /// An inpainting UNet's input: `torch.cat([latent_model_input, mask, masked_image_latents],
    /// dim=1)` after `scale_model_input`.
    pub fn extend_input(&self, model_input: ArrayD<f32>) -> Result<ArrayD<f32>> {
        match &self.extra_channels {
            None => Ok(model_input),
            Some(extra) => ndarray::concatenate(Axis(1), &[model_input.view(), extra.view()])
                .map_err(|e| internal(format!("inpainting UNet input: {e}"))),
        }
    }

    /// After step index `step` of a regular UNet: the kept area goes back to the init image noised
    /// to the next step's level (`add_noise(image_latents, noise, timesteps[i + 1])`), or to the
    /// clean image latents after the last step, which diffusers leaves as they are:
    /// `latents = (1 - init_mask) * init_latents_proper + init_mask * latents`.
    pub fn blend(&self, latents: &mut ArrayD<f32>, scheduler: &dyn Scheduler, step: usize) {
        let Some(b) = &self.blend else { return };
        let proper = if step + 1 < scheduler.num_steps() {
            scheduler.add_noise(b.image_latents.view(), b.noise.view(), step + 1)
        } else {
            b.image_latents.clone()
        };
        *latents = &b.keep * &proper + &(&b.mask * &*latents);
    }
}

/// `a` with its single row repeated to `rows` rows (diffusers' `repeat` / `cat([x] * k)` of one
/// image over the batch).
fn repeat_rows(a: &ArrayD<f32>, rows: usize, what: &str) -> Result<ArrayD<f32>> {
    if a.shape().first() != Some(&1) {
        return Err(internal(format!("{what} should have one row, got shape {:?}", a.shape())));
    }
    Ok(a.select(Axis(0), &vec![0; rows]))
}

/// torch's `interpolate(x, size=(h, w), mode="nearest")` of [N, C, H, W]: source index
/// `floor(dst × in / out)`, with the scale in float32 as torch computes it.
fn nearest(x: &ndarray::ArrayViewD<f32>, h: usize, w: usize) -> ArrayD<f32> {
    let (n, c, ih, iw) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let src = |dst: usize, input: usize, output: usize| -> usize {
        let scale = input as f32 / output as f32;
        ((dst as f32 * scale).floor() as usize).min(input - 1)
    };
    ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |i| x[[i[0], i[1], src(i[2], ih, h), src(i[3], iw, w)]])
}

fn internal(message: String) -> Error {
    Error::Backend { backend: "pipeline", graph: "vae_encoder".into(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_takes_every_eighth_pixel() {
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 1, 16, 16]), |i| (i[2] * 16 + i[3]) as f32);
        let y = nearest(&x.view(), 2, 2);
        assert_eq!(y.into_raw_vec_and_offset().0, vec![0.0, 8.0, 128.0, 136.0]);
    }
}
