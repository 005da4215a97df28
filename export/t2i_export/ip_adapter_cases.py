"""IP-Adapter cases for a generated set's cases.json (graphs/generated/fixtures/tiny-*-ip*/): the
reference image from a seed alone, and (tiny-sd1-ip) together with a ControlNet, with img2img, and
with a T2I-Adapter, each against diffusers.

* ``ip_text_generator_pipeline`` (`TEXT_CASES`, every IP set): the checkpoint's own text-to-image
  pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`, ip_adapter_fixtures.load_pipeline)
  with `ip_adapter_image` and no latents: every draw from `torch.Generator("cpu").manual_seed(seed)`.
* ``ip_controlnet_generator_pipeline``: `StableDiffusionControlNetPipeline` (it has `IPAdapterMixin`)
  with tiny-sd1's "canny" ControlNet and `ip_adapter_image`; no latents, every draw from
  `torch.Generator("cpu").manual_seed(seed)` (the runtime's `--rng torch-cpu`).
* ``ip_img2img_strength07_generator_pipeline``: `StableDiffusionImg2ImgPipeline` with
  `ip_adapter_image`, strength 0.7, from the seed alone (the VAE posterior sample, then the noise).
* ``ip_sketch_adapter_loop``: `StableDiffusionAdapterPipeline` has no IP-Adapter support, so `run_loop`
  writes out its `__call__` (diffusers pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py:
  adapter features once, times the weight, doubled for CFG, passed as
  `down_intrablock_additional_residuals` at every step) with the IP-Adapter path of
  `StableDiffusionPipeline.__call__` (pipelines/stable_diffusion/pipeline_stable_diffusion.py:
  `prepare_ip_adapter_image_embeds`, then `added_cond_kwargs={"image_embeds": ...}` to the UNet that
  `load_ip_adapter` patched). Explicit initial latents.

Every case uses the checkpoint's own scheduler (PNDM for tiny-sd1, Euler for tiny-sdxl), the IP
image of ip_adapter_fixtures.py (image.png) and fixtures.py's synthetic conditions (conditions/*.png,
the same bytes as graphs/fixtures/tiny-sd1's). Written per case: ``cases/NAME/expected_latents.npy`` (the final
latents, `output_type="latent"`) and, for the loop, ``cases/NAME/latents.npy`` (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    T2IAdapter,
)
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image
from PIL import Image

from .fixtures import condition_images

_CASE = dict(negative_prompt="blurry", guidance=7.5, ip_scale=0.6, width=64, height=64, adapters=[], controls=[],
             init_image=None, strength=None, latents=None, rng=None)
TEXT_CASES = [
    dict(_CASE, name="ip_text_generator_pipeline", prompt="a small boat on a calm lake", steps=4, rng="torch-cpu", seed=304,
         reference="pipeline"),
]
CASES = TEXT_CASES + [
    dict(_CASE, name="ip_controlnet_generator_pipeline", prompt="a red house on a green hill, oil painting", steps=4,
         controls=[dict(name="canny", image="conditions/control.png", scale=1.0)], rng="torch-cpu", seed=301,
         reference="pipeline"),
    dict(_CASE, name="ip_img2img_strength07_generator_pipeline", prompt="a lighthouse by the sea", steps=5,
         init_image="conditions/init.png", strength=0.7, rng="torch-cpu", seed=302, reference="pipeline"),
    dict(_CASE, name="ip_sketch_adapter_loop", prompt="a bowl of fruit on a wooden table", steps=3,
         adapters=[dict(name="sketch", image="conditions/sketch.png", weight=1.0)], seed=303, reference="loop"),
]
CONDITIONS = {"control": "conditions/control.png", "init": "conditions/init.png", "sketch": "conditions/sketch.png"}


def _save(path: Path, value: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(value.numpy().astype(np.float32)))


@torch.no_grad()
def run_loop(pipe: StableDiffusionPipeline, adapter: T2IAdapter, case: dict, ip_image: Image.Image, out: Path) -> torch.Tensor:
    """StableDiffusionAdapterPipeline.__call__ with StableDiffusionPipeline's IP-Adapter embeds (module doc)."""
    do_cfg = case["guidance"] > 1.0
    g = torch.Generator().manual_seed(case["seed"])
    latents = torch.randn(1, pipe.unet.config.in_channels, case["height"] // 8, case["width"] // 8, generator=g)
    _save(out / "latents.npy", latents)
    positive, negative = pipe.encode_prompt(case["prompt"], "cpu", 1, do_cfg, case["negative_prompt"])
    embeds = torch.cat([negative, positive]) if do_cfg else positive
    image_embeds = pipe.prepare_ip_adapter_image_embeds(ip_image, None, "cpu", 1, do_cfg)
    (spec,) = case["adapters"]
    x = _preprocess_adapter_image(Image.open(out.parent.parent / spec["image"]), case["height"], case["width"])
    state = [v * spec["weight"] for v in adapter(x)]
    if do_cfg:
        state = [torch.cat([v] * 2, dim=0) for v in state]
    scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(case["steps"])
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        noise_pred = pipe.unet(
            model_input, t, encoder_hidden_states=embeds, added_cond_kwargs={"image_embeds": image_embeds},
            down_intrablock_additional_residuals=[s.clone() for s in state], return_dict=False,
        )[0]
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + case["guidance"] * (text - uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


@torch.no_grad()
def write_cases(pipe: DiffusionPipeline, out: Path, cases: list[dict] = CASES, adapter_dir: Path | None = None,
                controlnet_dir: Path | None = None) -> Path:
    """OUT/cases.json, OUT/conditions/*.png (when a case has conditions) and OUT/cases/NAME/*.npy;
    `pipe` (ip_adapter_fixtures.load_pipeline) has the IP-Adapter loaded and OUT/image.png is written.
    `adapter_dir` and `controlnet_dir` are the T2I-Adapter and ControlNet the combined cases use."""
    if any(c["adapters"] or c["controls"] or c["init_image"] for c in cases):
        synthetic = condition_images()
        for key, rel in CONDITIONS.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            synthetic[key].save(out / rel)
    ip_image = Image.open(out / "image.png")
    adapter = T2IAdapter.from_pretrained(str(adapter_dir)).eval() if adapter_dir else None
    controlnet = ControlNetModel.from_pretrained(str(controlnet_dir)).eval() if controlnet_dir else None
    entries = []
    for case in cases:
        cdir = out / "cases" / case["name"]
        call = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], ip_adapter_image=ip_image,
                    num_inference_steps=case["steps"], guidance_scale=case["guidance"], output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(case["seed"]))
        pipe.set_ip_adapter_scale(case["ip_scale"])
        entry = dict(case)
        if case["reference"] == "loop":
            latents = run_loop(pipe, adapter, case, ip_image, cdir)
            entry["latents"] = f"cases/{case['name']}/latents.npy"
            entry["pipeline"] = "StableDiffusionAdapterPipeline loop + StableDiffusionPipeline IP-Adapter embeds"
        elif case["controls"]:
            (control,) = case["controls"]
            cn = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
            latents = cn(image=Image.open(out / control["image"]), controlnet_conditioning_scale=control["scale"],
                         width=case["width"], height=case["height"], **call).images
            entry["pipeline"] = type(cn).__name__
        elif case["init_image"]:
            i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
            latents = i2i(image=Image.open(out / case["init_image"]).convert("RGB"), strength=case["strength"], **call).images
            entry["pipeline"] = type(i2i).__name__
        else:
            latents = pipe(width=case["width"], height=case["height"], **call).images
            entry["pipeline"] = type(pipe).__name__
        _save(cdir / "expected_latents.npy", latents)
        entry["expected_latents"] = f"cases/{case['name']}/expected_latents.npy"
        entries.append(entry)
    (out / "cases.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return out
