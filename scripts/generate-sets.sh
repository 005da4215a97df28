#!/usr/bin/env bash
# Writes the graph sets the tests need that are generated rather than committed (committed, they
# would push the tree past 30 MiB; most of their bytes are copies of graphs/tiny-sd1's and tiny-sdxl's graphs):
#   graphs/generated/tiny-sd1-ip               tiny-sd1 + the tiny plain IP-Adapter (export/t2i_export/tiny_ip_set.py)
#   graphs/generated/tiny-sd1-ip-plus          tiny-sd1 + the tiny IP-Adapter Plus (tiny_ip_set.py)
#   graphs/generated/tiny-sdxl-ip              tiny-sdxl + a tiny plain IP-Adapter (tiny_ip_set.py)
#   graphs/generated/tiny-sdxl-ip-plus         tiny-sdxl + a tiny IP-Adapter Plus (tiny_ip_set.py)
#   graphs/generated/fixtures/tiny-*-ip*       what diffusers' load_ip_adapter pipelines compute with them
#   graphs/generated/tiny-sd1-style            tiny-sd1 + the tiny TencentARC style adapter (tiny_style_set.py)
#   graphs/generated/fixtures/tiny-sd1-style   what the reference loop over diffusers' UNet computes with it
#   graphs/generated/tiny-sd1-ip-style         tiny-sd1 + the style adapter + the plain IP-Adapter (tiny_style_set.py)
#   graphs/generated/fixtures/tiny-sd1-ip-style  the same reference loop with the IP-Adapter's embeds
# Deterministic (seeded weights, one torch thread), about 45 s. Needs the exporter's .venv
# (scripts/setup-python.sh); scripts/test.sh runs both before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run bash scripts/setup-python.sh first" >&2
    exit 1
fi
wheel=$(ls "$PWD"/.cache/wheels/open_clip_torch-3.3.0-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    echo "no open_clip_torch wheel in .cache/wheels: run bash scripts/setup-python.sh first" >&2
    exit 1
fi
# Written beside and swapped in whole, so that an interrupted run leaves no half-written set.
staging=graphs/.generated-staging
rm -rf "$staging"
(cd export && T2I_OPEN_CLIP_WHEEL="$wheel" ../.venv/bin/python -m t2i_export tiny --family sd1-ip --family sd1-ip-plus \
    --family sdxl-ip --family sdxl-ip-plus --family sd1-style --family sd1-ip-style --out "../$staging")
rm -rf graphs/generated
mv "$staging" graphs/generated
echo "wrote graphs/generated: tiny-sd1-ip, tiny-sd1-ip-plus, tiny-sdxl-ip, tiny-sdxl-ip-plus, tiny-sd1-style, tiny-sd1-ip-style and their fixtures"
