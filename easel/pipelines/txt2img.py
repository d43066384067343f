"""Text to image: encode the prompt, denoise fresh noise with a guided sampler, decode."""
from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from easel.pipelines import common
from easel.pipelines.request import GenerationRequest
from easel.samplers import resolve_sampler, SAMPLER_LABELS, SCHEDULE_LABELS
from easel.weights.model_io import LoadedModel


@dataclasses.dataclass
class GeneratedImage:
    """One image and the parameters that reproduce it."""

    image: Image.Image
    params: dict


def txt2img(loaded: LoadedModel, req: GenerationRequest, callback: common.StepCallback | None = None) -> list[GeneratedImage]:
    """Generate `n_iter` batches of `batch_size` images; seeds count up from `req.seed` (as A1111)."""
    cfg = loaded.model.config
    req = normalise(req).resolved(cfg.default_size, cfg.default_batch)
    out = []
    for it in range(req.n_iter):
        seeds = [req.seed + it * req.batch_size + i for i in range(req.batch_size)]
        latents = sample_latents(loaded, req, seeds, _batch_callback(callback, it, req.n_iter))
        for img, seed in zip(common.decode(loaded.model, latents), seeds):
            out.append(GeneratedImage(img, image_params(loaded, req, seed)))
    return out


def normalise(req: GenerationRequest) -> GenerationRequest:
    """Accept A1111 sampler labels ('DPM++ 2M Karras') as well as easel names."""
    sampler, schedule = resolve_sampler(req.sampler)
    return dataclasses.replace(req, sampler=sampler, scheduler=schedule or req.scheduler)


@torch.no_grad()
def sample_latents(loaded: LoadedModel, req: GenerationRequest, seeds: list[int],
                   callback: common.StepCallback | None = None) -> torch.Tensor:
    """The denoised latents (B, C, H/f, W/f) of one batch."""
    model = loaded.model
    f = model.config.vae.downsample
    schedule = common.make_schedule(model)
    denoiser = _guided_denoiser(loaded, req, len(seeds), schedule)
    sigmas = common.sigmas_for(schedule, req.scheduler, req.steps)
    noise, source = common.initial_noise(seeds, (model.config.vae.embed_dim, req.height // f, req.width // f))
    return common.run_sampler(req.sampler, denoiser, noise.to(model.device), sigmas.to(model.device), source,
                              callback=callback, eta=req.eta)


def _guided_denoiser(loaded: LoadedModel, req: GenerationRequest, batch: int, schedule):
    """CFG denoiser over the prompt and the negative prompt."""
    model = loaded.model
    text = common.encode_prompts(model, loaded.tokenizers, [req.prompt] * batch + [req.negative_prompt] * batch,
                                 req.clip_skip)
    cond_all = common.unet_conditioning(model, text, req.width, req.height)
    cond = {k: v[:batch] for k, v in cond_all.items()}
    uncond = {k: v[batch:] for k, v in cond_all.items()}
    denoiser = common.make_denoiser(model, schedule)
    return common.guided(denoiser, cond, uncond, req.cfg_scale)


def _batch_callback(callback, it: int, n_iter: int):
    """Tag each step with the batch index so progress bars can span all batches."""
    if callback is None:
        return None
    return lambda d: callback({**d, "batch": it, "n_iter": n_iter})


def image_params(loaded: LoadedModel, req: GenerationRequest, seed: int) -> dict:
    """The parameters stored with an image (enough to reproduce it with `easel generate --from`)."""
    return {
        "mode": "txt2img", "prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
        "sampler": req.sampler, "scheduler": req.scheduler, "sampler_label": SAMPLER_LABELS.get(req.sampler, req.sampler),
        "scheduler_label": SCHEDULE_LABELS.get(req.scheduler, req.scheduler), "cfg_scale": req.cfg_scale, "seed": seed,
        "width": req.width, "height": req.height, "clip_skip": req.clip_skip, "eta": req.eta,
        "model": loaded.name, "model_hash": loaded.hash, "dtype": req.dtype,
    }
