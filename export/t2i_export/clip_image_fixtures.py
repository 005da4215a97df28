"""IP-Adapter image preprocessing fixtures: what transformers' ``CLIPImageProcessor`` does to a file.

Run from ``export/``::

    python -m t2i_export.clip_image_fixtures --out ../graphs/fixtures/clip_image

diffusers encodes an IP-Adapter's reference image with ``CLIPImageProcessor()(images=img,
return_tensors="pt").pixel_values``. Without torchvision (our pinned venv) transformers 5 hands out
its PIL/numpy backend, ``CLIPImageProcessorPil``; that is the oracle here, and the script refuses to
run with any other class. Writes deterministic source images (seeded) and, for each check:

* ``convert``: ``transformers.image_transforms.convert_to_rgb(Image.open(src), return_numpy=True)``,
  which composites alpha (RGBA, LA, palette and tRNS transparency, 16-bit tRNS included) onto white
  (uint8 HWC ``.npy``), including one 256x256 LA image holding every (gray, alpha) pair;
* ``bicubic``: ``.resize((w, h), resample=Image.BICUBIC)`` of a 100x75 source in modes RGB and L
  (uint8 HWC ``.npy``), for ``runtime/src/resample.rs``;
* ``pixels``: ``processor(images=Image.open(src), return_tensors="np").pixel_values`` (float32 NCHW),
  for the default processor (OpenAI CLIP: shortest edge 224, crop 224) and for small configurations
  saved next to the fixtures with ``save_pretrained`` (``<config>/preprocessor_config.json``), so
  that the outputs stay small while the same code paths run: downscale, upscale, same size,
  truncated long side, 1-pixel-wide source, non-square crop, a crop larger than the resized
  image (zero padding), no crop, no resize.

A 224x224 float32 tensor is 588 KiB, so expected arrays over 32 KiB are stored gzipped (``.npy.gz``,
deterministic: no file name or time stamp in the gzip header).

``cases.tsv`` lists the checks for ``runtime/tests/clip_image_parity.rs``:
``kind<TAB>source<TAB>config-or-mode<TAB>width<TAB>height<TAB>expected`` (``-`` where a column does not
apply). Every file is bit-for-bit reproducible from the seed, except the PNG bytes, which depend on
the zlib Pillow links (decoded pixels do not).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .image_fixtures import write_png_raw

SEED = 4321

# Processor configurations besides the default: name -> CLIPImageProcessor kwargs.
CONFIGS: dict[str, dict] = {
    # Shortest edge 48, non-square crop (height != width catches a swapped crop).
    "small": {"size": {"shortest_edge": 48}, "crop_size": {"height": 40, "width": 44}},
    # Crop larger than the resized short edge: center_crop pads with zeros before normalizing.
    "pad": {"size": {"shortest_edge": 32}, "crop_size": {"height": 40, "width": 36}},
    # Exact (height, width) resize, no normalization, Lanczos, a rescale factor that is not 1/255.
    "exact": {
        "size": {"height": 30, "width": 50},
        "crop_size": {"height": 24, "width": 24},
        "do_normalize": False,
        "resample": 1,
        "rescale_factor": 1 / 127.5,
    },
    # No center crop: the output is the resized image, its size varies with the source.
    "nocrop": {"size": {"shortest_edge": 40}, "do_center_crop": False},
    # No resize: the crop alone, padding or cropping each axis of the source.
    "noresize": {"do_resize": False, "crop_size": {"height": 40, "width": 44}},
}

# (width, height) targets for the BICUBIC checks on the 100x75 source (as image_fixtures' LANCZOS).
BICUBIC_SIZES = [(64, 64), (37, 53), (100, 40), (57, 75), (13, 9), (128, 96), (250, 7), (91, 55)]


def pattern(height: int, width: int, rng: np.random.Generator, noise: float = 2.0) -> np.ndarray:
    """uint8 HxWx3: gradients, a sinusoid, hard edges and a little noise (compressible outputs)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    img[..., 0] = 255.0 * x / max(width - 1, 1)
    img[..., 1] = 255.0 * y / max(height - 1, 1)
    img[..., 2] = 127.5 + 100.0 * np.sin(x * 0.3) * np.cos(y * 0.2)
    img += rng.normal(0.0, noise, size=img.shape)
    img[height // 5 : height // 2, width // 6 : width // 3] = 255.0
    img[height // 2 : height * 4 // 5, width // 2 : width * 2 // 3] = 0.0
    img[:, width * 3 // 4] = [255.0, 0.0, 255.0]
    img[height * 2 // 3, :] = [0.0, 255.0, 0.0]
    return np.round(np.clip(img, 0.0, 255.0)).astype(np.uint8)


def make_sources(out: Path, rng: np.random.Generator) -> dict[str, Path]:
    src: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        src[name] = out / name
        im.save(src[name], **kw)

    for name, (w, h) in {
        "landscape_300x200.png": (300, 200),  # downscale, long side exact (336)
        "small_150x90.png": (150, 90),  # upscale, long side 373.33 -> 373
        "portrait_97x301.png": (97, 301),  # portrait, odd sizes
        "square_48.png": (48, 48),  # same size as "small"'s short edge: Pillow copies
        "odd_27x20.png": (27, 20),  # long side 64.8 -> 64 (int() truncates, round() would not)
        "wide_1x3.png": (1, 3),  # one pixel wide: long side 3 * edge
        "flat_5x1.png": (5, 1),  # one pixel high
    }.items():
        # No noise in the large ones: their 224x224 outputs are the bulk of the fixtures' size.
        save(name, Image.fromarray(pattern(h, w, rng, noise=0.0 if w * h > 10000 else 2.0), "RGB"))

    base = pattern(19, 61, rng)
    alpha = rng.integers(0, 256, size=(19, 61, 1), dtype=np.uint8)
    alpha[0, :4, 0] = [0, 255, 1, 254]
    save("rgba_61x19.png", Image.fromarray(np.concatenate([base, alpha], axis=2), "RGBA"))
    la = np.concatenate([base[..., :1], alpha], axis=2).transpose(1, 0, 2).copy()
    save("la_19x61.png", Image.fromarray(la, "LA"))
    save("l_40x33.png", Image.fromarray(pattern(33, 40, rng)[..., 1], "L"))
    small = pattern(30, 36, rng)
    save("rgb_trns_36x30.png", Image.fromarray(small, "RGB"), transparency=tuple(int(v) for v in small[0, 0]))
    pal = Image.fromarray(small, "RGB").quantize(colors=64, dither=Image.Dither.NONE)
    save("p_36x30.png", pal)
    save("p_trns_36x30.png", pal, transparency=bytes(rng.integers(0, 256, size=64, dtype=np.uint8)))
    # 16-bit tRNS: Pillow compares the converted 8-bit samples (gray clipped at 255, RGB high bytes)
    # with the tRNS value's low byte, not the 16-bit sample with the 16-bit value.
    gray16 = rng.integers(0, 600, size=(12, 16), dtype=np.uint16)
    gray16[0, :4] = [300, 44, 255, 556]  # 300 & 0xff == 44 == 556 & 0xff
    src["l16_trns_16x12.png"] = out / "l16_trns_16x12.png"
    write_png_raw(src["l16_trns_16x12.png"], gray16, 0, trns=struct.pack(">H", 300))
    rgb16 = rng.integers(0, 65536, size=(12, 16, 3), dtype=np.uint16)
    rgb16[0, :3] = [[0x0110, 0x0220, 0x0330], [0x1000, 0x2000, 0x3000], [0x10FF, 0x20FF, 0x30FF]]
    src["rgb16_trns_16x12.png"] = out / "rgb16_trns_16x12.png"
    write_png_raw(src["rgb16_trns_16x12.png"], rgb16, 2, trns=struct.pack(">HHH", 0x0110, 0x0220, 0x0330))
    # Every (gray, alpha) pair: x = gray, y = alpha.
    gy, gx = np.mgrid[0:256, 0:256].astype(np.uint8)
    save("la_all_256.png", Image.fromarray(np.stack([gx, gy], axis=2), "LA"))
    save("bicubic_100x75.png", Image.fromarray(pattern(75, 100, rng, noise=25.0), "RGB"))
    return src


def write_gz_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    # mtime=0 and no file name: the same bytes on every run.
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory (created)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    import transformers
    from transformers.image_transforms import convert_to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        default = CLIPImageProcessor()
    # The PIL backend is what diffusers gets without torchvision; the torchvision one differs.
    assert type(default).__name__ == "CLIPImageProcessorPil", type(default)
    processors = {"default": default}
    default.save_pretrained(out / "default")
    for name, kwargs in CONFIGS.items():
        processors[name] = type(default)(**kwargs)
        processors[name].save_pretrained(out / name)
    for name in processors:
        # save_pretrained indents with 2 spaces and sorts keys; pin the layout (the file is committed).
        cfg = out / name / "preprocessor_config.json"
        cfg.write_text(json.dumps(json.loads(cfg.read_text()), indent=2, sort_keys=True) + "\n")

    src = make_sources(out, rng)
    cases: list[tuple[str, ...]] = []

    def expect(stem: str, arr: np.ndarray) -> str:
        """Writes ``stem.npy``, or ``stem.npy.gz`` when over 32 KiB; returns the file name."""
        if arr.nbytes > 32 * 1024:
            write_gz_npy(out / f"{stem}.npy.gz", arr)
            return f"{stem}.npy.gz"
        np.save(out / f"{stem}.npy", np.ascontiguousarray(arr))
        return f"{stem}.npy"

    for name in src:
        with Image.open(src[name]) as im:
            plain_rgb = im.mode == "RGB" and "transparency" not in im.info
        if name.startswith("bicubic_") or plain_rgb:
            continue  # plain RGB: nothing to convert
        with Image.open(src[name]) as im:
            rgb = convert_to_rgb(im, return_numpy=True)
        cases.append(("convert", name, "-", "-", "-", expect(f"{Path(name).stem}_rgb", rgb)))

    with Image.open(src["bicubic_100x75.png"]) as im:
        im.load()
        for mode in ("RGB", "L"):
            converted = im.convert(mode)
            for w, h in BICUBIC_SIZES:
                resized = np.array(converted.resize((w, h), resample=Image.BICUBIC))
                e = expect(f"bicubic_{mode}_{w}x{h}", resized)
                cases.append(("bicubic", "bicubic_100x75.png", mode, str(w), str(h), e))

    def pixels_case(name: str, config: str) -> None:
        with Image.open(src[name]) as im:
            pv = processors[config](images=im, return_tensors="np").pixel_values
        assert pv.dtype == np.float32, pv.dtype
        e = expect(f"pixels_{config}_{Path(name).stem}", pv)
        cases.append(("pixels", name, config, str(pv.shape[3]), str(pv.shape[2]), e))

    for name in ("landscape_300x200.png", "small_150x90.png", "portrait_97x301.png"):
        pixels_case(name, "default")
    for name in src:
        if not name.startswith(("bicubic_", "la_all_")):
            pixels_case(name, "small")
    for name in ("landscape_300x200.png", "wide_1x3.png", "rgba_61x19.png", "l_40x33.png"):
        pixels_case(name, "pad")
    for name in ("portrait_97x301.png", "odd_27x20.png", "p_trns_36x30.png"):
        pixels_case(name, "exact")
    for name in ("odd_27x20.png", "wide_1x3.png", "l_40x33.png"):
        pixels_case(name, "nocrop")
    for name in ("odd_27x20.png", "rgba_61x19.png", "l_40x33.png"):
        pixels_case(name, "noresize")

    import PIL

    (out / "cases.tsv").write_text(
        f"# written by t2i_export.clip_image_fixtures with Pillow {PIL.__version__}, numpy {np.__version__},"
        f" transformers {transformers.__version__} ({type(default).__name__})\n"
        "# kind\tsource\tconfig_or_mode\twidth\theight\texpected\n"
        + "".join("\t".join(c) + "\n" for c in cases)
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(cases)} cases, {len(files)} files, {total / 1024:.0f} KiB to {out}")


if __name__ == "__main__":
    main()
