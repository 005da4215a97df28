"""Tiny IP-Adapters for the tiny zoo: a CLIP vision encoder and h94-layout weight files.

h94/IP-Adapter publishes each adapter as one file, `{"image_proj": {...}, "ip_adapter": {...}}` in
the original Tencent key layout (as `.bin`, or `.safetensors` with the two dicts flattened under the
`image_proj.` and `ip_adapter.` prefixes), plus an `image_encoder/` CLIPVisionModelWithProjection
directory. These builders make the same files, tiny and random: diffusers' own projection modules
(`ImageProjection`, `IPAdapterPlusImageProjection`) initialised right after `torch.manual_seed`, their
state dicts rewritten into the original layout (the inverse of diffusers'
`UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers`), and one `to_k_ip`/`to_v_ip`
pair per UNet cross-attention layer, keyed `1, 3, 5, ...` as diffusers'
`_convert_ip_adapter_attn_to_diffusers` reads them. `pipe.load_ip_adapter` on these files is the
oracle the exporter is tested against.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from .ip_adapter import PLAIN_TOKENS, cross_attention_layers

IP_SEEDS = {"image_encoder": 41, "plain": 42, "plus": 43}

# CLIPImageProcessor's 224 input (what diffusers builds when the pipeline has no feature extractor),
# with patches of 32: 7x7 + 1 = 50 tokens.
VISION_CONFIG = dict(
    image_size=224,
    patch_size=32,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=8,
    hidden_act="gelu",  # h94's ViT-H/14 and ViT-bigG encoders use GELU
)
# IP-Adapter Plus' Resampler. diffusers' converter infers heads as to_q rows // 64 and keeps its own
# depth (4) and dim_head (64) defaults, so those are fixed; the width and the query count are free.
PLUS_CONFIG = dict(hidden_dims=16, heads=1, num_queries=8)
LIVEN_IP = 4.0  # to_v_ip × 4, so that the image moves the tiny UNet's prediction visibly


def build_image_encoder() -> CLIPVisionModelWithProjection:
    torch.manual_seed(IP_SEEDS["image_encoder"])
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG)).eval()


def write_image_encoder(dst: Path) -> Path:
    """`dst/`: the encoder (config.json, model.safetensors) and CLIPImageProcessor's defaults at its size."""
    encoder = build_image_encoder()
    encoder.save_pretrained(str(dst))
    size = encoder.config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(str(dst))
    return dst


_PLUS_TO_ORIGINAL = [
    (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]


def plus_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`IPAdapterPlusImageProjection` keys -> the original Resampler's (to_k and to_v stacked as to_kv)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^layers\.(\d+)\.attn\.to_([kv])\.weight$", key)
        if m:
            if m.group(2) == "k":
                out[f"layers.{m.group(1)}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{m.group(1)}.attn.to_v.weight"]])
            continue
        for pattern, repl in _PLUS_TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def build_projection(unet: UNet2DConditionModel, kind: str, encoder_config=None) -> torch.nn.Module:
    """The diffusers image projection module of `kind` "plain" or "plus", seeded (`IP_SEEDS[kind]`)."""
    encoder_config = encoder_config or CLIPVisionConfig(**VISION_CONFIG)
    dim = unet.config.cross_attention_dim
    torch.manual_seed(IP_SEEDS[kind])
    if kind == "plain":
        return ImageProjection(image_embed_dim=encoder_config.projection_dim, cross_attention_dim=dim,
                               num_image_text_embeds=PLAIN_TOKENS).eval()
    if kind == "plus":
        return IPAdapterPlusImageProjection(embed_dims=encoder_config.hidden_size, output_dims=dim, **PLUS_CONFIG).eval()
    raise ValueError(f"kind {kind!r}: expected plain or plus")


@torch.no_grad()
def build_ip_adapter(unet: UNet2DConditionModel, kind: str, encoder_config=None) -> dict:
    """An h94-layout state dict {"image_proj", "ip_adapter"} of `kind` "plain" or "plus" for `unet`:
    `build_projection`'s weights, then (same RNG stream) one to_k_ip/to_v_ip pair per cross-attention layer."""
    dim = unet.config.cross_attention_dim
    proj = build_projection(unet, kind, encoder_config)
    if kind == "plain":
        image_proj = {k.replace("image_embeds", "proj"): v for k, v in proj.state_dict().items()}
    else:
        image_proj = plus_to_original(proj.state_dict())
    ip = {}
    for i, (_, hidden) in enumerate(cross_attention_layers(unet)):
        to_k, to_v = torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(dim, hidden, bias=False)
        ip[f"{2 * i + 1}.to_k_ip.weight"] = to_k.weight.detach().clone()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = to_v.weight.detach().clone() * LIVEN_IP
    return {"image_proj": {k: v.detach().clone().contiguous() for k, v in image_proj.items()}, "ip_adapter": ip}


def save_ip_adapter(state: dict, path: Path) -> Path:
    """`.safetensors`: flattened under `image_proj.`/`ip_adapter.` as h94's files; else a torch `.bin`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
        save_file(flat, str(path))
    else:
        torch.save(state, str(path))
    return path


def write_tiny_ip_adapters(work_dir: Path, unet: UNet2DConditionModel) -> tuple[Path, dict[str, Path]]:
    """work_dir/image_encoder/ and work_dir/ip-adapter_tiny{,_plus}.safetensors (h94's file names' style)."""
    encoder_dir = write_image_encoder(work_dir / "image_encoder")
    files = {
        "plain": save_ip_adapter(build_ip_adapter(unet, "plain"), work_dir / "ip-adapter_tiny.safetensors"),
        "plus": save_ip_adapter(build_ip_adapter(unet, "plus"), work_dir / "ip-adapter-plus_tiny.safetensors"),
    }
    return encoder_dir, files
