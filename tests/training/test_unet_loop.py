"""The UNet loop: it learns, resumes bit-identically after an interruption, and DDP equals one process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easel.models.unet import UNetModel
from easel.training.common import Trainer
from easel.training.unet import LatentBatches, make_denoiser, train_unet, unet_step

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from training_tiny import replace_loop, tiny_run  # noqa: E402


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoint.pt", weights_only=False)["model"]


def test_loss_falls_on_a_fixed_batch(tmp_path):
    run = replace_loop(tiny_run(tmp_path, steps=40, batch=8), ema_decay=None, warmup=1)
    torch.manual_seed(0)
    unet = UNetModel(run.model.unet)
    denoiser = make_denoiser(unet, run.model)
    batches = LatentBatches(run.data["train"], 8, seed=0)
    trainer = Trainer("unet", tmp_path, unet, run.loop)
    losses = []

    def fixed(step):  # the same batch, noise and timesteps every step: the loss must go down
        loss, m = unet_step(run, denoiser, batches, 0, trainer.info)
        losses.append(float(loss.detach()))
        return loss, m

    trainer.run(fixed)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    straight = tiny_run(tmp_path / "a", steps=6, batch=4)
    train_unet(straight)
    run = tiny_run(tmp_path / "b", steps=6, batch=4)
    torch.manual_seed(run.loop.seed)
    unet = UNetModel(run.model.unet)
    denoiser = make_denoiser(unet, run.model)
    batches = LatentBatches(run.data["train"], 4, run.loop.seed)
    trainer = Trainer("unet", run.out, unet, run.loop)

    def interrupted(step):
        if step == 3:
            raise KeyboardInterrupt  # like Ctrl-C: the trainer checkpoints, then re-raises
        return unet_step(run, denoiser, batches, step, trainer.info)

    with pytest.raises(KeyboardInterrupt):
        trainer.run(interrupted)
    assert torch.load(run.out / "checkpoint.pt", weights_only=False)["step"] == 3
    train_unet(run)  # a fresh process would do exactly this: build, find the checkpoint, continue
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["ema"]["shadow"]
    ema_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["ema"]["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    steps = [json.loads(line)["step"] for line in (run.out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log continues without duplicates
    assert (run.out / "loss.png").exists() and (run.out / "unet_ema.safetensors").exists()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    steps, batch = 4, 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "training_tiny.py"), str(tmp_path / "ddp"), str(steps), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_unet(tiny_run(tmp_path / "single", steps, batch))
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    moved = _weights(tmp_path / "single")
    # Equal up to float summation order (the all-reduce adds the two halves' gradients in another order);
    # Adam's normalisation turns 1e-8 gradient differences into ~1e-6 weight differences, while the
    # updates themselves are ~1e-3.
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
    torch.manual_seed(0)  # train_unet builds the UNet right after seeding with the loop's seed (0)
    init = UNetModel(tiny_run(tmp_path / "x", 1, 1).model.unet).state_dict()
    assert any(not torch.equal(moved[k], init[k]) for k in init)  # training did change the weights
