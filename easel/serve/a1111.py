"""AUTOMATIC1111-compatible API under /sdapi/v1, on the same job queue as the native API.

txt2img / img2img block until the job is done, as in A1111 (a client that hangs up cancels its job); progress,
interrupt and skip act on the running job. Request bodies map onto GenerationRequest in a1111_schema.py; fields
easel cannot honour come back in the `info` JSON under "unsupported" (and "ignored" / "notes").
Deviations from A1111: width/height default to the model's size; POST /options answers what it applied and ignored
instead of null; failures are JSON {"error": message} like the rest of easel: 400 when the request was at fault
(an empty mask, an unknown LoRA ...), 500 when something unexpected broke.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from easel import __version__
from easel.files import next_image_number
from easel.pipelines.metadata import infotext, parse_infotext, read_image_metadata, save_png
from easel.serve.a1111_schema import (
    AUTOMATIC_SCHEDULE,
    UPSCALERS,
    Img2ImgBody,
    Mapped,
    Txt2ImgBody,
    echo,
    to_request,
)
from easel.serve.inputs import decode_checked, image_bytes
from easel.serve import a1111_extras
from easel.serve.a1111_extras import upscaler_list
from easel.serve.a1111_scripts import SCRIPTS, assemble, grid_order, plan_xyz, script_of
from easel.serve.jobs import DONE, FAILED, INTERRUPTED, Job
from easel.serve.models import model_entries
from easel.serve.preview import to_base64_png
from easel.serve.schema import GENERATION_RESPONSES
from easel.serve.service import enqueue, failure, wait_for
from easel.weights.load import file_sha256

log = logging.getLogger("easel.serve")
PREFIX = "/sdapi/v1"
DISCONNECT_POLL_S = 0.5  # how often a waiting txt2img/img2img checks whether its client is still there
HASH_MAX_BYTES = 256 * 2**20  # larger checkpoints are listed without a hash (A1111 also hashes lazily)
DEFAULT_OPTIONS = {"CLIP_stop_at_last_layers": 1, "live_previews_enable": True, "show_progress_type": "Approx cheap",
                   "samples_format": "png", "enable_pnginfo": True, "sd_vae": "Automatic"}
_STANDARD_INFO_KEYS = {"prompt", "negative_prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size",
                       "Model hash", "Model", "Clip skip", "Version"}


@dataclass
class A1111State:
    """What the A1111 routes remember between requests (kept at app.state.a1111)."""

    options: dict = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    save_lock: threading.Lock = field(default_factory=threading.Lock)


def router(app: FastAPI) -> APIRouter:
    """The /sdapi/v1 routes."""
    r = APIRouter(prefix=PREFIX, tags=["a1111"])
    app.state.a1111 = A1111State()
    _add_generation(r, app)
    _add_control(r, app)
    _add_lists(r, app)
    _add_options(r, app)
    r.include_router(a1111_extras.router(app, wait_or_cancel))
    from easel.serve import a1111_controlnet
    app.include_router(a1111_controlnet.router(app))  # sd-webui-controlnet's /controlnet routes
    return r


# -- txt2img / img2img --------------------------------------------------------------------------------------------

def _add_generation(r: APIRouter, app: FastAPI) -> None:
    @r.post("/txt2img", summary="Text to image (blocks until done; A1111 body and response)",
            responses=GENERATION_RESPONSES)
    async def txt2img(request: Request, body: Txt2ImgBody) -> dict:  # type: ignore[valid-type]
        return await generate(app, request, body, img2img=False)

    @r.post("/img2img", summary="Image to image / inpainting (blocks until done; A1111 body and response)",
            responses=GENERATION_RESPONSES)
    async def img2img(request: Request, body: Img2ImgBody) -> dict:  # type: ignore[valid-type]
        return await generate(app, request, body, img2img=True)


async def generate(app: FastAPI, request: Request, body, img2img: bool) -> dict:
    """Map the body, queue the job, wait for it, and answer {images, parameters, info} as A1111 does."""
    queue, state = app.state.queue, app.state.a1111
    data = body.model_dump()
    sent = set(body.model_fields_set) | set(body.model_extra or {})
    decode = partial(decode_checked, max_pixels=app.state.settings.input_pixels())
    mapped: Mapped = await run_in_threadpool(to_request, data, sent, img2img, dict(state.options),
                                             partial(resolve_checkpoint, queue), decode)
    if mapped.unsupported or mapped.notes:
        log.warning("A1111 request fields not honoured", extra={
            "event": "a1111_unsupported", "unsupported": mapped.unsupported, "notes": mapped.notes})
    if script_of(data.get("script_name")):
        return await generate_xyz(app, request, data, mapped, img2img)
    job = enqueue(app, mapped.request, mapped.model)
    await wait_or_cancel(request, job, queue)
    if job.state == FAILED:
        raise HTTPException(*failure(job))
    images = await run_in_threadpool(_encode, job) if mapped.send_images else []
    saved = await run_in_threadpool(_save, app, job, img2img) if mapped.save_images else []
    info = build_info(job, mapped, saved)
    return {"images": images, "parameters": echo(data, img2img), "info": json.dumps(info, default=str)}


async def generate_xyz(app: FastAPI, request: Request, data: dict, mapped: Mapped, img2img: bool) -> dict:
    """script_name "x/y/z plot": every cell checked first, then run as its own job on the queue; the answer is the
    grid then the cells (A1111's order), each with its infotext. An interrupted or cancelled cell ends the plot:
    the cells made so far come back, without a grid."""
    queue = app.state.queue
    if mapped.request.batch_size not in (None, 1) or mapped.request.n_iter != 1:
        mapped.notes.append("batch_size and n_iter: an X/Y/Z plot makes one image per cell")
    if mapped.save_images:
        mapped.notes.append("save_images: the X/Y/Z plot's images are not saved on the server")
    plan = await run_in_threadpool(plan_xyz, mapped.request, mapped.model, data.get("script_args"), img2img, queue,
                                   app.state.settings, partial(resolve_checkpoint, queue))
    results, job = {}, None
    for key in plan.order:
        job = enqueue(app, plan.cells[key], plan.models[key])
        await wait_or_cancel(request, job, queue)
        if job.state == FAILED:
            raise HTTPException(*failure(job))
        if job.state != DONE or not job.results:
            break
        results[key] = job.results[0]
    complete = len(results) == len(plan.cells)
    cells = [results[k] for k in grid_order(plan) if k in results]
    plot = await run_in_threadpool(assemble, results, plan) if complete else None
    texts = ([plot.infotext] if plot else []) + [infotext(c.params) for c in cells]
    images = []
    if mapped.send_images:
        grid = [base64.b64encode(_grid_png(plot)).decode("ascii")] if plot else []
        images = grid + [to_base64_png(c.image, c.params) for c in cells]
    info = build_info(job, mapped, [])
    first = [cells[0].params] if plot and cells else []
    params = first + [c.params for c in cells]
    info.update(infotexts=texts, index_of_first_image=1 if plot else 0,
                all_prompts=[p.get("prompt", "") for p in params], all_seeds=[p.get("seed") for p in params],
                all_negative_prompts=[p.get("negative_prompt", "") for p in params],
                interrupted=not complete, xyz=plot.params.get("xyz") if plot else None)
    return {"images": images, "parameters": echo(data, img2img), "info": json.dumps(info, default=str)}


def _grid_png(plot) -> bytes:
    """The grid as PNG bytes with A1111's parameters text (the plot's infotext) and easel's JSON."""
    import io

    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", plot.infotext)
    meta.add_text("easel", json.dumps(plot.params, sort_keys=True, default=str))
    buf = io.BytesIO()
    plot.grid.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


async def wait_or_cancel(request: Request, job: Job, queue) -> None:
    """Wait for the job; if the client goes away meanwhile, cancel it so nobody waits behind an unwanted job."""
    while not await wait_for(job, timeout=DISCONNECT_POLL_S):
        if await request.is_disconnected():
            queue.cancel(job.id)
            log.info("client gone: job cancelled", extra={"event": "a1111_disconnect", "job": job.id})
            return


def _encode(job: Job) -> list[str]:
    """Base64 PNGs carrying the A1111 `parameters` chunk (so png-info reads them back)."""
    return [to_base64_png(res.image, res.params) for res in job.results]


def _save(app: FastAPI, job: Job, img2img: bool) -> list[str]:
    """save_images: write PNGs (with parameters) to <output_dir>/<txt2img|img2img>-images/<date>/NNNNN-seed.png."""
    base = Path(app.state.settings.output_dir or "outputs")
    folder = base / ("img2img-images" if img2img else "txt2img-images") / time.strftime("%Y-%m-%d")
    paths = []
    with app.state.a1111.save_lock:  # numbering must not race between concurrent requests
        folder.mkdir(parents=True, exist_ok=True)
        n = next_image_number(folder)
        for i, res in enumerate(job.results):
            paths.append(str(save_png(res.image, folder / f"{n + i:05d}-{res.params.get('seed', 0)}.png", res.params)))
    return paths


def build_info(job: Job, mapped: Mapped, saved: list[str]) -> dict:
    """A1111's `info` (Processed.js keys) from the finished job, plus what easel did not honour."""
    from easel.samplers import SAMPLER_LABELS, SCHEDULE_LABELS
    req, params = mapped.request, [res.params for res in job.results]
    first = params[0] if params else {}
    seeds = [p["seed"] for p in params] or [req.seed]
    # The queue drew the variation seed when the client left it to chance; images count up from it (A1111).
    subseeds = [p.get("subseed", req.subseed + (p["seed"] - req.seed)) for p in params] or [req.subseed]
    texts = [infotext(p) for p in params]
    sampler, scheduler = first.get("sampler", req.sampler), first.get("scheduler", req.scheduler)
    denoise = req.hr_denoising_strength if req.enable_hr else (req.denoising_strength if req.init_images else None)
    return {
        "prompt": req.prompt, "all_prompts": [p.get("prompt", req.prompt) for p in params] or [req.prompt],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [p.get("negative_prompt", req.negative_prompt) for p in params] or [req.negative_prompt],
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength, "width": first.get("width", req.width),
        "height": first.get("height", req.height), "sampler_name": SAMPLER_LABELS.get(sampler, sampler),
        "scheduler": SCHEDULE_LABELS.get(scheduler, scheduler), "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("model"), "sd_model_hash": first.get("model_hash"), "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": denoise, "extra_generation_params": _extra_params(texts[0]) if texts else {},
        "index_of_first_image": 0, "infotexts": texts, "styles": list(req.styles), "clip_skip": req.clip_skip,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "is_using_inpainting_conditioning": None, "version": f"easel {__version__}",
        "unsupported": mapped.unsupported, "ignored": mapped.ignored, "notes": mapped.notes,
        "job_id": job.id, "state": job.state, "interrupted": job.state == INTERRUPTED, "saved": saved,
    }


def _extra_params(text: str) -> dict:
    """The infotext's optional entries (hires, inpaint, variation seed ...), as A1111's extra_generation_params."""
    return {k: v for k, v in parse_infotext(text).items() if k not in _STANDARD_INFO_KEYS}


# -- progress, interrupt, skip --------------------------------------------------------------------------------------

def _add_control(r: APIRouter, app: FastAPI) -> None:
    queue, state = app.state.queue, app.state.a1111

    @r.get("/progress", summary="Progress of the running job, with the current image as base64 PNG")
    def progress(skip_current_image: bool = False) -> dict:
        want_image = not skip_current_image and bool(state.options.get("live_previews_enable", True))
        return progress_body(queue, want_image)

    @r.post("/interrupt", summary="Stop the running job; finished images are kept")
    def interrupt() -> dict:
        queue.interrupt()
        return {}

    @r.post("/skip", summary="Drop the running job's current batch and go on with the next")
    def skip() -> None:
        queue.skip()


def _batch_position(job: Job) -> tuple[int, int, int]:
    """(job_no, sampling_step, sampling_steps): the batch being sampled and the step within it."""
    n_iter = max(1, job.request.n_iter)
    per_batch = max(1, job.total // n_iter)
    job_no = min(job.step // per_batch, n_iter - 1)
    return job_no, job.step - job_no * per_batch, per_batch


def progress_body(queue, want_image: bool) -> dict:
    """A1111's ProgressResponse: progress 0..1, eta_relative (s), state{...}, current_image, textinfo."""
    p = queue.progress(None, preview=want_image)
    job = queue.get(p["id"]) if p.get("id") else None
    if job is None:
        idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
    job_no, step, steps = _batch_position(job)
    pending = job.pending  # the interrupt / skip / cancel asked for this job, from any API
    st = {"skipped": "skip" in pending, "interrupted": "interrupt" in pending,
          "stopping_generation": bool(pending & {"interrupt", "cancel"}),
          "job": "scripts_img2img" if job.request.init_images else "scripts_txt2img", "job_count": job.request.n_iter,
          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
          "job_no": job_no, "sampling_step": step, "sampling_steps": steps, "queued": queue.queued()}
    image = base64.b64encode(p["preview"]).decode("ascii") if p.get("preview") else None
    return {"progress": float(p["progress"] or 0.0), "eta_relative": float(p["eta_s"] or 0.0), "state": st,
            "current_image": image, "textinfo": f"Step {job.step}/{job.total}"}


# -- lists: samplers, schedulers, models, LoRAs, upscalers, png-info ------------------------------------------------

def _add_lists(r: APIRouter, app: FastAPI) -> None:
    queue = app.state.queue

    @r.get("/samplers", summary="Samplers (A1111 labels, with the names easel also accepts)")
    def samplers() -> list[dict]:
        from easel.samplers import SAMPLER_LABELS, SAMPLERS
        return [{"name": SAMPLER_LABELS.get(n, n), "aliases": [f"k_{n}", n],
                 "options": {"scheduler": AUTOMATIC_SCHEDULE[n]} if n in AUTOMATIC_SCHEDULE else {}}
                for n in SAMPLERS]

    @r.get("/schedulers", summary="Sigma schedules ('automatic' picks the sampler's preferred one)")
    def schedulers() -> list[dict]:
        from easel.samplers import SCHEDULE_LABELS, SCHEDULES
        items = [("automatic", "Automatic")] + [(n, "Normal" if n == "normal" else SCHEDULE_LABELS.get(n, n))
                                                for n in SCHEDULES]
        return [{"name": n, "label": label, "aliases": None, "default_rho": 7.0 if n == "karras" else None,
                 "need_inner_model": None} for n, label in items]

    @r.get("/sd-models", summary="Checkpoints easel finds (title, model_name, hash, sha256, filename, config)")
    def sd_models() -> list[dict]:
        return [_model_item(e) for e in model_entries(queue)]

    @r.post("/refresh-checkpoints", summary="Look for checkpoints again (easel always looks afresh)")
    def refresh_checkpoints() -> None:
        return None

    @r.get("/loras", summary="LoRA files in the LoRA folders")
    def loras() -> list[dict]:
        from easel.weights.lora import list_loras
        return [{"name": e["name"], "alias": e["name"], "path": str(e["path"]), "metadata": {}} for e in list_loras()]

    @r.get("/upscalers", summary="Upscalers for Extras and hires fix: None, Lanczos, Nearest, then the upscaler "
                                 "files found (names only, never the server's paths)")
    def upscalers() -> list[dict]:
        return upscaler_list()

    @r.get("/prompt-styles", summary="Styles of the server's styles.csv files (name, prompt, negative_prompt)")
    def prompt_styles() -> list[dict]:
        from easel.text.styles import load_styles
        return [{"name": name, "prompt": st.prompt, "negative_prompt": st.negative_prompt}
                for name, st in load_styles().items()]

    @r.get("/scripts", summary="The scripts script_name may run (easel runs the X/Y/Z plot)")
    def scripts() -> dict:
        return {"txt2img": list(SCRIPTS), "img2img": list(SCRIPTS)}

    @r.get("/latent-upscale-modes", summary="Latent upscalers for hires fix")
    def latent_upscale_modes() -> list[dict]:
        return [{"name": k} for k in UPSCALERS if k.startswith("Latent")]

    @r.post("/png-info", summary="The generation parameters stored in an image (read without decoding it)",
            responses={400: GENERATION_RESPONSES[400]})
    def png_info(body: Annotated[dict, Body(examples=[{"image": "<base64 PNG>"}])]) -> dict:
        image = body.get("image") or ""
        if not isinstance(image, str):
            raise ValueError(f"image must be base64 text of a PNG/JPEG/WebP image (got {type(image).__name__})")
        return read_png_info(image, app.state.settings.input_pixels())


def read_png_info(image_b64: str, max_pixels: int | None = None) -> dict:
    """A1111's PNGInfoResponse: info (the parameters text), items (other text chunks), parameters (parsed); read by
    easel's one image reader from the header and text chunks, so a huge image costs no decoding."""
    if not image_b64.strip():
        return {"info": "", "items": {}, "parameters": {}}
    meta = read_image_metadata(image_bytes(image_b64, "image"), max_pixels)
    items = dict(meta.get("other") or {})
    if meta.get("easel") is not None:
        items["easel"] = json.dumps(meta["easel"])
    info = meta.get("parameters") or ""
    return {"info": info, "items": items, "parameters": parse_a1111_parameters(info) if info else {}}


def parse_a1111_parameters(text: str) -> dict:
    """The infotext as A1111's parse_generation_parameters gives it: Prompt, Negative prompt, the key-value pairs,
    and Size split into Size-1 / Size-2."""
    parsed = parse_infotext(text)
    out = {"Prompt": parsed.pop("prompt", ""), "Negative prompt": parsed.pop("negative_prompt", "")}
    for key, value in parsed.items():
        if key in ("Size", "Hires resize") and "x" in value:
            out[f"{key}-1"], out[f"{key}-2"] = value.split("x", 1)
        else:
            out[key] = value
    return out


# -- checkpoints ----------------------------------------------------------------------------------------------------

def _is_default(entry, queue) -> bool:
    return entry.name == queue.default_model


def sha256_of(path: Path) -> str | None:
    """Full sha256 of a checkpoint file up to HASH_MAX_BYTES (the shared on-disk hash cache); None otherwise."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file() or st.st_size > HASH_MAX_BYTES:
        return None
    return file_sha256(path)


def checkpoint_title(entry) -> str:
    """A1111's title: 'file.safetensors [shorthash]' (no hash for folders and very large files)."""
    sha = sha256_of(entry.path)
    name = entry.path.name if entry.path.is_file() else entry.name
    return f"{name} [{sha[:10]}]" if sha else name


def _model_item(entry) -> dict:
    sha = sha256_of(entry.path)
    return {"title": checkpoint_title(entry), "model_name": entry.name, "hash": sha[:10] if sha else None,
            "sha256": sha, "filename": str(entry.path), "config": None}


def resolve_checkpoint(queue, title: str) -> str | None:
    """The model name a request should use for an A1111 checkpoint title / name / file name / short hash;
    ValueError lists the titles."""
    text = title.strip()
    bare, short = text, None
    if text.endswith("]") and " [" in text:
        bare, short = text[:-1].rsplit(" [", 1)
    entries = model_entries(queue)
    for entry in entries:
        names = {entry.name, entry.path.name, str(entry.path), entry.path.stem}
        if bare in names or (short is None and len(text) == 10 and text == (sha256_of(entry.path) or "")[:10]):
            return entry.name
    raise ValueError(f"checkpoint {title!r} not found; GET {PREFIX}/sd-models lists them: "
                     f"{', '.join(checkpoint_title(e) for e in entries) or '(none)'}")


# -- options --------------------------------------------------------------------------------------------------------

OPTION_CHOICES = {"show_progress_type": ("Approx cheap", "Full"), "samples_format": ("png",), "sd_vae": ("Automatic",)}


def _add_options(r: APIRouter, app: FastAPI) -> None:
    queue, state = app.state.queue, app.state.a1111

    @r.get("/options", summary="The settings easel honours (current checkpoint, CLIP skip, previews)")
    def get_options() -> dict:
        return current_options(queue, state)

    @r.post("/options", summary="Change settings: sd_model_checkpoint loads that model, then makes it the default "
                                "(a model that cannot load is a 400 and changes nothing); others easel does not "
                                "have are answered as ignored", responses={400: GENERATION_RESPONSES[400]})
    def set_options(body: Annotated[dict, Body(examples=[{"sd_model_checkpoint": "shapeworld"}])]) -> dict:
        applied, ignored = apply_options(queue, state, body)
        if ignored:
            log.warning("A1111 options ignored", extra={"event": "a1111_options_ignored", "ignored": ignored})
        return {"applied": applied, "ignored": ignored}


def current_options(queue, state: A1111State) -> dict:
    """What GET /options reports: the current checkpoint (title and sha256) and easel's A1111 options."""
    current = next((e for e in model_entries(queue) if _is_default(e, queue)), None)
    return {"sd_model_checkpoint": checkpoint_title(current) if current else queue.default_model,
            "sd_checkpoint_hash": sha256_of(current.path) if current else None, **state.options}


def load_first(queue, model: str, title: str) -> None:
    """Load `model` in the worker (after the jobs queued before) and return once it is loaded; ValueError with the
    reason when it cannot load, so that the default model stays the one that works."""
    job = queue.load(model)
    job.wait()
    if job.state == FAILED:
        raise ValueError(f"sd_model_checkpoint {title!r} cannot be loaded ({job.error}); the server keeps "
                         f"{queue.default_model!r}")


def apply_options(queue, state: A1111State, body: dict) -> tuple[dict, list[str]]:
    """Apply the options easel has; returns (applied, sorted ignored names). Everything is checked before anything
    changes, so a bad value (400) leaves the settings as they were. Values equal to the current ones pass quietly,
    so a client may post back what GET /options gave it."""
    current, applied, ignored, model = current_options(queue, state), {}, [], ...
    for key, value in body.items():
        if key == "sd_model_checkpoint":
            model = resolve_checkpoint(queue, str(value))
        elif key == "CLIP_stop_at_last_layers":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIP_stop_at_last_layers must be an integer of at least 1 (got {value!r})")
            applied[key] = value
        elif (key == "live_previews_enable" and isinstance(value, bool)) or value in OPTION_CHOICES.get(key, ()):
            applied[key] = value
        elif key not in current or value != current[key]:
            ignored.append(key)
    if model is not ... and model != queue.default_model:
        load_first(queue, model, str(body["sd_model_checkpoint"]))
    if model is not ...:
        queue.set_default_model(model)
        applied["sd_model_checkpoint"] = body["sd_model_checkpoint"]
    state.options.update({k: v for k, v in applied.items() if k != "sd_model_checkpoint"})
    return applied, sorted(ignored)
