"""Image parameters in PNG files (A1111's `parameters` text chunk, easel's JSON chunk) and the one reader of them."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from easel import __version__
from easel.files import save_image

log = logging.getLogger("easel")

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
          ("hr_cfg_scale", "Hires CFG Scale"), ("lora_hashes_text", "Lora hashes"), ("ti_hashes_text", "TI hashes"),
          ("refiner_checkpoint", "Refiner"),
          ("refiner_switch_at", "Refiner switch at"), ("prompt_template", "Template"),
          ("negative_prompt_template", "Negative Template"), ("deepcache", "DeepCache"), ("cfg_cutoff", "CFG cutoff"),
          ("tome", "ToMe"), ("version", "Version")]


def infotext(params: dict) -> str:
    """A1111's parameters text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    # "Size" is the image's (an outpainted canvas is larger than the source size that `width`/`height` keep)
    size = f"{params.get('final_width', params['width'])}x{params.get('final_height', params['height'])}"
    p = dict(params, size=size, version=f"easel {__version__}")
    if p.get("clip_skip") == 1:
        p.pop("clip_skip")  # A1111 omits the default
    if p.get("mode", "txt2img") == "txt2img" and not p.get("enable_hr"):
        p.pop("denoising_strength", None)
    p.update(_a1111_extras(params))
    fields = [f"{label}: {_quote(p[key])}" for key, label in LABELS if p.get(key) not in (None, "")]
    # sd-webui-controlnet's "ControlNet N: ..." fields, one per unit, before "Version" as the extension writes them
    units = [f"{label}: {_quote(text)}" for label, text in (params.get("controlnet_infotext") or {}).items()]
    fields[-1:-1] = units
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
    for key in ("lora_hashes", "ti_hashes"):  # {name: hash} -> A1111's "name: hash, name: hash"
        hashes = p.get(key)
        if hashes:
            text = ", ".join(f"{k}: {v}" for k, v in hashes.items()) if isinstance(hashes, dict) else hashes
            out[key + "_text"] = text
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


# Images whose header announces more pixels than this are refused before any decoding (64 MP: a 8192x8192 image).
# Callers with their own limit (the server's --max-pixels) pass it.
MAX_IMAGE_PIXELS = 64 * 2**20
MAX_TEXT_BYTES = 1 << 20  # a text chunk inflating past this is not a parameters text (zip bomb)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A1111 infotext label -> (request field, type). The optional features' labels are handled in `_infotext_fields`.
_INFOTEXT_FIELDS = {
    "Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Clip skip": ("clip_skip", int),
    "Sampler": ("sampler", str), "Schedule type": ("scheduler", str), "Eta": ("eta", float),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Denoising strength": ("denoising_strength", float), "Mask blur": ("mask_blur", int),
    "Masked area padding": ("inpaint_full_res_padding", int), "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int), "Hires sampler": ("hr_sampler", str),
    "Hires schedule type": ("hr_scheduler", str), "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str), "Hires CFG Scale": ("hr_cfg_scale", float),
    "Refiner switch at": ("refiner_switch_at", float), "Model": ("model", str), "Model hash": ("model_hash", str),
    "DeepCache": ("deepcache", int), "CFG cutoff": ("cfg_cutoff", float), "ToMe": ("tome", float),
}


def read_image_params(data: bytes | str | os.PathLike | BinaryIO, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """How an image was made, as request fields (plus `model`, `model_hash`): easel's JSON chunk if present, else
    A1111's `parameters` text (PNG chunk or JPEG/WebP EXIF); {} when it carries neither. Never decodes pixels."""
    return params_from_metadata(read_image_metadata(data, max_pixels))


def read_image_metadata(data: bytes | str | os.PathLike | BinaryIO, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """{'width', 'height', 'format', 'parameters' (A1111 text or None), 'easel' (dict or None), 'other' (the other
    text chunks)} read from the header and text chunks only; a ValueError names an unreadable or too large image."""
    raw = _read_bytes(data)
    if raw.startswith(PNG_SIGNATURE):
        fmt, (w, h), text = "PNG", _png_size(raw), _png_text_chunks(raw)
        check_pixels(w, h, max_pixels)
        parameters = text.get("parameters")
    else:
        with _open_lazily(raw) as im:  # PIL reads only the header (and EXIF) here, not the pixels
            fmt, (w, h) = im.format, im.size
            check_pixels(w, h, max_pixels)
            text = {k: v for k, v in im.info.items() if isinstance(v, str)}
            parameters = text.get("parameters") or exif_parameters(im)
    other = {k: v for k, v in text.items() if k not in ("parameters", "easel")}
    return {"width": w, "height": h, "format": fmt, "parameters": parameters, "easel": _json_dict(text.get("easel")),
            "other": other}


def params_from_metadata(meta: dict) -> dict:
    """Request fields from `read_image_metadata`'s answer: easel's JSON as stored, else the infotext's fields."""
    if meta.get("easel"):
        return dict(meta["easel"])
    return infotext_fields(meta["parameters"]) if meta.get("parameters") else {}


def infotext_fields(text: str) -> dict:
    """A1111's parameters text -> request fields (names as A1111 writes them: `GenerationRequest.resolved` maps
    sampler, schedule and upscaler labels), plus `model`, `model_hash` and unknown extras in `extra`."""
    a = parse_infotext(text)
    out = {"prompt": a.pop("prompt"), "negative_prompt": a.pop("negative_prompt")}
    try:
        for label, (name, kind) in _INFOTEXT_FIELDS.items():
            if label in a:
                out[name] = kind(a[label])
        out.update(_infotext_sizes(a))
    except ValueError as e:
        raise ValueError(f"the image's parameters text has a malformed value ({e})") from None
    out.update(_infotext_edit_fields(a))
    _outpaint_source_size(out)
    if "Refiner" in a:  # A1111 writes "name [hash]"
        out["refiner_checkpoint"] = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", a["Refiner"])
    if "Hires upscaler" in a or "Hires upscale" in a or "Hires resize" in a:
        out["enable_hr"] = True
        out["hr_upscaler"] = a.get("Hires upscaler", "Latent")
        if "denoising_strength" in out:  # with hires fix, A1111's "Denoising strength" is the second pass's
            out["hr_denoising_strength"] = out.pop("denoising_strength")
    if "ENSD" in a or "Eta noise seed delta" in a:
        out["extra"] = {"eta_noise_seed_delta": int(a.get("ENSD", a.get("Eta noise seed delta")))}
    return _easel_names(out)


def _easel_names(out: dict) -> dict:
    """A1111 labels -> easel names where the resolver knows them (a form lists names); unknown ones stay as read,
    so that resolving the request names them in its error."""
    from easel.pipelines import names
    for key, sched_key in (("sampler", "scheduler"), ("hr_sampler", "hr_scheduler")):
        if isinstance(out.get(key), str):
            with contextlib.suppress(ValueError):
                out[key], schedule = names.resolve_sampler(out[key])
                if schedule and sched_key not in out:  # "DPM++ 2M Karras": the label's schedule, unless one is given
                    out[sched_key] = schedule
    for key in ("scheduler", "hr_scheduler"):
        if isinstance(out.get(key), str):
            with contextlib.suppress(ValueError):
                out[key] = names.resolve_scheduler(out[key])
    if "hr_upscaler" in out:
        out["hr_upscaler"] = _upscaler_name(out["hr_upscaler"])
    return out


def _upscaler_name(label: str) -> str:
    """A1111's upscaler label ('Latent (bicubic)') -> our name; upscalers easel lacks (ESRGAN, ...) -> lanczos."""
    from easel.pipelines.names import resolve_upscaler
    try:
        return resolve_upscaler(label)
    except ValueError:
        log.warning("hires upscaler %r is not available in easel; using lanczos", label)
        return "lanczos"


def _infotext_edit_fields(a: dict) -> dict:
    """Inpaint and outpaint options from their A1111 display values (the inverse of `_a1111_extras`)."""
    out = {}
    if "Masked content" in a:
        out["inpainting_fill"] = a["Masked content"].strip().replace(" ", "_")
    if a.get("Inpaint area") == "Only masked":
        out["inpaint_full_res"] = True
    if a.get("Mask mode") == "Inpaint not masked":
        out["inpainting_mask_invert"] = True
    words = a.get("Outpaint", "").split()
    for side, amount in zip(words[::2], words[1::2]):  # "left 16 up 8"
        if side in ("left", "right", "up", "down"):
            out[f"outpaint_{side}"] = int(amount)
    return out


def _outpaint_source_size(out: dict) -> dict:
    """An outpainted image's "Size" is the canvas: the request's width/height are the source's, margins off."""
    if "width" in out and any(k.startswith("outpaint_") for k in out):
        from easel.pipelines.request import GenerationRequest
        from easel.pipelines.sizes import margins
        sides = {k: v for k, v in out.items() if k.startswith("outpaint_")}
        left, right, up, down = margins(GenerationRequest(**sides))
        out["width"], out["height"] = out["width"] - left - right, out["height"] - up - down
    return out


def _infotext_sizes(a: dict) -> dict:
    out = {}
    for label, (wname, hname) in {"Size": ("width", "height"), "Seed resize from": ("seed_resize_from_w",
                                  "seed_resize_from_h"), "Hires resize": ("hr_resize_x", "hr_resize_y")}.items():
        if label in a:
            w, h = a[label].lower().split("x")
            out[wname], out[hname] = int(w), int(h)
    return out


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image whose announced size is over `max_pixels`, before anything decodes it."""
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"image is {width}x{height} ({width * height / 1e6:.1f} MP), over the limit of "
                         f"{max_pixels / 1e6:.1f} MP: scale it down first")


def open_image(data: bytes | str | os.PathLike | BinaryIO, max_pixels: int | None = MAX_IMAGE_PIXELS,
               what: str = "image") -> Image.Image:
    """Decode an image fully, after checking the size its header announces against `max_pixels`."""
    raw = _read_bytes(data, what)
    if raw.startswith(PNG_SIGNATURE):  # our own header read: PIL's bomb check would answer with its own message
        try:
            check_pixels(*_png_size(raw), max_pixels)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    with _open_lazily(raw, what) as im:
        try:
            check_pixels(*im.size, max_pixels)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{what} is damaged or truncated ({e})") from None
        return im.copy()


def _read_bytes(data, what: str = "image") -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif hasattr(data, "read"):
        raw = data.read()
    else:
        path = Path(data)
        if path.is_dir():
            raise ValueError(f"{what} {path} is a folder, not an image file")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} not found: {path}") from None
    if not raw:
        raise ValueError(f"{what} is empty: send or name an image file (PNG, JPEG, WebP)")
    return raw


@contextlib.contextmanager
def _open_lazily(raw: bytes, what: str = "image") -> Iterator[Image.Image]:
    """Image.open (header only), with PIL's errors turned into a ValueError naming the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check_pixels decides
            im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what} is too large to read ({e}): scale it down first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{what} is not an image easel can read (PNG, JPEG, WebP, ...): {e}") from None
    with im:
        yield im


def _png_size(raw: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG format requires to come first."""
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise ValueError("image is not a valid PNG (no IHDR header): the file is damaged or truncated")
    return struct.unpack(">II", raw[16:24])


def _png_text_chunks(raw: bytes) -> dict:
    """Every tEXt/zTXt/iTXt chunk of a PNG, before or after the pixel data, read without decoding the pixels."""
    out, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            item = _text_chunk(kind, body)
            if item:
                out.setdefault(*item)
        elif kind == b"IEND":
            break
    return out


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of one PNG text chunk; None for a malformed one (skipped, as PIL does)."""
    key, sep, rest = body.partition(b"\0")
    if not sep:
        return None
    try:
        if kind == b"tEXt":
            return key.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":
            return key.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
        compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language\0, translated\0, text
        _, _, rest = rest.partition(b"\0")
        _, _, text = rest.partition(b"\0")
        return key.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, ValueError):
        return None


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_TEXT_BYTES)
    if d.unconsumed_tail:
        raise ValueError("text chunk inflates past the limit")
    return out


def _json_dict(value) -> dict | None:
    try:
        d = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        return None
    return d if isinstance(d, dict) else None


def exif_parameters(im: Image.Image) -> str | None:
    """A1111's parameters in a JPEG/WebP: the EXIF UserComment ('UNICODE' + UTF-16 or 'ASCII' prefix)."""
    try:
        raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    except (OSError, ValueError, SyntaxError, struct.error):
        return None  # a damaged EXIF block is no parameters, not an error
    if not isinstance(raw, bytes) or len(raw) < 8:
        return raw if isinstance(raw, str) and raw else None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        # piexif (which A1111 uses) writes big-endian UTF-16, some tools little-endian: ASCII-heavy text
        # decoded with the wrong byte order turns into CJK characters, so keep the reading with more Latin ones.
        readings = [body.decode(enc, errors="replace") for enc in ("utf-16-be", "utf-16-le")]
        return max(readings, key=lambda t: sum(ord(c) < 0x250 for c in t)) or None
    return body.decode("utf-8", errors="replace").strip("\x00 ") or None


def read_png_params(path: str | os.PathLike | BinaryIO) -> dict:
    """{'parameters': A1111 text or None, 'easel': dict or None} from an image (see `read_image_metadata`)."""
    meta = read_image_metadata(path)
    return {"parameters": meta["parameters"], "easel": meta["easel"]}
