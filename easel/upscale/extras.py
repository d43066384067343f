"""A1111's "Extras" upscaling (`/sdapi/v1/extra-single-image`, the Extras tab) and its upscaler list
(`/sdapi/v1/upscalers`), as plain functions for the servers and the UI to call.

resize_mode 0 scales by `upscaling_resize`; 1 upscales to `upscaling_resize_w` x `upscaling_resize_h` (with
`upscaling_crop`, to cover that size and crop the centre, keeping the aspect ratio). A second upscaler is blended
in at `extras_upscaler_2_visibility`, as A1111 does. "None" upscales nothing.
"""
from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from easel.upscale.find import A1111_LABELS, PIXEL_UPSCALERS, list_upscalers, norm

NONE = "none"
FACE_FIELDS = ("gfpgan_visibility", "codeformer_visibility")


def extras_single_image(image: Image.Image, resize_mode: int = 0, upscaling_resize: float = 2.0,
                        upscaling_resize_w: int = 512, upscaling_resize_h: int = 512, upscaling_crop: bool = True,
                        upscaler_1: str = "None", upscaler_2: str = "None", extras_upscaler_2_visibility: float = 0.0,
                        gfpgan_visibility: float = 0.0, codeformer_visibility: float = 0.0,
                        on_tile: Callable[[int, int], None] | None = None, **_ignored) -> tuple[Image.Image, str]:
    """(image, A1111's html_info) for the fields of an extra-single-image request; ValueError names a bad field."""
    from easel.upscale.run import upscale_image
    for field, value in zip(FACE_FIELDS, (gfpgan_visibility, codeformer_visibility)):
        if value and float(value) > 0:
            raise ValueError(f"{field}: face restoration (GFPGAN, CodeFormer) is not available in easel; set it to 0")
    if not 0 <= float(extras_upscaler_2_visibility) <= 1:
        raise ValueError(f"extras_upscaler_2_visibility must be within 0..1 (got {extras_upscaler_2_visibility})")
    image = image.convert("RGB")
    size, crop = _target(image.size, resize_mode, upscaling_resize, upscaling_resize_w, upscaling_resize_h,
                         upscaling_crop)
    if norm(upscaler_1) == NONE:
        return image, ""
    out = upscale_image(image, upscaler_1, size=size, on_tile=on_tile)
    if norm(upscaler_2) != NONE and extras_upscaler_2_visibility > 0:
        second = upscale_image(image, upscaler_2, size=size, on_tile=on_tile)
        out = Image.blend(out, second, float(extras_upscaler_2_visibility))
    if crop is not None:
        out = out.crop(crop)
    scale = upscaling_resize if resize_mode == 0 else f"{upscaling_resize_w}x{upscaling_resize_h}"
    info = f"Postprocess upscale {'by' if resize_mode == 0 else 'to'}: {scale}, Postprocess upscaler: {upscaler_1}"
    if norm(upscaler_2) != NONE and extras_upscaler_2_visibility > 0:
        info += f", Postprocess upscaler 2: {upscaler_2}"
    return out, info


def _target(size: tuple[int, int], mode: int, scale: float, w: int, h: int,
            crop: bool) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(size to upscale to, crop box or None) for A1111's resize modes."""
    if mode == 0:
        if not scale or float(scale) <= 0:
            raise ValueError(f"upscaling_resize must be positive (got {scale})")
        return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), None
    if mode != 1:
        raise ValueError(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x "
                         f"upscaling_resize_h), got {mode}")
    if w <= 0 or h <= 0:
        raise ValueError(f"upscaling_resize_w and upscaling_resize_h must be positive (got {w}x{h})")
    if not crop:
        return (w, h), None
    cover = max(w / size[0], h / size[1])  # cover the box, then cut the centre
    cw, ch = max(w, round(size[0] * cover)), max(h, round(size[1] * cover))
    left, top = (cw - w) // 2, (ch - h) // 2
    return (cw, ch), (left, top, left + w, top + h)


def a1111_upscalers() -> list[dict]:
    """A1111's /sdapi/v1/upscalers: None, Lanczos, Nearest, then every upscaler file found."""
    out = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
           *({"name": n.capitalize(), "model_name": None, "model_path": None, "model_url": None, "scale": 4}
             for n in PIXEL_UPSCALERS)]
    labels = set(A1111_LABELS)
    for entry in list_upscalers():
        kind = "ESRGAN" if entry.name not in labels else entry.name.split(" ")[0]
        out.append({"name": entry.name, "model_name": kind, "model_path": str(entry.path), "model_url": None,
                    "scale": _scale_guess(entry.path.stem)})
    return out


def _scale_guess(stem: str) -> int:
    """A file's scale from its name ('4x-UltraSharp', 'RealESRGAN_x2plus'), 4 when the name does not say
    (listing must not load every file)."""
    import re
    m = re.search(r"(?:^|[^a-z0-9])(\d)x|x(\d)(?:[^0-9]|$)", stem.lower())
    return int(next(g for g in m.groups() if g)) if m else 4
