"""The "loop" references are faithful (== diffusers' pipelines at cond_tau = 1; the img2img loop ==
StableDiffusionImg2ImgPipeline without adapters), and the tiny random model is not degenerate:
adapters, negative prompt, CFG, the init image and the mask all move the result."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from t2i_export.fixtures import CASES, CASES_BY_FAMILY, SD1_CONTROL_CASES, _make_case, condition_images
from t2i_export.reference import Oracle, run_image, run_image_pipeline, run_img2img_loop, run_loop, run_pipeline


@pytest.fixture(scope="module")
def images():
    return condition_images()


def case(oracle, images, name, **changes):
    spec = next(c for c in CASES if c["name"] == name)
    return dataclasses.replace(_make_case(spec, images, oracle), **changes)


@pytest.mark.parametrize(
    "name",
    ["c_ddim_sketch_pipeline", "d_euler_multi_adapter_pipeline", "e_ddim_no_adapter_two_samples", "f_euler_sketch_no_cfg"],
)
def test_loop_equals_pipeline_at_cond_tau_1(oracle, images, name):
    c = case(oracle, images, name)
    assert c.cond_tau == 1.0
    from_pipeline, t_pipe = run_pipeline(oracle, c)
    from_loop, t_loop = run_loop(oracle, c)
    assert t_pipe == t_loop
    # Same ops in the same order: bit for bit.
    assert torch.equal(from_loop, from_pipeline), float((from_loop - from_pipeline).abs().max())


def test_loop_equals_pipeline_for_the_loop_cases_at_cond_tau_1(oracle, images):
    for name in ("a_ddim_two_adapters_tau05", "b_euler_two_adapters_tau05"):
        c = case(oracle, images, name, cond_tau=1.0)
        assert torch.equal(run_loop(oracle, c)[0], run_pipeline(oracle, c)[0]), name


def test_a_case_without_size_must_run_at_the_manifest_default_size(oracle, images):
    """diffusers' adapter pipeline takes a missing size from the condition image, the runtime from the
    manifest's default_size: a size-less case is only written where the two agree."""
    spec = dict(next(c for c in CASES if c["name"] == "f_euler_sketch_no_cfg"), width=None, height=None)
    c = _make_case(spec, images, oracle)  # the sketch is 64x64, the default size
    assert c.size(oracle) == oracle.default_size == (64, 64) and c.latents.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="default_size"):
        _make_case(dict(spec, adapters=[("color", 1.0)]), images, oracle)  # 80x96


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_effects_are_not_negligible(oracle, images, scheduler):
    """Mean relative change of the final latents of case (a) when one thing is left out. cond_tau only
    drops the residuals from the last 3 of 6 steps, which move the latents least: its bound is lower
    (measured: ddim ~8e-3, euler ~1.3e-3; everything else >= 0.1)."""
    base = dataclasses.replace(case(oracle, images, "a_ddim_two_adapters_tau05"), scheduler=scheduler)
    ref = run_loop(oracle, base)[0]
    checks = {
        "no adapters": (dataclasses.replace(base, adapters=[]), 0.05),
        "sketch only": (dataclasses.replace(base, adapters=base.adapters[:1]), 0.05),
        "color only": (dataclasses.replace(base, adapters=base.adapters[1:]), 0.05),
        "no negative prompt": (dataclasses.replace(base, negative_prompt=None), 0.05),
        "no CFG": (dataclasses.replace(base, guidance=1.0), 0.05),
        "cond_tau 1": (dataclasses.replace(base, cond_tau=1.0), 1e-3),
    }
    for what, (c, bound) in checks.items():
        change = _rel_change(run_loop(oracle, c)[0], ref)
        assert change > bound, f"{what}: final latents move only {change:.4g} (relative)"


def test_expected_images_are_not_degenerate(zoo):
    cases = json.loads((zoo.fixtures_dir / "cases.json").read_text(encoding="utf-8"))
    for c in cases:
        for rel in c["expected_images"]:
            px = np.asarray(Image.open(zoo.fixtures_dir / rel))
            assert px.std() > 20, f"{rel}: nearly constant"
            saturated = np.mean((px == 0) | (px == 255))
            assert saturated < 0.2, f"{rel}: {saturated:.0%} saturated"


def image_case(oracle, images, family, name, **changes):
    spec = next(c for c in CASES_BY_FAMILY[family] if c["name"] == name)
    return dataclasses.replace(_make_case(spec, images, oracle), **changes)


@pytest.mark.parametrize("changes", [{}, {"scheduler": "euler", "n_samples": 2}])
def test_img2img_loop_equals_the_img2img_pipeline_without_adapters(oracle, images, changes):
    """run_img2img_loop (case y's reference) is StableDiffusionImg2ImgPipeline step for step: same
    generator draws, same timesteps, bit for bit (DDIM; Euler with set_begin_index and 2 images)."""
    c = image_case(oracle, images, "sd1", "y_img2img_ddim_sketch_loop", adapters=[], **changes)
    loop, t_loop, trace_loop = run_img2img_loop(oracle, c)
    pipe, t_pipe, trace_pipe = run_image_pipeline(oracle, dataclasses.replace(c, reference="pipeline"))
    assert t_loop == t_pipe and trace_loop.loop_timesteps == trace_pipe.loop_timesteps
    assert torch.equal(trace_loop.image_latents, trace_pipe.image_latents)
    assert torch.equal(trace_loop.initial_latents, trace_pipe.initial_latents)
    assert torch.equal(loop, pipe), float((loop - pipe).abs().max())


@pytest.fixture(scope="module")
def inpaint_oracle(zoo_all) -> Oracle:
    return Oracle.load(zoo_all["work"][0] / "sd1-inpaint" / "tiny-sd1-inpaint", {})


@pytest.mark.parametrize(
    "family, name",
    [("sd1", "w_img2img_pndm_pipeline"), ("sd1", "y_img2img_ddim_sketch_loop"), ("sd1", "z_inpaint_ddim_pipeline"),
     ("sd1-inpaint", "a_inpaint9_euler_pipeline")],
)
def test_init_image_and_mask_are_not_negligible(oracle, inpaint_oracle, images, family, name):
    """Mean relative change of the final latents when the init image or the mask is mirrored. The tiny
    VAE's latents are small next to the noise, so the init image moves img2img least (measured: PNDM
    at strength 0.8 1.6e-2, the others 1.5e-2 to 7e-2); the mask moves inpainting by 0.3 to 0.8.
    Both far above the runtime's 1e-4 tolerance."""
    o = inpaint_oracle if family == "sd1-inpaint" else oracle
    c = image_case(o, images, family, name)
    ref = run_image(o, c)[0]
    change = _rel_change(run_image(o, dataclasses.replace(c, init_image=ImageOps.mirror(c.init_image)))[0], ref)
    assert change > 5e-3, f"init image: final latents move only {change:.4g} (relative)"
    if c.mask is not None:
        change = _rel_change(run_image(o, dataclasses.replace(c, mask=ImageOps.mirror(c.mask)))[0], ref)
        assert change > 0.1, f"mask: final latents move only {change:.4g} (relative)"


def control_case(oracle, images, name, **changes):
    spec = next(c for c in SD1_CONTROL_CASES if c["name"] == name)
    return dataclasses.replace(_make_case(spec, images, oracle), **changes)


@pytest.mark.parametrize(
    "name",
    ["ca_controlnet_euler_pipeline", "cb_multi_controlnet_heun_start_end_pipeline", "cc_controlnet_guess_mode_dpmpp_2m_pipeline"],
)
def test_control_loop_equals_the_controlnet_pipeline(oracle, images, name):
    """The loop's ControlNet residuals (used for ControlNet + T2I-Adapter, which no diffusers pipeline
    runs) are StableDiffusionControlNetPipeline's: single, multi with start/end under Heun, guess mode."""
    c = control_case(oracle, images, name)
    from_pipeline, t_pipe = run_pipeline(oracle, c)
    from_loop, t_loop = run_loop(oracle, c)
    assert t_pipe == t_loop
    assert torch.equal(from_loop, from_pipeline), float((from_loop - from_pipeline).abs().max())


def test_controlnet_moves_the_result_and_scale_0_is_none(oracle, images):
    c = control_case(oracle, images, "ca_controlnet_euler_pipeline")
    with_control, _ = run_loop(oracle, c)
    without, _ = run_loop(oracle, dataclasses.replace(c, controls=[]))
    zero_scale, _ = run_loop(oracle, dataclasses.replace(c, controls=[dict(c.controls[0], scale=0.0)]))
    assert _rel_change(with_control, without) > 0.1
    # Residuals of scale 0 are (±)0: adding them changes nothing.
    assert torch.equal(zero_scale, without)
    # control_guidance_end 0.5 keeps the ControlNet for half the calls: in between.
    half, _ = run_loop(oracle, dataclasses.replace(c, control_end=0.5))
    assert 0.01 < _rel_change(half, without) and 0.01 < _rel_change(half, with_control)
