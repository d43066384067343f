"""Loop settings, the error users can fix, and how command-line flags set a loop's settings.

Free of torch on purpose: `easel --help` builds every training flag from these without loading torch.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

LOOP_FLAGS = {  # flag (argparse dest) -> LoopConfig field
    "steps": "steps", "minutes": "minutes", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup",
    "ema_decay": "ema_decay", "ckpt_every": "ckpt_every", "seed": "seed", "resume": "resume", "bf16": "bf16",
}


class TrainingError(ValueError):
    """A problem a user can fix (bad flag, missing stage output); the CLI prints it as one line."""


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings shared by every loop (the CLI flags map onto these)."""

    steps: int = 1000
    minutes: float | None = None  # if set, the step budget is measured from the first steps' speed
    batch_size: int = 32  # global, over all ranks
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float | None = 0.995
    ckpt_every: int = 250
    log_every: int = 10
    seed: int = 0
    resume: bool = True
    bf16: bool = False
    progress: bool = True


def apply_loop_flags(cfg: LoopConfig, args: argparse.Namespace) -> LoopConfig:
    """`cfg` with the loop flags that were given (checked); --steps alone replaces a default time budget."""
    given = {f: getattr(args, flag) for flag, f in LOOP_FLAGS.items() if getattr(args, flag, None) is not None}
    if "steps" in given and "minutes" not in given:
        given["minutes"] = None
    cfg = dataclasses.replace(cfg, **given)
    if cfg.ema_decay == 0:
        cfg = dataclasses.replace(cfg, ema_decay=None)
    check_loop(cfg)
    return cfg


def check_loop(cfg: LoopConfig) -> None:
    """TrainingError naming the flag when a setting is out of range."""
    if cfg.minutes is None and cfg.steps < 1:
        raise TrainingError(f"--steps must be at least 1 (got {cfg.steps})")
    if cfg.minutes is not None and cfg.minutes <= 0:
        raise TrainingError(f"--minutes must be positive (got {cfg.minutes})")
    if cfg.batch_size < 1 or cfg.lr <= 0:
        raise TrainingError(f"--batch-size must be >= 1 and --lr > 0 (got {cfg.batch_size}, {cfg.lr})")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise TrainingError(f"--ema-decay must be in (0, 1), or 0 to disable (got {cfg.ema_decay})")
