"""Caption grammar: every object named, relations true, small vocabulary, parse back."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from easel.world.captions import Mention, caption, caption_corpus, describe, parse_caption, tokens, vocabulary
from easel.world.scenes import relation, sample_scene

SEEDS = range(1500)


@pytest.fixture(scope="module")
def pairs():
    return [(sample_scene(s), caption(sample_scene(s), s)) for s in SEEDS]


def test_caption_is_deterministic():
    scene = sample_scene(5)
    assert caption(scene, 5) == caption(scene, 5)
    assert len({caption(scene, k) for k in range(40)}) > 1  # paraphrases exist


def test_every_caption_names_every_object(pairs):
    for scene, text in pairs:
        parsed = parse_caption(text)
        named = Counter()
        for m in parsed.mentions:
            named[(m.colour, m.shape)] += m.count
        assert named == Counter((o.colour, o.shape) for o in scene.objects), text
        for m in parsed.mentions:
            if m.size is not None:  # a named size is the true size of every object it covers
                assert all(o.size == m.size for o in scene.objects if (o.colour, o.shape) == (m.colour, m.shape))


def test_relation_captions_hold_under_the_rule(pairs):
    n = 0
    for scene, text in pairs:
        parsed = parse_caption(text)
        if parsed.relation is None:
            continue
        n += 1
        rel, i, j = parsed.relation
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        a, b = (by_name[(parsed.mentions[k].colour, parsed.mentions[k].shape)] for k in (i, j))
        assert relation(a, b) == rel, text
    assert n > 200


def test_first_named_is_independent_of_position(pairs):
    left_first = [parse_caption(t).relation[0] in ("left", "above") for _, t in pairs
                  if parse_caption(t).relation is not None]
    assert 0.4 < np.mean(left_first) < 0.6


def test_vocabulary_is_small_and_complete():
    vocab = vocabulary()
    assert 35 <= len(vocab) <= 60
    used = {w for c in caption_corpus(2000) for w in tokens(c)}
    assert used <= set(vocab)
    assert len(set(vocab) - used) == 0  # every word is actually produced


def test_describe_and_parse_round_trip():
    ms = [Mention("orange", "cross", "large"), Mention("blue", "star", count=3)]
    text = describe(ms)
    assert text == "a large orange cross and three blue stars"
    assert parse_caption(text).mentions == tuple(ms)
    rel = describe(ms[:1] + [Mention("red", "circle")], ("above", 0, 1))
    assert rel == "a large orange cross above a red circle"
    assert parse_caption(rel).relation == ("above", 0, 1)
    assert describe([Mention("orange", "cross")]) == "an orange cross"


def test_off_grammar_caption_is_rejected():
    with pytest.raises(ValueError, match="off-grammar|expected"):
        parse_caption("a red dragon")
