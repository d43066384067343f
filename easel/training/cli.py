"""`easel train tokenizer|clip|vae|unet|all|lcm-lora|controlnet|lora|embedding|finetune`: flags -> stage runs.

Also runnable on its own, which is how data-parallel runs start:
    torchrun --nproc_per_node 2 -m easel.training.cli unet --out runs/shapeworld

Only the flags are built at import: torch and the training code load when a stage runs (`easel --help` stays fast).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from easel.files import KNOWN_ERRORS, error_line
from easel.training.settings import LoopConfig, apply_loop_flags, check_loop

DEFAULT_OUT = "runs/shapeworld"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / processes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")


def _loop_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="shapeworld", choices=["shapeworld", "tiny"],
                   help="model sizes (tiny: a smoke test in seconds)")
    p.add_argument("--steps", type=int, help="optimizer steps (the learning-rate schedule spans them)")
    p.add_argument("--minutes", type=float, help="time budget instead of --steps (measured from the first steps)")
    p.add_argument("--batch-size", type=int, help="global batch size, over all processes")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--ema-decay", type=float, help="largest EMA decay (0 disables the EMA)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, help="seed of data order, noise and initial weights")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the stage's checkpoint if there is one (default: yes)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for the VAE, off otherwise)")


def _text_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-text-encoder", type=float, metavar="FRACTION", dest="text_lr_scale",
                   help="train the text encoder with the UNet at FRACTION of its learning rate (e.g. 0.3; default: "
                        "frozen CLIP). With --init-from, --clip-steps 0 keeps the init model's CLIP untrained")
    p.add_argument("--ground", type=float, default=0.0, metavar="WEIGHT", dest="ground_weight",
                   help="pull each colour and shape word's cross-attention onto its objects while the UNet trains "
                        "(TokenCompose's token loss at this weight, e.g. 0.02; default 0: off)")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` with its sub-commands on an argparse sub-parsers object."""
    train = subparsers.add_parser("train", help="train the ShapeWorld model from scratch, or a LoRA / embedding "
                                                "on your own images")
    sub = train.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tokenizer", help="byte-level BPE on the ShapeWorld captions")
    _common(t)
    t.add_argument("--captions", type=int, default=20000, help="captions in the corpus (default 20000)")
    for stage, text in (("clip", "CLIP text encoder, contrastively against a small ViT"),
                        ("vae", "the VAE (object-weighted reconstruction)"),
                        ("unet", "the UNet on cached latents (needs tokenizer, clip and vae)")):
        p = sub.add_parser(stage, help=text)
        _common(p)
        _loop_flags(p)
        if stage == "unet":
            p.add_argument("--latents", type=int, default=60000, help="training images to encode (default 60000)")
            _text_flag(p)
    a = sub.add_parser("all", help="every stage in order (finished ones skipped), then the built-in model")
    _common(a)
    a.add_argument("--preset", default="shapeworld", choices=["shapeworld", "tiny"])
    a.add_argument("--minutes", type=float, help="total training minutes, split over clip/vae/unet as the defaults")
    for stage in ("clip", "vae", "unet"):
        a.add_argument(f"--{stage}-minutes", type=float, help=f"minutes for {stage}")
        a.add_argument(f"--{stage}-steps", type=int, help=f"steps for {stage} (instead of minutes)")
    a.add_argument("--redo", action="append", default=[], choices=["tokenizer", "clip", "vae", "unet"],
                   help="train this stage again even if it is done (repeatable)")
    a.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue unfinished stages from their checkpoints (default: yes)")
    a.add_argument("--captions", type=int, default=20000, help="tokenizer corpus size")
    a.add_argument("--latents", type=int, default=60000, help="training images encoded for the UNet")
    a.add_argument("--init-from", metavar="MODEL",
                   help="warm-start every stage from a trained model (e.g. the built-in one: easel/assets/shapeworld/"
                        "shapeworld.safetensors): its tokenizer extended, text encoder, image tower, VAE and UNet")
    a.add_argument("--no-judge", dest="judge", action="store_false",
                   help="choose raw vs EMA UNet by validation loss only (skip the benchmark)")
    _text_flag(a)
    from easel.training.lcm_cli import add_lcm_parser
    add_lcm_parser(sub, _common)
    from easel.training.controlnet_cli import add_controlnet_parser
    add_controlnet_parser(sub, _common)
    from easel.training.user_cli import add_user_parsers
    add_user_parsers(sub)
    train.set_defaults(func=cmd_train)
    return train


def loop_from_args(stage: str, args: argparse.Namespace) -> LoopConfig:
    """The stage's default LoopConfig with the flags that were given."""
    from easel.training.all import DEFAULT_LOOPS, DEFAULT_MINUTES
    cfg = dataclasses.replace(DEFAULT_LOOPS[stage], minutes=DEFAULT_MINUTES[stage], progress=args.progress)
    return apply_loop_flags(cfg, args)


def all_loops(args: argparse.Namespace) -> dict[str, LoopConfig]:
    """Per-stage LoopConfigs for `train all`: defaults, scaled by --minutes, overridden per stage."""
    from easel.training.all import DEFAULT_LOOPS, DEFAULT_MINUTES, INIT_LOOPS
    scale = args.minutes / sum(DEFAULT_MINUTES.values()) if args.minutes else 1.0
    loops = {}
    for stage, base in DEFAULT_LOOPS.items():
        if getattr(args, "init_from", None):
            base = INIT_LOOPS.get(stage, base)
        minutes = getattr(args, f"{stage}_minutes") or DEFAULT_MINUTES[stage] * scale
        steps = getattr(args, f"{stage}_steps")
        cfg = dataclasses.replace(base, minutes=None if steps is not None else minutes,
                                  steps=base.steps if steps is None else steps, resume=args.resume,
                                  progress=args.progress)
        if not (stage == "clip" and steps == 0 and getattr(args, "init_from", None)):  # 0: keep the init's CLIP
            check_loop(cfg)
        loops[stage] = cfg
    return loops


def _threads(args: argparse.Namespace) -> None:
    """One thread per core, shared between the processes of a data-parallel run on this machine."""
    import torch
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = args.threads or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def cmd_train(args: argparse.Namespace) -> int:
    """Dispatch `easel train STAGE`."""
    from easel.training import all as stages
    from easel.training.common import setup_distributed, teardown_distributed
    from easel.training.presets import MODEL_PRESETS
    _threads(args)
    info = setup_distributed(args.device)
    init = getattr(args, "init_from", None)
    layout = stages.Layout(Path(args.out), Path(init) if init else None)
    try:
        if args.stage == "tokenizer":
            print(stages.stage_tokenizer(layout, args.captions, info))
        elif args.stage == "lcm-lora":
            from easel.training.lcm import run_from_args
            metrics = run_from_args(args, info)
            if info.main:
                print(metrics)
        elif args.stage == "controlnet":
            from easel.training.controlnet_train import run_from_args
            metrics = run_from_args(args, info)
            if info.main:
                print(metrics)
        elif args.stage == "all":
            path = stages.train_all(layout, MODEL_PRESETS[args.preset], all_loops(args), info, tuple(args.redo),
                                    args.captions, args.latents, args.judge, args.text_lr_scale, args.ground_weight)
            if path is not None:
                print(path)
        else:
            base, loop = MODEL_PRESETS[args.preset], loop_from_args(args.stage, args)
            run = {"clip": stages.stage_clip, "vae": stages.stage_vae}.get(args.stage)
            metrics = (run(layout, base, loop, info) if run else
                       stages.stage_unet(layout, base, loop, info, args.latents, text_lr_scale=args.text_lr_scale,
                                         ground_weight=args.ground_weight))
            if info.main:
                print(metrics)
    finally:
        teardown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m easel.training.cli STAGE ...` (the same as `easel train STAGE ...`)."""
    parser = argparse.ArgumentParser(prog="easel-train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to continue", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as e:
        if os.environ.get("EASEL_DEBUG", "") not in ("", "0"):
            raise
        print(f"easel train: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
