"""A1111 prompt styles: `styles.csv` with columns name, prompt, negative_prompt, applied by name.

A style's text replaces its `{prompt}` placeholder with the prompt; without one it is appended after ", " (A1111's
`merge_prompts`). Styles apply in the order given, to the prompt and the negative prompt alike.
"""
from __future__ import annotations

import csv
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "EASEL_STYLES"


@dataclass(frozen=True)
class Style:
    """One row of a styles file."""

    name: str
    prompt: str
    negative_prompt: str


def styles_files(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """Style files read, in order: `extra`, $EASEL_STYLES (`:`-separated), ./styles.csv (an earlier file's style
    wins over a later one's of the same name)."""
    files = [Path(f) for f in (extra or [])]
    files += [Path(f) for f in os.environ.get(ENV, "").split(os.pathsep) if f]
    files.append(Path("styles.csv"))
    return list(dict.fromkeys(files))


def read_styles(path: str | os.PathLike) -> dict[str, Style]:
    """The styles of one A1111 styles.csv; errors name the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    rows = csv.DictReader(text.splitlines(), skipinitialspace=True)
    if rows.fieldnames is None or "name" not in rows.fieldnames or "prompt" not in rows.fieldnames:
        raise ValueError(f"{path} is not a styles file: its first line must name the columns "
                         f"name,prompt,negative_prompt (got {rows.fieldnames})")
    styles = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            styles.setdefault(name, Style(name, row.get("prompt") or "", row.get("negative_prompt") or ""))
    return styles


def load_styles(files: list[str | os.PathLike] | None = None) -> dict[str, Style]:
    """Every style of the style files that exist (see `styles_files`); a file given in `files` must exist."""
    styles: dict[str, Style] = {}
    for path in styles_files(files):
        if not path.is_file():
            if files and path in [Path(f) for f in files]:
                raise FileNotFoundError(f"styles file not found: {path} (an A1111 styles.csv with columns "
                                        "name,prompt,negative_prompt)")
            continue
        for name, style in read_styles(path).items():
            styles.setdefault(name, style)
    return styles


def find_styles(names: list[str], styles: dict[str, Style]) -> list[Style]:
    """The styles called `names` (exact, else case-insensitive); an unknown name raises naming the ones there are."""
    found = []
    lower = {k.lower(): v for k, v in styles.items()}
    for name in names:
        style = styles.get(name) or lower.get(str(name).strip().lower())
        if style is None:
            _unknown(name, styles)
        found.append(style)
    return found


def _unknown(name: str, styles: dict[str, Style]):
    """Raise the error for a style name that is not in any file."""
    if not styles:
        searched = ", ".join(str(p) for p in styles_files())
        raise ValueError(f"unknown style {name!r}: no styles file was found (looked for {searched}); give one with "
                         f"--styles-file FILE or ${ENV} (A1111's styles.csv: columns name,prompt,negative_prompt)")
    close = difflib.get_close_matches(name, list(styles), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown style {name!r}; {hint}the styles are: {', '.join(sorted(styles))}")


def merge_prompts(style_text: str, prompt: str) -> str:
    """A style's text with `{prompt}` replaced by the prompt, or the two joined by ", " (A1111)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(p for p in (prompt.strip(), style_text.strip()) if p)


def apply_styles(prompt: str, negative_prompt: str, names: list[str],
                 styles: dict[str, Style] | None = None) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order."""
    for style in find_styles(names, load_styles() if styles is None else styles):
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
