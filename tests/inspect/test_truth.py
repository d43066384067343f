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


def test_prompts_name_two_different_colours_in_relations_and_counts():
    from easel.world.captions import parse_caption
    prompts = two_object_prompts(40, seed=1)
    assert len(prompts) == 40 and all(p["groups"][0][0] != p["groups"][1][0] for p in prompts)
    for p in prompts:
        parsed = parse_caption(p["prompt"])  # in the caption grammar (articles included)
        assert [(m.colour, m.shape, m.count) for m in parsed.mentions] == p["groups"]
    assert sum(parse_caption(p["prompt"]).relation is not None for p in prompts) == 20
    assert sum(p["groups"][0][2] > 1 for p in prompts) == 20


def test_scored_words_by_class():
    from easel.inspect.truth import scored_words
    assert scored_words("a red star to the left of a blue circle".split()) == [
        (1, "colour", 0), (2, "shape", 0), (5, "relation", -1), (8, "colour", 1), (9, "shape", 1)]
    assert scored_words("three red stars and an orange circle".split()) == [
        (0, "count", 0), (1, "colour", 0), (2, "shape", 0), (5, "colour", 1), (6, "shape", 1)]


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
    maps[4] = small["red"] + small["blue"]  # "above": on both objects
    rows = score_image(img, maps, slots, [("red", "square"), ("blue", "circle")])
    assert [r["word"] for r in rows] == ["red", "square", "above", "blue", "circle"]
    assert all(r["iou"] > 0.6 and r["share"] > 0.95 for r in rows if r["class"] != "relation")
    relation = rows[2]
    assert relation["iou"] > 0.6 and 0.2 < relation["share"] < 0.8  # the first object's share of both
    s = summarise(rows)
    assert s["colour"]["most_on_own"] == 1.0 and s["shape"]["n"] == 2 and s["relation"]["n"] == 1


def test_a_count_word_is_scored_against_its_whole_group():
    from easel.inspect.tokens import Slot
    img = _scene()
    ImageDraw.Draw(img).rectangle((40, 6, 55, 21), fill=COLOURS["red"])  # a second red square
    assert object_masks(img, ["red", "blue"]) is None  # two red blobs where one was named
    red, blue = object_masks(img, ["red", "blue"], [2, 1])
    assert red[10, 10] and red[10, 45] and not red[45, 45]
    words = ["two", "red", "squares", "and", "a", "blue", "circle"]
    slots = [Slot(0, 0, 0, "<start>", "start", 1.0)]
    slots += [Slot(i + 1, 0, 0, w, "token", 1.0, i, w) for i, w in enumerate(words)]
    maps = np.zeros((8, 64, 64), np.float32)
    maps[1] = red  # "two" on both red squares
    rows = score_image(img, maps, slots, [("red", "square", 2), ("blue", "circle", 1)])
    count = rows[0]
    assert count["class"] == "count" and count["iou"] == 1.0 and count["share"] == 1.0


@pytest.mark.usefixtures("one_thread")
def test_run_on_the_built_in_model_reports_every_class():
    import easel
    from easel.inspect.truth import run
    report = run(easel.load(), 2, steps=3, seed=5)
    assert report["prompts"] == 2 and report["skipped"] + len(report["rows"]) // 5 == 2  # five words per prompt
    for r in report["rows"]:
        assert 0 <= r["iou"] <= 1 and 0 <= r["share"] <= 1
