#!/usr/bin/env bash
# Builds the C++ example service against the C API under AddressSanitizer (LeakSanitizer on), runs
# it on the tiny graph set (4 threads x N requests, one cancelled, one img2img from pixels in
# memory), and checks that every image it wrote equals `t2i-rt run` with the same seed, byte for
# byte. Exit status 0 only if the build is clean, ASan reports no error and no leak, and every image
# matches.
#
#   bash examples/cpp/run.sh [REQUESTS_PER_THREAD]     (default 2)
#
# Needs g++ (Debian: apt-get install g++); installed here when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/../.."
requests=${1:-2}

if ! command -v g++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q g++ >/dev/null
    else
        echo "g++ is needed: apt-get install g++" >&2
        exit 1
    fi
fi
bash scripts/setup-ort.sh >/dev/null
cargo build --locked -p t2i-rt-capi -p t2i-rt --bins --lib

set_dir=graphs/tiny-sd1
sketch=graphs/fixtures/tiny-sd1/conditions/sketch.png
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out" "$work/ref"

g++ -std=c++17 -O1 -g -fsanitize=address -fno-omit-frame-pointer -Wall -Wextra -Werror -pthread \
    -I capi/include examples/cpp/service.cpp -L target/debug -lt2i_rt_c -Wl,-rpath,"$PWD/target/debug" \
    -o "$work/service"

# Leaks are reported at exit (detect_leaks); any report fails the run (exitcode).
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so.1.31.1" ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:exitcode=23 \
    "$work/service" "$set_dir" "$sketch" "$work/out" "$requests"

# The static library links too (Rust's staticlib needs the system's pthread, dl and m).
g++ -std=c++17 -O1 -pthread -I capi/include examples/cpp/service.cpp target/debug/libt2i_rt_c.a -ldl -lm \
    -Wl,-z,noexecstack -o "$work/service-static"
mkdir -p "$work/static"
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so.1.31.1" "$work/service-static" "$set_dir" "$sketch" "$work/static" 1 \
    >/dev/null

# Shared weights (one session per graph for all contexts) give the same images.
mkdir -p "$work/shared"
ORT_DYLIB_PATH="$PWD/.ort/libonnxruntime.so.1.31.1" ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:exitcode=23 \
    "$work/service" "$set_dir" "$sketch" "$work/shared" "$requests" share
for png in "$work/out"/seed-*.png; do
    if ! cmp -s "$png" "$work/shared/$(basename "$png")"; then
        echo "$(basename "$png"): shared sessions gave another image" >&2
        exit 1
    fi
done

mismatches=0
for ((t = 0; t < 4; t++)); do
    for ((k = 0; k < requests; k++)); do
        seed=$((100 + t * requests + k))
        extra=()
        if [ "$t" = 0 ] && [ "$k" = $((requests - 1)) ]; then
            extra=(--init-image "$work/out/init.png" --strength 0.75)
        fi
        target/debug/t2i-rt run --graphs "$set_dir" --prompt "a red house" --negative-prompt blurry \
            --adapter "sketch=$sketch" --steps 4 --width 64 --height 64 --threads 1 --seed "$seed" \
            "${extra[@]}" --out "$work/ref/seed-$seed.png" 2>/dev/null
        if ! cmp -s "$work/out/seed-$seed.png" "$work/ref/seed-$seed.png"; then
            echo "seed $seed: the C API's image differs from t2i-rt run's" >&2
            mismatches=$((mismatches + 1))
        fi
    done
done
if [ "$mismatches" -gt 0 ]; then
    exit 1
fi
echo "C++ example: $((4 * requests)) images equal t2i-rt run's; ASan: no errors, no leaks"
