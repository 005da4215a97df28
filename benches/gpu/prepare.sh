#!/usr/bin/env bash
# Run here (no GPU needed): makes everything the GPU measurement needs, packed into calls of the
# device tool that fit its 64 MiB carry budget, and prints the exact calls to send (docs/gpu.md).
#
#   bash benches/gpu/prepare.sh             # release binary, onnxruntime-gpu, wheels -> .gpu-kit/
#   bash benches/gpu/prepare.sh --full-provider  # the CUDA provider whole (every architecture):
#                                           # more calls; for a GPU other than sm_90, or if the
#                                           # stripped provider ever fails to load kernels
#   bash benches/gpu/prepare.sh --dry-run   # the same packing with the CPU library and the debug
#                                           # binary -> target/gpu-kit-dry/ (what CI runs)
#
# What travels: the t2i-rt binary; ONNX Runtime 1.31.1's GPU library and its CUDA provider (only
# the sm_90 machine code: H100/H200; kit.py strip-fatbin); the diffusers wheel for the GPU
# machine's Python 3.12 (it has torch, transformers, onnx, but no diffusers); the open_clip wheel
# (the CLIP vocabulary the exporter needs).
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=false
strip_provider=true
case "${1:-}" in
    --dry-run) dry_run=true ;;
    --full-provider) strip_provider=false ;;
    "") ;;
    *) echo "usage: bash benches/gpu/prepare.sh [--full-provider | --dry-run]" >&2; exit 2 ;;
esac

bash scripts/setup-ort.sh $($dry_run || echo --gpu) >/dev/null
bash scripts/setup-python.sh
py=.venv/bin/python
wheels=.cache/wheels

if $dry_run; then
    kit=target/gpu-kit-dry
    staging=target/gpu-kit-dry-staging
    binary=target/debug/t2i-rt
    # `cargo test --workspace` (CI) builds it; building it alone would re-resolve features.
    [ -x "$binary" ] || cargo build --locked -q --workspace --tests
    ort_files=(.ort/libonnxruntime.so.1.31.1)
else
    kit=.gpu-kit
    staging=target/gpu-kit-staging
    echo "building the release binary ..."
    cargo build --locked --release -p t2i-rt --bin t2i-rt
    binary=target/release/t2i-rt
    mkdir -p "$staging"
    if $strip_provider; then
        echo "keeping only the sm_90 code of the CUDA provider ..."
        $py benches/gpu/kit.py strip-fatbin .ort-gpu/libonnxruntime_providers_cuda.so "$staging/libonnxruntime_providers_cuda.so"
    else
        cp .ort-gpu/libonnxruntime_providers_cuda.so "$staging/"
    fi
    ort_files=(.ort-gpu/libonnxruntime.so.1.31.1 .ort-gpu/libonnxruntime_providers_shared.so
               "$staging/libonnxruntime_providers_cuda.so")
fi
mkdir -p "$staging" "$wheels/gpu-py312"
cp "$binary" "$staging/t2i-rt"
strip "$staging/t2i-rt" 2>/dev/null || true

# diffusers (pinned as export/requirements.txt) and the one requirement the GPU image lacks.
diffusers=$(grep -E '^diffusers==' export/requirements.txt)
for req in "$diffusers" importlib_metadata==8.7.0; do
    name=${req%%==*}
    ls "$wheels/gpu-py312/${name}-${req#*==}-"*.whl >/dev/null 2>&1 \
        || $py -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
               --implementation cp --platform manylinux_2_28_x86_64 -d "$wheels/gpu-py312" "$req"
done
stage1=("$wheels"/gpu-py312/*.whl "$wheels"/open_clip_torch-3.3.0-*.whl)

# The budget per call: 64 MiB less what always travels (tracked and untracked-not-ignored files),
# less 1 MiB of margin.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
budget=$(( 64 * 1024 * 1024 - tree - 1024 * 1024 ))
echo "the tree travels with every call: $(( tree / 1024 / 1024 )) MiB; room per call: $(( budget / 1024 / 1024 )) MiB"
# The dry run skips compression (xz of a debug binary takes minutes on 2 cores; pytest covers it).
$py benches/gpu/kit.py pack --out "$kit" --budget "$budget" $($dry_run && echo --no-compress) \
    --stage1 "${stage1[@]}" --stage2 "${ort_files[@]}" "$staging/t2i-rt"
rm -rf "$staging"

calls=$(ls -d "$kit"/call* | wc -l)
if $dry_run; then
    echo "dry-run kit in $kit ($calls calls); bash benches/gpu/measure.sh --dry-run uses it"
    exit 0
fi
cat <<EOF

Kit ready: $calls calls. On a GPU machine, send them with the device tool's run, one right after
the other (the machine goes back 30 s after a call, and a new one starts bare):
EOF
for c in $(seq 1 "$calls"); do
    if [ "$c" = 1 ]; then
        what="installs the wheels, exports the SD 1.5 fp16 graph set, records torch.Generator(\"cuda\") draws (~3 min)"
        cmd="bash benches/gpu/measure.sh prepare"
    elif [ "$c" = "$calls" ]; then
        what="parity, latency, start-up (~5 min)"
        cmd="bash benches/gpu/measure.sh measure"
    else
        what="only carries parts"
        cmd="bash benches/gpu/measure.sh receive"
    fi
    echo "  $c. run(carry=[\"$kit/call$c\"], timeout_s=540, command=\"$cmd\")   # $what"
done
cat <<EOF
Each call's files come back under the reply's files_at. Then, here:
  python3 benches/gpu/kit.py results FILES_AT/gpu-results.md      # into benches/RESULTS.md
and keep torch_randn.npz (from call 1) as graphs/fixtures/rng/torch_cuda_randn.npz.
EOF
