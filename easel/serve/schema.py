"""HTTP bodies from the one request schema (GenerationRequest), and the server's limits on requests."""
from __future__ import annotations

import dataclasses
import typing

from PIL import Image
from pydantic import ConfigDict, Field, create_model

from easel.pipelines.request import GenerationRequest

# Fields whose Python type is not JSON: images travel as base64 PNG/JPEG text (or data: URLs).
_JSON_TYPES = {"init_images": list[str], "mask": str | None,
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
    "JobBody", __config__=ConfigDict(extra="forbid", json_schema_extra={"example": {
        "prompt": "a red star above a blue circle", "steps": 20, "seed": 42, "model": None}}),
    model=(str | None, Field(None, description="a name from GET /api/v1/models (default: the server's model)")),
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
    req.check()
    return req, model


class LimitError(ValueError):
    """A request over one of the server's limits; carries the limit's name, the value and the maximum."""

    def __init__(self, limit: str, value, maximum, what: str):
        super().__init__(f"{what} is {value}, over this server's limit of {maximum} ({limit}); "
                         f"ask for less, or start the server with a higher {limit}")
        self.limit, self.value, self.maximum = limit, value, maximum

    def to_dict(self) -> dict:
        """JSON body of the error response."""
        return {"error": str(self), "limit": self.limit, "value": self.value, "max": self.maximum}


def output_size(req: GenerationRequest) -> tuple[int | None, int | None]:
    """The largest image a request makes (outpaint borders and hires upscale included); None: model default."""
    w, h = req.width, req.height
    if req.init_images and (w is None or h is None):
        w, h = w or req.init_images[0].width, h or req.init_images[0].height
    if w is None or h is None:
        return w, h
    w, h = w + req.outpaint_left + req.outpaint_right, h + req.outpaint_up + req.outpaint_down
    if req.enable_hr:
        w = req.hr_resize_x or int(w * req.hr_scale)
        h = req.hr_resize_y or int(h * req.hr_scale)
    return w, h


def check_limits(req: GenerationRequest, settings) -> None:
    """Raise LimitError when a request asks for more than `settings` allow (pixels, steps, images, inputs)."""
    w, h = output_size(req)
    if w is not None and h is not None and w * h > settings.max_pixels:
        raise LimitError("max_pixels", w * h, settings.max_pixels, f"width x height ({w}x{h})")
    for name in ("steps", "hr_second_pass_steps"):
        if getattr(req, name) > settings.max_steps:
            raise LimitError("max_steps", getattr(req, name), settings.max_steps, name)
    images = (req.batch_size or 1) * req.n_iter  # an unset batch size is the model's default, 1 to 4
    if images > settings.max_batch:
        raise LimitError("max_batch", images, settings.max_batch, "batch_size x n_iter")
    inputs = [*((f"init_images[{i}]", im) for i, im in enumerate(req.init_images)),
              *((("mask", req.mask),) if req.mask is not None else ())]
    for name, im in inputs:
        if im.width * im.height > settings.max_input_pixels:
            raise LimitError("max_input_pixels", im.width * im.height, settings.max_input_pixels,
                             f"{name} ({im.width}x{im.height}) pixel count")
