"""IP-Adapter (h94 layout, plain and Plus): `image_encoder` and `image_projection` graphs, and the
UNet's `ip_tokens`/`ip_scale` inputs.

Semantics are diffusers' (`StableDiffusionPipeline.load_ip_adapter` + `ip_adapter_image`):

* `image_encoder`: `CLIPVisionModelWithProjection` on CLIPImageProcessor's `pixel_values`; its
  `image_embeds` for a plain adapter, `hidden_states[-2]` for Plus (`encode_image`,
  pipelines/stable_diffusion/pipeline_stable_diffusion.py). Its output is named `image_embeds` either way.
* `image_projection`: the adapter's `image_proj` module as diffusers converts it
  (`UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers`: `ImageProjection`,
  `IPAdapterPlusImageProjection`) -> `ip_tokens` [batch, tokens, cross_attention_dim].
* The UNet's every cross-attention layer computes `IPAdapterAttnProcessor2_0` (models/attention_processor.py,
  one adapter, no masks): `attention(text) + ip_scale * attention(ip_tokens through to_k_ip/to_v_ip)`,
  before `to_out`. The projected tokens are graph inputs (diffusers' `encoder_hid_proj` is the
  `image_projection` graph) and `ip_scale` [1] is an input too: diffusers' processor skips the
  addition when its Python-float scale is 0 (`scale == 0`), a branch tracing would freeze, so the graph
  uses its own processor without it: at `ip_scale` 0 it adds `0 * attention(ip)`, exactly "no
  IP-Adapter" for any finite tokens.

With guidance diffusers' negative image embeddings are zeros of the encoder output for a plain
adapter, and the encoder's output for all-zero `pixel_values` for Plus (`encode_image`); both are
projected like the image's. The manifest says which (`negative`).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from .errors import ExportError
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, TensorIO, export_graph

SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PLAIN_TOKENS = 4  # diffusers' converter: ImageProjection always yields 4 tokens
PLUS_DEPTH = 4  # diffusers' converter builds IPAdapterPlusImageProjection with its default depth
TOKENS_INPUT = "ip_tokens"
SCALE_INPUT = "ip_scale"
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class IPAdapter:
    """One IP-Adapter file (h94 layout) and its image encoder, loaded and classified."""

    path: Path
    state: dict  # {"image_proj": {...}, "ip_adapter": {...}}, original key layout
    kind: str  # "plain" | "plus"
    encoder: CLIPVisionModelWithProjection
    preprocessor: CLIPImageProcessor

    @property
    def num_tokens(self) -> int:
        return PLAIN_TOKENS if self.kind == "plain" else int(self.state["image_proj"]["latents"].shape[1])

    @property
    def hidden_states(self) -> bool:
        """Plus reads the encoder's penultimate hidden states; plain its projected `image_embeds`."""
        return self.kind == "plus"


def read_weights(path: Path) -> dict:
    """h94's file: `.safetensors` with `image_proj.`/`ip_adapter.` prefixes, or a torch pickle of the two dicts."""
    if not path.is_file():
        raise ExportError(f"--ip-adapter {path}: not a file (expected an h94-layout IP-Adapter .safetensors or .bin)")
    if path.suffix not in SUFFIXES:
        raise ExportError(f"--ip-adapter {path}: expected a {'/'.join(SUFFIXES)} file in h94/IP-Adapter's layout")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            state = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, dot, rest = key.partition(".")
                    if dot and part in state:
                        state[part][rest] = f.get_tensor(key)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ExportError(f"--ip-adapter {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ExportError(
            f"--ip-adapter {path}: no image_proj and ip_adapter weights (expected h94/IP-Adapter's layout: "
            "{'image_proj': ..., 'ip_adapter': ...}, or keys prefixed 'image_proj.'/'ip_adapter.' in a .safetensors)"
        )
    return state


def classify(path: Path, image_proj: dict) -> str:
    if "proj.weight" in image_proj:
        return "plain"
    if "latents" in image_proj and "proj_in.weight" in image_proj and "proj_out.weight" in image_proj:
        return "plus"
    kind = "Full/FaceID" if any(k.startswith(("proj.0", "perceiver_resampler", "norm")) for k in image_proj) else "unknown"
    raise ExportError(f"--ip-adapter {path}: a {kind} image projection; only plain (proj) and Plus (Resampler) IP-Adapters are supported")


def load_preprocessor(encoder_dir: Path, model_dir: Path | None, image_size: int) -> CLIPImageProcessor:
    """What diffusers preprocesses with: the pipeline's `feature_extractor/` when it has one, else (as
    `load_ip_adapter` then builds) CLIPImageProcessor at the encoder's size. A `preprocessor_config.json`
    in the encoder directory stands in for a pipeline without a feature extractor."""
    for d in ([model_dir / "feature_extractor"] if model_dir else []) + [encoder_dir]:
        if (d / "preprocessor_config.json").is_file():
            return CLIPImageProcessor.from_pretrained(str(d))
    return CLIPImageProcessor(size=image_size, crop_size=image_size)


def load_ip_adapter(path: Path, encoder_dir: Path | None, model_dir: Path | None = None) -> IPAdapter:
    state = read_weights(path)
    kind = classify(path, state["image_proj"])
    if encoder_dir is None:
        raise ExportError(f"--ip-adapter {path}: needs --image-encoder DIR (h94's models/image_encoder or sdxl_models/image_encoder)")
    config = encoder_dir / "config.json"
    if not config.is_file():
        raise ExportError(f"--image-encoder {encoder_dir}: no config.json (expected a CLIPVisionModelWithProjection directory)")
    arch = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    if arch and "CLIPVisionModelWithProjection" not in arch:
        raise ExportError(f"--image-encoder {encoder_dir}: config.json is a {arch[0]!r}, expected 'CLIPVisionModelWithProjection'")
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir), dtype=torch.float32).eval()
    ip = IPAdapter(path, state, kind, encoder, load_preprocessor(encoder_dir, model_dir, encoder.config.image_size))
    check_encoder(ip)
    return ip


def check_encoder(ip: IPAdapter) -> None:
    proj = ip.state["image_proj"]
    cfg = ip.encoder.config
    if ip.kind == "plain":
        want, got, what = int(proj["proj.weight"].shape[1]), cfg.projection_dim, "projection_dim (image_embeds)"
    else:
        want, got, what = int(proj["proj_in.weight"].shape[1]), cfg.hidden_size, "hidden_size (penultimate hidden states)"
    if want != got:
        raise ExportError(
            f"--image-encoder: its {what} is {got} but the {ip.kind} IP-Adapter {ip.path.name} projects {want}-wide "
            "embeddings: pass the image encoder it was trained with (h94: models/image_encoder for SD 1.5 and the "
            "*_vit-h SDXL adapters, sdxl_models/image_encoder for the others)"
        )


def check_unet_fit(ip: IPAdapter, unet: UNet2DConditionModel) -> None:
    """Refuse an IP-Adapter whose token width or cross-attention layers are not the UNet's."""
    dim = unet.config.cross_attention_dim
    proj = ip.state["image_proj"]
    width = int(proj["proj.weight"].shape[0]) // PLAIN_TOKENS if ip.kind == "plain" else int(proj["proj_out.weight"].shape[0])
    if width != dim:
        raise ExportError(
            f"--ip-adapter {ip.path.name}: its image tokens are {width} wide but the UNet's cross_attention_dim is {dim}: "
            "it was made for another base model (SD 1.x, 2.x and XL differ)"
        )
    if ip.kind == "plus":
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        if depth != PLUS_DEPTH:
            raise ExportError(f"--ip-adapter {ip.path.name}: a Resampler of {depth} layers; diffusers loads only {PLUS_DEPTH}")
    layers = cross_attention_layers(unet)
    ids = sorted({int(m.group(1)) for k in ip.state["ip_adapter"] if (m := re.match(r"^(\d+)\.to_[kv]_ip\.weight$", k))})
    if ids != [2 * i + 1 for i in range(len(layers))]:
        raise ExportError(
            f"--ip-adapter {ip.path.name}: has weights for {len(ids)} cross-attention layers, the UNet has {len(layers)}: "
            "it was made for another base model"
        )
    for i, (name, hidden) in enumerate(layers):
        for kv in ("k", "v"):
            w = ip.state["ip_adapter"].get(f"{2 * i + 1}.to_{kv}_ip.weight")
            if w is None or tuple(w.shape) != (hidden, dim):
                shape = None if w is None else tuple(w.shape)
                raise ExportError(
                    f"--ip-adapter {ip.path.name}: {2 * i + 1}.to_{kv}_ip.weight is {shape}, the UNet's "
                    f"{name.removesuffix('.processor')} needs {(hidden, dim)}: it was made for another base model"
                )


def image_projection(ip: IPAdapter, unet: UNet2DConditionModel) -> torch.nn.Module:
    """diffusers' own conversion of `image_proj` (the module `load_ip_adapter` puts in `encoder_hid_proj`)."""
    return unet._convert_ip_adapter_image_proj_to_diffusers(ip.state["image_proj"], low_cpu_mem_usage=False).eval()


def cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[str, int]]:
    """(processor name, hidden size) of every cross-attention layer, in `attn_processors` order;
    the hidden size as diffusers' `_convert_ip_adapter_attn_to_diffusers` derives it."""
    out = []
    channels = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        out.append((name, int(hidden)))
    return out


class _Feed:
    """The UNet graph's IP inputs, read by every `IPAttnProcessor` during one forward."""

    tokens: torch.Tensor | None = None
    scale: torch.Tensor | None = None


class IPAttnProcessor(torch.nn.Module):
    """diffusers' `IPAdapterAttnProcessor2_0.__call__` for one adapter without masks, the image tokens
    and the scale taken from `_Feed` (graph inputs) instead of the encoder_hidden_states tuple and a float."""

    def __init__(self, to_k_ip: torch.nn.Linear, to_v_ip: torch.nn.Linear, feed: _Feed):
        super().__init__()
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.feed = feed

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        tokens = self.feed.tokens
        ip_key = self.to_k_ip(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = self.to_v_ip(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_states = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        ip_states = ip_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = hidden_states + self.feed.scale * ip_states

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class UNetIPInputs:
    """Attaches an IP-Adapter's attention weights to a UNet for tracing (`attached`), and feeds
    `ip_tokens`/`ip_scale` to them (`feed`)."""

    def __init__(self, ip: IPAdapter, unet: UNet2DConditionModel):
        check_unet_fit(ip, unet)
        self.num_tokens = ip.num_tokens
        self._feed = _Feed()
        converted = unet._convert_ip_adapter_attn_to_diffusers([ip.state], low_cpu_mem_usage=False)
        self.processors = {
            name: IPAttnProcessor(converted[name].to_k_ip[0], converted[name].to_v_ip[0], self._feed)
            for name, _ in cross_attention_layers(unet)
        }

    def upcasts(self, unet: UNet2DConditionModel) -> bool:
        """Whether a cross-attention layer asks for float32 scores (SD 2.x), which `IPAttnProcessor`
        does not do in fp16."""
        return any(unet.get_submodule(n.removesuffix(".processor")).upcast_attention for n in self.processors)

    def feed(self, tokens: torch.Tensor, scale: torch.Tensor) -> None:
        self._feed.tokens, self._feed.scale = tokens, scale

    @contextmanager
    def attached(self, unet: UNet2DConditionModel) -> Iterator[None]:
        saved = unet.attn_processors
        try:
            unet.set_attn_processor({n: self.processors.get(n, p) for n, p in saved.items()})
            yield
        finally:
            unet.set_attn_processor(saved)
            self._feed.tokens = self._feed.scale = None


class ImageEncoderGraph(torch.nn.Module):
    """`image_encoder` graph: pixel_values -> image_embeds (plain: projected; Plus: hidden_states[-2])."""

    def __init__(self, encoder: CLIPVisionModelWithProjection, hidden_states: bool):
        super().__init__()
        self.encoder = encoder
        self.hidden_states = hidden_states

    def forward(self, pixel_values):
        if self.hidden_states:
            return self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.encoder(pixel_values).image_embeds


class ImageProjectionGraph(torch.nn.Module):
    """`image_projection` graph: image_embeds -> ip_tokens (one image per row: diffusers'
    `MultiIPAdapterImageProjection` with num_images 1)."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection

    def forward(self, image_embeds):
        return self.projection(image_embeds)


def embeds_dims(ip: IPAdapter) -> list:
    cfg = ip.encoder.config
    if ip.hidden_states:
        return ["batch", (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size]
    return ["batch", cfg.projection_dim]


def export_image_encoder(ip: IPAdapter, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
                         precision: str = "fp32") -> list[Path]:
    size = ip.encoder.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = [TensorIO("pixel_values", ["batch", 3, size, size])]
    outputs = [TensorIO("image_embeds", embeds_dims(ip))]
    return export_graph(ImageEncoderGraph(ip.encoder, ip.hidden_states), (pixels,), path, inputs, outputs,
                        external_data_threshold, precision)


def export_image_projection(ip: IPAdapter, unet: UNet2DConditionModel, path: Path,
                            external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES, precision: str = "fp32") -> list[Path]:
    dims = embeds_dims(ip)
    embeds = torch.randn(2, *dims[1:], generator=torch.Generator().manual_seed(0))
    inputs = [TensorIO("image_embeds", dims)]
    outputs = [TensorIO(TOKENS_INPUT, ["batch", ip.num_tokens, unet.config.cross_attention_dim])]
    return export_graph(ImageProjectionGraph(image_projection(ip, unet)), (embeds,), path, inputs, outputs,
                        external_data_threshold, precision)


def preprocess_manifest(p: CLIPImageProcessor) -> dict:
    """CLIPImageProcessor's steps, in its order: RGB, resize the shortest edge (PIL resample), center
    crop, rescale, normalize; the runtime reproduces them."""
    crop = p.crop_size if p.do_center_crop else None
    resample = int(p.resample)
    return {
        "convert_rgb": bool(p.do_convert_rgb),
        "shortest_edge": int(p.size["shortest_edge"]) if p.do_resize else None,
        "resample": PIL_RESAMPLE.get(resample, str(resample)),
        "crop": [int(crop["width"]), int(crop["height"])] if crop else None,
        "rescale_factor": float(p.rescale_factor) if p.do_rescale else 1.0,
        "mean": [float(v) for v in p.image_mean] if p.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(v) for v in p.image_std] if p.do_normalize else [1.0, 1.0, 1.0],
    }


def manifest_entry(ip: IPAdapter, encoder_spec: dict, projection_spec: dict) -> dict:
    return {
        "kind": ip.kind,
        "num_tokens": ip.num_tokens,
        "image_encoder_output": "penultimate_hidden_states" if ip.hidden_states else "image_embeds",
        "negative": "zero_pixel_values" if ip.hidden_states else "zero_embeds",
        "preprocess": preprocess_manifest(ip.preprocessor),
        "unet_inputs": {"tokens": TOKENS_INPUT, "scale": SCALE_INPUT},
        "image_encoder": encoder_spec,
        "image_projection": projection_spec,
    }
