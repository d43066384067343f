"""GenEval-style ShapeWorld benchmark: prompts with machine-readable requirements, judged by the
analytic scene parser. Categories (GenEval's six, the core) and what passes:

- single_object  "a red star"                    : some star (colour not checked)
- colors         "a red star"                    : some red star
- two_object     "a red star and a blue circle"  : some star and some circle (colours not checked)
- counting       "three green squares"           : exactly three green squares
- position       "a red star left of a blue box" : both present, in that relation (scenes.relation)
- color_attr     "a red star and a blue circle"  : a red star and a blue circle
plus `size` (sizes named and checked) and `unseen_binding` (held-out colour/shape pairs and
relation triples that no training scene contains). `overall` is the mean of the six core categories.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFilter

from .captions import Mention, check_lang, describe
from .judge import Detected, parse
from .render import render
from .scenes import (BACKGROUND_RANGE, COLOURS, HELD_OUT_PAIRS, HELD_OUT_RELATIONS, RELATIONS,
                     SHAPES, Scene, make_objects, relation)

CORE_CATEGORIES: tuple[str, ...] = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
CATEGORIES: tuple[str, ...] = CORE_CATEGORIES + ("size", "unseen_binding")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_COLOURS = tuple(COLOURS)


@dataclass(frozen=True)
class Prompt:
    """A benchmark prompt: its text, category, what the judge checks, and every object it names."""

    text: str
    category: str
    requirements: dict  # {"objects": [{"colour"?, "shape"?, "size"?, "count"?}], "relation"?: (rel, i, j)}
    mentions: tuple[Mention, ...]
    relation: tuple[str, int, int] | None = None


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one image; truthy when it passed."""

    passed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.passed


def _spec(m: Mention, keys: tuple[str, ...]) -> dict:
    """The attributes of a mention the judge should check."""
    spec = {k: getattr(m, k) for k in keys if getattr(m, k) is not None}
    if m.count > 1:
        spec["count"] = m.count
    return spec


def _allowed_pair(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                  unlike: tuple[str, str] | None = None) -> tuple[str, str]:
    """A (colour, shape) pair seen in training, optionally with a fixed colour or shape, and with
    another colour and another shape than the pair `unlike`."""
    while True:
        c = colour or _COLOURS[rng.integers(len(_COLOURS))]
        s = shape or SHAPES[rng.integers(len(SHAPES))]
        if (c, s) not in HELD_OUT_PAIRS and (unlike is None or (c != unlike[0] and s != unlike[1])):
            return c, s


def _triple_held_out(a: str, rel: str, b: str) -> bool:
    return (a, rel, b) in HELD_OUT_RELATIONS or (b, INVERSE[rel], a) in HELD_OUT_RELATIONS


def _two(rng: np.random.Generator, first: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """Two pairs with different colours and different shapes (so the objects cannot be confused)."""
    a = first or _allowed_pair(rng)
    return [a, _allowed_pair(rng, unlike=a)]


def _prompt(category: str, mentions: list[Mention], keys: tuple[str, ...], rng: np.random.Generator,
            rel: tuple[str, int, int] | None = None) -> Prompt:
    req: dict = {"objects": [_spec(m, keys) for m in mentions]}
    if rel is not None:
        req["relation"] = rel
    return Prompt(describe(mentions, rel, rng), category, req, tuple(mentions), rel)


def _make_one(category: str, i: int, rng: np.random.Generator) -> Prompt:
    """The i-th prompt of a category (i cycles shapes, colours, counts and relations evenly)."""
    cs = ("colour", "shape")
    if category == "single_object":
        c, s = _allowed_pair(rng, shape=SHAPES[i % len(SHAPES)])
        return _prompt(category, [Mention(c, s)], ("shape",), rng)
    if category == "colors":
        c, s = _allowed_pair(rng, colour=_COLOURS[i % len(_COLOURS)])
        return _prompt(category, [Mention(c, s)], cs, rng)
    if category in ("two_object", "color_attr"):
        keys = ("shape",) if category == "two_object" else cs
        return _prompt(category, [Mention(c, s) for c, s in _two(rng)], keys, rng)
    if category == "counting":
        c, s = _allowed_pair(rng)
        return _prompt(category, [Mention(c, s, count=2 + i % 4)], cs, rng)
    if category == "position":
        rel = RELATIONS[i % len(RELATIONS)]
        while _triple_held_out((pairs := _two(rng))[0][1], rel, pairs[1][1]):
            pass
        return _prompt(category, [Mention(c, s) for c, s in pairs], cs, rng, (rel, 0, 1))
    if category == "size":
        sizes = [("small",), ("large",), ("small", "large"), ("large", "small")][i % 4]
        mentions = [Mention(c, s, z) for (c, s), z in zip(_two(rng), sizes)]
        return _prompt(category, mentions, cs + ("size",), rng)
    if category == "unseen_binding":
        return _make_unseen(i, rng)
    raise ValueError(f"unknown category {category!r}: choose one of {CATEGORIES}")


def _make_unseen(i: int, rng: np.random.Generator) -> Prompt:
    """Held-out pair alone, held-out pair beside another object, or a held-out relation triple."""
    cs = ("colour", "shape")
    if i % 3 == 0:
        c, s = HELD_OUT_PAIRS[(i // 3) % len(HELD_OUT_PAIRS)]
        return _prompt("unseen_binding", [Mention(c, s)], cs, rng)
    if i % 3 == 1:
        pairs = _two(rng, HELD_OUT_PAIRS[(i // 3) % len(HELD_OUT_PAIRS)])
        if rng.random() < 0.5:
            pairs.reverse()
        return _prompt("unseen_binding", [Mention(c, s) for c, s in pairs], cs, rng)
    a, rel, b = HELD_OUT_RELATIONS[(i // 3) % len(HELD_OUT_RELATIONS)]
    ca = _allowed_pair(rng, shape=a)[0]
    cb = _allowed_pair(rng, shape=b, unlike=(ca, a))[0]
    return _prompt("unseen_binding", [Mention(ca, a), Mention(cb, b)], cs, rng, (rel, 0, 1))


def translate(prompt: Prompt, lang: str) -> Prompt:
    """The same prompt (objects, relation, requirements) worded in another language of the grammar."""
    if check_lang(lang) == "en":
        return prompt
    rng = np.random.default_rng([0x7A, *map(ord, prompt.text)])  # a paraphrase fixed by the English text
    return dataclasses.replace(prompt, text=describe(list(prompt.mentions), prompt.relation, rng, lang))


def make_prompts(seed: int = 0, per_category: int = 32, categories: Iterable[str] = CATEGORIES,
                 lang: str = "en") -> list[Prompt]:
    """The benchmark prompts (distinct texts within a category), deterministic in the seed; with lang="zh" the
    same prompts in Chinese (so `--lang zh` and `--lang en` scores compare the languages, nothing else)."""
    check_lang(lang)
    if lang != "en":
        return [translate(p, lang) for p in make_prompts(seed, per_category, categories)]
    rng = np.random.default_rng([seed, 0xBE7C])
    prompts = []
    for category in categories:
        texts: set[str] = set()
        i = 0
        while len(texts) < per_category and i < 50 * per_category:
            p = _make_one(category, i, rng)
            i += 1
            if p.text not in texts:
                texts.add(p.text)
                prompts.append(p)
    return prompts


# ----------------------------------------------------------------------------- judging


def _name(spec: dict) -> str:
    words = [str(spec[k]) for k in ("count", "size", "colour", "shape") if k in spec]
    return " ".join(words) or "object"


def _seen(found: list[Detected]) -> str:
    return ", ".join(f"{d.size} {d.colour} {d.shape}" for d in found) or "nothing"


def _matching(found: list[Detected], spec: dict) -> list[Detected]:
    return [d for d in found if all(getattr(d, k) == spec[k] for k in ("colour", "shape", "size") if k in spec)]


def judge(image, prompt: Prompt) -> Verdict:
    """Does the image satisfy the prompt? `image`: PIL, uint8 array, tensor, or parse() output."""
    found = image if isinstance(image, list) else parse(image)
    req = prompt.requirements
    groups = []
    for spec in req["objects"]:
        hits = _matching(found, spec)
        want = spec.get("count")
        if (want is None and not hits) or (want is not None and len(hits) != want):
            return Verdict(False, f"found {len(hits)} x {_name(spec)}; saw {_seen(found)}")
        groups.append(hits)
    if "relation" in req:
        rel, i, j = req["relation"]
        if not any(relation(a, b) == rel for a in groups[i] for b in groups[j] if a is not b):
            return Verdict(False, f"{_name(req['objects'][i])} not {rel} of {_name(req['objects'][j])}; "
                                  f"saw {_seen(found)}")
    return Verdict(True, f"ok; saw {_seen(found)}")


def ground_truth_image(prompt: Prompt, seed: int = 0, size: int = 64) -> Image.Image:
    """A render that satisfies the prompt: exactly the named objects, relation placed clearly."""
    return render(ground_truth_scene(prompt, seed), size)


def ground_truth_scene(prompt: Prompt, seed: int = 0) -> Scene:
    """A scene that satisfies the prompt; its objects follow the mentions in order (each repeated count times)."""
    rng = np.random.default_rng([seed, 0x6727])
    for attempt in range(100):
        specs = []
        for m in prompt.mentions:
            free = "small" if m.count >= 4 or attempt >= 50 or rng.random() < 0.5 else "large"
            specs += [(m.colour, m.shape, m.size or free)] * m.count
        objects = make_objects(rng, specs, prompt.relation)
        if objects is not None:
            background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
            return Scene(background, objects, "benchmark", seed)
    raise RuntimeError(f"cannot place the objects of {prompt.text!r} in one image")


def shuffled(prompts: list[Prompt], seed: int = 0) -> list[Prompt]:
    """The floor: for image i (made for prompts[i]) a different prompt of the same category."""
    rng = np.random.default_rng([seed, 0x5F1E])
    out = list(prompts)
    for category in dict.fromkeys(p.category for p in prompts):
        idx = [k for k, p in enumerate(prompts) if p.category == category]
        if len(idx) < 2:
            continue
        perm = [idx[k] for k in rng.permutation(len(idx))]
        shift = int(rng.integers(1, len(idx)))  # a rotation of a permutation is a derangement
        for k, src in enumerate(perm):
            out[src] = prompts[perm[(k + shift) % len(perm)]]
    return out


def evaluate(images: list, prompts: list[Prompt], judged: list[Prompt] | None = None) -> list[tuple[Prompt, Verdict]]:
    """Judge images[i] against judged[i] (default prompts[i]); results keyed by judged prompt."""
    judged = prompts if judged is None else judged
    if len(images) != len(judged):
        raise ValueError(f"{len(images)} images for {len(judged)} prompts: pass one image per prompt")
    return [(p, judge(img, p)) for img, p in zip(images, judged)]


def ground_truth_results(prompts: list[Prompt], seeds: Iterable[int] = (0,), size: int = 64,
                         transform: Callable[[Image.Image], Image.Image] | None = None,
                         shuffle: bool = False) -> list[tuple[Prompt, Verdict]]:
    """Judge ground-truth renders (optionally transformed, e.g. blurred, or shuffled = the floor)."""
    results = []
    for seed in seeds:
        images = [ground_truth_image(p, seed, size) for p in prompts]
        if transform is not None:
            images = [transform(im) for im in images]
        results += evaluate(images, prompts, shuffled(prompts, seed) if shuffle else None)
    return results


def score(results: Iterable[tuple[Prompt, object]]) -> dict[str, float]:
    """Pass rate per category, and `overall` = mean over the core categories present."""
    tally: dict[str, list[int]] = {}
    for prompt, verdict in results:
        tally.setdefault(prompt.category, []).append(int(bool(verdict)))
    scores = {c: float(np.mean(tally[c])) for c in CATEGORIES if c in tally}
    core = [scores[c] for c in CORE_CATEGORIES if c in scores]
    if core:
        scores["overall"] = float(np.mean(core))
    return scores


def report_markdown(scores_by_row: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per image source (generated, ground truth, shuffled, ...)."""
    cols = list(CATEGORIES) + ["overall"]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, scores in scores_by_row.items():
        cells = [f"{scores[c]:.2f}" if c in scores else "-" for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def blur(radius_at_64: float = 1.0) -> Callable[[Image.Image], Image.Image]:
    """A Gaussian blur transform whose radius scales with the image (radius_at_64 at 64 px)."""
    return lambda im: im.filter(ImageFilter.GaussianBlur(radius_at_64 * im.width / 64))


def main(argv: list[str] | None = None) -> None:
    """Print the judge's scores on ground truth, blurred ground truth and the shuffled floor."""
    ap = argparse.ArgumentParser(description="ShapeWorld benchmark: judge sanity rows")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-category", type=int, default=32)
    args = ap.parse_args(argv)
    prompts = make_prompts(0, args.per_category)
    seeds = range(args.seeds)
    rows = {}
    for name, kwargs in (("ground truth", {}), ("blurred ground truth (r=1 @64)", {"transform": blur(1.0)}),
                         ("blurred ground truth (r=1.5 @64)", {"transform": blur(1.5)}),
                         ("shuffled (floor)", {"shuffle": True})):
        t = time.perf_counter()
        results = ground_truth_results(prompts, seeds, args.size, **kwargs)
        rows[name] = score(results)
        print(f"{name}: {len(results)} images in {time.perf_counter() - t:.1f} s")
    print(report_markdown(rows))


if __name__ == "__main__":
    main()
