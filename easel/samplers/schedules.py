"""Noise schedules: which sigmas a sampler visits. Each returns a descending (steps+1,) tensor ending in 0.

Names follow what users know from k-diffusion, A1111 and ComfyUI. `normal`, `simple`, `ddim_uniform`,
`sgm_uniform` and `beta` pick among the model's own trained noise levels; `karras` and `exponential`
space sigmas by formula between the model's smallest and largest.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .denoisers import DiscreteSchedule

__all__ = [
    "SCHEDULES",
    "SCHEDULE_LABELS",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "beta_ppf",
    "regularized_incomplete_beta",
]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5): n sigmas evenly spaced in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def normal(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 down to 0 (k-diffusion `get_sigmas`, A1111 "Automatic")."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps)
    return _append_zero(schedule.t_to_sigma(t))


def karras(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Karras spacing (rho = 7) between the model's sigma_min and sigma_max."""
    return get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max)


def exponential(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Log-linear spacing between the model's sigma_min and sigma_max."""
    return get_sigmas_exponential(steps, schedule.sigma_min, schedule.sigma_max)


def sgm_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """steps+1 evenly spaced timesteps from T-1 to 0 without the last one (ComfyUI; suits LCM/turbo)."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def simple(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Every (T/steps)-th trained sigma counted down from the largest (ComfyUI "simple")."""
    stride = schedule.num_timesteps / steps
    idx = [schedule.num_timesteps - 1 - int(i * stride) for i in range(steps)]
    return _append_zero(schedule.sigmas[idx])


def ddim_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Trained sigmas at t = 1, 1+k, 1+2k, ... (k = T // steps), reversed (ComfyUI "ddim_uniform").

    When `steps` does not divide T the walk can yield one more sigma than `steps`, as in ComfyUI.
    """
    stride = max(schedule.num_timesteps // steps, 1)
    idx = list(range(1, schedule.num_timesteps, stride))[::-1]
    return _append_zero(schedule.sigmas[idx])


def beta(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(alpha, beta) quantiles, dense at both ends (Lee et al. 2024, arXiv:2407.12173).

    As in ComfyUI, timesteps that round to the same integer are visited once, so very high step
    counts can give fewer than `steps` sigmas.
    """
    last = schedule.num_timesteps - 1
    idx: list[int] = []
    for i in range(steps):
        t = round(beta_ppf(1 - i / steps, alpha, beta_) * last)
        if not idx or idx[-1] != t:
            idx.append(t)
    return _append_zero(schedule.sigmas[idx])


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) CDF, by its continued fraction (DLMF 8.17.22) with Lentz's method."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # the fraction converges fast only below the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) above it
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a / _beta_continued_fraction(x, a, b)


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The fraction 1 + d1/(1 + d2/(1 + ...)) of the incomplete beta, by the modified Lentz method."""
    tiny = 1e-300  # stands in for a zero denominator, as Lentz's method prescribes
    value, c, d = 1.0, 1.0, 0.0
    for j in range(1, 500):
        m = j // 2
        if j % 2:  # d_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile (inverse CDF) of the Beta(a, b) distribution, by bisection on the CDF."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
}

# The display names A1111 users see in the "Schedule type" menu ("Automatic" is the model's default).
SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}
