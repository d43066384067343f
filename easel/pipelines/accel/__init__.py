"""Opt-in lossy accelerations (issue 11): each trades a little image quality for speed, and is off by default.

- feature caching between steps (`deepcache.py`, DeepCache, Ma et al. 2023): `deepcache=N`
- guidance truncation (`cfg_cutoff.py`): `cfg_cutoff=F`, the unconditional pass dropped after a fraction F of the steps
- token merging (`tome.py`, ToMe for SD, Bolya & Hoffman 2023): `tome=R`
- int8 dynamic quantization of the UNet's linear layers (`int8.py`): measured in `bench/accel.py`, see the README

`check(deepcache, cfg_cutoff, tome)` validates a request's values; `unet_wrapper(req)` is the `wrap_unet` that
`plan.guided_denoiser` adds when feature caching or token merging is on (None when both are off, so that the exact
path stays exactly as it was).
"""
from __future__ import annotations

from collections.abc import Callable

DEEPCACHE_OFF, CFG_CUTOFF_OFF, TOME_OFF = 1, 1.0, 0.0


def check(deepcache, cfg_cutoff, tome) -> None:
    """Raise ValueError naming the field, the allowed range and what the value does when one is out of range."""
    if isinstance(deepcache, bool) or not isinstance(deepcache, int) or deepcache < 1:
        raise ValueError(f"deepcache must be a whole number >= 1 (got {deepcache!r}): 1 is off, N > 1 runs the full "
                         "UNet every N-th call and reuses its deep features in between (try 3)")
    if isinstance(cfg_cutoff, bool) or not isinstance(cfg_cutoff, (int, float)) or not 0.0 <= cfg_cutoff <= 1.0:
        raise ValueError(f"cfg_cutoff must be between 0 and 1 (got {cfg_cutoff!r}): the fraction of the steps that "
                         "keep the negative-prompt pass (1 is off; try 0.6)")
    if isinstance(tome, bool) or not isinstance(tome, (int, float)) or not 0.0 <= tome < 1.0:
        raise ValueError(f"tome must be at least 0 and below 1 (got {tome!r}): the fraction of self-attention tokens "
                         "merged at the highest resolution (0 is off; try 0.5)")


def is_on(req) -> bool:
    """Whether the request asks for any of the lossy accelerations."""
    return req.deepcache != DEEPCACHE_OFF or req.cfg_cutoff != CFG_CUTOFF_OFF or req.tome != TOME_OFF


def unet_wrapper(req) -> Callable | None:
    """`wrap_unet(unet_fn) -> unet_fn` applying the request's feature caching and token merging to every UNet call
    of one sampling run, or None when both are off."""
    if req.deepcache == DEEPCACHE_OFF and req.tome == TOME_OFF:
        return None
    from easel.pipelines.accel.wrapper import AccelUNet
    return lambda fn: AccelUNet(fn, deepcache=req.deepcache, tome=req.tome)


def params(req) -> dict:
    """The image parameters of the accelerations in use (none when all are off)."""
    used = {"deepcache": (req.deepcache, DEEPCACHE_OFF), "cfg_cutoff": (req.cfg_cutoff, CFG_CUTOFF_OFF),
            "tome": (req.tome, TOME_OFF)}
    return {name: value for name, (value, off) in used.items() if value != off}
