"""Small image folders for the user-training tests (coloured shapes with captions)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}


def shape_image(colour: str, size: tuple[int, int] = (40, 40), seed: int = 0) -> Image.Image:
    """A coloured disc on grey, placed by `seed`."""
    w, h = size
    im = Image.new("RGB", size, (128, 128, 128))
    r = min(w, h) // 3
    cx, cy = w // 2 + (seed % 3 - 1) * r // 2, h // 2 + (seed % 2) * r // 3
    ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return im


def make_folder(root: Path, n: int = 6, sizes=((40, 40),), captions: bool = True, sub: str | None = None) -> Path:
    """n images (cycling colours and sizes) with sidecar captions "a <colour> circle" in root[/sub]."""
    folder = root / sub if sub else root
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        shape_image(colour, sizes[i % len(sizes)], i).save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"a {colour} circle, photo, small\n")
    return root
