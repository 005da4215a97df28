"""A tiny style adapter for tests: a CLIPVisionModel directory and an original-layout `.pth`.

TencentARC publishes the style adapter as one torch file holding `StyleAdapter`'s state dict
(`t2iadapter_style_sd14v1.pth`) and uses openai/clip-vit-large-patch14 as its encoder. These builders
make the same files, tiny and random, right after `torch.manual_seed`: the port in style_adapter.py
built at a small width and depth (8 heads and 8 tokens, as the released one: the head count is not in
the weights), and a 2-layer CLIPVisionModel with quick_gelu (OpenAI CLIP's activation) and
CLIPImageProcessor's defaults at 224 (what CLIPProcessor of clip-vit-large-patch14 does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from .style_adapter import NUM_HEAD, StyleAdapter

STYLE_SEEDS = {"encoder": 51, "adapter": 52}
# 224 / 32: 7x7 patches + CLS = 50 hidden states (the real encoder: 16x16 + 1 = 257).
VISION_CONFIG = dict(
    image_size=224,
    patch_size=32,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="quick_gelu",
)
STYLE_CONFIG = dict(width=32, num_head=NUM_HEAD, n_layes=2, num_token=8)


def build_style_encoder() -> CLIPVisionModel:
    torch.manual_seed(STYLE_SEEDS["encoder"])
    return CLIPVisionModel(CLIPVisionConfig(**VISION_CONFIG)).eval()


def write_style_encoder(dst: Path) -> Path:
    """`dst/`: config.json, model.safetensors and preprocessor_config.json."""
    encoder = build_style_encoder()
    encoder.save_pretrained(str(dst))
    size = encoder.config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(str(dst))
    return dst


def build_style_adapter(context_dim: int, **overrides) -> StyleAdapter:
    """The ported module at STYLE_CONFIG (overridable), seeded; its own random init is the weights,
    with the LayerNorms and biases perturbed too so that every parameter matters."""
    cfg = {**STYLE_CONFIG, **overrides}
    torch.manual_seed(STYLE_SEEDS["adapter"])
    module = StyleAdapter(context_dim=context_dim, **cfg).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return module


def save_style_adapter(module: StyleAdapter, path: Path) -> Path:
    """The state dict as TencentARC saved it: the module's own keys, nothing around them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_tiny_style_adapter(work_dir: Path, context_dim: int) -> tuple[Path, Path]:
    """work_dir/style_encoder/ and work_dir/t2iadapter_style_tiny.pth."""
    encoder_dir = write_style_encoder(work_dir / "style_encoder")
    pth = save_style_adapter(build_style_adapter(context_dim), work_dir / "t2iadapter_style_tiny.pth")
    return encoder_dir, pth
