"""Which words of a ShapeWorld prompt the image followed: the ShapeWorld judge's verdict, word by word.

The judge (`easel.world.judge`) finds the objects in an image (colour, shape, size, position). A prompt in the
caption grammar says which objects there should be; here each content word gets its own verdict, so that the
report can put a word that was not followed next to its attention map:

- a colour word is followed when an object of its mention's shape has that colour (when no object has that shape,
  when any object has that colour: the shape word carries the blame then);
- a shape word when any object has that shape;
- a count word ("three") when exactly that many objects of the mention's colour and shape are there;
- a size word when one of the mention's objects has that size;
- a relation word ("left", "above", ...) when an object of the first mention stands in that relation to one of
  the second.
"""
from __future__ import annotations

from dataclasses import dataclass

from easel.world.captions import NUMBERS, PLURALS, RELATION_PHRASES, SIZE_WORDS, Mention, parse_caption, tokens
from easel.world.scenes import COLOURS, SHAPES, relation

RELATION_WORDS = {w for phrases in RELATION_PHRASES.values() for p in phrases for w in p.split()} - {"to", "the", "of",
                                                                                                      "on"}


@dataclass(frozen=True)
class WordVerdict:
    """One content word of the prompt: what it asks for and whether the image has it."""

    index: int  # position among the prompt's words
    word: str
    kind: str  # colour | shape | count | size | relation
    followed: bool
    reason: str


@dataclass(frozen=True)
class Judged:
    """The judge's verdict on the whole prompt, and per word."""

    passed: bool
    reason: str
    seen: str
    words: list[WordVerdict]

    def missed(self) -> list[WordVerdict]:
        """The words the image did not follow."""
        return [w for w in self.words if not w.followed]


def requirements(mentions: tuple[Mention, ...], rel) -> dict:
    """The judge's requirements of a parsed caption (what `easel eval` checks for a prompt of that text)."""
    objects = []
    for m in mentions:
        spec = {"colour": m.colour, "shape": m.shape, **({"size": m.size} if m.size else {})}
        objects.append({**spec, "count": m.count} if m.count > 1 else spec)
    return {"objects": objects, **({"relation": rel} if rel else {})}


def judge_prompt(text: str, image) -> Judged | None:
    """The verdicts for an image of a grammar prompt; None when the prompt is not in the caption grammar."""
    from easel.world.benchmark import Prompt, judge
    from easel.world.judge import parse
    try:
        parsed = parse_caption(text)
    except (ValueError, KeyError, IndexError):
        return None
    found = parse(image)
    verdict = judge(found, Prompt(text, "report", requirements(parsed.mentions, parsed.relation), parsed.mentions,
                                  parsed.relation))
    seen = ", ".join(f"{d.size} {d.colour} {d.shape}" for d in found) or "nothing"
    return Judged(verdict.passed, verdict.reason, seen, word_verdicts(text, parsed, found))


def word_verdicts(text: str, parsed, found) -> list[WordVerdict]:
    """Per content word (English grammar; Chinese prompts get none), in the prompt's order."""
    words = tokens(text)
    if any(not w.isascii() for w in words):
        return []
    out, m = [], -1
    for i, w in enumerate(words):
        if w in NUMBERS.values() or w in ("a", "an"):
            m += 1  # every mention starts with its count word ("a" for one)
            if w in NUMBERS.values():
                out.append(_count(i, w, parsed.mentions[m], found))
        elif m < 0:
            continue
        elif w in COLOURS:
            out.append(_colour(i, w, parsed.mentions[m], found))
        elif w in SHAPES or w in PLURALS.values():
            out.append(_shape(i, w, parsed.mentions[m], found))
        elif any(w in ws for ws in SIZE_WORDS.values()):
            out.append(_size(i, w, parsed.mentions[m], found))
        elif w in RELATION_WORDS and parsed.relation:
            out.append(_relation(i, w, parsed, found))
    return out


def _matching(found, m: Mention) -> list:
    return [d for d in found if d.colour == m.colour and d.shape == m.shape]


def _colour(i: int, w: str, m: Mention, found) -> WordVerdict:
    same_shape = [d for d in found if d.shape == m.shape]
    if same_shape:
        ok = any(d.colour == m.colour for d in same_shape)
        colours = ", ".join(sorted({d.colour for d in same_shape}))
        return WordVerdict(i, w, "colour", ok, f"a {m.colour} {m.shape} is there" if ok else
                           f"the {m.shape}s are {colours}")
    ok = any(d.colour == m.colour for d in found)
    return WordVerdict(i, w, "colour", ok, f"no {m.shape}, but something {m.colour}" if ok else
                       f"no {m.shape} and nothing {m.colour}")


def _shape(i: int, w: str, m: Mention, found) -> WordVerdict:
    ok = any(d.shape == m.shape for d in found)
    shapes = ", ".join(sorted({d.shape for d in found})) or "nothing"
    return WordVerdict(i, w, "shape", ok, f"a {m.shape} is there" if ok else f"no {m.shape}; shapes seen: {shapes}")


def _count(i: int, w: str, m: Mention, found) -> WordVerdict:
    n = len(_matching(found, m))
    return WordVerdict(i, w, "count", n == m.count, f"{n} {m.colour} {m.shape}(s), asked for {m.count}")


def _size(i: int, w: str, m: Mention, found) -> WordVerdict:
    sizes = sorted({d.size for d in _matching(found, m)})
    ok = m.size in sizes
    return WordVerdict(i, w, "size", ok, f"the {m.colour} {m.shape}: {', '.join(sizes) or 'not found'}")


def _relation(i: int, w: str, parsed, found) -> WordVerdict:
    rel, a, b = parsed.relation
    first, second = _matching(found, parsed.mentions[a]), _matching(found, parsed.mentions[b])
    ok = any(relation(x, y) == rel for x in first for y in second if x is not y)
    seen = sorted({str(relation(x, y)) for x in first for y in second if x is not y})
    return WordVerdict(i, w, "relation", ok, f"asked for {rel}; seen: {', '.join(seen) or 'objects not both found'}")
