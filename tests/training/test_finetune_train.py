"""`easel train finetune`: the UNet (and on request the text encoders) learn while the VAE stays bit-identical,
EMA weights are what is saved, prior preservation draws its class images once with the model itself, gradient
checkpointing gives the same gradients, the result is a loadable single file or diffusers folder, a killed run
resumes to the same weights, and bad flags are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from easel.training import finetune_train
from easel.training.common import LoopConfig
from easel.training.dataset_folder import DataOptions, UserDataset
from easel.training.finetune_train import FinetuneRun, PriorOptions, train_finetune
from easel.training.user_train import gradient_checkpointing
from easel.weights.model_io import load_model
from tests.conftest import make_tiny
from tests.training.user_data import make_folder


def tiny_run(tmp_path, base, steps=3, ema=None, **kw) -> FinetuneRun:
    data = make_folder(tmp_path / "data", 4, sizes=((32, 32),))
    ds = UserDataset(data, DataOptions(resolution=32, bucket_step=16))
    loop = LoopConfig(steps=steps, batch_size=2, lr=1e-3, warmup=0, ema_decay=ema, ckpt_every=2, log_every=1,
                      progress=False)
    return FinetuneRun(ds, base, tmp_path / "out" / "tuned.safetensors", tmp_path / "out" / "tuned_run", loop, **kw)


def _copy(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_and_text_encoder_learn_the_vae_does_not(tmp_path, family):
    base = make_tiny(tmp_path, family)
    unet, vae, text = _copy(base.model.unet), _copy(base.model.vae), _copy(base.model.text_encoders[0])
    metrics = train_finetune(tiny_run(tmp_path, base, text_encoder=True))
    assert metrics["steps"] == 3
    assert all(torch.equal(v, base.model.vae.state_dict()[k]) for k, v in vae.items())
    assert any(not torch.equal(v, base.model.unet.state_dict()[k]) for k, v in unet.items())
    assert any(not torch.equal(v, base.model.text_encoders[0].state_dict()[k]) for k, v in text.items())
    saved = load_model(metrics["model"])
    for k, v in base.model.unet.state_dict().items():  # the file holds the trained weights
        assert torch.equal(saved.model.unet.state_dict()[k], v), k
    assert not any(p.requires_grad for p in base.model.parameters())  # frozen again after training


def test_text_encoder_frozen_unless_asked_and_ema_is_saved(tmp_path):
    base = make_tiny(tmp_path, "sd1")
    text = _copy(base.model.text_encoders[0])
    run = tiny_run(tmp_path, base, ema=0.5)
    metrics = train_finetune(run)
    assert metrics["ema"] and all(torch.equal(v, base.model.text_encoders[0].state_dict()[k]) for k, v in text.items())
    meta = json.loads(load_model(run.out).model.config.to_json())  # loads; config kept
    assert meta["name"] == base.model.config.name


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = tiny_run(tmp_path / "a", make_tiny(tmp_path / "a", "sd1"), steps=4)
    train_finetune(full)
    want = _copy(full.base.model.unet)
    killed = tiny_run(tmp_path / "b", make_tiny(tmp_path / "b", "sd1"), steps=4)
    real = finetune_train.finetune_step

    def killed_at_3(run, denoiser, latents, prior, info, step, k=0, texts=None):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, denoiser, latents, prior, info, step, k, texts)
    monkeypatch.setattr(finetune_train, "finetune_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_finetune(killed)
    monkeypatch.setattr(finetune_train, "finetune_step", real)
    again = tiny_run(tmp_path / "b", make_tiny(tmp_path / "b", "sd1"), steps=4)
    train_finetune(again)
    got = again.base.model.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_prior_preservation_draws_class_images_once(tmp_path, monkeypatch):
    base = make_tiny(tmp_path, "sd1")
    run = tiny_run(tmp_path, base, steps=2, prior=PriorOptions("a circle", count=3, weight=0.5, steps=2))
    metrics = train_finetune(run)
    images = sorted((run.run_dir / "class_images").glob("*.png"))
    assert [p.name for p in images] == ["0000.png", "0001.png", "0002.png"]
    records = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert all("prior_loss" in r and r["loss"] > r["data_loss"] for r in records)  # prior added, weight > 0
    stamps = [p.stat().st_mtime_ns for p in images]
    monkeypatch.setattr("easel.pipelines.pipeline.Pipeline.generate", lambda *a, **k: pytest.fail("redrawn"))
    assert finetune_train.class_images(run) == images and [p.stat().st_mtime_ns for p in images] == stamps
    assert metrics["steps"] == 2


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    base = make_tiny(tmp_path, "sd1")
    unet = base.model.unet.requires_grad_(True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, base.model.config.unet.context_dim, generator=torch.Generator().manual_seed(1))

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(x, torch.tensor([10, 500]), ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}
    plain = grads()
    with gradient_checkpointing(unet):
        saved = grads()
    assert "forward" not in vars(unet.input_blocks[0])  # the blocks' own forward again afterwards
    assert all(torch.allclose(saved[n], g, atol=1e-6) for n, g in plain.items())


def test_cli_writes_a_diffusers_folder_and_reports_bad_flags(tmp_path, capsys):
    from easel.cli import main
    from easel.weights.model_io import save_model
    model = save_model(make_tiny(tmp_path / "m", "sd1"), tmp_path / "tiny.safetensors")
    data = make_folder(tmp_path / "data", 2)
    args = ["train", "finetune", str(data), "--model", str(model), "--steps", "1", "--batch-size", "1",
            "--no-progress", "--resolution", "32"]
    assert main([*args, "--to", "diffusers", "--out", str(tmp_path / "tuned")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "model_index.json").is_file() and load_model(tmp_path / "tuned").model is not None
    assert main([*args, "--out", str(tmp_path / "tuned.ckpt")]) == 2
    assert "must end in .safetensors (or use --to diffusers" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "t.safetensors"), "--class-prompt", "a dog", "--class-images", "0"]) == 2
    assert "--class-images >= 1" in capsys.readouterr().err
