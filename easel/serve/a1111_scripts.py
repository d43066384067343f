"""A1111's `script_name` / `script_args` on txt2img and img2img: the X/Y/Z plot (the one script easel runs).

The plot is planned and checked whole before anything runs (every cell's request and limits, every checkpoint of
a `model` axis a name from the server's list, never a path), then each cell runs as its own job on the queue, one
at a time with everyone's generations, and the grid is drawn from the cells (easel.xyz). The answer is A1111's:
the grid first, then the cells, with their infotexts in the same order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from easel.pipelines.request import GenerationRequest
from easel.serve.schema import LimitError
from easel.serve.service import admit
from easel.serve.trust import check_names

SCRIPTS = ("x/y/z plot",)  # script_name values easel runs (any case)


def script_of(name) -> str | None:
    """The script a request's script_name asks for (None: none); ValueError names the ones easel has."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "none")):
        return None
    if isinstance(name, str) and name.strip().lower() in SCRIPTS:
        return name.strip().lower()
    raise ValueError(f"script_name {name!r} is not available in easel; the scripts it runs: "
                     f"{', '.join(repr(s) for s in SCRIPTS)} (or leave script_name out)")


@dataclass
class XYZPlan:
    """The cells of a plot, checked: their requests and models, in the order they run (each model's together)."""

    cells: dict  # (x, y, z) -> GenerationRequest
    models: dict  # (x, y, z) -> model name (None: the request's model)
    axes: list  # easel.xyz's padded [x, y, z] axes
    order: list = field(default_factory=list)


def plan_xyz(request: GenerationRequest, model: str | None, script_args, img2img: bool, queue, settings,
             resolve_checkpoint) -> XYZPlan:
    """Read script_args into axes and check every cell (ValueError / LimitError: 4xx before anything runs).
    `resolve_checkpoint(title) -> model name` maps a `model` axis value through the server's list."""
    from easel.xyz import _padded, cell_requests
    from easel.xyz_a1111 import axes_from_script_args
    axes = axes_from_script_args(script_args if script_args is not None else [], img2img)
    full = _padded(axes)
    count = len(full[0].values) * len(full[1].values) * len(full[2].values)
    if count > settings.max_batch:
        raise LimitError("max_batch", count, settings.max_batch, "the X/Y/Z plot's number of cells")
    model_axis = next((i for i, a in enumerate(full) if a.field == "model"), None)
    names = []
    if model_axis is not None:
        for v in full[model_axis].values:  # names only: a path is refused before anything opens it
            try:
                names.append(queue.check_model(resolve_checkpoint(str(v))))
            except ValueError as e:
                raise ValueError(f"script_args: {full[model_axis].name.upper()} checkpoint {v!r}: {e}") from None
    _check_named_values(full, queue)
    cells = cell_requests(request, axes)
    models = {key: names[key[model_axis]] if model_axis is not None else model for key in cells}
    for key, req in cells.items():
        check_names(dataclasses.replace(req), queue)  # a LoRA a Prompt S/R value brings in is checked too
        admit(req, settings, queue.model_config(models[key]))
    order = sorted(cells, key=lambda k: (k[model_axis] if model_axis is not None else 0, k[2], k[1], k[0]))
    return XYZPlan(cells, models, full, order)


def _check_named_values(full: list, queue) -> None:
    """Axes whose values name files (hires upscaler, refiner) take names only: checked before any cell is built,
    since building one looks the file up."""
    from easel.serve.schema import check_upscaler_not_path
    for axis in full:
        for v in axis.values:
            where = f"script_args: {axis.name.upper()} {axis.field}"
            if axis.field == "hr_upscaler":
                check_upscaler_not_path(v, where)
            elif axis.field == "refiner_checkpoint" and v not in (None, "", "None"):
                try:
                    queue.check_model(str(v))
                except ValueError as e:
                    raise ValueError(f"{where} {v!r}: {e}") from None


def assemble(results: dict, plan: XYZPlan):
    """The easel.xyz plot (grid, infotext) of the finished cells {key: GeneratedImage}."""
    from easel.xyz import _assemble
    return _assemble(results, plan.axes)


def grid_order(plan: XYZPlan) -> list:
    """Cell keys as A1111 lists the images after the grid: X fastest, then Y, then Z."""
    return sorted(plan.cells, key=lambda k: (k[2], k[1], k[0]))
