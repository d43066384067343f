"""One request schema for every way in: CLI flags, Python keyword arguments, HTTP bodies, the web UI."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    """Everything that decides a generated image (given the model)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None  # None: the model's default size
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    seed: int = -1  # -1: a random seed, reported back in the image's parameters
    batch_size: int | None = None  # None: the model's default batch
    n_iter: int = 1  # number of batches
    clip_skip: int = 1
    eta: float | None = None  # noise multiplier of ancestral / SDE samplers (None: sampler default)
    dtype: str = "fp32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # mode-specific options (img2img, hires, ...)

    def resolved(self, default_size: int, default_batch: int) -> "GenerationRequest":
        """A copy with every default filled in and every value checked (raises ValueError naming the field)."""
        pick = lambda v, d: d if v is None else v  # noqa: E731  (0 is a value to reject, not "unset")
        r = dataclasses.replace(self, width=pick(self.width, default_size), height=pick(self.height, default_size),
                                batch_size=pick(self.batch_size, default_batch))
        if r.seed is None or r.seed < 0:
            r.seed = random.randrange(2**32)
        r.check()
        return r

    def check(self) -> None:
        """Validate ranges; errors say which field and what is allowed."""
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (got {v}); try {max(8, round(v / 8) * 8)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.n_iter < 1:
            raise ValueError(f"number of batches must be at least 1 (got {self.n_iter})")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be 1 or more (got {self.clip_skip})")
        if self.seed is not None and self.seed >= 2**63:
            raise ValueError("seed must be below 2**63")
        from easel.samplers import SCHEDULES, resolve_sampler
        _, schedule = resolve_sampler(self.sampler)  # raises, listing the valid names
        if (schedule or self.scheduler) not in SCHEDULES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "GenerationRequest":
        """Build from a dict, rejecting unknown fields by name."""
        names = {f.name for f in dataclasses.fields(GenerationRequest)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
        return GenerationRequest(**d)
