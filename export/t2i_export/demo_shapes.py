"""The demo-shapes world: scenes of one or two colored shapes on a plain background, their captions,
their conditions (sketch, color palette) and the pixel judge that scores generated images.

Everything here is deterministic: a scene is a function of its seed (numpy's PCG64), and the
renderer uses only PIL's aliased drawing and integer arithmetic, so the same seed gives the same
bytes on any machine.

Conventions that tests and users rely on (issue 16; keep them fixed):
- images are 128x128 RGB; captions are `a {color} {shape} on a {color} background` and
  `a {color} {shape} and a {color} {shape} on a {color} background`, shapes named left to right;
- sketch: white (255) outlines 2 px wide on black, at the shapes' edges (1 px outside, 1 px inside);
- color: TencentARC's spatial palette, as the color adapter's preprocessor makes it (`apply_color` in
  controlnet_aux and in sd-webui-controlnet's `t2ia_color_grid`): cv2's INTER_CUBIC resize down by
  64, then INTER_NEAREST back up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str
    # bounding box, inclusive-exclusive pixel coordinates
    x0: int
    y0: int
    x1: int
    y1: int

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        box = (self.x0, self.y0, self.x1 - 1, self.y1 - 1)
        if self.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif self.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # isosceles, pointing up
            draw.polygon([((self.x0 + self.x1 - 1) / 2, self.y0), (self.x1 - 1, self.y1 - 1), (self.x0, self.y1 - 1)], fill=fill)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # left to right, as the caption names them

    @property
    def caption(self) -> str:
        named = " and ".join(f"a {s.color} {s.kind}" for s in self.shapes)
        return f"{named} on a {self.background} background"

    def mask(self, index: int | None = None) -> np.ndarray:
        """Boolean [128, 128]: shape `index`, or every shape."""
        img = Image.new("L", (SIZE, SIZE), 0)
        d = ImageDraw.Draw(img)
        for i, s in enumerate(self.shapes):
            if index is None or i == index:
                s.draw(d, 255)
        return np.asarray(img) > 0

    def image(self) -> Image.Image:
        img = Image.new("RGB", (SIZE, SIZE), COLORS[self.background])
        d = ImageDraw.Draw(img)
        for s in self.shapes:
            s.draw(d, COLORS[s.color])
        return img

    def sketch(self) -> Image.Image:
        """White outlines 2 px wide on black: the band between the mask dilated and eroded by one pixel."""
        out = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for i in range(len(self.shapes)):
            m = Image.fromarray(self.mask(i).astype(np.uint8) * 255)
            grown = np.asarray(m.filter(ImageFilter.MaxFilter(3)))
            shrunk = np.asarray(m.filter(ImageFilter.MinFilter(3)))
            out[(grown > 0) & (shrunk == 0)] = 255
        return Image.fromarray(out)

    def palette(self) -> Image.Image:
        return spatial_palette(self.image())


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """cv2's INTER_CUBIC kernel (A = -0.75) for the 4 taps around a fractional position t in [0, 1)."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _cubic_resize_axis(a: np.ndarray, out: int, axis: int) -> np.ndarray:
    """One axis of cv2.resize(..., INTER_CUBIC): half-pixel centers, borders replicated, no antialiasing."""
    n = a.shape[axis]
    scale = n / out
    rows = []
    for d in range(out):
        f = (d + 0.5) * scale - 0.5
        s = int(np.floor(f))
        w = _cubic_weights(f - s)
        taps = [min(max(s + k, 0), n - 1) for k in (-1, 0, 1, 2)]
        rows.append(sum(wk * np.take(a, t, axis=axis) for wk, t in zip(w, taps)))
    return np.stack(rows, axis=axis)


def spatial_palette(img: Image.Image) -> Image.Image:
    """TencentARC's color condition: `cv2.resize(im, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)`
    then `cv2.resize(..., (w, h), interpolation=cv2.INTER_NEAREST)` (`apply_color` in controlnet_aux).
    The cubic step is cv2's geometry and kernel computed in float and rounded; cv2 itself works in
    fixed point on uint8 and may differ by a level (not measured: cv2 is not installed here)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = a.shape[:2]
    small = _cubic_resize_axis(_cubic_resize_axis(a, h // 64, 0), w // 64, 1)
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.NEAREST)


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two non-overlapping shapes, each of a color other than the background's."""
    bg = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    count = 1 + int(rng.integers(2))
    shapes: list[Shape] = []
    while len(shapes) < count:
        kind = SHAPES[rng.integers(len(SHAPES))]
        color = [c for c in COLOR_NAMES if c != bg][rng.integers(len(COLOR_NAMES) - 1)]
        lo, hi = (36, 64) if count == 1 else (28, 48)
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(4, SIZE - 4 - side + 1))
        y0 = int(rng.integers(4, SIZE - 4 - side + 1))
        s = Shape(kind, color, x0, y0, x0 + side, y0 + side)
        if any(_boxes_near(s, t, 6) for t in shapes):
            continue
        shapes.append(s)
    shapes.sort(key=lambda s: (s.x0 + s.x1, s.y0))
    return Scene(bg, tuple(shapes))


def _boxes_near(a: Shape, b: Shape, margin: int) -> bool:
    return not (a.x1 + margin <= b.x0 or b.x1 + margin <= a.x0 or a.y1 + margin <= b.y0 or b.y1 + margin <= a.y0)


def scenes(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


# Training draws scenes from TRAIN_SEED; evaluation and tests from EVAL_SEED, so their layouts are
# ones the model never saw (the caption grammar is small enough that every caption is seen).
TRAIN_SEED = 1600
EVAL_SEED = 1699


def examples(count: int = 4) -> list[Scene]:
    """The demo grid's rows: the first held-out scenes that show each shape kind once, each in a color
    not used before, then one with two different shapes in two other colors."""
    picked: list[Scene] = []
    for scene in scenes(EVAL_SEED + 1, 400):
        used = {s.kind for p in picked for s in p.shapes} | {s.color for p in picked for s in p.shapes}
        new = [s for s in scene.shapes if s.kind not in used and s.color not in used]
        if len(picked) < count - 1 and len(scene.shapes) == 1 and new:
            picked.append(scene)
        elif len(picked) == count - 1 and len(scene.shapes) == 2 and len({s.kind for s in scene.shapes}) == 2 \
                and len({s.color for s in scene.shapes} - used) == 2:
            picked.append(scene)
        if len(picked) == count:
            return picked
    raise AssertionError("no such scenes in the example stream")


def write_examples(folder: Path) -> Path:
    """examples/examples.json + each example's sketch and palette PNGs (read by the demo grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, scene in enumerate(examples(), 1):
        scene.sketch().save(folder / f"{i}-sketch.png")
        scene.palette().save(folder / f"{i}-color.png")
        listing.append({"prompt": scene.caption, "sketch": f"{i}-sketch.png", "color": f"{i}-color.png"})
    path = folder / "examples.json"
    path.write_text(json.dumps(listing, indent=2) + "\n", encoding="utf-8")
    return path


# --- the judge -------------------------------------------------------------------------------


@dataclass
class Judgement:
    background: str
    color: str | None  # the largest foreground region's color, None when there is no foreground
    kind: str | None
    mask: np.ndarray  # foreground pixels


def nearest_colors(img: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of each pixel's nearest named color: [H, W] int."""
    d = ((img[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """What a generated picture shows: its background (the border's most common named color), the
    largest foreground region's color, and its kind by how much of its bounding box it fills
    (circle ~0.79, square ~1, triangle ~0.5)."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = nearest_colors(img)
    border = np.concatenate([labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(), labels[:, -3:].ravel()])
    bg = int(np.bincount(border, minlength=len(COLOR_NAMES)).argmax())
    fg = labels != bg
    # drop isolated specks: a pixel stays foreground only with most of its 5x5 neighbourhood
    m = Image.fromarray(fg.astype(np.uint8) * 255)
    fg = (np.asarray(m.filter(ImageFilter.MedianFilter(5))) > 0)
    if fg.sum() < 40:
        return Judgement(COLOR_NAMES[bg], None, None, fg)
    region = _largest_component(fg)
    color = int(np.bincount(labels[region], minlength=len(COLOR_NAMES)).argmax())
    ys, xs = np.nonzero(region)
    fill = region.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return Judgement(COLOR_NAMES[bg], COLOR_NAMES[color], kind, fg)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
