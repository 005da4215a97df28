"""The `vae_decoder` graph: latents (already divided by `scaling_factor`) -> image in about [-1, 1].

Exactly `AutoencoderKL.decode(latent_sample).sample` (post_quant_conv + decoder); the pipeline's
`latents / scaling_factor` and `(image / 2 + 0.5).clamp(0, 1)` stay in the runtime.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph


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
) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, vae.config.latent_channels, *latent_hw, generator=g),)
    inputs, outputs = io_spec(vae)
    return export_graph(VaeDecoderGraph(vae), args, path, inputs, outputs, external_data_threshold)
