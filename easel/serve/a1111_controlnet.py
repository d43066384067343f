"""sd-webui-controlnet's routes (`/controlnet/...`), so its clients find the ControlNets and preprocessors here.

The units themselves travel in txt2img / img2img bodies (`alwayson_scripts.controlnet.args`, read in
a1111_schema.py). Lists give names only, never server paths; `detect` runs a preprocessor (numpy, no weights) on
images whose size is checked from their header first, and counts its pixels against the server's max_pixels.
"""
from __future__ import annotations

from functools import partial

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from easel.serve.inputs import decode_checked
from easel.serve.preview import to_base64_png
from easel.serve.schema import GENERATION_RESPONSES, LimitError

PREFIX = "/controlnet"
HASH_MAX_BYTES = 256 * 2**20  # larger files are listed without their hash (hashing would hold the request)
MAX_DETECT_IMAGES = 4  # images one /controlnet/detect call preprocesses


class DetectBody(BaseModel):
    """sd-webui-controlnet's /controlnet/detect body (images as base64)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    controlnet_module: str = Field("none", description="a name from GET /controlnet/module_list")
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_masks: list[str] | None = Field(None, description="base64 masks (the inpaint preprocessor)")
    controlnet_processor_res: int | None = Field(None, description="ignored: the images are preprocessed as sent")
    controlnet_threshold_a: float | None = None
    controlnet_threshold_b: float | None = None


def router(app: FastAPI) -> APIRouter:
    """The /controlnet routes."""
    r = APIRouter(prefix=PREFIX, tags=["controlnet"])

    @r.get("/version", summary="The sd-webui-controlnet API version these routes follow")
    def version() -> dict:
        return {"version": 2}

    @r.get("/model_list", summary="ControlNets in the server's ControlNet folders (names as A1111 writes them)")
    def model_list() -> dict:
        return {"model_list": model_names()}

    @r.get("/module_list", summary="Preprocessors (easel's names, then sd-webui-controlnet's aliases)")
    def module_list(alias_names: bool = False) -> dict:
        return module_body()

    @r.post("/detect", summary="Run a preprocessor on images: the hints a ControlNet would see",
            responses={400: GENERATION_RESPONSES[400]})
    async def detect(body: DetectBody) -> dict:
        return await run_in_threadpool(run_detect, body, app.state.settings)

    return r


def model_names() -> list[str]:
    """`name [hash]` of every listed ControlNet (hashes only of files small enough to hash cheaply)."""
    from easel.weights.controlnet_load import list_controlnets
    from easel.weights.load import file_hash
    out = []
    for p in list_controlnets():
        if p.is_file() and p.stat().st_size <= HASH_MAX_BYTES:
            out.append(f"{p.stem} [{file_hash(p)}]")
        else:
            out.append(p.stem if p.is_file() else p.name)
    return out


def module_body() -> dict:
    """{"module_list": names, "module_detail": {name: sliders}} as sd-webui-controlnet answers."""
    from easel.pipelines.control_pre import ALIASES, PREPROCESSORS
    names = list(PREPROCESSORS) + [a for a in ALIASES if a]
    detail = {}
    for name in names:
        pre = PREPROCESSORS[ALIASES.get(name, name)]
        sliders = [{"name": f"Threshold {ab.upper()}", "value": v} for ab, v in (("a", pre.threshold_a),
                                                                               ("b", pre.threshold_b)) if v is not None]
        detail[name] = {"model_free": True, "sliders": sliders, "needs_mask": pre.needs_mask}
    return {"module_list": names, "module_detail": detail}


def run_detect(body: DetectBody, settings) -> dict:
    """The preprocessed images, base64 PNG; ValueError / LimitError name the bad field."""
    from easel.pipelines.control_pre import canonical, hint_image, preprocess
    name = canonical(body.controlnet_module)  # an unknown or weights-needing module fails before any decoding
    images = body.controlnet_input_images
    if not images:
        raise ValueError("controlnet_input_images: give at least one base64 image")
    if len(images) > MAX_DETECT_IMAGES:
        raise LimitError("max_detect_images", len(images), MAX_DETECT_IMAGES, "the number of controlnet_input_images")
    masks = body.controlnet_masks or []
    # The preprocessors hold a few float copies of the image: bound it by the output limit, not the input one.
    decode = partial(decode_checked, max_pixels=min(settings.input_pixels(), settings.max_pixels))
    out = []
    for i, value in enumerate(images):
        image = decode(value, f"controlnet_input_images[{i}]")
        mask = decode(masks[i], f"controlnet_masks[{i}]") if i < len(masks) and masks[i] else None
        hint = preprocess(name, image, body.controlnet_threshold_a, body.controlnet_threshold_b, mask)
        out.append(to_base64_png(hint_image(hint), None))
    return {"images": out, "info": "Success"}
