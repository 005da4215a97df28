#!/usr/bin/env bash
# Builds t2i-rt and draws with the committed demo-shapes model (graphs/demo-shapes): a small latent
# diffusion model trained by this repo on scenes of colored shapes, with `sketch` and `color`
# T2I-Adapters (docs/demo-model.md). Writes
#   out/demo-grid.png   one row per example: sketch | palette | no adapter | sketch | sketch + color
#   out/demo.png        a prompt and a sketch of your choosing, 4 samples (ort-cpu)
#   out/demo-tract.png  the same on the pure-Rust backend
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
cargo build --locked --bin t2i-rt --example demo_grid
mkdir -p out
demo=graphs/demo-shapes
./target/debug/t2i-rt inspect "$demo"
./target/debug/examples/demo_grid --graphs "$demo" --out out/demo-grid.png
./target/debug/t2i-rt run --graphs "$demo" --prompt "a yellow circle on a blue background" \
  --adapter "sketch=$demo/examples/2-sketch.png" --seed 7 --n-samples 4 --out out/demo.png
./target/debug/t2i-rt run --graphs "$demo" --prompt "a yellow circle on a blue background" \
  --adapter "sketch=$demo/examples/2-sketch.png" --seed 7 --n-samples 4 --backend tract --out out/demo-tract.png
echo "Open out/demo-grid.png, out/demo.png (a 2x2 grid) and out/demo-tract.png."
