"""AUTOMATIC1111's prompt syntax, parsed without torch: attention weights, prompt editing and alternation,
`AND` composition and `<kind:name:args>` extra-network tags.

A1111 applies them in this order, and so should a pipeline:

1. `extract_extra_networks(prompt)`: cut out `<lora:name:0.8>` tags (and other kinds);
2. `split_and(prompt)`: `a AND b :1.2` -> sub-prompts with composition weights (Liu et al. 2022,
   "Compositional Visual Generation with Composable Diffusion Models");
3. `prompt_schedule(sub_prompt, steps)`: `[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`
   -> the text to encode for each range of steps;
4. `parse_attention(text)`: `(x)`, `[x]`, `(x:1.3)`, `BREAK` -> (text, weight) pieces for the encoder.

The semantics are those of A1111's `modules/prompt_parser.py` (its docstring examples are our tests), with
two deliberate differences named where they happen: `BREAK` stays a chunk break inside brackets, and
`split_and` strips whitespace on both sides of a sub-prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = ["LORA_KINDS", "ExtraNetwork", "PromptSyntaxError", "extract_extra_networks", "lora_weights",
           "parse_attention", "prompt_schedule", "split_and"]


class PromptSyntaxError(ValueError):
    """A prompt that cannot be read (A1111 would crash on it too); the message says what to change."""


# ---------------------------------------------------------------------------------------------------
# Attention: (x) x1.1, [x] /1.1, (x:w), escapes, BREAK
# ---------------------------------------------------------------------------------------------------

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # multiplied, not divided by 1.1: A1111's floats, bit for bit
_ESCAPABLE = "()[]\\"
_ATTN_PLAIN = re.compile(r"[^\\()\[\]:]+")
# `:1.3)` closes a round bracket with an explicit weight; it is matched as one piece, like A1111 does.
_ATTN_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\bBREAK\b")


class _Weights:
    """The pieces read so far and the open brackets; closing a bracket multiplies the pieces it holds."""

    def __init__(self) -> None:
        self.pieces: list[list] = []  # [text, weight, is_break]
        self.round: list[int] = []  # index of the first piece inside each open "("
        self.square: list[int] = []

    def add_text(self, text: str) -> None:
        """Append plain text, turning each BREAK word into a break marker."""
        # The whitespace around a BREAK goes with it. (Stripping the parts rather than matching
        # r"\s*\bBREAK\b\s*" keeps long runs of spaces linear: that regex retries every space.)
        parts = _BREAK.split(text)
        for i, part in enumerate(parts):
            if i > 0:
                self.pieces.append(["BREAK", -1.0, True])
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            self.pieces.append([part, 1.0, False])

    def multiply_from(self, start: int, factor: float) -> None:
        """Multiply the weight of every piece from `start` on (break markers excepted)."""
        for piece in self.pieces[start:]:
            # A1111 multiplies the marker too, so that "(a BREAK b)" encodes the word "break" at -1.1
            # instead of breaking the chunk; a break is a break wherever it is written.
            if not piece[2]:
                piece[1] *= factor

    def close(self, opened: list[int], factor: float, literal: str) -> None:
        """Close the innermost bracket of one kind, or keep `literal` as text when none is open."""
        if opened:
            self.multiply_from(opened.pop(), factor)
        else:
            self.add_text(literal)


def _weight_value(match: re.Match) -> float:
    """The number of a `:w)` piece, or an error that names it."""
    try:
        return float(match.group(1))
    except ValueError:
        raise PromptSyntaxError(
            f"attention weight {match.group(1)!r} in {match.group(0)!r} is not a number: "
            f"write it like (word:1.2), or escape the bracket as \\)") from None


def _scan_attention(text: str) -> _Weights:
    """Read `text` left to right into weighted pieces; brackets left open apply to the end."""
    acc, i = _Weights(), 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            escaped = text[i + 1:i + 2]
            if escaped and escaped in _ESCAPABLE:
                acc.pieces.append([escaped, 1.0, False])
                i += 2
            else:  # a backslash before anything else is dropped, as in A1111
                acc.pieces.append(["", 1.0, False])
                i += 1
        elif char in "([":
            (acc.round if char == "(" else acc.square).append(len(acc.pieces))
            i += 1
        elif char == ":":
            weight = _ATTN_WEIGHT.match(text, i)
            if weight and acc.round:
                acc.multiply_from(acc.round.pop(), _weight_value(weight))
            else:
                acc.add_text(weight.group(0) if weight else ":")
            i = weight.end() if weight else i + 1
        elif char == ")":
            acc.close(acc.round, ROUND_MULTIPLIER, ")")
            i += 1
        elif char == "]":
            acc.close(acc.square, SQUARE_MULTIPLIER, "]")
            i += 1
        else:
            run = _ATTN_PLAIN.match(text, i)
            acc.add_text(run.group(0))
            i = run.end()
    return acc


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) pieces by A1111's emphasis syntax; BREAK -> ("BREAK", -1.0)."""
    acc = _scan_attention(text)
    # Unclosed brackets: all "(" first, then all "[", in the order they were opened (A1111's order,
    # which decides the last bits of the float weights).
    for start in acc.round:
        acc.multiply_from(start, ROUND_MULTIPLIER)
    for start in acc.square:
        acc.multiply_from(start, SQUARE_MULTIPLIER)
    merged: list[list] = []
    for piece in acc.pieces:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, float(w)) for t, w, _ in merged] or [("", 1.0)]


# ---------------------------------------------------------------------------------------------------
# Schedules: [from:to:when], [to:when], [from::when], [a|b|c]
# ---------------------------------------------------------------------------------------------------
#
# A1111's grammar (a lark Earley parser) reads a bracket group strictly: inside it, every bracket must
# close and ":" or "|" may only appear where the group's form allows. At the top level, a bracket or ":"
# that belongs to no valid group is plain text. A "|" outside every alternation, or a lone backslash,
# makes the whole prompt unparseable, and A1111 then uses the prompt unchanged for all steps.
#
# Since a valid group is balanced, one left-to-right pass with a stack of open brackets finds them all:
# a group is checked when its bracket closes; when it is invalid (or a closer does not match), every
# bracket still open contains it and is invalid too, so the stack is emptied and reading goes on at the
# top level. No recursion, so no nesting limit.

# Plain text (a backslash escapes any character but a newline), one bracket / separator, or a lone "\".
_SCHED_TOKEN = re.compile(r"(?:[^\\\[\]():|]|\\.)+|[\[\]():|]|\\")
# lark's SIGNED_NUMBER (ASCII digits), with optional whitespace around it.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
_CLOSER_OF = {"(": ")", "[": "]"}


@dataclass
class _Choice:
    """A prompt edit or an alternation: token ranges [start, end) of its branches."""
    kind: str  # "edit" | "alternate"
    branches: list[tuple[int, int]]  # edit: (before, after)
    end: int  # index of the token after the closing "]"
    when: str = ""  # edit: the number as written


@dataclass
class _Open:
    """A bracket not closed yet and the indices of the ":" / "|" directly inside it."""
    index: int
    bracket: str
    separators: list[int] = field(default_factory=list)


def _check_square(tokens: list[str], group: _Open, close: int) -> _Choice | bool:
    """Classify a closed [...] group: a _Choice, True for plain emphasis [x], False when invalid."""
    seps = group.separators
    kinds = {tokens[s] for s in seps}
    if not seps:
        return True
    bounds = [group.index] + seps + [close]
    if kinds == {"|"}:
        return _Choice("alternate", [(a + 1, b) for a, b in pairwise(bounds)], close + 1)
    if kinds != {":"} or len(seps) > 2:
        return False
    # The last part must be the step number alone: [to:when] or [from:to:when].
    last = tokens[seps[-1] + 1:close]
    number = _WHEN.fullmatch(last[0]) if len(last) == 1 else None
    if number is None:
        return False
    first = group.index + 1
    before = (first, seps[0]) if len(seps) == 2 else (first, first)
    after = (seps[0] + 1, seps[1]) if len(seps) == 2 else (first, seps[0])
    return _Choice("edit", [before, after], close + 1, number.group(1))


def _check_group(tokens: list[str], group: _Open, close: int) -> _Choice | bool:
    """Classify a group closed at `close`: a _Choice, True for emphasis, False when invalid."""
    if _CLOSER_OF[group.bracket] != tokens[close]:
        return False
    if group.bracket == "(":  # (x) or (x:anything)
        return len(group.separators) <= 1 and all(tokens[s] == ":" for s in group.separators)
    return _check_square(tokens, group, close)


def _parse_choices(prompt: str) -> tuple[list[str], dict[int, _Choice]] | None:
    """Tokens and {opening token index: choice} of `prompt`; None when A1111 could not parse it."""
    tokens = _SCHED_TOKEN.findall(prompt)
    choices: dict[int, _Choice] = {}
    stack: list[_Open] = []

    def give_up_open_groups() -> bool:
        # Their "|" become top-level text, which the grammar rejects.
        failed = any(tokens[s] == "|" for group in stack for s in group.separators)
        stack.clear()
        return not failed

    for i, tok in enumerate(tokens):
        if tok == "\\":
            return None
        if tok in ("(", "["):
            stack.append(_Open(i, tok))
        elif tok in (":", "|"):
            if stack:
                stack[-1].separators.append(i)
            elif tok == "|":
                return None
        elif tok in (")", "]") and stack:
            result = _check_group(tokens, stack[-1], i)
            if result is False:
                if not give_up_open_groups():
                    return None
                continue
            group = stack.pop()
            if isinstance(result, _Choice):
                choices[group.index] = result
    return (tokens, choices) if give_up_open_groups() else None


def _when_step(number: str, steps: int, hires_steps: int | None, old_scheduling: bool) -> int:
    """The last step of an edit's first part, by A1111's rules (see `prompt_schedule`)."""
    value = float(number)
    total = steps if hires_steps is None or old_scheduling else hires_steps
    if old_scheduling:
        value = value * total if value < 1 else value
    elif hires_steps is None:
        value = value * total if "." in number else value
    else:  # the hires pass counts on from the first pass: 1.5 or steps + n reach into it
        value = (value - 1.0) * total if "." in number else value - steps
    # int() truncates toward zero like A1111; clamping first keeps 1e999 from overflowing.
    return total if value >= total else int(max(value, -1.0))


def _render(tokens: list[str], choices: dict[int, _Choice], whens: dict[int, int], step: int) -> str:
    """The prompt text at `step`: each edit and alternation replaced by its active branch."""
    out: list[str] = []
    resume: list[tuple[int, int]] = []  # (end of the branch being read, where to go on after it)
    i = 0
    while True:
        while resume and i == resume[-1][0]:
            i = resume.pop()[1]
        if i >= len(tokens):
            return "".join(out)
        choice = choices.get(i)
        if choice is None:
            out.append(tokens[i])
            i += 1
            continue
        if choice.kind == "edit":
            start, end = choice.branches[0 if step <= whens[i] else 1]
        else:
            start, end = choice.branches[(step - 1) % len(choice.branches)]
        resume.append((end, choice.end))
        i = start


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None,
                    old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(last step, text), ...] for prompt editing and alternation (A1111 get_learned_conditioning_prompt_schedules).

    `[from:to:when]` shows `from` up to step `when` and `to` after it; `when` with a "." is a fraction of
    `steps` (0.25), without one a step number (5). `[to:when]` and `[from::when]` leave out one side.
    `[a|b|c]` alternates every step. `hires_steps`: the schedule of a hires-fix second pass, where
    fractions above 1 and step numbers above `steps` land. `old_scheduling`: A1111's option of that
    name (`when` < 1 is a fraction, anything else a step number). Weights like (x:1.2) stay in the text.
    """
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    total = steps if hires_steps is None or old_scheduling else hires_steps
    parsed = _parse_choices(prompt)
    if parsed is None:
        return [(total, prompt)]
    tokens, choices = parsed
    whens = {i: _when_step(c.when, steps, hires_steps, old_scheduling)
             for i, c in choices.items() if c.kind == "edit"}
    ends = {total} | {w for w in whens.values() if w >= 1}
    if any(c.kind == "alternate" for c in choices.values()):
        ends.update(range(1, total + 1))
    return [(end, _render(tokens, choices, whens, end)) for end in sorted(ends)]


# ---------------------------------------------------------------------------------------------------
# AND composition
# ---------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def _and_weight(sub: str) -> tuple[str, float]:
    """`text :1.2` -> ("text", 1.2); without a trailing `:number` the weight is 1."""
    # A number has no ":", so only the last ":" can start the weight. (str methods rather than A1111's
    # regex, which takes quadratic time on long runs of spaces.)
    body = sub.rstrip()
    colon = body.rfind(":")
    if colon >= 0 and _AND_WEIGHT.fullmatch(body[colon + 1:].lstrip()):
        return body[:colon], float(body[colon + 1:])
    return body, 1.0


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word AND into (sub-prompt, weight); `text :1.2` at a sub-prompt's end sets its weight."""
    parts = []
    for sub in _AND.split(prompt):
        text, weight = _and_weight(sub)
        # A1111 strips only the right side; the left side's whitespace never reaches a token.
        parts.append((text.strip(), weight))
    return parts


# ---------------------------------------------------------------------------------------------------
# Extra networks: <lora:name:te:unet>, <hypernet:name:w>, ...
# ---------------------------------------------------------------------------------------------------

LORA_KINDS = ("lora", "lyco")  # A1111 reads <lyco:...> as an alias of <lora:...>
# A tag is <word:anything but ">">; found by hand after "<word:" so that many unclosed tags stay linear.
_TAG_START = re.compile(r"<(\w+):")


@dataclass
class ExtraNetwork:
    """One `<kind:name:arg:...>` tag: `args` are the colon-separated items after the name."""
    kind: str
    name: str
    args: list[str] = field(default_factory=list)


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every `<kind:name:args>` tag from the prompt; return the rest and the tags in order."""
    found: list[ExtraNetwork] = []
    kept: list[str] = []
    pos = 0
    while (start := _TAG_START.search(prompt, pos)) is not None:
        close = prompt.find(">", start.end())
        if close < 0:  # no ">" left: no later tag can close either
            break
        if close == start.end():  # "<kind:>" is not a tag; look again one character on
            kept.append(prompt[pos:start.start() + 1])
            pos = start.start() + 1
            continue
        name, *args = prompt[start.end():close].split(":")
        found.append(ExtraNetwork(start.group(1), name, args))
        kept.append(prompt[pos:start.start()])
        pos = close + 1
    kept.append(prompt[pos:])
    return "".join(kept), found


def _multiplier(net: ExtraNetwork, text: str, what: str) -> float:
    """One LoRA multiplier as a float, or an error that names the tag."""
    try:
        return float(text)
    except ValueError:
        raise PromptSyntaxError(
            f"<{net.kind}:{':'.join([net.name, *net.args])}>: {what} {text!r} is not a number; "
            f"write it like <{net.kind}:{net.name}:0.8> or <{net.kind}:{net.name}:te=0.8:unet=0.5>") from None


def lora_weights(net: ExtraNetwork) -> tuple[float, float]:
    """(text-encoder, unet) multipliers of a LoRA tag: <lora:n>, <lora:n:w>, <lora:n:te:unet>, te=/unet=."""
    if net.kind not in LORA_KINDS:
        raise PromptSyntaxError(f"<{net.kind}:{net.name}> is not a LoRA tag (expected one of {LORA_KINDS})")
    # As A1111's ExtraNetworkParams: "key=value" items are named, the others positional.
    named = dict(a.split("=") for a in net.args if a.count("=") == 1)
    positional = [a for a in net.args if a.count("=") != 1]
    te = _multiplier(net, positional[0], "text-encoder weight") if positional else 1.0
    te = _multiplier(net, named["te"], "te=") if "te" in named else te
    unet = _multiplier(net, positional[1], "unet weight") if len(positional) > 1 else te
    unet = _multiplier(net, named["unet"], "unet=") if "unet" in named else unet
    return te, unet
