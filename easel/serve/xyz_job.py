"""X/Y/Z plot jobs: `POST /api/v1/xyz` runs one request over up to three axes of request fields, as one job.

    curl -s localhost:7860/api/v1/xyz -d '{"prompt": "a red star", "steps": 8, "seed": 7,
        "axes": [{"axis": "x", "field": "cfg_scale", "values": "3,7"}, {"axis": "y", "field": "sampler",
                  "values": ["euler", "dpmpp_2m"]}]}'
    curl -s localhost:7860/api/v1/xyz/ID/grid.png -o grid.png     # the labelled grid, with the plot's infotext
    curl -s localhost:7860/api/v1/xyz/ID/cells/0.png -o c0.png    # each cell (X fastest, then Y, then Z)

The body is a native job's (GET /openapi.json: JobBody) plus `axes`; values take easel.xyz's syntax (ranges such as
"1-9 [3]", Prompt S/R, sizes "64x64"). Every cell is built and checked against the server's limits before the job
is queued. The whole plot runs on one model: a checkpoint axis is the A1111 route's (script_name "x/y/z plot"),
which queues each cell on its own model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Literal

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from easel.serve.schema import JobBody, LimitError
from easel.serve.task_jobs import (FILE_ERRORS, PNG, PREFIX, SUBMIT_RESPONSES, StepReporter, accepted, finished, pick,
                                   png, show_preview, submit, task_of)

KIND = "xyz"  # Job.kind


class AxisBody(BaseModel):
    """One axis: a request field and its values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    axis: Literal["x", "y", "z"] = Field(..., description="which axis: x (columns), y (rows), z (stacked grids)")
    field: str = Field(..., min_length=1, max_length=64, description="a request field (steps, cfg_scale, sampler, "
                       "scheduler, seed, width, denoising_strength, ...), size (\"64x64\" values) or prompt_sr "
                       "(A1111's Prompt S/R: the first value is searched in the prompt, each value replaces it)")
    values: str | list[str | int | float | bool] = Field(..., max_length=10_000, description=(
        "comma-separated text with easel.xyz's ranges (\"1-9 [3]\", \"4-12 (+4)\"), or a list"))


class XYZBody(JobBody):
    """A generation request (JobBody's fields) plotted over up to three axes of its fields."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "prompt": "a red star above a blue circle", "steps": 8, "seed": 7,
        "axes": [{"axis": "x", "field": "cfg_scale", "values": "3,7"},
                 {"axis": "y", "field": "steps", "values": [4, 8]}]}})
    axes: list[AxisBody] = Field(..., min_length=1, max_length=3, description="one to three axes (each of x, y, z "
                                 "once); every combination is one cell, one image")


@dataclasses.dataclass(eq=False)
class XYZTask:
    """One plot's checked cells and, as it runs, their images; finally the grid."""

    cells: dict  # (x, y, z) -> GenerationRequest
    axes: list  # easel.xyz's padded [x, y, z] axes
    server: object  # the server's Settings (each cell admitted again once the model is loaded)
    results: dict = dataclasses.field(default_factory=dict)  # (x, y, z) -> GeneratedImage
    cell_pngs: list = dataclasses.field(default_factory=list)  # PNG bytes, in grid order, as they are made
    cell_texts: list = dataclasses.field(default_factory=list)  # their A1111 parameters texts
    grid: bytes | None = None
    infotext: str = ""
    job_id: str = ""

    def order(self) -> list:
        """Cell keys in A1111's image order: X fastest, then Y, then Z."""
        return sorted(self.cells, key=lambda k: (k[2], k[1], k[0]))

    def run(self, job, pipe) -> None:
        """Each cell on the worker's model (a cancel keeps the cells made), then the grid when all are made."""
        from easel.pipelines.metadata import infotext
        from easel.serve.preview import to_png
        from easel.serve.service import admit
        for req in self.cells.values():
            admit(req, self.server, pipe.config)
        reporter = StepReporter(job)
        for key in self.order():
            if reporter.should_stop():
                break
            made = pipe.generate(dataclasses.replace(self.cells[key]), reporter, should_stop=reporter.should_stop)
            if not made:
                break
            self.results[key] = made[0]
            self.cell_pngs.append(to_png(made[0].image, made[0].params))
            self.cell_texts.append(infotext(made[0].params))
            show_preview(job, made[0].image)
            if reporter.should_stop():
                break  # the interrupted cell is kept, as A1111 keeps an interrupted image
        if len(self.results) == len(self.cells):
            self._draw()
        self.results = {}  # the cells live on as PNG bytes: the images need not stay in memory twice
        job.version += 1

    def _draw(self) -> None:
        """The labelled grid as PNG bytes with the plot's infotext and easel's JSON."""
        import io

        from PIL import PngImagePlugin

        from easel.xyz import _assemble
        plot = _assemble(self.results, self.axes)
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", plot.infotext)
        meta.add_text("easel", json.dumps(plot.params, sort_keys=True, default=str))
        buf = io.BytesIO()
        plot.grid.save(buf, format="PNG", pnginfo=meta)
        self.grid, self.infotext = buf.getvalue(), plot.infotext

    def to_dict(self) -> dict:
        """What the job's JSON says about it: the axes, the cells made, and the URLs."""
        base = f"{PREFIX}/xyz/{self.job_id}"
        axes = [{"axis": a.name, "field": a.field, "labels": list(a.labels)} for a in self.axes if a.field]
        first = next(iter(self.cells.values()))
        return {"kind": KIND, "label": f"X/Y/Z plot, {len(self.cells)} cells: {first.prompt[:80]}",
                "axes": axes, "shape": [len(a.values) for a in self.axes], "cells": len(self.cells),
                "cells_done": len(self.cell_pngs), "grid": f"{base}/grid.png" if self.grid else None,
                "cell_urls": [f"{base}/cells/{n}.png" for n in range(len(self.cell_pngs))],
                "cell_infotexts": list(self.cell_texts),
                "infotext": self.infotext or None}


def build_axes(body_axes: list) -> list:
    """easel.xyz axes from the body's; ValueError names the axis."""
    from easel.xyz import make_axis, split_values
    names = [a.axis for a in body_axes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"axes: give each of x, y and z at most once ({', '.join(twice)} given twice)")
    axes = []
    for i, a in enumerate(body_axes):
        # A list's items are read as text too, so that each field's own parsing (and its errors) apply.
        values = split_values(a.values) if isinstance(a.values, str) else [_text(v) for v in a.values]
        try:
            axes.append(make_axis(a.axis, a.field, values))
        except ValueError as e:
            raise ValueError(f"axes[{i}] ({a.axis}): {str(e).replace(f'--{a.axis} ', '')}") from None
    return axes


def _text(value) -> str:
    """A JSON value as an axis value's text (true / false as written in JSON)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def prepare(app: FastAPI, body) -> tuple[XYZTask, str | None]:
    """The plot's checked cells and its model (ValueError / LimitError: a 4xx before anything is queued)."""
    from easel.serve.a1111_scripts import _check_named_values
    from easel.serve.inputs import decode_body_images
    from easel.serve.schema import request_from_body
    from easel.serve.service import admit
    from easel.serve.trust import check_names
    from easel.xyz import _padded, cell_requests
    queue, server = app.state.queue, app.state.settings
    data = body.model_dump(exclude_unset=True, exclude={"axes"})
    if data.pop("inspect", False):
        raise ValueError("inspect: an X/Y/Z plot does not capture inside; send the cell you want to look at as a "
                         "job (POST /api/v1/jobs with \"inspect\": true)")
    axes = build_axes(body.axes)
    full = _padded(axes)  # checked by build_axes: no error here
    count = math.prod(len(a.values) for a in full)
    if count > server.max_batch:
        raise LimitError("max_batch", count, server.max_batch, "the X/Y/Z plot's number of cells")
    if any(a.field == "model" for a in full):
        raise ValueError("axes: a checkpoint (model) axis is not available in a native X/Y/Z job, which runs on one "
                         "model; use POST /sdapi/v1/txt2img with script_name \"x/y/z plot\" (each cell queued on its "
                         "own model), or set \"model\" and plot other fields")
    data = decode_body_images(data, server.input_pixels())
    request, model = request_from_body(data)
    model = queue.check_model(model)
    check_names(request, queue)
    _check_named_values(full, queue)
    try:
        cells = cell_requests(request, axes)
    except ValueError as e:  # easel.xyz names axes as the CLI's flags: here they are the body's axes
        raise ValueError(re.sub(r"--([xyz]) ", r"\1 axis ", str(e))) from None
    config = queue.model_config(model)
    for req in cells.values():
        check_names(dataclasses.replace(req), queue)  # a LoRA a Prompt S/R value brings in is checked too
        admit(req, server, config)
    return XYZTask(cells, full, server), model


def router(app: FastAPI, job_summary) -> APIRouter:
    """POST /xyz and a plot's grid and cells; `job_summary(job, queue)` is the API's job JSON."""
    from easel.pipelines.plan import count_steps
    r = APIRouter()
    queue = app.state.queue

    @r.post("/xyz", status_code=202, summary="Queue an X/Y/Z plot: a request over up to three axes of its fields, "
            "one image per cell, then a labelled grid; progress in steps of all cells, cancel with DELETE "
            "/api/v1/jobs/{id}", responses=SUBMIT_RESPONSES)
    def submit_plot(body: XYZBody) -> JSONResponse:
        task, model = prepare(app, body)
        first = next(iter(task.cells.values()))
        job = submit(app, KIND, task, model, sum(count_steps(c) for c in task.cells.values()), first)
        return accepted(job, job_summary(job, queue))

    @r.get("/xyz/{job_id}/grid.png", summary="The plot's labelled grid with its infotext (when every cell was made)",
           response_class=Response, responses=PNG | FILE_ERRORS)
    def grid(job_id: str) -> Response:
        from starlette.exceptions import HTTPException
        job, task = task_of(queue, job_id, XYZTask, "X/Y/Z plot")
        finished(job)
        if task.grid is None:
            raise HTTPException(409, f"job {job_id} was {job.state} after {len(task.cell_pngs)} of {len(task.cells)} "
                                     "cells: no grid (its cells are at .../cells/N.png)")
        return png(task.grid)

    @r.get("/xyz/{job_id}/cells/{n}.png", summary="Cell n of a plot (X fastest, then Y, then Z), with its own "
           "parameters (ready as soon as it is made)", response_class=Response, responses=PNG | FILE_ERRORS)
    def cell(job_id: str, n: int) -> Response:
        job, task = task_of(queue, job_id, XYZTask, "X/Y/Z plot")
        return png(pick(task.cell_pngs, n, job, "cell"))

    return r
