"""Primitives every pipeline shares: the UNet as a denoiser, the noise schedule, seeded noise, the VAE between
pixels and latents, and the exceptions a step callback raises. Request-level orchestration (which sigmas, which
denoiser stack, which batches) is in `easel.pipelines.plan`."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import numpy as np
import torch
from PIL import Image

from easel.models.sd import StableDiffusion
from easel.samplers import SCHEDULES, DiscreteSchedule, EpsDenoiser, NoiseSource, VDenoiser, make_alphas_cumprod
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


def embedding_library(loaded):
    """The textual-inversion embeddings prompts can name (EmbeddingLibrary over the embedding folders), made
    once per loaded model so that the folders are not rescanned for every request."""
    library = getattr(loaded, "embeddings", None)
    if library is None:
        from easel.weights.embeddings import EmbeddingLibrary
        library = EmbeddingLibrary()
        loaded.embeddings = library
    return library


class NonFiniteOutput(ValueError):
    """The model produced NaN or infinite values: a broken checkpoint or LoRA, or a dtype overflow."""


# Polled between VAE tiles, so that a cancel reaches a long decode (set by Pipeline.generate for one request).
_SHOULD_STOP: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("should_stop", default=None)


@contextlib.contextmanager
def stop_check(should_stop: Callable[[], bool] | None):
    """Within the block, encode() and decode() raise Interrupted between VAE tiles once `should_stop()` is true."""
    token = _SHOULD_STOP.set(should_stop)
    try:
        yield
    finally:
        _SHOULD_STOP.reset(token)


def _on_tile() -> None:
    should_stop = _SHOULD_STOP.get()
    if should_stop is not None and should_stop():
        raise Interrupted("stopped during the VAE")


def _vae_dtype(model: StableDiffusion) -> torch.dtype:
    return next(model.vae.parameters()).dtype


@torch.no_grad()
def encode(model: StableDiffusion, images: list[Image.Image], tiled: bool | None = None) -> torch.Tensor:
    """PIL images -> diffusion latents (B, C, H/f, W/f): the VAE posterior mean, scaled and shifted; tiled when
    large (`tiled` None) or as forced."""
    x = from_pil(images).to(model.device, _vae_dtype(model))
    return model.vae.encode_latents(x, tiled=tiled, on_tile=_on_tile).float()


@torch.no_grad()
def decode(model: StableDiffusion, latents: torch.Tensor, tiled: bool | None = None) -> list[Image.Image]:
    """Latents -> PIL images through the VAE (tiled when large, or as forced); NaN/inf is an error, not black."""
    check_finite(latents, "the sampled latents")
    x = model.vae.decode_latents(latents.to(model.device, _vae_dtype(model)), tiled=tiled, on_tile=_on_tile).float()
    check_finite(x, "the decoded image")
    return to_pil(x)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise NonFiniteOutput naming `what` when x holds NaN or inf (they would silently become a black image)."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteOutput(
            f"{what} contain NaN or infinite values: the model or a LoRA has broken (NaN/inf) weights, or the "
            "dtype overflowed; try without the LoRA, with --dtype fp32, or check the checkpoint with `easel info`")


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
