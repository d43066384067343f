"""Upscale jobs: `POST /api/v1/extras` upscales one uploaded image (an upscaler file, Lanczos or nearest) on the
queue, and `GET /api/v1/upscalers` lists what a request may name.

    curl -s localhost:7860/api/v1/extras -d '{"image": "<base64 PNG>", "upscaler": "R-ESRGAN 4x+", "scale": 2}'
    curl -s localhost:7860/api/v1/extras/ID/image.png -o big.png   # once done: the PNG, its parameters kept

Upscalers are names from the server's folders, never paths; the input is sized from its header before decoding,
and the output's size and working memory are checked before the job is queued (413 naming the limit). Model
upscalers run in tiles, counted as the job's steps; a cancel stops between tiles.
"""
from __future__ import annotations

import dataclasses
import io
import json

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from easel.pipelines.common import Interrupted
from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import EXTRAS
from easel.serve.task_jobs import (FILE_ERRORS, PNG, PREFIX, SUBMIT_RESPONSES, accepted, finished, png, show_preview,
                                   stop_requested, submit, task_of)

KIND = EXTRAS  # the same kind as A1111's Extras jobs: an upscale, whichever API asked
MAX_SCALE = 16.0


class ExtrasBody(BaseModel):
    """One image to upscale."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": {
        "image": "<base64 PNG>", "upscaler": "lanczos", "scale": 2}})
    image: str = Field(..., min_length=1, description="the image: base64 PNG/JPEG/WebP text or a data: URL")
    upscaler: str = Field("lanczos", description="a name from GET /api/v1/upscalers: lanczos, nearest, or an "
                          "upscaler file's name (never a path)")
    scale: float = Field(2.0, gt=0, le=MAX_SCALE, description="the output is this many times the input's size")


@dataclasses.dataclass(eq=False)
class ExtrasJobTask:
    """One upscale: the input, the checked upscaler name and scale, and the result as PNG bytes."""

    image: object  # PIL image
    upscaler: str
    scale: float
    size: tuple  # the output's (width, height)
    result: bytes | None = None
    job_id: str = ""

    def run(self, job, pipe) -> None:
        """Upscale, the tiles counted as steps (one step for Lanczos / nearest); a cancel stops between tiles."""
        from easel.upscale.run import upscale_image

        def on_tile(done: int, total: int) -> None:
            job.step, job.total = done, total
            job.version += 1
            if stop_requested(job):
                job._stopped = True
                raise Interrupted()
        if stop_requested(job):
            return
        out = upscale_image(self.image, self.upscaler, size=self.size, on_tile=on_tile)
        job.step = job.total = max(job.total, 1)
        self.result = encode(out, self.image.info, self.upscaler, self.scale)
        show_preview(job, out)

    def to_dict(self) -> dict:
        """What the job's JSON says about it."""
        w, h = self.size
        return {"kind": KIND, "label": f"upscale {self.image.width}x{self.image.height} to {w}x{h} ({self.upscaler})",
                "upscaler": self.upscaler, "scale": self.scale, "input_size": list(self.image.size),
                "output_size": [w, h],
                "image": f"{PREFIX}/extras/{self.job_id}/image.png" if self.result is not None else None}


def encode(image, info: dict, upscaler: str, scale: float) -> bytes:
    """PNG bytes; the input's parameters text (and easel JSON) kept, the upscale appended as A1111 writes it."""
    from PIL import PngImagePlugin
    note = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {upscaler}"
    meta = PngImagePlugin.PngInfo()
    before = info.get("parameters")
    meta.add_text("parameters", f"{before}\n{note}" if isinstance(before, str) and before else note)
    if isinstance(info.get("easel"), str):
        try:
            params = json.loads(info["easel"])
        except ValueError:
            params = None
        if isinstance(params, dict):
            meta.add_text("easel", json.dumps({**params, "postprocess": {"upscaler": upscaler, "scale": scale}},
                                              sort_keys=True, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def prepare(app: FastAPI, body: ExtrasBody) -> ExtrasJobTask:
    """The checked task (ValueError / LimitError: a 4xx before anything is queued)."""
    from easel.serve.a1111_extras import check_output
    from easel.serve.control_trust import upscaler_name
    from easel.serve.inputs import decode_checked
    settings = app.state.settings
    name = upscaler_name(body.upscaler, "upscaler")
    if name == "None":
        raise ValueError("upscaler: 'None' upscales nothing; choose lanczos, nearest or a name from "
                         "GET /api/v1/upscalers")
    image = decode_checked(body.image, "image", settings.input_pixels())
    size = (max(1, round(image.width * body.scale)), max(1, round(image.height * body.scale)))
    check_output(*size, "image", settings)
    return ExtrasJobTask(image, name, body.scale, size)


def upscalers() -> list[dict]:
    """What a request's `upscaler` may name: lanczos and nearest (no file), then the server's upscaler files."""
    from easel.upscale.extras import _scale_guess
    from easel.upscale.find import PIXEL_UPSCALERS, list_upscalers
    return ([{"name": n, "kind": "pixel", "scale": None} for n in PIXEL_UPSCALERS]
            + [{"name": e.name, "kind": "model", "scale": _scale_guess(e.path.stem)} for e in list_upscalers()])


def router(app: FastAPI, job_summary) -> APIRouter:
    """POST /extras, GET /upscalers and a finished upscale's image; `job_summary(job, queue)` is the job JSON."""
    r = APIRouter()
    queue = app.state.queue

    @r.get("/upscalers", summary="Upscalers a request may name: lanczos, nearest and the server's upscaler files "
                                 "(names and their scale, never paths)")
    def list_upscalers() -> list[dict]:
        return upscalers()

    @r.post("/extras", status_code=202, summary="Queue an upscale of one image (an upscaler file in tiles, or "
            "Lanczos); the result at GET /api/v1/extras/{id}/image.png", responses=SUBMIT_RESPONSES)
    def submit_upscale(body: ExtrasBody) -> JSONResponse:
        task = prepare(app, body)
        job = submit(app, KIND, task, None, 1, GenerationRequest(width=task.size[0], height=task.size[1]),
                     previews=False)
        return accepted(job, job_summary(job, queue))

    @r.get("/extras/{job_id}/image.png", summary="The upscaled image, with the input's parameters and the upscale",
           response_class=Response, responses=PNG | FILE_ERRORS)
    def image(job_id: str) -> Response:
        job, task = task_of(queue, job_id, ExtrasJobTask, "upscale")
        finished(job)
        if task.result is None:
            raise HTTPException(409, f"job {job_id} was {job.state} before the image was finished")
        return png(task.result)

    return r
