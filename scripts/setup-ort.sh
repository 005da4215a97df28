#!/usr/bin/env bash
# Puts ONNX Runtime's CPU library (from the onnxruntime 1.31.1 wheel on PyPI) into .ort/, where the
# t2i-rt binary and tests find it without any setting. Needs only python3 + pip; no torch.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=.ort/libonnxruntime.so.1.31.1
if [ -f "$lib" ]; then exit 0; fi
mkdir -p .cache/wheels .ort
python3 -m pip download -q --no-deps --only-binary=:all: onnxruntime==1.31.1 -d .cache/wheels
wheel=$(ls .cache/wheels/onnxruntime-1.31.1-*.whl | head -n1)
python3 - "$wheel" "$lib" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("onnxruntime/capi/libonnxruntime.so.1.31.1") as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
mv "$lib.part" "$lib"
echo "ONNX Runtime library: $lib"
