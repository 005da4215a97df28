"""The generated style-adapter graph set and its fixtures: graphs/generated/tiny-sd1-style (the tiny
SD 1 checkpoint of the zoo + the tiny TencentARC style adapter and CLIP vision encoder of
tiny_style_adapter.py, with tiny-sd1's "sketch" T2I-Adapter, names stripped) and
graphs/generated/fixtures/tiny-sd1-style (style_fixtures.py's reference loop, and style_cases.py's
style + T2I-Adapter and style + img2img cases); and graphs/generated/tiny-sd1-ip-style, the same with
tiny_ip_adapter.py's plain IP-Adapter instead of the T2I-Adapter, with its fixtures (style_cases.py's
style + IP-Adapter case), which the runtime's runtime/tests/style_adapter_parity.rs holds itself to.

Generated, not committed, like tiny_ip_set.py's set (committed, it would push the tree past 30 MiB):
``bash scripts/generate-sets.sh`` writes both, scripts/test.sh before the tests. By hand, from
``export/``::

    python -m t2i_export.tiny_style_set --out ../graphs/generated   # or: python -m t2i_export tiny --family sd1-style --family sd1-ip-style --out ...

Deterministic: seeded weights, one intra-op thread; test_regenerate.py holds a fresh build to the
generated files. text_encoder.onnx, vae_decoder.onnx, vae_encoder.onnx (and tiny-sd1-style's
adapter_sketch.onnx) come out byte-identical to graphs/tiny-sd1's, and conditions/*.png to
graphs/fixtures/tiny-sd1's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

NAME = "tiny-sd1-style"
# The style adapter beside an IP-Adapter: the same tiny checkpoint, style adapter and IP-Adapter.
IP_NAME = "tiny-sd1-ip-style"


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
            model_dir, adapter_dirs = write_checkpoint(Path(tmp) / "work")
            unet = StableDiffusionPipeline.from_pretrained(
                str(model_dir), safety_checker=None, requires_safety_checker=False).unet
            encoder_dir, pth = write_tiny_style_adapter(Path(tmp) / "style", unet.config.cross_attention_dim)
            set_dir = export_pipeline(model_dir, [("sketch", adapter_dirs["sketch"])], out_root / NAME, name=NAME,
                                      strip_names=True, style_adapter=pth, style_encoder=encoder_dir)
            fixtures = write_fixtures(model_dir, pth, encoder_dir, out_root / "fixtures" / NAME,
                                      adapter_dir=adapter_dirs["sketch"])
    finally:
        torch.set_num_threads(threads)
    return set_dir, fixtures


def build_tiny_ip_style_set(out_root: Path) -> tuple[Path, Path]:
    """OUT/tiny-sd1-ip-style (the style adapter beside tiny_ip_adapter.py's plain IP-Adapter, names
    stripped) and OUT/fixtures/tiny-sd1-ip-style (style_cases.py's `write_ip_cases`)."""
    from diffusers import StableDiffusionPipeline

    from .pipeline import export_pipeline
    from .style_cases import write_ip_cases
    from .tiny import write_checkpoint
    from .tiny_ip_adapter import write_tiny_ip_adapters
    from .tiny_style_adapter import write_tiny_style_adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="t2i-tiny-ip-style-") as tmp:
            model_dir, _ = write_checkpoint(Path(tmp) / "work")
            unet = StableDiffusionPipeline.from_pretrained(
                str(model_dir), safety_checker=None, requires_safety_checker=False).unet
            image_encoder_dir, files = write_tiny_ip_adapters(Path(tmp) / "ip", unet)
            style_encoder_dir, pth = write_tiny_style_adapter(Path(tmp) / "style", unet.config.cross_attention_dim)
            set_dir = export_pipeline(model_dir, [], out_root / IP_NAME, name=IP_NAME, strip_names=True,
                                      ip_adapter=files["plain"], image_encoder=image_encoder_dir,
                                      style_adapter=pth, style_encoder=style_encoder_dir)
            fixtures = write_ip_cases(model_dir, files["plain"], image_encoder_dir, pth, style_encoder_dir,
                                      out_root / "fixtures" / IP_NAME)
    finally:
        torch.set_num_threads(threads)
    return set_dir, fixtures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write tiny-sd1-style/ and fixtures/tiny-sd1-style/ (the repository's graphs/generated)")
    args = p.parse_args(argv)
    for path in [*build_tiny_style_set(args.out), *build_tiny_ip_style_set(args.out)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
