"""LCM-LoRA distillation: only the LoRA learns, the loss falls, the saved kohya file reproduces the trained
LoRA when merged, resume is exact, and the `lcm` sampler steps like diffusers' LCMScheduler."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from easel.training import lcm
from easel.training.common import LoopConfig, Trainer, TrainingError
from easel.training.unet import LatentBatches
from easel.weights.lora import apply_loras, read_lora

CAPTIONS = ["a red star", "a blue circle", "a big green dog", "a small cat", "the red circle", "a photo of a star"]


def synthetic_data(tok, n: int = 12, side: int = 16) -> dict:
    """Random latents with real token ids of the tiny vocabulary (2 paraphrases per image)."""
    g = torch.Generator().manual_seed(0)
    caps = [[CAPTIONS[i % 6], CAPTIONS[(i + 1) % 6]] for i in range(n)]
    ids = tok([c for row in caps for c in row], max_length=77).view(n, 2, 77).to(torch.int32)
    return {"train": {"latents": torch.randn(n, 4, side, side, generator=g).half(), "ids": ids, "captions": caps},
            "val": {"latents": torch.randn(2, 4, side, side, generator=g).half(), "ids": ids[:2, :1],
                    "captions": [[c[0]] for c in caps[:2]]}}


def tiny_run(loaded, out, steps: int = 4, batch: int = 4, **kw) -> lcm.LcmRun:
    loop = LoopConfig(steps=steps, batch_size=batch, lr=1e-2, warmup=1, ema_decay=None, ckpt_every=1000,
                      log_every=1, progress=False)
    return lcm.LcmRun(out, loaded, synthetic_data(loaded.tokenizers[0]), loop, rank=4, eval_prompts=0, **kw)


def test_schedule_grid_and_boundary_condition():
    sched = lcm.ConsistencySchedule(torch.linspace(0.999, 0.01, 1000), num_ddim_timesteps=50)
    assert sched.grid[0] == 19 and sched.grid[-1] == 999 and sched.k == 20
    start, end = sched.pair(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and end.tolist() == [0, 19, 979]
    x, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    f = sched.consistency(x0, x, torch.tensor([0, 19, 999]))
    assert torch.equal(f[0], x[0])  # f(x, 0) = x exactly
    assert torch.allclose(f[2], x0[2], atol=1e-6)  # far from 0 the network's x0 passes through
    assert float(lcm.pseudo_huber(x, x, 0.001)) == 0.0


def test_only_lora_learns_and_loss_falls_on_a_fixed_batch(tiny_sd1, tmp_path):
    run = tiny_run(tiny_sd1, tmp_path, steps=15)
    unet = tiny_sd1.model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = lcm.LoraAdapters(unet, rank=4, targets="all")
    sched, batches = lcm.make_schedule(tiny_sd1), LatentBatches(run.data["train"], 4, 0)
    uncond = lcm._uncond_context(tiny_sd1)
    trainer = Trainer("lcm-lora", tmp_path, adapters, run.loop)
    losses = []

    def fixed(step):  # the same latents, noise, timesteps and guidance every step
        loss, m = lcm.lcm_step(run, adapters, sched, batches, uncond, 0, trainer.info)
        losses.append(float(loss.detach()))
        return loss, m

    trainer.run(fixed)
    adapters.remove()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # the base UNet is untouched
    assert all(float(p.up.detach().abs().max()) > 0 for p in adapters.pairs.values())  # every LoRA layer learned
    assert trainer.params == list(adapters.parameters())


def _unet_out(loaded, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return loaded.model.unet(x, torch.tensor([500.0, 60.0]), context=ctx)


def test_saved_lora_loads_and_equals_the_trained_lora(tiny_sd1, tmp_path):
    run = dataclasses.replace(tiny_run(tiny_sd1, tmp_path, steps=3), eval_prompts=2)
    metrics = lcm.train_lcm_lora(run)
    assert metrics["mse_4step_lcm_lora"] >= 0 and metrics["steps"] == 3
    plain = _unet_out(tiny_sd1)
    lora = read_lora(tmp_path / lcm.LORA_NAME)
    assert lora.format == "kohya" and lora.metadata["easel_kind"] == "lcm-lora"
    assert '"sampler": "lcm"' in lora.metadata["easel_recommended"]
    with apply_loras(tiny_sd1, [(lora, 1.0)]) as patch:
        assert patch.unmatched == [] and patch.applied == len(lora.layers) == metrics["layers"]
        merged = _unet_out(tiny_sd1)
    assert not torch.allclose(merged, plain, atol=1e-4)  # the LoRA changes the UNet
    assert torch.equal(_unet_out(tiny_sd1), plain)  # and unloads exactly
    adapters = lcm.LoraAdapters(tiny_sd1.model.unet, rank=4, targets="all")
    adapters.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    trained = _unet_out(tiny_sd1)  # the LoRA as trained (a parametrization) = the file merged into the weights
    adapters.remove()
    assert torch.allclose(trained, merged, atol=1e-5)
    assert torch.equal(_unet_out(tiny_sd1), plain)  # remove() restores the weights


def test_resume_continues_exactly(tiny_sd1, tmp_path, monkeypatch):
    lcm.train_lcm_lora(tiny_run(tiny_sd1, tmp_path / "a"))
    step_fn, calls = lcm.lcm_step, []

    def interrupted(run, adapters, sched, batches, uncond, step, info):
        calls.append(step)
        if step == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt  # like Ctrl-C: the trainer checkpoints, then re-raises
        return step_fn(run, adapters, sched, batches, uncond, step, info)

    monkeypatch.setattr(lcm, "lcm_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lcm.train_lcm_lora(tiny_run(tiny_sd1, tmp_path / "b"))
    lcm.train_lcm_lora(tiny_run(tiny_sd1, tmp_path / "b"))
    assert calls == [0, 1, 2, 2, 3]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Another rank is another LoRA: the old checkpoint is not resumed.
    other = dataclasses.replace(tiny_run(tiny_sd1, tmp_path / "b"), rank=2)
    monkeypatch.setattr(lcm, "lcm_step", step_fn)
    lcm.train_lcm_lora(other)
    assert read_lora(tmp_path / "b" / lcm.LORA_NAME).layers.popitem()[1].rank == 2


def test_guidance_flag():
    from easel.training.lcm_cli import parse_guidance
    assert parse_guidance("5") == (5.0, 5.0) and parse_guidance("3:8") == (3.0, 8.0)
    for bad in ("x", "8:3", "0.5"):
        with pytest.raises(TrainingError):
            parse_guidance(bad)


def test_lcm_sampler_steps_like_diffusers_lcm_scheduler():
    """easel's `lcm` sampler (x0, then fresh noise at the next sigma) = LCMScheduler over the same timesteps."""
    from diffusers import LCMScheduler

    from easel.samplers import SAMPLERS, DiscreteSchedule, EpsDenoiser, make_alphas_cumprod
    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(4)
    timesteps = sched.timesteps.tolist()
    assert timesteps == [999, 759, 499, 259]

    def eps_model(x_vp, t, **_):  # any smooth function of (x, t) stands in for a UNet
        return torch.tanh(x_vp) * 0.7 + 0.1 * torch.cos(t.float() / 300).reshape(-1, 1, 1, 1)

    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = start.clone()
    for t in timesteps:
        x = sched.step(eps_model(x, torch.full((2,), t)), t, x, generator=g).prev_sample
    schedule = DiscreteSchedule(make_alphas_cumprod())
    sigmas = torch.cat([schedule.sigmas[timesteps], torch.zeros(1)])
    g2 = torch.Generator().manual_seed(1)
    ours = SAMPLERS["lcm"](EpsDenoiser(eps_model, schedule), start * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                           noise=lambda like: torch.randn(like.shape, generator=g2))
    assert torch.allclose(ours, x, atol=1e-4)


def test_cli_trains_saves_and_resumes(tiny_sd1_file, tmp_path, capsys):
    from easel.training.cli import main
    args = ["lcm-lora", "--out", str(tmp_path), "--base", str(tiny_sd1_file), "--latents", "8", "--batch-size", "2",
            "--rank", "2", "--eval-prompts", "0", "--no-progress", "--threads", "1"]
    assert main(args + ["--steps", "2"]) == 0
    assert (tmp_path / "lcm_lora" / lcm.LORA_NAME).exists() and (tmp_path / "lcm_lora" / "latents.pt").exists()
    assert main(args + ["--steps", "3"]) == 0  # continues from step 2, reusing the encoded latents
    err = capsys.readouterr().err
    assert "resuming at step 2" in err and err.count("encoding 8 ShapeWorld images") == 1
    assert read_lora(tmp_path / "lcm_lora" / lcm.LORA_NAME).metadata["easel_base_model"] == tiny_sd1_file.name
    assert main(args + ["--steps", "1", "--cfg", "nope"]) == 2  # a bad flag is one line, not a traceback


def test_adapters_start_from_a_lora_file(tiny_sd1, tmp_path):
    """--init-lora: the adapters read a saved LCM-LoRA back, and then draw what the file merged draws."""
    run = dataclasses.replace(tiny_run(tiny_sd1, tmp_path, steps=2), eval_prompts=0)
    lcm.train_lcm_lora(run)
    lora = read_lora(tmp_path / lcm.LORA_NAME)
    with apply_loras(tiny_sd1, [(lora, 1.0)]):
        merged = _unet_out(tiny_sd1)
    adapters = lcm.LoraAdapters(tiny_sd1.model.unet, rank=4, alpha=2.0, targets="all")  # another alpha: rescaled
    assert adapters.load_lora(tmp_path / lcm.LORA_NAME, tiny_sd1.model) == len(lora.layers)
    started = _unet_out(tiny_sd1)
    adapters.remove()
    assert torch.allclose(started, merged, atol=1e-5)
