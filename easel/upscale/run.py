"""Upscaling an image: a model file (tiled), or Lanczos / nearest; to any scale (A1111's rule: run the model
until the image is at least as large as asked, then resize to the exact size with Lanczos)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from easel.upscale.find import PIXEL_UPSCALERS, find_upscaler, norm
from easel.upscale.tiles import padded_call, tiled_apply

log = logging.getLogger("easel")
MAX_MODEL_PASSES = 3  # a 2x model asked for 8x runs three times; more is never what anyone means
MAX_OUTPUT_PIXELS = 16384 * 16384


def upscale_image(image: Image.Image, upscaler: str = "lanczos", scale: float | None = None, *,
                  size: tuple[int, int] | None = None, tile: int = 256, overlap: int = 32, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """`image` upscaled by `upscaler` (file path, file stem, A1111 label, 'lanczos' or 'nearest') to `size`
    (w, h), else `scale` times (default: the model's own scale; 2 for lanczos/nearest). Models run in tiles of
    `tile` px overlapping by `overlap` px (tile 0: the whole image at once); `on_tile(done, total)` reports."""
    image = image.convert("RGB")
    name = norm(upscaler)
    model = None if name in PIXEL_UPSCALERS else load_named(upscaler, device, dtype)
    target = target_size(image.size, scale if scale is not None else (model.scale if model else 2), size)
    if model is None:
        return image.resize(target, Image.NEAREST if name == "nearest" else Image.LANCZOS)
    out = image
    for _ in range(MAX_MODEL_PASSES):
        out = model_upscale(model, out, tile, overlap, on_tile)
        if model.scale == 1 or (out.width >= target[0] and out.height >= target[1]):
            break
    return out if out.size == target else out.resize(target, Image.LANCZOS)


def load_named(upscaler: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The spandrel descriptor of the upscaler file a name, label or path finds."""
    from easel.upscale.model import load_upscaler
    return load_upscaler(find_upscaler(upscaler).path, device, dtype)


def target_size(size: tuple[int, int], scale: float, exact: tuple[int, int] | None = None) -> tuple[int, int]:
    """The output size: `exact`, else `size` times `scale`, checked."""
    if exact is None:
        if not scale or scale <= 0:
            raise ValueError(f"upscale scale must be positive (got {scale})")
        exact = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    if exact[0] <= 0 or exact[1] <= 0 or exact[0] * exact[1] > MAX_OUTPUT_PIXELS:
        raise ValueError(f"upscaled size {exact[0]}x{exact[1]} is out of range (at most {MAX_OUTPUT_PIXELS} pixels)")
    return exact


@torch.no_grad()
def model_upscale(model, image: Image.Image, tile: int = 256, overlap: int = 32,
                  on_tile: Callable[[int, int], None] | None = None) -> Image.Image:
    """One pass of a spandrel model over `image`, tiled (see `easel.upscale.tiles`)."""
    from easel.pipelines.common import from_pil, to_pil
    x = (from_pil([image]) + 1) / 2  # (1, 3, H, W) in [0, 1], as spandrel's models take it
    y = upscale_tensor(model, x, tile, overlap, on_tile)
    return to_pil(y.clamp(0, 1) * 2 - 1)[0]


def upscale_tensor(model, x: torch.Tensor, tile: int = 256, overlap: int = 32,
                   on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H*s, W*s) on the CPU, float32."""
    req = model.size_requirements
    param = next(model.model.parameters())

    def run(piece: torch.Tensor) -> torch.Tensor:
        piece = piece.to(param.device, param.dtype)
        return padded_call(model.model, piece, model.scale, req.multiple_of, req.minimum)
    return tiled_apply(run, x, model.scale, tile, overlap, on_tile)
