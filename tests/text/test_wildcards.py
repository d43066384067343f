"""Wildcards and dynamic prompts: seeded, nested, weighted; clear errors; applied once by GenerationRequest.resolved."""
import pytest

from easel.pipelines.request import GenerationRequest
from easel.text.wildcards import WildcardLibrary, expand, has_dynamic_syntax


@pytest.fixture
def library(tmp_path):
    (tmp_path / "colors").mkdir()
    (tmp_path / "colors" / "warm.txt").write_text("# warm colours\nred\n\norange\n")
    (tmp_path / "thing.txt").write_text("__colors/warm__ star\nblue {circle|square}\n")
    (tmp_path / "loop.txt").write_text("a __loop__\n")
    return WildcardLibrary([tmp_path])


def test_same_seed_same_prompt_and_seeds_differ(library):
    text = "a __thing__ and a {big|small|tiny} {circle|{green|blue} square}"
    out = [expand(text, s, library) for s in range(40)]
    assert out == [expand(text, s, library) for s in range(40)]
    assert len(set(out)) > 5
    for o in out:
        assert "{" not in o and "__" not in o


def test_wildcard_lines_skip_comments_and_blanks_and_nest(library):
    seen = {expand("__colors/warm__", s, library) for s in range(50)}
    assert seen == {"red", "orange"}
    things = {expand("__thing__", s, library) for s in range(80)}
    assert things == {"red star", "orange star", "blue circle", "blue square"}


def test_weights_and_counts():
    draws = [expand("{9::a|1::b}", s) for s in range(400)]
    assert 300 < draws.count("a") < 400
    two = expand("{2$$x|y|z}", 1)
    assert len(two.split(", ")) == 2 and len(set(two.split(", "))) == 2
    joined = expand("{3$$ and $$x|y|z}", 5)
    assert sorted(joined.split(" and ")) == ["x", "y", "z"]
    assert all(1 <= len(expand("{1-3$$x|y|z}", s).split(", ")) <= 3 for s in range(20))
    assert {expand("a {red |}star", s) for s in range(30)} == {"a red star", "a star"}


def test_escapes_and_plain_text_untouched():
    assert expand(r"a \{literal\} brace", 3) == r"a \{literal\} brace"
    assert expand("a (red:1.2) star [a|b] <lora:x:0.5>", 3) == "a (red:1.2) star [a|b] <lora:x:0.5>"
    assert not has_dynamic_syntax("plain (text:1.1)")
    assert has_dynamic_syntax("{a|b}") and has_dynamic_syntax("__x__")


def test_errors_name_the_problem(library, tmp_path):
    with pytest.raises(ValueError, match=r"__nope__ not found: no nope.txt in .*" + tmp_path.name):
        expand("a __nope__", 1, library)
    with pytest.raises(ValueError, match=r"did you mean __thing__"):
        expand("__thimg__", 1, library)
    with pytest.raises(ValueError, match="unclosed '{'"):
        expand("a {b|c", 1, library)
    with pytest.raises(ValueError, match="without its '{'"):
        expand("a b}", 1, library)
    with pytest.raises(ValueError, match="cycle: __loop__ -> __loop__"):
        expand("__loop__", 1, library)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no choices"):
        expand("__empty__", 1, library)


def test_names_cannot_leave_the_folder(library):
    assert expand("__../etc/passwd__", 1, library) == "__../etc/passwd__"  # not a wildcard name: left as text


def test_request_expands_once_from_its_seed(tmp_path, monkeypatch):
    (tmp_path / "animal.txt").write_text("cat\ndog\nfox\nowl\n")
    monkeypatch.setenv("EASEL_WILDCARDS", str(tmp_path))
    req = GenerationRequest("a __animal__ in {snow|rain}", negative_prompt="{blurry|dark}", seed=11)
    r = req.resolved(64, 1)
    assert r.prompt == expand(req.prompt, 11) and r.negative_prompt == expand("{blurry|dark}", 11)
    assert r.extra["prompt_template"] == "a __animal__ in {snow|rain}"
    assert r.extra["negative_prompt_template"] == "{blurry|dark}"
    assert req.prompt == "a __animal__ in {snow|rain}" and "prompt_template" not in req.extra  # input untouched
    again = r.resolved(64, 1)
    assert again.prompt == r.prompt  # expanding a resolved request changes nothing
    prompts = {GenerationRequest("a __animal__", seed=s).resolved(64, 1).prompt for s in range(30)}
    assert len(prompts) > 1


def test_request_check_fails_early(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_WILDCARDS", str(tmp_path))
    with pytest.raises(ValueError, match="prompt: wildcard __missing__ not found"):
        GenerationRequest("a __missing__").check()
    with pytest.raises(ValueError, match="negative_prompt: prompt has an unclosed"):
        GenerationRequest("a", negative_prompt="{x").check()


def test_per_image_requests_draw_from_their_own_seeds():
    req = GenerationRequest("a {red|blue|green|pink|grey} star", seed=5, batch_size=2, n_iter=2, subseed=100)
    assert req.draws_per_image and not GenerationRequest("a star", batch_size=4).draws_per_image
    parts = req.per_image()
    assert [p.seed for p in parts] == [5, 6, 7, 8] and [p.subseed for p in parts] == [100, 101, 102, 103]
    assert all(p.batch_size == 1 and p.n_iter == 1 for p in parts)
    assert [p.resolved(64, 1).prompt for p in parts] == [expand(req.prompt, s) for s in (5, 6, 7, 8)]
    with pytest.raises(ValueError, match="fixed seed"):
        GenerationRequest("x", seed=-1, batch_size=2).per_image()
    assert len(GenerationRequest("{a|b}", seed=1, n_iter=2).per_image(default_batch=3)) == 6


def test_expanded_fixes_the_seed_and_applies_once(tmp_path, monkeypatch):
    (tmp_path / "shape.txt").write_text("star\nsquare\n")
    monkeypatch.setenv("EASEL_WILDCARDS", str(tmp_path))
    req = GenerationRequest("a {red|green} __shape__ <lora:{a|b}:1>", seed=-1)
    e = req.expanded()
    assert e.seed >= 0 and e.subseed >= 0 and req.seed == -1
    assert "{" not in e.prompt and "__" not in e.prompt and e.prompt.endswith(":1>")
    assert e.resolved(64, 1).prompt == e.prompt and e.resolved(64, 1).seed == e.seed


def test_deep_nesting_and_long_prompts_are_refused_or_fast():
    with pytest.raises(ValueError, match="nests choices"):
        expand("{" * 2000 + "a" + "}" * 2000, 1)
    assert expand("{a|b} " * 20000, 1).count(" ") == 20000  # long prompts: linear, no quadratic re-scan
    with pytest.raises(ValueError, match="expands past"):
        expand("x" * 100_001 + "{a}", 1)


def test_each_image_of_a_batch_draws_its_own_prompt_and_records_the_template(one_thread):
    """Through Pipeline.generate: a batch of 4 with {a|b} choices gets each image's prompt from its own seed (as
    four single images would), the progress total counts every run, and the PNG keeps the template."""
    import easel
    from easel.pipelines.metadata import infotext
    from easel.pipelines.plan import count_steps
    from easel.pipelines.request import GenerationRequest
    pipe = easel.load(None)
    template = "a {red|blue|green|yellow|pink|purple} star"
    req = GenerationRequest(template, seed=11, steps=2, batch_size=4)
    steps = []
    results = pipe.generate(req, callback=lambda d: steps.append(d["i"]))
    prompts = [r.params["prompt"] for r in results]
    singles = [GenerationRequest(template, seed=11 + i, steps=2, batch_size=1).expanded().prompt for i in range(4)]
    assert prompts == singles and len(set(prompts)) > 1
    assert len(steps) == count_steps(req.resolved(pipe.config.default_size, pipe.config.default_batch))
    assert [r.params["seed"] for r in results] == [11, 12, 13, 14]
    assert all(r.params["prompt_template"] == template for r in results)
    assert f"Template: {template}" in infotext(results[0].params)
    assert not any("red" in w or "star" in w for r in results for w in r.warnings)  # words read after expansion
    resolved = req.resolved(pipe.config.default_size, pipe.config.default_batch)  # as a server may pass it on
    assert [r.params["prompt"] for r in pipe.generate(resolved)] == prompts
