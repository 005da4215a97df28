"""The parity oracle: diffusers' own pipelines, plus the "loop" reference for `cond_tau` < 1.

SDXL sets are checked against `StableDiffusionXLAdapterPipeline` itself (it has
`adapter_conditioning_factor`); SD 2.x sets against `StableDiffusionAdapterPipeline` like SD 1.x.

`run_loop` is StableDiffusionAdapterPipeline.__call__ (diffusers
pipelines/t2i_adapter/pipeline_stable_diffusion_adapter.py) written out step by step, with one
change taken from StableDiffusionXLAdapterPipeline (`adapter_conditioning_factor`): the adapter
residuals are passed only for steps `i < int(steps * cond_tau)`. With `cond_tau = 1` it equals the
pipeline bit for bit (tests/test_reference.py).
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    MultiAdapter,
    MultiControlNetModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .text_encoder import EncoderUse

from .scheduler_traces import CLASSES as SCHEDULERS
from .scheduler_traces import PRESETS


@dataclass
class Oracle:
    """The diffusers/transformers modules a graph set was exported from."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    adapters: dict[str, T2IAdapter] = field(default_factory=dict)
    controlnets: dict[str, ControlNetModel] = field(default_factory=dict)
    # SDXL only
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    def encoders(self) -> list[tuple[str, CLIPTokenizer, CLIPTextModel, EncoderUse]]:
        """(graph name, tokenizer, model, outputs used), as the exporter names them."""
        if not self.xl:
            return [("text_encoder", self.tokenizer, self.text_encoder, EncoderUse("last", False))]
        return [
            ("text_encoder", self.tokenizer, self.text_encoder, EncoderUse("penultimate", False)),
            ("text_encoder_2", self.tokenizer_2, self.text_encoder_2, EncoderUse("penultimate", True)),
        ]

    @classmethod
    def load(cls, model_dir: Path, adapter_dirs: dict[str, Path], controlnet_dirs: dict[str, Path] | None = None) -> "Oracle":
        adapters = {n: T2IAdapter.from_pretrained(str(p)).eval() for n, p in adapter_dirs.items()}
        controlnets = {n: ControlNetModel.from_pretrained(str(p)).eval() for n, p in (controlnet_dirs or {}).items()}
        index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
        if index.get("text_encoder_2"):
            pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
            return cls(
                tokenizer=pipe.tokenizer,
                text_encoder=pipe.text_encoder.eval(),
                unet=pipe.unet.eval(),
                vae=pipe.vae.eval(),
                scheduler_config=dict(pipe.scheduler.config),
                adapters=adapters,
                controlnets=controlnets,
                tokenizer_2=pipe.tokenizer_2,
                text_encoder_2=pipe.text_encoder_2.eval(),
                force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
            )
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
        return cls(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder.eval(),
            unet=pipe.unet.eval(),
            vae=pipe.vae.eval(),
            scheduler_config=dict(pipe.scheduler.config),
            adapters=adapters,
            controlnets=controlnets,
        )

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) StableDiffusionPipeline uses when given none: `unet.config.sample_size *
        vae_scale_factor` (pipeline_stable_diffusion.py); the manifest's `default_size` is the same."""
        side = self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return side, side

    def scheduler(self, kind: str, options: dict | None = None):
        """The runtime's sampler `kind` as diffusers builds it: `Class.from_config(pipe.scheduler.config,
        **preset, **options)` (`options` are a request's scheduler config overrides)."""
        return SCHEDULERS[kind].from_config(self.scheduler_config, **{**PRESETS.get(kind, {}), **(options or {})})


@dataclass
class Case:
    name: str
    prompt: str
    negative_prompt: str | None
    adapters: list[dict]  # {"name", "image": PIL image, "weight"}
    cond_tau: float
    steps: int
    guidance: float
    scheduler: str
    width: int | None  # None: left to diffusers' pipeline to pick (`pipeline_size`)
    height: int | None
    n_samples: int
    # Initial noise, before init_noise_sigma scaling; None: the pipeline draws it (and any step noise)
    # from torch.Generator("cpu").manual_seed(seed), passed as `generator=` (reference "pipeline" only).
    latents: torch.Tensor | None
    reference: str  # "pipeline" | "loop"
    scheduler_options: dict = field(default_factory=dict)
    guidance_rescale: float = 0.0
    seed: int | None = None
    eta: float = 0.0  # DDIM's, passed to the pipeline as `eta=`
    # SDXL: original_size, crops_coords_top_left, target_size and their negative_* ((h, w) / (top, left) pairs)
    size_cond: dict = field(default_factory=dict)
    # img2img / inpainting: the init image (RGB, exactly width x height), the mask (mode "L", white =
    # repaint; None: img2img) and the pipelines' `strength`.
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    # ControlNets: {"name", "image": PIL image, "scale"} (diffusers' controlnet_conditioning_scale), and
    # control_guidance_start / _end and guess_mode, shared by all of them
    controls: list[dict] = field(default_factory=list)
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False

    def size(self, oracle: Oracle) -> tuple[int, int]:
        """(width, height) the case runs at."""
        return pipeline_size(oracle, self.adapters, self.width, self.height, self.controls)


def pipeline_size(
    oracle: Oracle, adapters: list[dict], width: int | None, height: int | None, controls: list[dict] = ()
) -> tuple[int, int]:
    """(width, height) diffusers' pipeline runs at when a side is None. The adapter pipelines take it
    from the first condition image, floored to its adapter's `downscale_factor`
    (StableDiffusionAdapterPipeline._default_height_width, copied into the XL one), not from the UNet;
    the ControlNet pipelines from the first control image, floored to the VAE's scale factor
    (`control_image_processor.preprocess`); StableDiffusionPipeline takes `Oracle.default_size`."""
    if adapters:
        image, f = adapters[0]["image"], oracle.adapters[adapters[0]["name"]].downscale_factor
        default = (image.width // f * f, image.height // f * f)
    elif controls:
        image, f = controls[0]["image"], _vae_scale_factor(oracle)
        default = (image.width // f * f, image.height // f * f)
    else:
        default = oracle.default_size
    return width or default[0], height or default[1]


def _vae_scale_factor(oracle: Oracle) -> int:
    return 2 ** (len(oracle.vae.config.block_out_channels) - 1)


@dataclass
class ControlState:
    """A case's ControlNets as StableDiffusionControlNetPipeline prepares them before its loop."""

    model: ControlNetModel | MultiControlNetModel
    images: torch.Tensor | list[torch.Tensor]  # as the pipeline passes `controlnet_cond`
    scales: float | list[float]  # controlnet_conditioning_scale


def control_state(oracle: Oracle, case: Case) -> ControlState | None:
    """`StableDiffusionControlNetPipeline.prepare_image` for each control image: RGB, Lanczos to the
    output size, [0, 1], repeated over the images per prompt, doubled with CFG unless in guess mode."""
    if not case.controls:
        return None
    width, height = case.size(oracle)
    processor = VaeImageProcessor(vae_scale_factor=_vae_scale_factor(oracle), do_convert_rgb=True, do_normalize=False)
    images = []
    for c in case.controls:
        # (in the net's dtype, as prepare_image's `dtype=controlnet.dtype`)
        image = processor.preprocess(c["image"], height=height, width=width).to(dtype=oracle.controlnets[c["name"]].dtype)
        image = image.repeat_interleave(case.n_samples, dim=0)
        if case.guidance > 1.0 and not case.guess_mode:
            image = torch.cat([image] * 2)
        images.append(image)
    nets = [oracle.controlnets[c["name"]] for c in case.controls]
    if len(nets) == 1:
        return ControlState(nets[0], images[0], case.controls[0]["scale"])
    return ControlState(MultiControlNetModel(nets), images, [c["scale"] for c in case.controls])


def control_residuals(state: ControlState, case: Case, scheduler, i: int, calls: int, t, latents: torch.Tensor,
                      model_input: torch.Tensor, embeds: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One call's ControlNet residuals, as StableDiffusionControlNetPipeline's loop computes them
    (pipelines/controlnet/pipeline_controlnet.py): `controlnet_keep` from control_guidance_start /
    _end over the loop's `calls` timesteps; in guess mode with CFG the nets see only the conditional
    half and the unconditional half gets zeros."""
    s, e = case.control_start, case.control_end
    keep = 1.0 - float(i / calls < s or (i + 1) / calls > e)
    if isinstance(state.scales, list):
        cond_scale = [c * keep for c in state.scales]
    else:
        cond_scale = state.scales * keep
    guided = case.guidance > 1.0
    if case.guess_mode and guided:
        control_input = scheduler.scale_model_input(latents, t)
        control_embeds = embeds.chunk(2)[1]
    else:
        control_input, control_embeds = model_input, embeds
    down, mid = state.model(
        control_input, t, encoder_hidden_states=control_embeds, controlnet_cond=state.images,
        conditioning_scale=cond_scale, guess_mode=case.guess_mode, return_dict=False,
    )
    if case.guess_mode and guided:
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
    return down, mid


def _step_kwargs(scheduler) -> dict:
    # StableDiffusionAdapterPipeline.prepare_extra_step_kwargs(generator=None, eta=0.0)
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = None
    return kwargs


@torch.no_grad()
def adapter_state(oracle: Oracle, case: Case) -> list[torch.Tensor] | None:
    """Weighted adapter features, as the adapter pipeline computes them before the loop."""
    if not case.adapters:
        return None
    # `.to(dtype=adapter.dtype)` as the pipeline does: a no-op in fp32, needed when the oracle runs in fp16.
    dtype = oracle.adapters[case.adapters[0]["name"]].dtype
    width, height = case.size(oracle)
    xs = [_preprocess_adapter_image(a["image"], height, width).to(dtype=dtype) for a in case.adapters]
    if len(case.adapters) == 1:
        feats = oracle.adapters[case.adapters[0]["name"]](xs[0])
        return [f * case.adapters[0]["weight"] for f in feats]
    multi = MultiAdapter([oracle.adapters[a["name"]] for a in case.adapters])
    return multi(xs, [a["weight"] for a in case.adapters])


@torch.no_grad()
def run_loop(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float]]:
    """Final latents (what output_type="latent" returns) and the timesteps used."""
    if case.latents is None or case.eta != 0.0:
        raise ValueError(f"case {case.name}: the loop reference takes explicit latents and no step noise")
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    scheduler.set_timesteps(case.steps)
    latents = case.latents * scheduler.init_noise_sigma
    latents = _denoise(oracle, case, scheduler, scheduler.timesteps, latents, _step_kwargs(scheduler))
    return latents, [float(t) for t in scheduler.timesteps]


def _prompt_embeds(oracle: Oracle, case: Case) -> torch.Tensor:
    """StableDiffusionPipeline.encode_prompt for `n_samples` images, [negative; positive] with CFG."""
    tok, n = oracle.tokenizer, case.n_samples

    def embed(text: str) -> torch.Tensor:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        e = oracle.text_encoder(ids)[0]
        return e.repeat(1, n, 1).view(n, e.shape[1], -1)

    embeds = embed(case.prompt)
    if case.guidance > 1.0:
        embeds = torch.cat([embed(case.negative_prompt if case.negative_prompt is not None else ""), embeds])
    return embeds


def _denoise(oracle: Oracle, case: Case, scheduler, timesteps, latents: torch.Tensor, step_kwargs: dict) -> torch.Tensor:
    """StableDiffusionAdapterPipeline's denoising loop over `timesteps`, the adapter residuals passed
    for the first `int(steps * cond_tau)` model calls, and StableDiffusionControlNetPipeline's
    ControlNet residuals (`control_residuals`) when the case has controls."""
    n, do_cfg = case.n_samples, case.guidance > 1.0
    embeds = _prompt_embeds(oracle, case)
    state = adapter_state(oracle, case)
    if state is not None:
        if n > 1:
            state = [v.repeat(n, 1, 1, 1) for v in state]
        if do_cfg:
            state = [torch.cat([v] * 2, dim=0) for v in state]

    control = control_state(oracle, case)
    cond_steps = int(case.steps * case.cond_tau)
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        residuals = [s.clone() for s in state] if state is not None and i < cond_steps else None
        down, mid = None, None
        if control is not None:
            down, mid = control_residuals(control, case, scheduler, i, len(timesteps), t, latents, model_input, embeds)
        noise_pred = oracle.unet(
            model_input, t, encoder_hidden_states=embeds, down_intrablock_additional_residuals=residuals,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + case.guidance * (text - uncond)
            if case.guidance_rescale > 0.0:  # StableDiffusionPipeline's
                noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=case.guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return latents


def _sd1_components(oracle: Oracle, scheduler) -> dict:
    """The keyword arguments every SD 1.x/2.x pipeline here is built from: the oracle's modules,
    `scheduler`, and no safety checker."""
    return dict(
        vae=oracle.vae,
        text_encoder=oracle.text_encoder,
        tokenizer=oracle.tokenizer,
        unet=oracle.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def run_pipeline(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float]]:
    """The same through diffusers' StableDiffusionAdapterPipeline (or StableDiffusionPipeline without
    adapters). Only valid for cond_tau == 1: the SD 1.x adapter pipeline has no such knob."""
    if case.cond_tau != 1.0 and case.adapters:
        raise ValueError(f"case {case.name}: the diffusers SD 1.x adapter pipeline cannot do cond_tau={case.cond_tau}")
    if case.guidance_rescale != 0.0 and case.adapters:
        raise ValueError(f"case {case.name}: the diffusers SD 1.x adapter pipeline has no guidance_rescale")
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    common = _sd1_components(oracle, scheduler)
    call = dict(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        height=case.height,  # None: the pipeline picks its default size itself
        width=case.width,
        num_images_per_prompt=case.n_samples,
        output_type="latent",
    )
    if case.latents is None:
        call.update(generator=torch.Generator("cpu").manual_seed(case.seed), eta=case.eta)
    else:
        call.update(latents=case.latents.clone(), eta=case.eta)
    if case.controls:
        if case.adapters:
            raise ValueError(f"case {case.name}: no diffusers pipeline runs ControlNets with T2I-Adapters (use the loop)")
        pipe = StableDiffusionControlNetPipeline(controlnet=_controlnet_model(oracle, case), **common)
        if case.guidance_rescale:
            raise ValueError(f"case {case.name}: StableDiffusionControlNetPipeline has no guidance_rescale")
        call.update(_control_call(case))
    elif not case.adapters:
        pipe = StableDiffusionPipeline(**common)
        call.update(guidance_rescale=case.guidance_rescale)
    elif len(case.adapters) == 1:
        a = case.adapters[0]
        pipe = StableDiffusionAdapterPipeline(adapter=oracle.adapters[a["name"]], **common)
        call.update(image=a["image"], adapter_conditioning_scale=a["weight"])
    else:
        multi = MultiAdapter([oracle.adapters[a["name"]] for a in case.adapters])
        pipe = StableDiffusionAdapterPipeline(adapter=multi, **common)
        call.update(image=[a["image"] for a in case.adapters], adapter_conditioning_scale=[a["weight"] for a in case.adapters])
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**call).images
    return latents, [float(t) for t in scheduler.timesteps]


@torch.no_grad()
def _controlnet_model(oracle: Oracle, case: Case) -> ControlNetModel | MultiControlNetModel:
    nets = [oracle.controlnets[c["name"]] for c in case.controls]
    return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)


def _control_call(case: Case) -> dict:
    """The ControlNet pipelines' control arguments (a list per ControlNet with several)."""
    single = len(case.controls) == 1
    images = [c["image"] for c in case.controls]
    scales = [c["scale"] for c in case.controls]
    return dict(
        image=images[0] if single else images,
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=case.control_start,
        control_guidance_end=case.control_end,
        guess_mode=case.guess_mode,
    )


@torch.no_grad()
def run_pipeline_xl(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float]]:
    """StableDiffusionXLAdapterPipeline, `adapter_conditioning_factor=cond_tau`; with controls,
    StableDiffusionXLControlNetPipeline."""
    if case.latents is None:
        raise ValueError(f"case {case.name}: SDXL cases pass explicit latents")
    if case.controls:
        return _run_controlnet_xl(oracle, case)
    if not case.adapters:
        raise ValueError(f"case {case.name}: StableDiffusionXLAdapterPipeline needs an adapter")
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    if len(case.adapters) == 1:
        adapter, image, scale = oracle.adapters[case.adapters[0]["name"]], case.adapters[0]["image"], case.adapters[0]["weight"]
    else:
        adapter = MultiAdapter([oracle.adapters[a["name"]] for a in case.adapters])
        image, scale = [a["image"] for a in case.adapters], [a["weight"] for a in case.adapters]
    pipe = StableDiffusionXLAdapterPipeline(adapter=adapter, **_xl_components(oracle, scheduler))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        image=image,
        adapter_conditioning_scale=scale,
        adapter_conditioning_factor=case.cond_tau,
        guidance_rescale=case.guidance_rescale,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        height=case.height,
        width=case.width,
        num_images_per_prompt=case.n_samples,
        latents=case.latents.clone(),
        output_type="latent",
        **{k: tuple(v) for k, v in case.size_cond.items()},
    ).images
    return latents, [float(t) for t in scheduler.timesteps]


def _xl_components(oracle: Oracle, scheduler) -> dict:
    return dict(
        vae=oracle.vae,
        text_encoder=oracle.text_encoder,
        text_encoder_2=oracle.text_encoder_2,
        tokenizer=oracle.tokenizer,
        tokenizer_2=oracle.tokenizer_2,
        unet=oracle.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=oracle.force_zeros_for_empty_prompt,
    )


def _run_controlnet_xl(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float]]:
    if case.adapters or case.cond_tau != 1.0 or case.guidance_rescale:
        raise ValueError(f"case {case.name}: StableDiffusionXLControlNetPipeline takes no adapters and no guidance_rescale")
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    pipe = StableDiffusionXLControlNetPipeline(
        controlnet=_controlnet_model(oracle, case), add_watermarker=False, **_xl_components(oracle, scheduler)
    )
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        height=case.height,
        width=case.width,
        num_images_per_prompt=case.n_samples,
        latents=case.latents.clone(),
        output_type="latent",
        **_control_call(case),
        **{k: tuple(v) for k, v in case.size_cond.items()},
    ).images
    return latents, [float(t) for t in scheduler.timesteps]


@dataclass
class Trace:
    """What an img2img / inpainting run went through, written as the cases' debug_* files so that a
    runtime mismatch can be localised: all [1 or n_samples, C, h, w], before any CFG duplication."""

    # scaling_factor * the init image's posterior sample; None where the pipeline does not encode
    # the init image (a 9-channel inpainting UNet at strength 1)
    image_latents: torch.Tensor | None = None
    # inpainting: scaling_factor * the masked image's posterior sample, and the mask at latent size
    masked_image_latents: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None
    # the latents entering the first denoising step (after add_noise, or noise * init_noise_sigma)
    initial_latents: torch.Tensor | None = None
    # the timesteps the denoising loop runs, one per UNet call (scheduler.timesteps[t_start * order:])
    loop_timesteps: list[float] = field(default_factory=list)
    # SDXL: the `added_cond_kwargs["time_ids"]` of the first UNet call, [CFG batch, 6] in batch order
    # (the XL img2img / inpainting pipelines: [negative x n; positive x n]); None for SD 1.x / 2.x
    time_ids: torch.Tensor | None = None


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """`StableDiffusionImg2ImgPipeline.get_timesteps` (the inpainting and XL pipelines have copies):
    the tail of the full schedule that strength leaves, and the scheduler's begin index set to it."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


@torch.no_grad()
def run_img2img_loop(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float], Trace]:
    """StableDiffusionImg2ImgPipeline.__call__ written out (diffusers
    pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py), with the adapter residuals fed
    as StableDiffusionAdapterPipeline feeds them (`_denoise`): no diffusers pipeline does img2img
    with a T2I-Adapter. Without adapters it equals StableDiffusionImg2ImgPipeline bit for bit
    (tests/test_reference.py). Draws from `generator=torch.Generator("cpu").manual_seed(seed)` as the
    pipeline does: the init image's posterior sample [1, C, h, w], then the noise [n, C, h, w]."""
    if case.init_image is None or case.mask is not None or oracle.xl:
        raise ValueError(f"case {case.name}: the img2img loop reference is SD 1.x/2.x img2img only")
    generator = torch.Generator("cpu").manual_seed(case.seed)
    n = case.n_samples
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    scheduler.set_timesteps(case.steps)
    timesteps = img2img_timesteps(scheduler, case.steps, case.strength)

    vae = oracle.vae
    image = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1)).preprocess(case.init_image)
    posterior = vae.encode(image.to(dtype=oracle.text_encoder.dtype)).latent_dist
    image_latents = vae.config.scaling_factor * posterior.sample(generator)
    init_latents = torch.cat([image_latents] * n, dim=0)
    noise = randn_tensor(init_latents.shape, generator=generator, dtype=init_latents.dtype)
    latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))
    trace = Trace(image_latents=image_latents, initial_latents=latents, loop_timesteps=[float(t) for t in timesteps])

    # prepare_extra_step_kwargs(generator, eta)
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {**({"eta": case.eta} if "eta" in params else {}), **({"generator": generator} if "generator" in params else {})}
    latents = _denoise(oracle, case, scheduler, timesteps, latents, kwargs)
    return latents, [float(t) for t in scheduler.timesteps], trace


@contextmanager
def _tracing(pipe, scaling_factor: float) -> Iterator[Trace]:
    """Record a pipeline run's `Trace`: its posterior samples (drawn in `prepare_latents` from the init
    image, in `prepare_mask_latents` from the masked image), `prepare_latents`' result, the latent
    mask and the timestep of every UNet call. Observes only: every value passes through unchanged."""
    trace, samples = Trace(), []
    sample = DiagonalGaussianDistribution.sample

    def recording_sample(self, generator=None):
        x = sample(self, generator)
        samples.append(x)
        return x

    prepare_latents = pipe.prepare_latents

    def recording_prepare_latents(*args, **kwargs):
        start = len(samples)
        out = prepare_latents(*args, **kwargs)
        if len(samples) > start:
            # the pipelines compute `scaling_factor * sample` (python float times tensor): the same product
            trace.image_latents = scaling_factor * samples[start]
        trace.initial_latents = (out[0] if isinstance(out, tuple) else out).clone()
        return out

    pipe.prepare_latents = recording_prepare_latents
    if hasattr(pipe, "prepare_mask_latents"):
        prepare_mask_latents = pipe.prepare_mask_latents

        def recording_prepare_mask_latents(*args, **kwargs):
            mask, masked_image_latents = prepare_mask_latents(*args, **kwargs)
            trace.latent_mask = mask[:1].clone()
            trace.masked_image_latents = masked_image_latents[:1].clone()
            return mask, masked_image_latents

        pipe.prepare_mask_latents = recording_prepare_mask_latents
    def record_call(module, args, kwargs):
        trace.loop_timesteps.append(float(args[1]))
        added = kwargs.get("added_cond_kwargs") or {}
        if trace.time_ids is None and added.get("time_ids") is not None:
            trace.time_ids = added["time_ids"].clone()

    hook = pipe.unet.register_forward_pre_hook(record_call, with_kwargs=True)
    DiagonalGaussianDistribution.sample = recording_sample
    try:
        yield trace
    finally:
        DiagonalGaussianDistribution.sample = sample
        hook.remove()
        del pipe.prepare_latents
        if "prepare_mask_latents" in vars(pipe):
            del pipe.prepare_mask_latents


@torch.no_grad()
def run_image_pipeline(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float], Trace]:
    """diffusers' own img2img / inpainting pipeline (SD or SDXL, as the oracle is), called with
    `generator=torch.Generator("cpu").manual_seed(seed)` and `output_type="latent"`."""
    if case.init_image is None or case.latents is not None or case.adapters:
        raise ValueError(f"case {case.name}: an image pipeline case has an init image, no latents and no adapters")
    if case.controls and oracle.xl:
        raise ValueError(f"case {case.name}: ControlNet image cases are SD 1.x/2.x")
    scheduler = oracle.scheduler(case.scheduler, case.scheduler_options)
    inpaint = case.mask is not None
    if oracle.xl:
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
        pipe = cls(
            vae=oracle.vae,
            text_encoder=oracle.text_encoder,
            text_encoder_2=oracle.text_encoder_2,
            tokenizer=oracle.tokenizer,
            tokenizer_2=oracle.tokenizer_2,
            unet=oracle.unet,
            scheduler=scheduler,
            # the base model's 6 time ids (original_size, crop, target_size), no aesthetic score
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=oracle.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    elif case.controls:
        cls = StableDiffusionControlNetInpaintPipeline if inpaint else StableDiffusionControlNetImg2ImgPipeline
        pipe = cls(controlnet=_controlnet_model(oracle, case), **_sd1_components(oracle, scheduler))
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
        pipe = cls(**_sd1_components(oracle, scheduler))
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        image=case.init_image,
        strength=case.strength,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        num_images_per_prompt=case.n_samples,
        generator=torch.Generator("cpu").manual_seed(case.seed),
        eta=case.eta,
        output_type="latent",
    )
    if case.controls:  # StableDiffusionControlNetImg2ImgPipeline: `image` is the init image
        control = _control_call(case)
        control["control_image"] = control.pop("image")
        call.update(control, height=case.height, width=case.width)  # else the control image's size
    if inpaint:  # the img2img pipelines take the size from the image; these would default it otherwise
        call.update(mask_image=case.mask, height=case.height, width=case.width)
    if case.size_cond:
        if not oracle.xl:
            raise ValueError(f"case {case.name}: size conditioning is SDXL's")
        call.update({k: tuple(v) for k, v in case.size_cond.items()})
    with _tracing(pipe, oracle.vae.config.scaling_factor) as trace:
        latents = pipe(**call).images
    return latents, [float(t) for t in scheduler.timesteps], trace


def run_image(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float], Trace]:
    """An img2img / inpainting case: final latents, the full schedule, and the run's `Trace`."""
    return run_img2img_loop(oracle, case) if case.reference == "loop" else run_image_pipeline(oracle, case)


def reference_pipeline_name(oracle: Oracle, case: Case) -> str:
    """The diffusers pipeline class a case's reference is (or, for "loop", writes out)."""
    if case.init_image is None:
        if oracle.xl:
            return "StableDiffusionXLControlNetPipeline" if case.controls else "StableDiffusionXLAdapterPipeline"
        if case.controls:
            return "StableDiffusionControlNetPipeline"
        return "StableDiffusionAdapterPipeline" if case.adapters else "StableDiffusionPipeline"
    if case.controls:
        return f"StableDiffusionControlNet{'Inpaint' if case.mask is not None else 'Img2Img'}Pipeline"
    xl = "XL" if oracle.xl else ""
    return f"StableDiffusion{xl}{'Inpaint' if case.mask is not None else 'Img2Img'}Pipeline"


def run(oracle: Oracle, case: Case) -> tuple[torch.Tensor, list[float]]:
    if case.init_image is not None:
        return run_image(oracle, case)[:2]
    if oracle.xl:
        return run_pipeline_xl(oracle, case)
    return run_pipeline(oracle, case) if case.reference == "pipeline" else run_loop(oracle, case)


@torch.no_grad()
def decode_images(oracle: Oracle, latents: torch.Tensor) -> np.ndarray:
    """uint8 [n, H, W, 3]: vae.decode(latents / scaling_factor) -> (x/2+0.5).clamp(0,1) -> (x*255).round().

    Same as diffusers' `decode_latents` + `numpy_to_pil` (numpy rounds half to even).
    """
    image = oracle.vae.decode(latents / oracle.vae.config.scaling_factor, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype(np.uint8)


def load_condition(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image
