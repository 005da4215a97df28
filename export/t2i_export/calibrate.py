"""`python -m t2i_export calibrate`: a graph set plus calibrated INT8 (QDQ) variants of its per-step graphs.

Steps (issue 17):
1. collect: `t2i-rt run --record-inputs` over calibration prompts x adapter/ControlNet conditions x every
   timestep of `steps`, so the statistics see the real pipeline's feeds (a UNet's activations vary with t);
2. statistics: one pass of onnxruntime.quantization's calibrator over every float tensor of each graph,
   on the calibration runs (the held-out runs, the last prompt's, are kept for measuring);
3. sensitivity: the quantized nodes grouped by module (down_blocks.0.attentions.0, mid_block.resnets.1,
   conv_in, ...), each group quantized alone and its graph output's relative L2 error measured on held-out
   feeds; the most sensitive groups stay in float, greedily, until the whole graph meets the target;
4. the same statistics give the QDQ graphs (ONNX Runtime CPU, OpenVINO) and TensorRT's calibration table.

The output is a complete graph set, staged beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ExportError
from .manifest import MANIFEST, listed_files, verify, write
from .onnx_io import sha256_file

# Varied subjects, styles and compositions: the activation ranges should not come from one kind of image.
DEFAULT_PROMPTS = (
    "a red house on a green hill, oil painting",
    "portrait photo of an old man with a grey beard, studio lighting",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city at night, neon lights, rain",
    "a cat sleeping on a sofa, soft morning light",
    "mountain lake at sunrise, mist, landscape photography",
    "a blue sports car on a race track, motion blur",
    "an anime girl with long hair in a flower field",
)
METHODS = ("minmax", "percentile", "entropy")
QUANTIZABLE = ("unet", "controlnet")
# Which ops get Q/DQ by default. Measured on the small preset's UNet (AMD Zen 3, AVX2 without VNNI, 2 threads,
# calibration/README.md): Conv and Gemm only, 0.84x of the f32 call on ONNX Runtime and 0.91x on OpenVINO; with
# the weight MatMuls too, 1.17x and 1.28x (the attention projections lose more to quantizing their activations
# than their int8 products gain), and with every MatMul, slower still.
OP_TYPES = ("Conv", "Gemm")
ALL_OP_TYPES = ("Conv", "Gemm", "MatMul")
TABLE = "calibration.flatbuffers"
REPORT = "calibration.md"
# Held-out calls measured per sensitivity evaluation, spread over the timesteps: enough to rank groups,
# few enough that one evaluation costs a handful of graph calls.
EVAL_CALLS = 12
# Calls whose min/max are reduced at once by the calibrator: bounds its memory on a real-size UNet.
CALIB_CHUNK = 16


@dataclass
class Options:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    conditions: dict[str, Path] = field(default_factory=dict)  # adapter/ControlNet name -> image
    steps: int = 20
    seed: int = 0
    method: str = "minmax"
    quantize: tuple[str, ...] = QUANTIZABLE
    target_error: float = 0.05
    max_excluded: int = 8
    # 7-bit weights: on AVX2 CPUs without VNNI, ONNX Runtime's u8s8 kernels saturate 16-bit sums; on tiny-sd1
    # that tripled the error (calibration/README.md)
    reduce_range: bool = True
    groups: str = "block"  # block: down_blocks.0.attentions.0; top: down_blocks.0
    # uint8 asymmetric: ONNX Runtime's and OpenVINO's CPU kernels (u8s8); int8 symmetric (zero point 0): the only
    # Q/DQ TensorRT's explicit quantization takes
    activations: str = "uint8"
    op_types: tuple[str, ...] = OP_TYPES
    t2i_rt: Path | None = None
    feeds: Path | None = None  # runs recorded earlier: skip collecting
    threads: int = 2
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


@dataclass
class Target:
    """One graph to quantize: where its spec sits in the manifest, and what its variant is called."""

    label: str  # unet, controlnet_canny
    spec: dict  # the f32 graph spec (manifest object, edited in place in the copy)

    @property
    def file(self) -> str:
        return self.spec["file"]

    @property
    def int8_file(self) -> str:
        stem = self.file[: -len(".onnx")] if self.file.endswith(".onnx") else self.file
        return stem + ".int8.onnx"

    @property
    def record_dir(self) -> str:
        return self.file.replace("/", "__")


def calibrate(graphs: Path, out: Path, opts: Options) -> Path:
    """Write `out`: the set at `graphs` plus INT8 variants, TensorRT's table and calibration.md."""
    if not (graphs / MANIFEST).is_file():
        raise ExportError(f"{graphs}: no {MANIFEST}; --graphs takes a graph set (python -m t2i_export pipeline writes one)")
    source = verify(graphs)
    if not _targets(source, opts.quantize):
        raise ExportError(f"{graphs}: no graph to quantize for --quantize {','.join(opts.quantize)} (a set without ControlNets has "
                          "only its UNet)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; calibrate writes a new graph set: choose another --out or remove it")
    if opts.method not in METHODS:
        raise ExportError(f"--method {opts.method}: expected one of {', '.join(METHODS)}")
    if opts.feeds is None and len(opts.prompts) < 2:
        raise ExportError("calibrate needs at least 2 prompts: the last prompt's runs are held out to measure the error")
    staging = out.parent / f".{out.name}.calibrating-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        # The set's own files only: not what else lies in its folder (a prepared engine cache can be gigabytes).
        for rel in [MANIFEST, *dict.fromkeys(f for f, _ in listed_files(source))]:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(graphs / rel, staging / rel)
        m = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
        targets = _targets(m, opts.quantize)
        with tempfile.TemporaryDirectory(prefix="t2i-calibrate-") as tmp:
            work = Path(tmp)
            runs_root = opts.feeds if opts.feeds is not None else _collect(graphs, m, work, opts)
            runs = sorted(p for p in runs_root.iterdir() if p.is_dir())
            calib_runs, held_runs = _split(runs)
            opts.log(f"calibrate: {len(calib_runs)} calibration runs, {len(held_runs)} held out")
            results, ranges = [], {}
            for target in targets:
                result, tensors = _quantize_graph(staging, target, calib_runs, held_runs, work, opts)
                results.append(result)
                ranges[target.label] = tensors
            table = _write_trt_table(staging / TABLE, ranges)
            m["int8_calibration"] = {
                "tensorrt_table": {"file": TABLE, "sha256": sha256_file(staging / TABLE)},
                "method": opts.method,
                "prompts": list(opts.prompts) if opts.feeds is None else None,
                "conditions": _condition_names(m, opts) if opts.feeds is None else None,
                "steps": opts.steps if opts.feeds is None else None,
                "runs": len(calib_runs),
                "held_out_runs": len(held_runs),
                "samples": {r["graph"]: r["quantization"]["calibration"]["samples"] for r in results},
                "tensorrt": table,
            }
            for target, result in zip(targets, results):
                target.spec.setdefault("variants", {})["int8"] = result["variant"]
            write(staging, m)
            (staging / REPORT).write_text(_report(m, targets, results), encoding="utf-8")
        verify(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _targets(m: dict, kinds: tuple[str, ...]) -> list[Target]:
    unknown = [k for k in kinds if k not in QUANTIZABLE]
    if unknown:
        raise ExportError(f"--quantize {','.join(unknown)}: expected some of {','.join(QUANTIZABLE)}")
    targets = []
    if "unet" in kinds:
        targets.append(Target("unet", m["graphs"]["unet"]))
    if "controlnet" in kinds:
        targets += [Target("controlnet_" + c["name"], c["graph"]) for c in m.get("controlnets", [])]
    return targets


def _split(runs: list[Path]) -> tuple[list[Path], list[Path]]:
    """Calibration and held-out runs. Collected runs are named PROMPT-CONDITION and the last prompt's are held
    out; for other recordings (--feeds), every fourth run."""
    if runs and all(re.fullmatch(r"\d+-.+", r.name) for r in runs):
        last = max(r.name.split("-", 1)[0] for r in runs)
        held = [r for r in runs if r.name.split("-", 1)[0] == last]
    else:
        held = runs[3::4]
    calib = [r for r in runs if r not in held]
    if not calib or not held:
        raise ExportError(f"{len(runs)} recorded runs: need calibration runs and held-out runs (use at least 2 prompts)")
    return calib, held


# ---- collect -------------------------------------------------------------------------------------------


def find_t2i_rt(explicit: Path | None) -> Path:
    """--t2i-rt, else $T2I_RT_BIN, else t2i-rt on PATH, else the repository's target/release, target/debug."""
    if explicit is not None:
        if not explicit.is_file():
            raise ExportError(f"--t2i-rt {explicit}: no such file")
        return explicit
    env = os.environ.get("T2I_RT_BIN")
    if env:
        if not Path(env).is_file():
            raise ExportError(f"T2I_RT_BIN={env}: no such file")
        return Path(env)
    on_path = shutil.which("t2i-rt")
    if on_path:
        return Path(on_path)
    repo = Path(__file__).resolve().parents[2]
    for build in ("release", "debug"):
        candidate = repo / "target" / build / "t2i-rt"
        if candidate.is_file():
            return candidate
    raise ExportError("no t2i-rt binary: build it (cargo build --release --bin t2i-rt), or pass --t2i-rt PATH or set T2I_RT_BIN")


def _condition_names(m: dict, opts: Options) -> list[str]:
    return ["none"] + [a["name"] for a in m["adapters"]] + [c["name"] for c in m.get("controlnets", [])]


def _collect(graphs: Path, m: dict, work: Path, opts: Options) -> Path:
    """Record every graph call of prompts x conditions, one `t2i-rt run` each, into work/runs/PROMPT-CONDITION."""
    binary = find_t2i_rt(opts.t2i_rt)
    adapters = {a["name"]: a for a in m["adapters"]}
    controlnets = {c["name"] for c in m.get("controlnets", [])}
    unknown = sorted(set(opts.conditions) - set(adapters) - controlnets)
    if unknown:
        raise ExportError(f"--condition {unknown[0]}=...: the set has no adapter or ControlNet of that name "
                          f"(it has {', '.join(sorted(set(adapters) | controlnets)) or 'none'})")
    width, height = m["default_size"]
    images = {}
    for name in _condition_names(m, opts)[1:]:
        images[name] = opts.conditions.get(name) or _synthetic_condition(
            work / "conditions" / f"{name}.png", adapters[name]["condition"] if name in adapters else "edges", width, height)
    runs = work / "runs"
    total = len(opts.prompts) * len(_condition_names(m, opts))
    done = 0
    started = time.monotonic()
    for p, prompt in enumerate(opts.prompts):
        for cond in _condition_names(m, opts):
            run = runs / f"{p:02d}-{cond}"
            cmd = [str(binary), "run", "--graphs", str(graphs), "--prompt", prompt, "--steps", str(opts.steps),
                   "--seed", str(opts.seed + p), "--backend", "ort-cpu", "--threads", str(opts.threads),
                   "--no-verify", "--out", str(work / "image.png"), "--record-inputs", str(run)]
            if cond in adapters:
                cmd += ["--adapter", f"{cond}={images[cond]}"]
            elif cond != "none":
                cmd += ["--control", f"{cond}={images[cond]}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_runtime_env())
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise ExportError(f"{binary} run failed while recording (prompt {p}, condition {cond}): {last}")
            done += 1
            opts.log(f"calibrate: recorded run {done}/{total} (prompt {p}, {cond}) in {time.monotonic() - started:.0f} s")
    return runs


def _runtime_env() -> dict[str, str]:
    """The environment for t2i-rt: without ORT_DYLIB_PATH, the ONNX Runtime library of the onnxruntime wheel this
    Python uses (t2i-rt checks that its version is the one it was built for)."""
    env = dict(os.environ)
    if "ORT_DYLIB_PATH" not in env:
        import onnxruntime

        lib = Path(onnxruntime.__file__).parent / "capi" / f"libonnxruntime.so.{onnxruntime.__version__}"
        if lib.is_file():
            env["ORT_DYLIB_PATH"] = str(lib)
    return env


def _synthetic_condition(path: Path, kind: str, width: int, height: int) -> Path:
    """A deterministic condition image: white outlines on black (sketch, canny-like edges) or flat colour
    regions (colour palettes and other RGB conditions)."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = width, height
    boxes = [(0.1, 0.15, 0.45, 0.55), (0.55, 0.2, 0.9, 0.5), (0.25, 0.6, 0.75, 0.9)]
    if kind == "gray" or kind == "edges":
        image = Image.new("L" if kind == "gray" else "RGB", (w, h), 0)
        draw = ImageDraw.Draw(image)
        white = 255 if kind == "gray" else (255, 255, 255)
        line = max(1, w // 128)
        draw.ellipse([boxes[0][0] * w, boxes[0][1] * h, boxes[0][2] * w, boxes[0][3] * h], outline=white, width=line)
        draw.rectangle([boxes[1][0] * w, boxes[1][1] * h, boxes[1][2] * w, boxes[1][3] * h], outline=white, width=line)
        x0, y0, x1, y1 = boxes[2]
        draw.polygon([((x0 + x1) / 2 * w, y0 * h), (x1 * w, y1 * h), (x0 * w, y1 * h)], outline=white, width=line)
    else:
        image = Image.new("RGB", (w, h), (70, 130, 200))
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0.6 * h, w, h], fill=(60, 160, 70))
        for box, colour in zip(boxes, [(220, 40, 40), (240, 200, 60), (120, 60, 160)]):
            draw.ellipse([box[0] * w, box[1] * h, box[2] * w, box[3] * h], fill=colour)
    image.save(path)
    return path


# ---- feeds ---------------------------------------------------------------------------------------------


def _calls(runs: list[Path], target: Target) -> list[Path]:
    return [call for run in runs for call in sorted((run / target.record_dir).glob("[0-9]*")) if call.is_dir()]


def _load(call: Path, names: list[str]) -> dict[str, np.ndarray]:
    missing = [n for n in names if not (call / f"{n}.npy").is_file()]
    if missing:
        raise ExportError(f"{call}: recorded call lacks {missing[0]}.npy; record with a t2i-rt that has --record-inputs")
    return {n: np.load(call / f"{n}.npy") for n in names}


def _spread(calls: list[Path], n: int) -> list[Path]:
    """n calls evenly spaced over the list (the runs' timesteps in order), all when fewer."""
    if len(calls) <= n:
        return calls
    return [calls[round(i * (len(calls) - 1) / (n - 1))] for i in range(n)]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over recorded calls."""

    def __init__(self, calls: list[Path], names: list[str]):
        self.calls, self.names, self.i = calls, names, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.calls):
            return None
        self.i += 1
        return _load(self.calls[self.i - 1], self.names)

    def __len__(self) -> int:
        return len(self.calls)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # What the Rust runtime uses: every optimisation except those that bind the graph to this machine.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def output_rel_l2(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    """‖got − want‖ / ‖want‖ over every output of every call (float64)."""
    num = sum(float(np.sum((g.astype(np.float64) - w) ** 2)) for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    den = sum(float(np.sum(w.astype(np.float64) ** 2)) for ws in want for w in ws)
    return (num / den) ** 0.5


# ---- quantize ------------------------------------------------------------------------------------------


def fold_weight_casts(model) -> int:
    """Replaces every Cast of an initializer (the exporter's --compact-weights stores weights that are exactly
    float16 as float16 plus a Cast) by the cast initializer, in place; returns how many. Without it the quantizer
    takes such a weight for an activation: per-tensor uint8 ranges from calibration, not int8 per-channel
    weights, and no module name to group it by."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    taken = {i.name for i in model.graph.initializer} | {v for n in model.graph.node for v in n.output}
    renamed: dict[str, str] = {}
    folded = []
    for node in model.graph.node:
        if node.op_type != "Cast" or node.input[0] not in inits:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        value = numpy_helper.to_array(inits[node.input[0]]).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        # Named after the stored weight (unet.conv_in.weight.fp16 -> unet.conv_in.weight), which node_groups reads.
        name = node.input[0].removesuffix(".fp16")
        while name in taken:
            name += ".wide"
        taken.add(name)
        renamed[node.output[0]] = name
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        folded.append(node)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    for node in folded:
        model.graph.node.remove(node)
        if consumers.get(node.input[0], 0) == 1:  # the narrow copy has no other reader
            model.graph.initializer.remove(inits.pop(node.input[0]))
    return len(folded)


def node_groups(model, depth: str = "block", op_types: tuple[str, ...] = OP_TYPES) -> dict[str, list[str]]:
    """Module path group -> names of the Conv/MatMul/Gemm nodes in it, in graph order.

    The group is the module path cut after its second index (down_blocks.0.attentions.0,
    mid_block.resnets.1) or at its first name when it has none (conv_in, time_embedding), taken from the
    node's name (/down_blocks.0/attentions.0/...) or, in graphs whose node names were stripped, from its
    weight's initializer name (unet.down_blocks.0.resnets.0.conv1.weight); a node with neither (a MatMul
    on a renamed weight) joins the group of the named node before it. depth "top" cuts after the top-level
    module instead (down_blocks.0, mid_block). Names are given to the nameless
    nodes of `model` (GROUP/OP_INDEX), which nodes_to_quantize needs."""
    inits = {i.name for i in model.graph.initializer}
    paths = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in op_types:
            continue
        path = [p for p in node.name.split("/") if p][:-1] if node.name.startswith("/") else []
        if not path:
            weights = [x for x in node.input[1:] if x in inits and re.search(r"\.(weight|bias)$", x)]
            path = weights[0].split(".")[:-1] if weights else []
        paths[i] = ".".join(path).split(".") if path else []
    # a prefix every path shares (the exporter's wrapper module: unet., controlnet.) names no group
    named = [p for p in paths.values() if p]
    prefix = 0
    while named and all(len(p) > prefix + 1 and p[prefix] == named[0][prefix] for p in named) and not named[0][prefix].isdigit():
        prefix += 1
    groups: dict[str, list[str]] = {}
    current = "graph_inputs"
    for i, node in enumerate(model.graph.node):
        if i not in paths:
            continue
        if paths[i]:
            current = _group(paths[i][prefix:], depth)
        if not node.name:
            node.name = f"{current}/{node.op_type}_{i}"
        groups.setdefault(current, []).append(node.name)
    return groups


def _group(parts: list[str], depth: str = "block") -> str:
    """Cut a module path after its first index below the top level (down_blocks.0.attentions.0,
    mid_block.resnets.1); without one, after the top-level name and its index (conv_in, time_embedding,
    controlnet_down_blocks.3)."""
    for i, part in enumerate(parts):
        if depth == "block" and i >= 2 and part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[: 2 if len(parts) > 1 and parts[1].isdigit() else 1])


def _quantize_graph(staging: Path, target: Target, calib_runs: list[Path], held_runs: list[Path], work: Path,
                    opts: Options) -> tuple[dict, dict]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    log = opts.log
    names = [i["name"] for i in target.spec["inputs"]]
    outputs = [o["name"] for o in target.spec["outputs"]]
    calib_calls, held_calls = _calls(calib_runs, target), _spread(_calls(held_runs, target), EVAL_CALLS)
    if not calib_calls or not held_calls:
        raise ExportError(f"no recorded calls of {target.file}: were the runs recorded from this graph set?")
    big = bool(target.spec["external_data"])
    gdir = work / target.label
    gdir.mkdir()

    # The f32 graph with its nameless nodes named and its stored-narrower weights widened (neither changes
    # what the graph computes).
    model = onnx.load(str(staging / target.file))
    widened = fold_weight_casts(model)
    if widened:
        opts.log(f"calibrate: {target.label}: {widened} weights stored in float16 (--compact-weights) widened to float32 "
                 "so that the quantizer sees them as weights")
    groups = node_groups(model, opts.groups, opts.op_types)
    named = gdir / "named.onnx"
    onnx.save_model(model, str(named), save_as_external_data=big, location="named.onnx.data")
    del model

    started = time.monotonic()
    if opts.method == "minmax":
        tensors = _minmax(named, gdir, calib_calls, names, big, opts.threads)
    else:
        method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[opts.method]
        # Every float tensor, not only the quantized ops' inputs: TensorRT's table wants them all. Histograms
        # of whole tensors: memory grows with the calls of a chunk, not with all of them.
        calibrator = create_calibrator(named, None, augmented_model_path=str(gdir / "augmented.onnx"),
                                       calibrate_method=method, use_external_data_format=big,
                                       providers=["CPUExecutionProvider"])
        for start in range(0, len(calib_calls), CALIB_CHUNK):
            calibrator.collect_data(_Reader(calib_calls[start : start + CALIB_CHUNK], names))
        tensors = calibrator.compute_data()
        del calibrator
    calib_s = time.monotonic() - started
    log(f"calibrate: {target.label}: ranges of {len(tensors.data)} tensors from {len(calib_calls)} calls in {calib_s:.0f} s")

    reference = _session(named, opts.threads)
    feeds = [_load(c, names) for c in held_calls]
    want = [reference.run(outputs, f) for f in feeds]
    del reference
    if opts.activations not in ("uint8", "int8"):
        raise ExportError(f"--activations {opts.activations}: expected uint8 or int8")
    symmetric = opts.activations == "int8"
    activation_type = QuantType.QInt8 if symmetric else QuantType.QUInt8
    # What quantize_static does before quantizing, once instead of per trial.
    base = load_model_with_shape_infer(named)

    def quantize(path: Path, nodes: list[str]) -> float:
        quantizer = QDQQuantizer(copy.deepcopy(base), True, opts.reduce_range, QuantType.QInt8, activation_type, tensors,
                                 nodes, None, list(opts.op_types), {"WeightSymmetric": True, "ActivationSymmetric": symmetric})
        quantizer.quantize_model()
        if big:
            quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
        else:
            quantizer.model.save_model_to_file(str(path))
        session = _session(path, opts.threads)
        return output_rel_l2([session.run(outputs, f) for f in feeds], want)

    started = time.monotonic()
    sensitivity = {g: quantize(gdir / "one.onnx", nodes) for g, nodes in groups.items()}
    ranked = sorted(groups, key=lambda g: -sensitivity[g])
    log(f"calibrate: {target.label}: sensitivity of {len(groups)} groups in {time.monotonic() - started:.0f} s; "
        f"most sensitive {ranked[0]} ({sensitivity[ranked[0]]:.3g})")

    # Keep the k most sensitive groups in float, k the least that meets the target, bisected between 0 and the
    # maximum: that assumes the error falls as k grows, mostly true, and every k tried is recorded.
    trials: dict[int, float] = {}

    def trial(k: int) -> float:
        if k not in trials:
            kept = [n for g in ranked[k:] for n in groups[g]]
            trials[k] = quantize(gdir / f"k{k}.onnx", kept)
            log(f"calibrate: {target.label}: {k} groups in float -> output rel L2 {trials[k]:.3g}")
        return trials[k]

    top = min(opts.max_excluded, len(ranked) - 1)
    if trial(0) <= opts.target_error:
        chosen = 0
    elif trial(top) > opts.target_error:
        # Missed: the best k measured (single-group sensitivities do not add up exactly: on tiny-sd1's
        # ControlNet, 2 groups in float measured worse than none).
        chosen = min(trials, key=lambda k: (trials[k], k))
    else:
        lo, hi = 0, top  # trial(lo) misses the target, trial(hi) meets it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if trial(mid) <= opts.target_error else (mid, hi)
        chosen = hi
    trial(chosen)
    out_path = staging / target.int8_file
    _move_graph(gdir / f"k{chosen}.onnx", out_path, big)
    quant_s = time.monotonic() - started
    excluded = ranked[:chosen]
    trajectory = [{"excluded": k, "output_rel_l2": trials[k]} for k in sorted(trials)]

    data_files = []
    if big:
        data = out_path.with_name(out_path.name + ".data")
        data_files = [{"file": str(Path(target.int8_file).parent / data.name).removeprefix("./"), "sha256": sha256_file(data)}]
    variant = {
        "file": target.int8_file,
        "sha256": sha256_file(out_path),
        "external_data": data_files,
        "quantization": {
            "format": "qdq",
            "tool": "onnxruntime.quantization " + _ort_version(),
            "op_types": list(opts.op_types),
            "weights": {"type": "int8", "symmetric": True, "granularity": "per_channel",
                        "reduce_range": opts.reduce_range},
            "activations": {"type": opts.activations, "symmetric": symmetric, "granularity": "per_tensor"},
            # TensorRT's explicit quantization takes int8 Q/DQ with zero point 0 only
            "tensorrt_explicit_quantization": symmetric,
            "calibration": {"method": opts.method, "samples": len(calib_calls), "runs": len(calib_runs),
                            "tensors": len(tensors.data)},
            "groups": len(groups),
            "grouping": opts.groups + " (module path of the node name, else of its weight's initializer name)",
            "quantized_nodes": sum(len(groups[g]) for g in ranked if g not in excluded),
            "excluded": [{"group": g, "nodes": len(groups[g]), "sensitivity": sensitivity[g]} for g in excluded],
            "sensitivity": {g: sensitivity[g] for g in ranked},
            "target_error": opts.target_error,
            "output_rel_l2": trials[chosen],
            "held_out_samples": len(feeds),
            "exclusion_trajectory": trajectory,
            "target_met": trials[chosen] <= opts.target_error,
        },
    }
    result = {"graph": target.label, "variant": variant, "quantization": variant["quantization"],
              "seconds": {"calibration": round(calib_s, 1), "quantization": round(quant_s, 1)}}
    return result, {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in tensors.items()}


def _minmax(named: Path, gdir: Path, calls: list[Path], names: list[str], big: bool, threads: int):
    """MinMax ranges of every float tensor over `calls`, as onnxruntime.quantization's MinMaxCalibrater gives them
    (TensorsData of [lowest], [highest]), with the graph augmented in linear time (the calibrater inserts each
    reduction in place, quadratic: 47 s for tiny-sd1's 4515-node UNet, minutes for SD 1.5's) and a running
    min/max, so memory does not grow with the calls."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    model = load_model_with_shape_infer(named)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    floats = {v.name for v in [*graph.value_info, *graph.input, *graph.output]
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    tensors = [i.name for i in graph.input if i.name in floats]
    tensors += [o for n in graph.node if n.op_type != "Constant" for o in n.output if o in floats and o not in inits]
    tensors = list(dict.fromkeys(tensors))
    added = []
    for t in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            out = f"{t}__{op}"
            graph.node.append(helper.make_node(op, [t], [out], keepdims=0, name=out))
            added.append(out)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in added)
    augmented = gdir / "augmented.onnx"
    onnx.save_model(model, str(augmented), save_as_external_data=big, location="augmented.onnx.data")
    del model
    session = _session(augmented, threads)
    lo = np.full(len(tensors), np.inf, np.float32)
    hi = np.full(len(tensors), -np.inf, np.float32)
    for call in calls:
        got = np.asarray(session.run(added, _load(call, names)), np.float32).reshape(len(tensors), 2)
        lo, hi = np.minimum(lo, got[:, 0]), np.maximum(hi, got[:, 1])
    return TensorsData(CalibrationMethod.MinMax, {t: (lo[i : i + 1], hi[i : i + 1]) for i, t in enumerate(tensors)})


def _move_graph(src: Path, dst: Path, big: bool) -> None:
    """Move a graph (and its external data, one file named GRAPH.data) into the set, re-pointing the graph at
    the data's new name."""
    if not big:
        shutil.move(src, dst)
        return
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(src), load_external_data=False)
    load_external_data_for_model(model, str(src.parent))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _write_trt_table(path: Path, ranges: dict[str, dict[str, tuple[float, float]]]) -> dict:
    """TensorRT's INT8 table as ONNX Runtime's TRT provider reads it (trt_int8_use_native_calibration_table=0):
    a flatbuffer of tensor name -> dynamic range, TensorRT's symmetric max(|lowest|, |highest|). One table holds
    every calibrated graph; a tensor name two graphs share keeps the wider range."""
    import flatbuffers
    from onnxruntime.quantization.CalTableFlatBuffers import KeyValue, TrtTable

    merged: dict[str, float] = {}
    shared = 0
    for tensors in ranges.values():
        for name, (lo, hi) in tensors.items():
            value = max(abs(lo), abs(hi))
            if name in merged:
                shared += 1
                value = max(value, merged[name])
            merged[name] = value
    builder = flatbuffers.Builder(1024)
    entries = []
    for name in sorted(merged):
        key, value = builder.CreateString(name), builder.CreateString(repr(merged[name]))
        KeyValue.KeyValueStart(builder)
        KeyValue.KeyValueAddKey(builder, key)
        KeyValue.KeyValueAddValue(builder, value)
        entries.append(KeyValue.KeyValueEnd(builder))
    TrtTable.TrtTableStartDictVector(builder, len(entries))
    for entry in reversed(entries):
        builder.PrependUOffsetTRelative(entry)
    vector = builder.EndVector()
    TrtTable.TrtTableStart(builder)
    TrtTable.TrtTableAddDict(builder, vector)
    builder.Finish(TrtTable.TrtTableEnd(builder))
    path.write_bytes(builder.Output())
    return {"graphs": sorted(ranges), "tensors": len(merged), "names_shared_between_graphs": shared,
            "checked_on_gpu": False}


def read_trt_table(path: Path) -> dict[str, float]:
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    table = TrtTable.TrtTable.GetRootAsTrtTable(path.read_bytes(), 0)
    return {table.Dict(i).Key().decode(): float(table.Dict(i).Value()) for i in range(table.DictLength())}


# ---- report --------------------------------------------------------------------------------------------


def _report(m: dict, targets: list[Target], results: list[dict]) -> str:
    cal = m["int8_calibration"]
    lines = [f"# INT8 calibration of {m['name']}", ""]
    if cal["prompts"] is not None:
        lines += [f"Calibration: `t2i-rt run` over {len(cal['prompts'])} prompts x conditions "
                  f"({', '.join(cal['conditions'])}) x {cal['steps']} steps, every graph call recorded; "
                  f"the last prompt's {cal['held_out_runs']} runs held out for the errors below.", ""]
    lines += [f"Statistics: {cal['method']} over every float tensor; the same ranges made the QDQ graphs and "
              f"TensorRT's table `{TABLE}` ({cal['tensorrt']['tensors']} tensors; not checked on a GPU here).", ""]
    for target, r in zip(targets, results):
        q = r["quantization"]
        lines += [f"## {target.label}: `{target.int8_file}`", "",
                  f"QDQ, weights int8 symmetric per channel (reduce_range {q['weights']['reduce_range']}), activations "
                  f"{q['activations']['type']} {'symmetric' if q['activations']['symmetric'] else 'asymmetric'} per tensor; "
                  f"{q['quantized_nodes']} {'/'.join(q['op_types'])} nodes quantized in "
                  f"{q['groups'] - len(q['excluded'])} of {q['groups']} groups; {q['calibration']['samples']} calibration "
                  f"calls, {q['held_out_samples']} held-out calls measured.", "",
                  f"Output relative L2 vs f32 (held out): **{q['output_rel_l2']:.4g}** (target {q['target_error']}, "
                  f"{'met' if q['target_met'] else 'NOT met'}). Calibration {r['seconds']['calibration']} s, "
                  f"sensitivity and quantization {r['seconds']['quantization']} s.", "",
                  "| groups kept in float | output rel L2 |", "|---:|---:|"]
        lines += [f"| {t['excluded']} | {t['output_rel_l2']:.4g} |" for t in q["exclusion_trajectory"]]
        lines += ["", "Sensitivity: output relative L2 with only this group quantized.", "",
                  "| group | sensitivity | kept in float |", "|---|---:|:---:|"]
        kept = {e["group"] for e in q["excluded"]}
        lines += [f"| {g} | {s:.4g} | {'yes' if g in kept else ''} |" for g, s in q["sensitivity"].items()]
        lines.append("")
    return "\n".join(lines)
