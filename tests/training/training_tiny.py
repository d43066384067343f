"""A tiny UNet training run on synthetic latents: shared by the loop tests and run by torchrun as the DDP worker.

    python -m torch.distributed.run --standalone --nproc_per_node 2 training_tiny.py OUT STEPS BATCH
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from easel.models.clip import CLIPTextModel
from easel.training import presets
from easel.training.common import DistInfo, LoopConfig
from easel.training.unet import UnetRun

VOCAB = 40


def synthetic_data(n: int = 48, seed: int = 0) -> dict:
    """Random latents (n, 4, 8, 8) and token ids in the tiny vocabulary, plus a small validation split."""
    g = torch.Generator().manual_seed(seed)

    def split(m: int, r: int) -> dict:
        ids = torch.randint(0, VOCAB - 2, (m, r, 77), generator=g, dtype=torch.int64)
        ids[..., 0], ids[..., 6:] = VOCAB - 2, VOCAB - 1  # BOS, 5 words, EOS padding
        return {"latents": torch.randn(m, 4, 8, 8, generator=g).half(), "ids": ids.to(torch.int32),
                "captions": [["x"] * r for _ in range(m)]}

    return {"train": split(n, 2), "val": split(8, 1)}


def tiny_run(out: Path, steps: int, batch: int, ckpt_every: int = 1000, ema: float | None = 0.9) -> UnetRun:
    """A UnetRun of the tiny preset (vocabulary of 40 tokens) on synthetic data, deterministic in its seeds."""
    cfg = presets.shapeworld_config(VOCAB, 1.0, presets.TINY)
    torch.manual_seed(123)
    text = CLIPTextModel(cfg.text_encoders[0]).eval().requires_grad_(False)
    empty = torch.full((77,), VOCAB - 1)
    empty[0] = VOCAB - 2
    loop = LoopConfig(steps=steps, batch_size=batch, lr=2e-3, warmup=2, ema_decay=ema, ckpt_every=ckpt_every,
                      log_every=1, progress=False)
    return UnetRun(Path(out), cfg, text, empty, synthetic_data(), loop)


def replace_loop(run: UnetRun, **changes) -> UnetRun:
    """The same run with other loop settings."""
    return dataclasses.replace(run, loop=dataclasses.replace(run.loop, **changes))


if __name__ == "__main__":
    from easel.training.common import setup_distributed, teardown_distributed
    from easel.training.unet import train_unet
    torch.set_num_threads(1)
    info: DistInfo = setup_distributed("cpu")
    try:
        train_unet(tiny_run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])), info)
    finally:
        teardown_distributed()
