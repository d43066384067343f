"""Running an image network tile by tile: overlapping tiles, blended with feathered weights, so that memory is
bounded by the tile size and no seam shows.

Where two tiles overlap by O pixels, each one's weight is 0 over the quarter of the overlap at its own edge
(where zero padding makes a convolution's output wrong), ramps linearly over the middle half and is 1 over the
last quarter; the two weights add up to 1 at every pixel. At the image's border no ramp is needed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `size` with at least `overlap` pixels shared."""
    if tile <= 0 or tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be at least 0 and less than the tile size {tile} (got {overlap})")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def edge_ramp(length: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """(length,) weights: a feathered ramp over `overlap` px at the start (`lead`) and/or end (`trail`)."""
    w = torch.ones(length)
    if overlap <= 0:
        return w
    pos = torch.arange(overlap, dtype=torch.float32) + 0.5
    ramp = ((pos - overlap / 4) / (overlap / 2)).clamp(0, 1)  # 0 over the first quarter, 1 over the last
    if lead:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if trail:
        w[length - overlap:] = torch.minimum(w[length - overlap:], ramp.flip(0))
    return w


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile, row by row."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    th, tw = min(tile, height) if tile > 0 else height, min(tile, width) if tile > 0 else width
    return [(y, x, th, tw) for y in ys for x in xs]


@torch.no_grad()
def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int = 256,
                overlap: int = 32, on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """fn (B, C, h, w) -> (B, C', h*scale, w*scale) applied to x (B, C, H, W) in tiles of `tile` px (0: whole
    image at once) overlapping by `overlap` px; `on_tile(done, total)` after each tile. The output is on the CPU
    in float32 (the accumulator may be far larger than a tile)."""
    b, _, h, w = x.shape
    boxes = tiles(h, w, tile, overlap)
    out = weight = None
    for n, (y, x0, th, tw) in enumerate(boxes, 1):
        piece = fn(x[:, :, y:y + th, x0:x0 + tw]).float().cpu()
        if out is None:
            out = torch.zeros(b, piece.shape[1], h * scale, w * scale)
            weight = torch.zeros(1, 1, h * scale, w * scale)
        ov = overlap * scale
        wy = edge_ramp(th * scale, ov, y > 0, y + th < h)
        wx = edge_ramp(tw * scale, ov, x0 > 0, x0 + tw < w)
        mask = (wy[:, None] * wx[None, :])[None, None]
        ys, xs = slice(y * scale, (y + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
        out[:, :, ys, xs] += piece * mask
        weight[:, :, ys, xs] += mask
        if on_tile is not None:
            on_tile(n, len(boxes))
    return out / weight.clamp_min(1e-8)


def padded_call(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, multiple: int = 1,
                minimum: int = 0) -> torch.Tensor:
    """model(x) for a network that needs sides divisible by `multiple` and at least `minimum`: x is padded by
    reflection (replication where it is too small to reflect) and the output cropped back."""
    h, w = x.shape[-2:]
    ph = max(minimum, -(-h // multiple) * multiple) - h
    pw = max(minimum, -(-w // multiple) * multiple) - w
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return model(x)[..., :h * scale, :w * scale]
