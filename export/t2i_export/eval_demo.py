"""`python -m t2i_export eval-demo`: what the demo-shapes model draws, measured.

Draws held-out scenes (layouts from `demo_shapes.EVAL_SEED`, never trained on) with `t2i-rt run`,
each with S samples, in three modes: the prompt alone, + the sketch adapter, + sketch and color.
Every picture is scored by the pixel judge (`demo_shapes.judge`):
- prompt accuracy: the largest shape has the prompted color / kind, the background the prompted color;
- control fidelity: IoU of the drawn foreground with the condition's shape mask;
- diversity: mean pairwise 1 - IoU of the foreground masks of one prompt's samples (0: the same
  layout every time; a model that follows a sketch should be near 0, one that does not, well above).

One row per backend x precision x mode. fp32 runs the given graph set; fp16 a copy exported with
`--precision fp16` from the set's checkpoint (ort-cpu only: tract refuses fp16 sets); int8 the set
calibrated by `calibrate` with its defaults, run with `--precision int8` (ort-cpu, openvino).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import demo_shapes as ds
from .errors import ExportError

MODES = ("none", "sketch", "sketch+color")
STEPS = 20
GUIDANCE = 5.0


@dataclass
class Draw:
    scene: ds.Scene
    mode: str
    images: list[Image.Image]


def held_out(n: int) -> list[ds.Scene]:
    """The first n single-shape scenes of the evaluation stream (one shape: one prompted color/kind)."""
    out = []
    for scene in ds.scenes(ds.EVAL_SEED, 50 * n):
        if len(scene.shapes) == 1:
            out.append(scene)
            if len(out) == n:
                return out
    raise AssertionError("the evaluation stream ran out of single-shape scenes")


def write_conditions(scene: ds.Scene, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"sketch": folder / "sketch.png", "color": folder / "color.png"}
    scene.sketch().save(paths["sketch"])
    scene.palette().save(paths["color"])
    return paths


def run_args(graphs: Path, scene: ds.Scene, mode: str, conditions: dict[str, Path], seed: int, samples: int,
             backend: str, out: Path, steps: int = STEPS, int8: bool = False) -> list[str]:
    args = ["run", "--graphs", str(graphs), "--prompt", scene.caption, "--steps", str(steps), "--guidance", str(GUIDANCE),
            "--seed", str(seed), "--n-samples", str(samples), "--backend", backend, "--out", str(out)]
    if int8:
        args += ["--precision", "int8"]
    if mode != "none":
        args += ["--adapter", f"sketch={conditions['sketch']}"]
    if mode == "sketch+color":
        args += ["--adapter", f"color={conditions['color']}"]
    return args


def draw(binary: Path, graphs: Path, scene: ds.Scene, mode: str, conditions: dict[str, Path], seed: int, samples: int,
         backend: str, work: Path, int8: bool = False) -> Draw:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{mode.replace('+', '_')}.png"
    cmd = [str(binary), *run_args(graphs, scene, mode, conditions, seed, samples, backend, out, int8=int8)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ExportError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    files = [out] if samples == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(samples)]
    return Draw(scene, mode, [Image.open(f).convert("RGB") for f in files])


@dataclass
class Scores:
    color: float
    kind: float
    background: float
    iou: float
    diversity: float
    n: int

    def row(self) -> list[str]:
        return [f"{100 * self.color:.0f} %", f"{100 * self.kind:.0f} %", f"{100 * self.background:.0f} %", f"{self.iou:.2f}",
                f"{self.diversity:.2f}", str(self.n)]


def score(draws: list[Draw]) -> Scores:
    color, kind, bg, ious, div = [], [], [], [], []
    for d in draws:
        shape = d.scene.shapes[0]
        target = d.scene.mask()
        masks = []
        for img in d.images:
            j = ds.judge(img)
            color.append(j.color == shape.color)
            kind.append(j.kind == shape.kind)
            bg.append(j.background == d.scene.background)
            ious.append(ds.iou(j.mask, target))
            masks.append(j.mask)
        div += [1 - ds.iou(a, b) for a, b in itertools.combinations(masks, 2)]
    return Scores(float(np.mean(color)), float(np.mean(kind)), float(np.mean(bg)), float(np.mean(ious)),
                  float(np.mean(div)) if div else 0.0, len(color))


def export_fp16(graphs: Path, out: Path) -> Path:
    from .pipeline import export_pipeline

    ckpt = graphs / "diffusers"
    adapters = [(p.name, p) for p in sorted((ckpt / "adapters").iterdir())]
    return export_pipeline(ckpt / "model", adapters, out, name=f"{graphs.name}-fp16", precision="fp16")


def calibrate_demo(binary: Path, graphs: Path, out: Path, log) -> Path:
    from .calibrate import Options, calibrate

    return calibrate(graphs, out, Options(t2i_rt=binary, log=log))


def evaluate(binary: Path, graphs: Path, scenes: int, samples: int, configs: list[tuple[str, str]], out: Path,
             log=print) -> list[dict]:
    """configs: (backend, precision) pairs. Writes out/results.json, out/results.md and a grid per config."""
    if not binary.is_file():
        raise ExportError(f"--t2i-rt {binary}: no such file (build it: cargo build --release --bin t2i-rt)")
    out.mkdir(parents=True, exist_ok=True)
    test = held_out(scenes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2i-eval-") as tmp:
        conditions = [write_conditions(s, Path(tmp) / f"conditions-{i}") for i, s in enumerate(test)]
        sets = {"fp32": graphs}
        for backend, precision in configs:
            if precision not in sets:
                sets[precision] = (export_fp16(graphs, Path(tmp) / "fp16") if precision == "fp16" else
                                   calibrate_demo(binary, graphs, Path(tmp) / "int8", log))
            set_dir = sets[precision]
            grid = []
            for mode in MODES:
                draws = [draw(binary, set_dir, s, mode, conditions[i], 1000 + i, samples, backend,
                              Path(tmp) / f"{backend}-{precision}-{i}", int8=precision == "int8")
                         for i, s in enumerate(test)]
                sc = score(draws)
                rows.append({"backend": backend, "precision": precision, "mode": mode, **sc.__dict__})
                log(f"{backend} {precision} {mode}: " + " ".join(sc.row()))
                grid.append(draws[:8])
            _grid(test[:8], grid).save(out / f"grid-{backend}-{precision}.png")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table(rows, scenes, samples), encoding="utf-8")
    return rows


def table(rows: list[dict], scenes: int, samples: int) -> str:
    head = ["backend", "precision", "adapters", "shape color", "shape kind", "background", "IoU with sketch", "diversity", "images"]
    lines = [f"{scenes} held-out scenes x {samples} samples, {STEPS} steps, guidance {GUIDANCE}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sc = Scores(r["color"], r["kind"], r["background"], r["iou"], r["diversity"], r["n"])
        lines.append("| " + " | ".join([r["backend"], r["precision"], r["mode"], *sc.row()]) + " |")
    return "\n".join(lines) + "\n"


def _grid(scenes: list[ds.Scene], rows: list[list[Draw]]) -> Image.Image:
    """Columns: sketch, palette, then each mode's first sample; one row per scene."""
    size = ds.SIZE
    img = Image.new("RGB", ((2 + len(rows)) * size, len(scenes) * size), (128, 128, 128))
    for r, scene in enumerate(scenes):
        img.paste(scene.sketch().convert("RGB"), (0, r * size))
        img.paste(scene.palette(), (size, r * size))
        for c, draws in enumerate(rows):
            img.paste(draws[r].images[0], ((2 + c) * size, r * size))
    return img
