"""Colour segmentation of ShapeWorld-like images and per-blob shape features (numpy only).

Pixels far from achromatic (high chroma = max - min of RGB) are foreground; each takes the colour
whose HSV hue is nearest. Blending a colour with grey keeps its hue exactly, so anti-aliased and
blurred edges keep their object's colour. Blobs are 8-connected components of the foreground.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS

CHROMA_MIN = 40.0  # of 255: grey noise stays far below, object pixels (chroma ~200) far above
MIN_AREA_FRAC = 0.004  # blobs smaller than this fraction of the image are specks, not objects
SPLIT_SHARE = 0.7  # a blob whose main colour has less of its mass is split by colour
RADIAL_BINS = 32

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def rgb_hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of (..., 3) float RGB; 0 where the pixel is grey."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


COLOUR_HUES = rgb_hue(np.array(list(COLOURS.values()), dtype=np.float32))  # (8,)


def as_uint8(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    if hasattr(image, "detach"):  # torch tensor from a decoder: (3, H, W) in [-1, 1]
        arr = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
        return arr.permute(1, 2, 0).numpy()
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}: convert with (x * 255).round().astype('uint8')")
    return arr


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels (H, W) with 0 = background, count).

    Min-label propagation with pointer jumping: every pixel repeatedly takes the smallest label
    among its neighbours and then its label's label, which converges in a few passes."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    pad = np.full((h + 2, w + 2), none)
    while True:
        pad[1:-1, 1:-1] = lab
        new = lab.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                np.minimum(new, pad[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx], out=new)
        new = np.where(mask, new, none)
        flat = np.append(new.ravel(), none)
        for _ in range(3):
            flat[:-1] = flat[flat[:-1]]  # pointer jumping: follow a label to its own label
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense.astype(np.int32), len(roots) - (not mask.all())


@dataclass
class Blob:
    """A connected region of one colour: pixel coordinates and soft coverage weights in [0, 1]."""

    colour: str
    ys: np.ndarray
    xs: np.ndarray
    weights: np.ndarray
    image_size: int


def _make_blob(colour: int, ys: np.ndarray, xs: np.ndarray, chroma: np.ndarray, side: int) -> Blob:
    """Coverage of each pixel estimated as its chroma over the blob's typical full chroma."""
    c = chroma[ys, xs]
    ref = max(float(np.percentile(c, 90)), CHROMA_MIN)
    return Blob(COLOUR_NAMES[colour], ys, xs, np.clip(c / ref, 0.0, 1.0), side)


def find_blobs(image) -> list[Blob]:
    """Segment an image into single-colour blobs larger than MIN_AREA_FRAC of the image."""
    img = as_uint8(image).astype(np.float32)
    side = int(np.sqrt(img.shape[0] * img.shape[1]))
    chroma = img.max(-1) - img.min(-1)
    diff = np.abs(rgb_hue(img)[..., None] - COLOUR_HUES)  # (H, W, 8)
    colour = np.minimum(diff, 360.0 - diff).argmin(-1)  # nearest hue on the circle
    mask = chroma >= CHROMA_MIN
    labels, n = label_components(mask)
    min_area = MIN_AREA_FRAC * img.shape[0] * img.shape[1]
    blobs = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area:
            continue
        votes = np.bincount(colour[ys, xs], weights=chroma[ys, xs], minlength=len(COLOUR_NAMES))
        if votes.max() >= SPLIT_SHARE * votes.sum():
            blobs.append(_make_blob(int(votes.argmax()), ys, xs, chroma, side))
            continue
        for c in np.flatnonzero(votes):  # touching objects of different colours: split by colour
            sub = np.zeros_like(mask)
            sel = colour[ys, xs] == c
            sub[ys[sel], xs[sel]] = True
            sub_labels, m = label_components(sub)
            for j in range(1, m + 1):
                sy, sx = np.nonzero(sub_labels == j)
                if len(sy) >= min_area:
                    blobs.append(_make_blob(int(c), sy, sx, chroma, side))
    return [b for b in blobs if b.weights.sum() >= min_area]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain + shoelace)."""
    p = points.astype(np.int64)
    key = np.unique(p[:, 0] * 1_000_003 + p[:, 1])  # sorted by x, then y, duplicates dropped
    pts = list(zip((key // 1_000_003).tolist(), (key % 1_000_003).tolist()))
    if len(pts) < 3:
        return 0.0

    def half(seq: list) -> list:
        """One chain of the hull (lower for x-sorted points, upper for reversed)."""
        out: list = []
        for px, py in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (py - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (px - out[-2][0])) <= 0:
                out.pop()
            out.append((px, py))
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _boundary_corners(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Outer corners of the leftmost and rightmost pixel of every row: (4 * rows, 2) points (x, y).

    Every vertex of the convex hull of the pixel squares is one of these corners."""
    rows = np.unique(ys)
    left = np.full(ys.max() + 1, np.iinfo(np.int64).max)
    right = np.full(ys.max() + 1, -1)
    np.minimum.at(left, ys, xs)
    np.maximum.at(right, ys, xs)
    l, r, y = left[rows], right[rows] + 1, rows
    pts = [np.stack([l, y], 1), np.stack([l, y + 1], 1), np.stack([r, y], 1), np.stack([r, y + 1], 1)]
    return np.concatenate(pts).astype(np.float64)


def blob_centre(blob: Blob) -> tuple[float, float, float]:
    """Coverage-weighted centroid (cx, cy as image fractions) and soft area (image fraction)."""
    w = blob.weights
    area = float(w.sum())
    cx = float((w * (blob.xs + 0.5)).sum() / area) / blob.image_size
    cy = float((w * (blob.ys + 0.5)).sum() / area) / blob.image_size
    return cx, cy, area / blob.image_size**2


def _radial_profile(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Outer radius per angle bin (empty bins interpolated), normalised to mean 1: (RADIAL_BINS,)."""
    theta = np.arctan2(y, x)
    d = np.hypot(x, y) + 0.5  # a pixel reaches half a pixel past its centre
    b = ((theta + np.pi) / (2 * np.pi) * RADIAL_BINS).astype(int) % RADIAL_BINS
    prof = np.full(RADIAL_BINS, np.nan)
    np.fmax.at(prof, b, d)
    ok = ~np.isnan(prof)
    centres = np.arange(RADIAL_BINS)
    prof = np.interp(centres, centres[ok], prof[ok], period=RADIAL_BINS)
    return prof / prof.mean()


def blob_features(blob: Blob) -> np.ndarray:
    """Scale-invariant shape descriptors of a blob (fill, solidity, moments, radial harmonics)."""
    w, xs, ys = blob.weights, blob.xs.astype(np.float64), blob.ys.astype(np.float64)
    area = w.sum()
    cx, cy = (w * xs).sum() / area, (w * ys).sum() / area
    half = w >= 0.5  # the half-coverage region approximates the true outline, even when blurred
    if half.sum() < 3:
        half = w >= w.max() * 0.5
    hx, hy = blob.xs[half], blob.ys[half]
    n = float(half.sum())
    bw, bh = hx.max() - hx.min() + 1.0, hy.max() - hy.min() + 1.0
    solidity = n / max(_hull_area(_boundary_corners(hy, hx)), n)
    dx, dy = xs - cx, ys - cy
    mu20, mu02, mu11 = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
    spread = mu20 + mu02 + 1.0 / 6.0 * area  # + pixel's own second moment keeps tiny blobs sane
    compact = 2 * np.pi * spread / area**2  # 1 for a disc, larger for spiky shapes
    ecc = np.hypot(mu20 - mu02, 2 * mu11) / spread
    prof = _radial_profile(hx - cx, hy - cy)
    spec = np.fft.rfft(prof) / RADIAL_BINS
    harmonics = [np.abs(spec[k]) for k in range(2, 7)]
    phases = [v for k in range(2, 6) for v in (spec[k].real, spec[k].imag)]  # orientation
    return np.array([n / (bw * bh), np.log(bh / bw), solidity, compact, ecc,
                     np.log((mu02 + 1e-3) / (mu20 + 1e-3)), prof.std(), prof.min(),
                     *harmonics, *phases], dtype=np.float64)


FEATURE_NAMES: tuple[str, ...] = (
    "fill", "log_aspect", "solidity", "compactness", "eccentricity", "log_moment_ratio",
    "radial_std", "radial_min", "h2", "h3", "h4", "h5", "h6",
    "re2", "im2", "re3", "im3", "re4", "im4", "re5", "im5",
)
