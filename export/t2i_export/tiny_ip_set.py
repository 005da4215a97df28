"""The generated IP-Adapter graph sets and their pipeline fixtures, one per family of `IP_SETS`:

* graphs/generated/tiny-sd1-ip (`sd1-ip`): the tiny SD 1 checkpoint of the zoo + the tiny plain
  IP-Adapter and image encoder of tiny_ip_adapter.py, with tiny-sd1's "sketch" T2I-Adapter and
  "canny" ControlNet. Its fixtures: ip_adapter_fixtures.py's `StableDiffusionPipeline` run, and
  ip_adapter_cases.py's cases (text from a torch-cpu seed; IP-Adapter + ControlNet / img2img /
  T2I-Adapter).
* graphs/generated/tiny-sd1-ip-plus (`sd1-ip-plus`): the same checkpoint + the tiny IP-Adapter Plus
  (Resampler projection on the encoder's penultimate hidden states; negative = the encoder on zero
  pixels), no T2I-Adapter or ControlNet. Fixtures: the `StableDiffusionPipeline` run and the
  torch-cpu text case.
* graphs/generated/tiny-sdxl-ip (`sdxl-ip`): the tiny SDXL checkpoint of the zoo (graphs/tiny-sdxl's
  source) + a tiny plain IP-Adapter built for its UNet (same builders and seeds, same image encoder).
  Fixtures: the `StableDiffusionXLPipeline` run and the torch-cpu text case.
* graphs/generated/tiny-sdxl-ip-plus (`sdxl-ip-plus`): the same SDXL checkpoint + a tiny IP-Adapter
  Plus built for its UNet. Fixtures: as tiny-sdxl-ip's.

The runtime's runtime/tests/ip_adapter_parity.rs holds itself to all four (graphs/generated/fixtures/NAME).

Generated, not committed (most of their bytes are copies of tiny-sd1's and tiny-sdxl's graphs, which
would push the tree past 30 MiB): ``bash scripts/generate-sets.sh`` writes them, and scripts/test.sh
does before the tests. By hand, from ``export/``::

    python -m t2i_export.tiny_ip_set --out ../graphs/generated   # or: python -m t2i_export tiny --family sd1-ip --out ...

Deterministic like the rest of `python -m t2i_export tiny`, with seeded weights and one intra-op
thread; test_regenerate.py holds a fresh build to the generated files (`build_tiny_zoo` itself does
not call it). tiny-sd1-ip's text_encoder.onnx, vae_decoder.onnx, vae_encoder.onnx, adapter_sketch.onnx
and controlnet_canny.onnx come out byte-identical to graphs/tiny-sd1's, and conditions/*.png to
graphs/fixtures/tiny-sd1's; ``pixel_values.npy`` is not kept (see below).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

# family -> (set name, IP-Adapter kind, base checkpoint, whether the set carries the base's
# "sketch" T2I-Adapter and "canny" ControlNet for the combined cases)
IP_SETS = {
    "sd1-ip": ("tiny-sd1-ip", "plain", "sd1", True),
    "sd1-ip-plus": ("tiny-sd1-ip-plus", "plus", "sd1", False),
    "sdxl-ip": ("tiny-sdxl-ip", "plain", "sdxl", False),
    "sdxl-ip-plus": ("tiny-sdxl-ip-plus", "plus", "sdxl", False),
}
NAME = IP_SETS["sd1-ip"][0]


def build_tiny_ip_sets(out_root: Path, families: list[str] | None = None) -> list[tuple[Path, Path]]:
    """OUT/NAME (graph set, names stripped) and OUT/fixtures/NAME for each family of `IP_SETS`
    (default: all), in `IP_SETS` order; each base checkpoint is written once."""
    from diffusers import UNet2DConditionModel

    from .ip_adapter_cases import CASES, TEXT_CASES, write_cases
    from .ip_adapter_fixtures import load_pipeline, write_fixtures
    from .pipeline import export_pipeline
    from .tiny import controlnet_dirs, write_checkpoint, write_checkpoint_sdxl
    from .tiny_ip_adapter import write_tiny_ip_adapters

    checkpoints = {"sd1": write_checkpoint, "sdxl": write_checkpoint_sdxl}
    written = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="t2i-tiny-ip-") as tmp:
            bases = {}
            for family, (name, kind, base, combined) in IP_SETS.items():
                if families is not None and family not in families:
                    continue
                if base not in bases:
                    work = Path(tmp) / base
                    model_dir, adapter_dirs = checkpoints[base](work / "work")
                    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
                    encoder_dir, files = write_tiny_ip_adapters(work / "ip", unet)
                    bases[base] = (model_dir, adapter_dirs, controlnet_dirs(work / "work"), encoder_dir, files)
                model_dir, adapter_dirs, controlnets, encoder_dir, files = bases[base]
                extra = dict(controlnets=[("canny", controlnets["canny"])]) if combined else {}
                set_dir = export_pipeline(model_dir, [("sketch", adapter_dirs["sketch"])] if combined else [],
                                          out_root / name, name=name, strip_names=True, ip_adapter=files[kind],
                                          image_encoder=encoder_dir, **extra)
                fixtures = write_fixtures(model_dir, files[kind], encoder_dir, out_root / "fixtures" / name)
                pipe = load_pipeline(model_dir, files[kind], encoder_dir)
                if combined:
                    write_cases(pipe, fixtures, CASES, adapter_dirs["sketch"], controlnets["canny"])
                else:
                    write_cases(pipe, fixtures, TEXT_CASES)
                # 0.6 MB of float32 that clip_image's own fixtures already pin bit for bit; the runtime's
                # test checks the preprocessing through image_embeds instead.
                (fixtures / "pixel_values.npy").unlink()
                written.append((set_dir, fixtures))
    finally:
        torch.set_num_threads(threads)
    return written


def build_tiny_ip_set(out_root: Path, family: str = "sd1-ip") -> tuple[Path, Path]:
    """OUT/NAME and OUT/fixtures/NAME of one family of `IP_SETS`."""
    (written,) = build_tiny_ip_sets(out_root, [family])
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write tiny-*-ip*/ and fixtures/tiny-*-ip*/ (the repository's graphs/generated)")
    p.add_argument("--family", action="append", choices=list(IP_SETS), help="only these sets (repeatable; default: all)")
    args = p.parse_args(argv)
    for set_dir, fixtures in build_tiny_ip_sets(args.out, args.family):
        print(f"wrote {set_dir} and {fixtures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
