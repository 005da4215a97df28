"""`--precision fp16` graph sets: fp16 weights behind float32 IO, the per-graph precision in the
manifest, SDXL's original VAE decoder kept fp32, and results close to the fp32 fixtures.

Tolerances, from `calibration/fp16_error.py` (tiny SD1, onnxruntime CPU): each fp16 graph is within
~1.3e-3 relative L2 of its fp32 torch module (fp16's epsilon is 9.8e-4); through 6 CFG steps the fp16
set's final latents are within 2.2e-3 of the fp32 diffusers fixtures (cases a-f), diffusers itself
in fp16 within 2.8e-3, images within 1 level for both; on the ControlNet cases ca-cg the fp16 set
within 2.8e-3 and 2 levels, diffusers in fp16 within 4.5e-3 and 2 levels (calibration/README.md). Bounds: 5e-3 per graph and end to end, 2
levels: about 2x the measured error, and no tighter than diffusers' own fp16 error.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import COMMITTED_FIXTURES, REPO, graph_specs, load_graph_fixture
from test_end_to_end import GraphPipeline, _cases

from t2i_export.cli import main
from t2i_export.manifest import verify
from t2i_export.pipeline import export_pipeline, load_adapter, load_checkpoint, vae_graphs_precision
from t2i_export.precision import half_weights
from t2i_export.tiny import controlnet_dirs

GRAPH_REL_L2 = 5e-3
LATENT_REL_L2 = 5e-3
PIXEL_LEVELS = 2
NOTICE = "note: vae_decoder and vae_encoder stay fp32"


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def _work(zoo_all, family: str):
    """(checkpoint, adapter dirs, ControlNet dirs) of a tiny family's diffusers checkpoints."""
    work = zoo_all["work"][0] / family
    return work / f"tiny-{family}", {p.name: p for p in sorted((work / "adapters").iterdir())}, controlnet_dirs(work)


@pytest.fixture(scope="module")
def fp16_sets(zoo_all, tmp_path_factory) -> dict[str, tuple]:
    """family -> (fp16 set, what the export wrote to stderr): sd1 from the tiny zoo, sd2 and sdxl
    exported here with `--precision fp16` (SDXL with its original, force_upcast VAE)."""
    sets = {"sd1": (zoo_all["sd1-fp16"][0], "")}
    root = tmp_path_factory.mktemp("fp16")
    for family in ("sd2", "sdxl"):
        model_dir, adapter_dirs, controlnets = _work(zoo_all, family)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out = export_pipeline(model_dir, list(adapter_dirs.items()), root / family, precision="fp16",
                                  controlnets=list(controlnets.items()))
        sets[family] = (out, err.getvalue())
    return sets


def _notes(stderr: str) -> list[str]:
    # (what the libraries print outside the CLI, which quiets them, is not ours)
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def _manifest(set_dir) -> dict:
    return json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))


def test_fp16_manifest_and_io(zoo_all):
    fp16, fp32 = _manifest(zoo_all["sd1-fp16"][0]), _manifest(zoo_all["sd1"][0])
    assert fp16["precision"] == "fp16"
    # SD 1.x pipelines decode in the pipeline's dtype: force_upcast (true by default) is for SDXL's.
    assert fp16["vae"] == {"scaling_factor": 0.18215, "precision": "fp16"}
    specs, specs32 = graph_specs(fp16), graph_specs(fp32)
    assert list(specs) == list(specs32)
    for name, spec in specs.items():
        assert spec["precision"] == "fp16", name
        # The same IO as the fp32 set (float32, int64 token ids): the runtime feeds both alike.
        assert spec["inputs"] == specs32[name]["inputs"] and spec["outputs"] == specs32[name]["outputs"], name

    def without_precision(m):
        m = json.loads(json.dumps(m))
        m.pop("name"), m.pop("precision"), m["vae"].pop("precision")
        for spec in graph_specs(m).values():
            spec.pop("precision"), spec.pop("sha256")
        return m

    assert without_precision(fp16) == without_precision(fp32)


def test_fp16_weights(zoo_all):
    set_dir = zoo_all["sd1-fp16"][0]
    for name, spec in graph_specs(_manifest(set_dir)).items():
        model = onnx.load(str(set_dir / spec["file"]))
        tensors = [t for t in model.graph.initializer if int(np.prod(t.dims)) > 1]
        kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in tensors if t.data_type != onnx.TensorProto.INT64}
        assert kinds == {"FLOAT16"}, f"{name}: weight tensors of types {kinds}"


@pytest.fixture(scope="module")
def sd1_pipe(zoo_all) -> GraphPipeline:
    """The Python stand-in for the runtime on the fp16 set (its sessions serve the per-graph checks too)."""
    return GraphPipeline(zoo_all["sd1-fp16"][0])


def _check_graphs(set_dir, fixtures_dir, sessions: dict | None = None) -> None:
    for name, spec in graph_specs(_manifest(set_dir)).items():
        inputs, outputs = load_graph_fixture(fixtures_dir, name, spec)
        sess = (sessions or {}).get(name) or ort.InferenceSession(str(set_dir / spec["file"]))
        got = sess.run(None, inputs)
        for o, g in zip(spec["outputs"], got):
            assert g.dtype == np.float32 and np.isfinite(g).all(), f"{name}.{o['name']}"
            rel = _rel_l2(g, outputs[o["name"]])
            assert rel <= GRAPH_REL_L2, f"{name}.{o['name']}: relative L2 {rel:.3g} vs the fp32 torch module"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_fp16_graphs_close_to_fp32(fp16_sets, sd1_pipe, family):
    sessions = sd1_pipe.sess if family == "sd1" else None
    _check_graphs(fp16_sets[family][0], REPO / "graphs" / "fixtures" / f"tiny-{family}", sessions)


def test_fp16_set_end_to_end(sd1_pipe):
    """Cases a-f and the ControlNet cases ca-cg of the fp32 fixtures, through the fp16 set (the
    runtime's fp16 check, in Python)."""
    cases = [c for c in _cases(COMMITTED_FIXTURES) if re.match(r"[a-f]_|c[a-g]_", c["name"])]
    assert len(cases) == 13, [c["name"] for c in cases]
    for case in cases:
        latents, pixels = sd1_pipe.run(case, COMMITTED_FIXTURES)
        rel = _rel_l2(latents, np.load(COMMITTED_FIXTURES / case["expected_latents"]))
        assert rel <= LATENT_REL_L2, f"{case['name']}: relative L2 {rel:.3g}"
        for k, png in enumerate(case["expected_images"]):
            expected = np.asarray(Image.open(COMMITTED_FIXTURES / png)).astype(int)
            diff = int(np.abs(pixels[k].astype(int) - expected).max())
            assert diff <= PIXEL_LEVELS, f"{case['name']} image {k}: max pixel diff {diff}"


def test_sdxl_fp16_keeps_the_original_vae_graphs_fp32(fp16_sets):
    set_dir, err = fp16_sets["sdxl"]
    (line,) = _notes(err)  # one line
    assert line.startswith(NOTICE) and "force_upcast" in line and "--vae DIR" in line and "sdxl-vae-fp16-fix" in line
    m = verify(set_dir)
    assert m["precision"] == "fp16" and m["vae"]["precision"] == "fp32"
    precisions = {name: spec["precision"] for name, spec in graph_specs(m).items()}
    assert precisions == {**{n: "fp16" for n in precisions}, "vae_decoder": "fp32", "vae_encoder": "fp32"}
    for graph in ("vae_decoder.onnx", "vae_encoder.onnx"):
        model = onnx.load(str(set_dir / graph))
        assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in model.graph.initializer), graph
    assert _notes(fp16_sets["sd2"][1]) == []  # no notice where nothing is kept fp32


def test_sdxl_vae_precision_fp16_refused_with_force_upcast(capsys, zoo_all, tmp_path):
    model_dir, _, _ = _work(zoo_all, "sdxl")
    for extra in ([], ["--precision", "fp16"]):
        code = main(["pipeline", "--model", str(model_dir), "--vae-precision", "fp16", *extra, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: vae: ") and "force_upcast=true" in err and err.count("\n") == 1, err
        assert not (tmp_path / "o" / "manifest.json").exists()


def _fp16_safe_vae(model_dir, dst):
    """The model's VAE, its config saying force_upcast=false (as madebyollin/sdxl-vae-fp16-fix's does)."""
    shutil.copytree(model_dir / "vae", dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    return dst


def test_sdxl_fp16_safe_vae_via_vae_precision(capsys, zoo_all, tmp_path):
    model_dir, _, _ = _work(zoo_all, "sdxl")
    fixed = _fp16_safe_vae(model_dir, tmp_path / "vae")
    out = tmp_path / "set"
    code = main(["pipeline", "--model", str(model_dir), "--vae", str(fixed), "--vae-precision", "fp16", "--out", str(out)])
    assert code == 0 and NOTICE not in capsys.readouterr().err
    m = verify(out)
    assert m["precision"] == "fp32" and m["vae"]["precision"] == "fp16"
    assert {n: s["precision"] for n, s in graph_specs(m).items()} == {
        "text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "fp32", "vae_decoder": "fp16", "vae_encoder": "fp16"
    }


def test_vae_graphs_precision_follows_unless_given(zoo_all, tmp_path):
    """SD 1.x: see test_fp16_manifest_and_io; SDXL's original VAE: test_sdxl_fp16_keeps_the_original_vae_graphs_fp32."""
    xl, _, _ = _work(zoo_all, "sdxl")
    assert vae_graphs_precision(load_checkpoint(xl, vae_precision="fp32", precision="fp16")) == ("fp32", None)
    fixed = _fp16_safe_vae(xl, tmp_path / "vae")
    assert vae_graphs_precision(load_checkpoint(xl, fixed, precision="fp16")) == ("fp16", None)


def _softmax_input_types(path) -> set[str]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    return {onnx.TensorProto.DataType.Name(types[n.input[0]]) for n in model.graph.node if n.op_type == "Softmax"}


def test_upcast_attention_scores_stay_fp32(fp16_sets):
    """SD 2.x's UNet (`upcast_attention`) computes its attention scores and softmax in float32 in fp16."""
    sd1, sd2 = fp16_sets["sd1"][0], fp16_sets["sd2"][0]
    assert _softmax_input_types(sd1 / "unet.onnx") == {"FLOAT16"}
    assert _softmax_input_types(sd2 / "unet.onnx") == {"FLOAT"}


def test_half_weights_restores_the_exact_tensors(zoo_all):
    model_dir, adapter_dirs, _ = _work(zoo_all, "sd1")
    adapter = load_adapter("sketch", adapter_dirs["sketch"])
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with half_weights(adapter):
        assert all(v.dtype == torch.float16 for v in adapter.state_dict().values() if v.is_floating_point())
    after = adapter.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
