"""X/Y/Z plot (A1111's script): one image per combination of up to three axes of request values, laid out as a
labelled grid (one block per Z value, stacked), each cell also saved with its own parameters.

    axes = [parse_axis("x", "steps=1-9 [3]"), parse_axis("y", "sampler=euler,dpmpp_2m")]
    result = plot(pipe, GenerationRequest("a red star", seed=7), axes)
    result.save("grid.png")  # grid.png + grid-cells/x0-y0-z0.png ...

An axis is any GenerationRequest field (`steps=4,8`, `cfg_scale=1-9 (+2)`, `sampler=euler,heun`), or `size=64x64,96x96`,
`model=a.safetensors,b.safetensors` (checkpoint), `prompt_sr=red,blue,green` (A1111's Prompt S/R: the first value is
searched in the prompts, every value replaces it; `<lora:x:0.5>` with `prompt_sr=0.5,1.0` plots a LoRA's weight).
Numbers take A1111's ranges: `1-5`, `1-10 (+2)`, `10-1 (-3)`, `5-15 [3]` (3 values evenly from 5 to 15).
Every value is checked before anything runs; the seed is fixed once (unless it is an axis), so a plot repeats.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from easel.pipelines.request import GenerationRequest

FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}
SPECIAL = ("model", "size", "prompt_sr")  # axes that are not one request field each
ALIASES = {"cfg": "cfg_scale", "cfg scale": "cfg_scale", "denoising": "denoising_strength", "strength":
           "denoising_strength", "checkpoint": "model", "checkpoint name": "model", "prompt s/r": "prompt_sr", "sr":
           "prompt_sr", "schedule": "scheduler", "schedule type": "scheduler", "style": "styles", "lora": "loras",
           "clip skip": "clip_skip", "hires steps": "hr_second_pass_steps", "var. seed": "subseed",
           "var. strength": "subseed_strength"}
# Fields that cannot vary along an axis, and why.
NOT_AXES = {"init_images": "an image", "mask": "an image", "extra": "free-form options", "dtype": "set for the whole "
            "plot (--dtype)", "device": "set for the whole plot (--device)", "batch_size": "each cell is one image",
            "n_iter": "each cell is one image", "preview_every": "previews are not plotted", "preview_mode":
            "previews are not plotted"}
LABELS = {"steps": "Steps", "cfg_scale": "CFG Scale", "seed": "Seed", "width": "Width", "height": "Height",
          "denoising_strength": "Denoising", "clip_skip": "Clip skip", "eta": "Eta", "subseed": "Var. seed",
          "subseed_strength": "Var. strength", "hr_second_pass_steps": "Hires steps", "hr_scale": "Hires upscale",
          "hr_denoising_strength": "Hires denoising", "refiner_switch_at": "Refiner switch at", "size": "Size"}
MAX_CELLS = 1000
_NUM = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*$")


@dataclass(frozen=True)
class Axis:
    """One axis: the field it varies, its values (typed) and their labels."""

    name: str  # "x", "y" or "z"
    field: str  # a GenerationRequest field, or "model", "size", "prompt_sr"
    values: tuple
    labels: tuple[str, ...]

    def describe(self) -> str:
        """'Steps' / 'Sampler' ...: the axis's type as A1111 writes it in the grid's infotext."""
        return {"model": "Checkpoint name", "prompt_sr": "Prompt S/R", "sampler": "Sampler",
                "scheduler": "Schedule type"}.get(self.field, LABELS.get(self.field, self.field))


def parse_axis(name: str, spec: str) -> Axis:
    """'steps=1-5 [3]' -> an Axis with typed values; ValueError names the axis, the field or the bad value."""
    if "=" not in spec:
        raise ValueError(f"--{name} {spec!r}: write FIELD=v1,v2,... (e.g. --{name} steps=10,20 or "
                         f"--{name} sampler=euler,dpmpp_2m)")
    key, text = spec.split("=", 1)
    return make_axis(name, key, split_values(text))


def make_axis(name: str, key: str, values: list) -> Axis:
    """An Axis over `key` (a field, alias or special axis) with `values` (strings are parsed: ranges, types)."""
    fld = _field_name(name, key)
    items = [str(v).strip() if isinstance(v, str) else v for v in values]
    if not items or all(v == "" for v in items):
        raise ValueError(f"--{name} {key}: no values; list them after '=' separated by commas")
    typed = _typed_values(name, fld, items)
    if len(typed) > MAX_CELLS:
        raise ValueError(f"--{name} {key}: {len(typed)} values; at most {MAX_CELLS}")
    return Axis(name, fld, tuple(typed), tuple(_label(fld, v) for v in typed))


def _field_name(name: str, key: str) -> str:
    k = key.strip().lower()
    k = ALIASES.get(k, k).replace(" ", "_").replace("-", "_")
    if k in NOT_AXES:
        raise ValueError(f"--{name} {key}: cannot be an axis ({NOT_AXES[k]})")
    if k not in FIELDS and k not in SPECIAL:
        close = difflib.get_close_matches(k, [*FIELDS, *SPECIAL, *ALIASES], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"--{name} {key}: unknown axis; {hint}an axis is a request field (steps, cfg_scale, sampler, "
                         "scheduler, seed, width, denoising_strength, ...), size, model or prompt_sr")
    return k


def split_values(text: str) -> list[str]:
    """Values separated by commas; a value in double quotes may hold commas (as A1111 reads them)."""
    rows = list(csv.reader([text], skipinitialspace=True))
    return [v.strip() for v in rows[0]] if rows else []


def _kind(fld: str) -> str:
    """'int' | 'float' | 'bool' | 'str' | 'list' of a field (special axes: str)."""
    if fld in SPECIAL:
        return "str"
    type_text = str(FIELDS[fld].type).split("|")[0].split("[")[0].strip()
    return type_text if type_text in ("int", "float", "bool", "str", "list") else "str"


def _optional(fld: str) -> bool:
    return fld in FIELDS and "None" in str(FIELDS[fld].type)


def _typed_values(name: str, fld: str, items: list) -> list:
    kind, out = _kind(fld), []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
        elif _optional(fld) and item.lower() in ("none", "default"):
            out.append(None)
        elif kind in ("int", "float"):
            out += _numbers(name, fld, item, int if kind == "int" else float)
        elif kind == "bool":
            out.append(_boolean(name, fld, item))
        elif kind == "list":
            out.append([item] if item else [])
        else:
            out.append(item)
    if fld == "size":
        out = [_size(name, v) for v in out]
    return out


def _numbers(name: str, fld: str, item: str, kind: type) -> list:
    """One number, or an A1111 range: `a-b`, `a-b (+step)`, `a-b [count]`."""
    m = RANGE.match(item)
    if m is None:
        try:
            return [kind(item.replace(" ", ""))]
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{name} {fld}: {item!r} is not {what} or a range such as 1-5, 1-10 (+2), "
                             "5-15 [3]") from None
    lo, hi = (float(g.replace(" ", "")) for g in m.group(1, 2))
    if m.group(4) is not None:
        count = int(m.group(4))
        if count < 1:
            raise ValueError(f"--{name} {fld}: {item!r} asks for {count} values; give 1 or more in [ ]")
        values = [lo] if count == 1 else [lo + (hi - lo) * i / (count - 1) for i in range(count)]
        return [int(v) if kind is int else round(v, 10) for v in values]  # int() truncates, as A1111's astype(int)
    step = float(m.group(3).replace(" ", "")) if m.group(3) else (1.0 if hi >= lo else -1.0)
    if kind is int and step != int(step):
        raise ValueError(f"--{name} {fld}: {item!r} steps by {step:g}, but {fld} is a whole number")
    if step == 0 or (hi - lo) * step < 0:
        raise ValueError(f"--{name} {fld}: {item!r} gives no values (the step {step:+g} never reaches {hi:g})")
    n = math.floor((hi - lo) / step + 1e-9) + 1
    if n > MAX_CELLS:
        raise ValueError(f"--{name} {fld}: {item!r} gives {n} values; at most {MAX_CELLS}")
    return [kind(round(lo + i * step, 10)) for i in range(n)]


def _boolean(name: str, fld: str, item: str) -> bool:
    low = item.lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"--{name} {fld}: {item!r} is not true or false")


def _size(name: str, value) -> tuple[int, int]:
    """'64x96' -> (64, 96)."""
    try:
        w, h = (int(v) for v in str(value).lower().split("x"))
        return w, h
    except ValueError:
        raise ValueError(f"--{name} size: {value!r} is not WIDTHxHEIGHT (e.g. 512x768)") from None


def _label(fld: str, value) -> str:
    """The header text of a value: 'Steps: 10' for numbers, the value itself for names and prompts."""
    if fld == "size":
        text = f"{value[0]}x{value[1]}"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):
        text = " + ".join(value) or "none"
    else:
        text = "default" if value is None else str(value)
    if fld == "model":
        text = Path(text).stem if text not in ("", "default") else "default"
    return f"{LABELS[fld]}: {text}" if fld in LABELS else text


# --- cells ---------------------------------------------------------------------------------------------------
def apply_value(req: GenerationRequest, axis: Axis, value, search: str | None = None) -> GenerationRequest:
    """A copy of `req` with the axis's value set (`model` is handled by `plot`; prompt_sr replaces `search`)."""
    if axis.field in ("model", ""):  # "": an axis not given
        return req
    if axis.field == "size":
        return dataclasses.replace(req, width=value[0], height=value[1])
    if axis.field == "prompt_sr":
        sr = {n: getattr(req, n).replace(search, value) if getattr(req, n) else getattr(req, n)
              for n in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")}
        return dataclasses.replace(req, **sr)
    return dataclasses.replace(req, **{axis.field: list(value) if isinstance(value, list) else value})


def cell_requests(request: GenerationRequest, axes: list[Axis]) -> dict[tuple[int, int, int], GenerationRequest]:
    """{(x, y, z) index: the request of that cell} (one image each, the seed fixed); every cell checked, errors
    naming the axis and the value."""
    base = dataclasses.replace(request, batch_size=1, n_iter=1)
    if base.seed is None or base.seed < 0:
        base.seed = random.randrange(2**32)  # one seed for every cell, as A1111
    full = _padded(axes)
    searches = {a.name: _search_text(base, a) for a in full if a.field == "prompt_sr"}
    cells = {}
    for z, zv in enumerate(full[2].values):
        for y, yv in enumerate(full[1].values):
            for x, xv in enumerate(full[0].values):
                req = base
                for axis, value in zip(full, (xv, yv, zv)):
                    req = apply_value(req, axis, value, searches.get(axis.name))
                    if axis.field == "seed" and (value is None or value < 0):
                        req.seed = random.randrange(2**32)  # a seed value of -1: drawn once, recorded in the PNG
                cells[(x, y, z)] = _checked(req, full, (xv, yv, zv))
    return cells


def _padded(axes: list[Axis]) -> list[Axis]:
    """The axes as [x, y, z], a missing one a single empty value; two axes with the same name are an error."""
    by_name = {}
    for a in axes:
        if a.name in by_name:
            raise ValueError(f"two --{a.name} axes: give each of --x, --y, --z once")
        if a.name not in ("x", "y", "z"):
            raise ValueError(f"axis name must be x, y or z (got {a.name!r})")
        by_name[a.name] = a
    if not by_name:
        raise ValueError("give at least one axis: --x FIELD=v1,v2,...")
    count = math.prod(len(a.values) for a in by_name.values())
    if count > MAX_CELLS:
        raise ValueError(f"the plot has {count} cells; at most {MAX_CELLS}: use fewer values")
    return [by_name.get(n, Axis(n, "", (None,), ("",))) for n in ("x", "y", "z")]


def _search_text(req: GenerationRequest, axis: Axis) -> str:
    """The Prompt S/R axis's first value, which must appear in the prompt or the negative prompt (A1111)."""
    search = axis.values[0]
    texts = (req.prompt, req.negative_prompt, req.hr_prompt or "", req.hr_negative_prompt or "")
    if not search or not any(search in t for t in texts):
        raise ValueError(f"--{axis.name} prompt_sr: the first value {search!r} is not in the prompt or the negative "
                         "prompt; Prompt S/R searches for the first value and replaces it by each value in turn")
    return search


def _checked(req: GenerationRequest, axes: list[Axis], values: tuple) -> GenerationRequest:
    try:
        req.check()
    except ValueError as e:
        named = [f"--{a.name} {a.field}={_label(a.field, v).split(': ')[-1]}" for a, v in zip(axes, values) if a.field]
        raise ValueError(f"{', '.join(named)}: {e}") from None
    return req


# --- running ------------------------------------------------------------------------------------------------------
@dataclass
class XYZPlot:
    """The result: the grid (all Z blocks stacked), the cells in order [z][y][x], and the axes."""

    grid: Image.Image
    cells: dict  # (x, y, z) -> GeneratedImage
    axes: list[Axis]
    infotext: str = ""
    params: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> tuple[Path, list[Path]]:
        """Write the grid (a .png path, or <folder>/xyz.png) with its infotext and every cell beside it
        (<grid>-cells/x0-y0-z0.png, each with its own parameters); returns the paths."""
        from easel.files import save_image
        from easel.pipelines.metadata import save_png
        out = Path(out)
        grid_path = out if out.suffix.lower() == ".png" else out / "xyz.png"
        folder = grid_path.with_name(grid_path.stem + "-cells")
        folder.mkdir(parents=True, exist_ok=True)
        cells = [save_png(g.image, folder / f"x{x}-y{y}-z{z}.png", g.params)
                 for (x, y, z), g in sorted(self.cells.items(), key=lambda kv: kv[0][::-1])]
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", self.infotext)
        info.add_text("easel", json.dumps(self.params, sort_keys=True, default=str))
        return save_image(self.grid, grid_path, pnginfo=info), cells


def validate(request: GenerationRequest, axes: list[Axis]) -> dict[tuple[int, int, int], GenerationRequest]:
    """Every cell's request, checked, and every checkpoint of a model axis found: the errors come before any model
    is loaded (see `cell_requests`)."""
    cells = cell_requests(request, axes)
    if _model_values(_padded(axes)):
        _check_models(_padded(axes))
    return cells


def plot(pipe, request: GenerationRequest, axes: list[Axis], *, callback=None,
         load: Callable[[str], object] | None = None, progress: bool = False) -> XYZPlot:
    """Generate every cell of the axes on `pipe` (with a `model` axis, `pipe` may be None: each checkpoint is loaded
    once by `load(spec)`, default easel.load with the pipe's dtype and device) and lay them out in a labelled grid."""
    cells = validate(request, axes)
    full = _padded(axes)
    models = _model_values(full)
    if models and load is None:
        import easel
        options = {"dtype": pipe.dtype, "device": pipe.device} if pipe is not None else {}
        load = lambda spec: easel.load(spec, **options)  # noqa: E731
    if pipe is None and not models:
        raise ValueError("plot needs a pipeline (easel.load(...)) unless an axis is model")
    results = {}
    with _progress(cells, progress) as step:
        for model_index, keys in _by_model(cells, full).items():
            runner = None  # let go of the last checkpoint before the next one loads
            runner = pipe if model_index is None else load(models[model_index])
            for key in keys:
                made = runner.generate(cells[key], callback=_chain(step, callback))
                if not made:
                    raise ValueError(f"cell {key} made no image (interrupted)")
                results[key] = made[0]
    return _assemble(results, full)


def _model_values(full: list[Axis]) -> list | None:
    model_axis = next((a for a in full if a.field == "model"), None)
    return None if model_axis is None else list(model_axis.values)


def _check_models(full: list[Axis]) -> None:
    """Every checkpoint of a model axis exists, before anything runs."""
    from easel.weights.registry import resolve_model
    axis = next(a for a in full if a.field == "model")
    for v in axis.values:
        try:
            resolve_model(v)
        except (OSError, ValueError) as e:
            raise ValueError(f"--{axis.name} model={v}: {e}") from None


def _by_model(cells: dict, full: list[Axis]) -> dict:
    """Cell keys grouped by the model axis index (None: no model axis), so each checkpoint loads once."""
    index = next((i for i, a in enumerate(full) if a.field == "model"), None)
    groups: dict = {}
    for key in cells:
        groups.setdefault(None if index is None else key[index], []).append(key)
    return groups


def _chain(*callbacks):
    live = [c for c in callbacks if c is not None]
    return (lambda d: [c(d) for c in live]) if live else None


class _progress:
    """A tqdm bar over every step of every cell (stderr), or nothing."""

    def __init__(self, cells: dict, enabled: bool):
        from easel.pipelines.plan import count_steps
        self.total = sum(count_steps(r) for r in cells.values())
        self.cells, self.enabled, self.bar = len(cells), enabled, None

    def __enter__(self):
        if not self.enabled:
            return None
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                        desc=f"xyz ({self.cells} cells)")
        return lambda d: self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _assemble(results: dict, full: list[Axis]) -> XYZPlot:
    """The grid image, its infotext (the first cell's, plus the axes as A1111 writes them) and parameters."""
    from easel.pipelines.metadata import infotext
    blocks = []
    for z, z_label in enumerate(full[2].labels):
        images = [[results[(x, y, z)].image for x in range(len(full[0].values))] for y in range(len(full[1].values))]
        blocks.append(draw_grid(images, list(full[0].labels) if full[0].field else [],
                                list(full[1].labels) if full[1].field else [], title=z_label if full[2].field else ""))
    grid = _stack(blocks)
    first = results[(0, 0, 0)].params
    axes_text = ", ".join(f"{a.name.upper()} Type: {a.describe()}, {a.name.upper()} Values: "
                          f"{json.dumps(','.join(_value_text(a, v) for v in a.values))}" for a in full if a.field)
    text = f"{infotext(first)}, Script: X/Y/Z plot, {axes_text}"
    params = {**first, "xyz": [{"axis": a.name, "field": a.field, "values": [_value_text(a, v) for v in a.values]}
                               for a in full if a.field]}
    return XYZPlot(grid, results, [a for a in full if a.field], text, params)


def _value_text(axis: Axis, v) -> str:
    if axis.field == "size":
        return f"{v[0]}x{v[1]}"
    if isinstance(v, list):
        return "+".join(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


# --- drawing --------------------------------------------------------------------------------------------------
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's scalable default font at `size` pixels."""
    return ImageFont.load_default(size=size)


def draw_grid(images: list[list[Image.Image]], x_labels: list[str], y_labels: list[str],
              title: str = "") -> Image.Image:
    """Rows of images in one grid with the X labels on top (wrapped to the column), Y labels on the left and a title
    line above; cells of different sizes are centred in the largest."""
    cw = max(im.width for row in images for im in row)
    ch = max(im.height for row in images for im in row)
    f = font(max(11, min(24, cw // 9)))
    line = f.getbbox("Ag")[3] + 4
    pad = 6
    x_lines = [_wrap(t, f, cw - 4) for t in x_labels]
    top = (max(len(w) for w in x_lines) * line + pad) if x_labels else 0
    left = (max(f.getlength(t) for t in y_labels) + 2 * pad) if y_labels else 0
    head = (line + pad) if title else 0
    left = int(left)
    grid = Image.new("RGB", (left + cw * len(images[0]), head + top + ch * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad // 2), title, fill="black", font=f)
    for i, lines in enumerate(x_lines):
        for k, text in enumerate(lines):
            w = f.getlength(text)
            draw.text((left + i * cw + (cw - w) / 2, head + k * line + pad // 2), text, fill="black", font=f)
    for j, text in enumerate(y_labels):
        draw.text((pad, head + top + j * ch + (ch - line) / 2), text, fill="black", font=f)
    for j, row in enumerate(images):
        for i, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + i * cw + (cw - im.width) // 2, head + top + j * ch +
                                           (ch - im.height) // 2))
    return grid


def _wrap(text: str, f, width: float) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels (a word longer than the width keeps its own line)."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and f.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current] if current else lines or [""]


def _stack(blocks: list[Image.Image]) -> Image.Image:
    """Grids one above the other, a gap between them."""
    if len(blocks) == 1:
        return blocks[0]
    gap = 12
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + gap * (len(blocks) - 1)),
                    "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height + gap
    return out
