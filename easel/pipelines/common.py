"""Helpers every pipeline shares: prompt encoding, noise, the guided denoiser, sampling, decoding."""
from __future__ import annotations

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


def encode_prompts(model: StableDiffusion, tokenizers: list[CLIPTokenizer], prompts: list[str],
                   clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Prompts -> the UNet's conditioning {'context': (B, 77, D), 'y': (B, adm) for SDXL}."""
    ids = [tok(prompts, max_length=enc.max_position_embeddings, pad_id=enc.pad_token_id)
           for tok, enc in zip(tokenizers, model.config.text_encoders)]
    context, pooled = model.encode_text(ids, clip_skip=clip_skip)
    return {"context": context.to(model.dtype), "pooled": pooled}


def unet_conditioning(model: StableDiffusion, text: dict[str, torch.Tensor], width: int, height: int) -> dict:
    """Add SDXL's `y` (pooled text + size/crop embeddings) to the text conditioning."""
    cond = {"context": text["context"]}
    if model.config.unet.adm_in_channels:
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


def make_denoiser(model: StableDiffusion, schedule: DiscreteSchedule):
    """eps or v parameterisation wrapper around the UNet (k-diffusion's external.py)."""
    wrapper = VDenoiser if model.config.prediction == "v" else EpsDenoiser
    return wrapper(UNetFn(model), schedule)


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
