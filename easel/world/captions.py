"""ShapeWorld caption grammar: lists, counts and relations with a few paraphrases, always naming
every object of the scene, over a vocabulary of ~45 words. `parse_caption` maps any caption back to
its objects and relation, so synonyms never lose meaning."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, SHAPES, Obj, Scene, relation, sample_scene

NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five"}
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
PAIR_JOINERS: tuple[str, ...] = ("and", "with")
SIZE_MENTION_P = 0.3  # each object's size is named in about a third of the mentions

_WORD_TO_NUMBER = {w: n for n, w in NUMBERS.items()} | {"a": 1, "an": 1}
_WORD_TO_SIZE = {w: size for size, words in SIZE_WORDS.items() for w in words}
_WORD_TO_SHAPE = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
_PHRASE_TO_RELATION = {p: rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}


@dataclass(frozen=True)
class Mention:
    """An object (or `count` identical objects) named in a caption; size None when not named."""

    colour: str
    shape: str
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says: its mentions, and a relation (name, index A, index B) if any."""

    mentions: tuple[Mention, ...]
    relation: tuple[str, int, int] | None = None


def mention_text(m: Mention, rng: np.random.Generator | None = None) -> str:
    """Noun phrase for a mention: 'a small red star', 'an orange box', 'three green squares'."""
    words = []
    if m.size is not None:
        options = SIZE_WORDS[m.size]
        words.append(options[0] if rng is None else options[rng.integers(len(options))])
    words += [m.colour, m.shape if m.count == 1 else PLURALS[m.shape]]
    if m.count == 1:
        det = "an" if words[0][0] in "aeiou" else "a"
    else:
        det = NUMBERS[m.count]
    return " ".join([det, *words])


def describe(mentions: list[Mention], rel: tuple[str, int, int] | None = None,
             rng: np.random.Generator | None = None) -> str:
    """A caption naming all mentions (in the given order); with `rel`, exactly two mentions
    joined by a relation phrase. Without rng the first paraphrase is always chosen."""
    def pick(options: tuple[str, ...]) -> str:
        """One paraphrase: the first without rng, else a random one."""
        return options[0] if rng is None else options[rng.integers(len(options))]

    parts = [mention_text(m, rng) for m in mentions]
    if rel is not None:
        if len(mentions) != 2 or rel[1:] not in ((0, 1), (1, 0)):
            raise ValueError("a relation caption needs exactly two mentions and rel=(name, 0, 1)")
        a, b = (parts[0], parts[1]) if rel[1] == 0 else (parts[1], parts[0])
        verb = "is " if rng is not None and rng.random() < 0.4 else ""
        return f"{a} {verb}{pick(RELATION_PHRASES[rel[0]])} {b}"
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return f"{parts[0]} {pick(PAIR_JOINERS)} {parts[1]}"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _group(objects: tuple[Obj, ...]) -> list[tuple[Obj, int]]:
    """Objects grouped by (colour, shape, size), keeping first appearance order."""
    groups: dict[tuple[str, str, str], list[Obj]] = {}
    for o in objects:
        groups.setdefault((o.colour, o.shape, o.size), []).append(o)
    return [(objs[0], len(objs)) for objs in groups.values()]


def caption(scene: Scene, seed: int) -> str:
    """A caption for the scene, deterministic in (scene, seed); names every object. Which object
    comes first is drawn at random, independent of where objects are."""
    rng = np.random.default_rng([seed, 0xCA97])
    groups = _group(scene.objects)
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    mentions = [Mention(o.colour, o.shape, o.size if rng.random() < SIZE_MENTION_P else None, n)
                for o, n in groups]
    if scene.kind == "relation" and len(scene.objects) == 2 and len(groups) == 2:
        rel = relation(groups[0][0], groups[1][0])
        if rel is not None:
            return describe(mentions, (rel, 0, 1), rng)
    return describe(mentions, None, rng)


def tokens(text: str) -> list[str]:
    """Words of a caption, with commas as their own token."""
    return text.lower().replace(",", " , ").split()


def vocabulary() -> list[str]:
    """Every token the grammar can produce (words and the comma), sorted."""
    words = set(_WORD_TO_NUMBER) | set(_WORD_TO_SIZE) | set(COLOURS) | set(_WORD_TO_SHAPE)
    words |= {w for p in _PHRASE_TO_RELATION for w in p.split()} | set(PAIR_JOINERS) | {"is", ","}
    return sorted(words)


def _read_mention(toks: list[str], i: int) -> tuple[Mention, int]:
    """Parse 'det [size] colour shape' starting at toks[i]; returns the mention and next index."""
    count = _WORD_TO_NUMBER[toks[i]]
    i += 1
    size = _WORD_TO_SIZE.get(toks[i]) if i < len(toks) else None
    i += size is not None
    if i + 1 >= len(toks) or toks[i] not in COLOURS or toks[i + 1] not in _WORD_TO_SHAPE:
        raise ValueError(f"expected 'colour shape' at word {i} of {' '.join(toks)!r}")
    return Mention(toks[i], _WORD_TO_SHAPE[toks[i + 1]], size, count), i + 2


def parse_caption(text: str) -> ParsedCaption:
    """Read a grammar caption back into its mentions and relation; ValueError if off-grammar."""
    toks = tokens(text)
    mentions: list[Mention] = []
    between: list[list[str]] = [[]]
    i = 0
    while i < len(toks):
        if toks[i] in _WORD_TO_NUMBER:
            m, i = _read_mention(toks, i)
            mentions.append(m)
            between.append([])
        else:
            between[-1].append(toks[i])
            i += 1
    unknown = set(toks) - set(vocabulary())
    if unknown or not mentions:
        raise ValueError(f"caption {text!r} is off-grammar (unknown words: {sorted(unknown)})")
    link = " ".join(w for w in between[1] if w != "is") if len(mentions) == 2 else ""
    rel = (_PHRASE_TO_RELATION[link], 0, 1) if link in _PHRASE_TO_RELATION else None
    return ParsedCaption(tuple(mentions), rel)


def caption_corpus(n: int, seed: int = 0) -> list[str]:
    """n training captions (scenes seed..seed+n-1), e.g. to train a tokenizer."""
    return [caption(sample_scene(s), s) for s in range(seed, seed + n)]
