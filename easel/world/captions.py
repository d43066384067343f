"""ShapeWorld caption grammar, in English and Chinese: lists, counts and relations with a few paraphrases,
always naming every object of the scene, over a vocabulary of ~45 English and ~50 Chinese words.
`parse_caption` maps any caption (either language) back to its objects and relation, so synonyms and
translations never lose meaning: "three red stars" and "三个红色的星星" parse to the same mentions.

Chinese has no spaces: a caption is cut into words by longest match over the Chinese lexicon
(`segment_zh`), and the tokenizer sees one token per character (see `easel.text.tokenizer`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import regex

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

LANGS: tuple[str, ...] = ("en", "zh")

# Chinese: the first word of every tuple is the one chosen without rng (the canonical translation).
ZH_NUMBERS: dict[int, str] = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}
ZH_MEASURE: tuple[str, ...] = ("个",)
ZH_MEASURE_BY_SHAPE: dict[str, tuple[str, ...]] = {"star": ("颗",)}  # 一颗星星: a second measure word for stars
ZH_COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("红色", "红"), "orange": ("橙色", "橘色"), "yellow": ("黄色", "黄"), "green": ("绿色", "绿"),
    "cyan": ("青色",), "blue": ("蓝色", "蓝"), "purple": ("紫色", "紫"), "pink": ("粉色", "粉红色"),
}
ZH_SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("圆形", "圆"), "square": ("正方形", "方块"), "triangle": ("三角形",), "diamond": ("菱形",),
    "star": ("星星", "五角星"), "cross": ("十字", "十字形"),
}
ZH_SIZES: dict[str, tuple[str, ...]] = {"small": ("小",), "large": ("大",)}
ZH_RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("左边", "左侧"), "right": ("右边", "右侧"), "above": ("上面", "上方"), "below": ("下面", "下方"),
}
ZH_PAIR_JOINERS: tuple[str, ...] = ("和", "与")
ZH_LIST_SEP = "、"
ZH_VERBS: tuple[str, ...] = ("在", "位于")
ZH_DE = "的"

_WORD_TO_NUMBER = {w: n for n, w in NUMBERS.items()} | {"a": 1, "an": 1}
_WORD_TO_SIZE = {w: size for size, words in SIZE_WORDS.items() for w in words}
_WORD_TO_SHAPE = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
_PHRASE_TO_RELATION = {p: rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}
_ZH_NUMBER = {w: n for n, w in ZH_NUMBERS.items()}
_ZH_COLOUR = {w: c for c, words in ZH_COLOURS.items() for w in words}
_ZH_SHAPE = {w: s for s, words in ZH_SHAPES.items() for w in words}
_ZH_SIZE = {w: z for z, words in ZH_SIZES.items() for w in words}
_ZH_RELATION = {w: r for r, words in ZH_RELATIONS.items() for w in words}
_ZH_MEASURES = set(ZH_MEASURE) | {w for words in ZH_MEASURE_BY_SHAPE.values() for w in words}


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


def _pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    """One paraphrase: the first without rng, else a random one."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def mention_text_zh(m: Mention, rng: np.random.Generator | None = None, tight: bool = False) -> str:
    """Chinese noun phrase: '三个红色的星星', '一个小的蓝色圆形', '两颗黄色星星'. `tight` drops the 的 between
    colour and shape (used before '的左边', where a second 的 reads badly)."""
    measure = _pick(ZH_MEASURE + ZH_MEASURE_BY_SHAPE.get(m.shape, ()), rng) if rng is not None and \
        rng.random() < 0.3 else ZH_MEASURE[0]
    words = [ZH_NUMBERS[m.count], measure]
    if m.size is not None:
        words += [_pick(ZH_SIZES[m.size], rng), ZH_DE]
    words.append(_pick(ZH_COLOURS[m.colour], rng))
    if not tight and (rng is None or rng.random() < 0.6):
        words.append(ZH_DE)
    words.append(_pick(ZH_SHAPES[m.shape], rng))
    return "".join(words)


def mention_text(m: Mention, rng: np.random.Generator | None = None, lang: str = "en") -> str:
    """Noun phrase for a mention: 'a small red star', 'an orange box', 'three green squares' (or Chinese)."""
    if lang == "zh":
        return mention_text_zh(m, rng)
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


def check_lang(lang: str) -> str:
    """`lang` if the grammar speaks it, else a ValueError listing the languages."""
    if lang not in LANGS:
        raise ValueError(f"unknown caption language {lang!r}: choose one of {', '.join(LANGS)}")
    return lang


def describe(mentions: list[Mention], rel: tuple[str, int, int] | None = None,
             rng: np.random.Generator | None = None, lang: str = "en") -> str:
    """A caption naming all mentions (in the given order); with `rel`, exactly two mentions
    joined by a relation phrase. Without rng the first paraphrase is always chosen."""
    if check_lang(lang) == "zh":
        return describe_zh(mentions, rel, rng)
    parts = [mention_text(m, rng) for m in mentions]
    if rel is not None:
        _check_relation(mentions, rel)
        a, b = (parts[0], parts[1]) if rel[1] == 0 else (parts[1], parts[0])
        verb = "is " if rng is not None and rng.random() < 0.4 else ""
        return f"{a} {verb}{_pick(RELATION_PHRASES[rel[0]], rng)} {b}"
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return f"{parts[0]} {_pick(PAIR_JOINERS, rng)} {parts[1]}"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _check_relation(mentions: list[Mention], rel: tuple[str, int, int]) -> None:
    if len(mentions) != 2 or rel[1:] not in ((0, 1), (1, 0)):
        raise ValueError("a relation caption needs exactly two mentions and rel=(name, 0, 1)")


def describe_zh(mentions: list[Mention], rel: tuple[str, int, int] | None = None,
                rng: np.random.Generator | None = None) -> str:
    """The Chinese caption: 'A和B', 'A、B和C', 'A在B的左边' (A is left of B), in the mentions' order."""
    if rel is not None:
        _check_relation(mentions, rel)
        a, b = (mentions[0], mentions[1]) if rel[1] == 0 else (mentions[1], mentions[0])
        return (mention_text_zh(a, rng) + _pick(ZH_VERBS, rng) + mention_text_zh(b, rng, tight=True) + ZH_DE
                + _pick(ZH_RELATIONS[rel[0]], rng))
    parts = [mention_text_zh(m, rng) for m in mentions]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + _pick(ZH_PAIR_JOINERS, rng) + parts[1]
    return ZH_LIST_SEP.join(parts[:-1]) + ZH_PAIR_JOINERS[0] + parts[-1]


def _group(objects: tuple[Obj, ...]) -> list[tuple[Obj, int]]:
    """Objects grouped by (colour, shape, size), keeping first appearance order."""
    groups: dict[tuple[str, str, str], list[Obj]] = {}
    for o in objects:
        groups.setdefault((o.colour, o.shape, o.size), []).append(o)
    return [(objs[0], len(objs)) for objs in groups.values()]


def caption(scene: Scene, seed: int, lang: str = "en") -> str:
    """A caption for the scene, deterministic in (scene, seed, lang); names every object. Which object
    comes first is drawn at random, independent of where objects are. The Chinese caption of a seed
    says what its English one says (same order, sizes and relation), in Chinese words."""
    rng = np.random.default_rng([seed, 0xCA97])
    groups = _group(scene.objects)
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    mentions = [Mention(o.colour, o.shape, o.size if rng.random() < SIZE_MENTION_P else None, n)
                for o, n in groups]
    if scene.kind == "relation" and len(scene.objects) == 2 and len(groups) == 2:
        rel = relation(groups[0][0], groups[1][0])
        if rel is not None:
            return describe(mentions, (rel, 0, 1), rng, lang)
    return describe(mentions, None, rng, lang)


_HAN = regex.compile(r"\p{Han}")


def is_chinese(text: str) -> bool:
    """True when the text holds a Chinese character (the grammar then reads it as Chinese)."""
    return _HAN.search(text) is not None


def zh_lexicon() -> list[str]:
    """Every Chinese word (and the enumeration comma) the grammar can produce, sorted."""
    words = set(_ZH_NUMBER) | _ZH_MEASURES | set(_ZH_COLOUR) | set(_ZH_SHAPE) | set(_ZH_SIZE) | set(_ZH_RELATION)
    return sorted(words | set(ZH_PAIR_JOINERS) | set(ZH_VERBS) | {ZH_DE, ZH_LIST_SEP})


def segment_zh(text: str, lexicon: list[str] | set[str] | None = None) -> list[tuple[str, bool]]:
    """Cut Chinese text into (word, known) by longest match over the lexicon; a run of characters no lexicon
    word starts at comes back as one unknown word. Whitespace separates; ASCII words pass through unknown."""
    lex = set(zh_lexicon() if lexicon is None else lexicon)
    longest = max((len(w) for w in lex), default=1)
    out: list[tuple[str, bool]] = []
    for chunk in text.split():
        i, unknown = 0, ""
        while i < len(chunk):
            hit = next((chunk[i:i + n] for n in range(min(longest, len(chunk) - i), 0, -1) if chunk[i:i + n] in lex),
                       None)
            if hit is None:
                unknown += chunk[i]
                i += 1
                continue
            if unknown:
                out.append((unknown, False))
                unknown = ""
            out.append((hit, True))
            i += len(hit)
        if unknown:
            out.append((unknown, False))
    return out


def tokens(text: str) -> list[str]:
    """Words of a caption, with commas as their own token (Chinese: cut by `segment_zh`)."""
    if is_chinese(text):
        return [w for w, _ in segment_zh(text.replace(",", "、").replace("，", "、"))]
    return text.lower().replace(",", " , ").split()


def vocabulary(lang: str = "en") -> list[str]:
    """Every token the grammar can produce in a language (words and the comma), sorted."""
    if check_lang(lang) == "zh":
        return zh_lexicon()
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


def _read_mention_zh(toks: list[str], i: int, text: str) -> tuple[Mention, int]:
    """Parse 'number measure [size 的] colour [的] shape' starting at toks[i]; -> mention, next index."""
    count = _ZH_NUMBER[toks[i]]
    i += 1
    if i >= len(toks) or toks[i] not in _ZH_MEASURES:
        raise ValueError(f"expected a measure word (个) after the number in {text!r}")
    i += 1
    size = _ZH_SIZE.get(toks[i]) if i < len(toks) else None
    if size is not None:
        i += 1 + (i + 1 < len(toks) and toks[i + 1] == ZH_DE)
    colour = _ZH_COLOUR.get(toks[i]) if i < len(toks) else None
    if colour is None:
        raise ValueError(f"expected a colour at word {i} of {text!r}")
    i += 1 + (i + 1 < len(toks) and toks[i + 1] == ZH_DE)
    if i >= len(toks) or toks[i] not in _ZH_SHAPE:
        raise ValueError(f"expected a shape at word {i} of {text!r}")
    return Mention(colour, _ZH_SHAPE[toks[i]], size, count), i + 1


def parse_caption_zh(text: str) -> ParsedCaption:
    """Read a Chinese grammar caption: mentions joined by 和/与/、, or 'A 在 B 的 <relation>'."""
    words = segment_zh(text.replace(",", "、").replace("，", "、"))
    unknown = [w for w, known in words if not known]
    if unknown or not words:
        raise ValueError(f"caption {text!r} is off-grammar (unknown words: {unknown})")
    toks = [w for w, _ in words]
    mentions, between, i = [], [[]], 0
    while i < len(toks):
        if toks[i] in _ZH_NUMBER and i + 1 < len(toks) and toks[i + 1] in _ZH_MEASURES:
            m, i = _read_mention_zh(toks, i, text)
            mentions.append(m)
            between.append([])
        else:
            between[-1].append(toks[i])
            i += 1
    if not mentions:
        raise ValueError(f"caption {text!r} is off-grammar (no '一个 颜色 形状' in it)")
    rel = None
    if len(mentions) == 2 and between[1] and between[1][0] in ZH_VERBS:
        tail = between[2]
        if len(tail) != 2 or tail[0] != ZH_DE or tail[1] not in _ZH_RELATION:
            raise ValueError(f"caption {text!r} is off-grammar: expected 'A在B的左边/右边/上面/下面'")
        rel = (_ZH_RELATION[tail[1]], 0, 1)
    return ParsedCaption(tuple(mentions), rel)


def parse_caption(text: str) -> ParsedCaption:
    """Read a grammar caption (English or Chinese) back into its mentions and relation; ValueError if off-grammar."""
    if is_chinese(text):
        return parse_caption_zh(text)
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


def caption_corpus(n: int, seed: int = 0, lang: str = "en") -> list[str]:
    """n training captions (scenes seed..seed+n-1), e.g. to train a tokenizer."""
    return [caption(sample_scene(s), s, lang) for s in range(seed, seed + n)]
