#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of outside input (fuzz/src/targets.rs): manifest.json,
# .npy latents, condition images, request strings, prompts through the tokenizer, and ONNX graph
# bytes handed to both backends. libFuzzer (libfuzzer-sys) on the stable toolchain: the targets are
# built with the sanitizer-coverage flags cargo-fuzz passes, which stable rustc accepts.
#
#   bash scripts/fuzz.sh                      # the CI pass: every target for 15 s (about 2 min in all)
#   bash scripts/fuzz.sh --seconds 900        # the long run (benches/RESULTS.md has its figures)
#   bash scripts/fuzz.sh --seconds 60 image   # one target
#   bash scripts/fuzz.sh --build-only         # only build the targets
#
# Each target starts from its committed seeds (fuzz/corpus/NAME) and the inputs earlier runs found
# (fuzz/target/corpus/NAME, not committed). A crash, abort, hang (-timeout) or runaway memory
# (-rss_limit_mb, and a 512 MiB cap on any single allocation) stops the target, saves the input under
# fuzz/artifacts/NAME/, and fails the script. Commit such an input to fuzz/regressions/NAME/ once
# it is fixed: `cargo test --test fuzz_regressions` replays it forever after.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=15
build_only=false
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --build-only) build_only=true; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(manifest npy image request tokenizer onnx)

bash scripts/setup-ort.sh
triple=$(rustc -vV | sed -n 's/^host: //p')
# cargo-fuzz's instrumentation (sanitizer coverage with comparison tracing) and cfg; `--target`
# keeps the flags off build scripts and proc macros, which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$triple" --bins
if $build_only; then
    exit 0
fi

total=0
failed=()
printf '%-10s %12s %10s %8s %s\n' target executions exec/s corpus result
for t in "${targets[@]}"; do
    work=fuzz/target/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$work" "$artifacts"
    log=fuzz/target/$t.log
    status=ok
    # -max_len: graphs and images in the seeds are up to ~45 KB; the text parsers need far less.
    case "$t" in onnx|image) max_len=65536 ;; *) max_len=8192 ;; esac
    if ! "fuzz/target/$triple/release/$t" "$work" "fuzz/corpus/$t" \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -max_len="$max_len" \
        -artifact_prefix="$artifacts/" -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1; then
        status=FAILED
        failed+=("$t")
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    size=$(ls "$work" | wc -l)
    total=$((total + ${runs:-0}))
    printf '%-10s %12s %10s %8s %s\n' "$t" "${runs:-?}" "${rate:-?}" "$size" "$status"
done
echo "total executions: $total"
if [ ${#failed[@]} -gt 0 ]; then
    for t in "${failed[@]}"; do
        echo "--- $t (fuzz/target/$t.log):"
        grep -v '^#\|^INFO\|^stat::' "fuzz/target/$t.log" | tail -n 30
    done
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
