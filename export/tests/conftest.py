"""Shared fixtures: one fresh tiny export (graph set + fixtures + the diffusers checkpoint it came from)
per test session, built by the same code as `python -m t2i_export tiny`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

EXPORT_DIR = Path(__file__).resolve().parents[1]
REPO = EXPORT_DIR.parent
COMMITTED_SET = REPO / "graphs" / "tiny-sd1"
COMMITTED_FP16_SET = REPO / "graphs" / "tiny-sd1-fp16"  # same weights as tiny-sd1, --precision fp16
COMMITTED_FIXTURES = REPO / "graphs" / "fixtures" / "tiny-sd1"
sys.path.insert(0, str(EXPORT_DIR))

# Tiny tensors gain nothing from threads, and one thread keeps runs deterministic and robust to a
# busy machine (the fixtures are generated with one thread too).
torch.set_num_threads(1)

from t2i_export.reference import Oracle  # noqa: E402

GRAPH_RTOL_L2 = 1e-5  # a graph against its torch module (graph_parity.rs's bound)


def assert_rel_l2(got: np.ndarray, want: np.ndarray, what: str, bound: float = GRAPH_RTOL_L2) -> float:
    """‖got − want‖ / ‖want‖ (in float64), asserted ≤ `bound`; returned for reporting."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))
    assert err <= bound, f"{what}: relative L2 error {err:.3g} > {bound}"
    return err


def ort_run(path: Path, feeds: dict) -> list[np.ndarray]:
    """One run of the ONNX graph at `path` on onnxruntime's CPU provider, one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)
from t2i_export.tiny import build_tiny_zoo  # noqa: E402


@dataclass
class Zoo:
    set_dir: Path
    fixtures_dir: Path
    model_dir: Path
    adapter_dirs: dict[str, Path]
    controlnet_dirs: dict[str, Path]

    def manifest(self) -> dict:
        return json.loads((self.set_dir / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def zoo_all(tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    """Every set of the tiny zoo, freshly built: {"sd1": (set_dir, fixtures_dir), "sd1-fp16": (set_dir,
    None), ...}, and "work": (the diffusers checkpoints' directory, None)."""
    root = tmp_path_factory.mktemp("tiny")
    built = build_tiny_zoo(root / "graphs", root / "work")
    zoo = {set_dir.name.removeprefix("tiny-"): (set_dir, fixtures) for set_dir, fixtures in built}
    assert list(zoo) == ["sd1", "sd1-fp16", "sd2", "sdxl", "sd1-inpaint"], list(zoo)
    return {**zoo, "work": (root / "work", None)}


@pytest.fixture(scope="session")
def zoo(zoo_all) -> Zoo:
    set_dir, fixtures_dir = zoo_all["sd1"]
    work = zoo_all["work"][0] / "sd1"
    adapters = {n: work / "adapters" / n for n in ("sketch", "color")}
    return Zoo(set_dir, fixtures_dir, work / "tiny-sd1", adapters, {"canny": work / "controlnets" / "canny"})


@pytest.fixture(scope="session")
def oracle(zoo) -> Oracle:
    return Oracle.load(zoo.model_dir, zoo.adapter_dirs, zoo.controlnet_dirs)


def graph_specs(manifest: dict) -> dict[str, dict]:
    """Graph name (as in the fixtures' graph_<name>/) -> GraphSpec."""
    specs = {e["name"]: e["graph"] for e in manifest["text_encoders"]}
    specs.update(manifest["graphs"])
    specs.update({f"adapter_{a['name']}": a["graph"] for a in manifest["adapters"]})
    specs.update({f"controlnet_{c['name']}": c["graph"] for c in manifest.get("controlnets", [])})
    return specs


def load_graph_fixture(fixtures_dir: Path, name: str, spec: dict) -> tuple[dict, dict]:
    d = fixtures_dir / f"graph_{name}"
    inputs = {i["name"]: np.load(d / f"in_{i['name']}.npy") for i in spec["inputs"]}
    outputs = {o["name"]: np.load(d / f"out_{o['name']}.npy") for o in spec["outputs"]}
    return inputs, outputs
