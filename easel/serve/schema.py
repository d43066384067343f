"""HTTP bodies from the one request schema (GenerationRequest), and the server's limits on requests."""
from __future__ import annotations

import dataclasses
import math
import typing

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model

from easel.pipelines.request import GenerationRequest


class ControlUnitBody(BaseModel):
    """One ControlNet unit of a native request (easel.pipelines.control_unit.ControlUnit; images as base64)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(description="a name from GET /controlnet/model_list (never a path)")
    image: str | None = Field(None, description="the condition image, base64 (null: the init image)")
    mask: str | None = Field(None, description="for the inpaint preprocessor outside inpainting (white = repaint)")
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = Field("balanced", description="balanced, prompt, control (or A1111's labels, 0-2)")
    resize_mode: str | int = Field("crop_and_resize", description="just_resize, crop_and_resize, resize_and_fill")
    preprocessor: str = Field("none", description="a name from GET /controlnet/module_list")
    threshold_a: float | None = None
    threshold_b: float | None = None
    module: str | None = Field(None, description="sd-webui-controlnet's name for preprocessor")
    input_image: str | None = Field(None, description="sd-webui-controlnet's name for image")


# Fields whose Python type is not JSON: images travel as base64 PNG/JPEG text (or data: URLs).
_JSON_TYPES = {"init_images": list[str], "mask": str | None, "controlnets": list[ControlUnitBody],
               # A1111 sends choice fields as indices (0, 1, 2): GenerationRequest maps them to names.
               "resize_mode": str | int, "inpainting_fill": str | int, "loras": list[str]}
_SERVER_SET = ("dtype", "device")  # the server's model decides these, not the client


def _body_fields() -> dict:
    hints = typing.get_type_hints(GenerationRequest)
    fields = {}
    for f in dataclasses.fields(GenerationRequest):
        if f.name in _SERVER_SET:
            continue
        kind = _JSON_TYPES.get(f.name, hints[f.name])
        if f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (kind, Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (kind, f.default)
    return fields


JobBody = create_model(
    "JobBody", __config__=ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": {
        "prompt": "a red star above a blue circle", "steps": 20, "seed": 42, "model": None}}),
    model=(str | None, Field(None, description="a name from GET /api/v1/models (default: the server's model)")),
    inspect=(bool, Field(False, description="also capture what happens inside (per-step x0, latent and noise, the "
                         "schedule, per-token cross-attention maps, the token table): GET /api/v1/jobs/{id}/inside "
                         "once the job is done. The images are the same as without it.")),
    **_body_fields())
JobBody.__doc__ = "A generation request: the fields of easel's GenerationRequest (images as base64 text)."


def request_from_body(body: dict) -> tuple[GenerationRequest, str | None]:
    """(GenerationRequest, model name) from a JSON body; ValueError names the bad field."""
    body = dict(body)
    model = body.pop("model", None)
    for name in _SERVER_SET:
        body.pop(name, None)
    try:
        req = GenerationRequest.from_dict(body)
    except Image.DecompressionBombError as e:  # PIL refuses images of hundreds of megapixels
        raise ValueError(f"an input image is too large to decode ({e})") from None
    check_upscaler_not_path(body.get("hr_upscaler"), "hr_upscaler")  # before anything looks for the file
    req.check()
    return req, model


def check_upscaler_not_path(name, where: str) -> None:
    """Over HTTP an upscaler is a name from GET /sdapi/v1/upscalers, never a path (the server's files stay its own)."""
    if isinstance(name, str) and ("/" in name or "\\" in name):
        raise ValueError(f"{where}: upscaler {name!r} is a path; requests name an upscaler from "
                         "GET /sdapi/v1/upscalers (a name, never a path)")


ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"],
                "additionalProperties": True}
COMMON_RESPONSES = {status: {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                    for status, what in ((401, "Authentication required (--api-auth / --token)"),
                                         (413, "Request body over --max-body-mb"))}
GENERATION_RESPONSES = {status: {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                        for status, what in ((400, "A bad value or a request over a limit; the message names it"),
                                             (413, "Over --max-body-mb, or its estimated memory over --max-memory"),
                                             (503, "The queue is full; retry after Retry-After seconds"))}
NOT_FOUND = {404: {"description": "No such job", "content": {"application/json": {"schema": ERROR_SCHEMA}}}}

MAX_MASK_BLUR = 256  # pixels; A1111's slider stops at 64, and a blur radius costs memory in proportion
MAX_PROMPT_CHARS = 50_000  # all prompt fields together: each 75 tokens are one more text-encoder pass
MAX_LORAS = 32  # LoRAs one request may apply (tags and `loras` together)


class LimitError(ValueError):
    """A request over one of the server's limits; carries the limit's name, the value and the maximum."""

    http_status = 400

    def __init__(self, limit: str, value, maximum, what: str):
        super().__init__(f"{what} is {value}, over this server's limit of {maximum} ({limit}); "
                         f"ask for less, or start the server with a higher {limit}")
        self.limit, self.value, self.maximum = limit, value, maximum

    def to_dict(self) -> dict:
        """JSON body of the error response."""
        return {"error": str(self), "limit": self.limit, "value": self.value, "max": self.maximum}


class MemoryLimit(LimitError):
    """A request whose estimated peak memory is over the server's --max-memory (413: too large to run here)."""

    http_status = 413

    def __init__(self, message: str, estimate: int | None, maximum: int):
        ValueError.__init__(self, message)
        self.limit, self.value, self.maximum = "max_memory", estimate, maximum


def base_size(req: GenerationRequest, default_size: int) -> tuple[int, int]:
    """(width, height) of the first pass: the request's, else the init image's (keeping its aspect when one side
    is given), else the model's default size."""
    from easel.pipelines.sizes import work_size
    return work_size(req, default_size)


def final_size(req: GenerationRequest, default_size: int) -> tuple[int, int]:
    """(width, height) of the images a request makes: after outpaint borders and the hires second pass (the same
    arithmetic the sampling plan runs)."""
    from easel.pipelines.sizes import final_size as planned
    return planned(req, default_size)


def check_limits(req: GenerationRequest, settings, config=None) -> None:
    """Raise LimitError when a request asks for more than `settings` allow, counting what will run: the final
    size (hires, outpaint), every batch, the steps of both passes. `config` is the model's (its default size and
    batch fill unset fields); without it the smallest possible defaults are assumed, and the worker checks again
    once the model is loaded."""
    _check_finite(req)
    size, batch = (config.default_size, config.default_batch) if config is not None else (8, 1)
    for label, (w, h) in (("width x height", base_size(req, size)), ("final width x height", final_size(req, size))):
        if w * h > settings.max_pixels:
            raise LimitError("max_pixels", w * h, settings.max_pixels, f"{label} ({w}x{h})")
    if req.seed_resize_from_w and req.seed_resize_from_h:
        pixels = req.seed_resize_from_w * req.seed_resize_from_h
        if pixels > settings.max_pixels:
            raise LimitError("max_pixels", pixels, settings.max_pixels, "seed_resize_from_w x seed_resize_from_h")
    for name in ("steps", "hr_second_pass_steps"):
        if getattr(req, name) > settings.max_steps:
            raise LimitError("max_steps", getattr(req, name), settings.max_steps, name)
    images = (batch if req.batch_size is None else req.batch_size) * req.n_iter  # unset: the model's default batch
    if images > settings.max_batch:
        raise LimitError("max_batch", images, settings.max_batch, "batch_size x n_iter")
    _check_sizes(req)


def _check_finite(req: GenerationRequest) -> None:
    """NaN and infinity pass range checks written as comparisons (and JSON parsers accept them): refuse them."""
    for f in dataclasses.fields(req):
        value = getattr(req, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number (got {value})")


def _check_sizes(req: GenerationRequest) -> None:
    """Bounds on the fields whose cost grows with their value."""
    if req.mask_blur > MAX_MASK_BLUR:
        raise LimitError("max_mask_blur", req.mask_blur, MAX_MASK_BLUR, "mask_blur")
    if req.inpaint_full_res_padding > MAX_MASK_BLUR * 4:
        raise LimitError("max_padding", req.inpaint_full_res_padding, MAX_MASK_BLUR * 4, "inpaint_full_res_padding")
    chars = sum(len(getattr(req, f) or "") for f in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"))
    if chars > MAX_PROMPT_CHARS:
        raise LimitError("max_prompt_chars", chars, MAX_PROMPT_CHARS, "the prompts' length in characters")
    if len(req.loras) > MAX_LORAS:
        raise LimitError("max_loras", len(req.loras), MAX_LORAS, "the number of loras")


def check_inputs(images: list[tuple[str, Image.Image]], max_pixels: int) -> None:
    """LimitError for an input image (opened, not yet decoded) of more than `max_pixels` pixels."""
    for name, im in images:
        if im.width * im.height > max_pixels:
            raise LimitError("max_input_pixels", im.width * im.height, max_pixels,
                             f"{name} ({im.width}x{im.height}) pixel count")
