"""Hires fix (A1111): generate at the base size, upscale, then repaint the upscaled image with img2img."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from PIL import Image

from easel.pipelines import common
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import GeneratedImage, image_params, normalise, refiner_for
from easel.weights.model_io import LoadedModel

# Our upscaler name -> (torch interpolation mode, antialias); "lanczos" works on decoded pixels instead.
LATENT_UPSCALERS = {"latent": ("bilinear", False), "latent-nearest": ("nearest", False),
                    "latent-bicubic": ("bicubic", False), "latent-antialiased": ("bilinear", True)}
UPSCALER_LABELS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "latent-bicubic": "Latent (bicubic)",
                   "latent-antialiased": "Latent (antialiased)", "lanczos": "Lanczos"}


def hires(loaded: LoadedModel, req: GenerationRequest, callback: common.StepCallback | None = None, *,
          refiner: LoadedModel | None = None) -> list[GeneratedImage]:
    """txt2img at `width` x `height`, upscale to the hires size, img2img there at `hr_denoising_strength`.

    With a refiner (`req.refiner_checkpoint`) the first pass switches to it, and once it has taken over it
    also runs the second pass (as in A1111, where the refiner stays loaded for the rest of the batch).
    """
    cfg = loaded.model.config
    req = normalise(req).resolved(cfg.default_size, cfg.default_batch)
    second = second_pass_request(req)
    refiner = refiner_for(req, refiner)
    late = refiner if common.refiner_runs(req, req.steps, refiner) else loaded  # upscales, runs pass 2, decodes
    # A1111 schedules the hires prompt's [a:b:when] over the first pass's steps, then the second pass's.
    hr_steps = req.hr_second_pass_steps or req.steps

    def batch(it: int, seeds: list[int]) -> list[GeneratedImage]:
        base = common.sample(loaded, req, seeds, callback=common.batch_callback(callback, it, req.n_iter, phase="base"),
                             refiner=refiner)
        up = upscale_latents(late, base, second.width, second.height, req.hr_upscaler)
        cb = common.batch_callback(callback, it, req.n_iter, phase="hires")
        latents = common.sample(late, second, seeds, up, req.hr_denoising_strength, cb, run_steps=_run_steps(req),
                                prompt_steps=req.steps, hires_steps=hr_steps)
        return [GeneratedImage(img, hires_params(loaded, req, seed))
                for img, seed in zip(common.decode(late.model, latents), seeds)]
    return common.run_batches(req, batch)


def hires_size(req: GenerationRequest) -> tuple[int, int]:
    """(width, height) of the second pass: hr_resize_x/y when given (one of them keeps the aspect), else
    hr_scale times the base size; floored to a multiple of 8."""
    w, h = req.width, req.height
    if req.hr_resize_x and req.hr_resize_y:
        w2, h2 = req.hr_resize_x, req.hr_resize_y
    elif req.hr_resize_x:
        w2, h2 = req.hr_resize_x, req.hr_resize_x * h / w
    elif req.hr_resize_y:
        w2, h2 = req.hr_resize_y * w / h, req.hr_resize_y
    else:
        w2, h2 = w * req.hr_scale, h * req.hr_scale
    return max(8, int(w2) // 8 * 8), max(8, int(h2) // 8 * 8)


def second_pass_request(req: GenerationRequest) -> GenerationRequest:
    """The request of the second pass: hires size, and each hr_* option or else the first pass's value."""
    width, height = hires_size(req)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return dataclasses.replace(
        req, width=width, height=height, steps=_schedule_steps(req), sampler=pick(req.hr_sampler, req.sampler),
        scheduler=pick(req.hr_scheduler, req.scheduler), prompt=pick(req.hr_prompt, req.prompt),
        negative_prompt=pick(req.hr_negative_prompt, req.negative_prompt), cfg_scale=pick(req.hr_cfg_scale, req.cfg_scale))


def _schedule_steps(req: GenerationRequest) -> int:
    """Length of the second pass's schedule. With hr_second_pass_steps = N, A1111 runs exactly N steps, taken from
    the end of an int(N / strength) schedule; with 0, it runs int(steps * strength) of a `steps` schedule."""
    if not req.hr_second_pass_steps or req.hr_denoising_strength == 0:
        return req.steps
    return int(req.hr_second_pass_steps / min(req.hr_denoising_strength, 0.999))


def _run_steps(req: GenerationRequest) -> int | None:
    if not req.hr_second_pass_steps or req.hr_denoising_strength == 0:
        return None  # int(steps * strength); strength 0 runs nothing
    return req.hr_second_pass_steps


@torch.no_grad()
def upscale_latents(loaded: LoadedModel, latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """Latents (B, C, h, w) -> (B, C, height/f, width/f): interpolated in latent space, or ('lanczos') decoded,
    resized with PIL's Lanczos filter and encoded again."""
    f = loaded.model.config.vae.downsample
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        corners = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias, **corners)
    if upscaler == "lanczos":
        images = [im.resize((width, height), Image.LANCZOS) for im in common.decode(loaded.model, latents)]
        return common.encode(loaded.model, images)
    raise ValueError(f"unknown hr_upscaler {upscaler!r}; choose one of {', '.join(UPSCALER_LABELS)}")


def hires_params(loaded: LoadedModel, req: GenerationRequest, seed: int) -> dict:
    """The image's parameters: the first pass's, the hires options, and the final size (A1111's 'Hires ...')."""
    p = image_params(loaded, req, seed)
    w2, h2 = hires_size(req)
    p.update(denoising_strength=req.hr_denoising_strength, hr_width=w2, hr_height=h2,
             hr_upscaler_label=UPSCALER_LABELS[req.hr_upscaler])
    return p
