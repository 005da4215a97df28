"""Parity fixtures for the runtime's `torch-cpu` generators (runtime/src/rng/): what
`torch.randn(size, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)` draws.

torch's float32 `normal_` has two CPU kernels for 16 or more elements, which round differently
(aten/src/ATen/native/cpu/DistributionTemplates.h): the AVX2 one (`torch.backends.cpu.
get_cpu_capability()` "AVX2" or "AVX512", which falls back to it) and the generic one ("DEFAULT").
Each is recorded in a child process started with `ATEN_CPU_CAPABILITY` set, since torch reads it
once; the writer checks that the child runs the capability asked for (the "avx2" records need an
x86-64 CPU with AVX2 and FMA).

Layout of `graphs/fixtures/rng/`:

    draws.json     {"torch": version, "records": [{"kernel", "seed", "sizes", "offset"}, ...]}
    avx2.npy       float32, every "avx2" record's draws concatenated in record order
    default.npy    the same for "default"

A record is one fresh generator, `manual_seed(seed)`, then one `torch.randn(size)` per entry of
`sizes`, in order (several sizes: draws in a row from one generator, which is how the under-16
path's cached second value carries over). Its values start at `offset` in its kernel's file.

Deterministic: the values depend only on torch's generator and kernels, not on the machine (the
AVX2 kernel is pure float arithmetic; the generic one calls libm: glibc here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import ExportError

# Our name for each kernel -> the capabilities (`torch.backends.cpu.get_cpu_capability()`) that run
# it; the first is the one the fixtures are recorded with (ATEN_CPU_CAPABILITY=<name>).
KERNELS = {"avx2": ("AVX2", "AVX512"), "default": ("DEFAULT",)}

# The largest seed torch accepts is 2**64 - 1; only the low 32 bits seed the engine, so 2**32 + 5
# draws what 5 does.
SEEDS = [0, 1, 42, 2**32 + 5, 2**64 - 1]
# numel 1..15: the scalar path; 16, 17, 31: one block, a block plus a recomputed tail; 256: 16 blocks.
SIZES = [1, 7, 15, 16, 17, 31, 256]
# One latent tensor of a 512x512 SD image, 4x64x64 (64 KB a draw, so only these seeds).
LATENT_SIZE = 4 * 64 * 64
LATENT_SEEDS = {"avx2": [0, 2**64 - 1], "default": [0]}
# Draws in a row from one generator: under-16 then over (and back), the cache surviving a big draw.
SEQUENCES = [[7, 300], [300, 7], [5, 17, 5], [3, 3]]


def records(kernel: str) -> list[dict]:
    """(seed, sizes) of every record of `kernel`, in file order."""
    out = [{"seed": s, "sizes": [n]} for s in SEEDS for n in SIZES]
    out += [{"seed": s, "sizes": [LATENT_SIZE]} for s in LATENT_SEEDS[kernel]]
    out += [{"seed": 42, "sizes": seq} for seq in SEQUENCES]
    return [{"kernel": kernel, **r} for r in out]


def _draw(kernel: str, out: Path) -> None:
    """In the child process: every record of `kernel`, concatenated, to `out` (.npy)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in KERNELS[kernel]:
        raise ExportError(
            f"torch runs CPU capability {capability}, not {KERNELS[kernel][0]}: the {kernel!r} fixtures need a CPU that "
            "has it (x86-64 with AVX2 and FMA for avx2)"
        )
    values = []
    for r in records(kernel):
        g = torch.Generator("cpu").manual_seed(r["seed"])
        values += [torch.randn(n, generator=g, dtype=torch.float32) for n in r["sizes"]]
    np.save(out, torch.cat(values).numpy())


def draw(kernel: str, capability: str | None = None) -> np.ndarray:
    """Every record of `kernel`, concatenated, drawn by torch in a child process started with
    ATEN_CPU_CAPABILITY=`capability` (default: the kernel's own name)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{kernel}.npy"
        child = subprocess.run(
            [sys.executable, "-m", "t2i_export.rng_fixtures", kernel, str(out)],
            env={**os.environ, "ATEN_CPU_CAPABILITY": capability or kernel},
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"drawing the {kernel} fixtures failed: {last}")
        return np.load(out)


def write_rng_fixtures(out_dir: Path) -> Path:
    """Writes `out_dir` (draws.json, avx2.npy, default.npy); see the module docs."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for kernel in KERNELS:
        values = draw(kernel)
        offset = 0
        for r in records(kernel):
            entries.append({**r, "offset": offset})
            offset += sum(r["sizes"])
        if offset != values.size:
            raise ExportError(f"{kernel}: {values.size} values drawn, {offset} expected")
        np.save(out_dir / f"{kernel}.npy", values)
    rows = ",\n".join("  " + json.dumps(e) for e in entries)
    text = f'{{"torch": {json.dumps(torch.__version__.split("+")[0])}, "records": [\n{rows}\n]}}\n'
    (out_dir / "draws.json").write_text(text, encoding="utf-8")
    return out_dir


if __name__ == "__main__":  # the child process of write_rng_fixtures
    try:
        _draw(sys.argv[1], Path(sys.argv[2]))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
