"""TencentARC's T2I style adapter (`t2iadapter_style_sd14v1.pth`): the `style_encoder` and
`style_adapter` graphs, and how their tokens join the UNet's context.

diffusers has no style adapter, so the oracle is the original code, TencentARC/T2I-Adapter branch `SD`
at commit 16bba674b472121d5a86e3ed6b935f91d516bc74:

* `ldm/modules/encoders/adapter.py` (`LayerNorm`, `QuickGELU`, `ResidualAttentionBlock`,
  `StyleAdapter`): ported below with the same module and parameter names, so the released state dict
  loads with `strict=True`.
* `ldm/inference_base.py` `get_adapters`: the released adapter is
  `StyleAdapter(width=1024, context_dim=768, num_head=8, n_layes=3, num_token=8)`, its state dict read
  with any `adapter.` prefix stripped.
* `ldm/modules/extra_condition/api.py` `get_cond_style`: `CLIPProcessor` then `CLIPVisionModel`
  (openai/clip-vit-large-patch14) `last_hidden_state` [N, 257, 1024] is the adapter's input;
  `get_adapter_feature`: each style image's tokens times its `cond_weight`, several concatenated along
  the token axis (`combine_style_tokens`).
* `ldm/models/diffusion/ddim.py` (`p_sample_ddim`; `plms.py` the same): the tokens are appended to the
  prompt's context and the negative context is padded with its own last tokens (`style_context`), at
  the steps `style_cond_tau` allows (`style_active`).

The width, token count, context width and depth are read from the weights; the head count is not in
them (`nn.MultiheadAttention` packs all heads into one projection), and TencentARC builds every style
adapter with 8.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPImageProcessor, CLIPVisionModel

from .errors import ExportError
from .ip_adapter import preprocess_manifest
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph

SUFFIXES = (".pth", ".pt", ".ckpt")
NUM_HEAD = 8  # inference_base.get_adapters; not recoverable from the weights
ENCODER_OUTPUT = "last_hidden_state"
TOKENS_OUTPUT = "style_tokens"
ENCODER_ARCHS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
_LAYER = re.compile(r"^transformer_layes\.(\d+)\.")


# --- port of ldm/modules/encoders/adapter.py (TencentARC/T2I-Adapter@16bba674) -------------------


class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm to handle fp16 (computes in float32, returns the input's dtype)."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                         ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, x: torch.Tensor):
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class StyleAdapter(nn.Module):
    """`n_layes` and `transformer_layes` are the original's spellings (they are the state dict's keys)."""

    def __init__(self, width=1024, context_dim=768, num_head=8, n_layes=3, num_token=4):
        super().__init__()
        scale = width ** -0.5
        self.transformer_layes = nn.Sequential(*[ResidualAttentionBlock(width, num_head) for _ in range(n_layes)])
        self.num_token = num_token
        self.style_embedding = nn.Parameter(torch.randn(1, num_token, width) * scale)
        self.ln_post = LayerNorm(width)
        self.ln_pre = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, context_dim))

    def forward(self, x):
        # x shape [N, HW+1, C]
        style_embedding = self.style_embedding + torch.zeros(
            (x.shape[0], self.num_token, self.style_embedding.shape[-1]), device=x.device)
        x = torch.cat([x, style_embedding], dim=1)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer_layes(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x[:, -self.num_token:, :])
        x = x @ self.proj
        return x


# --- the original's sampling-time semantics, for the runtime to match ----------------------------


def combine_style_tokens(tokens: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Several style images' adapter outputs [N, T, C] -> one `append_to_context` [N, T * k, C]: each
    times its weight, concatenated in order (extra_condition/api.py `get_adapter_feature`)."""
    if not tokens or len(tokens) != len(weights):
        raise ValueError(f"{len(tokens)} token tensors and {len(weights)} weights: expected as many of each, at least one")
    return torch.cat([t * w for t, w in zip(tokens, weights)], dim=1)


def style_context(cond: torch.Tensor, uncond: torch.Tensor | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The contexts the UNet sees at a step with style (ddim.py `p_sample_ddim`, plms.py `p_sample_plms`):
    `cond` [N, L, C] + `tokens` [N, P, C] -> [N, L + P, C]; with guidance the negative context `uncond`
    is padded with its own last P tokens (`uncond[:, -P:]`), which needs P <= L (the original fails
    otherwise). Without guidance (`uncond` None) only the cond context exists."""
    pad = tokens.shape[1]
    if uncond is not None and pad > uncond.shape[1]:
        raise ValueError(f"{pad} style tokens: the negative context pads with its own last tokens, it has only {uncond.shape[1]}")
    new_cond = torch.cat([cond, tokens], dim=1)
    if uncond is None:
        return new_cond, None
    return new_cond, torch.cat([uncond, uncond[:, -pad:, :]], dim=1)


def style_active(i: int, total_steps: int, tau: float) -> bool:
    """Whether step `i` (0 = the first, noisiest) appends the style tokens: ddim.py `ddim_sampling`
    passes `append_to_context=None if index < int((1 - style_cond_tau) * total_steps)` with
    `index = total_steps - i - 1`; tau 1.0 (the default) styles every step."""
    return total_steps - i - 1 >= int((1 - tau) * total_steps)


# --- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleConfig:
    width: int
    context_dim: int
    num_head: int
    n_layes: int
    num_token: int

    def build(self) -> StyleAdapter:
        return StyleAdapter(self.width, self.context_dim, self.num_head, self.n_layes, self.num_token)


def _expected(path: Path) -> str:
    return (f"--style-adapter {path}: not TencentARC's StyleAdapter state dict (expected style_embedding [1, T, W], "
            "proj [W, C], ln_pre/ln_post and transformer_layes.N.* as in t2iadapter_style_sd14v1.pth)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path`, `adapter.`-prefixed keys stripped as inference_base.get_adapters does."""
    if not path.is_file():
        raise ExportError(f"--style-adapter {path}: not a file (expected TencentARC's t2iadapter_style_*.pth)")
    if path.suffix.lower() not in SUFFIXES:
        raise ExportError(f"--style-adapter {path}: expected a {'/'.join(SUFFIXES)} file (TencentARC's t2iadapter_style_*.pth)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"--style-adapter {path}: cannot read it as a torch checkpoint ({type(e).__name__}: {first})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ExportError(_expected(path))
    return {k.removeprefix("adapter."): v for k, v in state.items()}


def style_config(path: Path, state: dict[str, torch.Tensor], num_head: int = NUM_HEAD) -> StyleConfig:
    """Sizes from the weights' shapes; the head count as TencentARC builds it."""
    emb, proj = state.get("style_embedding"), state.get("proj")
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if emb is None or proj is None or emb.dim() != 3 or emb.shape[0] != 1 or proj.dim() != 2 or not layers:
        raise ExportError(_expected(path))
    width, num_token, context_dim = int(emb.shape[2]), int(emb.shape[1]), int(proj.shape[1])
    if int(proj.shape[0]) != width or layers != list(range(len(layers))):
        raise ExportError(_expected(path))
    if width % num_head:
        raise ExportError(f"--style-adapter {path}: width {width} is not a multiple of the {num_head} attention heads")
    return StyleConfig(width, context_dim, num_head, len(layers), num_token)


def load_style_module(path: Path, num_head: int = NUM_HEAD) -> StyleAdapter:
    """The original module with the file's weights, every key and shape checked (`strict=True`)."""
    state = read_state_dict(path)
    module = style_config(path, state, num_head).build()
    expected = module.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != got:
        missing, extra = sorted(set(shapes) - set(got)), sorted(set(got) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(got) if shapes[k] != got[k])
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                  else f"{wrong[0]} is {list(got[wrong[0]])}, expected {list(shapes[wrong[0]])}")
        raise ExportError(f"--style-adapter {path}: {detail}; " + _expected(path).split(": ", 1)[1])
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.eval()


@dataclass
class Style:
    """One style adapter file and the CLIP vision encoder it reads."""

    path: Path
    module: StyleAdapter
    encoder: CLIPVisionModel
    preprocessor: CLIPImageProcessor

    @property
    def num_tokens(self) -> int:
        return self.module.num_token

    @property
    def context_dim(self) -> int:
        return int(self.module.proj.shape[1])

    @property
    def encoder_tokens(self) -> int:
        cfg = self.encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1


def load_style_adapter(path: Path, encoder_dir: Path | None) -> Style:
    module = load_style_module(path)
    if encoder_dir is None:
        raise ExportError(f"--style-adapter {path}: needs --style-encoder DIR (openai/clip-vit-large-patch14, a CLIPVisionModel)")
    config = encoder_dir / "config.json"
    if not config.is_file():
        raise ExportError(f"--style-encoder {encoder_dir}: no config.json (expected a CLIPVisionModel directory)")
    if not (encoder_dir / "preprocessor_config.json").is_file():
        raise ExportError(f"--style-encoder {encoder_dir}: no preprocessor_config.json (the CLIPProcessor the style adapter was used with)")
    arch = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    if arch and not set(arch) & set(ENCODER_ARCHS):
        raise ExportError(f"--style-encoder {encoder_dir}: config.json is a {arch[0]!r}, expected 'CLIPVisionModel'")
    encoder = CLIPVisionModel.from_pretrained(str(encoder_dir), dtype=torch.float32).eval()
    width = int(module.style_embedding.shape[2])
    if encoder.config.hidden_size != width:
        raise ExportError(
            f"--style-encoder {encoder_dir}: its hidden_size is {encoder.config.hidden_size} but the style adapter "
            f"{path.name} reads {width}-wide hidden states (TencentARC's uses openai/clip-vit-large-patch14, 1024)"
        )
    return Style(path, module, encoder, CLIPImageProcessor.from_pretrained(str(encoder_dir)))


def check_unet_fit(style: Style, cross_attention_dim: int) -> None:
    if style.context_dim != cross_attention_dim:
        raise ExportError(
            f"--style-adapter {style.path.name}: its tokens are {style.context_dim} wide but the UNet's "
            f"cross_attention_dim is {cross_attention_dim}: it was made for another base model (SD 1.x: 768)"
        )


# --- graphs -------------------------------------------------------------------------------------


class StyleEncoderGraph(nn.Module):
    """`style_encoder` graph: pixel_values -> last_hidden_state (get_cond_style)."""

    def __init__(self, encoder: CLIPVisionModel):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return self.encoder(pixel_values).last_hidden_state


def export_style_encoder(style: Style, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
                         precision: str = "fp32") -> list[Path]:
    size = style.encoder.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = [TensorIO("pixel_values", ["batch", 3, size, size])]
    outputs = [TensorIO(ENCODER_OUTPUT, ["batch", style.encoder_tokens, style.encoder.config.hidden_size])]
    return export_graph(StyleEncoderGraph(style.encoder), (pixels,), path, inputs, outputs, external_data_threshold, precision)


def export_style_tokens(style: Style, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
                        precision: str = "fp32") -> list[Path]:
    """`style_adapter` graph: last_hidden_state [batch, 257, W] -> style_tokens [batch, T, C]."""
    width = int(style.module.style_embedding.shape[2])
    hidden = torch.randn(2, style.encoder_tokens, width, generator=torch.Generator().manual_seed(0))
    inputs = [TensorIO(ENCODER_OUTPUT, ["batch", style.encoder_tokens, width])]
    outputs = [TensorIO(TOKENS_OUTPUT, ["batch", style.num_tokens, style.context_dim])]
    return export_graph(style.module, (hidden,), path, inputs, outputs, external_data_threshold, precision)


def manifest_entry(style: Style, text_len: int, sequence_dim: str, encoder_spec: dict, adapter_spec: dict) -> dict:
    return {
        "num_tokens": style.num_tokens,
        "max_images": text_len // style.num_tokens,
        "context": {
            "unet_input": "encoder_hidden_states",
            "sequence_dim": sequence_dim,
            "append": "weighted_tokens",
            "negative_padding": "own_last_tokens",
        },
        "preprocess": preprocess_manifest(style.preprocessor),
        "style_encoder": encoder_spec,
        "style_adapter": adapter_spec,
    }
