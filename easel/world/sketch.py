"""Layout sketches: white blobs on black where objects should go, drawn as a person would (rough, not exact).

The condition of the built-in model's layout ControlNet (`shapeworld-layout`). Each object of a scene becomes a
filled blob at its centre, about its size: an ellipse with jittered centre, radii and rotation whose outline wobbles
(a few low-frequency harmonics of the radius), so the ControlNet learns "put an object here, this big", not the
shape's outline (the prompt says what the object is). Torch-free; vectorised over (batch, objects, pixels).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .scenes import Obj

MAX_OBJECTS = 5  # the most objects a ShapeWorld scene holds (count scenes: 2-5)

# How rough the drawing is, in units of the object's circumscribed radius r (or of the image side for `shift`).
JITTER = {"shift": 0.03, "radius": (0.8, 1.2), "squash": 0.2, "wobble": 0.12}


def objects_array(objects: tuple[Obj, ...] | list[Obj]) -> np.ndarray:
    """(MAX_OBJECTS, 3) float32 rows (cx, cy, r) in image fractions; unused rows have r = 0."""
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"a layout sketch holds at most {MAX_OBJECTS} objects (got {len(objects)})")
    out = np.zeros((MAX_OBJECTS, 3), np.float32)
    for k, o in enumerate(objects):
        out[k] = (o.cx, o.cy, o.radius)
    return out


def draw_blobs(places: np.ndarray, size: int, rng: np.random.Generator | None = None,
               jitter: dict | None = None) -> np.ndarray:
    """Blob masks (B, size, size) float32 in {0, 1} for places (B, K, 3) = (cx, cy, r); r = 0 draws nothing.

    `rng` None draws exact circles (no jitter): the blobs of a layout given by hand."""
    places = np.asarray(places, np.float32)
    if places.ndim == 2:
        return draw_blobs(places[None], size, rng, jitter)[0]
    B, K, _ = places.shape
    j = {**JITTER, **(jitter or {})}
    if rng is None:
        shift, radius, squash = np.zeros((B, K, 2)), np.ones((B, K)), np.ones((B, K))
        angle, amp, phase = np.zeros((B, K)), np.zeros((B, K, 2)), np.zeros((B, K, 2))
    else:
        shift = rng.uniform(-j["shift"], j["shift"], (B, K, 2))
        radius = rng.uniform(*j["radius"], (B, K))
        squash = 1.0 + rng.uniform(-j["squash"], j["squash"], (B, K))  # x-radius / y-radius
        angle = rng.uniform(0, np.pi, (B, K))
        amp = rng.uniform(0, j["wobble"], (B, K, 2))  # harmonics 2 and 3 of the outline
        phase = rng.uniform(0, 2 * np.pi, (B, K, 2))
    cx, cy = places[..., 0] + shift[..., 0], places[..., 1] + shift[..., 1]
    r = places[..., 2] * radius
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    dx = coords[None, None, None, :] - cx[..., None, None]  # (B, K, 1, W)
    dy = coords[None, None, :, None] - cy[..., None, None]  # (B, K, H, 1)
    cos, sin = np.cos(angle)[..., None, None], np.sin(angle)[..., None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # the ellipse's own axes
    rx = (r * np.sqrt(squash))[..., None, None]
    ry = (r / np.sqrt(squash))[..., None, None]
    dist = np.sqrt((u / np.maximum(rx, 1e-6)) ** 2 + (v / np.maximum(ry, 1e-6)) ** 2)
    phi = np.arctan2(v, u)
    edge = 1.0 + sum(amp[..., h, None, None] * np.cos((h + 2) * phi + phase[..., h, None, None]) for h in range(2))
    inside = (dist <= edge) & (places[..., 2] > 0)[..., None, None]
    return inside.any(axis=1).astype(np.float32)


def sketch_of(objects: tuple[Obj, ...] | list[Obj], size: int = 64, seed: int | None = 0) -> Image.Image:
    """The layout sketch of a scene's objects as an RGB image (white on black); seed None: exact circles."""
    rng = None if seed is None else np.random.default_rng([seed, 0x5CE7C4])
    mask = draw_blobs(objects_array(objects), size, rng)
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")


def sketch_at(places: list[tuple[float, float, float]], size: int = 64) -> Image.Image:
    """A sketch of round blobs at given (cx, cy, r) places in image fractions (x right, y down)."""
    arr = np.zeros((MAX_OBJECTS, 3), np.float32)
    if len(places) > MAX_OBJECTS:
        raise ValueError(f"a layout sketch holds at most {MAX_OBJECTS} blobs (got {len(places)})")
    if places:
        arr[:len(places)] = np.asarray(places, np.float32)
    mask = draw_blobs(arr, size, None)
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")


def _blob(text: str) -> tuple[float, float, float]:
    """"CX,CY[,R]" in image fractions (R default 0.15) -> (cx, cy, r), with a clear error."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"--blob {text!r}: give CX,CY or CX,CY,R as fractions of the image side (0..1), e.g. "
                         "0.3,0.5,0.15 (x to the right, y down)")
    return (values[0], values[1], values[2] if len(values) == 3 else 0.15)


def main(argv: list[str] | None = None) -> int:
    """python3 -m easel.world.sketch --blob CX,CY[,R] ... --out sketch.png: a layout sketch from numbers."""
    import argparse
    p = argparse.ArgumentParser(prog="python3 -m easel.world.sketch",
                                description="draw a layout sketch (white blobs on black) for the shapeworld-layout "
                                            "ControlNet")
    p.add_argument("--blob", action="append", required=True, metavar="CX,CY[,R]",
                   help="a blob centred at (CX, CY) with radius R, fractions of the side (repeatable, at most 5)")
    p.add_argument("--size", type=int, default=64, help="side in pixels (default 64, the built-in model's)")
    p.add_argument("--out", default="sketch.png", help="PNG to write (default sketch.png)")
    args = p.parse_args(argv)
    try:
        image = sketch_at([_blob(b) for b in args.blob], args.size)
    except ValueError as e:
        p.error(str(e))
    from easel.files import save_image
    save_image(image, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
