#!/usr/bin/env python3
"""t2i-rt on a GPU against diffusers on the same GPU, in one run: parity first, then latency.

Run by benches/gpu/measure.sh (which sets up the libraries), in two stages:

- `prepare` (call 1): the preset's fp16 graph set and the fp32 diffusers checkpoint it came from,
  both from one `torch.manual_seed` (t2i_export.random_preset: random weights; weights do not
  change latency), with a T2I-Adapter of the `full` kind (canny/depth-like, sd15v2 shapes). Also
  `torch.randn` draws from `torch.Generator(device)` for a few seeds, shapes and dtypes: the
  fixtures of a future `--rng torch-cuda`.
- `measure` (last call):
  1. parity: diffusers fp32 (TF32 off: the oracle), diffusers fp16 and t2i-rt on the fp16 set, from
     the same initial latents, with and without the adapter. t2i-rt passes when its final latents
     are no farther from fp32 than max(5e-3, 2 × diffusers fp16's own distance) (relative L2; 5e-3
     is the runtime's fp16 tolerance, calibration/README.md);
  2. end-to-end and UNet-step latency, with and without the adapter: diffusers fp16 (SDPA, CUDA
     events around each UNet call) and `t2i-rt bench` (I/O binding), in alternating blocks;
  3. start-up: `t2i-rt bench`'s model load without prepared engines, the time of `build-engine`,
     and the load with them; diffusers' from_pretrained + .to(device).
  Writes gpu-results.md (a benches/RESULTS.md section), gpu-results.json and parity.png to --out.

Every step's failure is recorded and the rest goes on: GPU time is scarce, so one broken part must
not cost the other numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "export"))
sys.path.insert(0, str(REPO / "benches"))

from compare import ADAPTER_WEIGHT, GUIDANCE, NEGATIVE, PROMPT, _quiet_libraries, machine, percentile, rel_l2, write_inputs  # noqa: E402
from kit import BEGIN, END  # noqa: E402 (benches/gpu: this script's folder)
ADAPTER_KIND = "full"
WEIGHT_SEED = 0
FP16_REL_L2 = 5e-3  # the runtime's fp16 tolerance on final latents (calibration/README.md)
SCHEDULER = "ddim"
# torch.randn draws recorded in `prepare`: seeds x shapes (float32; float16 for the SD 1.5 and SDXL
# latent shapes), and two draws in a row. On CUDA the values depend on the launch grid, which torch
# sizes from the GPU's multiprocessor count: the fixture records it.
RANDN_SEEDS = [0, 2**32 + 7]
RANDN_SHAPES = [(1, 4, 64, 64), (2, 4, 64, 64), (1, 4, 128, 128), (1, 4, 9, 13), (1, 3, 5, 7), (1, 1, 1, 1)]
RANDN_FP16_SHAPES = [(1, 4, 64, 64), (1, 4, 128, 128)]


def log(msg: str) -> None:
    print(msg, flush=True)


def _paths(work: Path) -> dict[str, Path]:
    return {"graphs": work / "graphs-fp16", "ckpt": work / "diffusers", "stamp": work / "prepared.json"}


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(args) -> int:
    import torch

    from t2i_export.random_preset import export_random

    args.out.mkdir(parents=True, exist_ok=True)
    p = _paths(args.work)
    status = {"preset": args.preset, "device": args.device}
    want = {"preset": args.preset, "adapter": ADAPTER_KIND, "seed": WEIGHT_SEED}
    fresh = p["stamp"].is_file() and {k: v for k, v in json.loads(p["stamp"].read_text()).items() if k in want} == want
    if fresh and (p["graphs"] / "manifest.json").is_file():
        log(f"graph set already there: {p['graphs']}")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        log(f"exporting the {args.preset} preset (fp16 graphs, adapter {ADAPTER_KIND}) and its fp32 diffusers checkpoint ...")
        export_random(args.preset, [ADAPTER_KIND], p["graphs"], None, WEIGHT_SEED, save_diffusers=p["ckpt"], precision="fp16")
        status["export_s"] = time.perf_counter() - t0
        p["stamp"].write_text(json.dumps({**want, "export_s": status["export_s"]}) + "\n")
        log(f"exported in {status['export_s']:.0f} s")
    status["randn"] = record_randn(args.device, args.out / "torch_randn.npz")
    log(json.dumps(status))
    return 0


def record_randn(device: str, path: Path) -> str:
    """torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device, dtype)
    for every seed, shape and dtype; and per seed two [1, 4, 64, 64] draws in a row from one generator."""
    import torch

    arrays = {"device": np.array(device), "torch": np.array(torch.__version__)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        arrays["gpu"] = np.array(props.name)
        arrays["multiprocessors"] = np.array(props.multi_processor_count)
    for seed in RANDN_SEEDS:
        for shape in RANDN_SHAPES:
            for dtype in (torch.float32, torch.float16) if shape in RANDN_FP16_SHAPES else (torch.float32,):
                g = torch.Generator(device).manual_seed(seed)
                x = torch.randn(shape, generator=g, device=device, dtype=dtype)
                arrays[f"seed{seed}_{'x'.join(map(str, shape))}_{str(dtype).split('.')[-1]}"] = x.cpu().numpy()
        g = torch.Generator(device).manual_seed(seed)
        first, second = (torch.randn((1, 4, 64, 64), generator=g, device=device) for _ in range(2))
        arrays[f"seed{seed}_two_draws_1x4x64x64_float32"] = torch.stack([first, second]).cpu().numpy()
    np.savez_compressed(path, **arrays)
    return f"{sum(a.ndim > 0 for a in arrays.values())} arrays -> {path.name}"


# ----------------------------------------------------------------------------------------------
# measure: diffusers


class Diffusers:
    """The checkpoint's StableDiffusionAdapterPipeline / StableDiffusionPipeline in one dtype on one device."""

    def __init__(self, model_dir: Path, adapter_dir: Path, device: str, dtype_name: str):
        import torch
        from diffusers import StableDiffusionAdapterPipeline, StableDiffusionPipeline, T2IAdapter

        from t2i_export.reference import PRESETS, SCHEDULERS

        self.torch, self.device = torch, device
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        self.name = f"diffusers {dtype_name}"
        t0 = time.perf_counter()
        plain = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=self.dtype, safety_checker=None,
                                                        requires_safety_checker=False)
        adapter = T2IAdapter.from_pretrained(str(adapter_dir), dtype=self.dtype)
        plain.scheduler = SCHEDULERS[SCHEDULER].from_config(plain.scheduler.config, **PRESETS.get(SCHEDULER, {}))
        plain.to(device)
        adapter.to(device)
        self.sync()
        self.load_s = time.perf_counter() - t0
        sd1 = {k: v for k, v in plain.components.items() if k != "image_encoder"}
        self.pipes = {None: plain, ADAPTER_KIND: StableDiffusionAdapterPipeline(adapter=adapter, **sd1)}
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        self._starts: list = []
        plain.unet.register_forward_pre_hook(self._unet_start)
        plain.unet.register_forward_hook(self._unet_end)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _stamp(self):
        if self.device == "cuda":
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _unet_start(self, module, args):
        self._starts.append(self._stamp())

    def _unet_end(self, module, args, output):
        self._starts.append(self._stamp())

    def _collect_unet(self) -> list[float]:
        self.sync()
        s, self._starts = self._starts, []
        pairs = zip(s[0::2], s[1::2])
        if self.device == "cuda":
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]

    def generate(self, adapter: str | None, condition, latents: np.ndarray, steps: int, size) -> tuple[np.ndarray, np.ndarray]:
        """Final latents (float32) and uint8 pixels, from `latents` (given in this pipeline's dtype)."""
        torch = self.torch
        with torch.no_grad():
            lat = self._call(adapter, condition, torch.from_numpy(latents), steps, size, "latent")
            image = self.pipes[None].vae.decode(lat / self.pipes[None].vae.config.scaling_factor, return_dict=False)[0]
            image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        self._collect_unet()
        return lat.float().cpu().numpy(), (image[0] * 255).round().astype(np.uint8)

    def _call(self, adapter, condition, latents, steps, size, output_type):
        w, h = size
        kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      width=w, height=h, latents=latents.to(self.device, self.dtype), output_type=output_type)
        if adapter is not None:
            kwargs.update(image=condition, adapter_conditioning_scale=ADAPTER_WEIGHT)
        return self.pipes[adapter](**kwargs).images

    def time(self, adapter, condition, latents: np.ndarray, steps, size, warmup: int, iters: int) -> dict:
        """Seconds per whole request (prompt to uint8 pixels) and ms per UNet call."""
        torch = self.torch
        lat = torch.from_numpy(latents)
        totals, unet = [], []
        with torch.no_grad():
            for i in range(warmup + iters):
                self.sync()
                t0 = time.perf_counter()
                image = self._call(adapter, condition, lat, steps, size, "np")
                (image * 255).round().astype(np.uint8)
                self.sync()
                dt = time.perf_counter() - t0
                steps_ms = self._collect_unet()
                if i >= warmup:
                    totals.append(dt)
                    unet += steps_ms
        return {"total_s": totals, "unet_ms": unet}


# ----------------------------------------------------------------------------------------------
# measure: t2i-rt


class T2iRt:
    def __init__(self, binary: Path, graphs: Path, backend: str, work: Path):
        self.binary, self.graphs, self.backend = binary, graphs, backend
        self.name = f"t2i-rt {backend}"
        self.out = work / "t2i-rt-out"
        self.out.mkdir(parents=True, exist_ok=True)

    def _call(self, cmd: list[str]) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.binary), *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"t2i-rt {' '.join(cmd[:1])} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def _adapter(self, adapter, condition_png):
        return [] if adapter is None else ["--adapter", f"{adapter}={condition_png}:{ADAPTER_WEIGHT}"]

    def generate(self, adapter, condition_png: Path, latents_npy: Path, steps, size) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        stem = f"parity-{adapter or 'none'}"
        w, h = size
        self._call(["run", "--graphs", str(self.graphs), "--backend", self.backend, "--prompt", PROMPT,
                    "--negative-prompt", NEGATIVE, "--steps", str(steps), "--scheduler", SCHEDULER, "--guidance", str(GUIDANCE),
                    "--width", str(w), "--height", str(h), "--latents", str(latents_npy), "--seed", "0",
                    "--save-latents", str(self.out / f"{stem}.npy"), "--out", str(self.out / f"{stem}.png"),
                    *self._adapter(adapter, condition_png)])
        return np.load(self.out / f"{stem}.npy"), np.asarray(Image.open(self.out / f"{stem}.png").convert("RGB"))

    def bench(self, condition_png: Path, steps, size, warmup: int, iters: int, engine_cache: bool) -> dict:
        """`t2i-rt bench` with the adapter (it also times the same request without it)."""
        js = self.out / f"bench-{'cache' if engine_cache else 'nocache'}.json"
        js.unlink(missing_ok=True)
        w, h = size
        self._call(["bench", "--graphs", str(self.graphs), "--backend", self.backend, "--steps", str(steps),
                    "--size", f"{w}x{h}", "--scheduler", SCHEDULER, "--prompt", PROMPT, "--guidance", str(GUIDANCE),
                    "--warmup", str(warmup), "--iters", str(iters), "--json", str(js),
                    *([] if engine_cache else ["--no-engine-cache"]), *self._adapter(ADAPTER_KIND, condition_png)])
        return json.loads(js.read_text(encoding="utf-8"))

    def build_engine(self) -> float:
        t0 = time.perf_counter()
        self._call(["build-engine", "--graphs", str(self.graphs), "--backend", self.backend])
        return time.perf_counter() - t0

    def version(self) -> str:
        try:
            return self._call(["--version"]).stdout.strip().split()[-1]
        except (RuntimeError, OSError, IndexError):
            return "?"


# ----------------------------------------------------------------------------------------------
# measure


def environment(device: str, t2i: T2iRt) -> dict:
    import diffusers
    import torch

    host = machine(os.cpu_count() or 1)
    env = {"date": host["date"], "cpu": host["cpu"], "cores": host["cores"], "torch": torch.__version__,
           "diffusers": diffusers.__version__, "t2i-rt": t2i.version(), "device": device}
    g = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["commit"] = g.stdout.strip() if g.returncode == 0 else "?"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["nvidia-smi"] = smi.stdout.strip() if smi.returncode == 0 else "?"
    else:
        env["gpu"] = "none (dry run on the CPU)"
    return env


def load_condition(path: Path):
    from t2i_export.reference import load_condition as load

    return load(path)


def parity(systems: dict, t2i: T2iRt | None, inputs, latents16_npy: Path, steps: int, size, errors: list) -> tuple[list[dict], dict]:
    """Rows per adapter case; images for the picture."""
    rows, images = [], {}
    lat = np.load(latents16_npy)
    for adapter in (None, ADAPTER_KIND):
        cond = inputs.condition.get(adapter) if adapter else None
        cond_image = load_condition(cond) if cond else None
        got = {}
        for key in ("fp32", "fp16"):
            got[key] = systems[key].generate(adapter, cond_image, lat.astype(np.float32 if key == "fp32" else np.float16), steps, size)
        if t2i is not None:
            try:
                got["t2i"] = t2i.generate(adapter, cond, latents16_npy, steps, size)
            except Exception as e:  # noqa: BLE001: recorded, the rest goes on
                errors.append(f"t2i-rt run (adapter {adapter}): {e}")
                log(f"  t2i-rt run failed: {e}")
        ref_lat, ref_px = got["fp32"]
        d16 = rel_l2(got["fp16"][0], ref_lat)
        row = {"adapter": adapter, "steps": steps, "diffusers_fp16_vs_fp32": d16,
               "diffusers_fp16_px": int(np.abs(got["fp16"][1].astype(int) - ref_px).max())}
        if "t2i" in got:
            bound = max(FP16_REL_L2, 2 * d16)
            row.update(t2i_vs_fp32=rel_l2(got["t2i"][0], ref_lat), t2i_vs_fp16=rel_l2(got["t2i"][0], got["fp16"][0]),
                       t2i_px=int(np.abs(got["t2i"][1].astype(int) - ref_px).max()), bound=bound)
            row["ok"] = bool(row["t2i_vs_fp32"] <= bound)
        rows.append(row)
        images[adapter] = {k: v[1] for k, v in got.items()}
        log(f"  parity adapter {adapter or '-':6s}: diffusers fp16 vs fp32 {d16:.2e}"
            + (f"; t2i-rt vs fp32 {row['t2i_vs_fp32']:.2e} (bound {row['bound']:.1e}) vs fp16 {row['t2i_vs_fp16']:.2e}, "
               f"max px vs fp32 {row['t2i_px']}: {'ok' if row['ok'] else 'FAIL'}" if "t2i_vs_fp32" in row else ""))
    return rows, images


def save_parity_png(images: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    tiles = [(f"{'adapter' if a else 'no adapter'}: {k}", px) for a, d in images.items() for k, px in d.items()]
    if not tiles:
        return
    h, w = tiles[0][1].shape[:2]
    cols = max(len(d) for d in images.values())
    sheet = Image.new("RGB", (cols * w, len(images) * (h + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (a, d) in enumerate(images.items()):
        for c, (k, px) in enumerate(d.items()):
            sheet.paste(Image.fromarray(px), (c * w, r * (h + 16) + 16))
            label = {"fp32": "diffusers fp32", "fp16": "diffusers fp16", "t2i": "t2i-rt"}[k] + (" +adapter" if a else "")
            draw.text((c * w + 2, r * (h + 16) + 2), label, fill="black")
    sheet.save(path)


def stats(xs: list[float]) -> dict | None:
    return {"median": float(np.median(xs)), "p90": percentile(xs, 90), "min": min(xs), "n": len(xs)} if xs else None


def measure(args) -> int:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    p = _paths(args.work)
    if not (p["graphs"] / "manifest.json").is_file():
        log(f"error: no graph set in {p['graphs']}: run `measure.sh prepare` first, on the same warm machine")
        return 1
    # The fp32 oracle is fp32: no TF32 in convolutions (cuDNN's default) or matrix products.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    manifest = json.loads((p["graphs"] / "manifest.json").read_text(encoding="utf-8"))
    size = args.size or tuple(manifest["default_size"])
    steps = args.steps
    inputs = write_inputs(args.work, manifest, *size)
    # Every system starts from the same values: the noise rounded to fp16, as an fp16 pipeline holds it.
    latents16 = np.load(inputs.latents).astype(np.float16)
    latents16_npy = args.work / "latents-fp16-rounded.npy"
    np.save(latents16_npy, latents16.astype(np.float32))
    t2i = T2iRt(args.binary, p["graphs"], args.backend, args.work)
    results: dict = {"env": environment(args.device, t2i), "size": list(size), "steps": steps, "errors": [],
                     "backend": args.backend, "preset": json.loads(p["stamp"].read_text())}
    errors = results["errors"]
    log(f"{results['env']['gpu']}; {size[0]}x{size[1]}, {steps} steps, {SCHEDULER}, CFG {GUIDANCE}")

    systems = {}
    model_dir = p["ckpt"] / f"random-{results['preset']['preset']}"
    for key in ("fp16", "fp32"):
        systems[key] = Diffusers(model_dir, p["ckpt"] / "adapters" / ADAPTER_KIND, args.device, key)
        log(f"  {systems[key].name} loaded in {systems[key].load_s:.1f} s")
    results["diffusers_load_s"] = systems["fp16"].load_s

    log("parity ...")
    results["parity"], images = parity(systems, t2i, inputs, latents16_npy, steps, size, errors)
    save_parity_png(images, args.out / "parity.png")
    t2i_works = all("t2i_vs_fp32" in r for r in results["parity"])
    del systems["fp32"]
    if args.device == "cuda":
        torch.cuda.empty_cache()

    d16 = systems["fp16"]
    cond_png = inputs.condition[ADAPTER_KIND]
    cond_image = load_condition(cond_png)
    timing = {"diffusers fp16": {None: {"total_s": [], "unet_ms": []}, ADAPTER_KIND: {"total_s": [], "unet_ms": []}},
              "benches": []}

    def diffusers_block():
        for adapter in (ADAPTER_KIND, None):
            r = d16.time(adapter, cond_image if adapter else None, latents16, steps, size, args.warmup, args.diffusers_iters)
            for k in ("total_s", "unet_ms"):
                timing["diffusers fp16"][adapter][k] += r[k]

    def t2i_block(engine_cache: bool):
        if not t2i_works:
            return
        try:
            timing["benches"].append(t2i.bench(cond_png, steps, size, args.warmup, args.iters, engine_cache))
        except Exception as e:  # noqa: BLE001
            errors.append(f"t2i-rt bench: {e}")
            log(f"  t2i-rt bench failed: {e}")

    log("timing, block 1: diffusers fp16, then t2i-rt bench without prepared engines ...")
    diffusers_block()
    t2i_block(engine_cache=False)
    if t2i_works:
        try:
            results["build_engine_s"] = t2i.build_engine()
            log(f"  build-engine: {results['build_engine_s']:.1f} s")
        except Exception as e:  # noqa: BLE001
            errors.append(f"t2i-rt build-engine: {e}")
    log("timing, block 2: t2i-rt bench with the prepared engines, then diffusers fp16 ...")
    t2i_block(engine_cache=True)
    diffusers_block()

    results["timing"] = summarize(timing)
    results["benches"] = timing["benches"]
    (args.out / "gpu-results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    section = markdown(results)
    (args.out / "gpu-results.md").write_text(section, encoding="utf-8")
    log("\n" + section)
    if errors:
        log("errors:\n  " + "\n  ".join(errors))
    return 0 if not errors and all(r.get("ok") for r in results["parity"]) else 1


def summarize(timing: dict) -> dict:
    """Per system and case: end-to-end seconds and UNet ms (medians over every measured run/step)."""
    out = {}
    for adapter, r in timing["diffusers fp16"].items():
        out.setdefault("diffusers fp16", {})[adapter or "none"] = {"total_s": stats(r["total_s"]), "unet_ms": stats(r["unet_ms"])}
    benches = timing["benches"]
    if benches:
        rt = {}
        for case, pick in ((ADAPTER_KIND, lambda b: b["stages_ms"]), ("none", lambda b: b["without_adapters"]["stages_ms"])):
            # medians of the bench runs' medians: each bench reports per-stage statistics, not samples
            rt[case] = {"total_s": {"median": float(np.median([pick(b)["total"]["median"] for b in benches])) / 1e3,
                                    "p90": max(pick(b)["total"]["p90"] for b in benches) / 1e3},
                        "unet_ms": {"median": float(np.median([pick(b)["unet_step"]["median"] for b in benches]))},
                        "orchestration_ms": {"median": float(np.median([pick(b)["orchestration_per_step"]["median"] for b in benches]))}}
        out["t2i-rt"] = rt
        out["startup_ms"] = {"no_engine_cache": benches[0]["startup_ms"],
                             "with_engines": benches[1]["startup_ms"] if len(benches) > 1 else None}
    return out


def markdown(res: dict) -> str:
    e, t = res["env"], res.get("timing", {})
    w, h = res["size"]
    rt_name = f"t2i-rt {res['backend']}"
    lines = [
        BEGIN,
        f"## GPU: t2i-rt {res['backend']} vs diffusers fp16 (`benches/gpu/measure.sh`)",
        "",
        f"Measured {e['date']} on **{e['gpu']}**{' (' + e['nvidia-smi'] + ')' if e.get('nvidia-smi') else ''}, host {e['cpu']}, {e['cores']} cores.",
        f"t2i-rt {e['t2i-rt']} (commit {e['commit']}), torch {e['torch']} (CUDA {e.get('cuda', '–')}), diffusers {e['diffusers']}.",
        "",
        f"- Model: `random --preset {res['preset']['preset']}` (random weights, seed {WEIGHT_SEED}), fp16 graph set;"
        f" adapter `{ADAPTER_KIND}` (weight {ADAPTER_WEIGHT}); {w}×{h}, {res['steps']} steps {SCHEDULER.upper()}, CFG {GUIDANCE}.",
        "- diffusers: StableDiffusion(Adapter)Pipeline in fp16 with its default attention (SDPA), one whole request"
        " (prompt to uint8 pixels) per sample, synchronized; UNet step: CUDA events around each UNet call.",
        f"- {rt_name}: `t2i-rt bench` (I/O binding; stage `total`, and `unet_step`: one UNet call including the"
        " copy of its output to the host), in two processes: without, then with the engines of `build-engine`.",
        "",
        "Parity (final latents, relative L2 against diffusers fp32 with TF32 off; pixels: max difference /255):",
        "",
        "| case | diffusers fp16 vs fp32 | t2i-rt vs fp32 | bound | t2i-rt vs diffusers fp16 | max px t2i-rt / diffusers fp16 | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["parity"]:
        case = "adapter" if r["adapter"] else "no adapter"
        if "t2i_vs_fp32" in r:
            lines.append(f"| {case} | {r['diffusers_fp16_vs_fp32']:.2e} | {r['t2i_vs_fp32']:.2e} | {r['bound']:.1e} | "
                         f"{r['t2i_vs_fp16']:.2e} | {r['t2i_px']} / {r['diffusers_fp16_px']} | {'ok' if r['ok'] else '**FAIL**'} |")
        else:
            lines.append(f"| {case} | {r['diffusers_fp16_vs_fp32']:.2e} | – | – | – | – / {r['diffusers_fp16_px']} | t2i-rt did not run |")
    lines += ["", "Latency (median over runs; p90 in brackets):", "",
              "| system | case | end to end s | UNet step ms | × diffusers | adapter overhead |", "|---|---|---:|---:|---:|---:|"]
    dref = t.get("diffusers fp16", {})
    for system in ("diffusers fp16", "t2i-rt"):
        for case in ("none", ADAPTER_KIND):
            r = t.get(system, {}).get(case)
            if not r or not r["total_s"]:
                continue
            tot, unet = r["total_s"], r["unet_ms"]
            base = dref.get(case, {}).get("total_s")
            ratio = f"{tot['median'] / base['median']:.2f}" if base and system != "diffusers fp16" else "–"
            plain = t.get(system, {}).get("none", {}).get("total_s")
            over = (f"{(tot['median'] / plain['median'] - 1) * 100:+.1f} %" if case != "none" and plain else "–")
            name = rt_name if system == "t2i-rt" else system
            lines.append(f"| {name} | {'adapter' if case != 'none' else 'no adapter'} | {tot['median']:.3f} ({tot['p90']:.3f}) | "
                         f"{unet['median']:.2f} | {ratio} | {over} |")
    su = t.get("startup_ms")
    lines += ["", "Start-up (model load before the first request):", "",
              "| system | s |", "|---|---:|",
              f"| diffusers fp16: from_pretrained + .to(device) | {res['diffusers_load_s']:.2f} |"]
    if su:
        lines.append(f"| {rt_name}, no prepared engines | {su['no_engine_cache'] / 1e3:.2f} |")
        if res.get("build_engine_s") is not None:
            lines.append(f"| `t2i-rt build-engine` (once) | {res['build_engine_s']:.2f} |")
        if su.get("with_engines") is not None:
            lines.append(f"| {rt_name}, with the prepared engines | {su['with_engines'] / 1e3:.2f} |")
    rt, dd = t.get("t2i-rt", {}), t.get("diffusers fp16", {})
    if rt and dd.get("none", {}).get("total_s"):
        ratio = rt["none"]["total_s"]["median"] / dd["none"]["total_s"]["median"]
        over = rt[ADAPTER_KIND]["total_s"]["median"] / rt["none"]["total_s"]["median"] - 1
        lines += ["", "Targets (issue 18):", "",
                  f"- t2i-rt ≤ 0.8× diffusers end to end: {ratio:.2f}× → {'met' if ratio <= 0.8 else 'not met'}",
                  f"- adapter overhead ≤ 3 %: {over * 100:+.1f} % → {'met' if over <= 0.03 else 'not met'}"]
        if res["preset"]["preset"] == "sd15" and (w, h) == (512, 512) and res["steps"] == 50:
            s = rt["none"]["total_s"]["median"]
            lines.append(f"- SD 1.5 512² × 50 steps ≤ 0.8 s: {s:.3f} s → {'met' if s <= 0.8 else 'not met'}")
    if res["errors"]:
        lines += ["", "Errors:", ""] + [f"- {x.splitlines()[0][:300]}" for x in res["errors"]]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "measure"):
        s = sub.add_parser(name)
        s.add_argument("--work", type=Path, required=True)
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    pr = sub.choices["prepare"]
    pr.add_argument("--preset", default="sd15", choices=["sd15", "small"])
    me = sub.choices["measure"]
    me.add_argument("--binary", type=Path, required=True)
    me.add_argument("--backend", default="ort-cuda")
    me.add_argument("--size", type=_size, help="WxH (default: the graph set's default size)")
    me.add_argument("--steps", type=int, default=50)
    me.add_argument("--warmup", type=int, default=2)
    me.add_argument("--iters", type=int, default=10, help="t2i-rt bench runs per block")
    me.add_argument("--diffusers-iters", type=int, default=10, help="diffusers runs per block")
    args = ap.parse_args(argv)
    _quiet_libraries()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecations, inside its own pipelines
    try:
        return prepare(args) if args.cmd == "prepare" else measure(args)
    except Exception:  # noqa: BLE001: the traceback is what the one reply carries back
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
