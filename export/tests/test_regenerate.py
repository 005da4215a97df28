"""`python -m t2i_export tiny` regenerates the committed graphs/tiny-{sd1,sd2,sdxl}, their
graphs/fixtures/tiny-*, and graphs/tiny-sd1-fp16.

Graph files, tokenizer, manifest, condition images and cases.json must be byte-identical (weights come
from seeded CPU RNGs and the export is deterministic). Computed arrays and images are compared
exactly too; should a different CPU's SIMD path ever change their last bits, the failure message
says by how much.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

import pytest

from conftest import REPO

FAMILIES = ["sd1", "sd2", "sdxl"]
SETS = FAMILIES + ["sd1-fp16"]


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", SETS)
def test_graph_set_is_bit_for_bit(zoo_all, family):
    fresh, committed = zoo_all[family][0], REPO / "graphs" / f"tiny-{family}"
    assert _files(fresh) == _files(committed)
    for rel in _files(committed):
        assert _sha(fresh / rel) == _sha(committed / rel), rel


@pytest.mark.parametrize("family", FAMILIES)
def test_fixtures_are_bit_for_bit(zoo_all, family):
    fixtures_dir, COMMITTED_FIXTURES = zoo_all[family][1], REPO / "graphs" / "fixtures" / f"tiny-{family}"
    assert _files(fixtures_dir) == _files(COMMITTED_FIXTURES)
    for rel in _files(COMMITTED_FIXTURES):
        fresh, committed = fixtures_dir / rel, COMMITTED_FIXTURES / rel
        if _sha(fresh) == _sha(committed):
            continue
        if rel.endswith(".npy"):
            a, b = np.load(fresh), np.load(committed)
            detail = f"max abs diff {np.abs(a.astype(np.float64) - b).max():.3g}" if a.shape == b.shape else f"{a.shape} vs {b.shape}"
        elif rel.endswith(".png") and rel.startswith("cases/"):
            a, b = np.asarray(Image.open(fresh)).astype(int), np.asarray(Image.open(committed)).astype(int)
            detail = f"max pixel diff {np.abs(a - b).max()}"
        else:
            detail = "content differs"
        raise AssertionError(f"{rel}: regenerated file differs from the committed one ({detail})")
