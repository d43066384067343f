"""Small drawing helpers for the inspect figures (PIL only: no plotting library is a dependency)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of matplotlib's "inferno" colour map (black -> purple -> orange -> pale yellow), linearly interpolated.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float32)
# A diverging map for signed values (blue - white - red).
_DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                      dtype=np.float32)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def colormap(values: np.ndarray, signed: bool = False) -> np.ndarray:
    """Values in [0, 1] (or [-1, 1] with `signed`) -> uint8 RGB (..., 3) through inferno (or blue-white-red)."""
    table = _DIVERGING if signed else _INFERNO
    v = np.clip((np.asarray(values, dtype=np.float32) + 1) / 2 if signed else np.asarray(values, np.float32), 0, 1)
    pos = v * (len(table) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(table) - 2)
    frac = (pos - lo)[..., None]
    return (table[lo] * (1 - frac) + table[lo + 1] * frac).round().astype(np.uint8)


def normalise(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own min and max (a constant array gives zeros)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo < 1e-12 else (a - lo) / (hi - lo)


def heat_image(values: np.ndarray, size: tuple[int, int], signed: bool = False) -> Image.Image:
    """A 2-D array (already scaled to [0, 1] or [-1, 1]) as a colour-mapped image of `size` (w, h), smooth."""
    small = Image.fromarray(colormap(values, signed))
    return small.resize(size, Image.BILINEAR)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """A heat map (h, w) in [0, 1] blended over an image: the image shows through where attention is low."""
    image = image.convert("RGB")
    colour = heat_image(heat, image.size)
    weight = Image.fromarray((np.clip(heat, 0, 1) * 255 * alpha).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    dim = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.35)  # the image dimmed, as DAAM shows it
    return Image.composite(colour, dim, weight)


def font(size: int = 12) -> ImageFont.ImageFont:
    """The default font at `size` pixels (a scalable one where Pillow has FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def enlarge(image: Image.Image, min_side: int = 192) -> Image.Image:
    """A small image scaled up by a whole factor (nearest: pixels stay visible) so its short side >= min_side."""
    k = max(1, -(-min_side // min(image.size)))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def captioned(image: Image.Image, text: str, size: int = 13, below: bool = False) -> Image.Image:
    """The image with a line of text above it (or below)."""
    f = font(size)
    line = size + 6
    out = Image.new("RGB", (image.width, image.height + line), BACKGROUND)
    out.paste(image.convert("RGB"), (0, 0 if below else line))
    draw = ImageDraw.Draw(out)
    text = fit_text(draw, text, f, image.width - 4)
    draw.text((2, image.height + 2 if below else 2), text, fill=INK, font=f)
    return out


def fit_text(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    """The text cut with an ellipsis so that it fits `width` pixels."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"


def grid(images: list[Image.Image], cols: int, pad: int = 6) -> Image.Image:
    """Images in rows of `cols` on a white background (cells sized to the largest image)."""
    if not images:
        raise ValueError("a grid needs at least one image")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), BACKGROUND)
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        out.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def titled(image: Image.Image, title: str, size: int = 16) -> Image.Image:
    """A figure with a title line above it."""
    return captioned(image, title, size)


def plot_canvas(size: tuple[int, int], title: str, margins: tuple[int, int, int, int]):
    """A blank plot: (image, its ImageDraw, the label font) with the title and the frame of the plot area drawn;
    `margins` = (left, right, top, bottom) around that area."""
    w, h = size
    left, right, top, bottom = margins
    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    f = font(12)
    d.text((left, 6), title, fill=INK, font=f)
    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    return img, d, f
