"""Scoring attention maps against the ShapeWorld judge's object masks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from easel.inspect.truth import iou, object_masks, own_share, score_image, summarise, two_object_prompts
from easel.world.scenes import COLOURS


def _scene() -> Image.Image:
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle((6, 6, 21, 21), fill=COLOURS["red"])
    d.ellipse((36, 36, 57, 57), fill=COLOURS["blue"])
    return img


def test_prompts_name_two_different_colours():
    prompts = two_object_prompts(40, seed=1)
    assert len(prompts) == 40 and all(p["objects"][0][0] != p["objects"][1][0] for p in prompts)
    assert all(p["prompt"].startswith(f"a {p['objects'][0][0]} {p['objects'][0][1]} ") for p in prompts)


def test_masks_come_from_the_judges_segmentation():
    red, blue = object_masks(_scene(), ["red", "blue"])
    assert red[10, 10] and not red[45, 45] and blue[45, 45] and not blue[10, 10]
    assert object_masks(_scene(), ["red", "green"]) is None  # a colour that is not there: no clear mask


def test_iou_and_share():
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    heat = mask.astype(float)
    assert iou(heat, mask) == 1.0 and iou(1 - heat, mask) == 0.0
    assert own_share(heat, mask, ~mask) == 1.0 and own_share(np.ones((8, 8)), mask, ~mask) == 0.5


def test_a_map_on_the_right_object_scores_well():
    from easel.inspect.tokens import Slot
    img = _scene()
    red, blue = object_masks(img, ["red", "blue"])
    words = ["a", "red", "square", "above", "a", "blue", "circle"]
    slots = [Slot(0, 0, 0, "<start>", "start", 1.0)]
    slots += [Slot(i + 1, 0, 0, w, "token", 1.0, i, w) for i, w in enumerate(words)]
    slots.append(Slot(8, 0, 0, "<end>", "end", 1.0))
    maps = np.zeros((9, 16, 16), np.float32)
    small = {k: np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((16, 16), Image.BILINEAR)) / 255
             for k, m in (("red", red), ("blue", blue))}
    maps[2] = maps[3] = small["red"]
    maps[6] = maps[7] = small["blue"]
    rows = score_image(img, maps, slots, [("red", "square"), ("blue", "circle")])
    assert [r["word"] for r in rows] == ["red", "square", "blue", "circle"]
    assert all(r["iou"] > 0.6 and r["share"] > 0.95 for r in rows)
    s = summarise(rows)
    assert s["colour"]["most_on_own"] == 1.0 and s["shape"]["n"] == 2


@pytest.mark.usefixtures("one_thread")
def test_run_on_the_built_in_model_reports_every_class():
    import easel
    from easel.inspect.truth import run
    report = run(easel.load(), 2, steps=3, seed=5)
    assert report["prompts"] == 2 and report["skipped"] + len(report["rows"]) // 4 == 2
    for r in report["rows"]:
        assert 0 <= r["iou"] <= 1 and 0 <= r["share"] <= 1
