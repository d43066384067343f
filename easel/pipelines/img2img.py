"""Image to image (SDEdit): encode the image, noise it part way, run the tail of the sampler's schedule."""
from __future__ import annotations

import dataclasses

import torch

from easel.pipelines import common, plan
from easel.pipelines.images import resize_image  # A1111's resize modes, shared with inpaint/outpaint
from easel.pipelines.refiner import refiner_for, refiner_runs
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import image_default_size
from easel.pipelines.txt2img import GeneratedImage, image_params
from easel.weights.model_io import LoadedModel


def img2img(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
            refiner: LoadedModel | None = None) -> list[GeneratedImage]:
    """Repaint `req.init_images` guided by the prompt; `denoising_strength` 0 keeps the image, 1 replaces it.

    With `req.refiner_checkpoint`, `refiner` takes over at `refiner_switch_at` of the steps that run.
    """
    return plan.run_batches(*prepare(loaded, req, callback, refiner=refiner))


def prepare(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
            refiner: LoadedModel | None = None):
    """(resolved request, batch function) of an img2img request: the tail of the schedule from the noised image."""
    req = resolve_edit_request(loaded, req)
    init = init_latents(loaded, req)  # (1 or B, C, h, w)
    refiner = refiner_for(req, refiner)
    sigmas = plan.img2img_sigmas(plan.request_sigmas(loaded.model, req), req.denoising_strength)
    decoder = refiner if refiner_runs(req, len(sigmas) - 1, refiner) else loaded

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        p = plan.build_plan(loaded, req, seeds, sigmas, init, refiner=refiner)
        latents = plan.run(p.tagged(batch=it, n_iter=req.n_iter), callback)
        return [GeneratedImage(img, image_params(loaded, req, seed))
                for img, seed in zip(common.decode(decoder.model, latents, req.tiled_vae), seeds)]
    return req, batch


def resolve_edit_request(loaded: LoadedModel, req: GenerationRequest) -> GenerationRequest:
    """Take a missing width/height from the first init image, fill defaults, resolve names and check."""
    if not req.init_images:
        raise ValueError(f"{req.mode} needs an init image: set init_images (CLI: `easel img2img IMAGE PROMPT`)")
    width, height = image_default_size(req.init_images[0].size, req.width, req.height)
    cfg = loaded.model.config
    return dataclasses.replace(req, width=width, height=height).resolved(cfg.default_size, cfg.default_batch)


def init_latents(loaded: LoadedModel, req: GenerationRequest) -> torch.Tensor:
    """The init images resized to the request's size and VAE-encoded: (1, C, h, w) for one image, shared by the
    whole batch, or (B, C, h, w) for one image per batch item."""
    images = req.init_images
    if len(images) not in (1, req.batch_size):
        raise ValueError(f"got {len(images)} init images for a batch of {req.batch_size}: "
                         "give one image (used for every image of the batch) or one per image")
    resized = [resize_image(im.convert("RGB"), req.width, req.height, req.resize_mode) for im in images]
    return common.encode(loaded.model, resized, req.tiled_vae)
