"""The network call with feature caching and token merging: one `AccelUNet` per sampling run (per denoiser)."""
from __future__ import annotations

import contextlib

import torch

from easel.models.unet import FORWARD_ROUTE, UNetModel
from easel.pipelines.accel import tome as tome_lib
from easel.pipelines.accel.deepcache import DEFAULT_BRANCH, FeatureCache


class AccelUNet:
    """A `wrap_unet` network call (x, t, **cond) -> output with DeepCache (`deepcache` > 1) and ToMe (`tome` > 0)."""

    def __init__(self, model, deepcache: int = 1, tome: float = 0.0, branch: int = DEFAULT_BRANCH):
        # Kept as `.model`: control.hook_unet walks `.model` down to the UNetFn and puts ControlNet's call there,
        # so ControlNet residuals still reach the UNet through this wrapper.
        self.model = model
        _check_eager(find_unet(model))
        self.cache = FeatureCache(deepcache, branch) if deepcache > 1 else None
        self.tome = float(tome)
        self.generator = torch.Generator().manual_seed(tome_lib.TOME_SEED) if self.tome > 0 else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if self.cache is not None:
                token = FORWARD_ROUTE.set(self.cache)
                stack.callback(FORWARD_ROUTE.reset, token)
            if self.tome > 0:
                stack.enter_context(tome_lib.merging(find_unet(self.model), self.tome, tuple(x.shape[-2:]),
                                                     self.generator))
            return self.model(x, t, **cond)


def find_unet(fn) -> UNetModel:
    """The UNetModel a network call runs (UNetFn.unet, or under ControlNet's ControlledUNet.fn)."""
    seen = 0
    while not isinstance(fn, UNetModel):
        nxt = next((getattr(fn, a) for a in ("unet", "fn", "model") if hasattr(fn, a)), None)
        if nxt is None or seen > 8:
            raise TypeError(f"token merging found no UNet under {type(fn).__name__}")
        fn, seen = nxt, seen + 1
    return fn


def _check_eager(unet: UNetModel) -> None:
    """Feature caching and token merging change what the UNet runs per call; a compiled UNet's graph is fixed."""
    from easel.pipelines.compile import CompiledForward
    if isinstance(unet.__dict__.get("forward"), CompiledForward):
        raise ValueError("deepcache and tome need the eager UNet, and this one is compiled (--compile): leave out "
                         "--compile, or the accelerations (cfg_cutoff works with both)")
