"""Scheduler parity fixtures: what diffusers' samplers do, step by step.

Run from ``export/``::

    python -m t2i_export.scheduler_traces --out ../graphs/fixtures/schedulers

Every config starts from Stable Diffusion 1.5's ``scheduler_config.json`` (a ``PNDMScheduler`` one,
``SD15`` below) with a few keys overridden, and is loaded exactly as a user switching sampler does:
``DDIMScheduler.from_config(config)`` / ``EulerDiscreteScheduler.from_config(config)``, then
``set_timesteps(steps)``. One config goes through ``PNDMScheduler.from_config(SD15).config`` first, so
its JSON carries ``_use_default_values`` (keys the target scheduler must take its own default for).

``<name>.json.gz`` per config holds (gzipped JSON, deterministic: no name or time in the header):

* ``config``: the JSON handed to ``from_config`` (the runtime parses the same JSON);
* ``class``, ``kind`` (the runtime's name), ``steps``;
* ``timesteps`` (float32 values, as the UNet receives them), ``init_noise_sigma``, and for Euler
  ``sigmas`` (float32);
* a denoising loop as the pipeline runs it, on a fake UNet: ``start = noise * init_noise_sigma``, then
  per step ``scaled = scale_model_input(sample, t)``,
  ``model_output = 0.3 * scaled + 0.05 * sin(t / 100)`` (``fake_model``; float32 torch ops, the
  constant rounded to float32 once), ``sample = step(model_output, t, sample).prev_sample``;
  ``trajectory[i]`` has ``sample`` after step ``i`` and, where the scheduler scales (Euler),
  ``scaled``;
* ``add_noise``: ``add_noise(original, noise, timesteps[k:k+1])`` at a few step indices ``k``.

``timestep_sweep.json.gz`` holds the timesteps (and Euler sigmas) of more step counts per spacing,
including the ``trailing`` counts where numpy's float ``arange`` yields one extra step (61, 103, ...);
``step_fails`` marks a DDIM schedule whose ``step`` raises (a timestep past the training range).

Tensors are float32 ``[1, 4, 4, 4]``, stored as hex strings: 8 hex digits per element, the element's
IEEE-754 bits as a big-endian number (``format(bits, "08x")``), in C order. ``noise`` and
``original`` are ``np.random.default_rng(SEED).standard_normal`` draws, so the inputs are
bit-for-bit reproducible with the pinned torch/numpy/diffusers (``requirements.txt``). The
trajectories are what torch's CPU kernels compute, and those round differently on other CPUs:
regenerated on an AMD EPYC, 7 of the 9 PNDM traces written on an Intel Xeon differ by up to about
7e-7 relative. No test regenerates the traces; runtime/tests/scheduler_parity.rs holds the runtime to
the committed ones within its stated tolerances.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SEED = 20240607
SHAPE = (1, 4, 4, 4)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The runtime's names (`--scheduler`), each a diffusers class plus the keys the name forces
# (`from_config(config, **PRESETS[kind])`), as `SchedulerKind::preset` in the runtime.
CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "pndm-prk": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "dpmpp-2m-karras": DPMSolverMultistepScheduler,
    "dpmpp-2m-sde": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
    "ddpm": DDPMScheduler,
}
# `pndm-prk` is PNDM with the Runge-Kutta warm-up whatever the config says. The runtime's `pndm` preset
# (`skip_prk_steps` true) is deliberately absent here: the PNDM traces below run the warm-up as kind
# `pndm` with `skip_prk_steps` False in their *config* (`pndm_prk_*`), which `from_config`'s preset
# keywords would override, turning them into PLMS traces. `pndm` is PLMS anyway in every other use:
# SD 1.5's config (and the tiny sets') has `skip_prk_steps` true, and the runtime's scheduler test maps
# a `pndm` trace without it to `pndm-prk`.
PRESETS = {
    "pndm-prk": {"skip_prk_steps": False},
    "dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp-2m-karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "dpmpp-2m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
}


def _trained_betas_100() -> list[float]:
    """A short custom schedule for ``trained_betas`` (100 training steps), float64 values."""
    return [float(b) for b in np.linspace(0.001, 0.05, 100) ** 1.5]


# (name, kind, overrides of SD15, steps). An override value of `_DROP` removes the key.
_DROP = object()
DDIM_CASES = [
    # DDIM: SD 1.5 as shipped (leading, steps_offset 1, no clipping, set_alpha_to_one False).
    ("ddim_sd15_leading_50", "ddim", {}, 50),
    ("ddim_leading_offset0_10", "ddim", {"steps_offset": 0}, 10),
    ("ddim_leading_1", "ddim", {}, 1),
    ("ddim_trailing_25", "ddim", {"timestep_spacing": "trailing"}, 25),
    ("ddim_trailing_61_extra_step", "ddim", {"timestep_spacing": "trailing"}, 61),
    ("ddim_linspace_10", "ddim", {"timestep_spacing": "linspace"}, 10),
    ("ddim_clip_sample_4", "ddim", {"clip_sample": True}, 4),
    ("ddim_clip_range_half_10", "ddim", {"clip_sample": True, "clip_sample_range": 0.5}, 10),
    ("ddim_set_alpha_to_one_10", "ddim", {"set_alpha_to_one": True}, 10),
    ("ddim_vpred_10", "ddim", {"prediction_type": "v_prediction"}, 10),
    ("ddim_sample_pred_clip_10", "ddim", {"prediction_type": "sample", "clip_sample": True}, 10),
    (
        "ddim_zero_snr_trailing_vpred_10",
        "ddim",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
    ("ddim_cosine_linspace_25", "ddim", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}, 25),
    # Keys absent: DDIM's own defaults (clip_sample True, set_alpha_to_one True, steps_offset 0).
    (
        "ddim_defaults_linear_10",
        "ddim",
        {"beta_schedule": "linear", "beta_start": _DROP, "beta_end": _DROP, "clip_sample": _DROP,
         "set_alpha_to_one": _DROP, "steps_offset": _DROP},
        10,
    ),
    ("ddim_trained_betas_10", "ddim", {"num_train_timesteps": 100, "trained_betas": _trained_betas_100()}, 10),
    ("ddim_thresholding_10", "ddim", {"thresholding": True, "sample_max_value": 1.5}, 10),
    ("ddim_thresholding_ratio_vpred_10", "ddim",
     {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0,
      "prediction_type": "v_prediction"}, 10),
]

# A request's scheduler options on top of a kind's preset (`--scheduler-option`): DPM-Solver's other
# orders and algorithm types. (name, kind, overrides of SD15, steps, options)
OPTION_CASES = [
    ("dpmpp_2m_option_order1_10", "dpmpp-2m", {}, 10, {"solver_order": 1}),
    ("dpmpp_2m_option_order3_20", "dpmpp-2m", {}, 20, {"solver_order": 3}),
    ("dpmpp_2m_sde_option_order3_15", "dpmpp-2m-sde", {}, 15, {"solver_order": 3}),
    ("dpmpp_2m_option_dpmsolver_sigma_min_10", "dpmpp-2m", {}, 10,
     {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m_sde_option_sde_dpmsolver_heun_10", "dpmpp-2m-sde", {}, 10,
     {"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("unipc_option_order3_karras_15", "unipc", {}, 15, {"solver_order": 3, "use_karras_sigmas": True}),
]

# DDIM with eta > 0: the cases' `step_kwargs` are passed to every `step` (as the pipelines' `eta=`).
DDIM_ETA_CASES = [
    ("ddim_eta_1_10", "ddim", {}, 10, {"eta": 1.0}),
    ("ddim_eta_half_trailing_25", "ddim", {"timestep_spacing": "trailing"}, 25, {"eta": 0.5}),
]

EULER_CASES = [
    # Euler: from_config of the SD 1.5 config gives linspace spacing (Euler's default).
    ("euler_sd15_linspace_25", "euler", {}, 25),
    ("euler_linspace_1", "euler", {}, 1),
    ("euler_leading_10", "euler", {"timestep_spacing": "leading"}, 10),
    ("euler_trailing_10", "euler", {"timestep_spacing": "trailing"}, 10),
    ("euler_trailing_61_extra_step", "euler", {"timestep_spacing": "trailing"}, 61),
    ("euler_vpred_10", "euler", {"prediction_type": "v_prediction"}, 10),
    ("euler_sample_pred_4", "euler", {"prediction_type": "sample"}, 4),
    ("euler_karras_25", "euler", {"use_karras_sigmas": True}, 25),
    ("euler_karras_leading_sigma_range_10", "euler",
     {"use_karras_sigmas": True, "timestep_spacing": "leading", "sigma_min": 0.05, "sigma_max": 10.0}, 10),
    ("euler_log_linear_10", "euler", {"interpolation_type": "log_linear"}, 10),
    ("euler_final_sigma_min_10", "euler", {"final_sigmas_type": "sigma_min"}, 10),
    ("euler_continuous_vpred_10", "euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, 10),
    (
        "euler_zero_snr_trailing_vpred_10",
        "euler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
    ("euler_linear_betas_50", "euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 50),
]

# Each sampler's cases, (name, kind, overrides of SD15, steps). Keep these blocks apart: they are
# edited independently.
PNDM_CASES = [
    # PNDM: SD 1.5 as shipped (PLMS: skip_prk_steps, leading, steps_offset 1, set_alpha_to_one False).
    # PLMS repeats the second timestep: 50 steps are 51 model evaluations.
    ("pndm_sd15_plms_50", "pndm", {}, 50),
    ("pndm_plms_1", "pndm", {}, 1),
    ("pndm_plms_2", "pndm", {}, 2),
    ("pndm_set_alpha_to_one_vpred_10", "pndm", {"set_alpha_to_one": True, "prediction_type": "v_prediction"}, 10),
    ("pndm_linspace_10", "pndm", {"timestep_spacing": "linspace"}, 10),
    ("pndm_trailing_61_extra_step", "pndm", {"timestep_spacing": "trailing"}, 61),
    ("pndm_offset0_trained_betas_10", "pndm",
     {"steps_offset": 0, "num_train_timesteps": 100, "trained_betas": _trained_betas_100()}, 10),
    # skip_prk_steps False: the Runge-Kutta warm-up (12 evaluations for the first 3 steps).
    ("pndm_prk_10", "pndm", {"skip_prk_steps": False}, 10),
    ("pndm_prk_4_trailing_vpred", "pndm",
     {"skip_prk_steps": False, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 4),
]


EULER_ANCESTRAL_CASES = [
    # Euler a: SD 1.5 as shipped gives linspace spacing (the class default); one randn per step.
    ("euler_a_sd15_linspace_25", "euler-a", {}, 25),
    ("euler_a_linspace_1", "euler-a", {}, 1),
    ("euler_a_leading_10", "euler-a", {"timestep_spacing": "leading"}, 10),
    ("euler_a_leading_offset0_10", "euler-a", {"timestep_spacing": "leading", "steps_offset": 0}, 10),
    ("euler_a_trailing_61_extra_step", "euler-a", {"timestep_spacing": "trailing"}, 61),
    ("euler_a_vpred_10", "euler-a", {"prediction_type": "v_prediction"}, 10),
    (
        "euler_a_zero_snr_trailing_vpred_10",
        "euler-a",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
    ("euler_a_linear_betas_50", "euler-a", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 50),
]


HEUN_CASES = [
    # Heun: 2 * steps - 1 model evaluations; the trajectory has one entry per evaluation.
    ("heun_sd15_linspace_25", "heun", {}, 25),
    # linspace with 1 step is timestep 0 (np.linspace(0, 999, 1)): one Euler step from sigma_min.
    ("heun_linspace_1", "heun", {}, 1),
    ("heun_leading_2", "heun", {"timestep_spacing": "leading"}, 2),
    ("heun_karras_25", "heun", {"use_karras_sigmas": True}, 25),
    ("heun_karras_leading_sigma_range_10", "heun",
     {"use_karras_sigmas": True, "timestep_spacing": "leading", "sigma_min": 0.05, "sigma_max": 10.0}, 10),
    ("heun_trailing_10", "heun", {"timestep_spacing": "trailing"}, 10),
    ("heun_vpred_10", "heun", {"prediction_type": "v_prediction"}, 10),
    ("heun_sample_pred_clip_4", "heun", {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}, 4),
    # Heun's __init__ has no rescale_betas_zero_snr: from_config ignores the key.
    ("heun_zero_snr_key_ignored_10", "heun", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
]


LMS_CASES = [
    # LMS (order 4, the default of `step`): from_config of SD 1.5 gives linspace spacing.
    ("lms_sd15_linspace_25", "lms", {}, 25),
    ("lms_linspace_1", "lms", {}, 1),
    ("lms_leading_3", "lms", {"timestep_spacing": "leading"}, 3),
    ("lms_karras_25", "lms", {"use_karras_sigmas": True}, 25),
    ("lms_trailing_vpred_10", "lms", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10),
    ("lms_sample_pred_10", "lms", {"prediction_type": "sample"}, 10),
    ("lms_linear_betas_50", "lms", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 50),
]


DPM_SOLVER_CASES: list = [
    # DPM-Solver multistep: the three kinds on SD 1.5's config as shipped (linspace, DPM's default).
    ("dpmpp_2m_sd15_linspace_25", "dpmpp-2m", {}, 25),
    ("dpmpp_2m_karras_sd15_25", "dpmpp-2m-karras", {}, 25),
    ("dpmpp_2m_sde_sd15_25", "dpmpp-2m-sde", {}, 25),
    ("dpmpp_2m_karras_vpred_10", "dpmpp-2m-karras", {"prediction_type": "v_prediction"}, 10),
    ("dpmpp_2m_leading_20", "dpmpp-2m", {"timestep_spacing": "leading"}, 20),
    # 62 steps, the last at timestep -1 (np.interp clamps it to sigma[0]).
    ("dpmpp_2m_trailing_61_extra_step", "dpmpp-2m", {"timestep_spacing": "trailing"}, 61),
    (
        "dpmpp_2m_zero_snr_trailing_vpred_10",
        "dpmpp-2m",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
    # A non-zero final sigma: the last step is second order unless euler_at_final / lower_order_final.
    ("dpmpp_2m_heun_euler_at_final_sigma_min_20", "dpmpp-2m",
     {"solver_type": "heun", "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m_no_lower_order_final_sigma_min_10", "dpmpp-2m",
     {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
    ("dpmpp_2m_thresholding_10", "dpmpp-2m", {"thresholding": True, "sample_max_value": 1.5}, 10),
    ("dpmpp_2m_linspace_1", "dpmpp-2m", {}, 1),
    # Karras' rounded timesteps repeat near the end (1, 1) at 50 steps.
    ("dpmpp_2m_karras_50", "dpmpp-2m-karras", {}, 50),
    ("dpmpp_2m_lu_lambdas_10", "dpmpp-2m", {"use_lu_lambdas": True}, 10),
    ("dpmpp_2m_cosine_lambda_clip_trailing_10", "dpmpp-2m",
     {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}, 10),
    ("dpmpp_2m_sde_karras_heun_10", "dpmpp-2m-sde", {"use_karras_sigmas": True, "solver_type": "heun"}, 10),
    ("dpmpp_2m_sde_sigma_min_1", "dpmpp-2m-sde", {"final_sigmas_type": "sigma_min"}, 1),
]


UNIPC_CASES = [
    # UniPC: from_config of SD 1.5 gives bh2, order 2, linspace (UniPC's own rule), final sigma 0.
    ("unipc_sd15_linspace_20", "unipc", {}, 20),
    ("unipc_linspace_1", "unipc", {}, 1),
    ("unipc_karras_25", "unipc", {"use_karras_sigmas": True}, 25),
    ("unipc_karras_50_repeated_timesteps", "unipc", {"use_karras_sigmas": True}, 50),
    ("unipc_trailing_10", "unipc", {"timestep_spacing": "trailing"}, 10),
    ("unipc_leading_15", "unipc", {"timestep_spacing": "leading"}, 15),
    ("unipc_vpred_10", "unipc", {"prediction_type": "v_prediction"}, 10),
    ("unipc_order3_25", "unipc", {"solver_order": 3}, 25),
    ("unipc_order3_no_lower_final_sigma_min_10", "unipc",
     {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
    # bh1 and predict_x0=False give NaN with a final sigma of 0 in diffusers: sigma_min.
    ("unipc_bh1_sigma_min_10", "unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10),
    ("unipc_eps_space_sample_pred_sigma_min_10", "unipc",
     {"predict_x0": False, "prediction_type": "sample", "final_sigmas_type": "sigma_min"}, 10),
    ("unipc_disable_corrector_thresholding_10", "unipc",
     {"disable_corrector": [0, 1, 2], "thresholding": True, "sample_max_value": 1.5}, 10),
    (
        "unipc_zero_snr_trailing_vpred_10",
        "unipc",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
]


# LCM-Dreamshaper v7's scheduler_config.json (an LCMScheduler one).
LCM_DREAMSHAPER = {
    "_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "original_inference_steps": 50, "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
    "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
}
LCM_CASES = [
    # LCM-LoRA on SD 1.5: LCMScheduler.from_config(SD15).
    ("lcm_sd15_4", "lcm", {}, 4),
    ("lcm_sd15_8", "lcm", {}, 8),
    ("lcm_1", "lcm", {}, 1),
    ("lcm_dreamshaper_config_6", "lcm", {**{k: _DROP for k in SD15}, **LCM_DREAMSHAPER}, 6),
    ("lcm_original_steps_50_of_50", "lcm", {}, 50),
    ("lcm_original_steps_20_7", "lcm", {"original_inference_steps": 20}, 7),
    ("lcm_vpred_clip_4", "lcm", {"prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.5}, 4),
    ("lcm_sample_pred_thresholding_4", "lcm", {"prediction_type": "sample", "thresholding": True}, 4),
    ("lcm_zero_snr_vpred_timestep_scaling_5_4", "lcm",
     {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_scaling": 5.0}, 4),
]


DDPM_CASES = [
    # DDPM: SD 1.5 as shipped (leading, steps_offset 1, no clipping): noise at every step, the last
    # one included (its timestep is 1 > 0).
    ("ddpm_sd15_leading_50", "ddpm", {}, 50),
    ("ddpm_leading_offset0_1", "ddpm", {"steps_offset": 0}, 1),
    ("ddpm_fixed_small_log_clip_10", "ddpm",
     {"variance_type": "fixed_small_log", "clip_sample": True, "steps_offset": 0}, 10),
    ("ddpm_fixed_large_linspace_10", "ddpm", {"variance_type": "fixed_large", "timestep_spacing": "linspace"}, 10),
    ("ddpm_clip_range_sample_pred_10", "ddpm",
     {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"}, 10),
    ("ddpm_thresholding_vpred_10", "ddpm",
     {"thresholding": True, "sample_max_value": 1.5, "prediction_type": "v_prediction"}, 10),
    (
        "ddpm_zero_snr_trailing_vpred_10",
        "ddpm",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
    ),
    ("ddpm_trailing_61_extra_step", "ddpm", {"timestep_spacing": "trailing"}, 61),
    ("ddpm_defaults_100", "ddpm",
     {"beta_schedule": "linear", "beta_start": _DROP, "beta_end": _DROP, "clip_sample": _DROP,
      "steps_offset": _DROP}, 100),
]


CASES = (
    DDIM_CASES + EULER_CASES + PNDM_CASES + EULER_ANCESTRAL_CASES + HEUN_CASES + LMS_CASES + DPM_SOLVER_CASES
    + UNIPC_CASES + LCM_CASES + DDPM_CASES
)

# Step counts of the timestep sweep; 61, 103 and 121 are trailing counts with an extra step.
SWEEP_STEPS = [1, 2, 3, 7, 20, 61, 100, 103, 121, 1000]
SWEEP_CASES = [
    ("ddim_leading", "ddim", {}),
    ("ddim_leading_offset0", "ddim", {"steps_offset": 0}),
    ("ddim_trailing", "ddim", {"timestep_spacing": "trailing"}),
    ("ddim_linspace", "ddim", {"timestep_spacing": "linspace"}),
    ("euler_linspace", "euler", {}),
    ("euler_leading", "euler", {"timestep_spacing": "leading"}),
    ("euler_trailing", "euler", {"timestep_spacing": "trailing"}),
    ("euler_karras", "euler", {"use_karras_sigmas": True}),
]


def hex_f32(t: torch.Tensor | np.ndarray) -> str:
    a = np.ascontiguousarray(np.asarray(t, dtype=np.float32)).reshape(-1)
    return "".join(format(int(b), "08x") for b in a.view(np.uint32))


def fake_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """Deterministic stand-in for the UNet; the runtime's test computes the same in float32."""
    return 0.3 * x + 0.05 * math.sin(t / 100)


def make_config(overrides: dict) -> dict:
    config = dict(SD15)
    for key, value in overrides.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def build(kind: str, config: dict, steps: int, options: dict | None = None):
    # A request's options win over the kind's preset, as `SchedulerConfig::set` in the runtime.
    scheduler = CLASSES[kind].from_config(config, **{**PRESETS.get(kind, {}), **(options or {})})
    scheduler.set_timesteps(steps)
    return scheduler


class RecordNoise:
    """Records every tensor the schedulers' ``randn_tensor`` returns while active.

    The scheduler modules import ``randn_tensor`` by name, so it is patched in each of them. The
    draws come from a seeded ``torch.Generator``; the runtime's test replays them in order.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []
        self.patched: list[tuple[object, object]] = []

    def __enter__(self):
        for module in {sys.modules[cls.__module__] for cls in CLASSES.values()}:
            original = getattr(module, "randn_tensor", None)
            if original is None:
                continue

            def recording(shape, generator=None, device=None, dtype=None, layout=None, _original=original):
                out = _original(shape, generator=self.generator, device=device, dtype=dtype, layout=layout)
                self.draws.append(out.clone())
                return out

            self.patched.append((module, original))
            module.randn_tensor = recording
        return self

    def __exit__(self, *exc):
        for module, original in self.patched:
            module.randn_tensor = original


def trace(
    name: str, kind: str, config: dict, steps: int, step_kwargs: dict | None = None, options: dict | None = None
) -> dict:
    rng = np.random.default_rng(SEED)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    original = rng.standard_normal(SHAPE).astype(np.float32)
    step_kwargs = step_kwargs or {}

    scheduler = build(kind, config, steps, options)
    init_noise_sigma = scheduler.init_noise_sigma
    sample = torch.from_numpy(noise) * init_noise_sigma
    trajectory = []
    with RecordNoise(SEED) as recorder:
        for i, t in enumerate(scheduler.timesteps):
            scaled = scheduler.scale_model_input(sample, t)
            model_output = fake_model(scaled, float(t))
            step_input = sample
            sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
            entry = {"sample": hex_f32(sample)}
            if scaled is not step_input:  # samplers whose scale_model_input is not the identity
                entry["scaled"] = hex_f32(scaled)
            trajectory.append(entry)

    n = len(scheduler.timesteps)
    add_noise = []
    for k in sorted({0, n // 2, n - 1}):
        fresh = build(kind, config, steps, options)
        noisy = fresh.add_noise(torch.from_numpy(original), torch.from_numpy(noise), fresh.timesteps[k : k + 1])
        add_noise.append({"step": k, "result": hex_f32(noisy)})

    out = {
        "name": name,
        "class": CLASSES[kind].__name__,
        "kind": kind,
        "steps": steps,
        "config": config,
        "order": scheduler.order,
        "timesteps": [float(np.float32(t)) for t in scheduler.timesteps.numpy().astype(np.float32)],
        "init_noise_sigma": float(np.float32(init_noise_sigma)),
        "shape": list(SHAPE),
        "noise": hex_f32(noise),
        "original": hex_f32(original),
        "trajectory": trajectory,
        "add_noise": add_noise,
    }
    if step_kwargs:
        out["step_kwargs"] = step_kwargs
    if options:
        out["options"] = options
    if recorder.draws:
        out["noise_draws"] = [hex_f32(d) for d in recorder.draws]
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        out["sigmas"] = [float(s) for s in scheduler.sigmas.numpy().astype(np.float32)]
    return out


def sweep() -> dict:
    cases = []
    for name, kind, overrides in SWEEP_CASES:
        config = make_config(overrides)
        for steps in SWEEP_STEPS:
            scheduler = build(kind, config, steps)
            case = {"name": name, "kind": kind, "steps": steps, "config": config,
                    "timesteps": hex_f32(scheduler.timesteps.numpy().astype(np.float32))}
            if kind == "ddim" and int(scheduler.timesteps.max()) >= scheduler.config.num_train_timesteps:
                # e.g. leading + steps_offset 1 + 1000 steps: timestep 1000. set_timesteps accepts it,
                # `step` then fails indexing alphas_cumprod; the runtime refuses to build it.
                try:
                    t = scheduler.timesteps[0]
                    scheduler.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE))
                except IndexError:
                    case["step_fails"] = True
                else:
                    raise AssertionError(f"{name} {steps}: expected step() to fail")
            if kind == "euler":
                case["sigmas"] = hex_f32(scheduler.sigmas)
                case["init_noise_sigma"] = float(np.float32(scheduler.init_noise_sigma))
            cases.append(case)
    return {"cases": cases}


def pndm_loaded_config() -> dict:
    """SD15 as diffusers holds it after loading it as PNDM: with `_use_default_values`."""
    config = dict(PNDMScheduler.from_config(SD15).config)
    config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def write_json_gz(path: Path, data, indent: int | None = 1) -> None:
    """`data` as JSON text, gzipped with an empty name and mtime 0 (the same bytes every run)."""
    text = json.dumps(data, indent=indent) + "\n"
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    for name, kind, overrides, steps, *step_kwargs in CASES + DDIM_ETA_CASES:
        data = trace(name, kind, make_config(overrides), steps, *step_kwargs)
        write_json_gz(args.out / f"{name}.json.gz", data)
    for name, kind, overrides, steps, options in OPTION_CASES:
        data = trace(name, kind, make_config(overrides), steps, options=options)
        write_json_gz(args.out / f"{name}.json.gz", data)

    # The PNDM-loaded config: its `timestep_spacing` ("leading", PNDM's default) is listed in
    # `_use_default_values`, so Euler takes its own default, linspace.
    data = trace("euler_pndm_loaded_config_10", "euler", pndm_loaded_config(), 10)
    assert data["config"]["timestep_spacing"] == "leading" and data["timesteps"][0] == 999.0
    write_json_gz(args.out / "euler_pndm_loaded_config_10.json.gz", data)

    write_json_gz(args.out / "timestep_sweep.json.gz", sweep(), indent=None)


if __name__ == "__main__":
    main()
