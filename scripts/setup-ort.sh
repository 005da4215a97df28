#!/usr/bin/env bash
# Puts ONNX Runtime's CPU library (from the onnxruntime 1.31.1 wheel on PyPI) into .ort/, where the
# t2i-rt binary and tests find it without any setting. Needs only python3 + pip; no torch.
#
#   bash scripts/setup-ort.sh --gpu   # also the GPU build (onnxruntime-gpu 1.31.1, CUDA 13) into
#                                     # .ort-gpu/: the library and its CUDA and TensorRT providers,
#                                     # which --backend ort-cuda / ort-trt look for first
set -euo pipefail
cd "$(dirname "$0")/.."

# extract WHEEL DEST_DIR MEMBER...: copies onnxruntime/capi/MEMBER out of WHEEL, each file whole or
# not at all.
extract() {
    python3 - "$@" <<'PY'
import os, shutil, sys, zipfile
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        target = os.path.join(dest, m)
        with z.open("onnxruntime/capi/" + m) as src, open(target + ".part", "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(target + ".part", target)
PY
}

lib=.ort/libonnxruntime.so.1.31.1
if [ ! -f "$lib" ]; then
    mkdir -p .cache/wheels .ort
    python3 -m pip download -q --no-deps --only-binary=:all: onnxruntime==1.31.1 -d .cache/wheels
    extract "$(ls .cache/wheels/onnxruntime-1.31.1-*.whl | head -n1)" .ort libonnxruntime.so.1.31.1
    echo "ONNX Runtime library: $lib"
fi

if [ "${1:-}" = "--gpu" ]; then
    gpu=.ort-gpu/libonnxruntime_providers_cuda.so
    if [ ! -f "$gpu" ]; then
        mkdir -p .cache/wheels .ort-gpu
        # ~256 MB; the CUDA provider alone is 284 MB unpacked.
        python3 -m pip download -q --no-deps --only-binary=:all: onnxruntime-gpu==1.31.1 -d .cache/wheels
        extract "$(ls .cache/wheels/onnxruntime_gpu-1.31.1-*.whl | head -n1)" .ort-gpu \
            libonnxruntime.so.1.31.1 libonnxruntime_providers_shared.so \
            libonnxruntime_providers_tensorrt.so libonnxruntime_providers_cuda.so
        echo "ONNX Runtime GPU library and providers: .ort-gpu/"
    fi
    cat <<'EOF'
The CUDA provider also needs CUDA 13 (libcudart, libcublas, libcublasLt, libcurand) and cuDNN 9, and
the TensorRT provider TensorRT 10 (libnvinfer, libnvonnxparser), on the library path: see docs/gpu.md.
EOF
fi
