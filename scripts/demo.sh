#!/usr/bin/env bash
# Builds t2i-rt and draws with the committed tiny graph set: a prompt, a sketch adapter and a color
# adapter. The tiny models have RANDOM weights, so the pictures are structured noise: this shows the
# runtime working end to end, not a model. See README.md to export a real checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-ort.sh
cargo build --locked --bin t2i-rt
mkdir -p out
fx=graphs/fixtures/tiny-sd1/conditions
./target/debug/t2i-rt inspect graphs/tiny-sd1
./target/debug/t2i-rt run --graphs graphs/tiny-sd1 --prompt "a red house on a hill, watercolor" \
  --negative-prompt "blurry" --adapter "sketch=$fx/sketch.png:1.0" --adapter "color=$fx/color.png:1.2" \
  --cond-tau 0.5 --steps 20 --seed 7 --n-samples 4 --width 128 --height 128 --out out/demo.png
./target/debug/t2i-rt run --graphs graphs/tiny-sd1 --prompt "a red house on a hill, watercolor" \
  --steps 20 --seed 7 --scheduler euler --backend tract --width 128 --height 128 --out out/demo-tract.png
echo "Open out/demo.png (a 2x2 grid) and out/demo-tract.png."
