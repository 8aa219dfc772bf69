"""Synthetic captioned shapes: the data the small text-to-image model is trained on, and a reader
that tells colour and shape back from pixels (to measure caption following and concept removal).

An image is 32x32 RGB: one shape (circle, square, triangle, star) of one colour (red, green, blue,
yellow, purple), small or large, at a random position, on a white, black or striped background;
its caption reads "a small red circle on a white background". Rendered at 4x and averaged down
(anti-aliased). Everything is seeded: ``sample(rng)`` gives the same image for the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE = 32
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 6.0, "large": 10.5}  # radius in pixels
BACKGROUNDS = ("white", "black", "striped")
_BG = {"white": (245, 245, 245), "black": (15, 15, 15)}


@dataclass(frozen=True)
class ShapeSpec:
    """One image's content (``caption`` renders it as text)."""

    shape: str
    colour: str
    size: str
    background: str
    cx: float
    cy: float

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int | tuple[int, int] = SIZE, ss: int = 4) -> np.ndarray:
    """Coverage [height, width] float32 in [0, 1] of ``shape`` centred at (cx, cy) with radius ``r``
    (pixels), by ``ss`` x ``ss`` supersampling; ``size`` is the side, or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    ys, xs = (np.mgrid[0:height * ss, 0:width * ss] + 0.5) / ss
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        h = r * 0.85
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # pointing up, apex at cy - r
        top, bottom = cy - r, cy + r * 0.75
        half = (ys - top) / (bottom - top) * r * 1.05
        m = (ys >= top) & (ys <= bottom) & (np.abs(dx) <= half)
    elif shape == "star":  # five points: radius between r and 0.45 r by angle
        ang = np.arctan2(dy, dx) + math.pi / 2
        frac = (ang % (2 * math.pi / 5)) / (2 * math.pi / 5)
        tri = np.abs(frac - 0.5) * 2  # 1 at a point, 0 between points
        m = np.hypot(dx, dy) <= r * (0.45 + 0.55 * tri)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m.reshape(height, ss, width, ss).mean(axis=(1, 3)).astype(np.float32)


def render(spec: ShapeSpec) -> np.ndarray:
    """The image of ``spec``: uint8 [SIZE, SIZE, 3]."""
    if spec.background == "striped":
        rows = (np.arange(SIZE) // 4) % 2
        bg = np.where(rows[:, None, None] == 0, 200, 120) * np.ones((SIZE, SIZE, 3))
    else:
        bg = np.ones((SIZE, SIZE, 3)) * np.array(_BG[spec.background])
    cov = shape_mask(spec.shape, spec.cx, spec.cy, SIZES[spec.size])[..., None]
    img = bg * (1 - cov) + np.array(COLOURS[spec.colour]) * cov
    return img.round().clip(0, 255).astype(np.uint8)


def sample(rng: np.random.Generator, **fixed) -> ShapeSpec:
    """A random ``ShapeSpec`` (fields given in ``fixed`` are kept); the shape stays inside the image."""
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
    size = fixed.get("size") or list(SIZES)[rng.integers(len(SIZES))]
    background = fixed.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    r = SIZES[size]
    cx, cy = (float(rng.uniform(r + 1, SIZE - r - 1)) for _ in range(2))
    return ShapeSpec(shape, colour, size, background, cx, cy)


def colour_shares(img: np.ndarray, tol: float = 60.0) -> dict[str, float]:
    """Fraction of the image's pixels within ``tol`` (RGB distance) of each palette colour."""
    px = img.reshape(-1, 3).astype(np.float32)
    return {c: float((np.linalg.norm(px - np.array(v), axis=1) < tol).mean()) for c, v in COLOURS.items()}


def chroma(img: np.ndarray) -> np.ndarray:
    """Per-pixel chroma [H, W] float32: the largest minus the smallest RGB channel. Every palette
    colour has at least 120, every background (white, black, grey stripes) under 10."""
    px = img.astype(np.float32)
    return px.max(-1) - px.min(-1)


def read_image(img: np.ndarray, min_chroma: float = 60.0) -> dict:
    """What the pixels show: ``colour`` (the palette colour with the largest share, None if no
    colour covers 1 % of the image), ``shares`` (``colour_shares``) and ``shape``.

    The shape is read from the drawn region, the pixels with chroma above ``min_chroma`` (whatever
    their colour, so a shape drawn in a colour off the palette, or in two, still reads): the shape
    whose rendered mask, at the region's centre and over radii 4-13 pixels, overlaps it best by IoU
    (``iou``); None when fewer than 1 % of the pixels are coloured."""
    shares = colour_shares(img)
    colour = max(shares, key=shares.get)
    if shares[colour] < 0.01:
        colour = None
    fg = chroma(img) > min_chroma
    if fg.mean() < 0.01:
        return {"colour": colour, "shape": None, "shares": shares}
    ys, xs = np.nonzero(fg)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    best, best_iou = None, -1.0
    for shape in SHAPES:
        for r in np.linspace(4.0, 13.0, 10):
            m = shape_mask(shape, cx, cy, r, size=fg.shape) > 0.5
            iou = (m & fg).sum() / max((m | fg).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, iou
    return {"colour": colour, "shape": best, "shares": shares, "iou": float(best_iou)}


def prompt_set() -> list[str]:
    """The prompts a text-encoder SAE of the shapes model trains on (sorted, no duplicates): the
    empty prompt (the unconditional branch), every training caption (4 shapes x 5 colours x 2 sizes x
    3 backgrounds = 120), and the same captions with size, background, colour or several of them left
    out ("a red circle", "a small star on a black background", "a circle"): 289 prompts."""
    out = {""}
    for shape in SHAPES:
        for colour in (*COLOURS, None):
            for size in (*SIZES, None):
                for bg in (*BACKGROUNDS, None):
                    words = " ".join(w for w in ("a", size, colour, shape) if w)
                    out.add(words + (f" on a {bg} background" if bg else ""))
    return sorted(out)
