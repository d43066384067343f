"""Contact sheets: images in a grid with a caption under each (world samples, eval passes/failures)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def load_font(px: int) -> ImageFont.ImageFont:
    """A small TrueType font when Pillow has one, else its built-in bitmap font."""
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def captioned_grid(images: list[Image.Image], captions: list[str], cols: int = 6, min_cell: int = 160,
                   lines: int = 4) -> Image.Image:
    """Images upscaled (nearest) to at least `min_cell` px, `cols` per row, up to `lines` caption lines each."""
    if not images:
        raise ValueError("no images to put in a grid")
    size = images[0].width
    scale = max(1, -(-min_cell // size))
    cell, cols = size * scale, min(len(images), cols)
    rows = -(-len(images) // cols)
    font, line_h = load_font(11), 13
    text_h = line_h * lines + 6
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, text) in enumerate(zip(images, captions)):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        sheet.paste(im.convert("RGB").resize((cell, int(cell * im.height / im.width)), Image.NEAREST), (x, y))
        for j, line in enumerate(wrap(draw, text, font, cell - 6)[:lines]):
            draw.text((x + 3, y + cell + 3 + j * line_h), line, fill="black", font=font)
    return sheet
