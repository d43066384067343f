"""Contact sheets: images in a grid with a caption under each (world samples, eval passes/failures)."""
from __future__ import annotations

import regex
from PIL import Image, ImageDraw, ImageFont


# Fonts with Chinese glyphs (Pillow's own has none), tried in order for captions that hold Chinese.
CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/System/Library/Fonts/PingFang.ttc",
             "C:/Windows/Fonts/msyh.ttc")


def load_font(px: int, cjk: bool = False) -> ImageFont.ImageFont:
    """A small TrueType font when Pillow has one, else its built-in bitmap font; with `cjk`, one with Chinese
    glyphs when the system has one (else the same fallback: Chinese then draws as boxes)."""
    if cjk:
        for path in CJK_FONTS:
            try:
                return ImageFont.truetype(path, px)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (Chinese, which has no spaces, may break between any two characters)."""
    lines, line = [], ""
    for unit in _UNIT.findall(text):  # a Chinese character or a run of other non-space characters
        glue = "" if not line or _HAN.match(unit) or _HAN.match(line[-1]) else " "
        trial = line + glue + unit
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = unit
        else:
            line = trial
    return lines + ([line] if line else [])


_HAN = regex.compile(r"\p{Han}")
_UNIT = regex.compile(r"\p{Han}|[^\s\p{Han}]+")


def captioned_grid(images: list[Image.Image], captions: list[str], cols: int = 6, min_cell: int = 160,
                   lines: int = 4) -> Image.Image:
    """Images upscaled (nearest) to at least `min_cell` px, `cols` per row, up to `lines` caption lines each."""
    if not images:
        raise ValueError("no images to put in a grid")
    size = images[0].width
    scale = max(1, -(-min_cell // size))
    cell, cols = size * scale, min(len(images), cols)
    rows = -(-len(images) // cols)
    font, line_h = load_font(11, cjk=any(_HAN.search(c) for c in captions)), 13
    text_h = line_h * lines + 6
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, text) in enumerate(zip(images, captions)):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        sheet.paste(im.convert("RGB").resize((cell, int(cell * im.height / im.width)), Image.NEAREST), (x, y))
        for j, line in enumerate(wrap(draw, text, font, cell - 6)[:lines]):
            draw.text((x + 3, y + cell + 3 + j * line_h), line, fill="black", font=font)
    return sheet
