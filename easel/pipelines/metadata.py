"""Image parameters in PNG files: A1111's `parameters` text chunk and easel's JSON chunk."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from easel import __version__
from easel.files import save_image

# Our field -> A1111's label in the "Steps: 20, Sampler: ..." line, in A1111's order.
LABELS = [("steps", "Steps"), ("sampler_label", "Sampler"), ("scheduler_label", "Schedule type"),
          ("cfg_scale", "CFG scale"), ("seed", "Seed"), ("size", "Size"), ("model_hash", "Model hash"),
          ("model", "Model"), ("clip_skip", "Clip skip"), ("eta", "Eta"), ("denoising_strength", "Denoising strength"),
          ("version", "Version")]


def infotext(params: dict) -> str:
    """A1111's parameters text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    p = dict(params, size=f"{params['width']}x{params['height']}", version=f"easel {__version__}")
    if p.get("clip_skip") == 1:
        p.pop("clip_skip")  # A1111 omits the default
    fields = [f"{label}: {_quote(p[key])}" for key, label in LABELS if p.get(key) not in (None, "")]
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _quote(v) -> str:
    """A1111 quotes values that contain its separators."""
    s = f"{v:g}" if isinstance(v, float) else str(v)
    return json.dumps(s) if ("," in s or ":" in s or "\n" in s) else s


def parse_infotext(text: str) -> dict:
    """Inverse of `infotext` for A1111-written images too: {'prompt', 'negative_prompt', 'Steps', ...}."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or re.match(r"^\s*Steps:", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for m in re.finditer(r'\s*([\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        key, value = m.group(1).strip(), m.group(2).strip()
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def save_png(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Write a PNG with both chunks, atomically (temp file + rename)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))
    info.add_text("easel", json.dumps(params, sort_keys=True))
    return save_image(image, Path(path).with_suffix(".png"), pnginfo=info)


def read_png_params(path: str | os.PathLike) -> dict:
    """{'parameters': A1111 text or None, 'easel': dict or None} from a PNG."""
    try:
        with Image.open(path) as im:
            text = dict(im.text) if hasattr(im, "text") else dict(im.info)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    easel = text.get("easel")
    return {"parameters": text.get("parameters"), "easel": json.loads(easel) if easel else None}
