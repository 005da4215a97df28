"""INT8 variants vs their f32 graphs: call time and output error, on ONNX Runtime's CPU EP and OpenVINO.

    t2i-rt run --graphs SET --prompt "a castle" --steps 10 --out x.png --record-inputs /tmp/feeds
    python calibration/int8_speed.py --set SET-int8 --feeds /tmp/feeds

SET-int8 is what `python -m t2i_export calibrate` wrote from SET; the feeds are one recorded run of SET
(every call of each graph: a held-out prompt, so not the calibration data). For every graph with an
`int8` variant: median call time over the recorded calls (after one warm-up call) and the relative L2
of the variant's outputs vs the f32 graph's, on each backend. ONNX Runtime as the runtime sets it up
(ORT_ENABLE_LAYOUT); OpenVINO's CPU plugin reads the QDQ graph and runs its INT8 kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _calls(feeds: Path, graph_file: str, names: list[str]) -> list[dict[str, np.ndarray]]:
    calls = sorted(p for p in (feeds / graph_file.replace("/", "__")).iterdir() if p.is_dir())
    return [{n: np.load(c / f"{n}.npy") for n in names} for c in calls]


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _openvino(path: Path, threads: int):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(feeds):
        request.infer(feeds)
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return run


def _measure(run, calls) -> tuple[float, list[list[np.ndarray]]]:
    run(calls[0])
    times, outs = [], []
    for feeds in calls:
        start = time.perf_counter()
        outs.append(run(feeds))
        times.append(time.perf_counter() - start)
    return statistics.median(times), outs


def _rel_l2(got, want) -> float:
    num = sum(float(np.sum((g.astype(np.float64) - w) ** 2)) for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    return (num / sum(float(np.sum(w.astype(np.float64) ** 2)) for ws in want for w in ws)) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", type=Path, required=True, help="a graph set written by python -m t2i_export calibrate")
    p.add_argument("--feeds", type=Path, required=True, help="a t2i-rt run --record-inputs folder of the f32 set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=12, help="at most this many recorded calls per graph (default: 12)")
    args = p.parse_args()
    m = json.loads((args.set / "manifest.json").read_text(encoding="utf-8"))
    specs = [("unet", m["graphs"]["unet"])] + [("controlnet_" + c["name"], c["graph"]) for c in m.get("controlnets", [])]
    print("| graph | backend | f32 ms/call | int8 ms/call | int8/f32 | int8 vs f32 rel L2 |")
    print("|---|---|---:|---:|---:|---:|")
    for label, spec in specs:
        if "int8" not in spec.get("variants", {}):
            continue
        calls = _calls(args.feeds, spec["file"], [i["name"] for i in spec["inputs"]])[: args.calls]
        for backend, load in (("ort-cpu", _ort), ("openvino", _openvino)):
            f32_time, f32_out = _measure(load(args.set / spec["file"], args.threads), calls)
            int8_time, int8_out = _measure(load(args.set / spec["variants"]["int8"]["file"], args.threads), calls)
            print(f"| {label} | {backend} | {f32_time * 1e3:.1f} | {int8_time * 1e3:.1f} | {int8_time / f32_time:.2f} | "
                  f"{_rel_l2(int8_out, f32_out):.3g} |", flush=True)


if __name__ == "__main__":
    main()
