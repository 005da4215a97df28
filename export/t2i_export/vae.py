"""The VAE graphs.

`vae_decoder`: latents (already divided by `scaling_factor`) -> image in about [-1, 1]. Exactly
`AutoencoderKL.decode(latent_sample).sample` (post_quant_conv + decoder); the pipeline's
`latents / scaling_factor` and `(image / 2 + 0.5).clamp(0, 1)` stay in the runtime.

`vae_encoder`: image in [-1, 1] -> the posterior's mean and std. Exactly
`AutoencoderKL.encode(image).latent_dist` (encoder + quant_conv, then diffusers'
`DiagonalGaussianDistribution`, models/autoencoders/vae.py: moments chunked into mean and logvar,
logvar clamped to [-30, 20], std = exp(0.5 * logvar)). Sampling stays in the runtime, which draws
eps from its generator and computes `(mean + std * eps) * scaling_factor`, as the img2img and
inpainting pipelines do (`retrieve_latents(vae.encode(x), generator)` = `latent_dist.sample(generator)`).

The VAE's compute precision is a manifest property (`vae.precision`, the same for both graphs):
`fp16` halves its memory and time on GPUs, but SDXL's original VAE overflows in fp16 (diffusers' SDXL
pipelines upcast it, for encoding as for decoding: `force_upcast`), so fp16 SDXL VAE graphs need an
fp16-safe VAE (`--vae DIR`, e.g. madebyollin/sdxl-vae-fp16-fix). The graphs' inputs and outputs stay
float32 either way (casts inside the graph), so the runtime feeds them the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .errors import ExportError
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph
from .precision import check_precision


def needs_fp32(vae: AutoencoderKL, sdxl: bool) -> bool:
    """Whether diffusers runs this VAE in float32 even in an fp16 pipeline.

    The SDXL pipelines do when its config has `force_upcast` (SDXL's original VAE overflows in fp16):
    `needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast` to decode
    (pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py), and `if
    self.vae.config.force_upcast: image = image.float(); self.vae.to(dtype=torch.float32)` to encode
    (pipeline_stable_diffusion_xl_img2img.py `prepare_latents`, pipeline_stable_diffusion_xl_inpaint.py
    `_encode_vae_image`). The SD 1.x/2.x pipelines never do: `force_upcast` defaults to true, so SD
    1.5's VAE, whose config predates the key, has it too, and runs in fp16 there.
    """
    return sdxl and bool(getattr(vae.config, "force_upcast", True))


def vae_downscale(vae: AutoencoderKL) -> int:
    # diffusers pipelines: vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


class VaeDecoderGraph(torch.nn.Module):
    """`vae_decoder` graph: latent_sample f32 [batch, C, h, w] -> image f32 [batch, 3, h*8, w*8]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def io_spec(vae: AutoencoderKL) -> tuple[list[TensorIO], list[TensorIO]]:
    c = vae.config.latent_channels
    return (
        [TensorIO("latent_sample", ["batch", c, "latent_height", "latent_width"])],
        [TensorIO("image", ["batch", vae.config.out_channels, "image_height", "image_width"])],
    )


def export_vae_decoder(
    vae: AutoencoderKL,
    path: Path,
    latent_hw: tuple[int, int],
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
) -> list[Path]:
    """Export the decoder in `precision` (checked beforehand with `check_vae_precision`)."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, vae.config.latent_channels, *latent_hw, generator=g),)
    inputs, outputs = io_spec(vae)
    return export_graph(VaeDecoderGraph(vae), args, path, inputs, outputs, external_data_threshold, precision)


class VaeEncoderGraph(torch.nn.Module):
    """`vae_encoder` graph: image f32 [batch, 3, H, W] in [-1, 1] -> (latent_mean, latent_std) f32
    [batch, C, H/8, W/8]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        posterior = self.vae.encode(image, return_dict=False)[0]
        return posterior.mean, posterior.std


def encoder_io_spec(vae: AutoencoderKL) -> tuple[list[TensorIO], list[TensorIO]]:
    c = vae.config.latent_channels
    latent = ["batch", c, "latent_height", "latent_width"]
    return (
        [TensorIO("image", ["batch", vae.config.in_channels, "image_height", "image_width"])],
        [TensorIO("latent_mean", latent), TensorIO("latent_std", latent)],
    )


def export_vae_encoder(
    vae: AutoencoderKL,
    path: Path,
    latent_hw: tuple[int, int],
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
) -> list[Path]:
    """Export the encoder in `precision` (the decoder's: `check_vae_precision` covers both)."""
    g = torch.Generator().manual_seed(0)
    scale = vae_downscale(vae)
    h, w = latent_hw
    args = (torch.rand(2, vae.config.in_channels, h * scale, w * scale, generator=g) * 2 - 1,)
    inputs, outputs = encoder_io_spec(vae)
    return export_graph(VaeEncoderGraph(vae), args, path, inputs, outputs, external_data_threshold, precision)


def check_vae_precision(vae: AutoencoderKL, precision: str, sdxl: bool) -> None:
    check_precision(precision, "vae precision")
    if precision == "fp16" and needs_fp32(vae, sdxl):
        raise ExportError(
            "vae: this VAE's config has force_upcast=true (diffusers' SDXL pipelines run it in fp32 because it "
            "overflows in fp16, like SDXL's original VAE); export it with --vae-precision fp32, or pass an fp16-safe "
            "VAE with --vae DIR (e.g. madebyollin/sdxl-vae-fp16-fix, whose config has force_upcast=false)"
        )
