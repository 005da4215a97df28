"""`python -m t2i_export train-demo`: train the demo-shapes model, a small latent diffusion model of
the demo-shapes world (demo_shapes.py), and its `sketch` and `color` T2I-Adapters, with diffusers'
own classes and recipes.

Stages, each with a wall-clock share of `--minutes` (the whole run is sized to fit it):
1. `AutoencoderKL` (f = 8: 128x128 images, 16x16x4 latents): reconstruction (L1 + MSE) plus a tiny
   KL term, as SD's autoencoder; its `scaling_factor` is then set to 1 / std of the latents, the way
   SD's 0.18215 was chosen.
2. `CLIPTextModel` (the real CLIP tokenizer) and `UNet2DConditionModel` together, epsilon
   prediction on SD 1.5's noise schedule (diffusers' `train_text_to_image.py`, with its
   `--noise_offset` and `--snr_gamma`), with 10 % of the captions dropped to "" so that
   classifier-free guidance works.
3. Each T2I-Adapter with UNet and text encoder frozen, as diffusers' `train_t2i_adapter_sdxl.py`:
   timesteps drawn cubically towards the noisy end (`(1 - u**3) * T`).

One departure from those recipes, in stages 2 and 3: the loss weighs the shapes' latent pixels more
than the background's (SHAPE_WEIGHT), since the shapes are what the prompt and the adapters are about
and an eighth of the picture.

The trained modules are saved as an SD 1.5-style diffusers pipeline in fp16 safetensors. Token
embeddings of tokens that never occur in a caption get no gradient and stay at their random
initial values; they are set to zero, so that the exporter can store the table compactly and an
unknown word reads as "nothing" rather than as noise.

Each stage runs for its share of the clock, so how many steps it gets depends on the machine; the
counts are recorded in training.json, and `--steps-like training.json` replays them exactly. With
the same counts and seed a run is reproducible on one machine, not bit for bit across machines
(torch's CPU kernels round differently on Intel and AMD).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, T2IAdapter, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import compute_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import demo_shapes as ds
from . import tiny
from .errors import ExportError
from .tiny import SD15_SCHEDULER_CONFIG, save_checkpoint, write_clip_tokenizer_dir

# The tiny zoo's configs (tiny.py), widened where a model that must learn needs it.
TEXT_CONFIG = dict(
    tiny.TEXT_ENCODER_CONFIG,
    hidden_size=16,  # the 49,408 x hidden token table dominates the checkpoint's size
    intermediate_size=64,
    projection_dim=16,
)
UNET_CONFIG = dict(
    tiny.UNET_CONFIG,
    sample_size=16,  # 16x16 latents -> 128x128 images
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    tiny.VAE_CONFIG,  # 4 blocks = 8x downscale, as in SD
    block_out_channels=(8, 16, 32, 32),
    # 4 channels per group in the 8-channel blocks, as SD's 32 groups of its 128: a group of one
    # channel (instance norm) subtracts a flat color away, and these images are mostly flat color.
    norm_num_groups=2,
    sample_size=128,
    mid_block_add_attention=False,
)
ADAPTER_CONFIGS = {
    # one feature per UNet down block, channels = block_out_channels
    "sketch": dict(in_channels=1, channels=[32, 64], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter"),
    "color": dict(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter"),
}
# diffusers' `train_text_to_image.py --noise_offset`: each latent channel's noise gets a random
# offset. SD 1.5's schedule leaves 6.8 % of the signal at t = 999, and the mean of a flat background
# shows through it, so without the offset the UNet learns to read the background's color from the
# starting noise instead of the prompt (the first run drew the prompted background 17 % of the time,
# chance; adding a color's leaked mean to the starting noise drew that color 3 times in 4). Also used
# when training the adapters, so that they see the inputs the UNet was trained on.
NOISE_OFFSET = 0.2
# The checkpoint's default sampler: Euler on SD 1.5's schedule. SD 1.5's own PNDM (PLMS) extrapolates
# the noise predictions of the last four steps, and this model's change fast early on (the noise
# offset), so it loses the prompt: on 12 held-out prompts x 4 samples (diffusers, 20 steps, guidance 5)
# PNDM drew the prompted background 58 % of the time and shape color 50 %; Euler 100 % and 69 %,
# DDIM 100 % and 65 %.
SCHEDULER_CONFIG = dict(tiny.SD15_SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler")
# diffusers' `train_text_to_image.py --snr_gamma 5` (Min-SNR weighting, Hang et al. 2023): each
# sample's loss is weighted by min(SNR, 5) / SNR, which takes weight off the nearly clean timesteps.
# The shape's color and kind are decided at the noisy ones; see _unet_loss.
SNR_GAMMA: float | None = 5.0
# The loss of a latent pixel is weighted by 1 + SHAPE_WEIGHT x the share of its 8x8 pixels that a
# shape covers (each sample's weights normalised to mean 1). Shapes cover an eighth of a scene on
# average, so under a plain mean the background is 87 % of the loss (37 % with these weights): the
# second run drew the prompted background 100 % of the time but the prompted shape color 67 %,
# confusing the pairs whose text encoder outputs were closest. Used for the UNet and the adapters.
SHAPE_WEIGHT = 3.0
# Stage shares of the time budget.
SHARES = {"vae": 0.15, "unet": 0.60, "sketch": 0.15, "color": 0.08}  # the rest: encoding the scenes


@dataclass
class Plan:
    minutes: float = 80.0
    seed: int = 0
    scenes: int = 24000  # distinct training scenes (latents precomputed once)
    threads: int = 2
    log: Callable[[str], None] = print
    steps: dict = field(default_factory=dict)  # {"vae_steps": N, ...}: fixed step counts instead of the clock
    stats: dict = field(default_factory=dict)


def _to_tensor(img, channels: int) -> torch.Tensor:
    a = np.asarray(img, dtype=np.float32) / 255.0
    if channels == 1:
        a = a[..., None]
    return torch.from_numpy(a).permute(2, 0, 1)


def _images(scenes: list[ds.Scene]) -> torch.Tensor:
    return torch.stack([_to_tensor(s.image(), 3) for s in scenes]) * 2 - 1


def _run_for(plan: Plan, key: str, seconds: float, step: Callable[[int, float], float], label: str) -> int:
    """Call step(i, progress) until `seconds` have passed, or exactly plan.steps[key] times when the
    plan fixes the count (a replay: the same counts and seed give the same weights on one machine);
    progress in [0, 1] drives the learning-rate schedule. Returns the number of steps run."""
    start = time.monotonic()
    fixed = plan.steps.get(key)
    i, ema = 0, None
    while True:
        elapsed = time.monotonic() - start
        if (i >= fixed) if fixed is not None else (elapsed >= seconds):
            break
        loss = step(i, i / fixed if fixed else elapsed / seconds)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        i += 1
        if i % 200 == 0:
            plan.log(f"{label}: step {i}, {elapsed / 60:.1f} min, loss {ema:.4f}")
    plan.log(f"{label}: {i} steps in {(time.monotonic() - start) / 60:.1f} min, loss {ema:.4f}")
    return i


def _cosine(opt: torch.optim.Optimizer, base: float, progress: float, warmup: float = 0.03) -> None:
    lr = base * min(1.0, progress / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    for g in opt.param_groups:
        g["lr"] = max(lr, base * 0.02)


def train_vae(plan: Plan, seconds: float) -> AutoencoderKL:
    """On random 64x64 crops (8-aligned) of whole scenes: the autoencoder is convolutional and has no
    attention, so crops teach it the same per-pixel job at a quarter of the cost per sample."""
    torch.manual_seed(plan.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(plan.seed + 101)
    crop = 64

    def step(i: int, progress: float) -> float:
        _cosine(opt, 2e-3, progress)
        x = _images([ds.random_scene(rng) for _ in range(32)])
        ys, xs = rng.integers(0, (ds.SIZE - crop) // 8 + 1, size=(2, len(x))) * 8
        x = torch.stack([im[:, y : y + crop, c : c + crop] for im, y, c in zip(x, ys, xs)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    plan.stats["vae_steps"] = _run_for(plan, "vae_steps", seconds, step, "vae")
    return vae.eval()


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, scenes: list[ds.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every scene (unscaled)."""
    means, stds = [], []
    for i in range(0, len(scenes), 256):
        d = vae.encode(_images(scenes[i : i + 256])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _offset_noise(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Standard normal noise plus NOISE_OFFSET x a standard normal per sample and channel."""
    noise = torch.randn(shape, generator=g)
    return noise + NOISE_OFFSET * torch.randn((shape[0], shape[1], 1, 1), generator=g)


def _noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def _decay_groups(*modules: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and kernels only, none on embeddings, norms and
    biases (as transformers' Trainer splits them, there for biases and norms; until the third run
    everything was decayed, which shrinks the 15 token embeddings in use by a few % per run)."""
    decay, keep = [], []
    for m in modules:
        for name, p in m.named_parameters():
            flat = p.ndim < 2 or "embedding" in name or "norm" in name
            (keep if flat else decay).append(p)
    return [{"params": decay}, {"params": keep, "weight_decay": 0.0}]


def shape_weights(scenes: list[ds.Scene], chunk: int = 1000) -> torch.Tensor:
    """[N, 1, 16, 16] per-latent-pixel loss weights (SHAPE_WEIGHT), each sample's of mean 1."""
    out = []
    for i in range(0, len(scenes), chunk):
        masks = torch.from_numpy(np.stack([s.mask() for s in scenes[i : i + chunk]])).float()[:, None]
        w = 1 + SHAPE_WEIGHT * F.avg_pool2d(masks, 8)
        out.append(w / w.mean(dim=(1, 2, 3), keepdim=True))
    return torch.cat(out)


def _per_sample_mse(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Shape-weighted mean squared error per sample ([B]); `weights` [B, 1, h, w] broadcast over channels."""
    return ((pred - noise) ** 2 * weights).mean(dim=(1, 2, 3))


def _unet_loss(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, t: torch.Tensor,
               sched: DDPMScheduler) -> torch.Tensor:
    """Shape-weighted MSE on the noise, Min-SNR weighted when SNR_GAMMA is set (train_text_to_image.py's
    formula)."""
    loss = _per_sample_mse(pred, noise, weights)
    if SNR_GAMMA is not None:
        snr = compute_snr(sched, t)
        loss = loss * torch.clamp(snr, max=SNR_GAMMA) / snr
    return loss.mean()


def train_unet(plan: Plan, seconds: float, latents, tokens, empty, weights) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(plan.seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    torch.manual_seed(plan.seed + 3)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    # The same math as the default SDPA processor; faster on the CPU at these head sizes (16, 32).
    unet.set_attn_processor(AttnProcessor())
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(_decay_groups(text, unet), lr=1e-3, weight_decay=1e-2)
    sched = _noise_scheduler()
    mean, std = latents
    g = torch.Generator().manual_seed(plan.seed + 4)
    batch = 48

    def step(i: int, progress: float) -> float:
        _cosine(opt, 1e-3, progress)
        idx = torch.randint(len(mean), (batch,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * plan.stats["scaling_factor"]
        ids = tokens[idx].clone()
        ids[torch.rand(batch, generator=g) < 0.1] = empty
        noise = _offset_noise(x0.shape, g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, text(ids).last_hidden_state).sample
        loss = _unet_loss(pred, noise, weights[idx], t, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    plan.stats["unet_steps"] = _run_for(plan, "unet_steps", seconds, step, "unet")
    return text.eval(), unet.eval()


def train_adapter(plan: Plan, name: str, seconds: float, text, unet, latents, tokens, conds, weights) -> T2IAdapter:
    torch.manual_seed(plan.seed + 10 + len(name))
    adapter = T2IAdapter(**ADAPTER_CONFIGS[name])
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = _noise_scheduler()
    for p in list(text.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    mean, std = latents
    g = torch.Generator().manual_seed(plan.seed + 20 + len(name))
    batch = 32
    T = sched.config.num_train_timesteps

    def step(i: int, progress: float) -> float:
        _cosine(opt, 1e-3, progress)
        idx = torch.randint(len(mean), (batch,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * plan.stats["scaling_factor"]
        noise = _offset_noise(x0.shape, g)
        # train_t2i_adapter_sdxl.py: cubic sampling, more weight on the early (noisy) steps
        t = ((1 - torch.rand(batch, generator=g) ** 3) * T).long().clamp(0, T - 1)
        xt = sched.add_noise(x0, noise, t)
        with torch.no_grad():
            context = text(tokens[idx]).last_hidden_state
        features = adapter(conds[idx])
        pred = unet(xt, t, context, down_intrablock_additional_residuals=[f for f in features]).sample
        loss = _per_sample_mse(pred, noise, weights[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    plan.stats[f"{name}_steps"] = _run_for(plan, f"{name}_steps", seconds, step, name)
    return adapter.eval()


@torch.no_grad()
def _zero_unused_tokens(text: CLIPTextModel, tokens: torch.Tensor, empty: torch.Tensor) -> int:
    used = torch.unique(torch.cat([tokens.flatten(), empty.flatten()]))
    table = text.get_input_embeddings().weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[used] = True
    table[~keep] = 0
    return int(keep.sum())


def package(checkpoint: Path, out: Path) -> Path:
    """The committed form: `out/diffusers/` (the checkpoint as `train` wrote it), the graph set exported
    from it with compact weights into `out`, and `out/examples/` (the demo grid's conditions)."""
    from .pipeline import export_pipeline

    adapters = [(name, checkpoint / "adapters" / name) for name in ADAPTER_CONFIGS]
    export_pipeline(checkpoint / "model", adapters, out, name=out.resolve().name, compact_weights=True,
                    strip_names=True)
    ckpt = out / "diffusers"
    if ckpt.resolve() != checkpoint.resolve():
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(checkpoint, ckpt)
    # The tokenizer is the standard CLIP one, which `write_clip_tokenizer_dir` writes byte for byte from
    # the open_clip wheel: 1.5 MB the committed set leaves out (`loadable_checkpoint` puts it back).
    shutil.rmtree(ckpt / "model" / "tokenizer", ignore_errors=True)
    ds.write_examples(out / "examples")
    return out


def loadable_checkpoint(demo: Path, dst: Path) -> Path:
    """`demo/diffusers` (a packaged set's checkpoint) copied to `dst` with its CLIP tokenizer written
    back into `model/tokenizer`, so that diffusers' `from_pretrained` loads `dst / "model"`."""
    shutil.copytree(demo / "diffusers", dst)
    write_clip_tokenizer_dir(dst / "model" / "tokenizer")
    return dst


def train(out: Path, plan: Plan, work: Path) -> Path:
    """Train every stage and save the fp16 diffusers checkpoint to `out`: out/model (the pipeline),
    out/adapters/{sketch,color}, out/training.json.

    Each stage's fp32 result is kept in `work` (vae/, text_encoder/ + unet/, adapter_NAME/) and a stage
    whose result is there is not trained again: delete a stage's folder to retrain it and what follows.
    """
    torch.set_num_threads(plan.threads)
    total = plan.minutes * 60
    work.mkdir(parents=True, exist_ok=True)
    stats_file = work / "training.json"
    if stats_file.is_file():
        plan.stats.update(json.loads(stats_file.read_text(encoding="utf-8")))

    def save_stats() -> None:
        stats_file.write_text(json.dumps(plan.stats, indent=2) + "\n", encoding="utf-8")

    t0 = time.monotonic()
    scenes = ds.scenes(ds.TRAIN_SEED, plan.scenes)
    if (work / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval()
    else:
        vae = train_vae(plan, total * SHARES["vae"])
        plan.log(f"encoding {len(scenes)} training scenes")
        mean, std = encode_scenes(vae, scenes)
        sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(plan.seed + 5))
        plan.stats["scaling_factor"] = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=plan.stats["scaling_factor"])
        plan.log(f"latent scaling factor {plan.stats['scaling_factor']:.5f}")
        torch.save({"mean": mean, "std": std}, work / "latents.pt")
        vae.save_pretrained(str(work / "vae"))
        save_stats()
    cached = torch.load(work / "latents.pt")
    mean, std = cached["mean"], cached["std"]
    if len(mean) != len(scenes):  # captions and conditions are indexed like the cached latents
        raise ExportError(f"{work}: its latents are of {len(mean)} scenes, this run has --scenes {len(scenes)}; "
                          "use the same --scenes or another --work")

    tok_dir = work / "tokenizer"
    write_clip_tokenizer_dir(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    tokens = _tokenize(tokenizer, [s.caption for s in scenes])
    empty = _tokenize(tokenizer, [""])[0]
    weights = shape_weights(scenes)

    if (work / "unet").is_dir():
        text = CLIPTextModel.from_pretrained(str(work / "text_encoder")).eval()
        unet = UNet2DConditionModel.from_pretrained(str(work / "unet")).eval()
        unet.set_attn_processor(AttnProcessor())
    else:
        text, unet = train_unet(plan, total * SHARES["unet"], (mean, std), tokens, empty, weights)
        plan.stats["tokens_in_use"] = _zero_unused_tokens(text, tokens, empty)
        plan.log(f"{plan.stats['tokens_in_use']} token embeddings in use; the rest set to zero")
        text.save_pretrained(str(work / "text_encoder"))
        unet.save_pretrained(str(work / "unet"))
        save_stats()

    adapters = {}
    for name in ADAPTER_CONFIGS:
        folder = work / f"adapter_{name}"
        if folder.is_dir():
            adapters[name] = T2IAdapter.from_pretrained(str(folder)).eval()
            continue
        if name == "sketch":
            conds = torch.stack([_to_tensor(s.sketch(), 1) for s in scenes])
        else:
            conds = torch.stack([_to_tensor(s.palette(), 3) for s in scenes])
        adapters[name] = train_adapter(plan, name, total * SHARES[name], text, unet, (mean, std), tokens, conds, weights)
        adapters[name].save_pretrained(str(folder))
        save_stats()
    plan.stats["minutes_this_run"] = (time.monotonic() - t0) / 60

    unet.set_default_attn_processor()
    comps = {"text_encoder": text.half(), "unet": unet.half(), "vae": vae.half(), "adapters": {k: a.half() for k, a in adapters.items()}}
    staging = work / "checkpoint"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(comps, staging, "model", SCHEDULER_CONFIG)
    shutil.rmtree(staging / "tokenizer-src", ignore_errors=True)
    save_stats()
    shutil.copy(stats_file, staging / "training.json")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(staging), str(out))
    return out
