"""SDXL refiner: its conditioning vector, and the base -> refiner switch part-way through one sampling run.

The refiner (SGM `sd_xl_refiner.yaml`, Podell et al. 2023, "SDXL", sec. 2.5) is a second UNet trained on
the low-noise end of the schedule. It reads only OpenCLIP bigG (penultimate layer, 1280 wide) and a vector
`y` of pooled text followed by sinusoidal embeddings of the original size, the crop corner and an
aesthetic score (6.0 for the prompt, 2.5 for the negative prompt by default) where the base has the
target size.

A1111's refiner switch: the base model denoises the first k = round(steps * refiner_switch_at) steps
(sigmas[:k+1]), then the refiner, which re-encodes the prompt with its own encoder, denoises the rest
(sigmas[k:]) inside the same sampler run: same sigmas, sampler history and per-image noise generators,
continued. The two models share SDXL's latent space, so nothing is decoded in between.
"""
from __future__ import annotations

import math

import torch

from easel.models.layers import timestep_embedding
from easel.models.sd import StableDiffusion
from easel.pipelines import common
from easel.pipelines.request import GenerationRequest
from easel.samplers import SAMPLERS, DiscreteSchedule, resolve_sampler
from easel.weights.detect import SDXL_EMBED_DIM, is_refiner
from easel.weights.model_io import LoadedModel

__all__ = ["AESTHETIC_SCORE", "NEGATIVE_AESTHETIC_SCORE", "is_refiner", "refiner_vector", "unet_conditioning",
           "guided_denoiser", "denoise_from", "switch_step", "check_pair", "SwitchDenoiser", "refine_switch"]

# diffusers' `aesthetic_score` / `negative_aesthetic_score` defaults, A1111's sdxl_refiner_high/low_aesthetic_score.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def refiner_vector(pooled: torch.Tensor, original_size: tuple[int, int] = (1024, 1024),
                   crops: tuple[int, int] = (0, 0), aesthetic_score: float = AESTHETIC_SCORE) -> torch.Tensor:
    """The refiner's `y` (B, P + 5 * 256): pooled text, then (orig h, w, crop top, left, aesthetic score) embedded."""
    ids = torch.tensor([*original_size, *crops, aesthetic_score], dtype=torch.float32)  # (5,)
    emb = timestep_embedding(ids, SDXL_EMBED_DIM).reshape(1, -1)  # (1, 5 * 256), SGM's ConcatTimestepEmbedderND
    return torch.cat([pooled, emb.expand(pooled.shape[0], -1).to(pooled)], dim=-1)  # (B, P + 1280)


def unet_conditioning(model: StableDiffusion, text: dict[str, torch.Tensor], width: int, height: int,
                      aesthetic_score: float = AESTHETIC_SCORE) -> dict[str, torch.Tensor]:
    """UNet conditioning for any model: the refiner's aesthetic-score `y` for refiners, else common's SDXL/SD one."""
    if not is_refiner(model.config):
        return common.unet_conditioning(model, text, width, height)
    y = refiner_vector(text["pooled"], original_size=(height, width), crops=(0, 0), aesthetic_score=aesthetic_score)
    return {"context": text["context"], "y": y.to(model.dtype)}


def guided_denoiser(loaded: LoadedModel, req: GenerationRequest, batch: int, schedule: DiscreteSchedule):
    """CFG denoiser over the prompt and negative prompt, conditioned the way `loaded`'s UNet expects.

    A refiner's prompt gets `req.extra['aesthetic_score']` (default 6.0) and its negative prompt
    `req.extra['negative_aesthetic_score']` (default 2.5); any other model is conditioned as txt2img does.
    """
    model = loaded.model
    if not is_refiner(model.config):
        return common.guided_denoiser(loaded, req, batch, schedule)
    text = common.encode_prompts(model, loaded.tokenizers, [req.prompt] * batch + [req.negative_prompt] * batch,
                                 req.clip_skip)
    half = lambda sl: {k: v[sl] for k, v in text.items()}  # noqa: E731  (prompt rows, then negative rows)
    pos = req.extra.get("aesthetic_score", AESTHETIC_SCORE)
    neg = req.extra.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE)
    cond = unet_conditioning(model, half(slice(0, batch)), req.width, req.height, pos)
    uncond = unet_conditioning(model, half(slice(batch, None)), req.width, req.height, neg)
    return common.guided(common.make_denoiser(model, schedule), cond, uncond, req.cfg_scale)


@torch.no_grad()
def denoise_from(loaded: LoadedModel, req: GenerationRequest, x: torch.Tensor, sigmas: torch.Tensor,
                 noise_source, callback: common.StepCallback | None = None) -> torch.Tensor:
    """Run `req`'s sampler with `loaded`'s guided denoiser from `x` (at noise level sigmas[0]) down `sigmas`."""
    model = loaded.model
    denoiser = guided_denoiser(loaded, req, x.shape[0], common.make_schedule(model))
    return _sample(req, denoiser, x.to(model.device), sigmas.to(model.device), noise_source, callback)


def _sample(req: GenerationRequest, denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise_source,
            callback: common.StepCallback | None) -> torch.Tensor:
    """The request's sampler (our names or A1111 labels), with its eta when one is set."""
    name, _ = resolve_sampler(req.sampler)
    options = {} if req.eta is None else {"eta": req.eta}
    return SAMPLERS[name](denoiser, x, sigmas, callback=callback, noise=noise_source, **options)


def switch_step(steps: int, switch_at: float) -> int:
    """k = round(steps * switch_at) (halves round up), the number of steps the base model runs, in [0, steps]."""
    return min(max(math.floor(steps * switch_at + 0.5), 0), steps)


def check_pair(base: StableDiffusion, refiner: StableDiffusion) -> None:
    """Raise a readable error when the refiner does not work in the base model's latent space."""
    b, r = base.config, refiner.config
    if (b.vae.embed_dim, b.vae.downsample) != (r.vae.embed_dim, r.vae.downsample):
        raise ValueError(
            f"the refiner ({r.name}) works on {r.vae.embed_dim}-channel latents at 1/{r.vae.downsample} scale but the "
            f"base model ({b.name}) on {b.vae.embed_dim}-channel latents at 1/{b.vae.downsample}: pick a refiner of "
            "the same family (an SDXL base goes with the SDXL refiner)")


class SwitchDenoiser:
    """The base model's denoiser above noise level `sigma_switch`, the refiner's at and below it.

    Swapping the model inside one running sampler is what A1111 does: a multistep sampler (dpmpp_2m, lms,
    uni_pc, ...) keeps its history across the switch and stochastic samplers keep drawing from the same
    generators. Steps 0..k-1 evaluate at sigmas above sigmas[k], so the base runs exactly the first k steps;
    a second-order sampler's last base step ends with an evaluation at sigmas[k], which is the refiner's.
    """

    def __init__(self, base, refiner, sigma_switch: float, refiner_device: torch.device):
        self.base, self.refiner, self.sigma_switch, self.refiner_device = base, refiner, sigma_switch, refiner_device

    def uses_base(self, sigma: float) -> bool:
        """Whether the base model denoises at this noise level."""
        return sigma > self.sigma_switch

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        if self.uses_base(float(sigma.max())):
            return self.base(x, sigma, **extra)
        dev = self.refiner_device  # the two models may sit on different devices (e.g. one offloaded)
        return self.refiner(x.to(dev), sigma.to(dev), **extra).to(x.device)


@torch.no_grad()
def refine_switch(base_loaded: LoadedModel, refiner_loaded: LoadedModel, req: GenerationRequest, seeds: list[int],
                  callback: common.StepCallback | None = None) -> torch.Tensor:
    """Latents (B, C, H/f, W/f) of one batch: the base runs the first k = round(steps * refiner_switch_at) steps,
    the refiner the rest, in one run of the request's sampler (A1111's refiner).

    `req` must be resolved (width/height set; see txt2img). The callback sees steps 0..steps-1 with
    `model` = 'base' or 'refiner'. Decode the result with the refiner's VAE (A1111 does; SDXL's are equal).
    """
    if req.width is None or req.height is None:
        raise ValueError("refine_switch needs a resolved request (width and height set): call req.resolved(...)")
    base, refiner = base_loaded.model, refiner_loaded.model
    check_pair(base, refiner)
    sigmas = common.sigmas_for(common.make_schedule(base), req.scheduler, req.steps)
    k = switch_step(req.steps, req.refiner_switch_at)
    f, batch = base.config.vae.downsample, len(seeds)
    # The seeds' noise as txt2img draws it (variation seeds included), so the first k steps are txt2img's.
    noise, source = common.seed_noise(req, seeds, (base.config.vae.embed_dim, req.height // f, req.width // f), f)
    # Only the models that run encode their prompts (k = 0: refiner only; k = steps: base only).
    base_den = guided_denoiser(base_loaded, req, batch, common.make_schedule(base)) if k > 0 else None
    ref_den = guided_denoiser(refiner_loaded, req, batch, common.make_schedule(refiner)) if k < req.steps else None
    denoiser = SwitchDenoiser(base_den, ref_den, float(sigmas[k]), refiner.device)
    tagged = None if callback is None else (lambda d: callback(
        {**d, "steps": req.steps, "model": "base" if denoiser.uses_base(d["sigma"]) else "refiner"}))
    # Pure noise scaled to the first sigma exactly as common.run_sampler does for txt2img.
    s0 = float(sigmas[0])
    x = noise.to(base.device) * math.sqrt(1 + s0 * s0)
    return _sample(req, denoiser, x, sigmas.to(base.device), source, tagged)
