#!/usr/bin/env bash
# Puts OpenVINO's CPU runtime (from the openvino 2026.4 wheel on PyPI) into .openvino/, where the
# t2i-rt binary and tests find it for `--backend openvino` without any setting: the C library, the
# core, the ONNX frontend, the IR frontend (which reads the compiled models `build-engine` caches:
# without it OpenVINO silently recompiles instead of importing them), the CPU plugin and TBB (90 MB
# of the wheel's 160 MB; no GPU or NPU plugins, no other frontends). Needs only python3 + pip.
set -euo pipefail
cd "$(dirname "$0")/.."

version=2026.4.0
members=(libopenvino_c.so.2640 libopenvino.so.2640 libopenvino_onnx_frontend.so.2640
    libopenvino_ir_frontend.so.2640 libopenvino_intel_cpu_plugin.so libtbb.so.12 libtbbmalloc.so.2
    libtbbbind_2_5.so.3 libhwloc.so.15)
missing=0
for m in "${members[@]}"; do [ -f ".openvino/$m" ] || missing=1; done
if [ "$missing" = 1 ]; then
    mkdir -p .cache/wheels .openvino
    python3 -m pip download -q --no-deps --only-binary=:all: "openvino==$version" -d .cache/wheels
    # Each file whole or not at all; the C library last.
    python3 - "$(ls .cache/wheels/openvino-$version-*.whl | head -n1)" .openvino "${members[@]}" <<'PY'
import os, shutil, sys, zipfile
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
members.sort(key=lambda m: m.startswith("libopenvino_c."))
with zipfile.ZipFile(wheel) as z:
    for m in members:
        target = os.path.join(dest, m)
        with z.open("openvino/libs/" + m) as src, open(target + ".part", "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
    echo "OpenVINO runtime $version: .openvino/"
fi
