#!/usr/bin/env python3
"""How far fp16 lands from the fp32 fixtures: the evidence behind the runtime's fp16 tolerance.

For each end-to-end case of graphs/fixtures/tiny-sd1/cases.json (default: cases a-f), against the
fixture's fp32 diffusers result (final latents, decoded images):

- `fp16 set`: graphs/tiny-sd1-fp16 (the same tiny SD1 weights exported with `--precision fp16`) in
  Python onnxruntime (CPU EP), driven by the Python stand-in of export/tests/test_end_to_end.py
  (img2img and inpainting cases from the set's vae_encoder graph, as the runtime runs them);
- `diffusers fp16`: diffusers itself with every module `.half()` (what `pipe.to(torch.float16)`
  does), on CPU, through the pipeline (or reference loop) the fixture came from. Cases with
  explicit noise take it in fp16, as an fp16 pipeline does; cases without (the generator, img2img
  and inpainting cases) pass generator=torch.Generator("cpu").manual_seed(seed) like the fixture,
  and the fp16 pipeline then draws its noise and posterior samples in fp16;
- `fp32 set`: graphs/tiny-sd1 the same way, for scale (the fp32 parity error).

Reported per case: final-latents relative L2 (||x - ref|| / ||ref||) and the max pixel difference
(0-255) over the case's images; for inpainting cases also the max pixel difference inside and
outside the mask (white = repaint). The tiny checkpoint is rebuilt from its seeds
(`t2i_export.tiny`), so no network and no committed checkpoint are needed.

`--ort-level` sets onnxruntime's graph optimization level for the graph sets: fused and unfused
kernels round fp16 differently, so the fp16 set's numbers move with it (the fp32 set's do not,
beyond 1e-6). The Python default is `all`; the Rust runtime's `ort` Level3 is `layout`
(ORT_ENABLE_LAYOUT), the level at which this stand-in reproduces the runtime's fp16 numbers.

`--breakdown` adds, per case, the fp32 set with one graph at a time replaced by its fp16 version
(and text encoder + UNet together): which graph's fp16 rounding the error comes from.

    cd export && T2I_OPEN_CLIP_WHEEL=... ../.venv/bin/python ../calibration/fp16_error.py [--all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "export"), str(REPO / "export" / "tests")]

from t2i_export.fixtures import CASES_BY_FAMILY, CONDITIONS_BY_FAMILY, _make_case  # noqa: E402
from t2i_export.reference import Oracle, decode_images, load_condition, run, run_image  # noqa: E402
from t2i_export.tiny import controlnet_dirs, write_checkpoint  # noqa: E402
from test_end_to_end import GraphPipeline  # noqa: E402

FIXTURES = REPO / "graphs" / "fixtures" / "tiny-sd1"
SETS = {"fp16 set": REPO / "graphs" / "tiny-sd1-fp16", "fp32 set": REPO / "graphs" / "tiny-sd1"}
ORT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# --breakdown: the fp32 set with these of its graphs (GraphPipeline.sess keys) taken from the fp16 set
BREAKDOWN = [("vae_encoder",), ("text_encoder",), ("unet",), ("vae_decoder",), ("adapter_sketch", "adapter_color"), ("text_encoder", "unet")]


def rel_l2(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def pixel_diffs(pixels: np.ndarray, case: dict) -> dict[str, int]:
    """max |pixel - fixture| (0-255) over the case's images; with a mask, also inside / outside it
    (the mask binarised as the pipelines do: >= 128 is repainted)."""
    expected = np.stack([np.asarray(Image.open(FIXTURES / p)).astype(int) for p in case["expected_images"]])
    diff = np.abs(pixels.astype(int) - expected).max(axis=-1)  # [n, H, W], max over RGB
    out = {"max_pixel": int(diff.max())}
    if case.get("mask") is not None:
        repaint = np.asarray(Image.open(FIXTURES / case["mask"]).convert("L")) >= 128
        out.update(max_pixel_in_mask=int(diff[:, repaint].max()), max_pixel_out_mask=int(diff[:, ~repaint].max()))
    return out


def max_pixel_diff(pixels: np.ndarray, case: dict) -> int:
    return pixel_diffs(pixels, case)["max_pixel"]


def graph_pipeline(set_dir: Path, level: str) -> GraphPipeline:
    """GraphPipeline with every session opened at the optimization `level` (one intra-op thread)."""
    pipe = GraphPipeline(set_dir)
    m = pipe.m
    files = {k: g["file"] for k, g in m["graphs"].items()}
    files.update({"adapter_" + a["name"]: a["graph"]["file"] for a in m["adapters"]})
    files.update({"controlnet_" + c["name"]: c["graph"]["file"] for c in m.get("controlnets", [])})
    files.update({te["name"]: te["graph"]["file"] for te in m["text_encoders"]})
    options = ort.SessionOptions()
    options.graph_optimization_level = ORT_LEVELS[level]
    options.intra_op_num_threads = 1
    pipe.sess = {k: ort.InferenceSession(str(set_dir / files[k]), options) for k in pipe.sess}
    return pipe


def half_oracle(model_dir: Path, adapter_dirs: dict[str, Path], controlnets: dict[str, Path]) -> Oracle:
    oracle = Oracle.load(model_dir, adapter_dirs, controlnets)
    for m in [oracle.text_encoder, oracle.unet, oracle.vae, *oracle.adapters.values(), *oracle.controlnets.values()]:
        m.half()
    return oracle


def diffusers_fp16(oracle: Oracle, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """The case through the diffusers pipeline (or reference loop) its fixture came from, in fp16."""
    conditions = {n: load_condition(FIXTURES / rel) for n, (_, rel) in CONDITIONS_BY_FAMILY["sd1"].items()}
    case = _make_case(spec, conditions, oracle)
    if case.init_image is not None:
        # StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline / reference.run_img2img_loop,
        # generator=torch.Generator("cpu").manual_seed(seed) as the fixture
        latents, _, _ = run_image(oracle, case)
    elif case.latents is None:
        latents, _ = run(oracle, case)  # the generator cases: the pipeline draws the latents
    else:
        latents, _ = run(oracle, replace(case, latents=case.latents.half()))
    return latents.float().numpy(), decode_images(oracle, latents)


def _cell(r: dict) -> str:
    s = f"{r['rel_l2']:.2e} / {r['max_pixel']:d}"
    if "max_pixel_in_mask" in r:
        s += f" (in {r['max_pixel_in_mask']}, out {r['max_pixel_out_mask']})"
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every tiny-sd1 case (default: a-f)")
    p.add_argument("--case", action="append", default=[], metavar="NAME", help="only this case (repeatable; overrides --all)")
    p.add_argument("--ort-level", choices=ORT_LEVELS, default="all",
                   help="onnxruntime graph optimization level for the graph sets (default all; the runtime's is layout)")
    p.add_argument("--breakdown", action="store_true", help="also the fp32 set with one graph at a time in fp16")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers fp16 (graph sets only)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the fixtures were made

    cases = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
    specs = {s["name"]: s for s in CASES_BY_FAMILY["sd1"]}
    if args.case:
        unknown = set(args.case) - {c["name"] for c in cases}
        if unknown:
            p.error(f"no such case: {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c["name"] in args.case]
    elif not args.all:
        cases = [c for c in cases if re.match(r"[a-f]_", c["name"])]

    pipes = {k: graph_pipeline(d, args.ort_level) for k, d in SETS.items()}
    sessions = {k: dict(pipe.sess) for k, pipe in pipes.items()}
    hybrid = graph_pipeline(SETS["fp32 set"], args.ort_level)
    columns = [*(() if args.no_diffusers else ("diffusers fp16",)), "fp16 set", "fp32 set"]
    columns.insert(0, columns.pop(columns.index("fp16 set")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2i-fp16-") as tmp:
        oracle = None if args.no_diffusers else half_oracle(*write_checkpoint(Path(tmp)), controlnet_dirs(Path(tmp)))
        for case in cases:
            ref = np.load(FIXTURES / case["expected_latents"])
            row = {"case": case["name"], "ort_level": args.ort_level}
            for k, pipe in pipes.items():
                latents, pixels = pipe.run(case, FIXTURES)
                row[k] = {"rel_l2": rel_l2(latents, ref), **pixel_diffs(pixels, case)}
            if oracle is not None:
                latents, pixels = diffusers_fp16(oracle, specs[case["name"]])
                row["diffusers fp16"] = {"rel_l2": rel_l2(latents, ref), **pixel_diffs(pixels, case)}
            print(f"{case['name']:42} " + "  ".join(f"{k}: {_cell(row[k])}" for k in columns), flush=True)
            if args.breakdown:
                row["breakdown"] = {}
                for graphs in BREAKDOWN:
                    hybrid.sess = {k: sessions["fp16 set" if k in graphs else "fp32 set"][k] for k in sessions["fp32 set"]}
                    latents, pixels = hybrid.run(case, FIXTURES)
                    r = row["breakdown"]["+".join(graphs)] = {"rel_l2": rel_l2(latents, ref), **pixel_diffs(pixels, case)}
                    print(f"    only {'+'.join(graphs):30} in fp16: {_cell(r)}", flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
