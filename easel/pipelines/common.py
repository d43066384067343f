"""Helpers every pipeline shares: prompt encoding, noise, the guided denoiser, sampling, decoding."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image

from easel.models.sd import StableDiffusion
from easel.samplers import (SAMPLERS, SCHEDULES, CFGDenoiser, DiscreteSchedule, EpsDenoiser, NoiseSource, VDenoiser,
                            make_alphas_cumprod)
from easel.text.tokenizer import CLIPTokenizer

StepCallback = Callable[[dict], None]


class Interrupted(Exception):
    """Raised by a step callback to stop the whole request; the images already finished are returned
    (A1111's "interrupt")."""


class Skipped(Exception):
    """Raised by a step callback to drop the current batch and go on with the next one (A1111's "skip")."""


def encode_prompts(model: StableDiffusion, tokenizers: list[CLIPTokenizer], prompts: list[str],
                   clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Prompts -> the UNet's conditioning {'context': (B, 77, D), 'y': (B, adm) for SDXL}."""
    ids = [tok(prompts, max_length=enc.max_position_embeddings, pad_id=enc.pad_token_id)
           for tok, enc in zip(tokenizers, model.config.text_encoders)]
    context, pooled = model.encode_text(ids, clip_skip=clip_skip)
    return {"context": context.to(model.dtype), "pooled": pooled}


def unet_conditioning(model: StableDiffusion, text: dict[str, torch.Tensor], width: int, height: int,
                      aesthetic_score: float | None = None) -> dict:
    """Add the `y` vector of models that take one to the text conditioning: SDXL's pooled text + size/crop
    embeddings, or the SDXL refiner's pooled text + size/crop/aesthetic-score embeddings (score default 6.0)."""
    cond = {"context": text["context"]}
    if not model.config.unet.adm_in_channels:
        return cond
    from easel.weights.detect import is_refiner
    if is_refiner(model.config):
        from easel.pipelines.refiner import AESTHETIC_SCORE, refiner_vector
        score = AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score
        cond["y"] = refiner_vector(text["pooled"], original_size=(height, width), aesthetic_score=score).to(model.dtype)
    else:
        from easel.models.unet import sdxl_vector
        cond["y"] = sdxl_vector(text["pooled"], original_size=(height, width), crops=(0, 0),
                                target_size=(height, width)).to(model.dtype)
    return cond


class UNetFn:
    """The UNet as the denoiser wrappers call it: float32 in and out, the model's dtype inside."""

    def __init__(self, model: StableDiffusion):
        self.unet, self.dtype = model.unet, model.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t, **cond).float()


def make_schedule(model: StableDiffusion) -> DiscreteSchedule:
    """The model's discrete noise schedule (betas from its config)."""
    cfg = model.config
    ac = make_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)
    return DiscreteSchedule(ac)


def make_denoiser(model: StableDiffusion, schedule: DiscreteSchedule, wrap_unet: Callable | None = None):
    """eps or v parameterisation wrapper around the UNet (k-diffusion's external.py).

    `wrap_unet(unet_fn) -> unet_fn` changes the network call the wrapper makes with the input-scaled x (a
    9-channel inpainting model's extra channels go in there, unscaled).
    """
    wrapper = VDenoiser if model.config.prediction == "v" else EpsDenoiser
    unet = UNetFn(model)
    return wrapper(unet if wrap_unet is None else wrap_unet(unet), schedule)


def guided(denoiser, cond: dict, uncond: dict, scale: float):
    """Classifier-free guidance: one batched UNet call for cond and uncond."""
    return CFGDenoiser(denoiser, cond, uncond, scale)


def sigmas_for(schedule: DiscreteSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The sigma sequence (steps + 1 values ending in 0) of a named schedule."""
    if scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[scheduler](schedule, steps)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, NoiseSource]:
    """Unit noise (B, *shape) drawn on the CPU from one generator per image (so any device gives the same
    image), and the noise source that continues those generators for ancestral / SDE samplers."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return noise, NoiseSource(gens)


def run_sampler(sampler: str, denoiser, noise: torch.Tensor, sigmas: torch.Tensor, noise_source: NoiseSource,
                callback: StepCallback | None = None, eta: float | None = None, full_denoise: bool = True,
                latent: torch.Tensor | None = None) -> torch.Tensor:
    """Scale the noise to the first sigma (ComfyUI's rule) and run a named sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    s0 = sigmas[0].item()
    # Starting from pure noise, x = noise * sqrt(1 + s0^2) is the exact VP->VE rescale (diffusers and ComfyUI).
    scale = math.sqrt(1 + s0 * s0) if full_denoise else s0
    x = noise * scale if latent is None else latent + noise * scale
    options = {} if eta is None else {"eta": eta}
    return SAMPLERS[sampler](denoiser, x, sigmas, callback=callback, noise=noise_source, **options)


def img2img_sigmas(sigmas: torch.Tensor, strength: float, run_steps: int | None = None) -> torch.Tensor:
    """The tail of a schedule that img2img runs: the last `run_steps` steps (default int(steps * strength), as
    diffusers and A1111 count them), so that denoising starts from a partly noised image."""
    steps = len(sigmas) - 1
    n = int(steps * strength) if run_steps is None else run_steps
    return sigmas[steps - min(max(n, 0), steps):]


def guided_denoiser(loaded, req, batch: int, schedule: DiscreteSchedule, sigmas: torch.Tensor | None = None, *,
                    wrap_unet: Callable | None = None, prompt_steps: int | None = None,
                    hires_steps: int | None = None):
    """The guided denoiser of `req`: A1111 prompt conditioning (weights, BREAK, long prompts, [a:b:when], AND,
    textual inversion by file name) with classifier-free guidance, at the request's size.

    `sigmas` are the ones the sampler runs (default: the request's whole schedule); the prompt's step schedule
    counts from their first step. `prompt_steps` (default `req.steps`) and `hires_steps` are the step counts
    that `[a:b:when]` refers to (A1111: the first pass's steps, and a hires pass's). An SDXL refiner's prompt
    gets `req.extra['aesthetic_score']` (6.0) and its negative prompt `req.extra['negative_aesthetic_score']` (2.5).
    """
    from easel.pipelines import conditioning
    sigmas = sigmas_for(schedule, req.scheduler, req.steps) if sigmas is None else sigmas
    cond, uncond = conditioning.build_conditioning(
        loaded, req.prompt, req.negative_prompt, prompt_steps or req.steps, batch, req.width, req.height,
        req.clip_skip, embedding_library(loaded), hires_steps=hires_steps)
    from easel.weights.detect import is_refiner
    if is_refiner(loaded.model.config):
        from easel.pipelines.refiner import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE
        cond = _rescored(cond, req.extra.get("aesthetic_score", AESTHETIC_SCORE), req)
        uncond = _rescored(uncond, req.extra.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE), req)
    denoiser = make_denoiser(loaded.model, schedule, wrap_unet)
    return conditioning.guided_denoiser(denoiser, cond, uncond, req.cfg_scale, sigmas)


def _rescored(pc, score: float, req):
    """A refiner's prompt conditioning with the aesthetic score in every text's `y` set to `score`."""
    from easel.pipelines.refiner import refiner_vector
    from easel.weights.detect import SDXL_EMBED_DIM

    def rescore(y: torch.Tensor) -> torch.Tensor:
        pooled = y[:, :y.shape[1] - 5 * SDXL_EMBED_DIM]  # y = pooled text, then 5 embeddings (see refiner_vector)
        return refiner_vector(pooled, original_size=(req.height, req.width), aesthetic_score=score)
    # new dicts: the prompt and the negative prompt may share an encoded text (and its dict)
    return dataclasses.replace(pc, encoded=[{**e, "y": rescore(e["y"])} for e in pc.encoded])


def embedding_library(loaded):
    """The textual-inversion embeddings prompts can name (EmbeddingLibrary over the embedding folders), made
    once per loaded model so that the folders are not rescanned for every request."""
    library = getattr(loaded, "embeddings", None)
    if library is None:
        from easel.weights.embeddings import EmbeddingLibrary
        library = EmbeddingLibrary()
        loaded.embeddings = library
    return library


def build_denoiser(loaded, req, batch: int, schedule: DiscreteSchedule, sigmas: torch.Tensor, refiner=None,
                   wrap_unet: Callable | None = None, **steps):
    """The guided denoiser of one run; with a `refiner` (LoadedModel), the base model's above the switch sigma
    and the refiner's from there on (A1111's refiner switch, see easel.pipelines.refiner)."""
    if refiner is None:
        return guided_denoiser(loaded, req, batch, schedule, sigmas, wrap_unet=wrap_unet, **steps)
    from easel.pipelines.refiner import SwitchDenoiser, check_pair, switch_step
    check_pair(loaded.model, refiner.model)
    k = switch_step(len(sigmas) - 1, req.refiner_switch_at)
    # Only the models that run encode their prompts (k = 0: refiner only; k = all steps: base only).
    base = guided_denoiser(loaded, req, batch, schedule, sigmas, wrap_unet=wrap_unet, **steps) if k > 0 else None
    ref = (guided_denoiser(refiner, req, batch, make_schedule(refiner.model), sigmas, **steps)
           if k < len(sigmas) - 1 else None)
    return SwitchDenoiser(base, ref, float(sigmas[k]), refiner.model.device)


def refiner_runs(req, steps: int, refiner) -> bool:
    """Whether a run of `steps` steps reaches the refiner (so its VAE decodes, and a hires pass uses it)."""
    if refiner is None:
        return False
    from easel.pipelines.refiner import switch_step
    return switch_step(steps, req.refiner_switch_at) < steps


@torch.no_grad()
def sample(loaded, req, seeds: list[int], init_latent: torch.Tensor | None = None, strength: float = 1.0,
           callback: StepCallback | None = None, *, run_steps: int | None = None, noise: torch.Tensor | None = None,
           wrap_denoiser: Callable | None = None, wrap_unet: Callable | None = None, refiner=None,
           prompt_steps: int | None = None, hires_steps: int | None = None) -> torch.Tensor:
    """Denoised latents (B, C, H/f, W/f) of one batch: the sampling core of txt2img, img2img, hires and inpaint.

    txt2img (`init_latent` None) starts from seeded noise at the schedule's first sigma. img2img runs the last
    `run_steps` (default int(steps * strength)) steps of a `req.steps` schedule from `init_latent + noise * sigma`
    (SDEdit, Meng et al. 2021). `noise` (B, C, h, w) replaces the seeds' unit noise (variation seeds, latent noise
    fill); `wrap_denoiser(denoiser) -> denoiser` adds behaviour around the guided denoiser (inpainting blends),
    `wrap_unet(unet_fn) -> unet_fn` around the network call (inpainting models' extra channels). `refiner` (a
    LoadedModel) takes over at `req.refiner_switch_at` of the steps; `prompt_steps`/`hires_steps`: see
    `guided_denoiser`. The size is `req.width` x `req.height`, or `init_latent`'s.
    """
    model = loaded.model
    schedule = make_schedule(model)
    sigmas = sigmas_for(schedule, req.scheduler, req.steps)
    f = model.config.vae.downsample
    shape = (model.config.vae.embed_dim, req.height // f, req.width // f) if init_latent is None \
        else tuple(init_latent.shape[1:])
    unit, source = seed_noise(req, seeds, shape, f)  # drawn even when replaced, so ancestral noise continues alike
    unit = unit if noise is None else noise.float().cpu()
    if init_latent is not None:
        sigmas = img2img_sigmas(sigmas, strength, run_steps)
        if len(sigmas) < 2:  # strength 0 (or too few steps to run one): nothing to denoise
            return init_latent.float().to(model.device).expand(len(seeds), *shape).clone()
        init_latent = init_latent.float().to(model.device).expand(len(seeds), *shape)
    denoiser = build_denoiser(loaded, req, len(seeds), schedule, sigmas, refiner, wrap_unet,
                              prompt_steps=prompt_steps, hires_steps=hires_steps)
    cb = None if callback is None else _step_callback(callback, len(sigmas) - 1, denoiser if refiner else None)
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)
    return run_sampler(req.sampler, denoiser, unit.to(model.device), sigmas.to(model.device), source, callback=cb,
                       eta=req.eta, full_denoise=init_latent is None, latent=init_latent)


@torch.no_grad()
def sample_plain_batch(loaded, prompts: list[str], sampler: str = "dpmpp_2m", scheduler: str = "karras",
                       steps: int = 20, cfg_scale: float = 5.0, seed: int = 1000) -> torch.Tensor:
    """Latents (B, C, h, w) of all prompts as one batch at the model's default size: plain text (no prompt syntax),
    CFG against the empty prompt, seed + i for image i. Far faster than one request per prompt (evaluations)."""
    model = loaded.model
    cond = encode_prompts(model, loaded.tokenizers, prompts)
    uncond = encode_prompts(model, loaded.tokenizers, [""] * len(prompts))
    schedule = make_schedule(model)
    denoiser = guided(make_denoiser(model, schedule), {"context": cond["context"]}, {"context": uncond["context"]},
                      cfg_scale)
    side = model.config.default_size // model.config.vae.downsample
    noise, source = initial_noise([seed + i for i in range(len(prompts))], (model.config.unet.in_channels, side, side))
    return run_sampler(sampler, denoiser, noise.to(model.device), sigmas_for(schedule, scheduler, steps), source)


def _step_callback(callback: StepCallback, steps: int, switch=None) -> StepCallback:
    """Add the run's step count (and, across a refiner switch, which model denoised) to each step."""
    if switch is None or not hasattr(switch, "uses_base"):
        return lambda d: callback({**d, "steps": steps})
    return lambda d: callback({**d, "steps": steps, "model": "base" if switch.uses_base(d["sigma"]) else "refiner"})


def seed_noise(req, seeds: list[int], shape: tuple[int, ...], factor: int) -> tuple[torch.Tensor, NoiseSource]:
    """The seeds' unit noise (B, *shape), with A1111's variation seed and "resize seed from" when requested."""
    resize = (req.seed_resize_from_w, req.seed_resize_from_h)
    if req.subseed_strength <= 0 and not all(resize):
        return initial_noise(seeds, shape)
    from easel.pipelines.noise import variation_noise
    subseeds = [req.subseed + (s - req.seed) for s in seeds]  # variation seeds count up with the seeds (A1111)
    return variation_noise(seeds, shape, subseeds, req.subseed_strength, resize if all(resize) else None, factor)


def run_batches(req, make_batch: Callable[[int, list[int]], list]) -> list:
    """Call `make_batch(index, seeds)` for each of `req.n_iter` batches (seeds count up from `req.seed`, as A1111);
    a step callback raising Skipped drops that batch, Interrupted returns what is finished."""
    out = []
    for it in range(req.n_iter):
        seeds = [req.seed + it * req.batch_size + i for i in range(req.batch_size)]
        try:
            out.extend(make_batch(it, seeds))
        except Skipped:
            continue
        except Interrupted:
            break
    return out


def batch_callback(callback: StepCallback | None, it: int, n_iter: int, **tags) -> StepCallback | None:
    """Tag each step with the batch index (and e.g. the pass) so progress bars can span all batches."""
    if callback is None:
        return None
    return lambda d: callback({**d, "batch": it, "n_iter": n_iter, **tags})


@torch.no_grad()
def encode(model: StableDiffusion, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> diffusion latents (B, C, H/f, W/f): the VAE posterior mean, scaled and shifted."""
    vae_dtype = next(model.vae.parameters()).dtype
    return model.vae.encode_latents(from_pil(images).to(model.device, vae_dtype)).float()


@torch.no_grad()
def decode(model: StableDiffusion, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images through the VAE."""
    vae_dtype = next(model.vae.parameters()).dtype
    x = model.vae.decode_latents(latents.to(model.device, vae_dtype)).float()
    return to_pil(x)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
