"""`adapter_NAME` graphs: a T2I-Adapter's condition image -> one feature map per residual slot it feeds.

Exactly diffusers' `T2IAdapter.forward` (models/adapter.py). The per-adapter weight
(`adapter_conditioning_scale`) and the sum over adapters (`MultiAdapter`) stay in the runtime.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import T2IAdapter

from .errors import ExportError
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph
from .unet import ResidualSlot

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def check_name(name: str, kind: str = "adapter") -> None:
    if not NAME_RE.fullmatch(name):
        raise ExportError(f"{kind} name {name!r} is invalid: use only letters, digits, '_' and '-'")


class AdapterGraph(torch.nn.Module):
    """`adapter_NAME` graph: condition f32 [batch, in_channels, H, W] in [0, 1] -> feature_0..n-1."""

    def __init__(self, adapter: T2IAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, condition):
        return tuple(self.adapter(condition))


def condition_kind(adapter: T2IAdapter) -> str:
    return "gray" if adapter.config.in_channels == 1 else "rgb"


def _blank_features(adapter: T2IAdapter, size_multiple: int) -> tuple[int, list[torch.Tensor]]:
    side = math.lcm(size_multiple, adapter.total_downscale_factor)
    with torch.no_grad():
        return side, adapter(torch.zeros(1, adapter.config.in_channels, side, side))


def feature_count(adapter: T2IAdapter, size_multiple: int) -> int:
    """How many features (residuals) the adapter yields: 4 for SD 1.x/2.x full and light adapters and
    for full_adapter_xl, whose 4th feeds SDXL's mid block."""
    return len(_blank_features(adapter, size_multiple)[1])


def match_slots(name: str, adapter: T2IAdapter, slots: list[ResidualSlot], vae_downscale: int, size_multiple: int) -> list[int]:
    """Which residual slots the adapter's features feed (feature i -> slot i, diffusers pops them in order).

    Checked by running the adapter once on a blank image: every feature must have the channels and the
    spatial size of its slot, otherwise the UNet's `down_intrablock_additional_residuals` would not fit.
    """
    if adapter.config.in_channels not in (1, 3):
        raise ExportError(f"adapter {name}: in_channels={adapter.config.in_channels}; only 1 (gray) or 3 (rgb) are supported")
    side, feats = _blank_features(adapter, size_multiple)
    if len(feats) > len(slots):
        raise ExportError(
            f"adapter {name}: yields {len(feats)} features but the UNet has only {len(slots)} residual slots "
            f"(adapter_type={adapter.config.adapter_type!r} is for a different UNet)"
        )
    latent = side // vae_downscale
    for i, f in enumerate(feats):
        s = slots[i]
        want = (s.channels, -(-latent // s.downscale), -(-latent // s.downscale))
        got = tuple(f.shape[1:])
        if got != want:
            raise ExportError(
                f"adapter {name}: feature {i} has shape (channels, h, w)={got} for a {side}x{side} image, but UNet "
                f"residual slot {s.input} expects {want}: the adapter's channels {list(adapter.config.channels)} "
                f"do not match the UNet's block_out_channels"
            )
    return list(range(len(feats)))


def io_spec(adapter: T2IAdapter, slots: list[ResidualSlot], fed: list[int]) -> tuple[list[TensorIO], list[TensorIO]]:
    inputs = [TensorIO("condition", ["batch", adapter.config.in_channels, "image_height", "image_width"])]
    outputs = []
    for i, slot_index in enumerate(fed):
        s = slots[slot_index]
        outputs.append(TensorIO(f"feature_{i}", ["batch", s.channels, s.height, s.width]))
    return inputs, outputs


def export_adapter(
    adapter: T2IAdapter,
    slots: list[ResidualSlot],
    fed: list[int],
    path: Path,
    size_multiple: int,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
) -> list[Path]:
    side = math.lcm(size_multiple, adapter.total_downscale_factor)
    g = torch.Generator().manual_seed(0)
    args = (torch.rand(2, adapter.config.in_channels, side, 2 * side, generator=g),)
    inputs, outputs = io_spec(adapter, slots, fed)
    return export_graph(AdapterGraph(adapter), args, path, inputs, outputs, external_data_threshold, precision)
