"""The bilingual caption grammar: every Chinese caption says what its English twin says; measure words, 和 and
relations; the benchmark in Chinese; the words a model was trained on, and the warning naming any other word."""
from __future__ import annotations

import pytest

from easel.world.benchmark import CATEGORIES, make_prompts
from easel.world.captions import (Mention, caption, caption_corpus, describe, parse_caption, segment_zh, tokens,
                                  vocabulary)
from easel.world.scenes import sample_scene


@pytest.mark.parametrize("start", [0, 10_000])
def test_every_chinese_caption_parses_to_its_english_twin(start):
    for seed in range(start, start + 600):
        scene = sample_scene(seed)
        en, zh = caption(scene, seed), caption(scene, seed, "zh")
        assert parse_caption(zh) == parse_caption(en), (en, zh)


def test_measure_words_lists_and_relations_read_as_chinese():
    assert describe([Mention("red", "star", count=3)], lang="zh") == "三个红色的星星"
    assert describe([Mention("blue", "square", count=2)], lang="zh") == "两个蓝色的正方形"
    rel = describe([Mention("yellow", "triangle"), Mention("pink", "circle")], ("left", 0, 1), lang="zh")
    assert rel == "一个黄色的三角形在一个粉色圆形的左边"
    assert parse_caption(rel).relation == ("left", 0, 1)
    assert describe([Mention("red", "star"), Mention("blue", "circle")], lang="zh") == "一个红色的星星和一个蓝色的圆形"
    three = describe([Mention("red", "star"), Mention("blue", "circle"), Mention("green", "cross")], lang="zh")
    assert three == "一个红色的星星、一个蓝色的圆形和一个绿色的十字"
    for text, mentions, relation in [
        ("两颗黄色星星", (Mention("yellow", "star", count=2),), None),  # 颗, the measure word of stars
        ("一个小的紫色方块", (Mention("purple", "square", "small"),), None),
        ("一个红圆位于一个大的蓝色菱形的下方", (Mention("red", "circle"), Mention("blue", "diamond", "large")),
         ("below", 0, 1)),
        ("一个绿色的三角形在一个粉红色正方形的右侧", (Mention("green", "triangle"), Mention("pink", "square")),
         ("right", 0, 1)),
        ("一个青色圆与一个橘色的十字形", (Mention("cyan", "circle"), Mention("orange", "cross")), None),
    ]:
        parsed = parse_caption(text)
        assert (parsed.mentions, parsed.relation) == (mentions, relation), text


def test_relations_in_chinese_hold_for_the_scene():
    for seed in range(400):
        scene = sample_scene(seed, "relation")
        zh = parse_caption(caption(scene, seed, "zh"))
        if zh.relation is None:
            continue
        from easel.world.scenes import relation
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        a, b = (by_name[(zh.mentions[k].colour, zh.mentions[k].shape)] for k in zh.relation[1:])
        assert relation(a, b) == zh.relation[0]


def test_chinese_vocabulary_covers_the_corpus_and_off_grammar_is_rejected():
    used = {w for c in caption_corpus(2000, lang="zh") for w in tokens(c)}
    assert used <= set(vocabulary("zh"))
    assert len(set(vocabulary("zh")) - used) <= 2  # nearly every word is produced (rare synonyms may miss)
    for bad in ("一只猫", "三个红色的", "一个红色的星星在一个蓝色圆形的旁边"):
        with pytest.raises(ValueError, match="off-grammar|expected"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="choose one of en, zh"):
        vocabulary("fr")


def test_segmentation_takes_the_longest_word_and_groups_unknown_characters():
    assert segment_zh("五个五角星") == [("五", True), ("个", True), ("五角星", True)]
    assert segment_zh("一只猫") == [("一", True), ("只猫", False)]


def test_the_benchmark_in_chinese_is_the_same_prompts():
    en, zh = make_prompts(0, 3), make_prompts(0, 3, lang="zh")
    assert [p.category for p in zh] == [p.category for p in en] and {p.category for p in zh} == set(CATEGORIES)
    for a, b in zip(en, zh):
        assert b.requirements == a.requirements and b.text != a.text
        parsed = parse_caption(b.text)
        assert parsed.mentions == a.mentions and parsed.relation == a.relation
    assert make_prompts(0, 3, lang="zh") == zh  # deterministic
    with pytest.raises(ValueError, match="choose one of en, zh"):
        make_prompts(0, 1, lang="de")


def test_eval_runs_in_chinese(tmp_path):
    import dataclasses

    from easel.pipelines.pipeline import Pipeline
    from easel.world.evaluate import EvalSettings, run_eval
    from tests.conftest import make_tiny
    loaded = make_tiny(tmp_path, "sd1")
    loaded.model.config = dataclasses.replace(loaded.model.config, default_size=64)
    report = run_eval(Pipeline(loaded), EvalSettings(per_category=1, images_per_prompt=1, steps=1, lang="zh"))
    assert report["lang"] == "zh"
    assert [im["prompt"] for im in report["images"]] == [p.text for p in make_prompts(0, 1, lang="zh")]
    assert report["rows"]["ground truth"]["overall"] >= 0.99  # the judge reads the same requirements


def test_unknown_words_are_named_in_both_languages():
    from easel.pipelines.conditioning import unknown_words
    vocab = {"en": vocabulary("en"), "zh": vocabulary("zh")}
    assert unknown_words(None, ["three red stars", "三个红色的星星", "一个黄色的三角形在一个粉色圆形的左边"],
                         vocabulary=vocab) == []
    assert unknown_words(None, ["a photo of a cat", "一只猫在一个红色星星旁边"], vocabulary=vocab) == \
        ["cat", "photo", "只猫", "旁边"]
    assert unknown_words(None, ["a cat"], known={"cat"}, vocabulary=vocab) == []


def test_a_saved_model_lists_its_vocabulary_and_warns_on_other_words(tmp_path):
    from easel.pipelines.conditioning import model_vocabulary
    from easel.pipelines.pipeline import prompt_report
    from easel.pipelines.request import GenerationRequest
    from easel.training.all import vocabulary_metadata
    from easel.weights.model_io import load_model, save_model
    from tests.conftest import make_tiny
    path = save_model(make_tiny(tmp_path), tmp_path / "m.safetensors", extra_metadata=vocabulary_metadata())
    assert model_vocabulary(str(path)) == {"en": vocabulary("en"), "zh": vocabulary("zh")}
    loaded = load_model(path)
    _, warnings = prompt_report(loaded, GenerationRequest("a red dragon, 一只红色的猫"))
    assert len(warnings) == 1 and "dragon, 只, 猫" in warnings[0]
    assert prompt_report(loaded, GenerationRequest("a red star, 一个红色的星星"))[1] == []


def test_grid_captions_wrap_chinese_between_characters():
    from PIL import Image, ImageDraw

    from easel.world.grid import load_font, wrap
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = load_font(11, cjk=True)
    text = "一个黄色的三角形在一个粉色圆形的左边"
    lines = wrap(draw, text, font, 60)
    assert len(lines) > 1 and "".join(lines) == text  # broken between characters, nothing lost or added
    assert wrap(draw, "a yellow triangle left of a pink circle", font, 60)[0].split()[0] == "a"
    assert " ".join(wrap(draw, "a yellow triangle left of a pink circle", font, 60)) == \
        "a yellow triangle left of a pink circle"
