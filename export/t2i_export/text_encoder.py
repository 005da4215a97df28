"""`text_encoders` graphs: CLIP token ids -> the hidden states the UNet cross-attends to (+ pooled).

What each family's diffusers pipeline takes from its encoder(s) (`encode_prompt`, clip_skip=None):

* SD 1.x and SD 2.x (`StableDiffusionPipeline` / `StableDiffusionAdapterPipeline`):
  `text_encoder(input_ids)[0]`, the `last_hidden_state` after the final layer norm. SD 2.x's
  OpenCLIP ViT-H was converted with its last layer dropped (23 of 24), so this *is* the penultimate
  layer OpenCLIP's SD 2 used; nothing else differs.
* SDXL (`StableDiffusionXLAdapterPipeline`): `hidden_states[-2]` (penultimate layer, no final layer
  norm) of both `CLIPTextModel` and `CLIPTextModelWithProjection`, concatenated on the last axis,
  and the second encoder's projected pooled output `text_embeds`.

The graph outputs are named after what they hold (`last_hidden_state`, `penultimate_hidden_state`,
`text_embeds`); the manifest says which output feeds what.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph

HIDDEN_OUTPUTS = {"last": "last_hidden_state", "penultimate": "penultimate_hidden_state"}
POOLED_OUTPUT = "text_embeds"


@dataclass(frozen=True)
class EncoderUse:
    """Which of an encoder's outputs a family's pipeline uses."""

    hidden: str  # "last" | "penultimate"
    pooled: bool  # the projected pooled output (CLIPTextModelWithProjection.text_embeds)

    @property
    def hidden_output(self) -> str:
        return HIDDEN_OUTPUTS[self.hidden]


class TextEncoderGraph(torch.nn.Module):
    """input_ids int64 [batch, seq_len] -> hidden f32 [batch, seq_len, D] (+ text_embeds f32 [batch, P])."""

    def __init__(self, text_encoder: CLIPTextModel | CLIPTextModelWithProjection, use: EncoderUse = EncoderUse("last", False)):
        super().__init__()
        self.text_encoder = text_encoder
        self.use = use

    def forward(self, input_ids):
        if self.use.hidden == "last" and not self.use.pooled:
            # SD 1.x/2.x exactly as diffusers calls it (no hidden states requested).
            return self.text_encoder(input_ids, return_dict=False)[0]
        out = self.text_encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2] if self.use.hidden == "penultimate" else out.last_hidden_state
        if self.use.pooled:
            return hidden, out.text_embeds
        return hidden


def io_spec(text_encoder, seq_len: int, use: EncoderUse) -> tuple[list[TensorIO], list[TensorIO]]:
    d = text_encoder.config.hidden_size
    outputs = [TensorIO(use.hidden_output, ["batch", seq_len, d])]
    if use.pooled:
        outputs.append(TensorIO(POOLED_OUTPUT, ["batch", text_encoder.config.projection_dim]))
    return [TensorIO("input_ids", ["batch", seq_len])], outputs


def example_inputs(text_encoder, seq_len: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, text_encoder.config.vocab_size, (2, seq_len), generator=g, dtype=torch.int64),)


def export_text_encoder(
    text_encoder,
    seq_len: int,
    path: Path,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    use: EncoderUse = EncoderUse("last", False),
    precision: str = "fp32",
) -> list[Path]:
    inputs, outputs = io_spec(text_encoder, seq_len, use)
    args = example_inputs(text_encoder, seq_len)
    with _attention(text_encoder, "eager" if precision == "fp16" else None):
        return export_graph(TextEncoderGraph(text_encoder, use), args, path, inputs, outputs, external_data_threshold, precision)


@contextmanager
def _attention(text_encoder, implementation: str | None) -> Iterator[None]:
    """Trace with transformers' `implementation` attention (None: the model's own, SDPA).

    fp16 needs "eager": the SDPA path traces to torch's ONNX `scaled_dot_product_attention` with
    `is_causal`, whose causal mask is float32 -inf constants; added to fp16 scores, the legacy exporter
    then mixes float32 and fp16 tensors in one layer, a graph onnxruntime refuses to load. Eager
    attention (`eager_attention_forward`) adds a causal mask of the model's dtype (finfo(fp16).min).
    """
    previous = text_encoder.config._attn_implementation
    if implementation is None or implementation == previous:
        yield
        return
    text_encoder.set_attn_implementation(implementation)
    try:
        yield
    finally:
        text_encoder.set_attn_implementation(previous)
