"""The tiny zoo: deterministic tiny random-weight SD 1.x, SD 2.x and SDXL checkpoints + T2I-Adapters,
saved in diffusers format.

Built with diffusers'/transformers' own classes, so exporting it goes through exactly the code path
of a real checkpoint. Each component is initialised right after `torch.manual_seed(SEEDS[name])` by
the library's own initialiser (then the exact rescalings `_liven`, `_liven_adapter`), so the weights depend only on
these seeds and the pinned torch/diffusers/transformers versions.

The tokenizer is the real CLIP one (49,408 tokens), converted from open_clip's
`bpe_simple_vocab_16e6.txt.gz` exactly as OpenAI's CLIP `SimpleTokenizer` reads it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ExportError

SEEDS = {"text_encoder": 1, "unet": 2, "vae": 3, "sketch": 4, "color": 5, "canny": 6}

OPEN_CLIP_WHEEL = "open_clip_torch-3.3.0-py3-none-any.whl"
OPEN_CLIP_REQ = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed BPE file: guards the tokenizer (and so the fixtures) against a changed wheel.
BPE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"

# SD 1.5's scheduler/scheduler_config.json, verbatim (key order included). Keys it lacks, such as
# `timestep_spacing`, take each scheduler class's own default in diffusers (`_use_default_values`):
# DDIM "leading", Euler "linspace".
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=4,  # the 49,408 × hidden token table is most of the file: kept small so the zoo stays small
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=4,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

UNET_CONFIG = dict(
    sample_size=8,  # latent 8x8 -> default_size [64, 64]
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=4,
    attention_head_dim=2,  # SD 1.x's legacy name for the number of heads (8 there)
    norm_num_groups=4,  # 32 in SD; 4 keeps several channels per group at these widths
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks = 8x downscale, as in SD
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

ADAPTER_CONFIGS = {
    # full adapter: one feature per UNet down block, channels = block_out_channels
    "sketch": dict(in_channels=1, channels=[8, 8, 16, 16], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
    # light adapter: len(channels) + 1 features (the last channel count repeated) = 8, 8, 16, 16
    "color": dict(in_channels=3, channels=[8, 8, 16], num_res_blocks=4, downscale_factor=8, adapter_type="light_adapter"),
}


def _find_wheel() -> Path:
    env = os.environ.get("T2I_OPEN_CLIP_WHEEL")
    if env:
        p = Path(env)
        if p.is_dir():
            p = p / OPEN_CLIP_WHEEL
        if not p.is_file():
            raise ExportError(f"T2I_OPEN_CLIP_WHEEL={env}: no {OPEN_CLIP_WHEEL} there")
        return p
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i_export"
    wheel = cache / OPEN_CLIP_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", OPEN_CLIP_REQ, "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            raise ExportError(
                f"cannot get {OPEN_CLIP_WHEEL} ({' '.join(cmd)} failed); download it and set T2I_OPEN_CLIP_WHEEL to its path"
            )
    return wheel


def clip_bpe_text() -> str:
    with zipfile.ZipFile(_find_wheel()) as z:
        text = gzip.decompress(z.read(BPE_MEMBER)).decode("utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != BPE_SHA256:
        raise ExportError(f"{BPE_MEMBER} in {OPEN_CLIP_WHEEL} is not the expected CLIP BPE file (sha256 mismatch)")
    return text


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode map (simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Exactly CLIP's SimpleTokenizer.__init__: 49,408 tokens."""
    lines = bpe_text.split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return dict(zip(vocab, range(len(vocab)))), merges


def write_clip_tokenizer_dir(dst: Path, pad_token: str = "<|endoftext|>") -> None:
    """An SD-style tokenizer/ directory (vocab.json + merges.txt, as in the real checkpoints).

    SD 1.x and SDXL's `tokenizer/` pad with <|endoftext|>; SD 2.x's `tokenizer/` and SDXL's
    `tokenizer_2/` (OpenCLIP) pad with "!" (id 0).
    """
    vocab, merges = clip_vocab_and_merges(clip_bpe_text())
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "add_prefix_space": False, **special}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _seeded(name: str):
    torch.manual_seed(SEEDS[name])


LIVEN_ATTN2_OUT = 4.0  # cross-attention output projections × 4
LIVEN_ADAPTER = 4.0  # adapter features × 4
FIRST_ADAPTER_CONV = {
    "full_adapter": "adapter.conv_in",
    "full_adapter_xl": "adapter.conv_in",
    "light_adapter": "adapter.body.0.in_conv",
}


@torch.no_grad()
def _liven(unet: UNet2DConditionModel) -> None:
    """Deterministic rescaling so that the tiny random model's effects are visible (see README).

    With PyTorch's default init the cross-attention output projections are too small for the prompt
    to move the prediction much; scaled up, CFG and negative prompts change the result noticeably.
    Pure multiplications: no extra randomness.
    """
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight.mul_(LIVEN_ATTN2_OUT)


@torch.no_grad()
def _liven_adapter(adapter: T2IAdapter) -> None:
    """Multiply every feature by LIVEN_ADAPTER, exactly: a T2I-Adapter is positively homogeneous once
    its first conv (weight and bias) and every other conv's bias are scaled (convs, ReLU, average
    pooling, pixel unshuffle and residual sums commute with a positive scale)."""
    first = FIRST_ADAPTER_CONV[adapter.config.adapter_type]
    for name, module in adapter.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            if name == first:
                module.weight.mul_(LIVEN_ADAPTER)
            module.bias.mul_(LIVEN_ADAPTER)


# tiny-sd1's ControlNet: `ControlNetModel.from_unet` (the UNet's down and mid weights, as real
# ControlNets start), with a conditioning embedding of SD's depth (3 stride-2 convs: 8x) but narrow.
CONTROLNET_EMBEDDING_CHANNELS = (4, 8, 8, 8)  # SD: (16, 32, 96, 256)


@torch.no_grad()
def build_controlnet(unet: UNet2DConditionModel, seed: int,
                     embedding_channels: tuple[int, ...] = CONTROLNET_EMBEDDING_CHANNELS) -> ControlNetModel:
    """A ControlNet of `unet`, its zero-initialised convolutions (the conditioning embedding's last,
    every residual's 1x1 projection) re-drawn with PyTorch's default initialiser after
    `torch.manual_seed(seed)`: untrained they are zeros, and every residual would be 0."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels).eval()
    zero = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for conv in zero:
        conv.reset_parameters()
    return controlnet


def build_components() -> dict:
    """Fresh tiny modules, in the order (and with the seeds) that fix their weights."""
    _seeded("text_encoder")
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval()
    _seeded("unet")
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    _liven(unet)
    _seeded("vae")
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    adapters = {}
    for name, cfg in ADAPTER_CONFIGS.items():
        _seeded(name)
        adapters[name] = T2IAdapter(**cfg).eval()
        _liven_adapter(adapters[name])
    controlnets = {"canny": build_controlnet(unet, SEEDS["canny"])}
    return {"text_encoder": text_encoder, "unet": unet, "vae": vae, "adapters": adapters, "controlnets": controlnets}


def write_checkpoint(work_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Save the tiny pipeline (work_dir/tiny-sd1) and adapters (work_dir/adapters/NAME) in diffusers format."""
    comps = build_components()
    return save_checkpoint(comps, work_dir, "tiny-sd1")


def save_checkpoint(comps: dict, work_dir: Path, model_name: str,
                    scheduler_config: dict = SD15_SCHEDULER_CONFIG) -> tuple[Path, dict[str, Path]]:
    """Save `build_components()`-style modules as an SD 1.5-style diffusers pipeline
    (work_dir/model_name, real CLIP tokenizer files, `scheduler_config`: by default SD 1.5's; its
    `_class_name` is the scheduler model_index.json names) and adapters (work_dir/adapters/NAME)."""
    model_dir = work_dir / model_name
    tok_dir = work_dir / "tokenizer-src"
    write_clip_tokenizer_dir(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=comps["vae"],
        text_encoder=comps["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=comps["unet"],
        scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(model_dir))
    # Replace what save_pretrained wrote for these two by the files a real SD 1.5 checkpoint has, so
    # that loading them exercises the same code as a real checkpoint (defaults filled in by diffusers).
    for sub in ("tokenizer", "scheduler"):
        for f in (model_dir / sub).iterdir():
            f.unlink()
    write_clip_tokenizer_dir(model_dir / "tokenizer")
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n", encoding="utf-8")
    adapter_dirs = {}
    for name, adapter in comps["adapters"].items():
        adapter_dirs[name] = work_dir / "adapters" / name
        adapter.save_pretrained(str(adapter_dirs[name]))
    for name, controlnet in comps.get("controlnets", {}).items():
        controlnet.save_pretrained(str(work_dir / "controlnets" / name))
    return model_dir, adapter_dirs


def controlnet_dirs(work_dir: Path) -> dict[str, Path]:
    """The ControlNets `save_checkpoint` wrote beside a checkpoint (work_dir/controlnets/NAME), by name."""
    root = work_dir / "controlnets"
    return {d.name: d for d in sorted(root.iterdir())} if root.is_dir() else {}


# ---- SD 2.x: OpenCLIP-style text encoder (GELU, pads with "!"), linear-projection attention with
# upcast, v-prediction DDIM (stabilityai/stable-diffusion-2-1's scheduler_config.json, verbatim).
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_SEEDS = {"text_encoder": 21, "unet": 22, "vae": 23, "seg": 24}
SD2_TEXT_ENCODER_CONFIG = dict(TEXT_ENCODER_CONFIG, hidden_act="gelu")
SD2_UNET_CONFIG = dict(
    UNET_CONFIG,
    sample_size=96,  # SD 2.1 (768-v): latent 96x96 -> default_size [768, 768]; config only, not the weights
    attention_head_dim=(2, 2, 4, 4),  # SD 2.x: per-block (5, 10, 20, 20)
    use_linear_projection=True,
    upcast_attention=True,
)
SD2_ADAPTER_CONFIGS = {
    # TencentARC/t2iadapter_seg_sd21-style full adapter (rgb)
    "seg": dict(in_channels=3, channels=[8, 8, 16, 16], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
}

# ---- SDXL: two text encoders (CLIP ViT-L-like, then OpenCLIP bigG-like with projection), text_time
# added conditioning, 3 down blocks (DownBlock2D first), T2I-Adapter-XL (4 features, the 4th to the
# mid block). stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json, verbatim.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_SEEDS = {"text_encoder": 11, "text_encoder_2": 12, "unet": 13, "vae": 14, "canny": 15, "depth": 16, "edges": 17}
SDXL_TEXT_ENCODER_CONFIG = dict(TEXT_ENCODER_CONFIG, hidden_size=4, intermediate_size=19, num_hidden_layers=3)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    TEXT_ENCODER_CONFIG, hidden_size=4, intermediate_size=23, num_hidden_layers=3, hidden_act="gelu", projection_dim=4
)
SDXL_UNET_CONFIG = dict(
    sample_size=8,  # latent 8x8 -> default_size [64, 64]
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(8, 16, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
    attention_head_dim=(2, 2, 4),  # SDXL: (5, 10, 20)
    cross_attention_dim=8,  # 4 + 4: both encoders' hidden states concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,  # SDXL: 256
    projection_class_embeddings_input_dim=6 * 8 + 4,  # 6 time ids × 8 + text_embeds (projection_dim 4)
    norm_num_groups=4,
)
SDXL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
SDXL_ADAPTER_CONFIGS = {
    # TencentARC/t2i-adapter-{canny,lineart,sketch}-sdxl-1.0: gray; {depth-midas,openpose}: rgb
    "canny": dict(in_channels=1, channels=[8, 16, 16, 16], num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl"),
    "depth": dict(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl"),
}


def _adapters(configs: dict, seeds: dict) -> dict:
    adapters = {}
    for name, cfg in configs.items():
        torch.manual_seed(seeds[name])
        adapters[name] = T2IAdapter(**cfg).eval()
        _liven_adapter(adapters[name])
    return adapters


def _save_adapters(work_dir: Path, adapters: dict) -> dict[str, Path]:
    dirs = {}
    for name, adapter in adapters.items():
        dirs[name] = work_dir / "adapters" / name
        adapter.save_pretrained(str(dirs[name]))
    return dirs


def _replace_tokenizer_and_scheduler(model_dir: Path, tokenizers: dict[str, str], scheduler_config: dict) -> None:
    """Write the files real checkpoints have in place of what save_pretrained wrote."""
    for sub in (*tokenizers, "scheduler"):
        for f in (model_dir / sub).iterdir():
            f.unlink()
    for sub, pad in tokenizers.items():
        write_clip_tokenizer_dir(model_dir / sub, pad)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n", encoding="utf-8")


def write_checkpoint_sd2(work_dir: Path) -> tuple[Path, dict[str, Path]]:
    torch.manual_seed(SD2_SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(SD2_SEEDS["unet"])
    unet = UNet2DConditionModel(**SD2_UNET_CONFIG).eval()
    _liven(unet)
    torch.manual_seed(SD2_SEEDS["vae"])
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    adapters = _adapters(SD2_ADAPTER_CONFIGS, SD2_SEEDS)
    tok_dir = work_dir / "tokenizer-src-sd2"
    write_clip_tokenizer_dir(tok_dir, "!")
    model_dir = work_dir / "tiny-sd2"
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet,
        scheduler=DDIMScheduler.from_config(SD21_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(model_dir))
    _replace_tokenizer_and_scheduler(model_dir, {"tokenizer": "!"}, SD21_SCHEDULER_CONFIG)
    return model_dir, _save_adapters(work_dir, adapters)


def write_checkpoint_sdxl(work_dir: Path) -> tuple[Path, dict[str, Path]]:
    torch.manual_seed(SDXL_SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(SDXL_SEEDS["text_encoder_2"])
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)).eval()
    torch.manual_seed(SDXL_SEEDS["unet"])
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    _liven(unet)
    torch.manual_seed(SDXL_SEEDS["vae"])
    vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval()
    adapters = _adapters(SDXL_ADAPTER_CONFIGS, SDXL_SEEDS)
    # An SDXL ControlNet (text_time conditioning too); "edges", not "canny": that name is an adapter's here.
    controlnet = build_controlnet(unet, SDXL_SEEDS["edges"])
    tok_dirs = {}
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tok_dirs[sub] = work_dir / f"tokenizer-src-sdxl-{sub}"
        write_clip_tokenizer_dir(tok_dirs[sub], pad)
    model_dir = work_dir / "tiny-sdxl"
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dirs["tokenizer"])),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dirs["tokenizer_2"])),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(model_dir))
    _replace_tokenizer_and_scheduler(model_dir, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, SDXL_SCHEDULER_CONFIG)
    controlnet.save_pretrained(str(work_dir / "controlnets" / "edges"))
    return model_dir, _save_adapters(work_dir, adapters)


# ---- SD 1.x inpainting (stable-diffusion-v1-5/stable-diffusion-inpainting-style): tiny-sd1's text
# encoder, VAE and scheduler (same configs and seeds, so the same weights), and a UNet taking
# cat[latents 4, mask 1, masked_image_latents 4] = 9 channels. The UNet is the smallest that keeps the
# SD layout (a cross-attention block, then a plain one, 1 layer each): its ONNX file is mostly graph
# structure, which scales with blocks x layers, not with channels. 2 down blocks make the set's
# size_multiple 16 (8 x 2), not 64: nothing in the runtime may assume tiny-sd1's.
SD1_INPAINT_SEEDS = {"text_encoder": SEEDS["text_encoder"], "unet": 31, "vae": SEEDS["vae"]}
SD1_INPAINT_UNET_CONFIG = dict(
    UNET_CONFIG,
    in_channels=9,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(4, 8),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def write_checkpoint_sd1_inpaint(work_dir: Path) -> tuple[Path, dict[str, Path]]:
    torch.manual_seed(SD1_INPAINT_SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(SD1_INPAINT_SEEDS["unet"])
    unet = UNet2DConditionModel(**SD1_INPAINT_UNET_CONFIG).eval()
    _liven(unet)
    torch.manual_seed(SD1_INPAINT_SEEDS["vae"])
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    comps = {"text_encoder": text_encoder, "unet": unet, "vae": vae, "adapters": {}}
    return save_checkpoint(comps, work_dir, "tiny-sd1-inpaint")


ZOO = {
    "sd1": write_checkpoint,
    "sd2": write_checkpoint_sd2,
    "sdxl": write_checkpoint_sdxl,
    "sd1-inpaint": write_checkpoint_sd1_inpaint,
}
# Families also exported with `--precision fp16` to OUT/tiny-FAMILY-fp16: the same weights, so the
# runtime checks the fp16 set against tiny-FAMILY's fixtures (within an fp16 tolerance).
FP16_SETS = ("sd1",)


def build_tiny_zoo(
    out_root: Path, work_dir: Path | None = None, families: list[str] | None = None
) -> list[tuple[Path, Path | None]]:
    """`python -m t2i_export tiny`: OUT/tiny-FAMILY (graph set) and OUT/fixtures/tiny-FAMILY (fixtures)
    for each family (default: all), in the order sd1, sd2, sdxl, sd1-inpaint, each followed by its
    fp16 set (`FP16_SETS`; no fixtures of its own).

    One intra-op thread, so that float reductions run in one fixed order (bit-for-bit regeneration).
    """
    import tempfile

    from .fixtures import write_fixtures
    from .pipeline import export_pipeline
    from .reference import Oracle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    written = []
    try:
        with tempfile.TemporaryDirectory(prefix="t2i-tiny-") as tmp:
            for fam in [f for f in ZOO if families is None or f in families]:
                work = (Path(work_dir) if work_dir is not None else Path(tmp)) / fam
                model_dir, adapter_dirs = ZOO[fam](work)
                controlnets = controlnet_dirs(work)
                name = f"tiny-{fam}"
                set_dir = export_pipeline(model_dir, list(adapter_dirs.items()), out_root / name, name=name, strip_names=True,
                                          controlnets=list(controlnets.items()))
                oracle = Oracle.load(model_dir, adapter_dirs, controlnets)
                fixtures_dir = write_fixtures(oracle, out_root / "fixtures" / name, fam)
                written.append((set_dir, fixtures_dir))
                if fam in FP16_SETS:
                    fp16 = f"{name}-fp16"
                    fp16_dir = export_pipeline(model_dir, list(adapter_dirs.items()), out_root / fp16, name=fp16, precision="fp16",
                                               strip_names=True, controlnets=list(controlnets.items()))
                    written.append((fp16_dir, None))
    finally:
        torch.set_num_threads(threads)
    return written
