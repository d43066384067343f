"""Hires fix (A1111): generate at the base size, upscale, then repaint the upscaled image with img2img."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from PIL import Image

from easel.pipelines import common, plan
from easel.pipelines.names import upscaler_label
from easel.pipelines.refiner import refiner_for, refiner_runs
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import hires_size
from easel.pipelines.txt2img import GeneratedImage, image_params
from easel.weights.model_io import LoadedModel

# Our upscaler name -> (torch interpolation mode, antialias); "lanczos" works on decoded pixels instead.
LATENT_UPSCALERS = {"latent": ("bilinear", False), "latent-nearest": ("nearest", False),
                    "latent-bicubic": ("bicubic", False), "latent-antialiased": ("bilinear", True)}


def hires(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
          refiner: LoadedModel | None = None) -> list[GeneratedImage]:
    """txt2img at `width` x `height`, upscale to the hires size, img2img there at `hr_denoising_strength`.

    With a refiner (`req.refiner_checkpoint`) the first pass switches to it, and once it has taken over it
    also runs the second pass (as in A1111, where the refiner stays loaded for the rest of the batch).
    """
    return plan.run_batches(*prepare(loaded, req, callback, refiner=refiner))


def prepare(loaded: LoadedModel, req: GenerationRequest, callback: plan.StepCallback | None = None, *,
            refiner: LoadedModel | None = None):
    """(resolved request, batch function) of a hires-fix request: two plans per batch."""
    cfg = loaded.model.config
    req = req.resolved(cfg.default_size, cfg.default_batch)
    second = second_pass_request(req)
    refiner = refiner_for(req, refiner)
    late = refiner if refiner_runs(req, req.steps, refiner) else loaded  # upscales, runs pass 2, decodes
    first_sigmas = plan.request_sigmas(loaded.model, req)
    second_sigmas = plan.img2img_sigmas(plan.request_sigmas(late.model, second), req.hr_denoising_strength,
                                        plan.hires_run_steps(req))
    # A1111 schedules the hires prompt's [a:b:when] over the first pass's steps, then the second pass's.
    prompt_steps = dict(prompt_steps=req.steps, hires_steps=req.hr_second_pass_steps or req.steps)

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        first = plan.build_plan(loaded, req, seeds, first_sigmas, refiner=refiner)
        base = plan.run(first.tagged(batch=it, n_iter=req.n_iter, phase="base"), callback)
        up = upscale_latents(late, base, second.width, second.height, req.hr_upscaler, req.tiled_vae)
        p2 = plan.build_plan(late, second, seeds, second_sigmas, up, **prompt_steps)
        latents = plan.run(p2.tagged(batch=it, n_iter=req.n_iter, phase="hires"), callback)
        return [GeneratedImage(img, hires_params(loaded, req, seed))
                for img, seed in zip(common.decode(late.model, latents, req.tiled_vae), seeds)]
    return req, batch


def second_pass_request(req: GenerationRequest) -> GenerationRequest:
    """The request of the second pass: hires size, and each hr_* option or else the first pass's value."""
    width, height = hires_size(req)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return dataclasses.replace(
        req, width=width, height=height, steps=plan.hires_schedule_steps(req),
        sampler=pick(req.hr_sampler, req.sampler), scheduler=pick(req.hr_scheduler, req.scheduler),
        prompt=pick(req.hr_prompt, req.prompt), negative_prompt=pick(req.hr_negative_prompt, req.negative_prompt),
        cfg_scale=pick(req.hr_cfg_scale, req.cfg_scale))


@torch.no_grad()
def upscale_latents(loaded: LoadedModel, latents: torch.Tensor, width: int, height: int, upscaler: str,
                    tiled: bool | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) -> (B, C, height/f, width/f): interpolated in latent space, or ('lanczos', 'nearest',
    an upscaler model's name) decoded, upscaled in pixels and encoded again."""
    f = loaded.model.config.vae.downsample
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        corners = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias, **corners)
    if upscaler == "lanczos":
        images = [im.resize((width, height), Image.LANCZOS) for im in common.decode(loaded.model, latents, tiled)]
        return common.encode(loaded.model, images, tiled)
    from easel.upscale.run import upscale_image  # nearest, or a model file (resolve_upscaler has checked the name)
    images = [upscale_image(im, upscaler, size=(width, height), device=str(loaded.model.device))
              for im in common.decode(loaded.model, latents, tiled)]
    return common.encode(loaded.model, images, tiled)


def hires_params(loaded: LoadedModel, req: GenerationRequest, seed: int) -> dict:
    """The image's parameters: the first pass's, the hires options, and the final size (A1111's 'Hires ...')."""
    p = image_params(loaded, req, seed)
    w2, h2 = hires_size(req)
    p.update(denoising_strength=req.hr_denoising_strength, hr_width=w2, hr_height=h2,
             hr_upscaler_label=upscaler_label(req.hr_upscaler))
    return p
