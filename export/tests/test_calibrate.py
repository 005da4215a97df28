"""`python -m t2i_export calibrate` on graphs/tiny-sd1: the INT8 set it writes, its refusals, and what
`t2i-rt run --precision int8` draws from it.

One calibration serves the module: 2 prompts (the second held out) x every condition (none, sketch, color,
canny) x 2 steps, the UNet only (a ControlNet trial costs as much again; `calibration/README.md` has a run
with it), sensitivity per top-level block, at most 1 block in float: ~80 s for the calibration and ~105 s for the module on 2 cores (shared), most of it ONNX
Runtime session creation (1-3 s per trial graph) and its QDQ quantizer (~10 s per fully quantized UNet). The runtime tests drive the
`t2i-rt` binary that `cargo test` built (target/debug/t2i-rt, or $T2I_RT_BIN).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import COMMITTED_FIXTURES, COMMITTED_SET, REPO
from PIL import Image

from t2i_export.calibrate import (ALL_OP_TYPES, Options, _runtime_env, _session, _write_trt_table, calibrate,
                                  fold_weight_casts, node_groups, read_trt_table)
from t2i_export.errors import ExportError
from t2i_export.manifest import verify

CASE = "a_ddim_two_adapters_tau05"  # two adapters, cond_tau 0.5, ddim: adapter and plain calls both run int8


def _binary() -> Path:
    path = Path(os.environ.get("T2I_RT_BIN", REPO / "target" / "debug" / "t2i-rt"))
    if not path.is_file():
        pytest.fail(f"{path}: no t2i-rt binary (build it first: cargo build --bin t2i-rt, or set T2I_RT_BIN)")
    return path


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def int8_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrate") / "tiny-sd1-int8"
    before = _tree(COMMITTED_SET)
    opts = Options(prompts=["a red house on a green hill", "a cat on a sofa, photo"], steps=2, quantize=("unet",),
                   max_excluded=1, groups="top", t2i_rt=_binary(), threads=1, log=lambda line: None)
    calibrate(COMMITTED_SET, out, opts)
    assert _tree(COMMITTED_SET) == before, "calibrate modified its input set"
    return out


def test_int8_set_verifies_and_records_its_quantization(int8_set):
    m = verify(int8_set)
    assert set(_tree(COMMITTED_SET)) - {"manifest.json"} <= set(_tree(int8_set)), "a file of the input set was not copied"
    assert "variants" not in m["controlnets"][0]["graph"]  # --quantize unet: the ControlNet stays f32 only
    for graph in (m["graphs"]["unet"],):
        assert graph["precision"] == "fp32"  # the f32 spec stays as it was
        q = graph["variants"]["int8"]["quantization"]
        assert q["format"] == "qdq" and q["calibration"]["samples"] > 0
        assert len(q["excluded"]) <= 1 and len(q["sensitivity"]) == q["groups"]
        for e in q["excluded"]:  # the groups kept in float are the most sensitive ones
            assert e["sensitivity"] >= max(s for g, s in q["sensitivity"].items() if g not in {x["group"] for x in q["excluded"]})
        assert q["output_rel_l2"] == q["exclusion_trajectory"][-1]["output_rel_l2"] or any(
            t["output_rel_l2"] == q["output_rel_l2"] for t in q["exclusion_trajectory"])
    cal = m["int8_calibration"]
    assert cal["tensorrt_table"]["file"] == "calibration.flatbuffers" and cal["steps"] == 2
    assert (int8_set / "calibration.md").read_text(encoding="utf-8").startswith("# INT8 calibration of tiny-sd1")


def test_int8_unet_is_qdq_with_int8_weights(int8_set):
    m = json.loads((int8_set / "manifest.json").read_text(encoding="utf-8"))
    model = onnx.load(str(int8_set / m["graphs"]["unet"]["variants"]["int8"]["file"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    quantized = m["graphs"]["unet"]["variants"]["int8"]["quantization"]["quantized_nodes"]
    assert quantized > 20 and len(int8_weights) >= quantized, "expected the Conv/Gemm weights stored as int8"
    # inputs and outputs are those of the f32 graph: the runtime feeds a variant as it feeds the graph
    f32 = onnx.load(str(COMMITTED_SET / "unet.onnx"))
    assert [i.name for i in model.graph.input] == [i.name for i in f32.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in f32.graph.output]


def test_trt_table_holds_the_unets_tensors(int8_set):
    table = read_trt_table(int8_set / "calibration.flatbuffers")
    unet = onnx.load(str(COMMITTED_SET / "unet.onnx"))
    conv_outputs = [n.output[0] for n in unet.graph.node if n.op_type == "Conv"]
    assert all(t in table for t in conv_outputs + ["sample", "encoder_hidden_states"])
    assert all(np.isfinite(v) and v >= 0 for v in table.values())


def test_trt_table_ranges_are_symmetric_and_shared_names_keep_the_wider(tmp_path):
    # TensorRT's dynamic range is symmetric: max(|lowest|, |highest|), so a tensor whose negative side is
    # larger keeps it (onnxruntime's write_calibration_table would write max(highest, lowest) = 1.0 here)
    info = _write_trt_table(tmp_path / "t.flatbuffers", {"unet": {"a": (-3.0, 1.0), "b": (0.0, 2.0)},
                                                           "controlnet_x": {"b": (-0.5, 5.0)}})
    assert read_trt_table(tmp_path / "t.flatbuffers") == {"a": 3.0, "b": 5.0}
    assert info["tensors"] == 2 and info["names_shared_between_graphs"] == 1


def test_groups_come_from_weight_names_when_node_names_are_stripped():
    model = onnx.load(str(COMMITTED_SET / "unet.onnx"))
    assert not any(n.name for n in model.graph.node)  # the committed tiny set is exported with --strip-names
    groups = node_groups(model)  # Conv and Gemm by default
    assert {"conv_in", "time_embedding", "down_blocks.0.resnets.0", "mid_block.resnets.1", "conv_out"} <= set(groups)
    assert sum(len(v) for v in groups.values()) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    groups = node_groups(model, op_types=ALL_OP_TYPES)  # a MatMul on a renamed weight joins the node before it
    assert {"down_blocks.0.attentions.0", "mid_block.attentions.0"} <= set(groups)
    assert sum(len(v) for v in groups.values()) == sum(n.op_type in ALL_OP_TYPES for n in model.graph.node)


def test_weights_stored_in_float16_are_widened_to_weights_the_quantizer_sees(tmp_path):
    # graphs/demo-shapes is exported with --compact-weights: weights that are exactly float16 are stored so, read
    # through a Cast. Before widening, the quantizer took them for activations and node_groups found no module
    # names (2 groups on the demo UNet); after, every Conv/Gemm reads an initializer named after its module.
    demo = REPO / "graphs" / "demo-shapes" / "unet.onnx"
    model = onnx.load(str(demo))
    assert len(node_groups(model)) <= 2
    assert fold_weight_casts(model) > 100
    inits = {i.name for i in model.graph.initializer}
    assert not any(n.op_type == "Cast" and n.input[0] in inits for n in model.graph.node)
    assert all(n.input[1] in inits for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert {"conv_in", "conv_out", "time_embedding", "down_blocks.0.resnets.0"} <= set(node_groups(model))
    # float16 -> float32 is exact: the widened graph computes bit for bit what the stored one does
    onnx.save(model, str(tmp_path / "wide.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 16), np.float32),
             "adapter_residual_0": rng.standard_normal((2, 32, 8, 8), np.float32),
             "adapter_residual_1": rng.standard_normal((2, 64, 4, 4), np.float32)}
    want = _session(demo, 1).run(None, feeds)[0]
    got = _session(tmp_path / "wide.onnx", 1).run(None, feeds)[0]
    assert np.array_equal(got, want)


def test_refusals_leave_inputs_untouched(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    before = _tree(COMMITTED_SET)
    with pytest.raises(ExportError, match="not empty"):
        calibrate(COMMITTED_SET, taken, Options(t2i_rt=_binary()))
    assert _tree(taken) == {"keep.txt": b"mine"}
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(COMMITTED_SET, no_manifest, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.raises(ExportError, match="no manifest.json"):
        calibrate(no_manifest, tmp_path / "out", Options(t2i_rt=_binary()))
    assert not (tmp_path / "out").exists() and _tree(COMMITTED_SET) == before
    # the CLI says it in one line, with a non-zero exit
    proc = subprocess.run([sys.executable, "-m", "t2i_export", "calibrate", "--graphs", str(no_manifest), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO / "export")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def _case() -> dict:
    cases = json.loads((COMMITTED_FIXTURES / "cases.json").read_text(encoding="utf-8"))
    return next(c for c in cases if c["name"] == CASE)


def _run_rust(set_dir: Path, case: dict, out: Path, precision: str, backend: str = "ort-cpu") -> tuple[np.ndarray, np.ndarray]:
    args = [str(_binary()), "run", "--graphs", str(set_dir), "--backend", backend, "--precision", precision,
            "--threads", "1", "--prompt", case["prompt"], "--negative-prompt", case["negative_prompt"],
            "--steps", str(case["steps"]), "--guidance", str(case["guidance"]), "--scheduler", case["scheduler"],
            "--cond-tau", str(case["cond_tau"]), "--width", str(case["width"]), "--height", str(case["height"]),
            "--latents", str(COMMITTED_FIXTURES / case["latents"]), "--save-latents", str(out / f"{backend}-{precision}.npy"),
            "--out", str(out / f"{backend}-{precision}.png")]
    for a in case["adapters"]:
        args += ["--adapter", f"{a['name']}={COMMITTED_FIXTURES / a['image']}:{a['weight']}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=_runtime_env())
    assert proc.returncode == 0, proc.stderr
    return np.load(out / f"{backend}-{precision}.npy"), np.asarray(Image.open(out / f"{backend}-{precision}.png").convert("RGB"))


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def test_runtime_int8_matches_the_python_stand_in_and_stays_near_f32(int8_set, tmp_path):
    from test_end_to_end import GraphPipeline

    case = _case()
    rust_latents, rust_image = _run_rust(int8_set, case, tmp_path, "int8")
    pipe = GraphPipeline(int8_set)
    m = pipe.m
    pipe.sess["unet"] = _session(int8_set / m["graphs"]["unet"]["variants"]["int8"]["file"], 1)
    py_latents, py_images = pipe.run(case, COMMITTED_FIXTURES)
    # Same graphs, same ONNX Runtime (1.31.1), same optimisation level (ORT_ENABLE_LAYOUT), one thread each:
    # measured 1.5e-7 latents rel L2 (float parts that sum in another order; the integer kernels are exact).
    # Bound 1e-5: a QuantizeLinear that rounds one value the other way moves it by a quantum, which stays
    # far below that after the 6 steps; a variant not loaded (f32 instead) lands at ~9e-2.
    parity = _rel_l2(rust_latents, py_latents)
    assert parity <= 1e-5, f"int8 runtime vs Python stand-in: latents rel L2 {parity:.3g}"
    assert np.abs(rust_image.astype(int) - py_images[0].astype(int)).max() <= 1

    # int8 vs f32 (the case's expected latents, diffusers'), with this module's calibration (Conv and Gemm
    # quantized, `conv_in` kept in float): measured 8.75e-2 latents rel L2 and 34 levels max pixel difference
    # on tiny-sd1 (a random tiny model is harsher on 8 bits than a trained one; with every MatMul quantized
    # too, `up_blocks.3` was kept in float instead and this case landed at 6.5e-2 / 20, though the UNet's
    # held-out call error was worse, 6.1e-2 against 5.4e-2). Bounds: 1.5x the measurement. A variant not
    # loaded gives 0; broken scales give ~1.
    want = np.load(COMMITTED_FIXTURES / case["expected_latents"])
    expected_image = np.asarray(Image.open(COMMITTED_FIXTURES / case["expected_images"][0]).convert("RGB"))
    distance = _rel_l2(rust_latents, want)
    pixels = np.abs(rust_image.astype(int) - expected_image.astype(int)).max()
    # OpenVINO runs the same variants with its own int8 kernels: measured 0.192 from f32 and 0.185 from ONNX
    # Runtime's int8 result here, though on the small benchmark preset both land at ~8e-2 from f32
    # (calibration/README.md: on this AVX2 CPU without VNNI OpenVINO's int8 calls are 3-4x further from f32
    # than ONNX Runtime's on the same variant, as if its kernels saturated where the 7-bit weights keep
    # ONNX Runtime's from it; not confirmed in OpenVINO's source). Bound: 1.5x the measurement.
    ov_latents, _ = _run_rust(int8_set, case, tmp_path, "int8", "openvino")
    ov = _rel_l2(ov_latents, want)
    print(f"int8 vs f32: latents rel L2 {distance:.3g}, max pixel difference {pixels}; int8 runtime vs stand-in {parity:.3g}; "
          f"openvino int8 vs f32 {ov:.3g}, vs the stand-in {_rel_l2(ov_latents, py_latents):.3g}")
    assert 0 < distance <= 0.13, f"int8 vs f32: latents rel L2 {distance:.3g}"
    assert pixels <= 51
    assert 0 < ov <= 0.29, f"openvino int8 vs f32: latents rel L2 {ov:.3g}"
