"""The generated style-adapter graph set and its fixtures: graphs/generated/tiny-sd1-style (the tiny
SD 1 checkpoint of the zoo + the tiny TencentARC style adapter and CLIP vision encoder of
tiny_style_adapter.py, names stripped) and graphs/generated/fixtures/tiny-sd1-style
(style_fixtures.py's reference loop), which the runtime's runtime/tests/style_adapter_parity.rs
holds itself to.

Generated, not committed, like tiny_ip_set.py's set (committed, it would push the tree past 30 MiB):
``bash scripts/generate-sets.sh`` writes it, scripts/test.sh before the tests. By hand, from
``export/``::

    python -m t2i_export.tiny_style_set --out ../graphs/generated   # or: python -m t2i_export tiny --family sd1-style --out ...

Deterministic: seeded weights, one intra-op thread; test_regenerate.py holds a fresh build to the
generated files. text_encoder.onnx, vae_decoder.onnx and vae_encoder.onnx come out byte-identical
to graphs/tiny-sd1's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

NAME = "tiny-sd1-style"


def build_tiny_style_set(out_root: Path) -> tuple[Path, Path]:
    """OUT/tiny-sd1-style (graph set with a style adapter, names stripped) and OUT/fixtures/tiny-sd1-style."""
    from diffusers import StableDiffusionPipeline

    from .pipeline import export_pipeline
    from .style_fixtures import write_fixtures
    from .tiny import write_checkpoint
    from .tiny_style_adapter import write_tiny_style_adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="t2i-tiny-style-") as tmp:
            model_dir, _ = write_checkpoint(Path(tmp) / "work")
            unet = StableDiffusionPipeline.from_pretrained(
                str(model_dir), safety_checker=None, requires_safety_checker=False).unet
            encoder_dir, pth = write_tiny_style_adapter(Path(tmp) / "style", unet.config.cross_attention_dim)
            set_dir = export_pipeline(model_dir, [], out_root / NAME, name=NAME, strip_names=True,
                                      style_adapter=pth, style_encoder=encoder_dir)
            fixtures = write_fixtures(model_dir, pth, encoder_dir, out_root / "fixtures" / NAME)
    finally:
        torch.set_num_threads(threads)
    return set_dir, fixtures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write tiny-sd1-style/ and fixtures/tiny-sd1-style/ (the repository's graphs/generated)")
    args = p.parse_args(argv)
    for path in build_tiny_style_set(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
