#!/usr/bin/env python3
"""Side-by-side latency of t2i-rt (ort-cpu, openvino, tract), diffusers (PyTorch CPU), and Python
onnxruntime and OpenVINO.

Every system gets the same weights, prompt, initial latents and adapter condition image:

- `diffusers`: StableDiffusionAdapterPipeline (StableDiffusionPipeline without adapter) on the
  diffusers checkpoint the graph set was exported from, torch.set_num_threads(N).
- `python-ort`: the graph set's ONNX graphs in onnxruntime.InferenceSession (intra_op_num_threads=N)
  driven by a Python loop with diffusers' scheduler, CFG batch of 2 (how optimum's ORT pipelines work).
- `python-openvino`: the same graphs and loop on OpenVINO's own runtime (`openvino.Core`, CPU,
  INFERENCE_NUM_THREADS=N, f32): what optimum-intel's OpenVINO pipelines run, and what a CPU user
  would pick instead of t2i-rt.
- `t2i-rt ort-cpu`, `t2i-rt openvino`, `t2i-rt tract`: the binary (`t2i-rt run` for the image check;
  `t2i-rt bench` for timing when the binary has it, else `t2i-rt run`'s wall time, start-up and model
  load included).

It first checks that every system draws diffusers' image from the same latents (final latents
relative L2 <= 1e-4 for ort-based and OpenVINO f32 systems, <= 1e-3 for tract; pixels within 2/255:
the project's parity tolerances) and refuses to time anything otherwise. Reduced-precision systems
(`openvino-bf16`, `python-openvino-bf16`: OpenVINO with INFERENCE_PRECISION_HINT bf16; the `-int8`
ones: the graph set's INT8 variants, `--precision int8`, from `python -m t2i_export calibrate`, which
compare.py runs once into WORK/SET-int8 unless given `--int8-graphs`) cannot meet those bounds: their
distance to diffusers' fp32 result (final-latents relative L2, image PSNR) is measured and reported
instead. The bf16 ones are left out, with a note, on CPUs without bf16 instructions.
Then it times the systems round-robin (one run of each per round, several rounds, so machine noise
hits all alike) at several step counts, and writes a markdown section into RESULTS.md (between
markers) and a latency-vs-steps plot.

    .venv/bin/python benches/compare.py                       # small preset, steps 5 10 20 30
    .venv/bin/python benches/compare.py --quick --binary target/debug/t2i-rt   # smoke run, tiny set
    .venv/bin/python benches/compare.py --conditioning        # adapter vs ControlNet, 30 steps

`--conditioning` measures the case for adapters instead: the small preset with a T2I-Adapter and a
ControlNet of the same UNet (`ControlNetModel.from_unet`), end-to-end time at 30 steps for no
conditioning, the adapter, the ControlNet and both, for t2i-rt and diffusers
(StableDiffusionPipeline, StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline, and for
both the reference loop over diffusers' components: no diffusers pipeline runs both); and what the
ControlNet inputs cost the UNet when unused (plain text-to-image on the set with ControlNet inputs vs
the set without). An adapter runs once per image, a ControlNet at every step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

BEGIN, END = "<!-- compare.py:begin -->", "<!-- compare.py:end -->"
CONDITIONING_BEGIN, CONDITIONING_END = "<!-- compare.py:conditioning:begin -->", "<!-- compare.py:conditioning:end -->"
CONTROL_SCALE = 1.0
PROMPT = "a red house on a hill, oil painting"
NEGATIVE = ""
GUIDANCE = 7.5
ADAPTER_WEIGHT = 1.0
LATENT_SEED = 0
# The project's parity tolerances (README): final latents relative L2 and max pixel difference.
REL_L2 = {"ort": 1e-4, "tract": 1e-3}
# Systems whose --systems name is "<name>-bf16" or "<name>-int8" compute in reduced precision and are
# held to no bound (their distance to diffusers' fp32 is reported).
BF16, INT8 = "-bf16", "-int8"
MAX_PIXEL_DIFF = 2


class CompareError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Inputs: graph set + the diffusers checkpoint it came from, latents, condition image


@dataclass
class Source:
    graphs: Path
    model_dir: Path
    adapter_dirs: dict[str, Path]
    description: str
    controlnet_dirs: dict[str, Path] = field(default_factory=dict)


def _open_clip_wheel_env() -> None:
    """The exporter needs the open_clip wheel for the CLIP vocabulary; scripts/setup-python.sh puts it here."""
    if os.environ.get("T2I_OPEN_CLIP_WHEEL"):
        return
    wheels = sorted((REPO / ".cache" / "wheels").glob("open_clip_torch-3.3.0-*.whl"))
    if wheels:
        os.environ["T2I_OPEN_CLIP_WHEEL"] = str(wheels[0])


def prepare_tiny(work: Path) -> Source:
    """The committed tiny set; its diffusers checkpoint is rebuilt deterministically (t2i_export.tiny)."""
    from t2i_export.tiny import ADAPTER_CONFIGS, write_checkpoint

    ckpt = work / "tiny-checkpoint"
    model_dir = ckpt / "tiny-sd1"
    if not (model_dir / "model_index.json").is_file():
        _open_clip_wheel_env()
        write_checkpoint(ckpt)
    adapters = {n: ckpt / "adapters" / n for n in ADAPTER_CONFIGS}
    return Source(REPO / "graphs" / "tiny-sd1", model_dir, adapters, "tiny-sd1 (committed tiny set, random weights)")


def prepare_small(work: Path, adapter_preset: str, seed: int, controlnet: bool = False) -> Source:
    """`python -m t2i_export random --preset small --save-diffusers`, reused when already there; with
    `controlnet`, a separate set whose UNet also takes ControlNet residuals, and the ControlNet."""
    from t2i_export.random_preset import export_random

    tag = "small-control" if controlnet else "small"
    graphs, ckpt = work / f"{tag}-graphs", work / f"{tag}-diffusers"
    model_dir = ckpt / "random-small"
    stamp = work / f"{tag}-preset.json"
    # Regenerate when the preset's code changes, not only its arguments.
    code = hashlib.sha256((REPO / "export" / "t2i_export" / "random_preset.py").read_bytes()).hexdigest()
    want = {"adapter_preset": adapter_preset, "seed": seed, "random_preset.py": code, "controlnet": controlnet}
    fresh = stamp.is_file() and json.loads(stamp.read_text()) == want
    if not (fresh and (graphs / "manifest.json").is_file() and (model_dir / "model_index.json").is_file()):
        _open_clip_wheel_env()
        print(f"exporting the small preset into {graphs} (+ diffusers checkpoint {ckpt}) ...", flush=True)
        stamp.unlink(missing_ok=True)
        export_random("small", [adapter_preset], graphs, None, seed, save_diffusers=ckpt, controlnet=controlnet)
        stamp.write_text(json.dumps(want))
    controlnets = {"control": ckpt / "controlnets" / "control"} if controlnet else {}
    return Source(graphs, model_dir, {adapter_preset: ckpt / "adapters" / adapter_preset},
                  f"random-small (SD 1.5 architecture scaled down, random weights, seed {seed})", controlnets)


@dataclass(frozen=True)
class Case:
    steps: int
    adapter: str | None  # adapter name, or None for a plain text-to-image run
    width: int
    height: int
    control: str | None = None  # ControlNet name (--conditioning)

    @property
    def label(self) -> str:
        return {(False, False): "none", (True, False): "adapter", (False, True): "ControlNet",
                (True, True): "adapter + ControlNet"}[(self.adapter is not None, self.control is not None)]


@dataclass
class Inputs:
    latents: Path  # [1, C, h, w] float32 .npy
    condition: dict[str, Path]  # adapter name -> PNG at the output size
    control: Path | None = None  # RGB PNG at the output size, for ControlNets


def write_inputs(work: Path, manifest: dict, width: int, height: int) -> Inputs:
    import torch
    from PIL import Image, ImageDraw

    down, channels = manifest["latent"]["downscale"], manifest["latent"]["channels"]
    gen = torch.Generator().manual_seed(LATENT_SEED)
    latents = torch.randn((1, channels, height // down, width // down), generator=gen, dtype=torch.float32)
    lat_path = work / f"latents-{width}x{height}.npy"
    np.save(lat_path, latents.numpy())
    # A sketch-like condition: white strokes on black, the same picture in each adapter's channels.
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    s = min(width, height)
    draw.rectangle([width * 0.25, height * 0.45, width * 0.75, height * 0.85], outline=255, width=max(1, s // 64))
    draw.polygon([(width * 0.2, height * 0.45), (width * 0.5, height * 0.15), (width * 0.8, height * 0.45)],
                 outline=255, width=max(1, s // 64))
    draw.ellipse([width * 0.05, height * 0.05, width * 0.2, height * 0.2], outline=255, width=max(1, s // 96))
    conditions = {}
    for a in manifest["adapters"]:
        path = work / f"condition-{a['name']}-{width}x{height}.png"
        (image if a["condition"] == "gray" else image.convert("RGB")).save(path)
        conditions[a["name"]] = path
    control = None
    if manifest.get("controlnets"):
        control = work / f"control-{width}x{height}.png"
        image.convert("RGB").save(control)
    return Inputs(lat_path, conditions, control)


# ----------------------------------------------------------------------------------------------
# Systems. Each: generate(case) -> (final latents [1,C,h,w] float32, pixels [H,W,3] uint8);
# sample(case) -> seconds for one whole generation (+ optional details).


@dataclass
class Result:
    latents: np.ndarray
    pixels: np.ndarray


class Diffusers:
    name = "diffusers"
    tolerance = REL_L2["ort"]  # the reference itself

    def __init__(self, source: Source, inputs: Inputs, threads: int):
        import torch

        from t2i_export.reference import Oracle, load_condition

        torch.set_num_threads(threads)
        self.oracle = Oracle.load(source.model_dir, source.adapter_dirs, source.controlnet_dirs)
        self.inputs = inputs
        self.images = {n: load_condition(p) for n, p in inputs.condition.items()}
        self.control_image = load_condition(inputs.control) if inputs.control else None

    def _case(self, case: Case):
        import torch

        from t2i_export import reference

        adapters = [] if case.adapter is None else [{"name": case.adapter, "image": self.images[case.adapter], "weight": ADAPTER_WEIGHT}]
        controls = [] if case.control is None else [{"name": case.control, "image": self.control_image, "scale": CONTROL_SCALE}]
        return reference.Case(
            name="compare", prompt=PROMPT, negative_prompt=NEGATIVE, adapters=adapters, cond_tau=1.0, steps=case.steps,
            guidance=GUIDANCE, scheduler="ddim", width=case.width, height=case.height, n_samples=1,
            latents=torch.from_numpy(np.load(self.inputs.latents)),
            # adapter + ControlNet: no diffusers pipeline runs both; the loop over its components does
            reference="loop" if adapters and controls else "pipeline", controls=controls,
        )

    def _run(self, case: Case) -> Result:
        from t2i_export.reference import decode_images, run

        latents, _ = run(self.oracle, self._case(case))  # output_type="latent" ...
        pixels = decode_images(self.oracle, latents)  # ... + the pipeline's own decode and postprocess
        return Result(latents.numpy(), pixels[0])

    def generate(self, case: Case) -> Result:
        return self._run(case)

    def sample(self, case: Case) -> tuple[float, dict]:
        c = self._case(case)  # inputs ready before the clock starts, as for the other systems
        from t2i_export.reference import decode_images, run

        gc.collect()
        t0 = time.perf_counter()
        latents, _ = run(self.oracle, c)
        decode_images(self.oracle, latents)
        return time.perf_counter() - t0, {}


class PythonOrt:
    """optimum-style: one InferenceSession per graph, the scheduler and CFG in Python."""

    name = "python-ort"
    tolerance = REL_L2["ort"]

    def _opener(self, threads: int):
        """A function from a graph path to something with onnxruntime's `run(None, feeds)`."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return lambda path: ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def __init__(self, source: Source, inputs: Inputs, threads: int, variant: str | None = None):
        """`variant` (`int8`): run each graph's variant of that name where the set has one (docs/manifest.md)."""
        from transformers import CLIPTokenizer

        if variant is not None:
            self.name, self.tolerance = f"{self.name}-{variant}", None
        self.m = json.loads((source.graphs / "manifest.json").read_text(encoding="utf-8"))
        opener = self._opener(threads)

        def session(spec: dict):
            return opener(source.graphs / spec.get("variants", {}).get(variant, spec)["file"])

        self.sess = {k: session(g) for k, g in self.m["graphs"].items()}
        (text_encoder,) = self.m["text_encoders"]  # SD 1.x: one encoder (manifest format 2)
        self.sess["text_encoder"] = session(text_encoder["graph"])
        self.adapters = {a["name"]: a for a in self.m["adapters"]}
        for a in self.m["adapters"]:
            self.sess["adapter_" + a["name"]] = session(a["graph"])
        self.tokenizer = CLIPTokenizer.from_pretrained(str(source.model_dir / "tokenizer"))
        self.inputs = inputs

    def _run(self, case: Case) -> Result:
        import torch
        from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image
        from PIL import Image

        from t2i_export.scheduler_traces import CLASSES, PRESETS

        def encode(text: str) -> np.ndarray:
            ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="np").input_ids.astype(np.int64)
            return self.sess["text_encoder"].run(None, {"input_ids": ids})[0]

        embeds = np.concatenate([encode(NEGATIVE), encode(PROMPT)])  # [uncond, cond], as diffusers
        slots = self.m["residual_slots"]
        h, w = case.height // self.m["latent"]["downscale"], case.width // self.m["latent"]["downscale"]
        if case.adapter is None:  # zeros are exactly "no adapter" (docs/manifest.md)
            residuals = [np.zeros((2, s["channels"], h // s["downscale"], w // s["downscale"]), np.float32) for s in slots]
        else:
            spec = self.adapters[case.adapter]
            image = Image.open(self.inputs.condition[case.adapter])
            x = _preprocess_adapter_image(image, case.height, case.width).numpy()
            feats = self.sess["adapter_" + case.adapter].run(None, {"condition": x})
            residuals = [None] * len(slots)
            for slot, f in zip(spec["residual_slots"], feats):
                residuals[slot] = np.concatenate([f * np.float32(ADAPTER_WEIGHT)] * 2)  # CFG batch
        feeds_fixed = {"encoder_hidden_states": embeds, **{s["input"]: r for s, r in zip(slots, residuals)}}
        # A UNet with ControlNet inputs and no ControlNet in the request: zeros are exactly "none".
        for c in self.m.get("control_slots", []):
            feeds_fixed[c["input"]] = np.zeros((2, c["channels"], h // c["downscale"], w // c["downscale"]), np.float32)

        scheduler = CLASSES["ddim"].from_config(self.m["scheduler"], **PRESETS.get("ddim", {}))
        scheduler.set_timesteps(case.steps)
        latents = torch.from_numpy(np.load(self.inputs.latents)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = self.sess["unet"].run(None, {"sample": model_input.numpy(), "timestep": np.full(2, float(t), np.float32),
                                                 **feeds_fixed})[0]
            uncond, text = torch.from_numpy(noise).chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (text - uncond), t, latents, eta=0.0).prev_sample
        image = self.sess["vae_decoder"].run(None, {"latent_sample": (latents / self.m["vae"]["scaling_factor"]).numpy()})[0]
        pixels = (np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        return Result(latents.numpy(), pixels[0])

    def generate(self, case: Case) -> Result:
        return self._run(case)

    def sample(self, case: Case) -> tuple[float, dict]:
        gc.collect()
        t0 = time.perf_counter()
        self._run(case)
        return time.perf_counter() - t0, {}


class PythonOpenVino(PythonOrt):
    """The same loop on OpenVINO's own runtime: one compiled model per graph (CPU, LATENCY hint)."""

    def __init__(self, source: Source, inputs: Inputs, threads: int, precision: str = "f32"):
        # int8: the set's INT8 variants under the f32 hint (the quantized layers carry their precision).
        self.precision = "f32" if precision == "int8" else precision
        self.name = "python-openvino" + ("" if precision in ("f32", "int8") else f"-{precision}")
        self.tolerance = REL_L2["ort"] if precision == "f32" else None
        super().__init__(source, inputs, threads, "int8" if precision == "int8" else None)

    def _opener(self, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": self.precision,
                  "PERFORMANCE_HINT": "LATENCY"}

        class Session:
            def __init__(self, path: Path):
                self.request = core.compile_model(str(path), "CPU", config).create_infer_request()

            def run(self, _names, feeds: dict) -> list:
                self.request.infer(feeds)
                return [t.data.copy() for t in self.request.output_tensors]

        return Session


def calibrated(graphs: Path, work: Path, binary: Path) -> Path:
    """WORK/SET-int8: `graphs` calibrated to INT8 (made once; remove it to make it again)."""
    out = work / f"{graphs.name}-int8"
    if not (out / "manifest.json").is_file():
        print(f"calibrating {graphs} to INT8 into {out} ...", flush=True)
        cmd = [sys.executable, "-m", "t2i_export", "calibrate", "--graphs", str(graphs), "--out", str(out),
               "--t2i-rt", str(binary)]
        if subprocess.run(cmd, cwd=REPO / "export").returncode != 0:
            raise CompareError(f"{' '.join(cmd)} failed")
    return out


def cpu_has_bf16() -> bool:
    """Whether OpenVINO computes bf16 here (AVX512_BF16 or AMX); elsewhere it would quietly use f32."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class T2iRt:
    def __init__(self, binary: Path, source: Source, inputs: Inputs, threads: int, backend: str, work: Path,
                 precision: str = "f32"):
        self.binary, self.graphs, self.inputs, self.threads, self.backend = binary, source.graphs, inputs, threads, backend
        self.precision = precision
        self.name = f"t2i-rt {backend}" + ("" if precision == "f32" else f"-{precision}")
        self.tolerance = None if precision != "f32" else REL_L2["tract" if backend == "tract" else "ort"]
        self.out = work / "t2i-rt-out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.has_bench = subprocess.run([str(binary), "bench", "--help"], capture_output=True).returncode == 0
        self.timed_by = ("`t2i-rt bench` (stage `total`, warm-up run first; start-up and model load excluded)"
                         if self.has_bench else "`t2i-rt run` wall time (process start, model load and PNG write included, checksums skipped; threads: the backend's default, this binary has no `bench`)")

    def _adapter_args(self, case: Case) -> list[str]:
        args = []
        if case.adapter is not None:
            args += ["--adapter", f"{case.adapter}={self.inputs.condition[case.adapter]}:{ADAPTER_WEIGHT}"]
        if case.control is not None:
            args += ["--control", f"{case.control}={self.inputs.control}:{CONTROL_SCALE}"]
        return args

    def _run_cmd(self, case: Case, stem: str) -> list[str]:
        return [
            str(self.binary), "run", "--graphs", str(self.graphs), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--steps", str(case.steps), "--scheduler", "ddim", "--guidance", str(GUIDANCE),
            "--width", str(case.width), "--height", str(case.height), "--latents", str(self.inputs.latents),
            "--save-latents", str(self.out / f"{stem}.npy"), "--out", str(self.out / f"{stem}.png"),
            "--backend", self.backend, "--seed", "0", *self._precision_args(), *self._adapter_args(case),
        ]

    def _precision_args(self) -> list[str]:
        return [] if self.precision == "f32" else ["--precision", self.precision]

    def _call(self, cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise CompareError(f"{' '.join(cmd)}\nexited {r.returncode}: {r.stderr.strip()}")

    def generate(self, case: Case) -> Result:
        from PIL import Image

        stem = f"{self.backend}-{self.precision}-{case.steps}-{case.adapter or 'none'}-{case.control or 'none'}"
        self._call(self._run_cmd(case, stem))
        pixels = np.asarray(Image.open(self.out / f"{stem}.png").convert("RGB"))
        return Result(np.load(self.out / f"{stem}.npy"), pixels)

    def sample(self, case: Case) -> tuple[float, dict]:
        return self._sample_bench(case) if self.has_bench else self._sample_run(case)

    def _sample_run(self, case: Case) -> tuple[float, dict]:
        cmd = self._run_cmd(case, f"timed-{self.backend}-{self.precision}") + ["--no-verify"]  # as `bench`: no checksums in the time
        t0 = time.perf_counter()
        self._call(cmd)
        return time.perf_counter() - t0, {}

    def _sample_bench(self, case: Case) -> tuple[float, dict]:
        """One measured run after one warm-up, in a fresh process. With an adapter, `t2i-rt bench` also
        times the same request without it (`without_adapters`): that sample is kept as the plain case's."""
        js = self.out / f"bench-{self.backend}-{self.precision}.json"
        js.unlink(missing_ok=True)
        self._call([
            str(self.binary), "bench", "--graphs", str(self.graphs), "--backend", self.backend, "--steps", str(case.steps),
            "--size", f"{case.width}x{case.height}", "--scheduler", "ddim", "--prompt", PROMPT, "--guidance", str(GUIDANCE),
            "--warmup", "1", "--iters", "1", "--threads", str(self.threads), "--json", str(js), *self._precision_args(),
            *self._adapter_args(case),
        ])
        report = json.loads(js.read_text(encoding="utf-8"))
        stages = {k: v["median"] for k, v in report["stages_ms"].items()}
        details = {"stages_ms": stages, "startup_ms": report.get("startup_ms"), "peak_rss_mb": report.get("peak_rss_mb")}
        without = report.get("without_adapters", {}).get("stages_ms", {}).get("total")
        if case.adapter is not None and case.control is None and without:
            details["plain_s"] = without["median"] / 1000.0
        return stages["total"] / 1000.0, details


# ----------------------------------------------------------------------------------------------
# Parity, timing, report


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def check_parity(systems: list, reference: Diffusers, cases: list[Case]) -> list[dict]:
    """Every system against diffusers, for every case; doubles as each system's warm-up run."""
    rows, failures = [], []
    for case in cases:
        want = reference.generate(case)
        for s in systems:
            if s is reference or (case.adapter is None and not s.name.startswith("t2i-rt")):
                continue
            if case.control is not None and not s.name.startswith("t2i-rt"):  # the Python loops have no ControlNet
                continue
            got = s.generate(case)
            if got.latents.shape != want.latents.shape or got.pixels.shape != want.pixels.shape:
                raise CompareError(f"{s.name}, {case}: shapes {got.latents.shape}/{got.pixels.shape}, "
                                   f"diffusers {want.latents.shape}/{want.pixels.shape}")
            rel = rel_l2(got.latents, want.latents)
            px = int(np.abs(got.pixels.astype(int) - want.pixels.astype(int)).max())
            # Reduced precision (tolerance None) is measured, not held to the fp32 bounds.
            ok = s.tolerance is None or (rel <= s.tolerance and px <= MAX_PIXEL_DIFF)
            row = {"system": s.name, "steps": case.steps, "adapter": case.adapter, "control": case.control, "rel_l2": rel,
                   "tolerance": s.tolerance, "max_pixel_diff": px, "psnr_db": psnr(got.pixels, want.pixels), "ok": ok}
            rows.append(row)
            bound = "measured" if s.tolerance is None else f"<= {s.tolerance:g}, max px <= {MAX_PIXEL_DIFF}"
            print(f"  parity {s.name:15s} steps {case.steps:3d} {case.label:20s} rel L2 {rel:.2e} max px {px} "
                  f"PSNR {row['psnr_db']:.1f} dB ({bound}) {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(row)
    if failures:
        raise CompareError("not the same image as diffusers, so no times are reported: " + "; ".join(
            f"{r['system']} steps {r['steps']} adapter {r['adapter']} control {r.get('control')}: rel L2 {r['rel_l2']:.3g} (max {r['tolerance']:g}), "
            f"max pixel diff {r['max_pixel_diff']} (max {MAX_PIXEL_DIFF})" for r in failures))
    return rows


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def time_round_robin(jobs: list[tuple], rounds: int) -> dict:
    """jobs: (system, case). Each round runs every job once, in order; returns {(system name, case): [samples]}."""
    samples: dict = {(s.name, c): [] for s, c in jobs}
    details: dict = {(s.name, c): [] for s, c in jobs}
    for r in range(rounds):
        t_round = time.perf_counter()
        covered = set()  # plain cases a system already timed this round along with the adapter case
        for s, c in jobs:
            if (s.name, c) in covered:
                continue
            sec, d = s.sample(c)
            samples[(s.name, c)].append(sec)
            details[(s.name, c)].append(d)
            if "plain_s" in d:
                plain = replace(c, adapter=None, control=None)
                if (s.name, plain) in samples:
                    samples[(s.name, plain)].append(d["plain_s"])
                    details[(s.name, plain)].append({})
                    covered.add((s.name, plain))
        print(f"  round {r + 1}/{rounds} done in {time.perf_counter() - t_round:.1f} s", flush=True)
    return {"samples": samples, "details": details}


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def versions(binary: Path) -> dict:
    import diffusers
    import onnxruntime
    import openvino
    import torch

    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    g = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"t2i-rt": r.stdout.strip().split()[-1] if r.returncode == 0 and r.stdout.strip() else "?",
            "commit": g.stdout.strip() if g.returncode == 0 else "?",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__.split("-")[0]}


def summarize(timing: dict, systems: list, steps: list[int], adapter: str | None, size: tuple[int, int]) -> list[dict]:
    rows = []
    w, h = size
    for st in steps:
        main = Case(st, adapter, w, h)
        base = timing["samples"].get(("diffusers", main))
        base_med = float(np.median(base)) if base else None
        for s in systems:
            xs = timing["samples"].get((s.name, main))
            if not xs:
                continue
            med = float(np.median(xs))
            row = {"system": s.name, "steps": st, "median_s": med, "p90_s": percentile(xs, 90), "min_s": min(xs), "n": len(xs),
                   "ratio": med / base_med if base_med else None}
            plain = timing["samples"].get((s.name, Case(st, None, w, h))) if adapter is not None else None
            if plain:
                row["no_adapter_median_s"] = float(np.median(plain))
            ds = [d for d in timing["details"][(s.name, main)] if d.get("stages_ms")]
            if ds:
                row["stages_ms"] = {k: float(np.median([d["stages_ms"][k] for d in ds])) for k in ds[0]["stages_ms"]}
                row["startup_ms"] = ds[0].get("startup_ms")
                row["peak_rss_mb"] = max((d.get("peak_rss_mb") or 0) for d in ds) or None
            rows.append(row)
    return rows


def markdown(rows: list[dict], parity: list[dict], meta: dict) -> str:
    m = meta["machine"]
    v = meta["versions"]
    w, h = meta["size"]
    adapter = f"adapter `{meta['adapter']}` (weight {ADAPTER_WEIGHT})" if meta["adapter"] else "no adapter"
    out = [
        BEGIN,
        "## t2i-rt vs diffusers vs Python onnxruntime and OpenVINO (`benches/compare.py`)",
        "",
        f"Written by `{meta['command']}` on {m['date']}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} logical cores; **threads: {m['threads']}** per system"
        f" (torch.set_num_threads, intra_op_num_threads, `--threads`).",
        f"- Model: {meta['source']}, {w}×{h}, DDIM, CFG {GUIDANCE}, {adapter}; same weights and initial latents"
        f" for every system.",
        f"- Versions: t2i-rt {v['t2i-rt']} (commit {v['commit']}), torch {v['torch']}, diffusers {v['diffusers']}, onnxruntime {v['onnxruntime']},"
        f" openvino {v.get('openvino', '?')} (the Python peers and t2i-rt use the same ONNX Runtime and OpenVINO releases).",
        f"- t2i-rt timed by {meta['timed_by']}; diffusers and the Python loops: one whole generation in-process"
        f" (models loaded once, before timing), image decoded to pixels.",
        f"- {meta['rounds']} rounds, round-robin over systems and step counts; median and p90 over rounds.",
        f"- Parity first: every f32 system drew diffusers' image (final latents relative L2 ≤ {REL_L2['ort']:g} ort"
        f" and OpenVINO, ≤ {REL_L2['tract']:g} tract; pixels within {MAX_PIXEL_DIFF}/255); reduced precision is"
        f" measured against diffusers' fp32 image, not bounded.",
        *[f"- {n}" for n in meta.get("notes", [])],
        "",
        "Distance to diffusers' fp32 result (worst over the step counts):",
        "",
        "| system | final latents rel L2 | max pixel diff | PSNR dB |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {max(p['rel_l2'] for p in parity if p['system'] == name):.1e}"
          f" | {max(p['max_pixel_diff'] for p in parity if p['system'] == name)}"
          f" | {min(p['psnr_db'] for p in parity if p['system'] == name):.1f} |"
          for name in dict.fromkeys(p["system"] for p in parity)],
        "",
        "| system | steps | median s | p90 s | × diffusers time | adapter overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "–"
        if "no_adapter_median_s" in r:
            d = r["median_s"] - r["no_adapter_median_s"]
            overhead = f"{d * 1000:+.0f} ms ({d / r['no_adapter_median_s'] * 100:+.1f} %)"
        else:
            overhead = "–"
        out.append(f"| {r['system']} | {r['steps']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {ratio} | {overhead} |")
    staged = [r for r in rows if r.get("stages_ms")]
    if staged:
        stage_names = list(staged[0]["stages_ms"])
        out += ["", "t2i-rt stages (median ms per run; startup = model load, peak RSS of the bench process):", "",
                "| system | steps | " + " | ".join(stage_names) + " | startup ms | peak RSS MB |",
                "|---|---:|" + "---:|" * (len(stage_names) + 2)]
        for r in staged:
            cells = " | ".join(f"{r['stages_ms'][k]:.1f}" for k in stage_names)
            su = f"{r['startup_ms']:.0f}" if r.get("startup_ms") is not None else "–"
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "–"
            out.append(f"| {r['system']} | {r['steps']} | {cells} | {su} | {rss} |")
    out += ["", f"![latency vs steps]({meta['plot_rel']})", "", END]
    return "\n".join(out) + "\n"


def conditioning_rows(timing: dict, systems: list, cases: list[Case], plain_rt) -> list[dict]:
    """Per system and conditioning: median and p90, relative to the same system without conditioning
    and to diffusers with the same conditioning."""
    rows = []
    for s in systems:
        for c in cases:
            xs = timing["samples"].get((s.name, c))
            if not xs:
                continue
            none = timing["samples"].get((s.name, replace(c, adapter=None, control=None)))
            ref = timing["samples"].get(("diffusers", c))
            med = float(np.median(xs))
            row = {"system": s.name, "conditioning": c.label, "steps": c.steps, "median_s": med, "p90_s": percentile(xs, 90),
                   "n": len(xs), "vs_none": med / float(np.median(none)) if none else None,
                   "vs_diffusers": med / float(np.median(ref)) if ref else None}
            ds = [d for d in timing["details"][(s.name, c)] if d.get("stages_ms")]
            if ds:
                row["stages_ms"] = {k: float(np.median([d["stages_ms"][k] for d in ds])) for k in ds[0]["stages_ms"]}
            rows.append(row)
    if plain_rt is not None:
        for c in cases:
            xs = timing["samples"].get((plain_rt.name, c))
            if xs:
                ds = [d for d in timing["details"][(plain_rt.name, c)] if d.get("stages_ms")]
                rows.append({"system": plain_rt.name, "conditioning": c.label, "steps": c.steps, "median_s": float(np.median(xs)),
                             "p90_s": percentile(xs, 90), "n": len(xs), "vs_none": 1.0, "vs_diffusers": None,
                             **({"stages_ms": {k: float(np.median([d["stages_ms"][k] for d in ds])) for k in ds[0]["stages_ms"]}}
                                if ds else {})})
    return rows


def conditioning_markdown(rows: list[dict], parity: list[dict], meta: dict) -> str:
    m, v = meta["machine"], meta["versions"]
    w, h = meta["size"]
    out = [
        CONDITIONING_BEGIN,
        "## The case for adapters: T2I-Adapter vs ControlNet (`benches/compare.py --conditioning`)",
        "",
        f"Written by `{meta['command']}` on {m['date']}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} logical cores; **threads: {m['threads']}** per system.",
        f"- Model: {meta['source']}, {w}×{h}, DDIM, {meta['steps']} steps, CFG {GUIDANCE}; adapter `{meta['adapter']}`"
        f" (weight {ADAPTER_WEIGHT}); ControlNet `ControlNetModel.from_unet` of the same UNet (scale {CONTROL_SCALE}).",
        f"- Versions: t2i-rt {v['t2i-rt']} (commit {v['commit']}), torch {v['torch']}, diffusers {v['diffusers']},"
        f" onnxruntime {v['onnxruntime']}.",
        f"- t2i-rt timed by {meta['timed_by']}; diffusers: one whole generation in-process (StableDiffusionPipeline,"
        " StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline; adapter + ControlNet: the reference loop"
        " over diffusers' components, `reference._denoise`, as no diffusers pipeline runs both).",
        f"- {meta['rounds']} rounds, round-robin; median and p90 over rounds. Parity first (latents rel L2 ≤"
        f" {REL_L2['ort']:g}, pixels within {MAX_PIXEL_DIFF}/255); worst measured:"
        + "".join(f" {name} {max(p['rel_l2'] for p in parity if p['system'] == name):.1e} /"
                  f" {max(p['max_pixel_diff'] for p in parity if p['system'] == name)} px;"
                  for name in dict.fromkeys(p["system"] for p in parity)).rstrip(";") + ".",
        "",
        "| system | conditioning | median s | p90 s | × same system, none | × diffusers, same conditioning |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_none = f"{r['vs_none']:.2f}" if r.get("vs_none") is not None else "–"
        vs_ref = f"{r['vs_diffusers']:.2f}" if r.get("vs_diffusers") is not None else "–"
        out.append(f"| {r['system']} | {r['conditioning']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {vs_none} | {vs_ref} |")
    unused = meta.get("unused_control_inputs")
    if unused:
        out += ["", f"Unused ControlNet inputs (t2i-rt ort-cpu, no conditioning, the set with ControlNet inputs vs the same"
                    f" weights exported without them): total {unused['total']:+.1f} %, UNet stage {unused['unet']:+.1f} %"
                    f" (medians over {meta['rounds']} rounds; the target is ≤ 1 %)."]
    out += ["", f"![conditioning cost]({meta['plot_rel']})", "", CONDITIONING_END]
    return "\n".join(out) + "\n"


def conditioning_plot(path: Path, rows: list[dict], title: str) -> None:
    """Grouped bars: seconds per image for each conditioning, one bar per system (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 900, 520, 80, 30, 70, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    labels = list(dict.fromkeys(r["conditioning"] for r in rows))
    ymax = max(r["p90_s"] for r in rows) * 1.35  # room for the legend above the bars
    group = (W - left - right) / len(labels)
    bar = group * 0.8 / len(systems)

    def Y(v: float) -> float:
        return H - bottom - v / ymax * (H - top - bottom)

    d.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    d.text((W / 2, 16), title, fill="black", font=font, anchor="mm")
    d.text((12, top - 24), "seconds per image (median; line: p90)", fill="black", font=font, anchor="lm")
    for gi, label in enumerate(labels):
        d.text((left + group * (gi + 0.5), H - bottom + 10), label, fill="black", font=font, anchor="mt")
        for si, name in enumerate(systems):
            r = next((r for r in rows if r["system"] == name and r["conditioning"] == label), None)
            if r is None:
                continue
            x0 = left + group * gi + group * 0.1 + bar * si
            color = COLORS.get(name, (150, 150, 150))
            d.rectangle([x0, Y(r["median_s"]), x0 + bar * 0.9, Y(0)], fill=color)
            d.line([(x0 + bar * 0.45, Y(r["median_s"])), (x0 + bar * 0.45, Y(r["p90_s"]))], fill="black")
            d.text((x0 + bar * 0.45, Y(r["p90_s"]) - 4), f"{r['median_s']:.2f}", fill="black", font=font, anchor="mb")
    for si, name in enumerate(systems):
        ly = top + 8 + si * 18
        d.rectangle([left + 10, ly - 6, left + 25, ly + 6], fill=COLORS.get(name, (150, 150, 150)))
        d.text((left + 32, ly), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run_conditioning(args, work: Path, binary: Path, results: Path, argv) -> None:
    """`--conditioning`: see the module docstring."""
    steps = args.steps or [30]
    rounds = args.rounds or 5
    plot_path = args.plot or REPO / "benches" / "conditioning.png"
    source = prepare_small(work, args.adapter_preset, args.seed, controlnet=True)
    plain_source = prepare_small(work, args.adapter_preset, args.seed)
    manifest = json.loads((source.graphs / "manifest.json").read_text(encoding="utf-8"))
    width, height = args.size or tuple(manifest["default_size"])
    adapter, control = manifest["adapters"][0]["name"], manifest["controlnets"][0]["name"]
    inputs = write_inputs(work, manifest, width, height)
    print(f"loading systems (threads {args.threads}) ...", flush=True)
    reference = Diffusers(source, inputs, args.threads)
    systems: list = [reference] + [T2iRt(binary, source, inputs, args.threads, b, work) for b in ("ort-cpu", "tract")
                                   if b in args.systems]
    rt = [s for s in systems if isinstance(s, T2iRt)]
    (work / "plain").mkdir(parents=True, exist_ok=True)
    plain_rt = T2iRt(binary, plain_source, write_inputs(work / "plain", json.loads(
        (plain_source.graphs / "manifest.json").read_text(encoding="utf-8")), width, height), args.threads, "ort-cpu", work / "plain")
    plain_rt.name = "t2i-rt ort-cpu, UNet without ControlNet inputs"
    cases = [Case(st, a, width, height, c) for st in steps for a, c in
             [(None, None), (adapter, None), (None, control), (adapter, control)]]
    print("checking that every system draws diffusers' image ...", flush=True)
    parity = check_parity(systems, reference, cases)
    parity += check_parity([reference, plain_rt], reference, [c for c in cases if c.label == "none"])
    jobs = [(s, c) for c in cases for s in systems] + [(plain_rt, c) for c in cases if c.label == "none"]
    print(f"timing {rounds} rounds of {len(jobs)} jobs ...", flush=True)
    timing = time_round_robin(jobs, rounds)
    rows = conditioning_rows(timing, systems, cases, plain_rt)
    for r in rows:
        print(f"  {r['system']:48s} {r['conditioning']:20s} median {r['median_s']:.3f} s, p90 {r['p90_s']:.3f} s")
    meta = {
        "command": "python benches/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(args.threads), "versions": versions(binary), "size": [width, height], "adapter": adapter,
        "source": source.description, "rounds": rounds, "steps": steps[0] if len(steps) == 1 else steps,
        "timed_by": rt[0].timed_by if rt else "–", "plot_rel": os.path.relpath(plot_path, results.parent),
    }
    with_inputs = next((r for r in rows if r["system"] == "t2i-rt ort-cpu" and r["conditioning"] == "none"), None)
    without = next((r for r in rows if r["system"] == plain_rt.name), None)
    if with_inputs and without:
        unet = [r.get("stages_ms", {}).get("unet_step") for r in (with_inputs, without)]
        meta["unused_control_inputs"] = {
            "total": (with_inputs["median_s"] / without["median_s"] - 1) * 100,
            "unet": (unet[0] / unet[1] - 1) * 100 if all(unet) else float("nan"),
        }
    conditioning_plot(plot_path, rows, f"{source.graphs.name} {width}x{height}, {meta['steps']} steps, {args.threads} threads")
    write_section(results, conditioning_markdown(rows, parity, meta), CONDITIONING_BEGIN, CONDITIONING_END)
    (work / "conditioning.json").write_text(json.dumps({"meta": meta, "parity": parity, "rows": rows}, indent=2) + "\n",
                                            encoding="utf-8")
    print(f"wrote {results}, {plot_path} and {work / 'conditioning.json'}")


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the part of `path` between the `begin` and `end` markers with `section` (which holds
    them), or appends it; written whole or not at all."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


COLORS = {"diffusers": (214, 39, 40), "python-ort": (255, 127, 14), "t2i-rt ort-cpu": (31, 119, 180), "t2i-rt tract": (44, 160, 44),
          "python-openvino": (148, 103, 189), "t2i-rt openvino": (23, 190, 207), "python-openvino-bf16": (188, 189, 34),
          "t2i-rt openvino-bf16": (140, 86, 75), "python-ort-int8": (255, 187, 120), "python-openvino-int8": (197, 176, 213),
          "t2i-rt ort-cpu-int8": (174, 199, 232), "t2i-rt openvino-int8": (158, 218, 229)}


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Latency vs steps, one line per system (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 900, 560, 80, 30, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    ymax = max(r["p90_s"] for r in rows) * 1.1 or 1.0
    xlo, xhi = (0, steps[0] * 2) if len(steps) == 1 else (0, steps[-1])

    def X(s: float) -> float:
        return left + (s - xlo) / (xhi - xlo) * (W - left - right)

    def Y(v: float) -> float:
        return H - bottom - v / ymax * (H - top - bottom)

    tick = 10 ** math.floor(math.log10(ymax / 5))
    tick *= next(k for k in (1, 2, 5, 10) if ymax / (tick * k) <= 8)
    v = 0.0
    while v <= ymax:
        d.line([(left, Y(v)), (W - right, Y(v))], fill=(230, 230, 230))
        d.text((left - 8, Y(v)), f"{v:g}", fill="black", font=font, anchor="rm")
        v = round(v + tick, 10)
    for s in steps:
        d.text((X(s), H - bottom + 8), str(s), fill="black", font=font, anchor="mt")
    d.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black", width=1)
    d.text((W / 2, H - 18), "denoising steps", fill="black", font=font, anchor="mm")
    d.text((12, top - 24), "seconds per image (median; bars: p90)", fill="black", font=font, anchor="lm")
    d.text((W / 2, 16), title, fill="black", font=font, anchor="mm")
    for i, name in enumerate(systems):
        color = COLORS.get(name, (100, 100, 100))
        pts = sorted((r["steps"], r["median_s"], r["p90_s"]) for r in rows if r["system"] == name)
        d.line([(X(s), Y(m)) for s, m, _ in pts], fill=color, width=3)
        for s, m, p in pts:
            d.line([(X(s), Y(m)), (X(s), Y(p))], fill=color, width=1)
            d.ellipse([X(s) - 4, Y(m) - 4, X(s) + 4, Y(m) + 4], fill=color)
        ly = top + 10 + i * 20
        d.line([(left + 20, ly), (left + 50, ly)], fill=color, width=3)
        d.text((left + 58, ly), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ----------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Progress bars and install advice would bury the parity lines."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    for lib in (dl, tl):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _ort_library_env() -> None:
    """t2i-rt ort-cpu finds ONNX Runtime via ORT_DYLIB_PATH or .ort/; default to the Python package's
    copy (same pinned release), so both ORT systems run the very same library."""
    if os.environ.get("ORT_DYLIB_PATH") or (REPO / ".ort" / "libonnxruntime.so.1.31.1").is_file():
        return
    import onnxruntime

    lib = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime.so.1.31.1"
    if lib.is_file():
        os.environ["ORT_DYLIB_PATH"] = str(lib)


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 256x256")
    return int(m.group(1)), int(m.group(2))


SYSTEMS = ["diffusers", "python-ort", "python-openvino", "python-openvino-bf16", "ort-cpu", "openvino", "openvino-bf16",
           "tract", "python-ort-int8", "python-openvino-int8", "ort-cpu-int8", "openvino-int8"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="scratch dir: generated graph set, checkpoint, outputs "
                   "(default target/compare, target/compare-quick with --quick)")
    p.add_argument("--graphs-dir", type=Path, help="an existing graph set instead of the small preset (with --diffusers-model)")
    p.add_argument("--diffusers-model", type=Path, help="the diffusers pipeline dir --graphs-dir was exported from")
    p.add_argument("--diffusers-adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a diffusers T2IAdapter dir --graphs-dir's adapter NAME was exported from (repeatable)")
    p.add_argument("--adapter", help="adapter of the graph set to time (default: the first; 'none' for text only)")
    p.add_argument("--adapter-preset", default="sketch", choices=["sketch", "full", "light"], help="small preset's adapter")
    p.add_argument("--seed", type=int, default=0, help="small preset's weight seed")
    p.add_argument("--steps", type=int, nargs="+", help="step counts (default 5 10 20 30; --quick: 2 4)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--size", type=_size, help="WxH (default: the graph set's default size)")
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS,
                   help="diffusers always runs (the reference); the -bf16 ones only where the CPU has bf16 instructions; "
                   "the -int8 ones on --int8-graphs")
    p.add_argument("--int8-graphs", type=Path, help="the graph set calibrated from the timed one (python -m t2i_export "
                   "calibrate) for the -int8 systems (default: made into WORK/SET-int8 when one is asked for)")
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "t2i-rt", help="t2i-rt binary")
    p.add_argument("--results", type=Path, help="markdown file whose section is rewritten "
                   "(default benches/RESULTS.md; --quick: WORK/RESULTS.md)")
    p.add_argument("--plot", type=Path, help="PNG plot (default benches/compare.png; --quick: WORK/compare.png)")
    p.add_argument("--quick", action="store_true", help="smoke run on the committed tiny set (graphs/tiny-sd1)")
    p.add_argument("--conditioning", action="store_true",
                   help="adapter vs ControlNet vs both vs none at 30 steps on the small preset (module docstring; "
                   "default plot benches/conditioning.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    work = (args.work or REPO / "target" / ("compare-quick" if args.quick else "compare")).resolve()
    steps = args.steps or ([2, 4] if args.quick else [5, 10, 20, 30])
    rounds = args.rounds or (2 if args.quick else 5)
    results = args.results or (work / "RESULTS.md" if args.quick else REPO / "benches" / "RESULTS.md")
    plot_path = args.plot or (work / "compare.png" if args.quick else REPO / "benches" / "compare.png")
    work.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    try:
        binary = args.binary.resolve()
        if not binary.is_file():
            raise CompareError(f"--binary {args.binary}: no such file (build it: cargo build --release)")
        import torch

        torch.set_num_threads(args.threads)
        _ort_library_env()
        if args.conditioning:
            run_conditioning(args, work, binary, results, argv)
            return 0
        if args.graphs_dir:
            if not args.diffusers_model:
                raise CompareError("--graphs-dir needs --diffusers-model (and --diffusers-adapter NAME=DIR per adapter)")
            adapters = {}
            for spec in args.diffusers_adapter:
                name, sep, path = spec.partition("=")
                if not sep:
                    raise CompareError(f"--diffusers-adapter {spec!r}: expected NAME=DIR")
                adapters[name] = Path(path)
            source = Source(args.graphs_dir, args.diffusers_model, adapters, f"{args.graphs_dir.name}")
        elif args.quick:
            source = prepare_tiny(work)
        else:
            source = prepare_small(work, args.adapter_preset, args.seed)
        manifest = json.loads((source.graphs / "manifest.json").read_text(encoding="utf-8"))
        width, height = args.size or tuple(manifest["default_size"])
        names = [a["name"] for a in manifest["adapters"]]
        adapter = None if args.adapter == "none" else (args.adapter or (names[0] if names else None))
        if adapter is not None and (adapter not in names or adapter not in source.adapter_dirs):
            raise CompareError(f"adapter {adapter!r}: the graph set has {names}, the checkpoint {sorted(source.adapter_dirs)}")
        inputs = write_inputs(work, manifest, width, height)

        print(f"loading systems (threads {args.threads}) ...", flush=True)
        reference = Diffusers(source, inputs, args.threads)
        systems: list = [reference]
        notes = []
        wanted = list(args.systems)
        if any(w.endswith(BF16) for w in wanted) and not cpu_has_bf16():
            dropped = [w for w in wanted if w.endswith(BF16)]
            wanted = [w for w in wanted if not w.endswith(BF16)]
            notes.append(f"{', '.join(dropped)} left out: this CPU has no bf16 instructions (AVX512_BF16 or AMX), "
                         "where OpenVINO would compute in f32.")
            print("  " + notes[-1], flush=True)
        int8_source = None
        if any(w.endswith(INT8) for w in wanted):
            int8_source = replace(source, graphs=args.int8_graphs or calibrated(source.graphs, work, binary))
        for name in wanted:
            precision = next((p for p in ("bf16", "int8") if name.endswith("-" + p)), "f32")
            base = name.removesuffix("-" + precision)
            src = int8_source if precision == "int8" else source
            if base == "python-ort":
                systems.append(PythonOrt(src, inputs, args.threads, "int8" if precision == "int8" else None))
            elif base == "python-openvino":
                systems.append(PythonOpenVino(src, inputs, args.threads, precision))
            elif base != "diffusers":
                systems.append(T2iRt(binary, src, inputs, args.threads, base, work, precision))
        rt = [s for s in systems if isinstance(s, T2iRt)]

        main_cases = [Case(st, adapter, width, height) for st in steps]
        plain_cases = [Case(st, None, width, height) for st in steps] if adapter is not None else []
        print("checking that every system draws diffusers' image ...", flush=True)
        parity = check_parity(systems, reference, main_cases + plain_cases)

        jobs = [(s, c) for c in main_cases for s in systems] + [(s, c) for c in plain_cases for s in rt]
        print(f"timing {rounds} rounds of {len(jobs)} jobs ...", flush=True)
        timing = time_round_robin(jobs, rounds)
        rows = summarize(timing, systems, steps, adapter, (width, height))
        for r in rows:
            print(f"  {r['system']:15s} steps {r['steps']:3d}: median {r['median_s']:.3f} s, p90 {r['p90_s']:.3f} s"
                  + (f", {r['ratio']:.2f}x diffusers" if r.get("ratio") else ""))

        meta = {
            "command": "python benches/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(args.threads), "versions": versions(binary), "size": [width, height], "adapter": adapter,
            "source": source.description, "rounds": rounds,
            "timed_by": rt[0].timed_by if rt else "–", "notes": notes,
            "plot_rel": os.path.relpath(plot_path, results.parent),
        }
        plot(plot_path, rows, f"{source.graphs.name} {width}x{height}, {args.threads} threads, "
                              f"{'adapter ' + adapter if adapter else 'no adapter'}")
        write_section(results, markdown(rows, parity, meta))
        raw = {"meta": meta, "parity": parity, "rows": rows,
               "samples": [{"system": k[0], "steps": k[1].steps, "adapter": k[1].adapter, "seconds": v}
                           for k, v in timing["samples"].items()]}
        (work / "compare.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {results}, {plot_path} and {work / 'compare.json'}")
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
