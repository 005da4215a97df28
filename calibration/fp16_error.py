#!/usr/bin/env python3
"""How far fp16 lands from the fp32 fixtures: the evidence behind the runtime's fp16 tolerance.

For each end-to-end case of graphs/fixtures/tiny-sd1/cases.json (default: cases a-f), against the
fixture's fp32 diffusers result (final latents, decoded images):

- `fp16 set`: graphs/tiny-sd1-fp16 (the same tiny SD1 weights exported with `--precision fp16`) in
  Python onnxruntime (CPU EP), driven by the Python stand-in of export/tests/test_end_to_end.py;
- `diffusers fp16`: diffusers itself with every module `.half()` (what `pipe.to(torch.float16)`
  does), on CPU, from the same initial noise (in fp16, as an fp16 pipeline takes it);
- `fp32 set`: graphs/tiny-sd1 the same way, for scale (the fp32 parity error).

Reported per case: final-latents relative L2 (||x - ref|| / ||ref||) and the max pixel difference
(0-255) over the case's images. The tiny checkpoint is rebuilt from its seeds (`t2i_export.tiny`),
so no network and no committed checkpoint are needed.

    cd export && T2I_OPEN_CLIP_WHEEL=... ../.venv/bin/python ../calibration/fp16_error.py [--all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "export"), str(REPO / "export" / "tests")]

from t2i_export.fixtures import CASES, SAMPLER_CASES, _make_case  # noqa: E402
from t2i_export.reference import Oracle, decode_images, load_condition, run  # noqa: E402
from t2i_export.tiny import write_checkpoint  # noqa: E402
from test_end_to_end import GraphPipeline  # noqa: E402

FIXTURES = REPO / "graphs" / "fixtures" / "tiny-sd1"
SETS = {"fp16 set": REPO / "graphs" / "tiny-sd1-fp16", "fp32 set": REPO / "graphs" / "tiny-sd1"}


def rel_l2(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def max_pixel_diff(pixels: np.ndarray, case: dict) -> int:
    expected = [np.asarray(Image.open(FIXTURES / p)).astype(int) for p in case["expected_images"]]
    return max(int(np.abs(px.astype(int) - e).max()) for px, e in zip(pixels, expected))


def half_oracle(model_dir: Path, adapter_dirs: dict[str, Path]) -> Oracle:
    oracle = Oracle.load(model_dir, adapter_dirs)
    for m in [oracle.text_encoder, oracle.unet, oracle.vae, *oracle.adapters.values()]:
        m.half()
    return oracle


def diffusers_fp16(oracle: Oracle, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    conditions = {n: load_condition(FIXTURES / rel) for n, rel in (("sketch", "conditions/sketch.png"), ("color", "conditions/color.png"))}
    case = _make_case(spec, conditions, oracle)
    latents, _ = run(oracle, replace(case, latents=case.latents.half()))
    return latents.float().numpy(), decode_images(oracle, latents)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every tiny-sd1 case (default: a-f)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the fixtures were made

    cases = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
    specs = {s["name"]: s for s in CASES + SAMPLER_CASES}
    if not args.all:
        cases = [c for c in cases if c["name"][0] in "abcdef"]

    pipes = {k: GraphPipeline(d) for k, d in SETS.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2i-fp16-") as tmp:
        model_dir, adapter_dirs = write_checkpoint(Path(tmp))
        oracle = half_oracle(model_dir, adapter_dirs)
        for case in cases:
            ref = np.load(FIXTURES / case["expected_latents"])
            row = {"case": case["name"]}
            for k, pipe in pipes.items():
                latents, pixels = pipe.run(case, FIXTURES)
                row[k] = {"rel_l2": rel_l2(latents, ref), "max_pixel": max_pixel_diff(pixels, case)}
            latents, pixels = diffusers_fp16(oracle, specs[case["name"]])
            row["diffusers fp16"] = {"rel_l2": rel_l2(latents, ref), "max_pixel": max_pixel_diff(pixels, case)}
            rows.append(row)
            print(
                f"{case['name']:42} "
                + "  ".join(f"{k}: {row[k]['rel_l2']:.2e} / {row[k]['max_pixel']:3d}" for k in ("fp16 set", "diffusers fp16", "fp32 set")),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
