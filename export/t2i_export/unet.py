"""The `unet` graph: one denoising step's noise prediction, with one input per adapter-residual slot.

Semantics are exactly those of diffusers' `UNet2DConditionModel.forward` called with
`down_intrablock_additional_residuals=[adapter_residual_0, ...]` (diffusers
models/unets/unet_2d_condition.py, "3. down"):

* a `CrossAttnDownBlock2D` adds its residual to the output of its last resnet+attention pair, before
  its downsampler (models/unets/unet_2d_blocks.py, `CrossAttnDownBlock2D.forward`): the skip
  connection saved there includes the residual;
* after a block without cross-attention (`DownBlock2D`) the UNet does `sample += residual` *in place*.
  `sample` is the very tensor object stored last in that block's skip tuple, so the skip connection
  that the up path concatenates also carries the residual. The exported graph is traced from the real
  diffusers forward, so it reproduces this aliasing; `tests/test_parity.py` checks it numerically
  against a variant without the aliasing;
* T2I-Adapter-XL yields one feature more than SDXL has down blocks: the UNet adds it to the mid
  block's output when the shapes agree ("To support T2I-Adapter-XL"). That slot exists only when an
  exported adapter feeds it (`residual_slots(config, features)`).

SDXL UNets (`addition_embed_type="text_time"`) also take `text_embeds` (the pooled projection of the
second text encoder) and `time_ids` ([orig_h, orig_w, crop_top, crop_left, target_h, target_w]) as
graph inputs: diffusers' `added_cond_kwargs`.

Zeros in every `adapter_residual_i` are exactly "no adapter".

A set with an IP-Adapter adds `ip_tokens` [batch, tokens, cross_attention_dim] and `ip_scale` [1]
after the added conditioning (`ip_adapter.py`); zeros in `ip_scale` are exactly "no IP-Adapter".

A set with ControlNets adds their residuals as inputs (`controlnet.py`): diffusers'
`down_block_additional_residuals` and `mid_block_additional_residual`, added to the skip connections
and the mid block's output after the adapter residuals, as in `UNet2DConditionModel.forward`. Both
kinds go into the one graph, so any combination of adapters and ControlNets runs on one engine.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from .errors import ExportError
from .ip_adapter import SCALE_INPUT, TOKENS_INPUT, UNetIPInputs
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
TIME_ID_COUNT = 6  # original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)


@dataclass(frozen=True)
class ResidualSlot:
    """One `down_intrablock_additional_residuals` entry: `channels` at `downscale` × below the latent."""

    index: int
    channels: int
    downscale: int

    @property
    def input(self) -> str:
        return f"adapter_residual_{self.index}"

    @property
    def height(self) -> str:
        return "latent_height" if self.downscale == 1 else f"latent_height_div{self.downscale}"

    @property
    def width(self) -> str:
        return "latent_width" if self.downscale == 1 else f"latent_width_div{self.downscale}"

    def manifest(self) -> dict:
        return {"input": self.input, "channels": self.channels, "downscale": self.downscale}


def has_text_time(config) -> bool:
    """SDXL-style added conditioning: pooled text embeddings + size/crop time ids."""
    return config.addition_embed_type == "text_time"


def check_unet(config) -> None:
    """Refuse UNet configs whose forward the graph contract cannot express (LCM, class-conditioned, ...)."""
    problems = []
    for t in config.down_block_types:
        if t not in SUPPORTED_DOWN_BLOCKS:
            problems.append(f"down block {t!r} (supported: {', '.join(SUPPORTED_DOWN_BLOCKS)})")
    if config.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={config.addition_embed_type!r} (supported: none, 'text_time')")
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        problems.append("class embeddings")
    if config.time_cond_proj_dim is not None:
        problems.append("time_cond_proj_dim (guidance-embedding UNet)")
    if config.encoder_hid_dim is not None:
        problems.append("encoder_hid_dim")
    if problems:
        raise ExportError("unet: not an SD 1.x/2.x/XL UNet: unsupported " + "; ".join(problems))


def residual_slots(config, features: int = 0) -> list[ResidualSlot]:
    """One slot per down block, in diffusers' order, plus the mid-block slot when `features` (the
    most features any exported adapter yields) asks for it.

    A cross-attention block adds its residual before its downsampler (downscale 2**i); a plain
    `DownBlock2D` gets it added to its output, i.e. after its downsampler if it has one. The mid
    block's output has the last block's channels at the last block's downscale.
    """
    n = len(config.down_block_types)
    slots = []
    for i, (kind, channels) in enumerate(zip(config.down_block_types, config.block_out_channels)):
        has_downsampler = i < n - 1
        after_downsampler = kind == "DownBlock2D" and has_downsampler
        slots.append(ResidualSlot(i, int(channels), 2 ** (i + 1) if after_downsampler else 2**i))
    if features > n:
        slots.append(ResidualSlot(n, int(config.block_out_channels[-1]), 2 ** (n - 1)))
    return slots


def pooled_dim(config) -> int:
    """Length of `text_embeds` a text_time UNet takes (its add_embedding input less the time ids)."""
    return int(config.projection_class_embeddings_input_dim) - TIME_ID_COUNT * int(config.addition_time_embed_dim)


class UNetGraph(torch.nn.Module):
    """`unet` graph: (sample, timestep, encoder_hidden_states, [text_embeds, time_ids,] [ip_tokens,
    ip_scale,] adapter_residual_0..n-1, [control_down_0..k-1, control_mid]) -> noise_pred.

    `control`: how many ControlNet residual inputs come last (0: the set has no ControlNet); `ip`: the
    IP-Adapter's inputs (its processors must be `ip.attached` to the UNet while this runs)."""

    def __init__(self, unet: UNet2DConditionModel, control: int = 0, ip: UNetIPInputs | None = None):
        super().__init__()
        self.unet = unet
        self.text_time = has_text_time(unet.config)
        self.control = control
        self.ip = ip

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.text_time:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        if self.ip is not None:
            ip_tokens, ip_scale, *rest = rest
            self.ip.feed(ip_tokens, ip_scale)
        down, mid = None, None
        if self.control:
            rest, control = rest[: len(rest) - self.control], rest[len(rest) - self.control :]
            down, mid = list(control[:-1]), control[-1]
        # diffusers pops from this list: give it a fresh one each call.
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            down_intrablock_additional_residuals=list(rest),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


def io_spec(
    unet: UNet2DConditionModel, slots: list[ResidualSlot], seq_len: int, control: list[ResidualSlot] = (),
    ip: UNetIPInputs | None = None, sequence: tuple[str, int] | None = None,
) -> tuple[list[TensorIO], list[TensorIO]]:
    """`sequence`: (dim name, example length) when encoder_hidden_states' length is dynamic (a set with
    a style adapter: the text's `seq_len` tokens plus any style tokens); else it is fixed to `seq_len`."""
    c = unet.config.in_channels
    inputs = [
        TensorIO("sample", ["batch", c, "latent_height", "latent_width"]),
        TensorIO("timestep", ["batch"]),
        TensorIO("encoder_hidden_states", ["batch", sequence[0] if sequence else seq_len, unet.config.cross_attention_dim]),
    ]
    if has_text_time(unet.config):
        inputs += [TensorIO("text_embeds", ["batch", pooled_dim(unet.config)]), TensorIO("time_ids", ["batch", TIME_ID_COUNT])]
    if ip is not None:
        inputs += [TensorIO(TOKENS_INPUT, ["batch", ip.num_tokens, unet.config.cross_attention_dim]), TensorIO(SCALE_INPUT, [1])]
    inputs += [TensorIO(s.input, ["batch", s.channels, s.height, s.width]) for s in [*slots, *control]]
    outputs = [TensorIO("noise_pred", ["batch", unet.config.out_channels, "latent_height", "latent_width"])]
    return inputs, outputs


def example_inputs(
    unet: UNet2DConditionModel, slots: list[ResidualSlot], seq_len: int, latent_hw=(8, 16), control: list[ResidualSlot] = (),
    ip: UNetIPInputs | None = None, sequence: tuple[str, int] | None = None,
) -> tuple:
    """Batch 2, a non-square latent and fractional timesteps, so that no dim is traced as a constant."""
    g = torch.Generator().manual_seed(0)
    h, w = latent_hw
    sample = torch.randn(2, unet.config.in_channels, h, w, generator=g)
    timestep = torch.tensor([999.0, 17.25])
    ehs = torch.randn(2, sequence[1] if sequence else seq_len, unet.config.cross_attention_dim, generator=g)
    added = ()
    if has_text_time(unet.config):
        time_ids = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w], [1024.0, 768.0, 16.0, 8.0, 512.0, 640.0]])
        added = (torch.randn(2, pooled_dim(unet.config), generator=g), time_ids)
    res = [torch.randn(2, s.channels, h // s.downscale, w // s.downscale, generator=g) for s in [*slots, *control]]
    ip_args = ()
    if ip is not None:  # drawn last: the other inputs stay what they were without an IP-Adapter
        ip_args = (torch.randn(2, ip.num_tokens, unet.config.cross_attention_dim, generator=g), torch.tensor([0.625]))
    return (sample, timestep, ehs, *added, *ip_args, *res)


def export_unet(
    unet: UNet2DConditionModel,
    slots: list[ResidualSlot],
    seq_len: int,
    path: Path,
    size_multiple_latent: int,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
    control: list[ResidualSlot] = (),
    ip: UNetIPInputs | None = None,
    sequence: tuple[str, int] | None = None,
) -> list[Path]:
    """`control`: the ControlNet residual inputs (`controlnet.control_slots`), when the set has ControlNets;
    `ip`: the IP-Adapter's inputs, when the set has one; `sequence`: (dim name, traced length) for a
    dynamic context length (`io_spec`). A set without it keeps the fixed `seq_len` and its graph bytes."""
    inputs, outputs = io_spec(unet, slots, seq_len, control, ip, sequence)
    # A latent of (1, 2) × the latent size multiple: valid, and height != width.
    args = example_inputs(unet, slots, seq_len, (size_multiple_latent, 2 * size_multiple_latent), control, ip, sequence)
    if ip is not None and precision == "fp16" and ip.upcasts(unet):
        raise ExportError("--ip-adapter: not supported with --precision fp16 for a UNet with upcast_attention (SD 2.x) yet")
    # fp16: the timestep stays float32, as diffusers' fp16 pipelines pass it (the scheduler's
    # timesteps; fractional ones would round in fp16); the UNet computes its sinusoidal embedding in
    # float32 and casts that to the weights' dtype (`UNet2DConditionModel.get_time_embed`).
    with _upcast_attention(unet, precision == "fp16"), ip.attached(unet) if ip is not None else nullcontext():
        return export_graph(
            UNetGraph(unet, len(control), ip), args, path, inputs, outputs, external_data_threshold, precision, keep_float32=["timestep"]
        )


@contextmanager
def _upcast_attention(unet: UNet2DConditionModel, half: bool) -> Iterator[None]:
    """In fp16, attention layers with `upcast_attention` (SD 2.1's UNet: its attention scores overflow
    fp16) get diffusers' `AttnProcessor`, which computes scores and softmax in float32 as the flag asks.

    The default SDPA processor ignores the flag: on GPUs the fused SDPA kernels keep the scores in
    float32 internally, but the exported graph materialises them, in fp16.
    """
    layers = [m for m in unet.modules() if isinstance(m, Attention) and m.upcast_attention] if half else []
    saved = [m.processor for m in layers]
    try:
        for m in layers:
            m.set_processor(AttnProcessor())
        yield
    finally:
        for m, p in zip(layers, saved):
            m.set_processor(p)
