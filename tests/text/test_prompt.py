"""A1111 prompt syntax: attention weights, prompt editing / alternation schedules, AND, extra-network tags.

The expected values of the A1111 examples are those of its modules/prompt_parser.py docstrings, and were
checked against that code (with its lark grammar) on random prompts while writing this module.
"""
import time

import pytest

from easel.text.prompt import (ExtraNetwork, PromptSyntaxError, extract_extra_networks, lora_weights,
                               parse_attention, prompt_schedule, split_and)

# ----------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_attention_a1111_docstring(text, expected):
    assert parse_attention(text) == expected  # exact floats: same multiplication order as A1111


def test_attention_emphasis():
    assert parse_attention("(x)") == [("x", 1.1)]
    assert parse_attention("((x))") == [("x", 1.1 * 1.1)]
    assert parse_attention("[x]") == [("x", 1 / 1.1)]
    assert parse_attention("[[x]]") == [("x", (1 / 1.1) * (1 / 1.1))]
    assert parse_attention("(x:1.3)") == [("x", 1.3)]
    assert parse_attention("( x : 0.5 )") == [(" x ", 0.5)]
    assert parse_attention("a (b:-1) c") == [("a ", 1.0), ("b", -1.0), (" c", 1.0)]
    assert parse_attention("[(x)]") == [("x", 1.1 * (1 / 1.1))]
    assert parse_attention("(a (b:2) c)") == [("a ", 1.1), ("b", 2 * 1.1), (" c", 1.1)]
    assert parse_attention("[x:1.5]") == [("x:1.5", 1 / 1.1)]  # weights are for round brackets only
    assert parse_attention("(a:b)") == [("a:b", 1.1)]  # not a number: text, and (...) is still x1.1


def test_attention_unbalanced_and_stray():
    assert parse_attention("a)b]c") == [("a)b]c", 1.0)]
    assert parse_attention("a:1.2) b") == [("a:1.2) b", 1.0)]  # a weight with no "(" open is text
    assert parse_attention("((a") == [("a", 1.1 * 1.1)]
    assert parse_attention("[a") == [("a", 1 / 1.1)]
    # Open brackets at the end: every "(" first, then every "[" (A1111's order, which sets the last bits).
    assert parse_attention("([a") == [("a", 1.0 * 1.1 * (1 / 1.1))]
    assert parse_attention("[(a") == [("a", 1.0 * 1.1 * (1 / 1.1))]
    assert parse_attention("(a [b") == [("a ", 1.1), ("b", 1.1 * (1 / 1.1))]


def test_attention_escapes():
    assert parse_attention("\\(a\\) \\[b\\] \\\\") == [("(a) [b] \\", 1.0)]
    assert parse_attention("(\\(x\\))") == [("(x)", 1.1)]
    assert parse_attention("a\\b") == [("ab", 1.0)]  # a backslash before anything else is dropped
    assert parse_attention("\\\\(x)") == [("\\", 1.0), ("x", 1.1)]


def test_attention_break():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("a,BREAK,b") == [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]
    assert parse_attention("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert parse_attention("aBREAK break BREAKING") == [("aBREAK break BREAKING", 1.0)]
    assert parse_attention("a BREAK BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0),
                                                  ("b", 1.0)]
    # Inside brackets a BREAK is still a break (A1111 would weight it -1.1 and encode the word "break").
    assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]
    # ... and a break marker never merges with text that happens to weigh -1.
    assert parse_attention("(a BREAK b:-1)") == [("a", -1.0), ("BREAK", -1.0), ("b", -1.0)]


def test_attention_merges_and_empty():
    assert parse_attention("") == [("", 1.0)]
    assert parse_attention("()") == [("", 1.0)]
    assert parse_attention("(a)(b) c") == [("ab", 1.1), (" c", 1.0)]
    assert parse_attention("a:b:c") == [("a:b:c", 1.0)]


def test_attention_bad_weight_is_named():
    with pytest.raises(PromptSyntaxError, match=r"1\.2\.3"):
        parse_attention("(a:1.2.3)")
    assert issubclass(PromptSyntaxError, ValueError)


# ----------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # A1111's docstring says [(5, "a  c"), (10, "a {b|d{ c")] here ("not handling this right now"), but its
    # code gives up on the "|" outside an alternation and keeps the prompt for every step; so do we.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
])
def test_schedule_a1111_docstring(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_a1111_hires_docstring():
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:15] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_schedule_a1111_header_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_schedule_edit_forms_and_when():
    assert prompt_schedule("[a:b:4]", 10) == [(4, "a"), (10, "b")]
    assert prompt_schedule("[a::4]", 10) == [(4, "a"), (10, "")]
    assert prompt_schedule("[::4]", 10) == [(4, ""), (10, "")]
    assert prompt_schedule("[a:b:0.25]", 10) == [(2, "a"), (10, "b")]  # int() truncates 2.5
    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]  # "." means a fraction: all steps
    assert prompt_schedule("[a:b:1]", 10) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:50]", 10) == [(10, "a")]  # past the end: clamped
    assert prompt_schedule("[a:b:0]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:-3]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:+3]", 10) == [(3, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1e1]", 10) == [(10, "a")]  # no ".": a step number
    assert prompt_schedule("[a:b:1e999]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b: 3 ]", 10) == [(3, "a"), (10, "b")]
    assert prompt_schedule("[a:b :3]", 10) == [(3, "a"), (10, "b ")]


def test_schedule_old_scheduling():
    assert prompt_schedule("[a:b:1.5]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:1.5]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, hires_steps=4) == [(4, "b")]  # the edit was in the first pass


def test_schedule_alternation_and_nesting():
    assert prompt_schedule("[a|b|c] x", 6) == [(1, "a x"), (2, "b x"), (3, "c x"), (4, "a x"), (5, "b x"),
                                               (6, "c x")]
    assert prompt_schedule("[[a|b]:c:3]", 5) == [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "c")]
    assert prompt_schedule("[x|[a:b:2]]", 4) == [(1, "x"), (2, "a"), (3, "x"), (4, "b")]
    assert prompt_schedule("[[a|b]|c]", 4) == [(1, "a"), (2, "c"), (3, "a"), (4, "c")]
    assert prompt_schedule("[a\\|b|c]", 2) == [(1, "a\\|b"), (2, "c")]  # escapes stay for parse_attention
    assert prompt_schedule("[|a]", 2) == [(1, ""), (2, "a")]
    # Weights and emphasis are left in the texts for parse_attention.
    assert prompt_schedule("((a:1.2)) [(b:0.8):(c):2] \\(d\\)", 4) == [
        (2, "((a:1.2)) (b:0.8) \\(d\\)"), (4, "((a:1.2)) (c) \\(d\\)")]


def test_schedule_unparseable_prompt_is_kept_whole():
    # A "|" outside an alternation or a lone backslash: A1111's parser fails and uses the prompt as is.
    assert prompt_schedule("a | b [c:3]", 10) == [(10, "a | b [c:3]")]
    assert prompt_schedule("[a|b", 10) == [(10, "[a|b")]
    assert prompt_schedule("(a|b) [c:3]", 10) == [(10, "(a|b) [c:3]")]
    assert prompt_schedule("[c:3] a\\", 10) == [(10, "[c:3] a\\")]
    assert prompt_schedule("[c:3] a\\\nb", 10) == [(10, "[c:3] a\\\nb")]
    assert prompt_schedule("[c:3]", 10, hires_steps=6) == [(6, "c")]
    assert prompt_schedule("a | b", 10, hires_steps=6) == [(6, "a | b")]


def test_schedule_stray_brackets_are_text():
    assert prompt_schedule("[a:3]]", 10) == [(3, "]"), (10, "a]")]
    assert prompt_schedule("[[a:3]", 10) == [(3, "["), (10, "[a")]
    assert prompt_schedule("(a:b:c) [d:2]", 10) == [(2, "(a:b:c) "), (10, "(a:b:c) d")]
    assert prompt_schedule("[a:b|c] x", 10) == [(10, "[a:b|c] x")]
    assert prompt_schedule("[a:b:c:2]", 10) == [(10, "[a:b:c:2]")]
    assert prompt_schedule("[a:3e]", 10) == [(10, "[a:3e]")]
    # A group right before two or more stray brackets: A1111's lark parser reads it as an edit or as text
    # depending on its Earley forest's internal order ("[a:3]]]" text, "[a:3]]]]" an edit); we always
    # read the group.
    assert prompt_schedule("[a:3]]]", 10) == [(3, "]]"), (10, "a]]")]


def test_schedule_deep_nesting_has_no_recursion_limit():
    deep = "(" * 3000 + "x" + ")" * 3000
    assert prompt_schedule(deep, 20) == [(20, deep)]
    unclosed = "[" * 3000 + "a:3]"
    assert prompt_schedule(unclosed, 10) == [(3, "[" * 2999), (10, "[" * 2999 + "a")]
    nested = "x"
    for step in range(1, 301):  # [[[x:1]:2]:3]...: shows x only up to step 1
        nested = f"[{nested}:{step}]"
    assert prompt_schedule(nested, 500)[:2] == [(1, ""), (2, "")]
    assert prompt_schedule(nested, 500)[-1] == (500, "x")


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)
    with pytest.raises(ValueError, match="hires_steps"):
        prompt_schedule("a", 10, hires_steps=0)


# ----------------------------------------------------------------------------------------- AND


def test_split_and():
    assert split_and("a AND b :1.2") == [("a", 1.0), ("b", 1.2)]
    assert split_and("a cat AND a dog:-0.5 AND (sky:1.3)") == [("a cat", 1.0), ("a dog", -0.5), ("(sky:1.3)", 1.0)]
    assert split_and("a photo:1.5") == [("a photo", 1.5)]  # a weight applies with no AND too
    assert split_and("a photo :.5 ") == [("a photo", 0.5)]
    assert split_and("ANDROID and AND") == [("ANDROID and", 1.0), ("", 1.0)]
    assert split_and("a:1:2") == [("a:1", 2.0)]
    assert split_and("") == [("", 1.0)]
    assert split_and("[a:b:3] AND c") == [("[a:b:3]", 1.0), ("c", 1.0)]
    assert split_and("line one\nAND\nline two :2") == [("line one", 1.0), ("line two", 2.0)]


# ----------------------------------------------------------------------------------------- extra networks


def test_extract_extra_networks():
    prompt = "a <lora:detail tweaker v1.5:0.8> cat, <hypernet:anime:1.1> <lora:x:te=0.5:unet=1>"
    text, nets = extract_extra_networks(prompt)
    assert text == "a  cat,  "
    assert nets == [ExtraNetwork("lora", "detail tweaker v1.5", ["0.8"]),
                    ExtraNetwork("hypernet", "anime", ["1.1"]),
                    ExtraNetwork("lora", "x", ["te=0.5", "unet=1"])]
    assert extract_extra_networks("a<lora:x>b") == ("ab", [ExtraNetwork("lora", "x", [])])
    # Not tags: no colon, empty arguments, a kind that is not a word.
    for kept in ("<lora>", "<lora:>", "<my-lora:x>", "a < b > c"):
        assert extract_extra_networks(kept) == (kept, [])


@pytest.mark.parametrize("tag, weights", [
    ("<lora:n>", (1.0, 1.0)),
    ("<lora:n:0.8>", (0.8, 0.8)),
    ("<lora:n:0.8:0.5>", (0.8, 0.5)),
    ("<lora:n:te=0.3>", (0.3, 0.3)),
    ("<lora:n:unet=0.2>", (1.0, 0.2)),
    ("<lora:n:te=0.3:unet=0.6>", (0.3, 0.6)),
    ("<lora:n:1:unet=0.2>", (1.0, 0.2)),
    ("<lora:n:0.5:te=0.9>", (0.9, 0.9)),  # named te wins, and unet follows it
    ("<lora:n:-1>", (-1.0, -1.0)),
    ("<lyco:n:0.7>", (0.7, 0.7)),
    ("<lora:n:0.8:0.5:16>", (0.8, 0.5)),  # 4th item: A1111's dyn dim, not a weight
])
def test_lora_weights(tag, weights):
    (net,) = extract_extra_networks(tag)[1]
    assert lora_weights(net) == weights


def test_lora_weights_errors_name_the_tag():
    with pytest.raises(PromptSyntaxError, match=r"<lora:n:abc>.*not a number"):
        lora_weights(extract_extra_networks("<lora:n:abc>")[1][0])
    with pytest.raises(PromptSyntaxError, match="not a LoRA"):
        lora_weights(ExtraNetwork("hypernet", "h", ["1"]))


# ----------------------------------------------------------------------------------------- together


def test_full_pipeline_order():
    prompt = "<lora:style:0.6> a [cat|dog] BREAK (sky:1.2) AND [red:blue:2] ball :0.7"
    text, nets = extract_extra_networks(prompt)
    assert [lora_weights(n) for n in nets] == [(0.6, 0.6)]
    subs = split_and(text)
    assert subs == [("a [cat|dog] BREAK (sky:1.2)", 1.0), ("[red:blue:2] ball", 0.7)]
    schedule = prompt_schedule(subs[0][0], 3)
    assert [s for s, _ in schedule] == [1, 2, 3]
    assert parse_attention(schedule[1][1]) == [("a dog", 1.0), ("BREAK", -1.0), ("", 1.0), ("sky", 1.2)]
    assert prompt_schedule(subs[1][0], 3) == [(2, "red ball"), (3, "blue ball")]


def test_long_prompt_is_fast():
    words = ", ".join(f"(word{i}:1.{i % 9})" if i % 7 else f"[w{i}|v{i}]" for i in range(1500))
    prompt = words + " [a:b:0.5] " + "AND " + words
    start = time.perf_counter()
    subs = split_and(prompt)
    schedule = prompt_schedule(subs[0][0], 30)
    pieces = [parse_attention(text) for _, text in schedule]
    elapsed = time.perf_counter() - start
    assert len(subs) == 2 and len(schedule) == 30 and len(pieces[0]) > 1500
    assert "v7" in schedule[1][1] and "w7" in schedule[0][1]
    assert schedule[14][1].endswith(" a") and schedule[15][1].endswith(" b")
    assert elapsed < 10.0, f"parsing a {len(prompt)}-character prompt took {elapsed:.1f} s"


@pytest.mark.parametrize("parse", [parse_attention, split_and, extract_extra_networks,
                                   lambda p: prompt_schedule(p, 10)])
def test_pathological_inputs_stay_linear(parse):
    # Long space runs and unclosed tags made A1111's regexes quadratic (20 s for 20k spaces).
    for prompt in ("a" + " " * 40_000 + "b", "<lora:" * 10_000, ":" + " " * 40_000 + "x", "(" * 20_000):
        start = time.perf_counter()
        parse(prompt)
        assert time.perf_counter() - start < 2.0, (parse, prompt[:20])
