"""Images a client sends (init images, masks, PNGs to read): sized from their header before anything decodes them.

A 109 KB 1-bit PNG can announce 30000x30000 pixels: decoding it first and checking after would cost gigabytes, so
the size check reads the header only (easel.pipelines.metadata, the one image reader) and refuses with the
server's own limit, `max_input_pixels`, named in a 400.
"""
from __future__ import annotations

import base64
import binascii

from PIL import Image

from easel.pipelines.metadata import open_image, read_image_metadata
from easel.serve.schema import LimitError


def image_bytes(value, name: str) -> bytes:
    """The bytes of base64 text or a data: URL; ValueError naming the field otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be base64 text of a PNG/JPEG/WebP image (got {type(value).__name__})")
    if value.startswith("<image ") and value.endswith(">"):
        raise ValueError(f"{name} is a placeholder {value!r}, not an image: send the image as base64 text")
    text = value.strip()
    text = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{name} is not base64 text ({e})") from None
    if not raw:
        raise ValueError(f"{name} is empty: send a PNG/JPEG/WebP image as base64 text")
    return raw


def header_size(raw: bytes, name: str) -> tuple[int, int]:
    """(width, height) an image announces, read without decoding its pixels; ValueError if it is no image."""
    try:
        meta = read_image_metadata(raw, max_pixels=None)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return meta["width"], meta["height"]


def check_size(raw: bytes, name: str, max_pixels: int) -> None:
    """LimitError (max_input_pixels) when the image announces more than `max_pixels` pixels."""
    w, h = header_size(raw, name)
    if w * h > max_pixels:
        raise LimitError("max_input_pixels", w * h, max_pixels, f"{name} ({w}x{h}) pixel count")


def decode_checked(value, name: str, max_pixels: int) -> Image.Image:
    """A PIL image from base64 text, refused by its header's size before decoding (LimitError), or a ValueError
    naming a damaged, truncated or unknown image. A PIL image passes through, checked the same way."""
    if isinstance(value, Image.Image):
        if value.width * value.height > max_pixels:
            raise LimitError("max_input_pixels", value.width * value.height, max_pixels,
                             f"{name} ({value.width}x{value.height}) pixel count")
        return value
    raw = image_bytes(value, name)
    check_size(raw, name, max_pixels)
    return open_image(raw, max_pixels, what=name)


def decode_body_images(body: dict, max_pixels: int) -> dict:
    """A copy of a native request body with init_images / mask and the ControlNet units' images decoded (checked
    first; a unit's ControlNet must be a listed name); other fields as given."""
    out = dict(body)
    if out.get("controlnets") is not None:
        out["controlnets"] = decode_controlnets(out["controlnets"], max_pixels)
    if out.get("init_images") is not None:
        out["init_images"] = [decode_checked(im, f"init_images[{i}]", max_pixels)
                              for i, im in enumerate(out["init_images"])]
    if out.get("mask") is not None:
        out["mask"] = decode_checked(out["mask"], "mask", max_pixels)
    return out


def decode_controlnets(units, max_pixels: int) -> list:
    """Native `controlnets`: at most MAX_CONTROLNETS units, each naming a listed ControlNet (never a path), their
    `image` / `mask` (or sd-webui-controlnet's `input_image`) decoded with the size checked first."""
    from easel.serve.control_trust import check_count, listed_name
    if not isinstance(units, list):
        raise ValueError(f"controlnets must be a list of ControlNet units (got {type(units).__name__})")
    check_count(units, "controlnets")
    out = []
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            raise ValueError(f"controlnets[{i}] must be an object with at least 'model' and 'image'")
        # A null alias would shadow the field it stands for: drop it.
        unit = {k: v for k, v in unit.items() if not (k in ("module", "input_image") and v is None)}
        if "model" in unit:
            unit["model"] = listed_name(unit["model"], f"controlnets[{i}].model")
        for key in ("image", "input_image", "mask"):
            if unit.get(key) is not None:
                unit[key] = decode_checked(unit[key], f"controlnets[{i}].{key}", max_pixels)
        out.append(unit)
    return out
