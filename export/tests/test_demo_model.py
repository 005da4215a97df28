"""The demo-shapes model (issue 16): `train-demo` trains and packages a set whose compact graphs
equal a plain export of its checkpoint, bit for bit, and which the runtime draws exactly as
diffusers' adapter pipeline does; the judge and the palette the evaluation rests on; and the
committed model's pictures.

The path tests run twice: on a set that `train-demo` trains here on a budget of seconds (every stage
runs, to the same files as the full run) and on the committed graphs/demo-shapes. The functional
test checks what the committed model draws. The runtime tests drive the `t2i-rt` binary that
`cargo test` built (target/debug/t2i-rt, or $T2I_RT_BIN).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import REPO
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from t2i_export import demo_shapes as ds
from t2i_export.compact import compact_graph, strip_names
from t2i_export.eval_demo import GUIDANCE, MODES, draw, evaluate, held_out, run_args, score, write_conditions
from t2i_export.train_demo import loadable_checkpoint

COMMITTED_DEMO = REPO / "graphs" / "demo-shapes"


@pytest.fixture(scope="module", params=["trained-here", "committed"])
def demo(request, tmp_path_factory) -> Path:
    from t2i_export.train_demo import Plan, package, train

    if request.param == "committed":
        return COMMITTED_DEMO
    root = tmp_path_factory.mktemp("demo")
    plan = Plan(minutes=0.25, scenes=256, threads=1, log=lambda line: None)
    return package(train(root / "diffusers", plan, root / "work"), root / "demo-shapes")


def _binary() -> Path:
    path = Path(os.environ.get("T2I_RT_BIN", REPO / "target" / "debug" / "t2i-rt"))
    if not path.is_file():
        pytest.fail(f"{path}: no t2i-rt binary (build it first: cargo build --bin t2i-rt, or set T2I_RT_BIN)")
    return path


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_compact_graph_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    table = np.zeros((2000, 4), dtype=np.float32)
    table[[3, 700, 1999]] = rng.standard_normal((3, 4)).astype(np.float16).astype(np.float32)
    table[5] = -0.0  # a row of negative zeros is not a zero row
    exact = rng.standard_normal((4, 4)).astype(np.float16).astype(np.float32)
    inexact = np.full((4, 4), 0.1, dtype=np.float32)  # 0.1 is not a float16
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
            helper.make_node("MatMul", ["emb", "exact"], ["h"]),
            helper.make_node("MatMul", ["h", "inexact"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [6, 4]), helper.make_tensor_value_info("emb", TensorProto.FLOAT, [6, 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(exact, "exact"), numpy_helper.from_array(inexact, "inexact")],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(plain))
    compact = tmp_path / "compact.onnx"
    compact.write_bytes(plain.read_bytes())
    compact_graph(compact)

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(compact)).graph.initializer}
    assert "table" not in inits and inits["table.rows.fp16"].shape == (5, 4), sorted(inits)  # zero row + 4 rows
    assert inits["table.row_map"].dtype == np.uint8
    assert inits["exact.fp16"].dtype == np.float16 and inits["inexact"].dtype == np.float32
    ids = np.array([3, 0, 700, -1, 5, 1999], dtype=np.int64)  # -1 is row 1999, as Gather reads it
    a, b = _session(plain).run(None, {"ids": ids}), _session(compact).run(None, {"ids": ids})
    for x, y in zip(a, b):
        assert np.array_equal(_bits(x), _bits(y))
    assert np.signbit(b[1][4]).all(), "the -0.0 row lost its sign"


def test_strip_names_keeps_the_interface_and_the_results(tmp_path):
    """`--strip-names`: no node name, doc string or value_info is left, intermediate tensors (an If's
    branches included) are v0, v1, ...; inputs, outputs and weights keep their names, and the graph
    computes bit for bit the same."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 7

    def branch(name: str, op: str) -> onnx.GraphProto:  # reads the outer "/h/MatMul_output"
        return helper.make_graph([helper.make_node(op, ["/h/MatMul_output"], [f"/{name}/out"], name=f"/{name}/{op}")],
                                 name, [], [helper.make_tensor_value_info(f"/{name}/out", TensorProto.FLOAT, [2, 4])])

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["/h/MatMul_output"], name="/h/MatMul", doc_string="model.py:12"),
            helper.make_node("ReduceSum", ["x"], ["/s/sum"], name="/s/ReduceSum", keepdims=0),
            helper.make_node("Greater", ["/s/sum", "zero"], ["/s/positive"], name="/s/Greater"),
            helper.make_node("If", ["/s/positive"], ["/if/out"], name="/if", then_branch=branch("then", "Relu"),
                             else_branch=branch("else", "Neg")),
            helper.make_node("Sigmoid", ["/if/out"], ["out"], name="/out/Sigmoid"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, dtype=np.float32), "zero")],
        value_info=[helper.make_tensor_value_info("/h/MatMul_output", TensorProto.FLOAT, [2, 4])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(plain))
    stripped = tmp_path / "stripped.onnx"
    stripped.write_bytes(plain.read_bytes())
    compact_graph(stripped, weights=False, names=True)

    model = onnx.load(str(stripped))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["out"]
    assert sorted(t.name for t in g.initializer) == ["w", "zero"] and not g.value_info
    assert all(n.name == "" and n.doc_string == "" for n in g.node)
    subgraphs = [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    names = {x for n in [*g.node, *(m for sg in subgraphs for m in sg.node)] for x in [*n.input, *n.output]}
    names |= {o.name for sg in subgraphs for o in sg.output}
    assert names - {"x", "w", "zero", "out"} == {f"v{i}" for i in range(6)}, sorted(names)
    for x in (np.ones((2, 4), np.float32), -np.ones((2, 4), np.float32)):  # both branches
        a, b = _session(plain).run(None, {"x": x}), _session(stripped).run(None, {"x": x})
        assert np.array_equal(_bits(a[0]), _bits(b[0]))
    again = strip_names(onnx.load(str(plain)))
    assert again.SerializeToString() == model.SerializeToString(), "stripping is not deterministic"


def _feeds(spec: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sizes = {"batch": 2, "latent_height": 16, "latent_width": 16, "latent_height_div2": 8, "latent_width_div2": 8,
             "image_height": 128, "image_width": 128}
    feeds = {}
    for io in spec["inputs"]:
        shape = [d if isinstance(d, int) else sizes[d] for d in io["dims"]]
        if io["dtype"] == "int64":
            feeds[io["name"]] = rng.integers(-3, 49408, shape).astype(np.int64)
        elif io["name"] == "timestep":
            feeds[io["name"]] = np.array([981.0, 1.0], dtype=np.float32)
        else:
            feeds[io["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _specs(manifest: dict) -> dict[str, dict]:
    specs = {e["name"]: e["graph"] for e in manifest["text_encoders"]}
    specs.update(manifest["graphs"])
    specs.update({f"adapter_{a['name']}": a["graph"] for a in manifest["adapters"]})
    return specs


def test_demo_graphs_compute_what_a_plain_export_of_their_checkpoint_computes(demo, tmp_path):
    """The packaged graphs are the checkpoint's, stored compactly: bit for bit the plain export's."""
    from t2i_export.manifest import verify
    from t2i_export.pipeline import export_pipeline

    verify(demo)
    ckpt = loadable_checkpoint(demo, tmp_path / "checkpoint")
    examples = json.loads((demo / "examples" / "examples.json").read_text(encoding="utf-8"))
    assert len(examples) == 4 and all((demo / "examples" / e["sketch"]).is_file() for e in examples)
    plain = export_pipeline(ckpt / "model", [(n, ckpt / "adapters" / n) for n in ("sketch", "color")], tmp_path / "plain")
    committed = _specs(json.loads((demo / "manifest.json").read_text(encoding="utf-8")))
    fresh = _specs(json.loads((plain / "manifest.json").read_text(encoding="utf-8")))
    assert committed.keys() == fresh.keys()
    rng = np.random.default_rng(1)
    for name, spec in committed.items():
        assert [i["name"] for i in spec["inputs"]] == [i["name"] for i in fresh[name]["inputs"]], name
        feeds = _feeds(spec, rng)
        a = _session(demo / spec["file"]).run(None, feeds)
        b = _session(plain / fresh[name]["file"]).run(None, feeds)
        for x, y in zip(a, b):
            assert np.array_equal(_bits(x), _bits(y)), f"{name}: the compact graph computes something else"
        assert (demo / spec["file"]).stat().st_size < 0.6 * (plain / fresh[name]["file"]).stat().st_size, name


@pytest.mark.parametrize("backend,tolerance", [("ort-cpu", 1e-4), ("tract", 1e-3)])
def test_demo_draws_what_diffusers_draws(demo, tmp_path, backend, tolerance):
    """Sketch + color with diffusers' own seed (`--rng torch-cpu`) against StableDiffusionAdapterPipeline
    on the set's checkpoint: final latents within the usual relative L2."""
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline, T2IAdapter

    scene = held_out(1)[0]
    conditions = write_conditions(scene, tmp_path)
    out = tmp_path / "out.png"
    ckpt = loadable_checkpoint(demo, tmp_path / "checkpoint")
    args = run_args(demo, scene, "sketch+color", conditions, seed=3, samples=1, backend=backend, out=out, steps=8)
    args += ["--rng", "torch-cpu", "--save-latents", str(tmp_path / "latents.npy")]
    r = subprocess.run([str(_binary()), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = np.load(tmp_path / "latents.npy")

    adapters = MultiAdapter([T2IAdapter.from_pretrained(str(ckpt / "adapters" / n), torch_dtype=torch.float32)
                             for n in ("sketch", "color")])
    pipe = StableDiffusionAdapterPipeline.from_pretrained(str(ckpt / "model"), adapter=adapters, torch_dtype=torch.float32,
                                                          safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(conditions["sketch"]).convert("L"), Image.open(conditions["color"]).convert("RGB")]
    theirs = pipe(scene.caption, image=images, adapter_conditioning_scale=[1.0, 1.0], num_inference_steps=8, guidance_scale=GUIDANCE,
                  generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images.numpy()
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel <= tolerance, f"{backend}: final latents {rel:.2e} from diffusers' (bound {tolerance})"


def test_demo_samples_with_euler_on_sd15s_schedule(demo):
    """The checkpoint's and so the set's default sampler is Euler (train_demo.SCHEDULER_CONFIG: PNDM
    loses this model's prompt), on SD 1.5's noise schedule."""
    from t2i_export.tiny import SD15_SCHEDULER_CONFIG

    model = demo / "diffusers" / "model"
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert config == {**SD15_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler"}
    # What diffusers' from_pretrained instantiates.
    assert json.loads((model / "model_index.json").read_text(encoding="utf-8"))["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert json.loads((demo / "manifest.json").read_text(encoding="utf-8"))["scheduler"] == config


def test_eval_demo_draws_and_scores_every_mode(demo, tmp_path):
    """The evaluation's plumbing on the seconds-trained set: every mode drawn through `t2i-rt run`,
    scored, tabled and gridded (the figures themselves mean nothing for this set)."""
    rows = evaluate(_binary(), demo, scenes=2, samples=2, configs=[("ort-cpu", "fp32")], out=tmp_path, log=lambda line: None)
    assert [r["mode"] for r in rows] == list(MODES)
    assert all(r["n"] == 4 and 0 <= r["iou"] <= 1 and 0 <= r["color"] <= 1 for r in rows)
    assert (tmp_path / "results.md").read_text(encoding="utf-8").count("| ort-cpu | fp32 |") == 3
    assert Image.open(tmp_path / "grid-ort-cpu-fp32.png").size == (5 * ds.SIZE, 2 * ds.SIZE)


# The functional test of the committed model: the first FUNCTIONAL_SCENES held-out scenes of
# `eval-demo`, with its seeds, samples, steps and guidance, drawn without adapter and with the sketch.
# MEASURED: what was drawn when the model was committed; the bounds leave a margin of MARGIN_IMAGES
# judgements of the 16 and MARGIN_IOU of IoU, since a picture at a decision boundary of the judge may
# go the other way on another CPU (ONNX Runtime and tract round differently there), and require the
# sketch adapter's lift over no adapter.
FUNCTIONAL_SCENES = 8
FUNCTIONAL_SAMPLES = 2
# Measured on an AMD EPYC (2026-12-03), the same on both backends; "iou_none" is without adapter.
_DREW = {"color": 1.0, "kind": 14 / 16, "background": 1.0, "iou": 0.821, "iou_none": 0.182}
MEASURED = {"ort-cpu": _DREW, "tract": _DREW}
MARGIN_IMAGES = 2
MARGIN_IOU = 0.05
MIN_IOU_LIFT = 0.3  # issue 16's target: the sketch adapter lifts IoU by at least 0.3


@pytest.mark.parametrize("backend", ["ort-cpu", "tract"])
def test_committed_demo_draws_the_prompted_color_and_follows_the_sketch(backend, tmp_path):
    scenes = held_out(FUNCTIONAL_SCENES)
    scores = {}
    for mode in ("none", "sketch"):
        draws = [draw(_binary(), COMMITTED_DEMO, s, mode, write_conditions(s, tmp_path / f"conditions-{i}"), 1000 + i,
                      FUNCTIONAL_SAMPLES, backend, tmp_path / f"{mode}-{i}") for i, s in enumerate(scenes)]
        scores[mode] = score(draws)
    n = FUNCTIONAL_SCENES * FUNCTIONAL_SAMPLES
    want = MEASURED[backend]
    got = {"color": scores["sketch"].color, "kind": scores["sketch"].kind, "background": scores["sketch"].background,
           "iou": scores["sketch"].iou, "iou_none": scores["none"].iou}
    report = f"{backend}: drew {got}, measured {want}"
    for key in ("color", "kind", "background"):
        assert got[key] >= want[key] - MARGIN_IMAGES / n, report
    assert got["iou"] >= want["iou"] - MARGIN_IOU, report
    assert got["iou"] - got["iou_none"] >= MIN_IOU_LIFT, report


def test_train_demo_replays_recorded_step_counts_exactly(tmp_path):
    """`--steps-like`: the same step counts and seed give the same checkpoint, byte for byte."""
    from t2i_export.train_demo import Plan, train

    steps = {"vae_steps": 2, "unet_steps": 2, "sketch_steps": 2, "color_steps": 2}
    runs = []
    for k in range(2):
        plan = Plan(minutes=60, scenes=64, threads=1, log=lambda line: None, steps=dict(steps))
        runs.append(train(tmp_path / f"run{k}", plan, tmp_path / f"work{k}"))
    for a in sorted(runs[0].rglob("*.safetensors")):
        assert a.read_bytes() == (runs[1] / a.relative_to(runs[0])).read_bytes(), a.relative_to(runs[0])
    recorded = json.loads((runs[0] / "training.json").read_text(encoding="utf-8"))
    assert {k: recorded[k] for k in steps} == steps


def test_judge_reads_the_scenes_it_is_given():
    """The pixel judge on the renderer's own scenes: right color, kind and background, IoU ~1."""
    for scene in held_out(30):
        j = ds.judge(scene.image())
        shape = scene.shapes[0]
        assert (j.background, j.color, j.kind) == (scene.background, shape.color, shape.kind), scene.caption
        assert ds.iou(j.mask, scene.mask()) > 0.95, scene.caption


def test_palette_is_tencentarc_cubic_then_nearest():
    """cv2.resize INTER_CUBIC from 128 to 2 samples 4 taps around pixel 31.5 (A = -0.75):
    weights -0.09375, 0.59375, 0.59375, -0.09375; then nearest back to 128."""
    a = np.zeros((128, 128, 3), dtype=np.uint8)
    a[:, 31] = 200  # one tap column of the left cell
    out = np.asarray(ds.spatial_palette(Image.fromarray(a)))
    assert out.shape == (128, 128, 3)
    assert (out[:64, :64] == round(200 * 0.59375)).all() and (out[:, 64:] == 0).all()
    a[:, 30] = 200
    out = np.asarray(ds.spatial_palette(Image.fromarray(a)))
    assert (out[:64, :64] == round(200 * 0.5)).all()
    a[:] = 0
    a[:, 30] = 255  # the negative lobe alone: clipped at 0
    assert (np.asarray(ds.spatial_palette(Image.fromarray(a))) == 0).all()
