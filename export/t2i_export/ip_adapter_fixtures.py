"""Pipeline-level reference for an IP-Adapter set: what diffusers' `StableDiffusionPipeline` (or, for
an SDXL checkpoint, `StableDiffusionXLPipeline`) does with `load_ip_adapter` and an `ip_adapter_image`,
step by step, for the runtime's end-to-end parity.

Run from ``export/``::

    python -m t2i_export.ip_adapter_fixtures --model M --ip-adapter FILE --image-encoder DIR --out DIR

Writes ``image.png`` (condition_fixtures' deterministic 256x192 photo: non-square, so the resize and
the center crop both act), ``pixel_values.npy`` (diffusers' feature extractor on it),
``image_embeds.npy`` and ``negative_image_embeds.npy`` (`encode_image`), ``ip_tokens.npy``
([negative; positive] through the UNet's `encoder_hid_proj`), ``latents_init.npy`` and
``latents.npy`` (the pipeline's `output_type="latent"` result from those initial latents, the
checkpoint's own scheduler) and ``case.json`` (prompt, steps, guidance, scale, seed). Everything is
seeded: the same inputs and pinned versions write the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .condition_fixtures import photo

CASE = {"prompt": "a red house by the sea", "negative_prompt": "", "steps": 3, "guidance_scale": 7.5, "ip_scale": 0.6,
        "seed": 2024}


def load_pipeline(model_dir: Path, weights: Path, encoder_dir: Path) -> DiffusionPipeline:
    """The checkpoint's text-to-image pipeline (`StableDiffusionXLPipeline` when it has a second text
    encoder, else `StableDiffusionPipeline`) with the IP-Adapter loaded."""
    if (model_dir / "text_encoder_2").is_dir():
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=str(encoder_dir))
    return pipe


@torch.no_grad()
def write_fixtures(model_dir: Path, weights: Path, encoder_dir: Path, out: Path, case: dict = CASE) -> Path:
    pipe = load_pipeline(model_dir, weights, encoder_dir)
    pipe.set_ip_adapter_scale(case["ip_scale"])
    out.mkdir(parents=True, exist_ok=True)
    image = photo()
    image.save(out / "image.png")
    plus = type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ != "ImageProjection"
    pixel_values = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    embeds, negative = pipe.encode_image(pixel_values, "cpu", 1, output_hidden_states=plus)
    tokens = pipe.unet.encoder_hid_proj([torch.cat([negative, embeds])[:, None]])[0][:, 0]
    size = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(case["seed"])
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g)
    result = pipe(
        case["prompt"], negative_prompt=case["negative_prompt"], ip_adapter_image=image,
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], latents=latents.clone(), output_type="latent",
    ).images
    arrays = {"pixel_values": pixel_values, "image_embeds": embeds, "negative_image_embeds": negative, "ip_tokens": tokens,
              "latents_init": latents, "latents": result}
    for name, value in arrays.items():
        np.save(out / f"{name}.npy", value.numpy().astype(np.float32))
    meta = {**case, "kind": "plus" if plus else "plain", "pipeline": type(pipe).__name__,
            "scheduler": pipe.scheduler.config["_class_name"]}
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ip-adapter", type=Path, required=True)
    p.add_argument("--image-encoder", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wrote {write_fixtures(args.model, args.ip_adapter, args.image_encoder, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
