"""Feature caching between steps (DeepCache, Ma et al. 2023).

The deep part of the UNet (everything below the shallowest skip branch) changes slowly from one step to the next.
Every N-th UNet call runs the whole network and keeps the features that enter the last output block(s) from below;
the calls in between run only the shallow input block(s) and the last output block(s), reusing those features. At
branch 1 (the default) a cached call runs the input convolution, the first input block and the last two output
blocks, all at full resolution; branch 0 (the input convolution and the last output block only) is cheaper, but on the
built-in model it lost three times as much of the `easel eval` score at the same interval (README "Lossy
accelerations").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BRANCH = 1  # the skip branch the cache sits on (0: the shallowest, cheapest and coarsest)


@dataclass
class _State:
    key: tuple  # (shape, device, dtype) of the call that filled the cache: a different batch must run in full
    deep: torch.Tensor
    calls: int  # UNet calls since the cache was filled, that one included


class FeatureCache:
    """A `FORWARD_ROUTE` for one sampling run: every `interval`-th call of each UNet in full, the others cached."""

    def __init__(self, interval: int, branch: int = DEFAULT_BRANCH):
        if interval < 1:
            raise ValueError(f"deepcache interval must be >= 1 (got {interval})")
        self.interval, self.branch = interval, branch
        self.states: dict[int, _State] = {}  # id(unet) -> its cache (a refiner switch brings a second UNet)
        self.full_calls = self.cached_calls = 0  # what ran (tests and benchmarks read these)

    def __call__(self, unet, x, timesteps, context, y, control) -> torch.Tensor:
        """The UNet's output for this call: in full (and re-cached) or from the cached deep features."""
        key = (tuple(x.shape), x.device, unet.dtype)
        state = self.states.get(id(unet))
        if state is None or state.key != key or state.calls % self.interval == 0:
            # A changed batch (guidance truncation halves it) cannot reuse features of other rows: refill.
            out, deep = unet.forward_split(x, timesteps, context, y, control, branch=self.branch)
            self.states[id(unet)] = _State(key, deep, 1)
            self.full_calls += 1
            return out
        out, _ = unet.forward_split(x, timesteps, context, y, control, branch=self.branch, deep=state.deep)
        state.calls += 1
        self.cached_calls += 1
        return out
