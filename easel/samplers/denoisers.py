"""Denoisers: wrap a network trained on discrete timesteps as `denoiser(x, sigma) -> x0` (k-diffusion style).

Samplers integrate in "sigma space": x = x0 + sigma * noise (the variance-exploding view, Karras et
al. 2022). A Stable Diffusion UNet was trained in the variance-preserving view at integer timesteps t,
x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) noise; the two are the same point up to scale, with
sigma = sqrt((1 - a_t) / a_t) and x_vp = x / sqrt(sigma^2 + 1). The wrappers here do that conversion.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "Denoiser",
    "make_alphas_cumprod",
    "DiscreteSchedule",
    "EpsDenoiser",
    "VDenoiser",
    "CFGDenoiser",
    "append_dims",
]

# denoiser(x, sigma, **extra) -> x0, with sigma a (B,) float tensor
Denoiser = Callable[..., torch.Tensor]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) with `ndim` dimensions, for broadcasting over images."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """Cumulative products of (1 - beta_t) for the DDPM training schedule (SD uses scaled_linear)."""
    if beta_schedule == "scaled_linear":
        # linear in sqrt(beta): the schedule of the original latent-diffusion configs
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteSchedule:
    """The noise levels of a model trained on discrete timesteps, and the map between t and sigma."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if a.ndim != 1 or len(a) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of timesteps, got shape {tuple(a.shape)}")
        self.alphas_cumprod = a
        self.sigmas = ((1 - a) / a).sqrt().float()  # ascending in t
        self.log_sigmas = self.sigmas.log()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        """Number of training timesteps (1000 for SD)."""
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        """Smallest trained noise level (t = 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest trained noise level (t = T - 1)."""
        return float(self.sigmas[-1])

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        # cached per device: samplers call this every step and the table never changes
        if device not in self._on_device:
            self._on_device[device] = self.log_sigmas.to(device)
        return self._on_device[device]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Fractional timestep of each sigma, interpolating linearly in log-sigma (as k-diffusion)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]  # (T, N)
        if quantize:
            return dists.abs().argmin(dim=0).reshape(sigma.shape).float()
        # index of the last table entry at or below sigma, kept one short of the end to have a neighbour
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep, interpolating linearly in log-sigma."""
        t = torch.as_tensor(t, dtype=torch.float32).float()
        log_sigmas = self._log_sigmas_on(t.device)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def _batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 (B,) tensor on x's device; accepts a Python float or a 0-d tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.float()


class _DiscreteDenoiser(nn.Module):
    """Common part of the eps- and v-prediction wrappers: input scaling and the timestep lookup."""

    def __init__(self, model: nn.Module, schedule: DiscreteSchedule | None = None, quantize: bool = False):
        super().__init__()
        self.model = model
        self.schedule = schedule if schedule is not None else DiscreteSchedule(make_alphas_cumprod())
        self.quantize = quantize

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """Network output for x at noise level sigma (B,), in the network's own parameterisation."""
        c_in = append_dims((sigma**2 + 1).rsqrt(), x.ndim)  # x_vp = x / sqrt(sigma^2 + 1)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        return self.model(x * c_in.to(x.dtype), t, **cond)

    @staticmethod
    def _weight(sigma: torch.Tensor, min_snr_gamma: float | None, v: bool) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023); SNR = 1 / sigma^2 in sigma space."""
        if min_snr_gamma is None:
            return torch.ones_like(sigma)
        snr = sigma.float() ** -2
        clipped = snr.clamp(max=min_snr_gamma)
        # v-MSE already equals (snr + 1) * x0-MSE, eps-MSE equals snr * x0-MSE
        return clipped / (snr + 1) if v else clipped / snr

    def _mse(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, reduce: bool) -> torch.Tensor:
        per_item = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1) * weight  # (B,)
        return per_item.mean() if reduce else per_item


class EpsDenoiser(_DiscreteDenoiser):
    """Wraps `model(x_vp, t, **cond) -> eps` (SD 1.x, SDXL) as a denoiser returning x0."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x0 = x - sigma * eps."""
        sigma = _batch_sigma(sigma, x)
        eps = self._run(x, sigma, cond)
        return x - append_dims(sigma, x.ndim).to(x.dtype) * eps

    def loss(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        *,
        min_snr_gamma: float | None = None,
        reduce: bool = True,
        **cond,
    ) -> torch.Tensor:
        """Eps-prediction MSE at noise level sigma (B,); a scalar, or per-image (B,) when reduce=False."""
        sigma = _batch_sigma(sigma, x0)
        noised = x0 + noise * append_dims(sigma, x0.ndim).to(x0.dtype)
        eps = self._run(noised, sigma, cond)
        return self._mse(eps, noise, self._weight(sigma, min_snr_gamma, v=False), reduce)


class VDenoiser(_DiscreteDenoiser):
    """Wraps `model(x_vp, t, **cond) -> v` (SD 2.x 768-v) as a denoiser returning x0."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x0 = c_skip * x + c_out * v, with c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)."""
        sigma = _batch_sigma(sigma, x)
        v = self._run(x, sigma, cond)
        s = append_dims(sigma, x.ndim)
        c_skip, c_out = 1 / (s**2 + 1), -s * (s**2 + 1).rsqrt()
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * v

    def loss(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        *,
        min_snr_gamma: float | None = None,
        reduce: bool = True,
        **cond,
    ) -> torch.Tensor:
        """V-prediction MSE (v = sqrt(a) eps - sqrt(1-a) x0, Salimans & Ho 2022) at noise level sigma."""
        sigma = _batch_sigma(sigma, x0)
        s = append_dims(sigma, x0.ndim).to(x0.dtype)
        v_target = (noise - s * x0) * (s**2 + 1).rsqrt()
        v = self._run(x0 + noise * s, sigma, cond)
        return self._mse(v, v_target, self._weight(sigma, min_snr_gamma, v=True), reduce)


def _concat_cond(uncond: dict, cond: dict, batch: int) -> dict:
    """Join uncond and cond inputs along the batch, uncond first; non-tensors must agree."""
    if uncond.keys() != cond.keys():
        raise ValueError(
            f"cond and uncond must have the same keys for guidance, got {sorted(cond)} and {sorted(uncond)}: "
            "encode the negative prompt the same way as the prompt"
        )
    out = {}
    for key in cond:
        u, c = uncond[key], cond[key]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            # a single conditioning row serves every image of the batch
            u = u.expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u
            c = c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 else c
            out[key] = torch.cat([u, c])
        elif u is None and c is None:
            out[key] = None
        else:
            raise ValueError(f"cond[{key!r}] cannot be batched for guidance: give a tensor in both cond and uncond")
    return out


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond), in one batched call."""

    def __init__(self, denoiser: Denoiser, cond: dict, uncond: dict | None, scale: float):
        super().__init__()
        self.inner = denoiser
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)
        if uncond is None and not math.isclose(self.scale, 1.0):
            raise ValueError(f"guidance scale {scale} needs an uncond (negative prompt) conditioning")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **extra) -> torch.Tensor:
        """Guided x0 for x at noise level sigma (B,); `extra` goes unchanged to the inner denoiser."""
        sigma = _batch_sigma(sigma, x)
        if math.isclose(self.scale, 1.0):
            # guidance at scale 1 is the cond prediction itself: skip the uncond half of the work
            return self.inner(x, sigma, **self.cond, **extra)
        both = _concat_cond(self.uncond, self.cond, x.shape[0])
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **extra)  # (2B, ...)
        uncond_x0, cond_x0 = out.chunk(2)
        return uncond_x0 + self.scale * (cond_x0 - uncond_x0)
