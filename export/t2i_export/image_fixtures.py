"""Image I/O parity fixtures: what Pillow and diffusers do to condition and output images.

Run from ``export/``::

    python -m t2i_export.image_fixtures --out ../graphs/fixtures/image

Writes deterministic source images (seeded noise, gradients, hard edges) in the PNG colour types and
bit depths a user may hand the runtime (RGB, L, RGBA, LA, palette with and without tRNS, 1/4-bit,
16-bit) plus two JPEGs, and next to them what the oracle does with each:

* ``Image.open(src).convert(mode)`` for mode ``L`` and ``RGB`` (uint8 HWC ``.npy``);
* ``.resize((w, h), resample=Image.LANCZOS)`` for downscales by non-integer factors, upscales,
  one-axis-only resizes and the same-size identity (uint8 HWC ``.npy``);
* diffusers' ``_preprocess_adapter_image`` end to end (float32 NCHW ``.npy``);
* diffusers' output post-processing (``decode_latents``'s ``(x / 2 + 0.5).clamp(0, 1)`` then
  ``numpy_to_pil``) on a fixed float32 tensor that includes inputs landing exactly on ``k + 0.5``.

``cases.tsv`` lists every check for ``runtime/tests/image_parity.rs``:
``kind<TAB>source<TAB>mode<TAB>width<TAB>height<TAB>expected`` (``-`` where a column does not apply).

The pixel content and every ``.npy`` are bit-for-bit reproducible from the seed. PNG and JPEG *bytes*
depend on the zlib and libjpeg builds Pillow links, but decoded PNG pixels do not; the JPEG checks
compare against the pixels Pillow decoded from the very file written here.
"""

from __future__ import annotations

import argparse
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEED = 1234

# (width, height) targets for the LANCZOS checks on the 100x75 sources.
SIZES_100x75 = [
    (64, 64),  # downscale by 1.5625 x 1.171875
    (37, 53),  # down in x, down in y by 1.415..
    (100, 40),  # vertical pass only
    (57, 75),  # horizontal pass only
    (13, 9),  # strong downscale: wide support
    (128, 96),  # upscale by 1.28
    (250, 7),  # up in x, strong down in y: Pillow 13 runs the vertical pass first
    (120, 60),  # up in x, down in y: vertical first
    (90, 55),  # height shrinks by exactly twice the width's shrink: horizontal first
    (91, 55),  # ... by more than twice: vertical first
    (100, 75),  # same size: Pillow returns a copy
]


def pattern(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float64 HxWx3 in [0, 255]: gradients, noise and hard edges (rings and overshoot for Lanczos)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    img[..., 0] = 255.0 * x / max(width - 1, 1)
    img[..., 1] = 255.0 * y / max(height - 1, 1)
    img[..., 2] = 127.5 + 100.0 * np.sin(x * 0.7) * np.cos(y * 0.45)
    img += rng.normal(0.0, 25.0, size=img.shape)
    # Hard edges: a white block, a black block, one-pixel lines and a checkerboard patch.
    img[height // 5 : height // 2, width // 6 : width // 3] = 255.0
    img[height // 2 : height * 4 // 5, width // 2 : width * 2 // 3] = 0.0
    img[:, width * 3 // 4] = [255.0, 0.0, 255.0]
    img[height * 2 // 3, :] = [0.0, 255.0, 0.0]
    check = ((x // 2 + y // 2) % 2 == 0) & (x > width * 0.8) & (y < height * 0.3)
    img[check] = 255.0
    img[~check & (x > width * 0.8) & (y < height * 0.3)] = 0.0
    return np.clip(img, 0.0, 255.0)


def u8(img: np.ndarray) -> np.ndarray:
    return np.round(img).astype(np.uint8)


def write_png_raw(path: Path, samples: np.ndarray, color_type: int, trns: bytes | None = None) -> None:
    """Minimal 16-bit PNG writer (Pillow cannot save 16-bit RGB, RGBA or LA)."""
    height, width = samples.shape[:2]
    rows = samples.reshape(height, -1).astype(">u2").tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr)
    if trns is not None:
        body += chunk(b"tRNS", trns)
    body += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def make_sources(out: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Writes the source images; returns name -> path."""
    src: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        src[name] = out / name
        im.save(src[name], **kw)

    rgb = u8(pattern(75, 100, rng))
    save("rgb.png", Image.fromarray(rgb, "RGB"))
    gray = u8(pattern(75, 100, rng).mean(axis=2))
    save("l.png", Image.fromarray(gray, "L"))
    save("small_rgb.png", Image.fromarray(u8(pattern(30, 40, rng)), "RGB"))
    save("tiny_rgb.png", Image.fromarray(u8(pattern(5, 7, rng)), "RGB"))

    # Colour types and depths, 32x24 (conversion only; resizing is the same code afterwards).
    small = u8(pattern(24, 32, rng))
    alpha = rng.integers(0, 256, size=(24, 32, 1), dtype=np.uint8)
    save("rgba.png", Image.fromarray(np.concatenate([small, alpha], axis=2), "RGBA"))
    la = np.concatenate([small[..., :1], alpha], axis=2)
    save("la.png", Image.fromarray(la, "LA"))
    save("rgb_trns.png", Image.fromarray(small, "RGB"), transparency=tuple(int(v) for v in small[0, 0]))
    save("l_trns.png", Image.fromarray(small[..., 1], "L"), transparency=int(small[0, 0, 1]))
    pal = Image.fromarray(small, "RGB").quantize(colors=200, dither=Image.Dither.NONE)
    save("p.png", pal)
    save("p_trns.png", pal, transparency=bytes(rng.integers(0, 256, size=200, dtype=np.uint8)))
    pal16 = Image.fromarray(small, "RGB").quantize(colors=16, dither=Image.Dither.NONE)
    save("p4.png", pal16, bits=4)
    save("l1.png", Image.fromarray(small[..., 0] > 128))

    wide = rng.integers(0, 65536, size=(24, 32, 4), dtype=np.uint16)
    wide[0, :8, :3] = [[0], [255], [256], [32767], [32768], [65280], [65535], [1000]]
    for name, channels, ctype in [("rgb16.png", 3, 2), ("rgba16.png", 4, 6), ("la16.png", 2, 4)]:
        src[name] = out / name
        write_png_raw(src[name], wide[..., :channels] if channels != 2 else wide[..., [0, 3]], ctype)
    # 16-bit gray is Pillow's "I;16": include low values, since it clips at 255 instead of scaling.
    gray16 = wide[..., 0].copy()
    gray16[1:6] = rng.integers(0, 400, size=(5, 32), dtype=np.uint16)
    src["l16.png"] = out / "l16.png"
    write_png_raw(src["l16.png"], gray16, 0)
    src["l16_trns.png"] = out / "l16_trns.png"
    write_png_raw(src["l16_trns.png"], gray16, 0, trns=struct.pack(">H", int(gray16[0, 0])))

    save("photo.jpg", Image.fromarray(rgb, "RGB"), quality=90)  # 4:2:0 chroma subsampling
    save("photo444.jpg", Image.fromarray(rgb, "RGB"), quality=90, subsampling=0)
    save("gray.jpg", Image.fromarray(gray, "L"), quality=90)
    return src


def output_fixture(rng: np.random.Generator) -> np.ndarray:
    """float32 [2, 3, 16, 24] decoder output; the first values hit the rounding boundaries exactly."""
    x = (rng.normal(0.0, 0.6, size=(2, 3, 16, 24))).astype(np.float32)
    special: list[np.float32] = []
    half, two, f255 = np.float32(0.5), np.float32(2), np.float32(255)
    for k in range(255):
        # Search float32 inputs whose (x / 2 + 0.5) * 255 is exactly k + 0.5 in float32.
        x0 = np.float32(((k + 0.5) / 255.0 - 0.5) * 2.0)
        for d in range(-64, 65):
            cand = np.float32(x0 + np.float32(d) * np.spacing(x0 if x0 != 0 else np.float32(1e-7)))
            scaled = (cand / two + half) * f255
            if scaled == np.float32(k + 0.5):
                special.append(cand)
                # And the neighbours on either side of the boundary.
                special.append(np.nextafter(cand, np.float32(-np.inf)))
                special.append(np.nextafter(cand, np.float32(np.inf)))
                break
    special += [np.float32(v) for v in (-1.0, 1.0, 0.0, -0.0, -1.5, 1.5, 1e30, -1e30, np.inf, -np.inf)]
    flat = x.reshape(-1)
    flat[: len(special)] = special
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory (created)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image

    # convert() of a palette image with per-entry alpha warns that alpha is dropped: that is the point.
    warnings.filterwarnings("ignore", message="Palette images with Transparency")
    src = make_sources(out, rng)
    cases: list[tuple[str, ...]] = []

    def expect(name: str, arr: np.ndarray) -> str:
        np.save(out / name, np.ascontiguousarray(arr))
        return name

    def opened(name: str, mode: str) -> Image.Image:
        with Image.open(src[name]) as im:
            return im.convert(mode)

    # Conversions, every source, both modes. JPEG decoding is compared with a tolerance.
    for name in src:
        for mode in ("L", "RGB"):
            kind = "jpeg_decode" if name.endswith(".jpg") else "convert"
            e = expect(f"{Path(name).stem}_{mode}.npy", np.array(opened(name, mode)))
            cases.append((kind, name, mode, "-", "-", e))

    def resize_case(name: str, mode: str, w: int, h: int) -> None:
        resized = np.array(opened(name, mode).resize((w, h), resample=Image.LANCZOS))
        e = expect(f"{Path(name).stem}_{mode}_{w}x{h}.npy", resized)
        if name.endswith(".jpg"):
            # Resize of Pillow's decoded pixels, so decoder differences cannot hide resize errors.
            cases.append(("resize_pixels", f"{Path(name).stem}_{mode}.npy", mode, str(w), str(h), e))
        else:
            cases.append(("resize", name, mode, str(w), str(h), e))

    for w, h in SIZES_100x75:
        resize_case("rgb.png", "RGB", w, h)
    for w, h in [(64, 64), (37, 53), (128, 96), (57, 75)]:
        resize_case("rgb.png", "L", w, h)
        resize_case("l.png", "L", w, h)
    for w, h in [(64, 128), (64, 64)]:
        resize_case("small_rgb.png", "RGB", w, h)
    resize_case("small_rgb.png", "L", 64, 128)
    resize_case("tiny_rgb.png", "RGB", 64, 64)
    resize_case("tiny_rgb.png", "RGB", 3, 2)
    resize_case("p_trns.png", "RGB", 20, 20)
    resize_case("photo.jpg", "RGB", 64, 64)
    resize_case("gray.jpg", "L", 64, 48)

    # diffusers' adapter preprocessing end to end (float32 NCHW).
    for name, mode, w, h in [("rgb.png", "RGB", 64, 64), ("rgb.png", "L", 64, 128), ("l.png", "L", 48, 32)]:
        t = _preprocess_adapter_image(opened(name, mode), h, w).numpy()
        e = expect(f"adapter_{Path(name).stem}_{mode}_{w}x{h}.npy", t.astype(np.float32))
        cases.append(("tensor", name, mode, str(w), str(h), e))

    # Output post-processing, as StableDiffusionAdapterPipeline with output_type="pil".
    x = output_fixture(rng)
    image = (torch.from_numpy(x) / 2 + 0.5).clamp(0, 1)  # decode_latents
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    pil = DiffusionPipeline.numpy_to_pil(image)
    expected = np.stack([np.array(p) for p in pil])
    # The same in plain numpy, to show what is being matched (round half to even).
    ref = np.round(np.clip(x / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1) * np.float32(255))
    assert np.array_equal(expected, ref.astype(np.uint8))
    cases.append(("output", expect("decoder_output.npy", x), "-", "-", "-", expect("decoder_images.npy", expected)))

    import diffusers
    import PIL

    (out / "cases.tsv").write_text(
        f"# written by t2i_export.image_fixtures with Pillow {PIL.__version__}, numpy {np.__version__},"
        f" torch {torch.__version__}, diffusers {diffusers.__version__}\n"
        "# kind\tsource\tmode\twidth\theight\texpected\n"
        + "".join("\t".join(c) + "\n" for c in cases)
    )
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(cases)} cases, {len(list(out.iterdir()))} files, {total / 1024:.0f} KiB to {out}")


if __name__ == "__main__":
    main()
