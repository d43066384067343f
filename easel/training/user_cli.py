"""`easel train lora|embedding|finetune DATA`: flags, and the runs they start (training on a user's own images).

Free of torch at import, like easel.training.cli: the parser is built without loading training code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from easel.training.settings import LoopConfig, TrainingError, apply_loop_flags

LORA_LOOP = LoopConfig(steps=500, batch_size=4, lr=1e-4, warmup=0, weight_decay=0.01, ema_decay=None,
                       ckpt_every=100, log_every=1)
EMBEDDING_LOOP = LoopConfig(steps=1000, batch_size=4, lr=5e-3, warmup=0, weight_decay=0.0, ema_decay=None,
                            ckpt_every=100, log_every=1)
FINETUNE_LOOP = LoopConfig(steps=1000, batch_size=4, lr=1e-5, warmup=0, weight_decay=0.01, ema_decay=None,
                           ckpt_every=100, log_every=1)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="folder of images with .txt captions (kohya N_name repeat folders too), a folder "
                                "with metadata.jsonl or metadata.csv, or a CSV file")
    p.add_argument("--model", help="model to train on: path or name from `easel models` (default: the built-in)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the model's detected parameterisation")
    p.add_argument("--resolution", type=int, help="training side in pixels (default: the model's native size)")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default 64)")
    p.add_argument("--min-size", type=int, help="refuse images whose shorter side is smaller (default: half "
                                                "the resolution)")
    p.add_argument("--random-crop", action="store_true", help="random instead of centre crops (no latent cache)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (off: captions may say left/right)")
    p.add_argument("--caption-dropout", type=float, default=0.0, help="probability of an empty caption (default 0)")
    p.add_argument("--shuffle-tags", action="store_true", help="shuffle comma-separated caption tags")
    p.add_argument("--keep-tags", type=int, default=0, help="leading tags kept in place when shuffling (default 0)")
    p.add_argument("--on-bad", choices=["skip", "error"], default="skip",
                   help="unreadable images, missing captions, too-small images: skip them (one line each) or stop")
    p.add_argument("--dry-run", action="store_true", help="describe the data, write a contact sheet, train nothing")


def _loop_flags(p: argparse.ArgumentParser, loop: LoopConfig) -> None:
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {loop.steps})")
    p.add_argument("--minutes", type=float, help="time budget instead of --steps")
    p.add_argument("--batch-size", type=int, help=f"images per micro-batch (default {loop.batch_size})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help=f"learning rate (default {loop.lr:g})")
    p.add_argument("--lr-scheduler", default="constant", choices=["constant", "constant_with_warmup", "cosine",
                                                                   "linear"], help="learning-rate schedule")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 0)")
    p.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting (5 is the paper's; default off)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="noise offset (0.05-0.1 typical; default 0)")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps (default {loop.ckpt_every})")
    p.add_argument("--seed", type=int, help="seed of data order, noise and initial weights")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the run folder's checkpoint if there is one (default: yes)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument("--sample-prompt", action="append", default=[],
                   help="prompt to sample with a fixed seed every --sample-every steps (repeatable, or a .txt file)")
    p.add_argument("--sample-every", type=int, default=0, help="sample images every N steps (0: never)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_user_parsers(sub) -> None:
    """Register `train lora`, `train embedding` and `train finetune` on the `train` sub-parsers."""
    p = sub.add_parser("lora", help="train a LoRA on your own images (kohya .safetensors)")
    _data_flags(p)
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors); the run folder is "
                                                "<name>_run/ beside it")
    _loop_flags(p, LORA_LOOP)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--conv", action="store_true", help="also the convolutions (LoCon)")
    p.add_argument("--text-encoder", action="store_true", help="also the text encoder(s)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass: less memory, ~1/3 more time")
    p.set_defaults(func=cmd_lora)
    e = sub.add_parser("embedding", help="textual inversion: teach the model a new word from your images")
    _data_flags(e)
    e.add_argument("--name", required=True, help="the new word (the embedding's name, used in prompts)")
    e.add_argument("--init-word", required=True, help="a word the model knows to start the vectors from")
    e.add_argument("--vectors", type=int, default=1, help="token vectors per encoder (default 1)")
    e.add_argument("--out", help="file to write (.safetensors, or .pt for A1111's pickle; default <name>.safetensors)")
    _loop_flags(e, EMBEDDING_LOOP)
    e.set_defaults(func=cmd_embedding)
    f = sub.add_parser("finetune", help="fine-tune the whole UNet (and text encoders) on your own images; "
                                        "DreamBooth prior preservation optional")
    _data_flags(f)
    f.add_argument("--out", required=True, help="the model to write (.safetensors, or a folder with --to diffusers); "
                                                "the run folder is <name>_run/ beside it")
    f.add_argument("--to", default="single-file", choices=["single-file", "diffusers"], help="output format")
    _loop_flags(f, FINETUNE_LOOP)
    f.add_argument("--ema-decay", type=float, help="keep an EMA of the weights and save it (e.g. 0.999; default off)")
    f.add_argument("--text-encoder", action="store_true", help="also train the text encoder(s)")
    f.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~1/3 more time")
    f.add_argument("--class-prompt", help="prior preservation: the class the subject belongs to ('a photo of a dog')")
    f.add_argument("--class-images", type=int, default=50, help="class images the model draws for the prior "
                                                                 "(default 50)")
    f.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior loss (default 1)")
    f.set_defaults(func=cmd_finetune)


def loop_from_args(args: argparse.Namespace, default: LoopConfig) -> LoopConfig:
    """The default loop with the flags that were given, checked."""
    import dataclasses
    loop = apply_loop_flags(dataclasses.replace(default, progress=args.progress), args)
    if args.grad_accum < 1:
        raise TrainingError(f"--grad-accum must be >= 1 (got {args.grad_accum})")
    return loop


def _prepare(args: argparse.Namespace):
    """Threads, base model and dataset of a command; prints the dry-run report when asked."""
    import os

    import torch

    from easel.training.dataset_folder import DataOptions, UserDataset
    from easel.training.user_train import load_base
    # One thread per core, shared between the processes of a torchrun job on this machine.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    base = load_base(args.model, args.prediction)
    opts = DataOptions(resolution=args.resolution or base.model.config.default_size, bucket_step=args.bucket_step,
                       min_size=args.min_size, random_crop=args.random_crop, flip=args.flip,
                       caption_dropout=args.caption_dropout, shuffle_tags=args.shuffle_tags, keep_tags=args.keep_tags,
                       on_bad=args.on_bad)
    if opts.resolution % (base.model.config.vae.downsample * 2):
        raise TrainingError(f"--resolution {opts.resolution} must be a multiple of "
                            f"{base.model.config.vae.downsample * 2}")
    return base, UserDataset(args.data, opts)


def _dry_run(ds, base, out: Path) -> int:
    for line in ds.describe(base.tokenizers[0]):
        print(line)
    sheet = ds.contact_sheet(out.with_name(out.stem + "_contact_sheet.png"))
    print(f"contact sheet: {sheet}")
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
    """`easel train lora`."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise TrainingError(f"--out {out} must end in .safetensors (the kohya LoRA format)")
    base, ds = _prepare(args)
    if args.dry_run:
        return _dry_run(ds, base, out)
    from easel.training.lora_train import LoraRun, train_lora
    from easel.training.user_train import NoiseOptions, check_prompts, run_dir
    run = LoraRun(ds, base, out, run_dir(out), loop_from_args(args, LORA_LOOP), args.rank, args.alpha, args.conv,
                  args.text_encoder, args.lr_scheduler, args.grad_accum,
                  NoiseOptions(args.min_snr_gamma, args.noise_offset), check_prompts(args.sample_prompt),
                  args.sample_every, gradient_checkpointing=args.gradient_checkpointing)
    return _report(lambda info: train_lora(run, info))


def cmd_embedding(args: argparse.Namespace) -> int:
    """`easel train embedding`."""
    out = Path(args.out or f"{args.name}.safetensors")
    if out.suffix not in (".safetensors", ".pt"):
        raise TrainingError(f"--out {out} must end in .safetensors or .pt")
    base, ds = _prepare(args)
    if args.dry_run:
        return _dry_run(ds, base, out)
    from easel.training.embedding_train import EmbeddingRun, train_embedding
    from easel.training.user_train import NoiseOptions, check_prompts, run_dir
    run = EmbeddingRun(ds, base, out, run_dir(out), loop_from_args(args, EMBEDDING_LOOP), args.name, args.init_word,
                       args.vectors, args.lr_scheduler, args.grad_accum,
                       NoiseOptions(args.min_snr_gamma, args.noise_offset), check_prompts(args.sample_prompt),
                       args.sample_every)
    return _report(lambda info: train_embedding(run, info))


def cmd_finetune(args: argparse.Namespace) -> int:
    """`easel train finetune`."""
    out = Path(args.out)
    if args.to == "single-file" and out.suffix != ".safetensors":
        raise TrainingError(f"--out {out} must end in .safetensors (or use --to diffusers for a folder)")
    base, ds = _prepare(args)
    if args.dry_run:
        return _dry_run(ds, base, out)
    from easel.training.finetune_train import FinetuneRun, PriorOptions, train_finetune
    from easel.training.user_train import NoiseOptions, check_prompts, run_dir
    prior = PriorOptions(args.class_prompt, args.class_images, args.prior_weight) if args.class_prompt else None
    run = FinetuneRun(ds, base, out, run_dir(out), loop_from_args(args, FINETUNE_LOOP), args.text_encoder,
                      args.lr_scheduler, args.grad_accum, NoiseOptions(args.min_snr_gamma, args.noise_offset), prior,
                      args.gradient_checkpointing, args.to, check_prompts(args.sample_prompt), args.sample_every)
    return _report(lambda info: train_finetune(run, info))


def _report(train) -> int:
    """Run `train(info)` in the process group torchrun describes (if any; gloo on CPU, NCCL on GPU), and print the
    result on the first process."""
    from easel.training.common import setup_distributed, teardown_distributed
    info = setup_distributed()
    try:
        metrics = train(info)
    finally:
        teardown_distributed()
    if info.main:
        print(_summary(metrics))
    return 0


def _summary(metrics: dict) -> str:
    import json
    print(json.dumps(metrics, indent=1), file=sys.stderr)
    return next(v for k, v in metrics.items() if k in ("lora", "embedding", "model"))
