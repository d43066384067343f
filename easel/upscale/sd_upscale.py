"""SD upscale (A1111's script): upscale an image, then repaint it tile by tile with img2img at the model's size,
the tiles overlapping and blended with the same feathered weights as the upscaler's tiles, so the model adds
detail at a resolution it was never trained at without seams."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from easel.animate import match_colors
from easel.upscale.run import upscale_image
from easel.upscale.tiles import edge_ramp, tiles


def sd_upscale(pipe, image: Image.Image, request, upscaler: str = "lanczos", scale: float = 2.0,
               overlap: int | None = None,
               tile: int | None = None, on_tile: Callable[[int, int], None] | None = None, callback=None,
               color_match: bool = True):
    """(upscaled image, parameters): `image` upscaled `scale` times by `upscaler`, then each tile of `tile` px
    (default: the model's size) repainted by `request` (a GenerationRequest: prompt, denoising_strength, seed,
    steps, ...), one image per tile, every tile with the request's seed (as A1111); tiles share `overlap` px
    (default: half a tile, at most A1111's 64). With `color_match`, each
    repainted tile gets its source tile's LAB mean and spread: a tile that shows only background otherwise
    comes out lighter or darker than its neighbours (the prompt describes the whole image, not the tile)."""
    tile = tile or pipe.config.default_size
    overlap = min(64, tile // 2) if overlap is None else overlap
    if tile % 8 or tile <= 0:
        raise ValueError(f"SD upscale tile size must be a positive multiple of 8 (got {tile})")
    if not 0 <= overlap < tile:
        raise ValueError(f"SD upscale overlap must be at least 0 and less than the tile size {tile} (got {overlap})")
    w, h = (max(8, round(v * scale / 8) * 8) for v in image.size)  # the VAE needs multiples of 8
    big = upscale_image(image, upscaler, size=(w, h))
    acc, weight = np.zeros((h, w, 3), np.float64), np.zeros((h, w, 1), np.float64)
    boxes = tiles(h, w, tile, overlap)
    params = None
    for n, (y, x, th, tw) in enumerate(boxes, 1):
        req = dataclasses.replace(request, init_images=[big.crop((x, y, x + tw, y + th))], width=tw, height=th,
                                  batch_size=1, n_iter=1, enable_hr=False)
        out = pipe.generate(req, callback)[0]
        params = params or out.params
        painted = match_colors(out.image, req.init_images[0]) if color_match else out.image
        mask = (edge_ramp(th, overlap, y > 0, y + th < h)[:, None] * edge_ramp(tw, overlap, x > 0, x + tw < w)[None])
        mask = mask.numpy()[..., None].astype(np.float64)
        acc[y:y + th, x:x + tw] += np.asarray(painted.convert("RGB"), np.float64) * mask
        weight[y:y + th, x:x + tw] += mask
        if on_tile is not None:
            on_tile(n, len(boxes))
    result = Image.fromarray(np.clip(np.round(acc / np.maximum(weight, 1e-8)), 0, 255).astype(np.uint8))
    return result, dict(params, final_width=w, final_height=h, sd_upscale_upscaler=upscaler,
                        sd_upscale_overlap=overlap, sd_upscale_scale=scale, sd_upscale_tiles=len(boxes),
                        sd_upscale_color_match=color_match)


__all__ = ["sd_upscale"]
