"""Request geometry: the sizes a request works at and produces (pure arithmetic on its fields, no model)."""
from __future__ import annotations

import dataclasses

from easel.pipelines.request import GenerationRequest


def image_default_size(image_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) of an edit: the given ones, else the image's size (keeping its aspect if one side is given),
    to 8 px."""
    w0, h0 = image_size
    to8 = lambda v: max(8, int(v / 8 + 0.5) * 8)  # noqa: E731  (half rounds up, not to even)
    if width is None and height is None:
        return to8(w0), to8(h0)
    if height is None:
        return width, to8(width * h0 / w0)
    if width is None:
        return to8(height * w0 / h0), height
    return width, height


def hires_size(req: GenerationRequest) -> tuple[int, int]:
    """(width, height) of the hires second pass: hr_resize_x/y when given (one of them keeps the aspect), else
    hr_scale times the base size; floored to a multiple of 8."""
    w, h = req.width, req.height
    if req.hr_resize_x and req.hr_resize_y:
        w2, h2 = req.hr_resize_x, req.hr_resize_y
    elif req.hr_resize_x:
        w2, h2 = req.hr_resize_x, req.hr_resize_x * h / w
    elif req.hr_resize_y:
        w2, h2 = req.hr_resize_y * w / h, req.hr_resize_y
    else:
        w2, h2 = w * req.hr_scale, h * req.hr_scale
    return max(8, int(w2) // 8 * 8), max(8, int(h2) // 8 * 8)


def margins(req: GenerationRequest) -> tuple[int, int, int, int]:
    """Outpaint (left, right, up, down) pixels to add, each rounded up to a multiple of 8 so the canvas stays one."""
    up8 = lambda v: -(-int(v) // 8) * 8 if v > 0 else 0  # noqa: E731
    return up8(req.outpaint_left), up8(req.outpaint_right), up8(req.outpaint_up), up8(req.outpaint_down)


def work_size(req: GenerationRequest, default_size: int) -> tuple[int, int]:
    """(width, height) the first pass works at: the request's, else the init image's, else the model default."""
    width, height = req.width, req.height
    if req.init_images and (width is None or height is None):
        width, height = image_default_size(req.init_images[0].size, width, height)
    return width or default_size, height or default_size


def final_size(req: GenerationRequest, default_size: int) -> tuple[int, int]:
    """(width, height) of the images a request produces: after the hires pass, or with outpaint margins."""
    width, height = work_size(req, default_size)
    if req.mode == "outpaint":
        left, right, up, down = margins(req)
        return width + left + right, height + up + down
    if req.mode == "txt2img" and req.enable_hr:
        return hires_size(dataclasses.replace(req, width=width, height=height))
    return width, height
