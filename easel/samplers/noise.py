"""Seeded noise for samplers: one CPU generator per image, so a seed means the same image anywhere."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NoiseSource", "default_noise"]


class NoiseSource:
    """Draws standard normal noise per batch item from that item's own CPU generator.

    Drawing on the CPU and moving the result afterwards makes the numbers independent of the
    device (CUDA, MPS and CPU generators produce different streams for the same seed), and drawing
    per item makes an image's noise independent of the other images in its batch.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        generators = list(generators)
        if not generators:
            raise ValueError("NoiseSource needs at least one generator (one per image in the batch)")
        for g in generators:
            if not isinstance(g, torch.Generator) or g.device.type != "cpu":
                raise ValueError(
                    f"NoiseSource needs CPU torch.Generator objects, got {g!r}: "
                    "create them with torch.Generator('cpu').manual_seed(seed)"
                )
        self.generators = generators

    @classmethod
    def from_seed(cls, seeds: Sequence[int]) -> "NoiseSource":
        """One freshly seeded CPU generator per seed (per image)."""
        return cls([torch.Generator("cpu").manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped like `like` (batch first), on its device and dtype."""
        if like.shape[0] != len(self.generators):
            raise ValueError(
                f"noise for a batch of {like.shape[0]} was requested from a NoiseSource with "
                f"{len(self.generators)} generators: build it with one seed per image"
            )
        # float32 on the CPU whatever the target dtype, so fp16 runs see the same numbers rounded
        draws = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)  # (B, ...)


def default_noise(batch_size: int) -> NoiseSource:
    """A NoiseSource seeded from torch's global generator (so `torch.manual_seed` still governs it)."""
    seeds = torch.randint(0, 2**62, (batch_size,), dtype=torch.int64).tolist()
    return NoiseSource.from_seed(seeds)
