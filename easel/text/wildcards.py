"""Wildcards (`__name__`: a random line of wildcards/name.txt) and dynamic prompts (`{a|b|c}`, `{2::a|b}`,
`{2$$a|b|c}`), expanded with a seeded generator so that the same seed always gives the same prompt.

The syntax is the sd-dynamic-prompts extension's (which A1111 and ComfyUI users write):
- `{a|b|c}` one of the options; options nest: `{a {big|small} star|a circle}`; an option may be empty: `{red |}`;
- `{2::a|b}` option weights (a is drawn twice as often as b; unweighted options weigh 1);
- `{2$$a|b|c}` two different options joined by ", "; `{1-3$$a|b|c}` one to three; `{2$$ and $$a|b|c}` joined by
  " and ";
- `__name__` a line of `name.txt` in a wildcards folder (`__colors/warm__`: colors/warm.txt); blank lines and lines
  starting with `#` are skipped; a line may use the syntax again (wildcards inside wildcards);
- `\\{`, `\\}`, `\\|` stay literal (and are left as written, so expanding twice changes nothing).
"""
from __future__ import annotations

import difflib
import os
import random
import re
from pathlib import Path

WILDCARD = re.compile(r"__([A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*?)__")  # names cannot climb out of the folder
COUNT = re.compile(r"^\s*(\d+)(?:\s*-\s*(\d+))?\s*\$\$(?:(.*?)\$\$)?", re.S)
WEIGHT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*::", re.S)
MAX_DEPTH = 16  # wildcards inside wildcards: deeper than this is a cycle
MAX_NESTING = 64  # choices and wildcards inside each other (well within Python's recursion limit)
MAX_LENGTH = 100_000  # characters: an expansion past this is a runaway (a wildcard that multiplies itself)
ENV = "EASEL_WILDCARDS"


def wildcard_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for wildcard files, in order: `extra`, $EASEL_WILDCARDS (`:`-separated), ./wildcards."""
    dirs = [Path(d) for d in (extra or [])]
    dirs += [Path(d) for d in os.environ.get(ENV, "").split(os.pathsep) if d]
    dirs.append(Path("wildcards"))
    return list(dict.fromkeys(dirs))


class WildcardLibrary:
    """Wildcard files found by name in a list of folders (read when first used)."""

    def __init__(self, dirs: list[str | os.PathLike] | None = None):
        self.dirs = [Path(d) for d in dirs] if dirs is not None else wildcard_dirs()
        self._cache: dict[str, list[str]] = {}

    def choices(self, name: str) -> list[str]:
        """The lines of wildcard `name` (comments and blank lines skipped); errors name the folders searched."""
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]

    def _read(self, name: str) -> list[str]:
        for folder in self.dirs:
            path = folder / f"{name}.txt"
            if path.is_file():
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
                lines = [ln for ln in lines if ln and not ln.startswith("#")]
                if not lines:
                    raise ValueError(f"wildcard __{name}__: {path} has no choices; write one choice per line")
                return lines
        searched = ", ".join(str(d) for d in self.dirs) or "(no folders)"
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean __{close[0]}__?" if close else ""
        raise ValueError(f"wildcard __{name}__ not found: no {name}.txt in {searched}{hint}; create the file (one "
                         f"choice per line) or give its folder with --wildcards DIR or ${ENV}")

    def names(self) -> list[str]:
        """Every wildcard name in the folders (`colors/warm` for colors/warm.txt)."""
        found = []
        for folder in self.dirs:
            if folder.is_dir():
                found += [p.relative_to(folder).with_suffix("").as_posix() for p in sorted(folder.rglob("*.txt"))]
        return list(dict.fromkeys(found))


def has_dynamic_syntax(text: str) -> bool:
    """Whether `text` has a wildcard or an unescaped brace (its expansion may depend on the seed, or fail)."""
    return bool(WILDCARD.search(text)) or bool(re.search(r"(?<!\\)[{}]", text))


def expand(text: str, seed: int, library: WildcardLibrary | None = None) -> str:
    """`text` with every `{...}` choice and `__wildcard__` replaced, drawn from `random.Random(seed)`; ValueError
    names a missing wildcard, an unclosed brace or a cycle."""
    if not has_dynamic_syntax(text):
        return text
    return _Expander(library if library is not None else WildcardLibrary(), random.Random(seed)).expand(text, ())


class _Expander:
    """One expansion: the generator is consumed left to right, depth first, so the result depends on the seed only."""

    def __init__(self, library: WildcardLibrary, rng: random.Random):
        self.library, self.rng = library, rng

    def expand(self, text: str, chain: tuple[str, ...], depth: int = 0) -> str:
        if depth > MAX_NESTING:
            raise ValueError(f"prompt nests choices {{...}} more than {MAX_NESTING} deep; flatten them")
        out, i, length = [], 0, 0
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                piece, i = text[i:i + 2], i + 2
            elif c == "{":
                end = _closing(text, i)
                piece, i = self.choose(text[i + 1:end], chain, depth + 1), end + 1
            elif c == "}":
                raise ValueError(f"prompt has a '}}' without its '{{' at character {i + 1}: {_around(text, i)}; "
                                 "write \\} for a literal brace")
            elif (m := WILDCARD.match(text, i)) is not None:
                piece, i = self.wildcard(m.group(1), chain, depth + 1), m.end()
            else:
                piece, i = c, i + 1
            out.append(piece)
            length += len(piece)
            if length > MAX_LENGTH:
                raise ValueError(f"prompt expands past {MAX_LENGTH} characters: a wildcard or choice multiplies "
                                 "itself; check the wildcard files")
        return "".join(out)

    def choose(self, inner: str, chain: tuple[str, ...], depth: int) -> str:
        """Expand one `{...}`: pick options (weighted, `n$$` of them) and expand what was picked."""
        lo = hi = 1
        joiner = ", "
        m = COUNT.match(inner)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            joiner = m.group(3) if m.group(3) is not None else joiner
            inner = inner[m.end():]
            if hi < lo:
                raise ValueError(f"{{{m.group(0)}...}}: the range {lo}-{hi} counts down; write {hi}-{lo}")
        options, weights = [], []
        for part in _split_options(inner):
            w = WEIGHT.match(part)
            weights.append(float(w.group(1)) if w else 1.0)
            options.append(part[w.end():] if w else part)
        n = min(self.rng.randint(lo, hi) if hi > lo else lo, len(options))
        picked = _weighted_sample(self.rng, options, weights, n)
        return joiner.join(self.expand(p, chain, depth) for p in picked)

    def wildcard(self, name: str, chain: tuple[str, ...], depth: int) -> str:
        """A seeded line of wildcard `name`, itself expanded."""
        if len(chain) >= MAX_DEPTH or name in chain:
            path = " -> ".join(f"__{n}__" for n in (*chain, name))
            raise ValueError(f"wildcards refer to each other in a cycle: {path}; remove the loop from the files")
        lines = self.library.choices(name)
        return self.expand(lines[self.rng.randrange(len(lines))], (*chain, name), depth)


def _weighted_sample(rng: random.Random, options: list[str], weights: list[float], n: int) -> list[str]:
    """`n` different options drawn with probability proportional to their weights, in the order drawn."""
    pool = list(zip(options, weights))
    picked = []
    for _ in range(n):
        total = sum(w for _, w in pool)
        if total <= 0:
            k = rng.randrange(len(pool))
        else:
            r, k = rng.random() * total, 0
            while k < len(pool) - 1 and r >= pool[k][1]:
                r -= pool[k][1]
                k += 1
        picked.append(pool.pop(k)[0])
    return picked


def _closing(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start` (nesting and escapes respected)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i
        i += 1
    raise ValueError(f"prompt has an unclosed '{{' at character {start + 1}: {_around(text, start)}; close it with "
                     "'}' or write \\{ for a literal brace")


def _split_options(inner: str) -> list[str]:
    """`a|{b|c}|d` -> ['a', '{b|c}', 'd']: split at the top-level `|` only."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            current.append(inner[i:i + 2])
            i += 2
            continue
        if c == "|" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            depth += (c == "{") - (c == "}")
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def _around(text: str, i: int, width: int = 20) -> str:
    """A quoted excerpt of `text` around position i (for error messages)."""
    return repr(text[max(0, i - width):i + width])
