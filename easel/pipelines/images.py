"""Image and mask operations of img2img / inpainting, with A1111's semantics (resize modes, mask blur,
"only masked" crops, masked-content fill, feathered paste-back), written with numpy and Pillow.

Conventions: masks are mode "L" PIL images, white (255) = repaint; regions are pixel boxes
(x1, y1, x2, y2) with x2, y2 exclusive, as PIL's `crop` takes them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from easel.pipelines.request import RESIZE_MODES

Region = tuple[int, int, int, int]

# Masked-content "fill": (blur radius, times composited), widest first, then the sharp original on top.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def resize_image(img: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """Resize to (width, height): stretch (just_resize), cover and centre-crop (crop_and_resize), or fit inside
    and fill the borders by stretching the edge pixels outwards (resize_and_fill); Lanczos as A1111."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if mode == "just_resize" or img.size == (width, height):
        return img.resize((width, height), Image.Resampling.LANCZOS)
    target, source = width / height, img.width / img.height
    cover = mode == "crop_and_resize"
    # Scale so that one side matches exactly and the other overshoots (cover) or falls short (fit).
    if (target > source) == cover:
        w, h = width, max(1, img.height * width // img.width)
    else:
        w, h = max(1, img.width * height // img.height), height
    scaled = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = w // 2 - width // 2, h // 2 - height // 2
    if cover:
        return scaled.crop((left, top, left + width, top + height))
    # A1111's fill: the first/last row (column) of the fitted image stretched over the border.
    arr = np.asarray(scaled)
    pad_y, pad_x = (-top, height - h + top), (-left, width - w + left)
    pads = (pad_y, pad_x) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pads, mode="edge"), scaled.mode)


def binary_mask(mask: Image.Image) -> Image.Image:
    """A mask image -> mode L: the alpha channel (thresholded at 128) of a partly transparent RGBA image, as
    painted in a browser canvas, otherwise the luminance."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return mask.convert("L")


def prepare_mask(mask: Image.Image, width: int | None = None, height: int | None = None, blur: int = 4,
                 invert: bool = False, resize_mode: str = "just_resize") -> Image.Image:
    """The repaint mask as A1111 prepares it: to L, optionally inverted, Gaussian-blurred (sigma = `blur` px,
    kernel cut at 2.5 sigma as A1111's OpenCV call), then resized to (width, height) if given."""
    m = binary_mask(mask)
    if invert:
        m = ImageOps.invert(m)
    if blur > 0:
        m = Image.fromarray(blur_mask(np.asarray(m), blur), "L")
    if width is not None and height is not None:
        m = resize_image(m, width, height, resize_mode)
    return m


def blur_radius(blur: int) -> int:
    """How far (pixels) `mask_blur` spreads a mask: the half-width of its truncated Gaussian kernel."""
    return int(2.5 * blur + 0.5) if blur > 0 else 0


def blur_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a uint8 (H, W) mask: kernel 2*int(2.5 sigma + 0.5) + 1, mirrored borders,
    rounded to uint8 after each pass (A1111's x-then-y cv2.GaussianBlur). Nothing spreads past the kernel."""
    radius = blur_radius(sigma)
    out = mask.astype(np.float64)
    out = np.rint(out @ _blur_matrix(mask.shape[1], sigma, radius, "reflect").T).clip(0, 255)  # along x
    out = np.rint(_blur_matrix(mask.shape[0], sigma, radius, "reflect") @ out).clip(0, 255)  # along y
    return out.astype(np.uint8)


def _blur_matrix(n: int, sigma: float, radius: int, border: str) -> np.ndarray:
    """(n, n) matrix M with M @ signal = the signal Gaussian-blurred along its first axis; out-of-range taps
    fold back inside by mirroring without repeating the edge ("reflect") or clamp to it ("edge")."""
    d = np.arange(-radius, radius + 1)
    weights = np.exp(-(d**2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    src = np.arange(n)[:, None] + d[None, :]  # (n, taps) source index of every tap
    if border == "edge" or n == 1:
        src = src.clip(0, n - 1)
    else:
        period = 2 * (n - 1)
        src = src % period
        src = np.where(src < n, src, period - src)
    m = np.zeros((n, n))
    np.add.at(m, (np.repeat(np.arange(n), len(d)), src.ravel()), np.tile(weights, n))
    return m


def fill_masked(img: Image.Image, mask: Image.Image) -> Image.Image:
    """Replace the masked area by the colours around it (A1111's "fill" masked content): the unmasked image,
    blurred at decreasing radii, composited over itself, so the hole takes the surrounding colours."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
    keep = 1.0 - np.asarray(mask.convert("L"), dtype=np.float64)[..., None] / 255.0  # (H, W, 1) alpha
    known = np.concatenate([rgb * keep, keep], axis=-1)  # premultiplied RGBA: blurs spread only known colour
    acc = np.zeros_like(known)
    for radius, repeats in _FILL_PASSES:
        layer = known if radius == 0 else _blur_image(known, radius)
        for _ in range(repeats):
            acc = layer + acc * (1.0 - layer[..., 3:])  # premultiplied "over"
    alpha = acc[..., 3:]
    out = np.where(alpha > 0, acc[..., :3] / np.maximum(alpha, 1e-12), 0.0)
    return Image.fromarray(np.rint(out * 255).clip(0, 255).astype(np.uint8), "RGB")


def _blur_image(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, C) float image with clamped borders, kernel cut at 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    h, w = arr.shape[:2]
    rows, cols = _blur_matrix(h, sigma, radius, "edge"), _blur_matrix(w, sigma, radius, "edge")
    planes = rows @ arr.transpose(2, 0, 1) @ cols.T  # (C, H, W): blur down the columns, then along the rows
    return planes.transpose(1, 2, 0)


def mask_crop_region(mask: Image.Image, padding: int = 0) -> Region:
    """The box around every non-zero mask pixel, grown by `padding` and clipped to the image (A1111's
    `get_crop_region`); raises when the mask is empty."""
    arr = np.asarray(mask.convert("L"))
    ys, xs = np.nonzero(arr)
    if len(xs) == 0:
        raise ValueError("the mask is empty (no white pixels): paint the area to repaint white, "
                         "or set inpainting_mask_invert to repaint everything but the painted area")
    h, w = arr.shape
    return (max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0),
            min(int(xs.max()) + 1 + padding, w), min(int(ys.max()) + 1 + padding, h))


def expand_to_aspect(region: Region, width: int, height: int, image_w: int, image_h: int) -> Region:
    """Grow a box symmetrically (shifting it back inside the image where it overflows) until it has the
    aspect ratio width:height of the processing size (A1111's `expand_crop_region`)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra` split over both ends, then slide it back inside [0, size)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def crop_for_region(img: Image.Image, region: Region, width: int, height: int) -> Image.Image:
    """The region of an image (or mask) scaled to the processing size, as "only masked" works on it."""
    return resize_image(img.crop(region), width, height, "resize_and_fill")


def overlay_alpha(mask: Image.Image) -> Image.Image:
    """The paste-back mask of whole-image inpainting: the blurred mask doubled, so that everything the latent
    mask (the blurred mask rounded at one half) regenerated shows fully and the feather lies outside it."""
    arr = np.asarray(mask.convert("L"), dtype=np.float32) * 2
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")


def paste_back(original: Image.Image, generated: Image.Image, mask: Image.Image,
               region: Region | None = None) -> Image.Image:
    """Composite a generated image onto the original through the feathered mask (white = generated): where the
    mask is 0 the result's pixels are the original's exactly. With `region`, the generated image covers only
    that box (scaled to it first), as "only masked" inpainting produces it."""
    original = original.convert("RGB")
    if region is not None:
        x1, y1, x2, y2 = region
        canvas = original.copy()
        canvas.paste(resize_image(generated.convert("RGB"), x2 - x1, y2 - y1, "crop_and_resize"), (x1, y1))
        generated = canvas
    if generated.size != original.size or mask.size != original.size:
        raise ValueError(f"paste_back needs equal sizes: original {original.size}, generated {generated.size}, "
                         f"mask {mask.size}")
    a = np.asarray(mask.convert("L"), dtype=np.float64)[..., None] / 255.0  # (H, W, 1)
    src = np.asarray(original, dtype=np.float64)
    gen = np.asarray(generated.convert("RGB"), dtype=np.float64)
    out = np.where(a > 0, np.rint(gen * a + src * (1.0 - a)), src)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB")


def latent_mask(mask: Image.Image, latent_h: int, latent_w: int) -> torch.Tensor:
    """The repaint mask on the latent grid, (1, 1, h, w) of 0/1: the blurred mask downscaled (bicubic) and
    rounded at one half, as A1111 builds its latent blend mask."""
    small = mask.convert("L").resize((latent_w, latent_h), Image.Resampling.BICUBIC)
    arr = np.round(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(arr)[None, None]


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A mask image as a (1, 1, H, W) float tensor of 0/1 (rounded at one half): the inpainting model's mask."""
    arr = np.round(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return torch.from_numpy(arr)[None, None]
