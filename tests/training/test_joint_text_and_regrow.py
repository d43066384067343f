"""Training the text encoder with the UNet, warm-starting a UNet with attention at other levels, and keeping the
init model's CLIP (`--clip-steps 0`): the pieces of the built-in model v3's recipe."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from easel.models.unet import UNetModel
from easel.training import presets
from easel.training.common import warm_start
from easel.training.unet import regrow_unet_weights, train_unet

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from training_tiny import tiny_run  # noqa: E402


def test_joint_training_moves_and_saves_the_text_encoder(tmp_path):
    run = dataclasses.replace(tiny_run(tmp_path, steps=3, batch=4, ema=None), text_lr_scale=0.5)
    before = {k: v.clone() for k, v in run.text_encoder.state_dict().items()}
    train_unet(run)
    saved = load_file(str(tmp_path / "text_encoder_raw.safetensors"))
    assert saved.keys() == before.keys()
    assert any(not torch.equal(saved[k], before[k]) for k in before)  # the diffusion loss reached it
    unet = load_file(str(tmp_path / "unet_raw.safetensors"))
    assert not [k for k in unet if k.startswith(("unet.", "text_encoder."))]  # plain UNet keys, loadable alone
    UNetModel(run.model.unet).load_state_dict(unet)


def test_frozen_text_encoder_is_left_alone(tmp_path):
    run = tiny_run(tmp_path, steps=2, batch=4, ema=None)
    before = {k: v.clone() for k, v in run.text_encoder.state_dict().items()}
    train_unet(run)
    assert not (tmp_path / "text_encoder_raw.safetensors").exists()
    assert all(torch.equal(v, before[k]) for k, v in run.text_encoder.state_dict().items())


def test_regrown_unet_keeps_every_block_both_layouts_have():
    old_cfg = dataclasses.replace(presets.TINY_UNET, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1))
    new_cfg = dataclasses.replace(old_cfg, transformer_depth=(1, 1, 0))
    torch.manual_seed(0)
    old = UNetModel(old_cfg).state_dict()
    for v in old.values():
        v.normal_()  # no zero-initialised tensors: every kept weight is recognisable
    own = UNetModel(new_cfg).state_dict()
    moved = regrow_unet_weights(old, own)
    # The lowest level's up blocks lost their transformer: the upsampler moves from index 2 to 1.
    up = next(k for k in old if k.endswith(".2.conv.weight") and k.startswith("output_blocks."))
    assert up not in moved and torch.equal(moved[up.replace(".2.conv.", ".1.conv.")], old[up])
    model = UNetModel(new_cfg)
    fresh = warm_start(model, moved, "UNet", drop_missing=True)
    # Only the new transformers (level 0: one down, two up) start fresh; every convolution is carried over.
    assert fresh and all(k.startswith(("input_blocks.1.1.", "output_blocks.4.1.", "output_blocks.5.1."))
                         for k in fresh)
    assert torch.equal(model.state_dict()[up.replace(".2.conv.", ".1.conv.")], old[up])


def test_clip_steps_zero_keeps_the_init_models_text_encoder(tmp_path):
    from easel.training.cli import main
    from easel.weights.model_io import load_model
    common = ["--preset", "tiny", "--vae-steps", "2", "--unet-steps", "2", "--latents", "64", "--captions", "300",
              "--no-judge", "--no-progress", "--threads", "1"]
    assert main(["all", "--out", str(tmp_path / "v1"), "--clip-steps", "2", *common]) == 0
    v1 = tmp_path / "v1" / "shapeworld.safetensors"
    assert main(["all", "--out", str(tmp_path / "v2"), "--init-from", str(v1), "--clip-steps", "0",
                 "--train-text-encoder", "0.5", *common]) == 0
    old, new = load_model(v1), load_model(tmp_path / "v2" / "shapeworld.safetensors")
    kept = load_file(str(tmp_path / "v2" / "clip" / "text_encoder.safetensors"))
    old_text = old.model.text_encoders[0].state_dict()
    assert all(torch.equal(kept[k], v.float()) for k, v in old_text.items() if "token_embedding" not in k)
    assert (tmp_path / "v2" / "unet" / "text_encoder_ema.safetensors").is_file()
    assert not (tmp_path / "v2" / "clip_vision.safetensors").exists()  # CLIP's tower was fitted to another encoder
    shipped = new.model.text_encoders[0].state_dict()  # the model ships the text encoder trained with its UNet
    joint = load_file(str(tmp_path / "v2" / "unet" / f"text_encoder_{_variant(tmp_path / 'v2')}.safetensors"))
    assert all(torch.equal(shipped[k].float(), joint[k]) for k in joint)


def _variant(root: Path) -> str:
    import json
    return json.loads((root / "model.json").read_text())["unet"]
