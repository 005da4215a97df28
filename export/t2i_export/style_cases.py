"""The style adapter in combination, for fixtures/tiny-sd1-style/cases.json: the style images
together with a T2I-Adapter, and with img2img, each against style_fixtures.py's reference loop
(`denoise`: TencentARC's ddim.py over diffusers' components; diffusers has no style adapter).

* ``style_sketch_adapter``: style_fixtures.py's two style images (weights 1.0 and 0.5) and tiny-sd1's
  "sketch" T2I-Adapter on fixtures.py's sketch condition: the adapter's features once, times the
  weight, passed as `down_intrablock_additional_residuals` at every step
  (diffusers pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py `__call__`, `_preprocess_adapter_image`).
  style_cond_tau 0.5, so the adapter runs beside both context phases. Explicit initial latents (seeded).
* ``style_img2img_strength07``: the style images with img2img from fixtures.py's init image,
  strength 0.7 of 5 steps (the last 3 run), the starting latents from
  `StableDiffusionImg2ImgPipeline.prepare_latents` with `torch.Generator("cpu").manual_seed(seed)`
  (the VAE posterior sample, then the noise: the runtime's `--rng torch-cpu`). style_cond_tau 0.7:
  step i of 5 is styled while 5 - i - 1 >= int(0.3 × 5) = 1, so steps 2 and 3 are, step 4 is not.

And, for fixtures/tiny-sd1-ip-style/cases.json (a set with the tiny plain IP-Adapter beside the style
adapter, tiny_style_set.py):

* ``style_ip_adapter``: the style images (style_cond_tau 0.5) with an IP reference image
  (condition_fixtures' photo, ``image.png``, scale 0.6) on a UNet that diffusers' `load_ip_adapter`
  patched, the embeds passed as `StableDiffusionPipeline.__call__` does. Explicit initial latents.

Every case runs DDIM (eta 0) from the checkpoint's scheduler config, as TencentARC samples. Written:
``conditions/{sketch,init}.png`` (fixtures.py's synthetic conditions, the same bytes as
graphs/fixtures/tiny-sd1's), per case ``cases/NAME/expected_latents.npy`` (the final latents) and,
with explicit latents, ``cases/NAME/latents.npy``; and ``cases.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, T2IAdapter
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image
from PIL import Image

from .fixtures import condition_images

_CASE = dict(negative_prompt="", guidance=7.5, width=64, height=64, adapters=[], init_image=None, strength=None,
             latents=None, rng=None)
CASES = [
    dict(_CASE, name="style_sketch_adapter", prompt="a bowl of fruit on a wooden table", steps=4, style_cond_tau=0.5,
         adapters=[dict(name="sketch", image="conditions/sketch.png", weight=1.0)], seed=401),
    dict(_CASE, name="style_img2img_strength07", prompt="a lighthouse by the sea", steps=5, style_cond_tau=0.7,
         init_image="conditions/init.png", strength=0.7, rng="torch-cpu", seed=402),
]
CONDITIONS = {"init": "conditions/init.png", "sketch": "conditions/sketch.png"}
IP_CASES = [
    dict(_CASE, name="style_ip_adapter", prompt="a red house on a green hill, oil painting", steps=4, style_cond_tau=0.5,
         ip_scale=0.6, seed=403),
]


def _save(path: Path, value: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(value.numpy().astype(np.float32)))


@torch.no_grad()
def write_cases(pipe: StableDiffusionPipeline, scheduler: DDIMScheduler, tokens: torch.Tensor, weights: list[float],
                adapter_dir: Path, out: Path) -> Path:
    """OUT/cases.json, OUT/conditions/*.png and OUT/cases/NAME/*.npy; `tokens` are the style images'
    combined tokens (style_fixtures.py), `weights` theirs."""
    from .style_fixtures import denoise

    synthetic = condition_images()
    for key, rel in CONDITIONS.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        synthetic[key].save(out / rel)
    adapter = T2IAdapter.from_pretrained(str(adapter_dir)).eval()
    entries = []
    for case in CASES:
        cdir = out / "cases" / case["name"]
        entry = dict(case, style_weights=weights)
        cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
        residuals, first_step = None, 0
        if case["init_image"] is None:
            g = torch.Generator().manual_seed(case["seed"])
            latents = torch.randn(1, pipe.unet.config.in_channels, case["height"] // 8, case["width"] // 8, generator=g)
            _save(cdir / "latents.npy", latents)
            entry["latents"] = f"cases/{case['name']}/latents.npy"
        else:
            i2i = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
            image = i2i.image_processor.preprocess(Image.open(out / case["init_image"]).convert("RGB"))
            scheduler.set_timesteps(case["steps"])
            timesteps, remaining = i2i.get_timesteps(case["steps"], case["strength"], "cpu")
            first_step = case["steps"] - remaining
            g = torch.Generator("cpu").manual_seed(case["seed"])
            latents = i2i.prepare_latents(image, timesteps[:1], 1, 1, torch.float32, "cpu", g)
        if case["adapters"]:
            (spec,) = case["adapters"]
            x = _preprocess_adapter_image(Image.open(out / spec["image"]), case["height"], case["width"])
            residuals = [v * spec["weight"] for v in adapter(x)]
        final = denoise(pipe, scheduler, cond, uncond, tokens, latents, case["steps"], case["guidance"],
                        case["style_cond_tau"], residuals, first_step)
        _save(cdir / "expected_latents.npy", final)
        entry["expected_latents"] = f"cases/{case['name']}/expected_latents.npy"
        entry["reference"] = "style_fixtures.denoise" + (" + T2I-Adapter residuals" if residuals else "") + (
            " from StableDiffusionImg2ImgPipeline.prepare_latents" if first_step else "")
        entries.append(entry)
    (out / "cases.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return out


@torch.no_grad()
def write_ip_cases(model_dir: Path, ip_weights: Path, image_encoder_dir: Path, style_weights: Path,
                   style_encoder_dir: Path, out: Path) -> Path:
    """OUT/style_<k>.png, OUT/image.png, OUT/cases.json and OUT/cases/NAME/*.npy for `IP_CASES`."""
    from .condition_fixtures import photo
    from .ip_adapter_fixtures import load_pipeline
    from .style_fixtures import CASE, denoise, write_style_images

    pipe = load_pipeline(model_dir, ip_weights, image_encoder_dir)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    weights = CASE["weights"]
    tokens = write_style_images(style_weights, style_encoder_dir, weights, out)
    ip_image = photo()
    ip_image.save(out / "image.png")
    entries = []
    for case in IP_CASES:
        cdir = out / "cases" / case["name"]
        pipe.set_ip_adapter_scale(case["ip_scale"])
        cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", 1, True, case["negative_prompt"])
        image_embeds = pipe.prepare_ip_adapter_image_embeds(ip_image, None, "cpu", 1, True)
        g = torch.Generator().manual_seed(case["seed"])
        latents = torch.randn(1, pipe.unet.config.in_channels, case["height"] // 8, case["width"] // 8, generator=g)
        _save(cdir / "latents.npy", latents)
        final = denoise(pipe, scheduler, cond, uncond, tokens, latents, case["steps"], case["guidance"],
                        case["style_cond_tau"], image_embeds=image_embeds)
        _save(cdir / "expected_latents.npy", final)
        entries.append(dict(case, style_weights=weights, ip_image="image.png",
                            latents=f"cases/{case['name']}/latents.npy",
                            expected_latents=f"cases/{case['name']}/expected_latents.npy",
                            reference="style_fixtures.denoise + load_ip_adapter image embeds"))
    (out / "cases.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return out
