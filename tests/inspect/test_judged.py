"""The ShapeWorld judge's verdict word by word (what the report frames green or red)."""
from __future__ import annotations

from easel.inspect.judged import judge_prompt, requirements
from easel.world.benchmark import Prompt, ground_truth_image, make_prompts
from easel.world.captions import parse_caption


def render(text: str):
    """A render that satisfies a grammar caption."""
    parsed = parse_caption(text)
    return ground_truth_image(Prompt(text, "test", requirements(parsed.mentions, parsed.relation), parsed.mentions,
                                     parsed.relation))


def test_a_render_of_the_prompt_follows_every_word():
    for p in make_prompts(0, 2)[::2]:
        judged = judge_prompt(p.text, ground_truth_image(p))
        assert judged is not None and judged.passed, p.text
        assert judged.words and not judged.missed(), p.text


def test_words_of_another_scene_are_marked_by_kind():
    judged = judge_prompt("a red star to the left of a blue circle", render("a purple square left of a red cross"))
    verdicts = {w.word: w for w in judged.words}
    assert not judged.passed
    assert verdicts["red"].followed  # something red is there (the cross): the shape word takes the blame
    assert not verdicts["star"].followed and "no star" in verdicts["star"].reason
    assert not verdicts["blue"].followed and not verdicts["circle"].followed
    assert verdicts["left"].kind == "relation" and not verdicts["left"].followed
    assert [w.index for w in judged.words] == sorted(w.index for w in judged.words)


def test_count_size_and_colour_binding():
    image = render("three small red squares")
    count, size, colour, shape = judge_prompt("five large red squares", image).words
    assert (count.kind, count.followed) == ("count", False) and "3 red square(s), asked for 5" in count.reason
    assert (size.kind, size.followed) == ("size", False)
    assert colour.followed and shape.followed
    swapped = {w.word: w for w in judge_prompt("three small blue squares", image).words}
    assert not swapped["blue"].followed and "the squares are red" in swapped["blue"].reason
    assert swapped["squares"].followed


def test_a_prompt_outside_the_grammar_is_not_judged():
    assert judge_prompt("a photo of a cat", ground_truth_image(make_prompts(0, 1)[0])) is None
