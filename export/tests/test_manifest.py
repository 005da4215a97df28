"""The written graph set follows docs/manifest.md: keys, relative paths, sha256, nothing else left."""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

import numpy as np
import onnxruntime as ort
import pytest
from diffusers import ControlNetModel

from conftest import COMMITTED_FP16_SET, COMMITTED_SET, graph_specs, load_graph_fixture

from t2i_export.errors import ExportError
from t2i_export.manifest import listed_files, verify
from t2i_export.pipeline import export_components, load_adapter, load_checkpoint
from t2i_export.tokenizer import BUILTIN_SHA256

TOP_KEYS = [
    "format_version", "family", "name", "exporter", "precision", "text_encoders", "force_zeros_for_empty_prompt",
    "added_cond", "latent", "size_multiple",
    "default_size", "vae", "scheduler", "residual_slots", "graphs", "adapters",
]
CONTROL_KEYS = ["control_slots", "controlnets"]  # only in sets with ControlNets


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_contract(zoo):
    m = zoo.manifest()
    assert list(m) == TOP_KEYS + CONTROL_KEYS
    assert m["format_version"] == 4 and m["family"] == "sd1" and m["name"] == "tiny-sd1" and m["precision"] == "fp32"
    assert m["exporter"] == {"t2i_export": "0.1.0", "torch": "2.15.0", "diffusers": "0.42.1", "opset": 17}
    (te,) = m["text_encoders"]
    assert te["name"] == "text_encoder" and te["hidden_output"] == "last_hidden_state" and te["pooled_output"] is None
    assert te["tokenizer"] == {"builtin": "clip", "sha256": BUILTIN_SHA256["clip"], "max_length": 77, "pad_token_id": 49407}
    assert m["force_zeros_for_empty_prompt"] is False and m["added_cond"] == {}
    assert m["latent"] == {"channels": 4, "downscale": 8}
    assert m["size_multiple"] == 64 and m["default_size"] == [64, 64]
    assert m["vae"] == {"scaling_factor": 0.18215, "precision": "fp32"}
    sched = json.loads((zoo.model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert m["scheduler"] == sched and list(m["scheduler"]) == list(sched)  # verbatim, key order too
    assert m["residual_slots"] == [
        {"input": "adapter_residual_0", "channels": 8, "downscale": 1},
        {"input": "adapter_residual_1", "channels": 8, "downscale": 2},
        {"input": "adapter_residual_2", "channels": 16, "downscale": 4},
        {"input": "adapter_residual_3", "channels": 16, "downscale": 8},
    ]
    assert list(m["graphs"]) == ["unet", "vae_decoder", "vae_encoder"]
    by_name = {a["name"]: a for a in m["adapters"]}
    assert by_name["sketch"]["adapter_type"] == "full_adapter" and by_name["sketch"]["condition"] == "gray"
    assert by_name["sketch"]["in_channels"] == 1
    assert by_name["color"]["adapter_type"] == "light_adapter" and by_name["color"]["condition"] == "rgb"
    assert by_name["color"]["in_channels"] == 3
    for a in m["adapters"]:
        assert a["downscale_factor"] == 64 and a["residual_slots"] == [0, 1, 2, 3]
        assert a["graph"]["file"] == f"adapter_{a['name']}.onnx"
        assert [o["name"] for o in a["graph"]["outputs"]] == [f"feature_{i}" for i in range(4)]
        for o, slot in zip(a["graph"]["outputs"], m["residual_slots"]):
            assert o["dims"][1] == slot["channels"]
    unet = m["graphs"]["unet"]
    control = [f"control_down_{i}" for i in range(12)] + ["control_mid"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"] + [
        f"adapter_residual_{i}" for i in range(4)
    ] + control
    # conv_in, 4 blocks x (2 resnets + a downsampler but the last), then the mid block
    assert [(s["channels"], s["downscale"]) for s in m["control_slots"]] == [
        (8, 1), (8, 1), (8, 1), (8, 2), (8, 2), (8, 2), (8, 4), (16, 4), (16, 4), (16, 8), (16, 8), (16, 8), (16, 8)
    ]
    assert [s["input"] for s in m["control_slots"]] == control
    (cn,) = m["controlnets"]
    assert list(cn) == ["name", "conditioning_channels", "guess_mode_scales", "graph"]
    assert cn["name"] == "canny" and cn["conditioning_channels"] == 3 and cn["graph"]["file"] == "controlnet_canny.onnx"
    scales = np.float32(cn["guess_mode_scales"])
    assert len(scales) == 13 and scales[0] == np.float32(0.1) and scales[-1] == 1.0 and np.all(np.diff(scales) > 0)
    assert [i["name"] for i in cn["graph"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond", "scales"
    ]
    assert cn["graph"]["inputs"][-1] == {"name": "scales", "dtype": "float32", "dims": [13]}
    assert [o["name"] for o in cn["graph"]["outputs"]] == control
    assert unet["inputs"][1] == {"name": "timestep", "dtype": "float32", "dims": ["batch"]}
    assert te["graph"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "dims": ["batch", 77]}]
    assert te["graph"]["outputs"][0]["dims"] == ["batch", 77, 4]
    assert m["graphs"]["vae_decoder"]["outputs"][0]["dims"] == ["batch", 3, "image_height", "image_width"]
    encoder = m["graphs"]["vae_encoder"]
    assert encoder["file"] == "vae_encoder.onnx"
    assert encoder["inputs"] == [{"name": "image", "dtype": "float32", "dims": ["batch", 3, "image_height", "image_width"]}]
    latent = ["batch", 4, "latent_height", "latent_width"]
    assert encoder["outputs"] == [{"name": n, "dtype": "float32", "dims": latent} for n in ("latent_mean", "latent_std")]
    batch = {
        "text_encoder": "prompts",
        "unet": "guided_samples",
        "vae_decoder": "samples",
        "vae_encoder": "one",
        "adapter_sketch": "one",
        "adapter_color": "one",
        "controlnet_canny": "guided_samples",
    }
    for name, spec in graph_specs(m).items():
        assert list(spec) == ["file", "sha256", "external_data", "precision", "batch", "inputs", "outputs"], name
        assert spec["precision"] == "fp32", name
        assert spec["batch"] == batch[name], name


def test_inpainting_set_manifest(zoo_all):
    """tiny-sd1-inpaint: one 9-channel `sample` (cat[latents, mask, masked_image_latents]), 4 out; the
    same adapter-residual inputs as any exported UNet (2 down blocks: 2 slots); size_multiple 16."""
    m = json.loads((zoo_all["sd1-inpaint"][0] / "manifest.json").read_text(encoding="utf-8"))
    assert m["format_version"] == 4 and m["family"] == "sd1" and m["adapters"] == []
    assert m["latent"] == {"channels": 4, "downscale": 8}
    assert m["size_multiple"] == 16 and m["default_size"] == [64, 64]
    unet = m["graphs"]["unet"]
    assert unet["inputs"][0] == {"name": "sample", "dtype": "float32", "dims": ["batch", 9, "latent_height", "latent_width"]}
    assert unet["outputs"][0]["dims"] == ["batch", 4, "latent_height", "latent_width"]
    assert [i["name"] for i in unet["inputs"][3:]] == [s["input"] for s in m["residual_slots"]]
    assert m["residual_slots"] == [
        {"input": "adapter_residual_0", "channels": 4, "downscale": 1},
        {"input": "adapter_residual_1", "channels": 8, "downscale": 2},
    ]
    assert list(m["graphs"]) == ["unet", "vae_decoder", "vae_encoder"]


@pytest.mark.parametrize("which", ["fresh", "committed", "committed-fp16"])
def test_paths_and_sha256(zoo, which):
    set_dir = {"fresh": zoo.set_dir, "committed": COMMITTED_SET, "committed-fp16": COMMITTED_FP16_SET}[which]
    m = verify(set_dir)
    files = listed_files(m)
    for rel, digest in files:
        p = PurePosixPath(rel)
        assert not p.is_absolute() and ".." not in p.parts and "\\" not in rel
        assert _sha(set_dir / rel) == digest
    # Nothing but the listed files and the manifest: no leftovers from the temp build directory.
    present = sorted(str(p.relative_to(set_dir).as_posix()) for p in set_dir.rglob("*"))
    assert present == sorted([rel for rel, _ in files] + ["manifest.json"])


def test_verify_rejects_a_tampered_set(zoo, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(zoo.set_dir, copy)
    (copy / "vae_decoder.onnx").write_bytes((copy / "vae_decoder.onnx").read_bytes() + b"\0")
    with pytest.raises(ExportError, match="sha256 of vae_decoder.onnx"):
        verify(copy)


@pytest.fixture(scope="module")
def external_set(zoo, tmp_path_factory):
    """The tiny model exported with the external-data threshold at 0: every graph gets a .data file.
    With its ControlNet, so that the UNet takes the control inputs its fixture has."""
    comps = load_checkpoint(zoo.model_dir)
    adapters = [("sketch", load_adapter("sketch", zoo.adapter_dirs["sketch"]))]
    controlnets = [("canny", ControlNetModel.from_pretrained(str(zoo.controlnet_dirs["canny"])).eval())]
    out = tmp_path_factory.mktemp("ext") / "set"
    export_components(comps, adapters, out, "tiny-external", external_data_threshold=0, controlnets=controlnets)
    return out


def test_external_data(zoo, external_set):
    m = verify(external_set)
    specs = graph_specs(m)
    for name, spec in specs.items():
        assert spec["external_data"] == [
            {"file": spec["file"] + ".data", "sha256": _sha(external_set / (spec["file"] + ".data"))}
        ], name
        inputs, outputs = load_graph_fixture(zoo.fixtures_dir, name, spec)
        got = ort.InferenceSession(str(external_set / spec["file"])).run(None, inputs)
        for o, g in zip(spec["outputs"], got):
            np.testing.assert_allclose(g, outputs[o["name"]], rtol=0, atol=1e-4 * max(1.0, np.abs(outputs[o["name"]]).max()))


def test_reexport_replaces_the_previous_set(zoo, external_set):
    """Writing a set over an existing one removes the old files (here: the .data files) and leaves a
    complete new set."""
    comps = load_checkpoint(zoo.model_dir)
    export_components(comps, [], external_set, "tiny-no-adapter")
    m = verify(external_set)
    assert m["adapters"] == [] and all(s["external_data"] == [] for s in m["graphs"].values())
    present = sorted(p.name for p in external_set.iterdir())
    assert present == sorted([rel for rel, _ in listed_files(m)] + ["manifest.json"])
