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
COMMITTED_FIXTURES = REPO / "graphs" / "fixtures" / "tiny-sd1"
sys.path.insert(0, str(EXPORT_DIR))

# Tiny tensors gain nothing from threads, and one thread keeps runs deterministic and robust to a
# busy machine (the fixtures are generated with one thread too).
torch.set_num_threads(1)

from t2i_export.reference import Oracle  # noqa: E402
from t2i_export.tiny import build_tiny_zoo  # noqa: E402


@dataclass
class Zoo:
    set_dir: Path
    fixtures_dir: Path
    model_dir: Path
    adapter_dirs: dict[str, Path]

    def manifest(self) -> dict:
        return json.loads((self.set_dir / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("tiny")
    work = root / "work"
    set_dir, fixtures_dir = build_tiny_zoo(root / "graphs", work)
    return Zoo(set_dir, fixtures_dir, work / "tiny-sd1", {n: work / "adapters" / n for n in ("sketch", "color")})


@pytest.fixture(scope="session")
def oracle(zoo) -> Oracle:
    return Oracle.load(zoo.model_dir, zoo.adapter_dirs)


def graph_specs(manifest: dict) -> dict[str, dict]:
    """Graph name (as in the fixtures' graph_<name>/) -> GraphSpec."""
    specs = dict(manifest["graphs"])
    specs.update({f"adapter_{a['name']}": a["graph"] for a in manifest["adapters"]})
    return specs


def load_graph_fixture(fixtures_dir: Path, name: str, spec: dict) -> tuple[dict, dict]:
    d = fixtures_dir / f"graph_{name}"
    inputs = {i["name"]: np.load(d / f"in_{i['name']}.npy") for i in spec["inputs"]}
    outputs = {o["name"]: np.load(d / f"out_{o['name']}.npy") for o in spec["outputs"]}
    return inputs, outputs
