//! The VAE on both sides of the latent space: images → latents (img2img and inpainting: diffusers'
//! `retrieve_latents(vae.encode(image), generator)` scaled by `scaling_factor`) and latents →
//! images (`decode_latents` + `numpy_to_pil`).

use image::RgbImage;
use ndarray::{Array4, ArrayD};

use crate::backend::{GraphSession, TensorView};
use crate::error::{check_finite, Error, Result, Stage};
use crate::manifest::Manifest;
use crate::output::decoder_output_to_images;
use crate::scheduler::{randn, NoiseSource};

/// Encodes `pixels` ([1, 3, H, W] in [-1, 1]) and draws one sample of the latent distribution,
/// scaled for the UNet: diffusers' `scaling_factor * vae.encode(image).latent_dist.sample(generator)`,
/// where the sample is `mean + std * randn_tensor(mean.shape, generator)`: one draw from `noise`.
pub(crate) fn encode_sample(
    manifest: &Manifest,
    session: &mut dyn GraphSession,
    pixels: &Array4<f32>,
    noise: &mut dyn NoiseSource,
) -> Result<ArrayD<f32>> {
    let outputs = session.run(&[("image", TensorView::F32(pixels.view().into_dyn()))])?;
    check_finite(&outputs, || Stage::VaeEncoder)?;
    let spec = manifest.graphs.vae_encoder.as_ref().ok_or_else(|| {
        Error::Unsupported("this graph set has no VAE encoder; re-export it with this t2i_export".into())
    })?;
    let (mut mean, mut std) = (None, None);
    for (name, value) in spec.outputs.iter().map(|o| o.name.as_str()).zip(outputs) {
        match name {
            "latent_mean" => mean = Some(value),
            "latent_std" => std = Some(value),
            _ => {}
        }
    }
    let (Some(mean), Some(std)) = (mean, std) else {
        return Err(Error::Backend {
            backend: "pipeline",
            graph: "vae_encoder".into(),
            message: "graph returned no latent_mean or latent_std; re-export the graph set".into(),
        });
    };
    if mean.shape() != std.shape() {
        return Err(Error::Backend {
            backend: "pipeline",
            graph: "vae_encoder".into(),
            message: format!("latent_mean {:?} and latent_std {:?} differ in shape", mean.shape(), std.shape()),
        });
    }
    let eps = randn(noise, mean.shape());
    // `self.mean + self.std * sample`, then the pipeline's `scaling_factor * latents` (a Python
    // float times a float32 tensor: float32 arithmetic).
    let scale = manifest.vae.scaling_factor as f32;
    Ok((mean + std * eps) * scale)
}

/// Decodes final latents into images (diffusers' `decode_latents` + `numpy_to_pil`). Latents that
/// overflow once scaled are `overflow()`; a decoder that produces NaN or infinity is
/// [`Error::NumericalFault`] at [`Stage::VaeDecoder`].
pub(crate) fn decode(
    manifest: &Manifest,
    session: &mut dyn GraphSession,
    latents: &Array4<f32>,
    overflow: impl FnOnce() -> Error,
) -> Result<Vec<RgbImage>> {
    // diffusers: `1 / self.vae.config.scaling_factor * latents`, the reciprocal taken in double.
    let scaled = latents * ((1.0 / manifest.vae.scaling_factor) as f32);
    if scaled.iter().any(|v| !v.is_finite()) {
        return Err(overflow());
    }
    let decoded = session.run(&[("latent_sample", TensorView::F32(scaled.view().into_dyn()))])?;
    let decoded = decoded.into_iter().next().ok_or_else(|| Error::Backend {
        backend: "pipeline",
        graph: "vae_decoder".into(),
        message: "graph returned no output".into(),
    })?;
    check_finite(std::slice::from_ref(&decoded), || Stage::VaeDecoder)?;
    let decoded: Array4<f32> = decoded.into_dimensionality().map_err(|_| Error::Backend {
        backend: "pipeline",
        graph: "vae_decoder".into(),
        message: "output is not 4-dimensional; re-export the graph set".into(),
    })?;
    decoder_output_to_images(decoded.view())
}
