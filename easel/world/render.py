"""ShapeWorld renderer: Pillow polygons drawn at 4x supersampling, box-downsampled (anti-aliasing),
on an achromatic background with a little luminance noise. Images are never flipped: left and right
carry meaning in the captions."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, Scene

SUPERSAMPLE = 4
NOISE_STD = 2.0  # grey levels; the same value on all three channels keeps the background achromatic

# Polygon vertices on a unit circumscribed circle, y down, before rotation. Each shape stays inside
# its circumscribed circle so that non-overlap of circles means non-overlap of shapes.
_SQUARE_HALF = 0.72
_DIAMOND_WIDTH = 0.62
_STAR_INNER = 0.45
_CROSS_ARM, _CROSS_HALF_WIDTH = 0.95, 0.3


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else _STAR_INNER
        a = math.radians(-90 + 36 * k)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _cross() -> list[tuple[float, float]]:
    a, t = _CROSS_ARM, _CROSS_HALF_WIDTH
    return [(t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a),
            (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t), (-t, -a)]


_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-_SQUARE_HALF, -_SQUARE_HALF), (_SQUARE_HALF, -_SQUARE_HALF),
               (_SQUARE_HALF, _SQUARE_HALF), (-_SQUARE_HALF, _SQUARE_HALF)],
    "triangle": [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)],
    "diamond": [(0.0, -1.0), (_DIAMOND_WIDTH, 0.0), (0.0, 1.0), (-_DIAMOND_WIDTH, 0.0)],
    "star": _star(),
    "cross": _cross(),
}
CIRCLE_SCALE = 0.92  # circles slightly inside their circle so their area is closer to the others'


def polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape in pixel units, rotated by `rotation` degrees."""
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in _UNIT_POLYGONS[shape]]


def _draw_object(draw: ImageDraw.ImageDraw, o, side: int, fill) -> None:
    """Draw one object on a canvas `side` pixels wide."""
    cx, cy, r = o.cx * side, o.cy * side, o.radius * side
    if o.shape == "circle":
        rc = r * CIRCLE_SCALE
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
    elif o.shape in _UNIT_POLYGONS:
        draw.polygon(polygon(o.shape, cx, cy, r, o.rotation), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}: choose one of circle, {', '.join(_UNIT_POLYGONS)}")


def _draw_objects(draw: ImageDraw.ImageDraw, scene: Scene, side: int) -> None:
    """Draw every object of the scene on a canvas `side` pixels wide."""
    for o in scene.objects:
        _draw_object(draw, o, side, COLOURS[o.colour])


def object_coverage(scene: Scene, size: int = 16) -> np.ndarray:
    """(objects, size, size) float32: the fraction of each cell each object covers (its mask on a coarse grid)."""
    side = size * SUPERSAMPLE
    out = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for i, o in enumerate(scene.objects):
        canvas = Image.new("L", (side, side), 0)
        _draw_object(ImageDraw.Draw(canvas), o, side, 255)
        out[i] = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255
    return out


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene to a (size, size, 3) uint8 array (the fast path)."""
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), (scene.background,) * 3)
    _draw_objects(ImageDraw.Draw(canvas), scene, side)
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)  # box filter = area coverage
    rng = np.random.default_rng([scene.seed, 0x5EED])
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * NOISE_STD  # (H, W, 1) on all channels
    return np.clip(np.rint(small + noise), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene to an RGB PIL image of size x size pixels (64 by default, 128 also common)."""
    return Image.fromarray(render_array(scene, size), "RGB")
