"""Parity fixtures for the runtime, computed by the diffusers/transformers modules (never by our ONNX).

Layout (all paths in cases.json are relative to the fixtures directory):

    tokenizer.json                 [{"prompt", "ids"}]: CLIPTokenizer(padding="max_length", max_length=77, truncation=True)
    graph_<graph>/in_<input>.npy   per graph: its inputs ...
    graph_<graph>/out_<output>.npy ... and the torch module's outputs (float32 / int64, C order)
    conditions/*.png               adapter condition images (sketch: mode "L"; color: RGB, not the output size);
                                   init.png (RGB) and mask.png ("L", white = repaint) for img2img / inpainting
    cases.json                     end-to-end cases (see `CASES`); width/height null: the default size
    cases/<name>/latents.npy       initial noise, exactly diffusers' `latents=` argument (before init_noise_sigma),
                                   drawn as torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                   with the case's "seed"; "latents": null (with "rng": "torch-cpu") for the
                                   `GENERATOR_CASES`, which pass the pipeline generator=torch.Generator("cpu")
                                   .manual_seed(seed) instead, as a user does: latents and step noise from it
    cases/<name>/expected_latents.npy   final latents (output_type="latent")
    cases/<name>/image_<k>.png     decoded images (reference.decode_images)
    cases/<name>/debug_*.npy       img2img / inpainting cases: what the run went through (`reference.Trace`);
                                   debug_time_ids.npy (SDXL, cases with size_cond): the UNet's time_ids [2n, 6]

Every input is drawn from a `torch.Generator` with the fixed seed written next to it below.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .adapter import AdapterGraph, feature_count
from .controlnet import ControlNetGraph, control_slots
from .controlnet import example_inputs as control_example
from .controlnet import io_spec as control_io
from .errors import ExportError
from .reference import Case, Oracle, decode_images, load_condition, pipeline_size, reference_pipeline_name, run, run_image
from .text_encoder import POOLED_OUTPUT, TextEncoderGraph
from .unet import UNetGraph, has_text_time, residual_slots
from .vae import VaeDecoderGraph, VaeEncoderGraph

TOKENIZER_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "Hello, world! It's a (beautiful) day: isn't it? [masterpiece]; {best-quality} #1 @home",
    "1234567890 3.14159 2024-01-01 100% x2 1e-5",
    "café naïve façade Ærøskøbing Ünïcödé — 東京タワー 夜景 🚀🌕 ✨ مرحبا Привет",
    "  lots   of\tspaces\n\nand\r\nnewlines  ",
    "AN UPPERCASE PROMPT With MiXeD CaSe",
    "",
    " ".join(["a very long prompt that keeps going"] * 12),  # > 77 tokens: truncated, EOS kept last
]

LONG_PROMPT = (
    "a highly detailed oil painting of a lighthouse on a rocky cliff at sunset, dramatic clouds, crashing waves, "
    "seagulls, warm golden light, volumetric fog, by a renaissance master, intricate brushwork, rich colors, "
    "museum quality, trending on an art site, 8k resolution, sharp focus, cinematic composition, award winning, "
    "masterpiece, best quality, extremely detailed background with boats and a small harbour town"
)

# (a)-(f): see export/README.md. Seeds are for the initial noise.
CASES = [
    dict(
        name="a_ddim_two_adapters_tau05",
        prompt="a red house on a green hill, oil painting",
        negative_prompt="blurry, low quality",
        adapters=[("sketch", 1.0), ("color", 1.2)],
        cond_tau=0.5,
        steps=6,
        guidance=7.5,
        scheduler="ddim",
        width=64,
        height=64,
        n_samples=1,
        seed=101,
        reference="loop",
    ),
    dict(
        name="b_euler_two_adapters_tau05",
        prompt="a red house on a green hill, oil painting",
        negative_prompt="blurry, low quality",
        adapters=[("sketch", 1.0), ("color", 1.2)],
        cond_tau=0.5,
        steps=6,
        guidance=7.5,
        scheduler="euler",
        width=64,
        height=64,
        n_samples=1,
        seed=102,
        reference="loop",
    ),
    dict(
        name="c_ddim_sketch_pipeline",
        prompt="a cat sitting on a chair",
        negative_prompt=None,
        adapters=[("sketch", 0.8)],
        cond_tau=1.0,
        steps=6,
        guidance=7.5,
        scheduler="ddim",
        width=128,
        height=64,
        n_samples=1,
        seed=103,
        reference="pipeline",
    ),
    dict(
        name="d_euler_multi_adapter_pipeline",
        prompt=LONG_PROMPT,
        negative_prompt="ugly, deformed",
        adapters=[("sketch", 1.0), ("color", 1.2)],
        cond_tau=1.0,
        steps=6,
        guidance=7.5,
        scheduler="euler",
        width=64,
        height=64,
        n_samples=1,
        seed=104,
        reference="pipeline",
    ),
    dict(
        name="e_ddim_no_adapter_two_samples",
        prompt="a bowl of fruit on a wooden table",
        negative_prompt=None,
        adapters=[],
        cond_tau=1.0,
        steps=6,
        guidance=7.5,
        scheduler="ddim",
        width=128,
        height=64,
        n_samples=2,
        seed=105,
        reference="pipeline",
    ),
    dict(
        name="f_euler_sketch_no_cfg",
        prompt="a mountain landscape",
        negative_prompt=None,
        adapters=[("sketch", 1.0)],
        cond_tau=1.0,
        steps=6,
        guidance=1.0,
        scheduler="euler",
        width=64,
        height=64,
        n_samples=1,
        seed=106,
        reference="pipeline",
    ),
]

# (g)-(q): every deterministic sampler through diffusers' own pipeline, plus Heun (two model calls
# per step) with cond_tau, request scheduler options, guidance_rescale and PNDM's Runge-Kutta warm-up.
SAMPLER_CASES = [
    dict(name=f"{tag}_{kind.replace('-', '_')}_sketch_pipeline", prompt="a lighthouse by the sea",
         negative_prompt="blurry", adapters=[("sketch", 1.0)], cond_tau=1.0, steps=6, guidance=7.5,
         scheduler=kind, width=64, height=64, n_samples=1, seed=seed, reference="pipeline")
    for tag, kind, seed in [("g", "pndm", 107), ("h", "heun", 108), ("i", "lms", 109), ("j", "dpmpp-2m", 110),
                            ("k", "dpmpp-2m-karras", 111), ("l", "unipc", 112)]
] + [
    dict(name="m_dpmpp_2m_two_adapters_pipeline", prompt="a red house on a green hill, oil painting",
         negative_prompt=None, adapters=[("sketch", 1.0), ("color", 0.8)], cond_tau=1.0, steps=8, guidance=5.0,
         scheduler="dpmpp-2m", width=64, height=64, n_samples=1, seed=113, reference="pipeline"),
    dict(name="n_heun_two_adapters_tau05", prompt="a red house on a green hill, oil painting",
         negative_prompt="blurry, low quality", adapters=[("sketch", 1.0), ("color", 1.2)], cond_tau=0.5, steps=5,
         guidance=7.5, scheduler="heun", width=64, height=64, n_samples=1, seed=114, reference="loop"),
    dict(name="o_euler_karras_trailing_options", prompt="a mountain landscape", negative_prompt=None,
         adapters=[("sketch", 1.0)], cond_tau=1.0, steps=6, guidance=7.5, scheduler="euler", width=64, height=64,
         n_samples=1, seed=115, reference="pipeline",
         scheduler_options={"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    dict(name="p_ddim_zero_snr_vpred_guidance_rescale", prompt="a bowl of fruit on a wooden table",
         negative_prompt=None, adapters=[], cond_tau=1.0, steps=6, guidance=7.5, scheduler="ddim", width=64,
         height=64, n_samples=2, seed=116, reference="pipeline", guidance_rescale=0.7,
         scheduler_options={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                            "prediction_type": "v_prediction"}),
    # (g) with the Runge-Kutta warm-up: 3 steps of 4 model calls, then PLMS (6 steps: 15 calls).
    dict(name="q_pndm_prk_sketch_pipeline", prompt="a lighthouse by the sea", negative_prompt="blurry",
         adapters=[("sketch", 1.0)], cond_tau=1.0, steps=6, guidance=7.5, scheduler="pndm-prk", width=64,
         height=64, n_samples=1, seed=117, reference="pipeline"),
]

# SD 2.x: v-prediction (the tiny set's scheduler config, like SD 2.1's), with the seg adapter.
# Case (c) is SD 2.1 768-v's default size: no width/height (null in cases.json), so the runtime takes
# the manifest's default_size (the tiny UNet's sample_size 96 × 8 = 768) and diffusers' adapter
# pipeline its condition image's size, a 768x768 flat-colour map (`_make_case` checks they agree).
# 2 steps keep its fixtures small and its run short.
SD2_CASES = [
    dict(
        name="a_sd2_ddim_vpred_seg_pipeline",
        prompt="a red house on a green hill, oil painting",
        negative_prompt="blurry, low quality",
        adapters=[("seg", 1.0)],
        cond_tau=1.0,
        steps=6,
        guidance=7.5,
        scheduler="ddim",
        width=128,
        height=64,
        n_samples=1,
        seed=301,
        reference="pipeline",
    ),
    dict(
        name="b_sd2_euler_vpred_seg_pipeline",
        prompt="a cat sitting on a chair",
        negative_prompt=None,
        adapters=[("seg", 0.8)],
        cond_tau=1.0,
        steps=6,
        guidance=7.5,
        scheduler="euler",
        width=64,
        height=64,
        n_samples=1,
        seed=302,
        reference="pipeline",
    ),
    dict(
        name="c_sd2_ddim_vpred_seg_default_768",
        prompt="a lighthouse by the sea",
        negative_prompt="blurry",
        adapters=[("seg", 1.0, "seg_768")],  # (adapter, weight, condition if not the adapter's own)
        cond_tau=1.0,
        steps=2,
        guidance=7.5,
        scheduler="ddim",
        width=None,
        height=None,
        n_samples=1,
        seed=303,
        reference="pipeline",
    ),
]

# SDXL: StableDiffusionXLAdapterPipeline itself for every case (it has adapter_conditioning_factor).
SDXL_CASES = [
    dict(
        name="a_sdxl_euler_canny_pipeline",
        prompt="a red house on a green hill, oil painting",
        negative_prompt=None,  # force_zeros_for_empty_prompt: zero embeddings for the unconditional half
        adapters=[("canny", 0.9)],
        cond_tau=1.0,
        steps=6,
        guidance=5.0,
        scheduler="euler",
        width=96,
        height=64,
        n_samples=1,
        seed=401,
        reference="pipeline",
    ),
    dict(
        name="b_sdxl_ddim_two_adapters_tau05",
        prompt=LONG_PROMPT,
        negative_prompt="blurry, low quality",
        adapters=[("canny", 1.0), ("depth", 0.8)],
        cond_tau=0.5,
        steps=6,
        guidance=7.0,
        scheduler="ddim",
        width=64,
        height=64,
        n_samples=2,
        seed=402,
        reference="pipeline",
        size_cond=dict(
            original_size=(128, 96),
            crops_coords_top_left=(8, 4),
            target_size=(64, 64),
            negative_original_size=(32, 32),
            negative_target_size=(64, 64),
        ),
    ),
]

# (r)-(v): no latents: diffusers' pipeline draws them, then every stochastic sampler's step noise,
# from generator=torch.Generator("cpu").manual_seed(seed), so the runtime must reproduce torch's CPU
# generator (`--rng torch-cpu`), not only the samplers' arithmetic. One case per stochastic sampler;
# two samples in one draw for DPM++ 2M SDE; DDIM with eta > 0.
GENERATOR_CASES = [
    dict(name=f"{tag}_{kind.replace('-', '_')}_generator_pipeline", prompt="a lighthouse by the sea",
         negative_prompt="blurry", adapters=adapters, cond_tau=1.0, steps=steps, guidance=7.5, scheduler=kind,
         width=64, height=64, n_samples=n, seed=seed, reference="pipeline", generator=True, eta=eta)
    for tag, kind, adapters, steps, n, seed, eta in [
        ("r", "euler-a", [("sketch", 1.0)], 6, 1, 118, 0.0),
        ("s", "dpmpp-2m-sde", [("sketch", 1.0)], 6, 2, 119, 0.0),
        ("t", "lcm", [("sketch", 0.8)], 4, 1, 120, 0.0),
        ("u", "ddpm", [("color", 1.0)], 6, 1, 121, 0.0),
        ("v", "ddim", [("sketch", 1.0), ("color", 0.8)], 6, 1, 122, 0.7),
    ]
]

# img2img and inpainting: diffusers' own pipelines, drawing everything (posterior samples, noise, step
# noise) from generator=torch.Generator("cpu").manual_seed(seed) as the generator cases do. The init
# image and mask are the output size (64x64: conditions/init.png, conditions/mask.png), so diffusers'
# resize is the identity. "init_image"/"mask" name `condition_images` entries.
_IMAGE_CASE = dict(negative_prompt="blurry, low quality", adapters=[], cond_tau=1.0, guidance=7.5, width=64, height=64,
                   n_samples=1, reference="pipeline", generator=True, init_image="init")
SD1_IMAGE_CASES = [
    # StableDiffusionImg2ImgPipeline, the set's own scheduler (PNDM, PLMS), default strength 0.8
    dict(_IMAGE_CASE, name="w_img2img_pndm_pipeline", prompt="a red house on a green hill, oil painting",
         steps=6, scheduler="pndm", strength=0.8, seed=123),
    # two images from one encoded init image: one posterior draw [1, ...], then noise [2, ...]
    dict(_IMAGE_CASE, name="x_img2img_euler_two_samples_pipeline", prompt="a lighthouse by the sea", steps=5,
         scheduler="euler", strength=0.6, n_samples=2, seed=124),
    # img2img + T2I-Adapter: no diffusers pipeline does both, so `reference.run_img2img_loop`
    dict(_IMAGE_CASE, name="y_img2img_ddim_sketch_loop", prompt="a cat sitting on a chair", adapters=[("sketch", 1.0)],
         steps=6, scheduler="ddim", strength=0.7, seed=125, reference="loop"),
    # StableDiffusionInpaintPipeline with the 4-channel UNet: diffusers blends the re-noised init latents
    # outside the mask after every step
    dict(_IMAGE_CASE, name="z_inpaint_ddim_pipeline", prompt="a bowl of fruit on a wooden table", steps=6,
         scheduler="ddim", strength=1.0, mask="mask", seed=126),
    dict(_IMAGE_CASE, name="z2_inpaint_euler_strength075_pipeline", prompt="a bowl of fruit on a wooden table",
         steps=6, scheduler="euler", strength=0.75, mask="mask", seed=127),
]
SDXL_IMAGE_CASES = [
    # StableDiffusionXLImg2ImgPipeline (its default strength is 0.3: given), requires_aesthetics_score false
    dict(_IMAGE_CASE, name="c_sdxl_img2img_euler_pipeline", prompt="a red house on a green hill, oil painting",
         steps=6, scheduler="euler", strength=0.5, seed=403),
    # StableDiffusionXLInpaintPipeline with the 4-channel UNet (its default strength is 0.9999: given)
    dict(_IMAGE_CASE, name="d_sdxl_inpaint_euler_strength08_pipeline", prompt="a bowl of fruit on a wooden table",
         steps=5, scheduler="euler", strength=0.8, mask="mask", seed=404),
    # StableDiffusionXLImg2ImgPipeline with explicit size conditioning and two images. Its time ids are
    # not the adapter pipeline's: [negative x n; positive x n] (not [negative, positive] x n), and the
    # negative row takes the *positive* crops_coords_top_left (_get_add_time_ids without aesthetic
    # score), so negative_crops_coords_top_left is given, and ignored, to show that. The time ids fed to
    # the UNet are written as debug_time_ids.
    dict(_IMAGE_CASE, name="e_sdxl_img2img_euler_size_cond_two_samples_pipeline", prompt="a lighthouse by the sea",
         steps=5, scheduler="euler", strength=0.6, n_samples=2, seed=405,
         size_cond=dict(
             original_size=(96, 64),
             crops_coords_top_left=(8, 16),
             target_size=(64, 64),
             negative_original_size=(48, 32),
             negative_crops_coords_top_left=(4, 4),
             negative_target_size=(32, 32),
         )),
]
# tiny-sd1-inpaint's 9-channel UNet: StableDiffusionInpaintPipeline concatenates [latents, mask,
# masked_image_latents]. (a) strength 1: pure noise, the init image is not encoded; (b) strength < 1 and
# two images: init image encoded, then noise, then the masked image.
SD1_INPAINT_CASES = [
    dict(_IMAGE_CASE, name="a_inpaint9_euler_pipeline", prompt="a bowl of fruit on a wooden table", steps=6,
         scheduler="euler", strength=1.0, mask="mask", seed=501),
    dict(_IMAGE_CASE, name="b_inpaint9_ddim_strength06_two_samples_pipeline", prompt="a lighthouse by the sea",
         steps=5, scheduler="ddim", strength=0.6, n_samples=2, mask="mask", seed=502),
]

# ControlNet (tiny-sd1's "canny", `tiny.build_controlnet`): StableDiffusionControlNetPipeline for one
# ControlNet, for two (MultiControlNetModel: the same net on two images, summed) with
# control_guidance_start/end under Heun (whose two calls per step count separately), and in guess mode;
# with a T2I-Adapter through the loop (`reference._denoise`: no diffusers pipeline runs both);
# StableDiffusionControlNetImg2ImgPipeline; no size given (the control image's, 128x64), two
# images, a stochastic sampler and every draw from the seed; StableDiffusionControlNetInpaintPipeline.
# "controls" entries are (name, scale, condition image key).
_CONTROL_CASE = dict(negative_prompt="blurry, low quality", adapters=[], cond_tau=1.0, guidance=7.5, width=64, height=64,
                     n_samples=1, reference="pipeline")
SD1_CONTROL_CASES = [
    dict(_CONTROL_CASE, name="ca_controlnet_euler_pipeline", prompt="a red house on a green hill, oil painting",
         controls=[("canny", 1.0, "control")], steps=6, scheduler="euler", seed=131),
    dict(_CONTROL_CASE, name="cb_multi_controlnet_heun_start_end_pipeline", prompt="a lighthouse by the sea",
         controls=[("canny", 1.0, "control"), ("canny", 0.6, "color")], control_start=0.2, control_end=0.8, steps=4,
         scheduler="heun", seed=132),
    dict(_CONTROL_CASE, name="cc_controlnet_guess_mode_dpmpp_2m_pipeline", prompt="a cat sitting on a chair",
         controls=[("canny", 0.8, "control")], guess_mode=True, steps=6, guidance=5.0, scheduler="dpmpp-2m", seed=133),
    dict(_CONTROL_CASE, name="cd_controlnet_sketch_adapter_ddim_loop", prompt="a bowl of fruit on a wooden table",
         adapters=[("sketch", 1.0)], controls=[("canny", 0.7, "control")], control_end=0.5, steps=6, scheduler="ddim",
         seed=134, reference="loop"),
    dict(_CONTROL_CASE, name="ce_controlnet_img2img_ddim_pipeline", prompt="a red house on a green hill, oil painting",
         controls=[("canny", 1.0, "control")], steps=6, scheduler="ddim", strength=0.7, init_image="init",
         generator=True, seed=135),
    dict(_CONTROL_CASE, name="cf_controlnet_default_size_euler_a_generator_pipeline", prompt="a mountain landscape",
         negative_prompt=None, controls=[("canny", 0.9, "control")], width=None, height=None, n_samples=2, steps=5,
         scheduler="euler-a", generator=True, seed=136),
    # StableDiffusionControlNetInpaintPipeline with the 4-channel UNet: the kept area blended back
    dict(_CONTROL_CASE, name="cg_controlnet_inpaint_euler_strength075_pipeline", prompt="a bowl of fruit on a wooden table",
         controls=[("canny", 0.8, "control")], steps=6, scheduler="euler", strength=0.75, init_image="init", mask="mask",
         generator=True, seed=137),
]

# SDXL: StableDiffusionXLControlNetPipeline with tiny-sdxl's "edges" ControlNet (it also takes
# text_embeds and time_ids): plain with the zero negative embeddings, and guess mode with a negative
# prompt and size conditioning (the ControlNet then sees the conditional half of both).
SDXL_CONTROL_CASES = [
    dict(_CONTROL_CASE, name="f_sdxl_controlnet_euler_pipeline", prompt="a red house on a green hill, oil painting",
         negative_prompt=None, controls=[("edges", 0.9, "control")], steps=6, guidance=5.0, scheduler="euler", seed=406),
    dict(_CONTROL_CASE, name="g_sdxl_controlnet_guess_mode_ddim_size_cond_pipeline", prompt="a lighthouse by the sea",
         controls=[("edges", 1.0, "control")], guess_mode=True, steps=5, guidance=6.0, scheduler="ddim", seed=407,
         size_cond=dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 64),
                        negative_original_size=(32, 32), negative_target_size=(64, 64))),
]

# The generator cases need torch's AVX2 normal_ kernel (what the runtime's torch-cpu reproduces).
TORCH_CPU_CAPABILITIES = ("AVX2", "AVX512")

CASES_BY_FAMILY = {
    "sd1": CASES + SAMPLER_CASES + GENERATOR_CASES + SD1_IMAGE_CASES + SD1_CONTROL_CASES,
    "sd2": SD2_CASES,
    "sdxl": SDXL_CASES + SDXL_IMAGE_CASES + SDXL_CONTROL_CASES,
    "sd1-inpaint": SD1_INPAINT_CASES,
}

CONDITIONS = {"sketch": "conditions/sketch.png", "color": "conditions/color.png"}
# Which synthetic image (see `condition_images`) each family's conditions are (keyed by adapter name, or
# by the name a case gives), and where each is saved.
IMAGE_CONDITIONS = {"init": ("init", "conditions/init.png"), "mask": ("mask", "conditions/mask.png")}
CONDITIONS_BY_FAMILY = {
    "sd1": {"sketch": ("sketch", CONDITIONS["sketch"]), "color": ("color", CONDITIONS["color"]), **IMAGE_CONDITIONS,
            "control": ("control", "conditions/control.png")},
    "sd2": {  # colour-coded region maps, like a segmentation
        "seg": ("color", "conditions/seg.png"),
        "seg_768": ("seg_768", "conditions/seg_768.png"),
    },
    "sdxl": {"canny": ("sketch", "conditions/canny.png"), "depth": ("color", "conditions/depth.png"), **IMAGE_CONDITIONS,
             "control": ("control", "conditions/control.png")},
    "sd1-inpaint": IMAGE_CONDITIONS,
}


def condition_images() -> dict[str, Image.Image]:
    """Deterministic synthetic conditions: a white-on-black line drawing ("L", 64x64, the output size of
    most cases), a coarse colour grid (RGB, 80x96: never the output size, so Lanczos resizing runs) and
    a 768x768 segmentation-like map of flat colours (a few KB as PNG)."""
    sketch = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(sketch)
    d.ellipse((12, 10, 52, 50), outline=255, width=3)
    d.line((4, 58, 60, 6), fill=255, width=2)
    d.rectangle((20, 40, 44, 60), outline=200, width=2)
    g = torch.Generator().manual_seed(7)
    cells = torch.randint(0, 256, (6, 5, 3), generator=g, dtype=torch.int64).numpy().astype(np.uint8)
    color = Image.fromarray(np.kron(cells, np.ones((16, 16, 1), dtype=np.uint8)), "RGB")  # 96 high, 80 wide
    seg = Image.new("RGB", (768, 768), (6, 230, 230))  # sky
    d = ImageDraw.Draw(seg)
    d.polygon([(0, 500), (260, 470), (520, 510), (768, 480), (768, 768), (0, 768)], fill=(9, 7, 230))  # sea
    d.polygon([(300, 560), (360, 430), (520, 420), (600, 540), (560, 600), (330, 610)], fill=(255, 41, 10))  # rock
    d.polygon([(410, 440), (430, 180), (490, 180), (510, 440)], fill=(255, 255, 255))  # lighthouse
    d.rectangle((420, 130, 500, 180), fill=(255, 204, 0))  # lamp
    return {"sketch": sketch, "color": color, "seg_768": seg, "init": init_image(), "mask": inpaint_mask(),
            "control": control_image()}


def control_image() -> Image.Image:
    """The ControlNet condition: RGB 128x64 (not 64x64, so that Lanczos resizing runs; and a valid tiny-sd1
    size, which cases without a size take), coloured edges on black, no two channels alike."""
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    d = ImageDraw.Draw(image)
    d.ellipse((20, 8, 76, 56), outline=(255, 255, 255), width=3)
    d.line((4, 60, 124, 4), fill=(255, 64, 0), width=2)
    d.rectangle((84, 20, 120, 52), outline=(0, 200, 255), width=2)
    return image


def init_image() -> Image.Image:
    """The img2img / inpainting init image: RGB 64x64, a red-green gradient with shapes placed so that
    no flip or transpose maps it onto itself."""
    y, x = np.mgrid[0:64, 0:64]
    px = np.stack([x * 4, y * 4, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image = Image.fromarray(px, "RGB")
    d = ImageDraw.Draw(image)
    d.ellipse((10, 8, 40, 34), fill=(250, 150, 30))
    d.rectangle((36, 38, 58, 60), fill=(20, 30, 120))
    d.line((2, 62, 30, 44), fill=(255, 255, 255), width=2)
    return image


def inpaint_mask() -> Image.Image:
    """The inpainting mask: "L" 64x64, white = repaint. An ellipse whose edges cut 8x8 blocks (the
    latent mask samples each block's top-left pixel: torch's nearest interpolation), and two patches at
    the binarisation threshold: 128 (>= 0.5 after /255: repaint) and 127 (keep)."""
    mask = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(mask)
    d.ellipse((20, 13, 53, 45), fill=255)
    d.rectangle((2, 50, 17, 61), fill=128)
    d.rectangle((44, 50, 61, 61), fill=127)
    return mask


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(array))


def _save_graph(dir_: Path, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    for k, v in inputs.items():
        _save_npy(dir_ / f"in_{k}.npy", v.numpy())
    for k, v in outputs.items():
        _save_npy(dir_ / f"out_{k}.npy", v.numpy())


def tokenizer_fixture(oracle: Oracle, tokenizer=None) -> list[dict]:
    tok = tokenizer or oracle.tokenizer
    out = []
    for p in TOKENIZER_PROMPTS:
        ids = tok(p, padding="max_length", max_length=77, truncation=True).input_ids
        out.append({"prompt": p, "ids": [int(i) for i in ids]})
    return out


def tokenizer_fixture_file(encoder_name: str) -> str:
    """`tokenizer.json` for `text_encoder`, `tokenizer_2.json` for `text_encoder_2`."""
    return encoder_name.replace("text_encoder", "tokenizer") + ".json"


@torch.no_grad()
def graph_fixtures(oracle: Oracle, root: Path) -> None:
    """Per graph: non-trivial inputs at a non-square size (image 64x128 = latent 8x16) and the torch outputs."""
    hiddens, pooled = [], None
    for name, tok, model, use in oracle.encoders():
        ids = tok(TOKENIZER_PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = TextEncoderGraph(model, use)(ids)
        outs = {use.hidden_output: out[0]} if use.pooled else {use.hidden_output: out}
        if use.pooled:
            pooled = outs[POOLED_OUTPUT] = out[1]
        hiddens.append(outs[use.hidden_output])
        _save_graph(root / f"graph_{name}", {"input_ids": ids}, outs)
    hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens, dim=-1)

    g = torch.Generator().manual_seed(201)
    features = max((feature_count(a, 64) for a in oracle.adapters.values()), default=0)
    slots = residual_slots(oracle.unet.config, features)
    h, w = 8, 16
    unet_in = {
        "sample": torch.randn(2, oracle.unet.config.in_channels, h, w, generator=g),
        # one integer (DDIM-like) and one fractional (Euler-like) timestep
        "timestep": torch.tensor([801.0, 17.25]),
        "encoder_hidden_states": hidden,
    }
    if has_text_time(oracle.unet.config):
        unet_in["text_embeds"] = pooled
        unet_in["time_ids"] = torch.tensor([[64.0, 128.0, 0.0, 0.0, 64.0, 128.0], [1024.0, 768.0, 16.0, 8.0, 512.0, 640.0]])
    cslots = control_slots(oracle.unet.config) if oracle.controlnets else []
    for s in [*slots, *cslots]:
        unet_in[s.input] = torch.randn(2, s.channels, h // s.downscale, w // s.downscale, generator=g)
    noise_pred = UNetGraph(oracle.unet, len(cslots))(*[unet_in[k].clone() for k in unet_in])
    _save_graph(root / "graph_unet", unet_in, {"noise_pred": noise_pred})

    g = torch.Generator().manual_seed(202)
    latent = torch.randn(2, oracle.vae.config.latent_channels, h, w, generator=g) * 5.0
    image = VaeDecoderGraph(oracle.vae)(latent)
    _save_graph(root / "graph_vae_decoder", {"latent_sample": latent}, {"image": image})

    # Half the decoder's sides (image 32x64, latent 4x8): at 64x128 the input alone would be 197 KB per family.
    g = torch.Generator().manual_seed(210)
    image = torch.rand(2, oracle.vae.config.in_channels, 4 * h, 4 * w, generator=g) * 2 - 1  # the runtime's [-1, 1]
    mean, std = VaeEncoderGraph(oracle.vae)(image)
    _save_graph(root / "graph_vae_encoder", {"image": image}, {"latent_mean": mean, "latent_std": std})

    # Latent 4x8 (image 32x64): the condition at 64x128 would be 197 KB.
    for seed, (name, controlnet) in enumerate(sorted(oracle.controlnets.items()), start=211):
        args = control_example(controlnet, oracle.unet.config, cslots, (h // 2, w // 2), seed=seed, seq_len=hidden.shape[1],
                               vae_downscale=8)
        names = [io.name for io in control_io(controlnet, oracle.unet.config, cslots, hidden.shape[1])[0]]
        inputs = dict(zip(names, args))
        inputs["encoder_hidden_states"] = hidden  # the text encoder's, as the UNet's
        if has_text_time(oracle.unet.config):
            inputs["text_embeds"] = pooled
        outs = ControlNetGraph(controlnet, has_text_time(oracle.unet.config))(*inputs.values())
        _save_graph(root / f"graph_controlnet_{name}", inputs, {s.input: o for s, o in zip(cslots, outs)})

    for seed, (name, adapter) in enumerate(sorted(oracle.adapters.items()), start=203):
        g = torch.Generator().manual_seed(seed)
        cond = torch.rand(2, adapter.config.in_channels, 8 * h, 8 * w, generator=g)
        feats = AdapterGraph(adapter)(cond)
        _save_graph(root / f"graph_adapter_{name}", {"condition": cond}, {f"feature_{i}": f for i, f in enumerate(feats)})


def _adapter_specs(spec: dict) -> list[tuple[str, float, str]]:
    """(adapter, weight, condition image key) per adapter of a case; the key defaults to the adapter's name."""
    return [(a[0], a[1], a[2] if len(a) > 2 else a[0]) for a in spec["adapters"]]


def _make_case(spec: dict, images: dict[str, Image.Image], oracle: Oracle) -> Case:
    adapters = [{"name": n, "image": images[c], "weight": w} for n, w, c in _adapter_specs(spec)]
    controls = [{"name": n, "image": images[c], "scale": w} for n, w, c in spec.get("controls", [])]
    width, height = pipeline_size(oracle, adapters, spec["width"], spec["height"], controls)
    for given, got, default in zip((spec["width"], spec["height"]), (width, height), oracle.default_size):
        if given is None and got != default and not controls:  # the runtime takes a control image's size too
            raise ValueError(
                f"case {spec['name']}: diffusers would pick {width}x{height} (from its condition image) where the "
                f"runtime takes the manifest's default_size {list(oracle.default_size)}: give the size"
            )
    shape = (spec["n_samples"], oracle.vae.config.latent_channels, height // 8, width // 8)
    if spec.get("generator"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in TORCH_CPU_CAPABILITIES:
            raise ExportError(
                f"case {spec['name']}: torch runs CPU capability {capability}, whose normal_ kernel rounds otherwise "
                f"than the {'/'.join(TORCH_CPU_CAPABILITIES)} one --rng torch-cpu matches; write fixtures on a CPU with AVX2"
            )
        latents = None
    else:
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(spec["seed"]))
    return Case(
        name=spec["name"],
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        adapters=adapters,
        cond_tau=spec["cond_tau"],
        steps=spec["steps"],
        guidance=spec["guidance"],
        scheduler=spec["scheduler"],
        width=spec["width"],
        height=spec["height"],
        n_samples=spec["n_samples"],
        latents=latents,
        reference=spec["reference"],
        scheduler_options=spec.get("scheduler_options", {}),
        guidance_rescale=spec.get("guidance_rescale", 0.0),
        size_cond=dict(spec.get("size_cond", {})),
        seed=spec["seed"],
        eta=spec.get("eta", 0.0),
        init_image=images[spec["init_image"]] if "init_image" in spec else None,
        mask=images[spec["mask"]] if "mask" in spec else None,
        strength=spec.get("strength"),
        controls=controls,
        control_start=spec.get("control_start", 0.0),
        control_end=spec.get("control_end", 1.0),
        guess_mode=spec.get("guess_mode", False),
    )


def case_fixtures(oracle: Oracle, root: Path, family: str = "sd1") -> list[dict]:
    conditions = CONDITIONS_BY_FAMILY[family]
    synthetic = condition_images()
    for source, rel in conditions.values():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic[source].save(path)
    # Cases read the PNGs back, as the runtime will.
    images = {n: load_condition(root / rel) for n, (_, rel) in conditions.items()}
    entries = []
    for spec in CASES_BY_FAMILY[family]:
        case = _make_case(spec, images, oracle)
        trace = None
        if case.init_image is not None:
            latents, timesteps, trace = run_image(oracle, case)
        else:
            latents, timesteps = run(oracle, case)
        pixels = decode_images(oracle, latents)
        cdir = Path("cases") / case.name
        if case.latents is not None:
            _save_npy(root / cdir / "latents.npy", case.latents.numpy())
        _save_npy(root / cdir / "expected_latents.npy", latents.numpy())
        image_keys, debug_keys = {}, {}
        if trace is not None:
            image_keys = {
                "init_image": conditions[spec["init_image"]][1],
                **({"mask": conditions[spec["mask"]][1]} if case.mask is not None else {}),
                "strength": case.strength,
            }
            debug = {"image_latents": trace.image_latents, "initial_latents": trace.initial_latents}
            if case.mask is not None:
                debug.update(masked_image_latents=trace.masked_image_latents, latent_mask=trace.latent_mask)
            if case.size_cond:  # only these cases have it, so the earlier cases' entries stay as they were
                debug.update(time_ids=trace.time_ids)
            for key, value in debug.items():
                rel = None
                if value is not None:
                    rel = (cdir / f"debug_{key}.npy").as_posix()
                    _save_npy(root / rel, value.numpy())
                debug_keys[f"debug_{key}"] = rel
            debug_keys["diffusers_pipeline"] = reference_pipeline_name(oracle, case)
        pngs = []
        for k, px in enumerate(pixels):
            rel = (cdir / f"image_{k}.png").as_posix()
            Image.fromarray(px, "RGB").save(root / rel)
            pngs.append(rel)
        scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
        extra = {}
        if case.scheduler_options:
            extra["scheduler_options"] = case.scheduler_options
        if case.guidance_rescale:
            extra["guidance_rescale"] = case.guidance_rescale
        if case.eta:
            extra["eta"] = case.eta
        entries.append(
            {
                "name": case.name,
                "prompt": case.prompt,
                "negative_prompt": case.negative_prompt,
                "adapters": [{"name": n, "image": conditions[c][1], "weight": w} for n, w, c in _adapter_specs(spec)],
                "cond_tau": case.cond_tau,
                "steps": case.steps,
                "guidance": case.guidance,
                "scheduler": case.scheduler,
                "width": case.width,
                "height": case.height,
                "n_samples": case.n_samples,
                **image_keys,
                "latents": None if case.latents is None else (cdir / "latents.npy").as_posix(),
                "seed": case.seed,
                **({"rng": "torch-cpu"} if case.latents is None else {}),
                "expected_latents": (cdir / "expected_latents.npy").as_posix(),
                "expected_images": pngs,
                **debug_keys,
                "reference": case.reference,
                **extra,
                **({"size_cond": {k: list(v) for k, v in case.size_cond.items()}} if case.size_cond else {}),
                **(_control_entry(spec, case, conditions) if case.controls else {}),
                # informational, for debugging a runtime scheduler:
                "timesteps": timesteps,
                **({"loop_timesteps": trace.loop_timesteps} if trace is not None else {}),
                "init_noise_sigma": float(scheduler.init_noise_sigma),
                # (non-finite floats as strings: JSON has no -Infinity)
                "scheduler_config": {
                    k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in scheduler.config.items()
                    if not k.startswith("_")
                },
            }
        )
    return entries


def _control_entry(spec: dict, case: Case, conditions: dict) -> dict:
    """A ControlNet case's keys in cases.json (other cases have none of them)."""
    return {
        "controls": [{"name": n, "image": conditions[c][1], "scale": w} for n, w, c in spec["controls"]],
        "control_start": case.control_start,
        "control_end": case.control_end,
        "guess_mode": case.guess_mode,
    }


def write_fixtures(oracle: Oracle, out_dir: Path, family: str = "sd1") -> Path:
    """Build the fixture directory next to `out_dir` and swap it in when complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, tok, _, _ in oracle.encoders():
            rows = [json.dumps(r, ensure_ascii=False) for r in tokenizer_fixture(oracle, tok)]
            (tmp / tokenizer_fixture_file(name)).write_text("[\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")
        graph_fixtures(oracle, tmp)
        cases = case_fixtures(oracle, tmp, family)
        (tmp / "cases.json").write_text(json.dumps(cases, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
