"""SDXL refiner: loading it, and the base -> refiner switch part-way through one sampling run.

The refiner (SGM `sd_xl_refiner.yaml`, Podell et al. 2023, "SDXL", sec. 2.5) is a second UNet trained on
the low-noise end of the schedule. It reads only OpenCLIP bigG (penultimate layer, 1280 wide) and a vector
`y` of pooled text followed by sinusoidal embeddings of the original size, the crop corner and an
aesthetic score (6.0 for the prompt, 2.5 for the negative prompt by default) where the base has the
target size (`easel.pipelines.conditioning.refiner_vector`).

A1111's refiner switch: the base model denoises the first k = round(steps * refiner_switch_at) steps
(sigmas[:k+1]), then the refiner, which re-encodes the prompt with its own encoder, denoises the rest
(sigmas[k:]) inside the same sampler run: same sigmas, sampler history and per-image noise generators,
continued. The two models share SDXL's latent space, so nothing is decoded in between. The plan
(`easel.pipelines.plan`) puts a SwitchDenoiser at the top of its denoiser stack for this.
"""
from __future__ import annotations

import math

import torch

from easel.models.sd import StableDiffusion
from easel.pipelines.request import GenerationRequest
from easel.weights.model_io import LoadedModel


def switch_step(steps: int, switch_at: float) -> int:
    """k = round(steps * switch_at) (halves round up), the number of steps the base model runs, in [0, steps]."""
    return min(max(math.floor(steps * switch_at + 0.5), 0), steps)


def refiner_runs(req: GenerationRequest, steps: int, refiner: LoadedModel | None) -> bool:
    """Whether a run of `steps` steps reaches the refiner (so its VAE decodes, and a hires pass uses it)."""
    return refiner is not None and switch_step(steps, req.refiner_switch_at) < steps


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


def load_refiner(spec: str, dtype: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load a refiner checkpoint by path or model name (see `easel models`)."""
    from easel.weights.model_io import load_model
    from easel.weights.registry import resolve_model
    return load_model(resolve_model(spec), dtype, device)


def refiner_for(req: GenerationRequest, refiner: LoadedModel | None) -> LoadedModel | None:
    """The refiner a request uses: None without `refiner_checkpoint`, else the given one or a fresh load."""
    if not req.refiner_checkpoint:
        return None
    return refiner if refiner is not None else load_refiner(req.refiner_checkpoint, req.dtype, req.device)
