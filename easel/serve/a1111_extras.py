"""A1111's Extras upscaling: POST /sdapi/v1/extra-single-image and /extra-batch-images (easel.upscale.extras).

Everything is checked before a job is queued: the images from their header against max_input_pixels, the upscalers
by name (the server's upscaler folders, never a path), and each output's size against max_pixels and its working
memory against max_memory (a 413 naming the limit, since the image is too large to make here). The upscaling then
runs as a job on the queue, one at a time with the generations, its tiles counted as the job's steps.
"""
from __future__ import annotations

from functools import partial

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from easel.serve.inputs import decode_checked
from easel.serve.jobs import DONE, EXTRAS, FAILED
from easel.serve.preview import to_base64_png
from easel.serve.schema import GENERATION_RESPONSES, LimitError, MemoryLimit
from easel.serve.service import failure

TASK_KIND = EXTRAS  # the queue runs any job that has a task; this kind keeps upscales apart from training jobs
BYTES_PER_OUTPUT_PIXEL = 3 * 4 * 4  # float32 RGB: the tiles' sum, their weights, the result, and the PIL copy
MAX_BATCH_IMAGES = 16  # images of one /extra-batch-images call


class OutputLimit(LimitError):
    """An upscale whose output is over the server's max_pixels: 413, too large to make here."""

    http_status = 413


class ExtrasFields(BaseModel):
    """A1111's ExtrasBaseRequest fields (upscaling; face restoration is not available)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, description="must be 0: face restoration is not available in easel")
    codeformer_visibility: float = Field(0.0, description="must be 0: face restoration is not available in easel")
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="a name from GET /sdapi/v1/upscalers (never a path)")
    upscaler_2: str = Field("None", description="a name from GET /sdapi/v1/upscalers (never a path)")
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleBody(ExtrasFields):
    """POST /sdapi/v1/extra-single-image."""

    image: str = Field("", description="base64 PNG/JPEG/WebP")


class BatchImage(BaseModel):
    """One image of /extra-batch-images."""

    data: str = Field(description="base64 PNG/JPEG/WebP")
    name: str = ""


class ExtrasBatchBody(ExtrasFields):
    """POST /sdapi/v1/extra-batch-images."""

    imageList: list[BatchImage] = Field(default_factory=list)  # noqa: N815 - A1111's field name


class ExtrasTask:
    """The upscaling of a job: run by the queue's worker (`run(job, pipe)`), the results kept here."""

    def __init__(self, images: list, fields: dict):
        self.images, self.fields, self.results, self.info = images, fields, [], ""

    def run(self, job, pipe) -> None:
        """Upscale every image, the tiles counted as the job's steps; a cancel stops between tiles."""
        from easel.pipelines.common import Interrupted
        from easel.upscale.extras import extras_single_image

        def on_tile(done: int, total: int) -> None:
            job.step, job.total = done, total
            job.version += 1
            if "cancel" in job.pending or "interrupt" in job.pending:
                raise Interrupted()
        for image in self.images:
            out, self.info = extras_single_image(image, on_tile=on_tile, **self.fields)
            self.results.append(out)

    def to_dict(self) -> dict:
        """What job listings show of it."""
        return {"kind": "extras", "images": len(self.images), "done": len(self.results)}


def router(app: FastAPI, wait_or_cancel) -> APIRouter:
    """The Extras routes, included under /sdapi/v1 by easel.serve.a1111; `wait_or_cancel(request, job, queue)` is
    its way of waiting for a job."""
    r = APIRouter()
    responses = {status: GENERATION_RESPONSES[status] for status in (400, 413, 503)}

    @r.post("/extra-single-image", summary="Upscale one image (A1111's Extras; runs as a job on the queue)",
            responses=responses)
    async def extra_single_image(request: Request, body: ExtrasSingleBody) -> dict:
        results, info = await run_extras(app, request, body, [body.image], ["image"], wait_or_cancel)
        return {"html_info": info, "image": results[0]}

    @r.post("/extra-batch-images", summary="Upscale several images (A1111's Extras, batch)", responses=responses)
    async def extra_batch_images(request: Request, body: ExtrasBatchBody) -> dict:
        if not body.imageList:
            raise ValueError("imageList: give at least one {\"data\": base64 image, \"name\": ...}")
        if len(body.imageList) > MAX_BATCH_IMAGES:
            raise LimitError("max_extras_images", len(body.imageList), MAX_BATCH_IMAGES, "the number of imageList")
        results, info = await run_extras(app, request, body, [im.data for im in body.imageList],
                                         [f"imageList[{i}].data" for i in range(len(body.imageList))],
                                         wait_or_cancel)
        return {"html_info": info, "images": results}

    return r


def upscaler_list() -> list[dict]:
    """A1111's upscaler list without the server's paths."""
    from easel.upscale.extras import a1111_upscalers
    return [{**u, "model_path": None} for u in a1111_upscalers()]


async def run_extras(app: FastAPI, request: Request, body: ExtrasFields, images: list, names: list[str],
                     wait_or_cancel) -> tuple[list[str], str]:
    """Check, queue, wait (a client that goes away cancels the job) and answer the base64 PNGs and html_info."""
    queue = app.state.queue
    task = await run_in_threadpool(prepare, body, images, names, app.state.settings)
    job = queue.submit_task(TASK_KIND, task, None, 0)
    await wait_or_cancel(request, job, queue)
    if job.state == FAILED:
        raise HTTPException(*failure(job))
    if job.state != DONE or len(task.results) < len(images):
        raise HTTPException(409, f"the upscaling job {job.id} was {job.state} before it finished")
    encoded = await run_in_threadpool(lambda: [to_base64_png(im, None) for im in task.results])
    return encoded, task.info


def prepare(body: ExtrasFields, images: list, names: list[str], settings) -> ExtrasTask:
    """The task of a request, after every check that can be made before it runs (ValueError / LimitError)."""
    from easel.serve.control_trust import upscaler_name
    from easel.upscale.extras import _target
    fields = body.model_dump(exclude={"image", "imageList"})
    for key in ("upscaler_1", "upscaler_2"):
        fields[key] = upscaler_name(fields[key], key)
    for key in ("gfpgan_visibility", "codeformer_visibility"):
        if fields[key]:
            raise ValueError(f"{key}: face restoration (GFPGAN, CodeFormer) is not available in easel; set it to 0")
    decode = partial(decode_checked, max_pixels=settings.input_pixels())
    decoded = [decode(value, name) for value, name in zip(images, names)]
    for image, name in zip(decoded, names):
        (w, h), _ = _target(image.size, fields["resize_mode"], fields["upscaling_resize"],
                            fields["upscaling_resize_w"], fields["upscaling_resize_h"], fields["upscaling_crop"])
        check_output(w, h, name, settings, second=fields["upscaler_2"] != "None")
    return ExtrasTask(decoded, fields)


def check_output(w: int, h: int, name: str, settings, second: bool = False) -> None:
    """413 when an upscaled image (before any crop) is over max_pixels, or its working memory over max_memory."""
    if w * h > settings.max_pixels:
        raise OutputLimit("max_pixels", w * h, settings.max_pixels, f"the upscaled {name} ({w}x{h}) pixel count")
    need = w * h * BYTES_PER_OUTPUT_PIXEL * (2 if second else 1)
    if settings.max_memory_bytes and need > settings.max_memory_bytes:
        raise MemoryLimit(f"upscaling {name} to {w}x{h} needs about {need} bytes, over this server's max_memory of "
                          f"{settings.max_memory_bytes} bytes; ask for a smaller scale, or start the server with a "
                          "higher --max-memory", need, settings.max_memory_bytes)
