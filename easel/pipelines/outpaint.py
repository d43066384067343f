"""Outpainting: extend the canvas by `outpaint_left/right/up/down` pixels and inpaint the new area.

The new border is pre-filled by stretching the image's edge pixels outwards plus a little seeded noise
(so the model has colours to continue rather than a flat field), the mask covers the border plus a small
overlap into the image, and everything else is the inpainting pipeline: the blurred mask feathers the
seam, and the image beyond overlap + blur is kept pixel for pixel (A1111's "poor man's outpainting").
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from easel.pipelines import images, plan
from easel.pipelines.img2img import resolve_edit_request
from easel.pipelines.inpaint import batch_function, prepare_inputs
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import margins
from easel.pipelines.txt2img import GeneratedImage
from easel.weights.model_io import LoadedModel

PREFILL_NOISE = 24.0  # grey levels of noise over the stretched edge: enough to break its streaks up
MIN_OVERLAP = 8  # pixels of the original repainted along a seam (one latent cell of SD's VAE) at least


def outpaint(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None
             ) -> list[GeneratedImage]:
    """Extend `req.init_images` by the outpaint_* margins and paint them (see `prepare`)."""
    return plan.run_batches(*prepare(loaded, req, callback))


def prepare(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None):
    """(resolved request, batch function) of an outpainting request. Extend `req.init_images` by the outpaint_*
    margins (each rounded up to a multiple of 8 px) and paint them;
    width/height are the size the image is brought to before extending (default: its own, to 8 px)."""
    sides = margins(req)
    if not any(sides):
        raise ValueError("outpaint needs at least one of outpaint_left/right/up/down > 0 (pixels to add)")
    req = resolve_edit_request(loaded, req)
    sources = [images.resize_image(im.convert("RGB"), req.width, req.height, req.resize_mode)
               for im in req.init_images]
    canvases = [extend_canvas(im, *sides, seed=req.seed) for im in sources]
    mask = outpaint_mask((req.width, req.height), *sides, overlap=max(2 * req.mask_blur, MIN_OVERLAP))
    if req.mask is not None:  # a mask of the source image repaints there too
        mask = _union(mask, images.resize_image(images.binary_mask(req.mask), req.width, req.height), sides)
    canvas_req = dataclasses.replace(req, init_images=canvases, mask=mask, width=canvases[0].width,
                                     height=canvases[0].height, resize_mode="just_resize", inpaint_full_res=False,
                                     inpainting_mask_invert=False)
    inner = batch_function(loaded, canvas_req, prepare_inputs(loaded, canvas_req), callback)

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        results = inner(it, seeds)
        for r in results:  # the source size reproduces the same canvas; the final size is what came out
            r.params.update(width=req.width, height=req.height, final_width=r.image.width,
                            final_height=r.image.height)
        return results
    return req, batch


def extend_canvas(img: Image.Image, left: int, right: int, up: int, down: int, seed: int = 0,
                  noise: float = PREFILL_NOISE) -> Image.Image:
    """The image on a larger canvas whose new border repeats the nearest edge pixel, plus seeded Gaussian noise
    (`noise` grey levels) in the border only."""
    arr = np.asarray(img.convert("RGB"))
    out = np.pad(arr, ((up, down), (left, right), (0, 0)), mode="edge").astype(np.float64)
    border = np.ones(out.shape[:2], bool)
    border[up:up + arr.shape[0], left:left + arr.shape[1]] = False
    rng = np.random.default_rng([seed % 2**63, 0x0F7])
    out[border] += rng.standard_normal((int(border.sum()), 3)) * noise
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8), "RGB")


def outpaint_mask(size: tuple[int, int], left: int, right: int, up: int, down: int, overlap: int = 8) -> Image.Image:
    """Mask (L, white = paint) of the extended canvas: the new border plus `overlap` pixels into the image on
    each extended side, so the seam itself is repainted and then feathered by the mask blur."""
    w, h = size
    mask = Image.new("L", (w + left + right, h + up + down), 255)
    keep = (left + (overlap if left else 0), up + (overlap if up else 0),
            left + w - (overlap if right else 0), up + h - (overlap if down else 0))
    if keep[0] < keep[2] and keep[1] < keep[3]:
        ImageDraw.Draw(mask).rectangle((keep[0], keep[1], keep[2] - 1, keep[3] - 1), fill=0)
    return mask


def _union(mask: Image.Image, source_mask: Image.Image, sides: tuple[int, int, int, int]) -> Image.Image:
    """The outpaint mask with a mask of the source image (placed where the image sits on the canvas) added."""
    placed = Image.new("L", mask.size, 0)
    placed.paste(source_mask.convert("L"), (sides[0], sides[2]))
    return Image.fromarray(np.maximum(np.asarray(mask), np.asarray(placed)), "L")
