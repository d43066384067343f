"""Atomic file writes: write to a temp file beside the target, then rename, so nothing is ever half-written."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def next_image_number(folder: str | os.PathLike) -> int:
    """The next free A1111-style image number in a folder (files named NNNNN-...png): one more than the largest."""
    nums = [int(p.name.split("-")[0]) for p in Path(folder).glob("*.png") if p.name.split("-")[0].isdigit()]
    return max(nums, default=-1) + 1


def save_image(image, path: str | os.PathLike, **save_args) -> Path:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"), **save_args)
    return path
