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
from .sampling import SAMPLER_LABELS, SAMPLERS, ancestral_step
from .schedules import (
    SCHEDULE_LABELS,
    SCHEDULES,
    beta_ppf,
    get_sigmas,
    get_sigmas_exponential,
    get_sigmas_karras,
)

__all__ = [
    "CFGDenoiser", "Denoiser", "DiscreteSchedule", "EpsDenoiser", "VDenoiser", "append_dims", "make_alphas_cumprod",
    "NoiseSource", "default_noise", "SAMPLERS", "SAMPLER_LABELS", "ancestral_step", "resolve_sampler",
    "SCHEDULES", "SCHEDULE_LABELS", "beta_ppf", "get_sigmas", "get_sigmas_exponential", "get_sigmas_karras",
    "sample",
]


# Other spellings people type: ComfyUI names and A1111 API aliases (after dropping a "k_" prefix).
_SAMPLER_ALIASES = {
    "euler ancestral": "euler_a", "dpm 2 ancestral": "dpm_2_a", "dpm2 ancestral": "dpm_2_a",
    "dpmpp 2s ancestral": "dpmpp_2s_a", "uni pc bh2": "uni_pc", "unipc bh2": "uni_pc",
}
_SCHEDULE_ALIASES = {"ka": "karras", "ddim": "ddim_uniform", "automatic": "normal"}


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _lookup_tables() -> tuple[dict[str, str], dict[str, str]]:
    samplers = {_norm(k): k for k in SAMPLERS}
    samplers.update({_norm(v): k for k, v in SAMPLER_LABELS.items()})
    samplers.update(_SAMPLER_ALIASES)
    schedules = {_norm(k): k for k in SCHEDULES}
    schedules.update({_norm(v): k for k, v in SCHEDULE_LABELS.items()})
    schedules.update(_SCHEDULE_ALIASES)
    return samplers, schedules


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(sampler, schedule or None) for our names, A1111 labels, and combined labels like "DPM++ 2M Karras"."""
    samplers, schedules = _lookup_tables()
    key = _norm(name)
    key = key[2:] if key.startswith("k ") else key  # A1111 API aliases: k_euler_a, k_dpmpp_2m_ka
    if key in samplers:
        return samplers[key], None
    for suffix in sorted(schedules, key=len, reverse=True):  # longest first: "sgm uniform" before "uniform"
        head = key[: -len(suffix) - 1]
        if key.endswith(" " + suffix) and head in samplers:
            return samplers[head], schedules[suffix]
    raise ValueError(
        f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)} or an A1111 label such as "
        f"{', '.join(repr(v) for v in SAMPLER_LABELS.values())}, optionally followed by a schedule "
        f"({', '.join(SCHEDULE_LABELS.values())})"
    )


def sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler", **kw) -> torch.Tensor:
    """Run the named sampler from x (already at noise level sigmas[0]) down the given sigmas."""
    name, schedule = resolve_sampler(sampler)
    if schedule is not None:
        raise ValueError(
            f"sampler {sampler!r} names a schedule ({schedule}) but sample() takes ready-made sigmas: "
            f"compute them with get_sigmas(schedule, steps, {schedule!r}) and pass sampler={name!r}"
        )
    return SAMPLERS[name](denoiser, x, sigmas, **kw)
