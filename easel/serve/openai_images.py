"""OpenAI-compatible image generation: POST /v1/images/generations on easel's job queue.

Images come back as base64 (`b64_json`); `response_format: "url"` is refused because easel keeps no image store to
link to. OpenAI's model names (dall-e-2, dall-e-3, gpt-image-1 ...) mean the server's current model; an easel model
name picks that model. Options easel has no equivalent for (quality, style, background) are reported in the response
under "easel": {"unsupported": [...]}. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: a bad
input the pipeline finds is a 400 invalid_request_error, anything unexpected a 500 server_error.
easel extensions to the body: negative_prompt, seed, steps, cfg_scale, sampler.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import FAILED, Job, QueueFull
from easel.serve.models import model_entries
from easel.serve.preview import to_base64_png
from easel.serve.schema import GENERATION_RESPONSES, LimitError
from easel.serve.service import enqueue, failure

log = logging.getLogger("easel.serve")
PREFIX = "/v1/images"
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
MAX_N = 10  # OpenAI's limit; the server's max_batch may be lower
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
NEUTRAL = {"quality": (None, "auto", "standard"), "style": (None,), "background": (None, "auto"),
           "moderation": (None, "auto", "low")}
LIMIT_PARAMS = {"max_pixels": "size", "max_batch": "n", "max_steps": "steps"}


class GenerationsBody(BaseModel):
    """OpenAI's image generation request (plus a few easel extensions)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1, description="what to draw")
    model: str | None = Field(None, description="an OpenAI model name (the server's model) or an easel model name")
    n: int = Field(1, ge=1, le=MAX_N, description="number of images")
    size: str | None = Field(None, description="'WxH' (multiples of 8) or 'auto' (the model's size)")
    response_format: str | None = Field("b64_json", description="only b64_json is served")
    output_format: str | None = Field(None, description="png (default), jpeg or webp")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0-100")
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    partial_images: int | None = None
    stream: bool | None = None
    user: str | None = None
    negative_prompt: str = Field("", description="easel extension")
    seed: int = Field(-1, description="easel extension: -1 for a random seed")
    steps: int | None = Field(None, ge=1, description="easel extension")
    cfg_scale: float | None = Field(None, description="easel extension")
    sampler: str | None = Field(None, description="easel extension: easel name or A1111 label")


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers)

    def response(self) -> JSONResponse:
        """The JSON error response."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def router(app: FastAPI) -> APIRouter:
    """The /v1/images routes."""
    r = APIRouter(prefix=PREFIX, tags=["openai"])
    schema = GenerationsBody.model_json_schema()

    @r.post("/generations", summary="Create images (OpenAI images API; b64_json only)", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        responses={status: {"description": d["description"], "content": {"application/json": {"schema": ERROR}}}
                   for status, d in GENERATION_RESPONSES.items()} | {
            404: {"description": "Unknown model", "content": {"application/json": {"schema": ERROR}}},
            409: {"description": "Stopped before an image finished", "content": {"application/json": {
                "schema": ERROR}}}})
    async def generations(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await create(app, request))
        except OpenAIError as e:
            return e.response()
    return r


async def create(app: FastAPI, request: Request) -> dict:
    """Check the body, queue the job, wait, and answer {created, data: [{b64_json}], easel: {...}}."""
    body = await _parse(request)
    req, unsupported = to_request(body)
    model = _model(app.state.queue, body.model)
    job = _enqueue(app, req, model)
    from easel.serve.a1111 import wait_or_cancel
    await wait_or_cancel(request, job, app.state.queue)
    if job.state == FAILED:
        status, message = failure(job)
        raise OpenAIError(status, message, code=None if status == 400 else FAILED,
                          kind="invalid_request_error" if status == 400 else "server_error")
    if not job.results:  # interrupted or cancelled (from another API) before an image was finished
        raise OpenAIError(409, f"image generation stopped ({job.state}) before any image was finished",
                          code=job.state)
    fmt = body.output_format or "png"
    data = await run_in_threadpool(lambda: [{"b64_json": encode(res, fmt, body.output_compression)}
                                            for res in job.results])
    if unsupported:
        log.warning("OpenAI request options not honoured", extra={"event": "openai_unsupported",
                                                                 "unsupported": unsupported})
    first = job.results[0].params
    return {"created": int(job.finished or time.time()), "data": data, "output_format": fmt,
            "size": f"{first.get('width')}x{first.get('height')}",
            "easel": {"model": first.get("model"), "seeds": [res.params.get("seed") for res in job.results],
                      "unsupported": unsupported, "job_id": job.id}}


async def _parse(request: Request) -> GenerationsBody:
    """The JSON body, checked; errors name the parameter."""
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIError(400, "the request body must be JSON, e.g. {\"prompt\": \"a red star\"}") from None
    if not isinstance(raw, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return GenerationsBody.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        message = (f"Unrecognized request argument supplied: {param}" if err["type"] == "extra_forbidden"
                   else f"{param}: {err['msg']}")
        raise OpenAIError(400, message, param=param) from None


def to_request(body: GenerationsBody) -> tuple[GenerationRequest, list[str]]:
    """(GenerationRequest, unsupported option names) from the body; OpenAIError names the bad parameter."""
    if body.response_format not in (None, "b64_json"):
        raise OpenAIError(400, f"response_format {body.response_format!r} is not served: easel returns images "
                               "inline only; use response_format 'b64_json'", param="response_format")
    if body.stream:
        raise OpenAIError(400, "stream is not supported: easel answers when the images are done; omit it "
                               "(or watch progress on /api/v1/jobs/{id}/events)", param="stream")
    if (body.output_format or "png") not in FORMATS:
        raise OpenAIError(400, f"output_format {body.output_format!r}: choose one of {', '.join(FORMATS)}",
                          param="output_format")
    width, height = _size(body.size)
    options = {k: v for k, v in (("steps", body.steps), ("cfg_scale", body.cfg_scale), ("sampler", body.sampler))
               if v is not None}
    try:
        req = GenerationRequest(body.prompt, body.negative_prompt, width=width, height=height, seed=body.seed,
                                batch_size=body.n, n_iter=1, **options)
        req.check()
    except ValueError as e:
        param = "size" if str(e).startswith(("width", "height")) else next(
            (k for k in ("steps", "sampler", "seed", "cfg_scale") if k in str(e)), None)
        raise OpenAIError(400, str(e), param=param) from None
    return req, _unsupported(body)


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not m:
        raise OpenAIError(400, f"size {size!r} must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto'", param="size")
    return int(m.group(1)), int(m.group(2))


def _unsupported(body: GenerationsBody) -> list[str]:
    """Options sent with a value that would change OpenAI's result but that easel does not have."""
    out = [name for name, neutral in NEUTRAL.items() if getattr(body, name) not in neutral]
    if body.partial_images:
        out.append("partial_images")
    return out


def _model(queue, name: str | None) -> str | None:
    """The easel model for an OpenAI model name (None: the server's current one) or an easel model / file name."""
    from easel.serve.a1111 import (
        resolve_checkpoint,  # one name resolution for both APIs
    )
    if name is None or name in OPENAI_MODELS:
        return None
    try:
        return resolve_checkpoint(queue, name)
    except ValueError:
        names = ", ".join(e.name for e in model_entries(queue)) or "(none found)"
        raise OpenAIError(404, f"The model '{name}' does not exist; use an OpenAI model name for the server's "
                               f"model, or one of: {names}", param="model", code="model_not_found") from None


def _enqueue(app: FastAPI, req: GenerationRequest, model: str | None) -> Job:
    """Queue through the server's limits; their errors in OpenAI's shape."""
    try:
        return enqueue(app, req, model)
    except LimitError as e:
        raise OpenAIError(e.http_status, str(e), param=LIMIT_PARAMS.get(e.limit), code=e.limit) from None
    except QueueFull as e:
        raise OpenAIError(503, str(e), code="queue_full", kind="server_error",
                          headers={"Retry-After": str(e.retry_after)}) from None
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


def encode(result, fmt: str = "png", quality: int | None = None) -> str:
    """Base64 of a generated image in `fmt` (png, jpeg, webp); PNGs carry the parameters (A1111 and easel chunks),
    `quality` applies to the lossy formats."""
    if fmt == "png":
        return to_base64_png(result.image, result.params)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if quality is not None else {}
    result.image.convert("RGB").save(buf, format=FORMATS[fmt], **kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")
