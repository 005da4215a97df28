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
each case's style_cond_tau, seed); with a T2I-Adapter given, style_cases.py's ``cases.json`` and
``cases/`` as well. Cases: ``tau1`` styles every step; ``tau05`` the first half only,
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
from .style_cases import write_cases

CASE = {"prompt": "a red house by the sea", "negative_prompt": "", "steps": 4, "guidance_scale": 7.5,
        "weights": [1.0, 0.5], "seed": 2025, "cases": {"tau1": 1.0, "tau05": 0.5}}


def style_images() -> list[Image.Image]:
    first = photo()
    return [first, first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((200, 300), Image.Resampling.BICUBIC)]


@torch.no_grad()
def denoise(pipe: StableDiffusionPipeline, scheduler: DDIMScheduler, cond: torch.Tensor, uncond: torch.Tensor,
            tokens: torch.Tensor, latents: torch.Tensor, steps: int, guidance: float, tau: float,
            residuals: list[torch.Tensor] | None = None, first_step: int = 0,
            image_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
    """ddim.py `ddim_sampling` with diffusers' scheduler: styled contexts while `style_active`.

    `residuals`: a T2I-Adapter's weighted features, passed to the UNet at every step (doubled for
    the guidance batch) as `StableDiffusionAdapterPipeline.__call__` does. `first_step` > 0:
    img2img, `latents` already noised to timestep `first_step` and the loop runs from there
    (`StableDiffusionImg2ImgPipeline.get_timesteps`); `style_active` still counts the step in the
    whole schedule, as the runtime does. `image_embeds`: an IP-Adapter's `[negative; image]` embeds
    (`prepare_ip_adapter_image_embeds` with guidance) for a UNet that `load_ip_adapter` patched, passed
    as `StableDiffusionPipeline.__call__` does (`added_cond_kwargs`)."""
    scheduler.set_timesteps(steps)
    styled_cond, styled_uncond = style_context(cond, uncond, tokens)
    if first_step == 0:
        latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        if i < first_step:
            continue
        c, u = (styled_cond, styled_uncond) if style_active(i, steps, tau) else (cond, uncond)
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        extra = {}
        if residuals is not None:
            extra["down_intrablock_additional_residuals"] = [torch.cat([r] * 2) for r in residuals]
        if image_embeds is not None:
            extra["added_cond_kwargs"] = {"image_embeds": image_embeds}
        noise = pipe.unet(model_input, t, encoder_hidden_states=torch.cat([u, c]), **extra).sample
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, eta=0.0).prev_sample
    return latents


@torch.no_grad()
def write_style_images(weights: Path, encoder_dir: Path, style_weights: list[float], out: Path) -> torch.Tensor:
    """OUT/style_<k>.png (`style_images`) and their tokens times `style_weights`, combined: [1, P, D]."""
    module = load_style_module(weights)
    encoder = CLIPVisionModel.from_pretrained(str(encoder_dir), dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(str(encoder_dir))
    out.mkdir(parents=True, exist_ok=True)
    tokens = []
    for k, image in enumerate(style_images()):
        image.save(out / f"style_{k}.png")
        pixel_values = processor(image, return_tensors="pt").pixel_values
        tokens.append(module(encoder(pixel_values).last_hidden_state))
    return combine_style_tokens(tokens, style_weights)


@torch.no_grad()
def write_fixtures(model_dir: Path, weights: Path, encoder_dir: Path, out: Path, case: dict = CASE,
                   adapter_dir: Path | None = None) -> Path:
    """The files of the module doc in OUT; with `adapter_dir` (a T2I-Adapter in diffusers format), also
    style_cases.py's combinations with it and with img2img."""
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    tokens = write_style_images(weights, encoder_dir, case["weights"], out)
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
    if adapter_dir is not None:
        write_cases(pipe, scheduler, tokens, case["weights"], adapter_dir, out)
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
