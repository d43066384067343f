"""Image to image (SDEdit): encode the image, noise it part way, run the tail of the sampler's schedule."""
from __future__ import annotations

import dataclasses

import torch

from easel.pipelines import common
from easel.pipelines.images import resize_image  # A1111's resize modes, shared with inpaint/outpaint
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage, image_params, normalise, refiner_for
from easel.weights.model_io import LoadedModel


def img2img(loaded: LoadedModel, req: GenerationRequest, callback: common.StepCallback | None = None, *,
            refiner: LoadedModel | None = None) -> list[GeneratedImage]:
    """Repaint `req.init_images` guided by the prompt; `denoising_strength` 0 keeps the image, 1 replaces it.

    With `req.refiner_checkpoint`, `refiner` takes over at `refiner_switch_at` of the steps that run.
    """
    req = resolve_edit_request(loaded, req)
    init = init_latents(loaded, req)  # (1 or B, C, h, w)
    refiner = refiner_for(req, refiner)
    run = min(int(req.steps * req.denoising_strength), req.steps)  # the steps that run (see common.img2img_sigmas)
    decoder = refiner if common.refiner_runs(req, run, refiner) else loaded

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        cb = common.batch_callback(callback, it, req.n_iter)
        latents = common.sample(loaded, req, seeds, init, req.denoising_strength, cb, refiner=refiner)
        return [GeneratedImage(img, image_params(loaded, req, seed))
                for img, seed in zip(common.decode(decoder.model, latents), seeds)]
    return common.run_batches(req, batch)


def resolve_edit_request(loaded: LoadedModel, req: GenerationRequest) -> GenerationRequest:
    """Normalise names, take a missing width/height from the first init image, fill defaults and check."""
    if not req.init_images:
        raise ValueError(f"{req.mode} needs an init image: set init_images (CLI: `easel img2img IMAGE PROMPT`)")
    width, height = default_size(req.init_images[0].size, req.width, req.height)
    cfg = loaded.model.config
    req = dataclasses.replace(normalise(req), width=width, height=height)
    return req.resolved(cfg.default_size, cfg.default_batch)


def default_size(image_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height): the given ones, else the image's size (keeping its aspect if one side is given), to 8 px."""
    w0, h0 = image_size
    to8 = lambda v: max(8, int(v / 8 + 0.5) * 8)  # noqa: E731  (half rounds up, not to even)
    if width is None and height is None:
        return to8(w0), to8(h0)
    if height is None:
        return width, to8(width * h0 / w0)
    if width is None:
        return to8(height * w0 / h0), height
    return width, height


def init_latents(loaded: LoadedModel, req: GenerationRequest) -> torch.Tensor:
    """The init images resized to the request's size and VAE-encoded: (1, C, h, w) for one image, shared by the
    whole batch, or (B, C, h, w) for one image per batch item."""
    images = req.init_images
    if len(images) not in (1, req.batch_size):
        raise ValueError(f"got {len(images)} init images for a batch of {req.batch_size}: "
                         "give one image (used for every image of the batch) or one per image")
    resized = [resize_image(im.convert("RGB"), req.width, req.height, req.resize_mode) for im in images]
    return common.encode(loaded.model, resized)
