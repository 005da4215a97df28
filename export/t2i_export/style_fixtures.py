"""Pipeline-level reference for a style-adapter set: a denoising loop over diffusers' components (the
checkpoint's UNet and text encoder, `DDIMScheduler` from the checkpoint's scheduler config: TencentARC
samples with DDIM, eta 0) with the context built by style_adapter.py's ports of TencentARC's code
(`combine_style_tokens`, `style_context`, `style_active`), for the runtime's end-to-end parity.

Run from ``export/``::

    python -m t2i_export.style_fixtures --model M --style-adapter FILE --style-encoder DIR --out DIR

Writes ``style_0.png`` (condition_fixtures' 256x192 photo: landscape) and ``style_1.png`` (it
mirrored and resized to 200x300: portrait, so the resize and the center crop act along the other
axis), ``style_tokens.npy`` (the two images' tokens times their weights 1.0 and 0.5, concatenated:
[1, 2 × num_tokens, D]), ``latents_init.npy`` (seeded), one ``latents_<case>.npy`` per case (the
loop's final latents from those initial latents) and ``case.json`` (prompt, steps, guidance, weights,
each case's style_cond_tau, seed). Cases: ``tau1`` styles every step; ``tau05`` the first half only,
so both context phases run. Everything is seeded: the same inputs and pinned versions write the
same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel

from .condition_fixtures import photo
from .style_adapter import combine_style_tokens, load_style_module, style_active, style_context

CASE = {"prompt": "a red house by the sea", "negative_prompt": "", "steps": 4, "guidance_scale": 7.5,
        "weights": [1.0, 0.5], "seed": 2025, "cases": {"tau1": 1.0, "tau05": 0.5}}


def style_images() -> list[Image.Image]:
    first = photo()
    return [first, first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((200, 300), Image.Resampling.BICUBIC)]


@torch.no_grad()
def denoise(pipe: StableDiffusionPipeline, scheduler: DDIMScheduler, cond: torch.Tensor, uncond: torch.Tensor,
            tokens: torch.Tensor, latents: torch.Tensor, steps: int, guidance: float, tau: float) -> torch.Tensor:
    """ddim.py `ddim_sampling` with diffusers' scheduler: styled contexts while `style_active`."""
    scheduler.set_timesteps(steps)
    styled_cond, styled_uncond = style_context(cond, uncond, tokens)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        c, u = (styled_cond, styled_uncond) if style_active(i, steps, tau) else (cond, uncond)
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = pipe.unet(model_input, t, encoder_hidden_states=torch.cat([u, c])).sample
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, eta=0.0).prev_sample
    return latents


@torch.no_grad()
def write_fixtures(model_dir: Path, weights: Path, encoder_dir: Path, out: Path, case: dict = CASE) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    module = load_style_module(weights)
    encoder = CLIPVisionModel.from_pretrained(str(encoder_dir), dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(str(encoder_dir))
    out.mkdir(parents=True, exist_ok=True)
    tokens = []
    for k, image in enumerate(style_images()):
        image.save(out / f"style_{k}.png")
        pixel_values = processor(image, return_tensors="pt").pixel_values
        tokens.append(module(encoder(pixel_values).last_hidden_state))
    tokens = combine_style_tokens(tokens, case["weights"])
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
    size = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(case["seed"])
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g)
    arrays = {"style_tokens": tokens, "latents_init": latents}
    for name, tau in case["cases"].items():
        arrays[f"latents_{name}"] = denoise(pipe, scheduler, cond, uncond, tokens, latents.clone(), case["steps"],
                                            case["guidance_scale"], tau)
    for name, value in arrays.items():
        np.save(out / f"{name}.npy", value.numpy().astype(np.float32))
    meta = {**case, "scheduler": "DDIMScheduler", "eta": 0.0}
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--style-adapter", type=Path, required=True)
    p.add_argument("--style-encoder", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wrote {write_fixtures(args.model, args.style_adapter, args.style_encoder, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
