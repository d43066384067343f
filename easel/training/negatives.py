"""Hard-negative captions for contrastive training: the same words, one fact changed.

Working on the parsed caption (mentions + relation) rather than on strings guarantees that a
negative is grammatical and really false for the scene: colours or shapes swapped between two
objects (attribute binding), the relation flipped (position), a count moved by one (counting).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from easel.world.captions import Mention, ParsedCaption, describe, is_chinese, parse_caption
from easel.world.scenes import COLOURS, SHAPES

NEGATIVE_KINDS = ("colour", "shape", "relation", "count")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
MAX_COUNT = 5


def caption_key(parsed: ParsedCaption) -> tuple:
    """What a caption asserts, ignoring size words and word order: equal keys = interchangeable captions.

    Sizes are dropped on purpose: "a red star" is also true of a scene captioned "a large red star",
    so in-batch masking must treat the two as duplicates.
    """
    items = [(m.colour, m.shape, m.count) for m in parsed.mentions]
    if parsed.relation is None:
        return ("set", tuple(sorted(items)))
    rel, a, b = parsed.relation
    if rel in ("right", "below"):  # "A right of B" says the same as "B left of A"
        rel, a, b = OPPOSITE[rel], b, a
    return ("rel", rel, items[a], items[b])


def _swap(mentions: list[Mention], field: str, rng: np.random.Generator) -> list[Mention] | None:
    """Swap `field` between two mentions that differ in it; one mention: replace it by another value."""
    if len(mentions) == 1:
        pool = list(COLOURS) if field == "colour" else list(SHAPES)
        old = getattr(mentions[0], field)
        new = [v for v in pool if v != old][rng.integers(len(pool) - 1)]
        return [dataclasses.replace(mentions[0], **{field: new})]
    pairs = [(i, j) for i in range(len(mentions)) for j in range(i + 1, len(mentions))
             if getattr(mentions[i], field) != getattr(mentions[j], field)]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    out = list(mentions)
    out[i] = dataclasses.replace(mentions[i], **{field: getattr(mentions[j], field)})
    out[j] = dataclasses.replace(mentions[j], **{field: getattr(mentions[i], field)})
    return out


def _recount(mentions: list[Mention], rng: np.random.Generator) -> list[Mention]:
    """Move one mention's count up or down by one (1 <-> 'a', at most MAX_COUNT)."""
    k = int(rng.integers(len(mentions)))
    n = mentions[k].count
    options = [c for c in (n - 1, n + 1) if 1 <= c <= MAX_COUNT]
    out = list(mentions)
    out[k] = dataclasses.replace(mentions[k], count=options[rng.integers(len(options))])
    return out


def negative(text: str, kind: str, rng: np.random.Generator) -> str | None:
    """One hard negative of `kind` for a caption (in the caption's language), or None when that kind does not apply."""
    parsed = parse_caption(text)
    mentions, rel = list(parsed.mentions), parsed.relation
    if kind in ("colour", "shape"):
        changed = _swap(mentions, kind, rng)
    elif kind == "relation":
        if rel is None:
            return None
        rel = (OPPOSITE[rel[0]], rel[1], rel[2])
        changed = mentions
    elif kind == "count":
        changed = _recount(mentions, rng)
        if rel is not None and any(m.count > 1 for m in changed):
            rel = None  # relation captions are about single objects; a plural breaks the grammar
            changed = None
    else:
        raise ValueError(f"unknown negative kind {kind!r}: choose from {NEGATIVE_KINDS}")
    if changed is None:
        return None
    out = describe(changed, rel, rng, "zh" if is_chinese(text) else "en")
    return out if caption_key(parse_caption(out)) != caption_key(parsed) else None


def hard_negatives(text: str, rng: np.random.Generator, kinds: tuple[str, ...] = NEGATIVE_KINDS,
                   tries: int = 3) -> dict[str, str]:
    """{kind: negative caption} for every kind that applies to this caption.

    A random swap can land on an equivalent caption (swapping the colours of a red and a pink
    triangle when a pink one exists too); a few retries find a real change when there is one.
    """
    out = {}
    for kind in kinds:
        for _ in range(tries):
            neg = negative(text, kind, rng)
            if neg is not None:
                out[kind] = neg
                break
    return out
