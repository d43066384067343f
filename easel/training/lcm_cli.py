"""`easel train lcm-lora`: its flags and the defaults they show (the run they start: easel.training.lcm.run_from_args).

Free of torch at import, like easel.training.cli: building the command-line parser loads no training code. Imports
point one way: easel.training.lcm reads this module, never the reverse.
"""
from __future__ import annotations

import argparse
import dataclasses

from easel.training.settings import LoopConfig, TrainingError, apply_loop_flags

# LoRA targets, as regexes over UNet module paths. "all" is LCM-LoRA's list (attention, feed-forward,
# proj_in/out, ResBlock convs, time-embedding projections, down/upsampling convs), in CompVis names.
_ATTN = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_TRANSFORMER = _ATTN + r"|\.(proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$"
TARGETS = {
    "attn": _ATTN,
    "transformer": _TRANSFORMER,
    "all": _TRANSFORMER + r"|\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv)$",
}
DEFAULT_LOOP = LoopConfig(steps=2000, batch_size=16, lr=1e-3, warmup=20, ema_decay=None, ckpt_every=100)
DEFAULT_MINUTES = 20.0  # ~1500 steps of 16 on two free cores (0.8 s/step measured on one)


def add_lcm_parser(sub, common) -> argparse.ArgumentParser:
    """Register `train lcm-lora` on the `train` sub-parsers (`common` adds --out, --threads, --device, ...)."""
    p = sub.add_parser("lcm-lora", help="distil the model into an LCM-LoRA (4-step sampling with the lcm sampler)")
    common(p)
    p.add_argument("--base", help="model file to distil (default: <out>/shapeworld.safetensors, else the built-in)")
    p.add_argument("--cache", help="latent cache to reuse (default: <out>/unet/latents.pt; encoded if unusable)")
    p.add_argument("--latents", type=int, default=20000, help="images to encode when no cache fits (default 20000)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--minutes", type=float, help=f"time budget instead of --steps (default {DEFAULT_MINUTES:g})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {DEFAULT_LOOP.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULT_LOOP.lr:g})")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--ema-decay", type=float, help="EMA of the LoRA saved instead of the raw weights (default off)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, help="seed of data order, noise and LoRA init")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from <out>/lcm_lora/checkpoint.pt if there is one (default: yes)")
    p.add_argument("--init-lora", metavar="NAME_OR_PATH",
                   help="start from this LCM-LoRA (e.g. shapeworld-lcm, when the base continues the model it was made for)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all", choices=list(TARGETS), help="layers with a LoRA (default all)")
    p.add_argument("--cfg", default="5", help="teacher CFG scale, or a range LO:HI drawn per sample (default 5)")
    p.add_argument("--eval-prompts", type=int, default=16, help="captions for the check after training (0: skip)")
    return p


def parse_guidance(text: str) -> tuple[float, float]:
    """--cfg as (lo, hi): "5" -> (5, 5), "3:8" -> (3, 8); TrainingError for anything else."""
    try:
        lo, _, hi = text.partition(":")
        lo, hi = float(lo), float(hi or lo)
    except ValueError:
        raise TrainingError(f"--cfg {text!r}: give a number (5) or a range (3:8)") from None
    if not 1 <= lo <= hi:
        raise TrainingError(f"--cfg {text!r}: scales must be >= 1 and LO <= HI")
    return lo, hi


def loop_from_args(args: argparse.Namespace) -> LoopConfig:
    """The distillation's LoopConfig: the defaults above with the flags that were given (checked)."""
    loop = dataclasses.replace(DEFAULT_LOOP, minutes=DEFAULT_MINUTES, progress=args.progress)
    loop = apply_loop_flags(loop, args)
    if args.rank < 1:
        raise TrainingError(f"--rank must be >= 1 (got {args.rank})")
    return loop
