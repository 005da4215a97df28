"""Reference outputs for the runtime's conditions made from photos (runtime/src/preprocess.rs), by the
tools diffusers users run: OpenCV, as controlnet_aux's `CannyDetector` and `apply_color` (TencentARC's
color palette) call it.

Run from ``export/`` with OpenCV importable (it is not a dependency of the exporter; e.g.
``pip install --target /tmp/cv2 opencv-python-headless`` and ``PYTHONPATH=/tmp/cv2``)::

    python -m t2i_export.condition_fixtures --out ../graphs/fixtures/conditions

Writes ``photo.png`` (a deterministic photo-like RGB picture: gradients, soft and hard shapes, seeded
noise; 256x192), and what OpenCV makes of it: ``palette.png`` (``cv2.resize`` to (W // 64, H // 64)
with ``INTER_CUBIC``, then back with ``INTER_NEAREST``), ``canny_rgb.png`` (``cv2.Canny`` on the RGB
array, as controlnet_aux does: gradients per channel, the largest wins) and ``canny_gray.png``
(``cv2.Canny`` on Pillow's ``convert("L")``), both at thresholds 100 and 200. ``opencv.txt`` records
the OpenCV version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 4321
SIZE = (256, 192)  # (width, height): 4 x 3 palette cells
LOW, HIGH = 100, 200


def photo() -> Image.Image:
    """Sky-like vertical gradient, a blurred sun, hard-edged buildings, a textured ground, noise."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    sky = np.stack([90 + 0.3 * y, 140 + 0.4 * y, 230 - 0.2 * x], axis=-1)
    image = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
    sun = Image.new("L", SIZE, 0)
    ImageDraw.Draw(sun).ellipse((170, 20, 220, 70), fill=255)
    image.paste((250, 210, 80), mask=sun.filter(ImageFilter.GaussianBlur(4)))
    d = ImageDraw.Draw(image)
    d.rectangle((20, 80, 70, 150), fill=(120, 60, 50))
    d.rectangle((80, 60, 120, 150), fill=(70, 70, 90))
    d.polygon([(130, 150), (160, 90), (190, 150)], fill=(40, 110, 60))
    d.rectangle((0, 150, 255, 191), fill=(100, 80, 40))
    rng = np.random.default_rng(SEED)
    px = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")


def main(argv: list[str] | None = None) -> int:
    import cv2

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image = photo()
    image.save(args.out / "photo.png")
    rgb = np.asarray(image)
    w, h = SIZE
    small = cv2.resize(rgb, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST), "RGB").save(args.out / "palette.png")
    Image.fromarray(cv2.Canny(rgb, LOW, HIGH), "L").save(args.out / "canny_rgb.png")
    Image.fromarray(cv2.Canny(np.asarray(image.convert("L")), LOW, HIGH), "L").save(args.out / "canny_gray.png")
    (args.out / "opencv.txt").write_text(f"opencv {cv2.__version__}\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
