"""The generated IP-Adapter graph set and its pipeline fixtures: graphs/generated/tiny-sd1-ip (the tiny SD 1
checkpoint of the zoo + the tiny plain IP-Adapter and image encoder of tiny_ip_adapter.py, with
tiny-sd1's "sketch" T2I-Adapter and "canny" ControlNet) and graphs/generated/fixtures/tiny-sd1-ip
(ip_adapter_fixtures.py's diffusers run, and ip_adapter_cases.py's IP-Adapter + ControlNet / img2img /
T2I-Adapter cases), which the runtime's runtime/tests/ip_adapter_parity.rs holds itself to.

Generated, not committed (3.3 MB, most of it copies of tiny-sd1's graphs, would push the tree past
30 MiB): ``bash scripts/generate-sets.sh`` writes it, and scripts/test.sh does before the tests
(about 20 s). By hand, from ``export/``::

    python -m t2i_export.tiny_ip_set --out ../graphs/generated   # or: python -m t2i_export tiny --family sd1-ip --out ...

Deterministic like the rest of `python -m t2i_export tiny`, with seeded weights and one intra-op
thread; test_regenerate.py holds a fresh build to the generated files (`build_tiny_zoo` itself does
not call it). text_encoder.onnx, vae_decoder.onnx, vae_encoder.onnx, adapter_sketch.onnx and
controlnet_canny.onnx come out byte-identical to graphs/tiny-sd1's, and conditions/*.png to
graphs/fixtures/tiny-sd1's; ``pixel_values.npy`` is not kept (see below).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

NAME = "tiny-sd1-ip"


def build_tiny_ip_set(out_root: Path) -> tuple[Path, Path]:
    """OUT/tiny-sd1-ip (graph set, plain IP-Adapter, names stripped) and OUT/fixtures/tiny-sd1-ip."""
    from diffusers import StableDiffusionPipeline

    from .ip_adapter_cases import write_cases
    from .ip_adapter_fixtures import load_pipeline, write_fixtures
    from .pipeline import export_pipeline
    from .tiny import controlnet_dirs, write_checkpoint
    from .tiny_ip_adapter import write_tiny_ip_adapters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="t2i-tiny-ip-") as tmp:
            model_dir, adapter_dirs = write_checkpoint(Path(tmp) / "work")
            controlnet_dir = controlnet_dirs(Path(tmp) / "work")["canny"]
            unet = StableDiffusionPipeline.from_pretrained(
                str(model_dir), safety_checker=None, requires_safety_checker=False).unet
            encoder_dir, files = write_tiny_ip_adapters(Path(tmp) / "ip", unet)
            set_dir = export_pipeline(model_dir, [("sketch", adapter_dirs["sketch"])], out_root / NAME, name=NAME,
                                      strip_names=True, controlnets=[("canny", controlnet_dir)],
                                      ip_adapter=files["plain"], image_encoder=encoder_dir)
            fixtures = write_fixtures(model_dir, files["plain"], encoder_dir, out_root / "fixtures" / NAME)
            write_cases(load_pipeline(model_dir, files["plain"], encoder_dir), adapter_dirs["sketch"], controlnet_dir,
                        fixtures)
            # 0.6 MB of float32 that clip_image's own fixtures already pin bit for bit; the runtime's
            # test checks the preprocessing through image_embeds instead.
            (fixtures / "pixel_values.npy").unlink()
    finally:
        torch.set_num_threads(threads)
    return set_dir, fixtures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write tiny-sd1-ip/ and fixtures/tiny-sd1-ip/ (the repository's graphs/generated)")
    args = p.parse_args(argv)
    for path in build_tiny_ip_set(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
