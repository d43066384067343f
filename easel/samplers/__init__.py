"""Samplers, noise schedules and denoiser wrappers in the k-diffusion style.

    denoiser = CFGDenoiser(EpsDenoiser(unet), cond, uncond, scale=7.5)
    sigmas = get_sigmas(denoiser.inner.schedule, 20, "karras")
    noise = NoiseSource.from_seed([42])
    x0 = sample(denoiser, noise(latent) * sigmas[0], sigmas, "dpmpp_2m", noise=noise)
"""
from __future__ import annotations

import torch

from .denoisers import (
    CFGDenoiser,
    Denoiser,
    DiscreteSchedule,
    EpsDenoiser,
    VDenoiser,
    append_dims,
    make_alphas_cumprod,
)
from .noise import NoiseSource, default_noise
from .names import resolve_sampler, resolve_scheduler
from .sampling import SAMPLER_LABELS, SAMPLERS, ancestral_step
from .schedules import (
    SCHEDULE_LABELS,
    SCHEDULES,
    beta_ppf,
    get_sigmas_exponential,
    get_sigmas_karras,
)

__all__ = [
    "CFGDenoiser", "Denoiser", "DiscreteSchedule", "EpsDenoiser", "VDenoiser", "append_dims", "make_alphas_cumprod",
    "NoiseSource", "default_noise", "SAMPLERS", "SAMPLER_LABELS", "ancestral_step",
    "resolve_sampler", "resolve_scheduler",
    "SCHEDULES", "SCHEDULE_LABELS", "beta_ppf", "get_sigmas", "get_sigmas_exponential", "get_sigmas_karras",
    "sample",
]


def get_sigmas(schedule: DiscreteSchedule, steps: int, name: str = "normal") -> torch.Tensor:
    """Sigmas for `steps` sampling steps under a schedule named as users name it ("karras", "Karras", ...)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return SCHEDULES[resolve_scheduler(name)](schedule, steps)


def sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler", **kw) -> torch.Tensor:
    """Run the named sampler from x (already at noise level sigmas[0]) down the given sigmas."""
    name, schedule = resolve_sampler(sampler)
    if schedule is not None:
        raise ValueError(
            f"sampler {sampler!r} names a schedule ({schedule}) but sample() takes ready-made sigmas: "
            f"compute them with get_sigmas(schedule, steps, {schedule!r}) and pass sampler={name!r}"
        )
    return SAMPLERS[name](denoiser, x, sigmas, **kw)
