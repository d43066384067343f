"""`easel inspect model`: the architecture table read from the loaded weights."""
from __future__ import annotations

import json

import pytest
from PIL import Image
import torch
from torch.utils.flop_counter import FlopCounterMode

from easel.cli import main
from easel.inspect import model as mi
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _total(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_sd1_parameters_add_up_and_cross_attention_sits_at_both_levels(tmp_path):
    model = make_tiny(tmp_path, "sd1").model
    info = mi.describe(model)  # default size 32 px -> 16x16 latent (the tiny VAE downsamples by 2)
    assert info["size"] == [32, 32]
    assert sum(c["params"] for c in info["components"]) == info["total_params"] == _total(model)
    assert sum(b["params"] for b in info["unet_blocks"]) == _total(model.unet)
    assert info["cross_attention_at"] == ["16x16", "8x8"]  # transformer_depth (1, 1): both levels and the middle
    by_name = {b["block"]: b for b in info["unet_blocks"]}
    assert by_name["input_blocks.1"]["cross_attention_at"] == "16x16"
    assert by_name["middle_block"]["cross_attention"] == 1 and by_name["middle_block"]["cross_attention_at"] == "8x8"
    assert not by_name["input_blocks.2"]["cross_attention"]  # the downsampler
    conv_in = by_name["input_blocks.0"]
    assert conv_in["input"] == [1, 4, 16, 16] and conv_in["output"] == [1, 32, 16, 16]
    assert conv_in["flops"] == 2 * 4 * 32 * 9 * 16 * 16  # a 3x3 conv: 2 FLOPs per multiply-add
    assert by_name["out"]["output"] == [1, 4, 16, 16]
    shapes = {r["stage"]: r["shape"] for r in info["tensors"]}
    assert shapes["VAE decoder -> image"] == [1, 3, 32, 32]
    assert shapes["context (cross-attention keys/values)"] == [1, 77, 32]


def test_block_flops_add_up_to_one_counted_unet_call(tmp_path):
    model = make_tiny(tmp_path, "sd1").model
    rows = mi.unet_table(model, (32, 32))
    with mi._flop_counter() as counter, torch.no_grad():
        model.unet(torch.zeros(1, 4, 16, 16), torch.tensor([999]), torch.zeros(1, 77, 32))
    assert sum(r["flops"] for r in rows) == counter.get_total_flops()
    with FlopCounterMode(display=False) as plain, torch.no_grad():  # attention is counted on top of torch's own
        model.unet(torch.zeros(1, 4, 16, 16), torch.tensor([999]), torch.zeros(1, 77, 32))
    assert counter.get_total_flops() >= plain.get_total_flops()


def test_tiny_sdxl_lists_its_vector_embedding_and_attention_only_below_the_top(tmp_path):
    model = make_tiny(tmp_path, "sdxl").model
    info = mi.describe(model)
    assert sum(b["params"] for b in info["unet_blocks"]) == _total(model.unet)
    assert sum(c["params"] for c in info["components"]) == _total(model)
    assert "label_emb" in [b["block"] for b in info["unet_blocks"]]
    assert info["cross_attention_at"] == ["8x8"]  # transformer_depth (0, 1): none at the top level


def test_builtin_model_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    assert main(["inspect", "model", "--json", "-o", str(tmp_path / "m")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cross_attention_at"] == ["16x16", "8x8", "4x4"]  # the built-in UNet: (1, 1, 0) and the 4x4 middle
    assert sum(b["params"] for b in info["unet_blocks"]) == next(
        c["params"] for c in info["components"] if c["component"] == "UNet")
    assert sum(c["params"] for c in info["components"]) == info["total_params"]
    assert main(["inspect", "model", "-o", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "middle_block" in text and "1 x 3 x 64 x 64" in text
    assert str(tmp_path / "m" / "model.png") in text and Image.open(tmp_path / "m" / "model.png").width > 600
    assert main(["inspect", "model", "--width", "100", "--height", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("easel: error:") and "\n" not in err


def test_figure_draws_a_box_per_block_at_its_resolution():
    """model.png: one box per block that runs on a feature map, orange exactly where cross-attention sits."""
    import numpy as np
    import easel
    from easel.inspect.model_figure import XATTN, _level_rows, _res, model_figure
    info = mi.describe(easel.load(None).loaded.model, (64, 64))
    blocks = [b for b in info["unet_blocks"] if _res(b)]
    assert _level_rows(blocks) == {16: 0, 8: 1, 4: 2}  # the built-in latent: 16x16, then two halvings
    pixels = np.asarray(model_figure(info))
    assert np.all(pixels == XATTN, axis=-1).sum() > 0 and any(b["cross_attention"] for b in blocks)
    info["unet_blocks"] = [{**b, "cross_attention": 0} for b in info["unet_blocks"]]
    assert not np.all(np.asarray(model_figure(info)) == XATTN, axis=-1).any()  # orange only where attention is
