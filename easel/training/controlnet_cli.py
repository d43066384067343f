"""`easel train controlnet`: its flags and defaults (the run they start: easel.training.controlnet_train).

Free of torch at import, like easel.training.cli: building the command-line parser loads no training code.
"""
from __future__ import annotations

import argparse
import dataclasses

from easel.training.settings import LoopConfig, TrainingError, apply_loop_flags

DEFAULT_LOOP = LoopConfig(steps=3000, batch_size=32, lr=3e-4, warmup=100, ema_decay=0.995, ckpt_every=100)
DEFAULT_OUT = "runs/shapeworld-layout"
DEFAULT_SCENES = 30000


def add_controlnet_parser(sub, common) -> argparse.ArgumentParser:
    """Register `train controlnet` on the `train` sub-parsers (`common` adds --out, --threads, --device, ...)."""
    p = sub.add_parser("controlnet", help="a layout ControlNet for a ShapeWorld model: white blobs on black say "
                                          "where objects go (the built-in shapeworld-layout)")
    common(p)
    p.set_defaults(out=DEFAULT_OUT)
    p.add_argument("--model", help="the ShapeWorld model it controls (default: the built-in model)")
    p.add_argument("--scenes", type=int, default=DEFAULT_SCENES,
                   help=f"training scenes rendered and encoded once (default {DEFAULT_SCENES})")
    p.add_argument("--relation-share", type=float, default=0.4,
                   help="share of two-object relation scenes (default 0.4: positions are what it is for)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_LOOP.steps})")
    p.add_argument("--minutes", type=float, help="time budget instead of --steps")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {DEFAULT_LOOP.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULT_LOOP.lr:g})")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--ema-decay", type=float, help=f"largest EMA decay (default {DEFAULT_LOOP.ema_decay}; 0: off)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, help="seed of data order, noise, sketch jitter")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from <out>/checkpoint.pt if there is one (default: yes)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of empty captions, so guidance still works (default 0.1)")
    p.add_argument("--name", default="shapeworld-layout", help="file name of the result (default shapeworld-layout)")
    return p


def loop_from_args(args: argparse.Namespace) -> LoopConfig:
    """The ControlNet loop: the defaults above with the flags that were given (checked)."""
    loop = dataclasses.replace(DEFAULT_LOOP, progress=args.progress)
    loop = apply_loop_flags(loop, args)
    if args.scenes < loop.batch_size:
        raise TrainingError(f"--scenes {args.scenes} is smaller than the batch ({loop.batch_size})")
    if not 0 <= args.relation_share <= 1 or not 0 <= args.caption_dropout < 1:
        raise TrainingError("--relation-share must be in [0, 1] and --caption-dropout in [0, 1)")
    return loop
