"""The `text_encoder` graph: CLIP token ids -> last hidden state (what SD 1.x cross-attends to).

diffusers' `encode_prompt` (clip_skip=None, no attention mask for SD 1.x's CLIP) uses
`text_encoder(input_ids)[0]`, i.e. `last_hidden_state` after the final layer norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel

from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph


class TextEncoderGraph(torch.nn.Module):
    """`text_encoder` graph: input_ids int64 [batch, seq_len] -> last_hidden_state f32 [batch, seq_len, D]."""

    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


def io_spec(text_encoder: CLIPTextModel, seq_len: int) -> tuple[list[TensorIO], list[TensorIO]]:
    d = text_encoder.config.hidden_size
    return (
        [TensorIO("input_ids", ["batch", seq_len])],
        [TensorIO("last_hidden_state", ["batch", seq_len, d])],
    )


def example_inputs(text_encoder: CLIPTextModel, seq_len: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, text_encoder.config.vocab_size, (2, seq_len), generator=g, dtype=torch.int64),)


def export_text_encoder(
    text_encoder: CLIPTextModel,
    seq_len: int,
    path: Path,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> list[Path]:
    inputs, outputs = io_spec(text_encoder, seq_len)
    return export_graph(
        TextEncoderGraph(text_encoder), example_inputs(text_encoder, seq_len), path, inputs, outputs, external_data_threshold
    )
