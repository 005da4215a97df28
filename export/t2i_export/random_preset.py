"""`python -m t2i_export random --preset sd15`: a random-weight pipeline with SD 1.5's exact shapes.

For benchmarks and memory/external-data checks of the runtime without downloading a checkpoint:
same configs as runwayml/stable-diffusion-v1-5 (UNet ~860M parameters, so `unet.onnx` gets
external data) and TencentARC's SD 1.5 T2I-Adapters. Weights are the libraries' default init after
`torch.manual_seed(seed)`; outputs are noise. Peak RSS ~9 GB, ~2 minutes on 2 cores.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .pipeline import Components, export_components
from .tiny import SD15_SCHEDULER_CONFIG, write_clip_tokenizer_dir
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


def export_random(preset: str, adapter_presets: list[str], out_dir: Path, name: str | None, seed: int) -> Path:
    if preset != "sd15":
        raise ValueError(preset)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval()
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    adapters = []
    for i, kind in enumerate(adapter_presets):
        adapters.append((kind if adapter_presets.count(kind) == 1 else f"{kind}{i}", T2IAdapter(**SD15_ADAPTERS[kind]).eval()))
    with tempfile.TemporaryDirectory(prefix="t2i-tok-") as tmp:
        write_clip_tokenizer_dir(Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
    comps = Components.single_encoder(tokenizer, text_encoder, unet, vae, dict(SD15_SCHEDULER_CONFIG))
    return export_components(comps, adapters, out_dir, name or f"random-{preset}")
