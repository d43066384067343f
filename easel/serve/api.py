"""easel's native HTTP API under /api/v1: jobs in, progress and PNGs out, plus the lists a client needs."""
from __future__ import annotations

import asyncio
import base64
import json

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from easel.serve import animate_job, extras_job, xyz_job
from easel.serve.inputs import decode_body_images, decode_checked
from easel.serve.jobs import DONE, EXTRAS, FAILED, FINISHED, GENERATE, TRAIN, Job
from easel.serve.models import model_entries
from easel.serve.preview import to_base64_png, to_png
from easel.serve.schema import ERROR_SCHEMA, GENERATION_RESPONSES, NOT_FOUND, JobBody, request_from_body
from easel.serve.service import enqueue, failure
from easel.serve.settings import TOKEN_COOKIE

PREFIX = "/api/v1"
# Job.kind of every job the API lists (a model load asked for by a settings change is nobody's job to list).
JOB_KINDS = (GENERATE, TRAIN, animate_job.KIND, xyz_job.KIND, EXTRAS)
SSE_POLL_S = 0.1  # how often an event stream looks at its job
CONFLICT = {409: {"description": "The job is not in a state that allows this", "content": {
    "application/json": {"schema": ERROR_SCHEMA}}}}
SSE_RESPONSE = {200: {"description": "text/event-stream: `progress` and `preview` events, then one `done`",
                      "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def router(app: FastAPI) -> APIRouter:
    """The native API routes (jobs, progress, lists)."""
    r = APIRouter(prefix=PREFIX, tags=["native"])
    queue = app.state.queue

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or finished long enough ago to be forgotten)")
        return job

    @r.post("/jobs", status_code=202, summary="Queue a generation request", responses=GENERATION_RESPONSES)
    def submit(body: JobBody) -> JSONResponse:
        data = decode_body_images(body.model_dump(exclude_unset=True), app.state.settings.input_pixels())
        inspect = bool(data.pop("inspect", False))
        req, model = request_from_body(data)
        job = enqueue(app, req, model, inspect=inspect)
        return JSONResponse(job_summary(job, queue), status_code=202,
                            headers={"Location": f"{PREFIX}/jobs/{job.id}"})

    @r.get("/jobs", summary="Every remembered job, oldest first, with what re-shows it: request (images as "
                            "markers), parameters and image URLs of each")
    def list_jobs(limit: int | None = Query(None, ge=1, description="only the newest `limit` jobs"),
                  state: str | None = Query(None, description="only jobs in this state"),
                  kind: str | None = Query(None, description="only jobs of this kind: " + ", ".join(JOB_KINDS))
                  ) -> list[dict]:
        jobs = [j for j in queue.jobs() if (state is None or j.state == state) and (kind is None or j.kind == kind)]
        return [job_summary(j, queue) for j in jobs[-limit if limit else 0:]]

    @r.get("/jobs/{job_id}", summary="A job's state, progress and image parameters", responses=NOT_FOUND)
    def get_job(job_id: str) -> dict:
        return job_summary(find(job_id), queue)

    @r.delete("/jobs/{job_id}", summary="Cancel a job (queued: removed; running: stops at the next step)",
              responses=NOT_FOUND | CONFLICT)
    def cancel(job_id: str) -> dict:
        job = find(job_id)
        if job.state in FINISHED:
            raise HTTPException(409, f"job {job_id} already finished ({job.state}); nothing to cancel")
        queue.cancel(job_id)
        return {"id": job.id, "state": job.state, "cancel_requested": True}

    @r.get("/jobs/{job_id}/images/{n}.png", summary="Image n of a finished job, as PNG with its parameters",
           response_class=Response, responses={200: {"content": {"image/png": {
               "schema": {"type": "string", "format": "binary"}}}}} | NOT_FOUND | CONFLICT | {
               400: {"description": "The job failed: the request was at fault", "content": {
                   "application/json": {"schema": ERROR_SCHEMA}}}})
    def image(job_id: str, n: int) -> Response:
        job = find(job_id)
        if job.state not in FINISHED:
            raise HTTPException(409, f"job {job_id} is {job.state}; images are ready when it is done")
        if job.state == FAILED:  # the job's error, with the status that says whose fault it was (interrupted and
            # cancelled jobs keep the images finished before they stopped)
            status, message = failure(job)
            raise HTTPException(status, f"job {job_id} failed: {message}")
        if job.task is not None and job.kind != GENERATE:  # an animation, plot, upscale or training run
            raise HTTPException(404, f"job {job_id} ({job.kind}) is not a generation: the URLs of what it made are "
                                     f"in its task (GET {PREFIX}/jobs/{job_id})")
        if not 0 <= n < len(job.results):
            raise HTTPException(404, f"job {job_id} has {len(job.results)} image(s); ask for 0..{len(job.results) - 1}")
        result = job.results[n]
        return Response(to_png(result.image, result.params), media_type="image/png")

    @r.get("/jobs/{job_id}/events", summary="Server-sent events: progress, previews, then done",
           response_class=StreamingResponse, responses=SSE_RESPONSE | NOT_FOUND)
    async def events(job_id: str) -> StreamingResponse:
        job = find(job_id)
        return StreamingResponse(_event_stream(job, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @r.get("/progress", summary="Progress of the running job (or of job_id), with a preview as base64 PNG")
    def progress(job_id: str | None = None, preview: bool = True) -> dict:
        p = queue.progress(job_id, preview=preview)
        p["preview"] = base64.b64encode(p["preview"]).decode("ascii") if p.get("preview") else None
        return p

    @r.post("/interrupt", summary="Stop the running job, keeping finished images")
    def interrupt() -> dict:
        job = queue.interrupt()
        return {"id": job.id if job else None}

    @r.post("/skip", summary="Drop the running job's current batch and go on with the next")
    def skip() -> dict:
        job = queue.skip()
        return {"id": job.id if job else None}

    _add_inside(r, find)
    _add_session(r, app)
    _add_lists(r, queue)
    _add_control(r, app)
    for module in (animate_job, xyz_job, extras_job):  # task jobs: queued, followed and cancelled as the others
        r.include_router(module.router(app, job_summary))
    return r


GONE = {410: {"description": "The job's capture is no longer kept (or could not be drawn); the message says why",
              "content": {"application/json": {"schema": ERROR_SCHEMA}}}}
INSIDE_SCHEMA = {"type": "object", "description": "A job's capture: its passes (schedule and film strip), the token "
                 "table, the per-token and per-word attention maps", "additionalProperties": True,
                 "properties": {"passes": {"type": "array"}, "tokens": {"type": "array"},
                                "attention": {"type": ["object", "null"]}}}


def _add_inside(r: APIRouter, find) -> None:
    """GET /jobs/{id}/inside (the capture of a job submitted with inspect: true) and its pictures."""

    def inside_of(job_id: str):
        """The drawn capture of a finished inspected job (read once: a newer job may drop it meanwhile)."""
        job = find(job_id)
        if not job.inspect:
            raise HTTPException(404, f"job {job_id} was not asked to look inside: submit the request with "
                                     '"inspect": true')
        if job.state not in FINISHED:
            raise HTTPException(409, f"job {job_id} is {job.state}; its capture is ready when it is done")
        inside = job.inside
        if inside is None:
            raise HTTPException(410, f"job {job_id} has no capture: {job.inside_error or job.error or job.state}")
        return inside

    @r.get("/jobs/{job_id}/inside", summary="What happened inside a job submitted with inspect: true: per step "
           "sigma, x0, latent preview and predicted noise (PNG URLs), the schedule, the token table, one "
           "cross-attention map per token and per word", responses={200: {"content": {"application/json": {
               "schema": INSIDE_SCHEMA}}}} | NOT_FOUND | CONFLICT | GONE)
    def inside(job_id: str, raw: bool = Query(False, description="add each token map's values: rows of floats at the "
                                                                  "latent's resolution (sums to 1 over all tokens)"),
               embed: bool = Query(False, description="pictures as data: URLs instead of URLs to fetch")) -> dict:
        out = inside_of(job_id).to_dict(f"{PREFIX}/jobs/{job_id}/inside/", raw=raw, embed=embed)
        return {"id": job_id, "image": f"{PREFIX}/jobs/{job_id}/images/0.png", **out}

    @r.get("/jobs/{job_id}/inside/{name}.png", summary="One picture of a job's capture (named in its inside JSON)",
           response_class=Response, responses={200: {"content": {"image/png": {
               "schema": {"type": "string", "format": "binary"}}}}} | NOT_FOUND | CONFLICT | GONE)
    def inside_picture(job_id: str, name: str) -> Response:
        files = inside_of(job_id).files
        if name not in files:
            raise HTTPException(404, f"job {job_id}'s capture has no picture {name!r}: GET .../inside names them")
        return Response(files[name], media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def _add_session(r: APIRouter, app: FastAPI) -> None:
    """POST/DELETE /session: the bearer token in an HttpOnly cookie, so that a browser's EventSource and <img>
    authenticate without the token in their URLs (where access logs and history would keep it)."""

    @r.post("/session", status_code=204, summary="Keep this client's bearer token in an HttpOnly cookie",
            response_class=Response)
    def start_session() -> Response:
        response = Response(status_code=204)
        token = app.state.settings.token
        if token:  # the request got here, so it carried the token (or basic auth): hand it to the browser
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @r.delete("/session", status_code=204, summary="Forget the token cookie", response_class=Response)
    def end_session() -> Response:
        response = Response(status_code=204)
        response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
        return response


def _add_lists(r: APIRouter, queue) -> None:
    """GET /models, /samplers, /schedulers, /loras."""

    @r.get("/models", summary="Models a request may name")
    def models() -> list[dict]:
        return [{"name": e.name, "kind": e.kind, "default": e.name == queue.default_model}
                for e in model_entries(queue)]

    @r.get("/samplers", summary="Sampler names and their A1111 labels")
    def samplers() -> list[dict]:
        from easel.samplers import SAMPLER_LABELS, SAMPLERS
        return [{"name": n, "label": SAMPLER_LABELS.get(n, n)} for n in SAMPLERS]

    @r.get("/schedulers", summary="Sigma schedule names and their A1111 labels")
    def schedulers() -> list[dict]:
        from easel.samplers import SCHEDULE_LABELS, SCHEDULES
        return [{"name": n, "label": SCHEDULE_LABELS.get(n, n)} for n in SCHEDULES]

    @r.get("/loras", summary="LoRA files found in the model folders")
    def loras() -> list:
        from easel.weights.lora import list_loras
        return list_loras()

    @r.get("/styles", summary="Styles of the server's styles.csv files (name, prompt, negative prompt); requests "
                              "apply them by name in `styles`", responses={400: GENERATION_RESPONSES[400]})
    def styles() -> list[dict]:
        from easel.text.styles import load_styles
        return [{"name": name, "prompt": st.prompt, "negative_prompt": st.negative_prompt}
                for name, st in load_styles().items()]


class PreprocessBody(BaseModel):
    """One image through a ControlNet preprocessor (the hint a ControlNet unit would see)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image: str = Field(..., description="the control image: base64 PNG/JPEG/WebP text or a data: URL")
    preprocessor: str = Field("none", description="a name from GET /api/v1/preprocessors")
    threshold_a: float | None = Field(None, description="the preprocessor's first parameter (null: its default)")
    threshold_b: float | None = Field(None, description="its second parameter (null: its default)")
    mask: str | None = Field(None, description="for the inpaint preprocessor: white = repaint (base64)")


def _add_control(r: APIRouter, app: FastAPI) -> None:
    """GET /controlnets and /preprocessors, POST /preprocess: what the web UI's ControlNet panel needs."""

    @r.get("/controlnets", summary="ControlNets in the server's ControlNet folders (names only, never paths); a "
                                   "job's `controlnets[].model` names one")
    def controlnets() -> list[dict]:
        from easel.weights.controlnet_load import list_controlnets
        return [{"name": p.stem if p.is_file() else p.name} for p in list_controlnets()]

    @r.get("/preprocessors", summary="ControlNet preprocessors that need no weights: names, default thresholds, "
                                     "whether they need a mask; and sd-webui-controlnet's aliases")
    def preprocessors() -> list[dict]:
        from easel.pipelines.control_pre import ALIASES, PREPROCESSORS
        return [{"name": name, "threshold_a": pre.threshold_a, "threshold_b": pre.threshold_b,
                 "needs_mask": pre.needs_mask, "aliases": [a for a, n in ALIASES.items() if a and n == name]}
                for name, pre in PREPROCESSORS.items()]

    @r.post("/preprocess", summary="Run a preprocessor on an image: the hint a ControlNet would see, as base64 PNG",
            responses={400: GENERATION_RESPONSES[400]})
    async def preprocess(body: PreprocessBody) -> dict:
        return await run_in_threadpool(preprocess_image, body, app.state.settings)


def preprocess_image(body: PreprocessBody, settings) -> dict:
    """{'image': base64 PNG of the hint, 'preprocessor', 'width', 'height'}; ValueError / LimitError name the
    bad field (the image's size is read from its header before anything is decoded)."""
    from easel.pipelines.control_pre import canonical, hint_image, preprocess
    name = canonical(body.preprocessor)  # an unknown or weights-needing name fails before any decoding
    # The preprocessors hold a few float copies of the image: bound it by the output limit too.
    limit = min(settings.input_pixels(), settings.max_pixels)
    image = decode_checked(body.image, "image", limit)
    mask = decode_checked(body.mask, "mask", limit) if body.mask else None
    hint = hint_image(preprocess(name, image, body.threshold_a, body.threshold_b, mask))
    return {"image": to_base64_png(hint, None), "preprocessor": name, "width": hint.width, "height": hint.height}



def job_summary(job: Job, queue) -> dict:
    """A job as the native API shows it: state, progress, parameters and image URLs; a task job (animate, xyz,
    extras) its task's progress and file URLs under `task` (training keeps `train`)."""
    d = job.to_dict()
    if job.kind != TRAIN:
        d["task"], d["train"] = d.get("train"), None
    d["position"] = queue.position(job)
    d["images"] = [f"{PREFIX}/jobs/{job.id}/images/{i}.png" for i in range(len(job.results))]
    d["inside"] = f"{PREFIX}/jobs/{job.id}/inside" if job.inside is not None else None
    return d


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _event_stream(job: Job, queue):
    """progress events when the job changes, preview events every `preview_every` steps, then one done event."""
    seen_version, sent_preview = -1, None
    every = job.request.preview_every
    while True:
        finished = job.state in FINISHED  # read first: the last progress event then always precedes done
        if job.version != seen_version:
            seen_version = job.version
            event = {"id": job.id, "state": job.state, "phase": job.phase, "step": job.step, "total": job.total,
                     "eta_s": job.eta_s(), "position": queue.position(job)}
            if job.task is not None:  # a training job: its loss and sample images; other tasks: their progress
                event["train" if job.kind == TRAIN else "task"] = job.task.to_dict()
            yield _sse("progress", event)
            step = job.preview_step
            if every and step is not None and (sent_preview is None or step // every > sent_preview // every):
                png = await run_in_threadpool(job.preview_png)  # a 'full' preview runs the VAE: not on the loop
                if png:
                    sent_preview = step
                    yield _sse("preview", {"id": job.id, "step": step, "image": base64.b64encode(png).decode()})
        if finished:
            yield _sse("done", job_summary(job, queue) | {"ok": job.state == DONE})
            return
        await asyncio.sleep(SSE_POLL_S)
