#!/usr/bin/env bash
# Sets up a fresh checkout and runs every test: the Rust runtime's (parity against the committed
# diffusers fixtures, on ort-cpu, tract and openvino; error handling, limits, numerical faults, a
# short soak, and the committed fuzz inputs replayed), the C API's (and its header against
# cbindgen), the C++ example service under AddressSanitizer, the exporter's (pytest), the GPU
# measurement kit's dry run, and a short coverage-guided fuzz pass over every parser of outside
# input (scripts/fuzz.sh, 15 s per target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
bash scripts/setup-openvino.sh
bash scripts/setup-python.sh
# Graph sets the tests use that are generated, not committed (graphs/generated: the IP-Adapter set).
bash scripts/generate-sets.sh
cargo test --workspace --locked
# The C API from C++: 4 threads on one model, a cancel, img2img from pixels in memory, equal to
# `t2i-rt run`, under AddressSanitizer with leak checking.
bash examples/cpp/run.sh

# The fuzz targets' instrumented build keeps both cores busy for minutes, pytest mostly one (torch
# runs single-threaded there): build them while pytest runs.
mkdir -p fuzz/target
bash scripts/fuzz.sh --build-only >fuzz/target/build.log 2>&1 &
fuzz_build=$!
trap 'kill "$fuzz_build" 2>/dev/null || true' EXIT
export T2I_OPEN_CLIP_WHEEL=$(ls "$PWD"/.cache/wheels/open_clip_torch-3.3.0-*.whl | head -n1)
(cd export && ../.venv/bin/python -m pytest -q tests)
# The GPU measurement kit, end to end on the CPU at tiny sizes, so that it cannot rot between the
# rare sessions with a GPU (docs/gpu.md).
bash benches/gpu/prepare.sh --dry-run
bash benches/gpu/measure.sh --dry-run
if ! wait "$fuzz_build"; then
    tail -n 40 fuzz/target/build.log
    echo "building the fuzz targets failed (fuzz/target/build.log)" >&2
    exit 1
fi
trap - EXIT
bash scripts/fuzz.sh --seconds 15
