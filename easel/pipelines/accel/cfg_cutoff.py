"""Guidance truncation: drop the unconditional (negative prompt) pass for the last steps.

Classifier-free guidance runs the UNet on [negative prompt, prompt] at every step. Late steps mostly refine detail,
and the guided and unguided predictions there differ little, so after a fraction F of the steps only the prompt's
pass runs: half the UNet batch. With AND prompts the first part stands in for the missing negative (A1111's
"negative guidance minimum sigma" does the same).
"""
from __future__ import annotations

import math

import torch

from easel.pipelines.conditioning import GuidedDenoiser


def guided_steps(steps: int, cutoff: float) -> int:
    """How many of `steps` keep full guidance: the first ceil(F * steps) (1e-9 absorbs 0.6 * 10 = 6.000...01)."""
    return min(steps, max(0, math.ceil(cutoff * steps - 1e-9)))


class CutoffGuidedDenoiser(GuidedDenoiser):
    """GuidedDenoiser whose steps from `guided_steps(steps, cutoff)` on run the prompt's pass only."""

    def __init__(self, denoiser, cond, uncond, scale: float, sigmas: torch.Tensor, cutoff: float):
        super().__init__(denoiser, cond, uncond, scale, sigmas)
        self.cutoff = float(cutoff)
        self.first_unguided = guided_steps(len(self.sigmas) - 1, self.cutoff)

    def model_call(self, x: torch.Tensor, sigma: torch.Tensor):
        """As GuidedDenoiser.model_call before the cutoff; after it, the prompt's parts only."""
        step = self.step_of(float(sigma.reshape(-1)[0]))
        if step < self.first_unguided:
            return super().model_call(x, sigma)
        parts = self.cond.at_step(step)
        k = len(parts)

        def finish(out: torch.Tensor) -> torch.Tensor:
            outs = out.chunk(k)
            denoised = outs[0]  # the first part stands in for the negative prompt
            for (_, w), c in zip(parts[1:], outs[1:]):
                denoised = denoised + (self.scale * w) * (c - outs[0])
            return denoised
        cond = self._batched([c for c, _ in parts], x.shape[0], with_uncond=False)
        return torch.cat([x] * k), torch.cat([sigma] * k), cond, finish
