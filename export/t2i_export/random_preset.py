"""`python -m t2i_export random --preset sd15|small`: random-weight pipelines for benchmarks.

- `sd15`: SD 1.5's exact shapes, for benchmarks and memory/external-data checks of the runtime
  without downloading a checkpoint: same configs as runwayml/stable-diffusion-v1-5 (UNet ~860M
  parameters, so `unet.onnx` gets external data) and TencentARC's SD 1.5 T2I-Adapters. Peak RSS
  ~9 GB, ~2 minutes on 2 cores.
- `small`: SD 1.5's architecture (same block types, 2 layers per block, cross-attention, a CLIP
  text tower over the real 49,408-token vocabulary and 77 positions) at about 1/5 of the width,
  default size 256x256, so that a whole generation takes seconds on 2 cores (`benches/`).

Weights are the libraries' default init after `torch.manual_seed(seed)`, modules built in a fixed
order (text encoder, UNet, VAE, adapters): the same seed and pinned versions give the same weights.
Outputs are noise. `save_diffusers` also writes the modules as a diffusers checkpoint (the oracle
`benches/compare.py` runs diffusers on).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .pipeline import Components, export_components
from .tiny import SD15_SCHEDULER_CONFIG, build_controlnet, save_checkpoint, write_clip_tokenizer_dir
from .tokenizer import load_tokenizer

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)

# openai/clip-vit-large-patch14's text tower, as in SD 1.5's text_encoder/config.json
SD15_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (~2.6B parameters: 10.3 GB in fp32)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)

SD15_ADAPTERS = {
    # TencentARC/t2iadapter_*_sd15v2 style full adapters (canny/depth: rgb; sketch: gray)
    "full": dict(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
    "sketch": dict(in_channels=1, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
    # TencentARC/t2iadapter_color_sd14v1 style light adapter
    "light": dict(in_channels=3, channels=[320, 640, 1280], num_res_blocks=4, downscale_factor=8, adapter_type="light_adapter"),
}


# "small": SD 1.5 scaled down. Channels /5 (320 -> 64), heads 8 -> 4 (head dims 16/32/64 instead of
# 40/80/160), text tower 768 wide x 12 layers -> 256 x 4, VAE channels /4; latent 32x32 -> 256x256.
SMALL_UNET = dict(
    SD15_UNET,
    sample_size=32,
    block_out_channels=(64, 128, 256, 256),
    cross_attention_dim=256,
    attention_head_dim=4,  # SD 1.x's legacy name for the number of heads
)

SMALL_TEXT_ENCODER = dict(
    SD15_TEXT_ENCODER,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    projection_dim=256,
)

SMALL_VAE = dict(SD15_VAE, block_out_channels=(32, 64, 128, 128), norm_num_groups=16, sample_size=256)

SMALL_ADAPTERS = {
    "full": dict(SD15_ADAPTERS["full"], channels=[64, 128, 256, 256]),
    "sketch": dict(SD15_ADAPTERS["sketch"], channels=[64, 128, 256, 256]),
    "light": dict(SD15_ADAPTERS["light"], channels=[64, 128, 256]),
}

PRESETS = {
    "sd15": (SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE, SD15_ADAPTERS),
    "small": (SMALL_TEXT_ENCODER, SMALL_UNET, SMALL_VAE, SMALL_ADAPTERS),
}


def build_random(preset: str, adapter_presets: list[str], seed: int) -> dict:
    """Fresh modules in the order that fixes their weights: {"text_encoder", "unet", "vae", "adapters": {name: T2IAdapter}}.

    Adapters are named after their kind ("sketch"), or kind + position when a kind repeats ("full0", "full2").
    """
    te_cfg, unet_cfg, vae_cfg, adapter_cfgs = PRESETS[preset]
    torch.manual_seed(seed)
    comps = {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**te_cfg)).eval(),
        "unet": UNet2DConditionModel(**unet_cfg).eval(),
        "vae": AutoencoderKL(**vae_cfg).eval(),
        "adapters": {},
    }
    for i, kind in enumerate(adapter_presets):
        name = kind if adapter_presets.count(kind) == 1 else f"{kind}{i}"
        comps["adapters"][name] = T2IAdapter(**adapter_cfgs[kind]).eval()
    return comps


def export_random(
    preset: str,
    adapter_presets: list[str],
    out_dir: Path,
    name: str | None,
    seed: int,
    save_diffusers: Path | None = None,
    precision: str = "fp32",
    controlnet: bool = False,
) -> Path:
    """Export the preset to `out_dir` in `precision`; with `save_diffusers`, also save the same (fp32)
    modules there in diffusers format: `save_diffusers/random-PRESET` (pipeline), `save_diffusers/adapters/NAME`
    and, with `controlnet`, `save_diffusers/controlnets/control`: a ControlNet of the UNet
    (`ControlNetModel.from_unet`, diffusers' default conditioning embedding, its zero convolutions
    drawn from seed + 1000 so that it does something)."""
    if preset not in PRESETS:
        raise ValueError(preset)
    comps = build_random(preset, adapter_presets, seed)
    if controlnet:
        comps["controlnets"] = {"control": build_controlnet(comps["unet"], seed + 1000, (16, 32, 96, 256))}
    if save_diffusers is not None:
        save_checkpoint(comps, save_diffusers, f"random-{preset}")
    text_encoder, unet, vae = comps["text_encoder"], comps["unet"], comps["vae"]
    adapters = list(comps["adapters"].items())
    comps_controlnets = comps.get("controlnets", {})
    with tempfile.TemporaryDirectory(prefix="t2i-tok-") as tmp:
        write_clip_tokenizer_dir(Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
    comps = Components.single_encoder(tokenizer, text_encoder, unet, vae, dict(SD15_SCHEDULER_CONFIG), precision=precision)
    default_name = f"random-{preset}" if precision == "fp32" else f"random-{preset}-{precision}"
    controlnets = list(comps_controlnets.items())
    return export_components(comps, adapters, out_dir, name or default_name, controlnets=controlnets)
