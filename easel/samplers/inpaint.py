"""Inpainting as wrappers around the same samplers: no sampler knows about masks.

- `InpaintBlend` (ordinary 4-channel models; ComfyUI's KSamplerX0Inpaint): at every denoiser call the
  known region of x is replaced by the original latent noised to the current sigma, and the known region
  of the returned x0 by the original latent, so the sampler only ever moves the masked region.
- `ConcatInpaint` (9-channel inpainting UNets, e.g. sd-v1-5-inpainting): the mask and the latent of the
  masked image are concatenated to the UNet's input channels at every call, so the network itself sees
  what to keep ("hybrid" conditioning in the CompVis configs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .denoisers import append_dims

__all__ = ["ConcatInpaint", "InpaintBlend"]


class InpaintBlend:
    """denoiser(x, sigma) -> x0 that keeps the unmasked region (mask 0) pinned to `init_latent`.

    `latent_mask` (1 or B, 1, h, w) is 1 where the image is repainted; `noise` (B, C, h, w) is the unit
    noise the run started from, so the known region follows the same noise path as a plain img2img run.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], init_latent: torch.Tensor, latent_mask: torch.Tensor,
                 noise: torch.Tensor):
        if latent_mask.shape[-2:] != init_latent.shape[-2:]:
            raise ValueError(f"latent mask {tuple(latent_mask.shape[-2:])} and init latent "
                             f"{tuple(init_latent.shape[-2:])} must cover the same latent grid")
        self.inner, self.init_latent, self.noise = denoiser, init_latent, noise
        self.mask = latent_mask.to(init_latent.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        """Blend x's known region with the noised original, denoise, and put the original back into x0."""
        m = self.mask.to(x.device)
        known = self.init_latent.to(x.device) + self.noise.to(x.device) * append_dims(sigma.to(x.dtype), x.ndim)
        x = x * m + known * (1 - m)
        x0 = self.inner(x, sigma, **extra)
        return x0 * m + self.init_latent.to(x.device) * (1 - m)


class ConcatInpaint:
    """The network of a 9-channel inpainting model as `model(x, t, **cond)` over 4-channel x.

    Wraps the network (what the eps/v denoiser calls with the already input-scaled x), not the k-diffusion
    denoiser: the mask and the masked-image latent are conditioning, never scaled by sigma. `c_concat`
    (B, 5, h, w) is mask (1 channel) then masked-image latent (4); a batch that CFG doubled (uncond, cond)
    gets it repeated in the same order.
    """

    def __init__(self, model: Callable[..., torch.Tensor], c_concat: torch.Tensor):
        self.model, self.c_concat = model, c_concat

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """model(cat([x, mask, masked-image latent], channels), t, **cond)."""
        c = self.c_concat.to(x.device, x.dtype)
        if x.shape[0] % c.shape[0] or x.shape[-2:] != c.shape[-2:]:
            raise ValueError(f"inpainting conditioning {tuple(c.shape)} does not fit latents {tuple(x.shape)}: "
                             "build it from the same image size and batch")
        c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)  # (B', 5, h, w), CFG batch included
        return self.model(torch.cat([x, c], dim=1), t, **cond)  # (B', 4 + 5, h, w) in
