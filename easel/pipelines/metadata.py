"""Image parameters in PNG files: A1111's `parameters` text chunk and easel's JSON chunk."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from easel import __version__
from easel.files import save_image

# Our field -> A1111's label in the "Steps: 20, Sampler: ..." line, in A1111's order. Keys after "eta" are derived
# by `_a1111_extras` from the mode's parameters and appear only when that feature was used.
LABELS = [("steps", "Steps"), ("sampler_label", "Sampler"), ("scheduler_label", "Schedule type"),
          ("cfg_scale", "CFG scale"), ("seed", "Seed"), ("size", "Size"), ("model_hash", "Model hash"),
          ("model", "Model"), ("clip_skip", "Clip skip"), ("eta", "Eta"), ("variation_seed", "Variation seed"),
          ("variation_strength", "Variation seed strength"), ("seed_resize", "Seed resize from"),
          ("denoising_strength", "Denoising strength"), ("mask_blur_label", "Mask blur"),
          ("inpaint_area", "Inpaint area"), ("masked_padding", "Masked area padding"), ("mask_mode", "Mask mode"),
          ("masked_content", "Masked content"), ("outpaint", "Outpaint"), ("hr_upscale", "Hires upscale"),
          ("hr_resize", "Hires resize"), ("hr_steps", "Hires steps"), ("hr_upscaler_label", "Hires upscaler"),
          ("hr_sampler_label", "Hires sampler"), ("hr_schedule_label", "Hires schedule type"),
          ("hr_prompt", "Hires prompt"), ("hr_negative_prompt", "Hires negative prompt"),
          ("hr_cfg_scale", "Hires CFG Scale"), ("lora_hashes_text", "Lora hashes"), ("refiner_checkpoint", "Refiner"),
          ("refiner_switch_at", "Refiner switch at"), ("version", "Version")]


def infotext(params: dict) -> str:
    """A1111's parameters text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    p = dict(params, size=f"{params['width']}x{params['height']}", version=f"easel {__version__}")
    if p.get("clip_skip") == 1:
        p.pop("clip_skip")  # A1111 omits the default
    if p.get("mode", "txt2img") == "txt2img" and not p.get("enable_hr"):
        p.pop("denoising_strength", None)
    p.update(_a1111_extras(params))
    fields = [f"{label}: {_quote(p[key])}" for key, label in LABELS if p.get(key) not in (None, "")]
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _a1111_extras(p: dict) -> dict:
    """A1111's display values of the optional features (variation seed, inpaint, hires fix, LoRA)."""
    out = {}
    if p.get("subseed_strength"):
        out.update(variation_seed=p.get("subseed"), variation_strength=p["subseed_strength"])
    if p.get("seed_resize_from_w") and p.get("seed_resize_from_h"):
        out["seed_resize"] = f"{p['seed_resize_from_w']}x{p['seed_resize_from_h']}"
    if p.get("mode") in ("inpaint", "outpaint"):
        out.update(mask_blur_label=p.get("mask_blur"), masked_content=str(p.get("inpainting_fill", "")).replace("_", " "))
        if p.get("inpaint_full_res"):
            out.update(inpaint_area="Only masked", masked_padding=p.get("inpaint_full_res_padding"))
        if p.get("inpainting_mask_invert"):
            out["mask_mode"] = "Inpaint not masked"
    if p.get("mode") == "outpaint":
        out["outpaint"] = " ".join(f"{side} {p.get('outpaint_' + side, 0)}" for side in ("left", "right", "up", "down")
                                   if p.get("outpaint_" + side))
    if p.get("enable_hr"):
        out.update(_hires_extras(p))
    hashes = p.get("lora_hashes")
    if hashes:
        out["lora_hashes_text"] = ", ".join(f"{k}: {v}" for k, v in hashes.items()) if isinstance(hashes, dict) else hashes
    return out


def _hires_extras(p: dict) -> dict:
    from easel.samplers import SAMPLER_LABELS, SCHEDULE_LABELS
    out = {"hr_upscaler_label": p.get("hr_upscaler_label") or p.get("hr_upscaler"),
           "hr_steps": p.get("hr_second_pass_steps") or None}
    if p.get("hr_resize_x") or p.get("hr_resize_y"):
        out["hr_resize"] = f"{p.get('hr_width', p.get('hr_resize_x'))}x{p.get('hr_height', p.get('hr_resize_y'))}"
    else:
        out["hr_upscale"] = p.get("hr_scale")
    if p.get("hr_sampler"):
        out["hr_sampler_label"] = SAMPLER_LABELS.get(p["hr_sampler"], p["hr_sampler"])
    if p.get("hr_scheduler"):
        out["hr_schedule_label"] = SCHEDULE_LABELS.get(p["hr_scheduler"], p["hr_scheduler"])
    return out


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


def png_info(params: dict, default=None) -> PngImagePlugin.PngInfo:
    """The two text chunks: A1111's `parameters` and easel's JSON `easel` (`default` as json.dumps takes it)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))
    info.add_text("easel", json.dumps(params, sort_keys=True, default=default))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Write a PNG with both chunks, atomically (temp file + rename)."""
    return save_image(image, Path(path).with_suffix(".png"), pnginfo=png_info(params))


def read_png_params(path: str | os.PathLike) -> dict:
    """{'parameters': A1111 text or None, 'easel': dict or None} from a PNG."""
    try:
        with Image.open(path) as im:
            text = dict(im.text) if hasattr(im, "text") else dict(im.info)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    easel = text.get("easel")
    return {"parameters": text.get("parameters"), "easel": json.loads(easel) if easel else None}
