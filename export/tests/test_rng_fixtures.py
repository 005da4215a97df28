"""graphs/fixtures/rng/ (the runtime's torch-cpu generator fixtures) regenerate byte for byte, and
torch's AVX-512 capability draws what its AVX2 one does (why one `torch-cpu` covers both)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO

from t2i_export.rng_fixtures import draw, write_rng_fixtures

COMMITTED = REPO / "graphs" / "fixtures" / "rng"


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo", encoding="utf-8").read().split()
    except OSError:
        return False


needs_avx2 = pytest.mark.skipif(
    not (_cpu_has("avx2") and _cpu_has("fma")), reason="the avx2 records need torch's AVX2 kernel (x86-64, AVX2 + FMA)"
)


@needs_avx2
def test_rng_fixtures_regenerate_byte_for_byte(tmp_path):
    fresh = write_rng_fixtures(tmp_path / "rng")
    for name in ["avx2.npy", "default.npy"]:
        assert (fresh / name).read_bytes() == (COMMITTED / name).read_bytes(), name
    # draws.json also names the torch version that wrote it; the records must be the same.
    records = [json.loads((d / "draws.json").read_text(encoding="utf-8"))["records"] for d in (fresh, COMMITTED)]
    assert records[0] == records[1]


@pytest.mark.skipif(not (_cpu_has("avx512f") and _cpu_has("avx512bw") and _cpu_has("avx512vl") and _cpu_has("avx512dq")),
                    reason="needs a CPU torch runs with capability AVX512")
def test_avx512_capability_draws_what_avx2_does():
    # The AVX-512 build registers no normal_ kernel (REGISTER_DISPATCH gives it nullptr), so torch
    # runs the AVX2 one.
    committed = np.load(COMMITTED / "avx2.npy")
    assert np.array_equal(draw("avx2", "avx512").view(np.uint32), committed.view(np.uint32))
