#!/usr/bin/env bash
# The GPU measurement, run on the GPU machine in the calls benches/gpu/prepare.sh prints:
#
#   bash benches/gpu/measure.sh prepare   # call 1: wheels, SD 1.5 fp16 graph set, torch-cuda draws
#   bash benches/gpu/measure.sh receive   # a middle call, if any: only brings parts
#   bash benches/gpu/measure.sh measure   # last call: parity, latency, start-up -> $OUT
#
#   bash benches/gpu/measure.sh --dry-run # here, on the CPU: both stages at tiny sizes on ort-cpu,
#                                         # from prepare.sh --dry-run's kit (CI runs this)
#
# Everything it makes stays in .gpu-work/ (ignored), which the device machine keeps between calls
# while it is warm; what is meant to come back goes to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=${1:-}
dry_run=false
if [ "$stage" = --dry-run ]; then
    dry_run=true
    kit=target/gpu-kit-dry
    work=target/gpu-work-dry
    export OUT=${OUT:-$work/out}
    rm -rf "$work"
    mkdir -p "$OUT"
    py=.venv/bin/python
    preset=(--preset small --device cpu)
    run=(--device cpu --backend ort-cpu --size 64x64 --steps 2 --warmup 0 --iters 1 --diffusers-iters 1)
else
    kit=.gpu-kit
    work=.gpu-work
    py=python3
    preset=(--preset sd15 --device cuda)
    run=(--device cuda --backend ort-cuda)
    : "${OUT:?set OUT to the folder whose files come back (the device tool sets it)}"
fi
export PYTHONUNBUFFERED=1

case "$stage" in
    prepare | measure | receive | --dry-run) ;;
    *) echo "usage: bash benches/gpu/measure.sh prepare|receive|measure|--dry-run" >&2; exit 2 ;;
esac
[ "$stage" = receive ] && { ls -la "$kit"/call*; exit 0; }

# Stage 1's files: the wheels (installed into .gpu-work/site) and the open_clip wheel (vocabulary).
echo "== unpacking the kit (stage 1)"
"$py" benches/gpu/kit.py unpack --kit "$kit" --dest "$work/kit" --stage 1
if [ ! -f "$work/site/.installed" ]; then
    rm -rf "$work/site"
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$work/site" \
        "$work"/kit/diffusers-*.whl "$work"/kit/importlib_metadata-*.whl
    touch "$work/site/.installed"
fi
export PYTHONPATH=$PWD/$work/site:$PWD/export${PYTHONPATH:+:$PYTHONPATH}
T2I_OPEN_CLIP_WHEEL=$(ls "$PWD/$work"/kit/open_clip_torch-*.whl)
export T2I_OPEN_CLIP_WHEEL

if [ "$stage" = prepare ] || $dry_run; then
    echo "== prepare: graph set, diffusers checkpoint, generator draws"
    "$py" benches/gpu/measure.py prepare --work "$work" --out "$OUT" "${preset[@]}" 2>&1 | tee "$OUT/prepare.log"
fi

if [ "$stage" = measure ] || $dry_run; then
    echo "== unpacking the kit (stage 2)"
    "$py" benches/gpu/kit.py unpack --kit "$kit" --dest "$work/kit" --stage 2
    chmod +x "$work/kit/t2i-rt"
    export ORT_DYLIB_PATH=$PWD/$work/kit/libonnxruntime.so.1.31.1
    # The CUDA provider loads CUDA 13 and cuDNN 9 from the library path: the GPU machine's torch has
    # them as pip packages (nvidia/*/lib).
    nvidia_libs=$("$py" - <<'PY'
import pathlib, site
roots = [pathlib.Path(p) / "nvidia" for p in site.getsitepackages() + [site.getusersitepackages()]]
print(":".join(sorted({str(d) for r in roots if r.is_dir() for d in r.glob("*/lib") if any(d.glob("lib*.so*"))})))
PY
)
    export LD_LIBRARY_PATH=${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "== measure"
    "$py" benches/gpu/measure.py measure --work "$work" --out "$OUT" --binary "$work/kit/t2i-rt" "${run[@]}" 2>&1 \
        | tee "$OUT/measure.log"
fi

if $dry_run; then
    for f in gpu-results.md gpu-results.json torch_randn.npz parity.png; do
        [ -s "$OUT/$f" ] || { echo "dry run: $OUT/$f was not written" >&2; exit 1; }
    done
    grep -q '| t2i-rt ort-cpu |' "$OUT/gpu-results.md" || { echo "dry run: no t2i-rt row in gpu-results.md" >&2; exit 1; }
    echo "GPU kit dry run passed: $OUT"
fi
