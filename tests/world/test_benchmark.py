"""GenEval-style benchmark: ground truth passes, the shuffled floor fails, blur is tolerated."""
from __future__ import annotations

import pytest
from PIL import Image

from easel.world.benchmark import (CATEGORIES, CORE_CATEGORIES, blur, ground_truth_image, ground_truth_results,
                                   judge, make_prompts, report_markdown, score, shuffled)
from easel.world.captions import parse_caption
from easel.world.scenes import HELD_OUT_PAIRS, HELD_OUT_RELATIONS


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(0, per_category=24)


def test_prompts_cover_categories_and_parse(prompts):
    assert make_prompts(0, per_category=24) == prompts
    assert {p.category for p in prompts} == set(CATEGORIES)
    for p in prompts:
        parsed = parse_caption(p.text)
        assert parsed.mentions == p.mentions and parsed.relation == p.relation


def test_unseen_binding_prompts_use_held_out_combinations(prompts):
    for p in (p for p in prompts if p.category == "unseen_binding"):
        pairs = {(m.colour, m.shape) for m in p.mentions}
        triple = p.relation and (p.mentions[0].shape, p.relation[0], p.mentions[1].shape)
        assert pairs & set(HELD_OUT_PAIRS) or triple in HELD_OUT_RELATIONS, p.text
    for p in (p for p in prompts if p.category != "unseen_binding"):
        assert not {(m.colour, m.shape) for m in p.mentions} & set(HELD_OUT_PAIRS), p.text


def test_ground_truth_passes_every_category(prompts):
    scores = score(ground_truth_results(prompts, seeds=(0, 1)))
    print("ground truth", scores)
    assert all(scores[c] >= 0.99 for c in CATEGORIES), scores


def test_shuffled_floor_is_far_lower(prompts):
    shuffled_prompts = shuffled(prompts, 0)
    assert all(a.category == b.category and a.text != b.text for a, b in zip(prompts, shuffled_prompts))
    scores = score(ground_truth_results(prompts, seeds=(0,), shuffle=True))
    print("shuffled", scores)
    assert scores["overall"] < 0.2 and all(scores[c] < 0.4 for c in CATEGORIES)


def test_blurred_ground_truth_still_reads(prompts):
    some = [p for p in prompts if p.category in ("single_object", "colors", "counting")]
    scores = score(ground_truth_results(some, seeds=(0,), transform=blur(1.0)))
    print("blurred r=1", scores)
    assert scores["single_object"] >= 0.95 and scores["colors"] >= 0.95 and scores["counting"] >= 0.9


def test_judge_gives_reasons_and_rejects_wrong_images(prompts):
    pos = next(p for p in prompts if p.category == "position")
    img = ground_truth_image(pos, seed=3)
    verdict = judge(img, pos)
    assert verdict and verdict.reason.startswith("ok")
    horizontal = pos.relation[0] in ("left", "right")
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT if horizontal else Image.Transpose.FLIP_TOP_BOTTOM)
    bad = judge(flipped, pos)
    assert not bad and "not" in bad.reason
    count = next(p for p in prompts if p.category == "counting")
    other = next(p for p in prompts if p.category == "counting"
                 and p.requirements["objects"][0]["count"] != count.requirements["objects"][0]["count"])
    assert not judge(ground_truth_image(other, seed=0), count)


def test_score_and_report():
    ps = make_prompts(1, per_category=2)
    results = [(p, p.category != "counting") for p in ps]
    s = score(results)
    assert s["counting"] == 0.0 and s["size"] == 1.0
    assert s["overall"] == pytest.approx(5 / 6)
    table = report_markdown({"ground truth": s, "generated": {"colors": 0.5}})
    lines = table.splitlines()
    assert lines[0].count("|") == len(CATEGORIES) + 3 and "| generated | - | 0.50 |" in lines[3]
    assert all(c in lines[0] for c in CORE_CATEGORIES)
