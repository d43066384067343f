"""Upscalers: ESRGAN / Real-ESRGAN / SwinIR / DAT / ... model files run through spandrel, tiled so that any image
fits in memory, plus Lanczos and nearest; SD upscale (tiled img2img over an upscaled image).

    from easel.upscale import upscale_image
    big = upscale_image(Image.open("in.png"), "R-ESRGAN 4x+", scale=4)

`find` knows where upscaler files live and A1111's names for them (no torch import, so name resolution stays
cheap); `model` loads files safely; `tiles` runs a network tile by tile with feathered overlaps; `run` puts them
together; `sd_upscale` repaints an upscaled image tile by tile.
"""
from __future__ import annotations

from easel.upscale.find import PIXEL_UPSCALERS, UpscalerNotFound, find_upscaler, list_upscalers

__all__ = ["PIXEL_UPSCALERS", "UpscalerNotFound", "find_upscaler", "list_upscalers", "upscale_image"]


def upscale_image(image, upscaler: str = "lanczos", scale: float | None = None, **options):
    """`image` (PIL) upscaled by `upscaler` (a name, A1111 label or path; lanczos; nearest); see `run.upscale_image`."""
    from easel.upscale.run import upscale_image as run_upscale
    return run_upscale(image, upscaler, scale, **options)
