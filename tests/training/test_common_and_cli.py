"""Shared loop pieces (schedule, EMA, logs, sharding) and `easel train` end to end on the tiny preset."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from easel.training.cli import main
from easel.training.common import EMA, DistInfo, JsonlLog, TrainingError, lr_at, plot_loss_curve


def test_lr_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.05)


def test_ema_warms_up_and_tracks_the_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, max_decay=0.99)
    assert ema.decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early averages forget the init fast
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(2000):
        ema.update(model)
    assert ema.decay() == 0.99
    assert torch.allclose(ema.weights(model)["weight"], torch.ones(1, 2), atol=1e-4)


def test_log_is_cut_back_to_the_checkpoint_and_plotted(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl", None)
    for step in range(1, 11):
        log.write({"step": step, "loss": 1.0 / step})
    log = JsonlLog(tmp_path / "log.jsonl", resume_step=6)
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5, 6]
    png = plot_loss_curve(log.records(), tmp_path / "loss.png", "test")
    assert Image.open(png).size == (640, 360)


def test_shards_split_the_global_batch():
    assert [DistInfo(rank=r, world=2).shard(8) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(TrainingError, match="multiple of 2"):
        DistInfo(rank=0, world=2).shard(7)


def test_missing_stage_is_a_clear_error(tmp_path, capsys):
    assert main(["unet", "--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "easel train tokenizer" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_all_tiny_end_to_end(tmp_path, capsys):
    from easel.pipelines.pipeline import Pipeline
    from easel.weights.model_io import load_model
    args = ["all", "--preset", "tiny", "--out", str(tmp_path), "--clip-steps", "3", "--vae-steps", "3",
            "--unet-steps", "3", "--latents", "64", "--captions", "300", "--no-judge", "--no-progress",
            "--threads", "1"]
    assert main(args) == 0
    model_path = tmp_path / "shapeworld.safetensors"
    assert model_path.exists() and (tmp_path / "shapeworld.tokenizer" / "vocab.json").exists()
    for stage in ("tokenizer", "clip", "vae", "unet"):
        assert (tmp_path / stage / "done.json").exists()
    assert json.loads((tmp_path / "model.json").read_text())["unet"] in ("raw", "ema")
    capsys.readouterr()
    assert main(args) == 0  # everything done: every stage is skipped
    assert capsys.readouterr().err.count("skipping") == 4
    loaded = load_model(model_path)
    assert loaded.model.config.name == "shapeworld-tiny" and loaded.model.config.vae.scale_factor != 1.0
    image = Pipeline(loaded).txt2img("a red star", steps=2, seed=1)[0]
    assert image.size == (32, 32)


def test_a_checkpoint_started_on_other_inputs_is_not_resumed(tmp_path):
    from easel.training.all import Layout, guard_resume
    from easel.training.common import LoopConfig
    layout = Layout(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_text("v1")
    assert guard_resume(layout, "clip", LoopConfig(), DistInfo()).resume  # first start: resume allowed
    assert guard_resume(layout, "clip", LoopConfig(), DistInfo()).resume  # same inputs: still allowed
    (tmp_path / "tokenizer" / "vocab.json").write_text("v2")  # a retrained tokenizer
    assert not guard_resume(layout, "clip", LoopConfig(), DistInfo()).resume
