#!/usr/bin/env bash
# The exporter's environment: .venv with the pinned requirements (torch, diffusers, onnx, ...), and
# the open_clip_torch wheel, whose bpe_simple_vocab_16e6.txt.gz is the real CLIP vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r export/requirements.txt
mkdir -p .cache/wheels
ls .cache/wheels/open_clip_torch-3.3.0-*.whl >/dev/null 2>&1 \
  || .venv/bin/python -m pip download -q --no-deps open_clip_torch==3.3.0 -d .cache/wheels
