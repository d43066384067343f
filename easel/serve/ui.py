"""The web UI at `/`: one hand-written page (easel/serve/static) that talks to the native /api/v1 API.

The page itself does everything a browser can (tabs, the mask canvas, progress over server-sent events, the
gallery); this router serves it and adds what only the server knows: the request schema's defaults and
choices, the default model's size, the jobs as the queue list and the gallery show them (with each image's A1111
parameters text), and reading a dropped PNG.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import json
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from easel import __version__
from easel.pipelines.request import HR_UPSCALERS, INPAINTING_FILLS, PREVIEW_MODES, RESIZE_MODES, GenerationRequest
from easel.serve.jobs import FINISHED, TRAIN
from easel.serve.schema import ERROR_SCHEMA, NOT_FOUND
from easel.serve.settings import TOKEN_COOKIE

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only files /ui/<name> serves (a fixed list, so no request can reach outside the folder).
ASSETS = {"ui.css": "text/css", "ui.js": "text/javascript", "canvas.js": "text/javascript",
          "gallery.js": "text/javascript", "form.js": "text/javascript", "jobs.js": "text/javascript",
          "inside.js": "text/javascript", "train.js": "text/javascript", "control.js": "text/javascript",
          "tasks.js": "text/javascript", "animate.js": "text/javascript", "extras.js": "text/javascript",
          "xyz.js": "text/javascript"}
PROMPT_CHARS = 200  # of each job's prompt in the queue list (the full prompt is in its images' parameters)
UNREADABLE = {400: {"description": "No image, not an image, or one over the server's input pixel limit",
                    "content": {"application/json": {"schema": ERROR_SCHEMA}}}}
_NOT_FORM_FIELDS = ("dtype", "device", "extra", "init_images", "mask")  # set by the server or by the page itself


def router(app: FastAPI) -> APIRouter:
    """The page at `/`, its assets under /ui/, and the UI's helper routes."""
    r = APIRouter(tags=["web UI"])

    @r.get("/", response_class=HTMLResponse, summary="The web UI")
    def index(token: str | None = None) -> HTMLResponse:
        response = HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})
        if token and app.state.settings.token:
            # Reaching here past --token means the token is right: from now on the browser sends it as an
            # HttpOnly cookie (with every asset, fetch, image and event stream), never in a URL that access logs
            # and the history keep; the page then drops ?token= from its own address.
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @r.get("/ui/config.json", summary="What the web UI's form needs: defaults, choices, model size, limits")
    def config() -> dict:
        return ui_config(app)

    @r.get("/ui/jobs", summary="Every remembered job, oldest first, as the web UI's queue shows it")
    def jobs(full: bool = False) -> list[dict]:
        # full=true (once, when the page loads) adds each finished image's parameters and A1111 text.
        queue = app.state.queue
        return [ui_job(job, queue, full) for job in queue.jobs()]

    @r.get("/ui/jobs/{job_id}", summary="One job as the web UI shows it, with its images' parameters and texts",
           responses=NOT_FOUND)
    def job(job_id: str) -> dict:
        return ui_job(_find(app, job_id), app.state.queue, full=True)

    @r.post("/ui/png-info", summary="The generation parameters stored in an image (the request body is the file)",
            responses=UNREADABLE)
    async def png_info(request: Request) -> JSONResponse:
        # Off the event loop: scanning a large file's chunks must not hold up the progress streams.
        limit = app.state.settings.input_pixels()
        return JSONResponse(await run_in_threadpool(read_image_info, await request.body(), limit))

    @r.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, f"no UI file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    return r


def _find(app: FastAPI, job_id: str):
    job = app.state.queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or finished long enough ago to be forgotten)")
    return job


def ui_job(job, queue, full: bool = False) -> dict:
    """A job as a row of the queue list (state, progress, prompt); `full` adds its images, their parameters
    and A1111 texts (what the gallery shows)."""
    from easel.serve.api import PREFIX
    task = job.task.to_dict() if job.task is not None else None
    prompt = job.request.prompt[:PROMPT_CHARS] if task is None else task_text(job.kind, task)
    out = {"id": job.id, "state": job.state, "mode": job.request.mode if task is None else job.kind, "prompt": prompt,
           "step": job.step, "total": job.total, "eta_s": job.eta_s(), "position": queue.position(job),
           "created": job.created, "started": job.started, "finished": job.finished, "error": job.error,
           "n_images": len(job.results), "inspect": job.inspect,
           "inside": f"{PREFIX}/jobs/{job.id}/inside" if job.inside is not None else None, "train": task}
    if full:
        from easel.pipelines.metadata import infotext
        out.update(images=[f"{PREFIX}/jobs/{job.id}/images/{i}.png" for i in range(len(job.results))],
                   params=[r.params for r in job.results], infotexts=[infotext(r.params) for r in job.results])
    return out


def task_text(kind: str, task: dict) -> str:
    """What the queue list says of a task job: a training run's kind, name and dataset, else the task's own label
    (an upscale from A1111's Extras has none: its kind)."""
    if kind == TRAIN:
        return f"train {task['kind']} {task['name']} on {task['dataset']}"
    return str(task.get("label") or kind)[:PROMPT_CHARS]


def page_html() -> str:
    """index.html with the version in the URL of every file the page loads (module imports included, through an
    import map), so that a new release is never served from a stale cache."""
    query = urlencode({"v": __version__})
    imports = {f"/ui/{name}": f"/ui/{name}?{query}" for name in ASSETS if name.endswith(".js")}
    # urlencode leaves no quote or '<' in the query, so the JSON is safe inside <script> and attributes.
    return (_template().replace("{{importmap}}", json.dumps({"imports": imports}))
            .replace("{{query}}", html.escape(query)))


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def form_defaults() -> dict:
    """The request schema's defaults for every field the form sets (the one schema drives the form too)."""
    d = GenerationRequest().to_dict(images="drop")
    return {k: v for k, v in d.items() if k not in _NOT_FORM_FIELDS}


def ui_config(app: FastAPI) -> dict:
    """Defaults, choice lists, the default model's size and batch, and the server's limits."""
    settings = app.state.settings
    return {
        "version": __version__,
        "defaults": form_defaults(),
        "choices": {"hr_upscaler": list(HR_UPSCALERS), "resize_mode": list(RESIZE_MODES),
                    "inpainting_fill": list(INPAINTING_FILLS), "preview_mode": list(PREVIEW_MODES)},
        "model": model_defaults(app.state.queue.default_model),
        "limits": {k: getattr(settings, k) for k in ("max_steps", "max_batch", "max_pixels", "max_body_bytes",
                                                      "max_train_steps")},
        "training": bool(settings.train_root),  # the Train tab says how to turn it on when off
        "auth": bool(settings.api_auth or settings.token),
        "finished_states": list(FINISHED),  # job states that end a job (the queue list reads them from here)
    }


@functools.lru_cache(maxsize=8)
def model_defaults(spec: str | None) -> dict:
    """{'name', 'default_size', 'default_batch'} of a model from its file header alone (no weights loaded);
    sizes are None when the header does not say (the form then leaves them to the model)."""
    from easel.weights.registry import builtin_model, list_models
    path = builtin_model() if spec is None else Path(spec)
    if spec is not None and not path.exists():  # a registry name, not a path
        path = next((e.path for e in list_models() if e.name == spec), None)
    out = {"name": spec or "shapeworld", "default_size": None, "default_batch": None}
    cfg = _easel_config(path) if path is not None and path.suffix == ".safetensors" else None
    if cfg:
        out.update(default_size=cfg.get("default_size"), default_batch=cfg.get("default_batch"))
    return out


def _easel_config(path: Path) -> dict | None:
    """The config easel writes into a .safetensors header (None for other files, or when unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["easel_config"]) if "easel_config" in meta else None
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def read_image_info(data: bytes, max_pixels: int | None) -> dict:
    """What an image file says about how it was made (the one reader, easel.pipelines.metadata, which decodes no
    pixels): its A1111 text (written from easel's JSON when the file has only that), the JSON, and the form's
    fields."""
    from easel.pipelines.metadata import infotext, params_from_metadata, read_image_metadata
    if not data:
        raise ValueError("no image received: send the image file as the request body")
    meta = read_image_metadata(data, max_pixels)
    parameters = meta["parameters"]
    if parameters is None and meta["easel"]:
        try:
            parameters = infotext(meta["easel"])
        except (KeyError, TypeError, ValueError):
            parameters = None  # a JSON chunk that is not easel's own (no size...): shown as stored, below
    return {**meta, "parameters": parameters, "request": form_fields(params_from_metadata(meta))}


def form_fields(params: dict) -> dict:
    """The GenerationRequest fields the form sets, out of an image's parameters (model, hashes, ... dropped)."""
    names = {f.name for f in dataclasses.fields(GenerationRequest)} - set(_NOT_FORM_FIELDS)
    return {k: v for k, v in params.items() if k in names}
