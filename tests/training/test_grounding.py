"""Token grounding (TokenCompose's token loss on ShapeWorld): which tokens name which objects, the objects' masks,
the loss, and a training run that uses it."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from easel.text.tokenizer import CLIPTokenizer
from easel.training.grounding import (AttentionTap, build_grounding, grounding_loss, token_masks, token_objects,
                                      word_objects)
from easel.world.render import object_coverage
from easel.world.scenes import Obj, Scene

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

STAR = Obj("star", "red", "large", 0.25, 0.5, 0.15)
CIRCLE = Obj("circle", "blue", "large", 0.75, 0.5, 0.15)


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    from easel.weights.registry import BUILTIN_FILE
    return CLIPTokenizer.from_dir(BUILTIN_FILE.parent / "shapeworld.tokenizer")


def test_colour_and_shape_words_name_their_objects():
    assert word_objects("a red star to the left of a blue circle".split(), (STAR, CIRCLE), "en") == \
        [0, 1, 1, 0, 0, 0, 0, 0, 2, 2]
    assert word_objects(["two", "red", "stars"], (STAR, STAR, CIRCLE), "en") == [0, 3, 3]
    assert word_objects(["红色", "的", "星星", "蓝色", "圆形"], (STAR, CIRCLE), "zh") == [1, 0, 1, 2, 2]


def test_token_positions_follow_the_tokenizer(tok):
    text = "a red star to the left of a blue circle"
    bits = token_objects(tok, text, "en", (STAR, CIRCLE))
    names = tok.tokens(tok([text])[0][:12])
    named = {n.replace("</w>", ""): int(b) for n, b in zip(names, bits[:12]) if b}
    assert named == {"red": 1, "star": 1, "blue": 2, "circle": 2}
    assert int(bits[0]) == 0 and not bits[12:].any()  # BOS, EOS and padding name nothing


def test_coverage_masks_sit_where_the_objects_are():
    cov = object_coverage(Scene(objects=(STAR, CIRCLE), background=128, seed=0), 16)
    assert cov.shape == (2, 16, 16) and cov.max() <= 1.0
    assert cov[0, :, :8].sum() > 0.95 * cov[0].sum() and cov[1, :, 8:].sum() > 0.95 * cov[1].sum()
    area = np.pi * (0.15 * 0.92 * 16) ** 2  # the circle is drawn at 92% of its radius
    assert abs(cov[1].sum() - area) < 0.1 * area


def test_loss_is_zero_on_its_object_and_high_elsewhere():
    masks = torch.zeros(1, 8, 16, 16, dtype=torch.uint8)
    masks[0, 0, 4:8, 2:6] = 255
    bits = torch.zeros(1, 77, dtype=torch.int16)
    bits[0, 2] = 1
    on = torch.full((1, 64, 77), 1e-6)
    on.view(1, 8, 8, 77)[0, 2:4, 1:3, 2] = 1.0  # token 2 attends to all of its object and nothing else (8x8 level)
    core = torch.full((1, 64, 77), 1e-6)
    core.view(1, 8, 8, 77)[0, 2, 1, 2] = 1.0  # to a quarter of it
    off = torch.full((1, 64, 77), 1e-6)
    off.view(1, 8, 8, 77)[0, 6:, 6:, 2] = 1.0
    assert float(grounding_loss([(8, on)], bits, masks)) < 1e-3
    assert 0.5 < float(grounding_loss([(8, core)], bits, masks)) < 0.7  # all its mass inside, but Dice 0.4
    assert float(grounding_loss([(8, off)], bits, masks)) > 1.99
    assert float(grounding_loss([(8, off)], torch.zeros_like(bits), masks)) == 0.0
    assert token_masks(bits, masks)[0, 2].sum() == 16 and token_masks(bits, masks)[0, 3].sum() == 0


def test_tap_keeps_differentiable_maps_of_the_grounded_levels_and_then_lets_go():
    from easel.models.unet import UNetModel
    from easel.training import presets
    cfg = dataclasses.replace(presets.TINY_UNET, transformer_depth=(1, 1))
    unet = UNetModel(cfg)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.context_dim, requires_grad=True)
    with AttentionTap(unet, levels=(16, 8)) as tap:
        unet(x, torch.tensor([10.0, 500.0]), ctx)
    assert sorted({side for side, _ in tap.maps}) == [8, 16]
    assert all(p.shape[1] == side * side and torch.allclose(p.sum(-1), torch.ones(())) for side, p in tap.maps)
    bits = torch.ones(2, 77, dtype=torch.int16)
    grounding_loss(tap.maps, bits, torch.full((2, 8, 16, 16), 128, dtype=torch.uint8)).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    tap.maps.clear()
    unet(x, torch.tensor([10.0, 500.0]), ctx)
    assert not tap.maps  # hooks removed


def test_cache_matches_the_latent_caches_scenes(tok):
    from easel.training.unet import TRAIN_SEEDS
    from easel.world.captions import caption
    from easel.world.dataset import mixed_scene
    caps = [[caption(mixed_scene(s, 0.5), s + r * TRAIN_SEEDS, "en") for r in range(2)] for s in range(20)]
    g = build_grounding(list(range(20)), caps, ("en",), 0.5, tok, progress=False)
    assert g["masks"].shape == (20, 8, 16, 16) and g["tokens"].shape == (20, 2, 77)
    for s in range(20):
        n = len(mixed_scene(s, 0.5).objects)
        assert g["masks"][s, :n].flatten(1).amax(1).min() > 0 and not g["masks"][s, n:].any()
        assert g["tokens"][s].any()  # every caption names a colour or shape
        assert int(g["tokens"][s].max()) < 2 ** n


def test_training_with_grounding_logs_its_loss(tmp_path):
    from easel.training.cli import main
    common = ["--preset", "tiny", "--vae-steps", "2", "--latents", "64", "--captions", "300", "--no-judge",
              "--no-progress", "--threads", "1"]
    assert main(["all", "--out", str(tmp_path), "--clip-steps", "2", "--unet-steps", "3", "--ground", "0.5",
                 *common]) == 0
    import json
    logs = [json.loads(line) for line in (tmp_path / "unet" / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["ground"] <= 2 for r in logs if "ground" in r) and any("ground" in r for r in logs)
    assert (tmp_path / "unet" / "grounding.pt").is_file()
