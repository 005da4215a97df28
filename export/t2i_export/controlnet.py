"""`controlnet_NAME` graphs: one ControlNet's residuals for one UNet call, and the UNet's control slots.

Exactly diffusers' `ControlNetModel.forward` (models/controlnets/controlnet.py) with
`conditioning_scale=1`, each residual then multiplied by the graph input `scales[i]`. That one input
carries both of diffusers' scalings: plain (`residual * conditioning_scale`, every entry the same)
and guess mode (`residual * (logspace(-1, 0, n) * conditioning_scale)[i]`), which the runtime fills
from the manifest's `guess_mode_scales`, the float32 values `torch.logspace` gives, so that it
multiplies exactly the numbers diffusers multiplies. Which calls get a ControlNet
(`control_guidance_start`/`_end`), the sum over several (`MultiControlNetModel`) and guess mode's
zeros for the unconditional half stay in the runtime.

The UNet takes the residuals as `control_down_0 .. control_down_{k-1}` and `control_mid`
(diffusers' `down_block_additional_residuals` and `mid_block_additional_residual`); zeros in them
are exactly "no ControlNet". The ControlNet graph's outputs carry those same names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel

from .errors import ExportError
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph
from .unet import TIME_ID_COUNT, ResidualSlot, has_text_time, pooled_dim

CONDITIONING_CHANNELS = 3  # RGB control images, as every published SD ControlNet takes


@dataclass(frozen=True)
class ControlSlot(ResidualSlot):
    """One UNet control input: `channels` at `downscale` × below the latent. `index` is the down
    residual's position; the mid-block slot has `mid=True`."""

    mid: bool = False

    @property
    def input(self) -> str:
        return "control_mid" if self.mid else f"control_down_{self.index}"


def control_slots(config) -> list[ControlSlot]:
    """The UNet's `down_block_res_samples` (conv_in, then each block's resnets and its downsampler)
    and the mid block's output, as a ControlNet of that UNet yields them."""
    channels = [int(c) for c in config.block_out_channels]
    n = len(channels)
    slots = [ControlSlot(0, channels[0], 1)]
    for i, c in enumerate(channels):
        for _ in range(config.layers_per_block):
            slots.append(ControlSlot(len(slots), c, 2**i))
        if i < n - 1:
            slots.append(ControlSlot(len(slots), c, 2 ** (i + 1)))
    slots.append(ControlSlot(len(slots), channels[-1], 2 ** (n - 1), mid=True))
    return slots


def guess_mode_scales(slots: list[ControlSlot]) -> list[float]:
    """diffusers' guess-mode scales, `torch.logspace(-1, 0, len(down) + 1)` (0.1 to 1), as float32."""
    return [float(v) for v in torch.logspace(-1, 0, len(slots), dtype=torch.float32)]


def check_controlnet(name: str, controlnet: ControlNetModel, unet_config, slots: list[ControlSlot], vae_downscale: int,
                     size_multiple: int) -> None:
    """Refuse a ControlNet that does not fit the UNet: its residuals must have the slots' channels and
    sizes (checked by running it once on a blank input), and it must use the UNet's conditioning."""
    config = controlnet.config
    if config.conditioning_channels != CONDITIONING_CHANNELS:
        raise ExportError(
            f"controlnet {name}: conditioning_channels={config.conditioning_channels}; only RGB ({CONDITIONING_CHANNELS}) "
            "control images are supported"
        )
    if config.global_pool_conditions:
        raise ExportError(f"controlnet {name}: global_pool_conditions (shuffle-style ControlNets) is not supported")
    if config.cross_attention_dim != unet_config.cross_attention_dim:
        raise ExportError(
            f"controlnet {name}: cross_attention_dim {config.cross_attention_dim} != the UNet's "
            f"{unet_config.cross_attention_dim}: it was trained for another base model (SD 1.x, 2.x and XL differ)"
        )
    if (config.addition_embed_type == "text_time") != has_text_time(unet_config):
        raise ExportError(
            f"controlnet {name}: addition_embed_type={config.addition_embed_type!r} but the UNet's is "
            f"{unet_config.addition_embed_type!r}: an SDXL ControlNet needs an SDXL base model and the reverse"
        )
    if config.in_channels != unet_config.out_channels:
        raise ExportError(f"controlnet {name}: in_channels={config.in_channels}, expected the latent's {unet_config.out_channels}")
    side = size_multiple
    latent = side // vae_downscale
    args = example_inputs(controlnet, unet_config, slots, (latent, latent), batch=1)
    with torch.no_grad():
        outputs = ControlNetGraph(controlnet, has_text_time(unet_config))(*args)
    if len(outputs) != len(slots):
        raise ExportError(
            f"controlnet {name}: yields {len(outputs)} residuals but the UNet takes {len(slots)}: its down blocks or "
            "layers_per_block differ from the UNet's (a ControlNet for another base model)"
        )
    for out, slot in zip(outputs, slots):
        want = (slot.channels, latent // slot.downscale, latent // slot.downscale)
        if tuple(out.shape[1:]) != want:
            raise ExportError(
                f"controlnet {name}: residual {slot.input} has shape (channels, h, w)={tuple(out.shape[1:])}, the UNet "
                f"expects {want}: its block_out_channels {list(config.block_out_channels)} are not the UNet's "
                f"{list(unet_config.block_out_channels)}"
            )


def check_controlnet_dir(name: str, path: Path) -> None:
    if not path.is_dir():
        raise ExportError(f"--controlnet {name}={path}: not a directory (expected a diffusers ControlNetModel directory)")
    config = path / "config.json"
    if not config.is_file():
        raise ExportError(f"--controlnet {name}={path}: no config.json (expected a diffusers ControlNetModel directory)")
    kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if kind != "ControlNetModel":
        raise ExportError(f"--controlnet {name}={path}: config.json is a {kind!r}, expected 'ControlNetModel'")


class ControlNetGraph(torch.nn.Module):
    """`controlnet_NAME` graph: (sample, timestep, encoder_hidden_states, [text_embeds, time_ids,]
    controlnet_cond, scales) -> control_down_0 .. control_down_{k-1}, control_mid."""

    def __init__(self, controlnet: ControlNetModel, text_time: bool):
        super().__init__()
        self.controlnet = controlnet
        self.text_time = text_time

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.text_time:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        controlnet_cond, scales = rest
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        residuals = [*down, mid]
        return tuple(r * scales[i] for i, r in enumerate(residuals))


def io_spec(controlnet: ControlNetModel, unet_config, slots: list[ControlSlot], seq_len: int) -> tuple[list[TensorIO], list[TensorIO]]:
    c = unet_config.out_channels
    inputs = [
        TensorIO("sample", ["batch", c, "latent_height", "latent_width"]),
        TensorIO("timestep", ["batch"]),
        TensorIO("encoder_hidden_states", ["batch", seq_len, unet_config.cross_attention_dim]),
    ]
    if has_text_time(unet_config):
        inputs += [TensorIO("text_embeds", ["batch", pooled_dim(unet_config)]), TensorIO("time_ids", ["batch", TIME_ID_COUNT])]
    inputs += [
        TensorIO("controlnet_cond", ["batch", CONDITIONING_CHANNELS, "image_height", "image_width"]),
        TensorIO("scales", [len(slots)]),
    ]
    outputs = [TensorIO(s.input, ["batch", s.channels, s.height, s.width]) for s in slots]
    return inputs, outputs


def example_inputs(controlnet: ControlNetModel, unet_config, slots: list[ControlSlot], latent_hw, batch: int = 2,
                   seed: int = 0, seq_len: int = 77, vae_downscale: int = 8) -> tuple:
    """Batch 2, a non-square latent, fractional timesteps and distinct scales, so that nothing is
    traced as a constant."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    sample = torch.randn(batch, unet_config.out_channels, h, w, generator=g)
    timestep = torch.tensor([999.0, 17.25][:batch])
    ehs = torch.randn(batch, seq_len, unet_config.cross_attention_dim, generator=g)
    added = ()
    if has_text_time(unet_config):
        time_ids = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w], [1024.0, 768.0, 16.0, 8.0, 512.0, 640.0]])
        added = (torch.randn(batch, pooled_dim(unet_config), generator=g), time_ids[:batch])
    cond = torch.rand(batch, CONDITIONING_CHANNELS, h * vae_downscale, w * vae_downscale, generator=g)
    scales = torch.linspace(0.25, 1.5, len(slots))
    return (sample, timestep, ehs, *added, cond, scales)


def export_controlnet(
    controlnet: ControlNetModel,
    unet_config,
    slots: list[ControlSlot],
    seq_len: int,
    path: Path,
    size_multiple_latent: int,
    vae_downscale: int,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
) -> list[Path]:
    inputs, outputs = io_spec(controlnet, unet_config, slots, seq_len)
    args = example_inputs(controlnet, unet_config, slots, (size_multiple_latent, 2 * size_multiple_latent),
                          seq_len=seq_len, vae_downscale=vae_downscale)
    module = ControlNetGraph(controlnet, has_text_time(unet_config))
    # The timestep stays float32 as in the UNet (fractional timesteps would round in fp16).
    return export_graph(module, args, path, inputs, outputs, external_data_threshold, precision, keep_float32=["timestep"])
