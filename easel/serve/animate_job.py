"""Animation jobs: `POST /api/v1/animate` runs `easel animate` (prompt travel, Deforum-style 2D motion) on the queue.

    curl -s localhost:7860/api/v1/animate -d '{"prompts": ["a red circle", "a blue square"], "frames": 12}'
    curl -s localhost:7860/api/v1/jobs/ID                  # step / total = frames done / frames, task.frame_step
    curl -s localhost:7860/api/v1/animate/ID/animation -o a.gif     # the GIF / WebP / MP4, once done
    curl -s localhost:7860/api/v1/animate/ID/frames/0.png -o f0.png  # each frame, with its infotext

Everything that can be checked before the model runs is checked before the job is queued (schedules at every
frame, keyframes, the format, each frame's size, steps and memory as for a generation, and the whole animation's
frames x pixels), so a request that cannot run is a 4xx naming the limit, not a failed job. A cancel stops after the
current frame's step; the frames made so far are kept, and written as the animation.
"""
from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from easel.pipelines.request import GenerationRequest
from easel.serve.schema import MAX_PROMPT_CHARS, MemoryLimit, base_size
from easel.serve.service import admit
from easel.serve.task_jobs import (FILE_ERRORS, PNG, PREFIX, SUBMIT_RESPONSES, FixedLimit, StepReporter, accepted,
                                   finished, pick, png, show_preview, submit, task_of)

KIND = "animate"  # Job.kind
MAX_FRAMES = 240  # of one animation over HTTP (the CLI allows easel.animate.MAX_FRAMES)
MAX_PROMPTS = 32  # keyframe prompts
MAX_ANIMATION_PIXELS = 2**26  # frames x width x height: every frame is kept (RGB) and encoded into the file
FRAME_BYTES_PER_PIXEL = 3 * 3  # a frame kept, its PNG, and the encoder's copy
MEDIA_TYPES = {"gif": "image/gif", "webp": "image/webp", "mp4": "video/mp4"}
ScheduleText = Annotated[str, Field(max_length=1000)]
Motion = ScheduleText | float | None
Seed = Annotated[int, Field(ge=0, lt=2**32)]
SCHEDULE = "a Deforum schedule such as \"0:(1.0), 30:(1.05)\" (frame:(value); values may use t), or a number"


class AnimateBody(BaseModel):
    """`easel animate`: prompts at keyframes, travelled between; optional 2D motion with img2img feedback."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": {
        "prompts": ["a red circle", "a blue square"], "frames": 8, "seed": 7, "steps": 8, "format": "gif"}})
    prompts: list[str] = Field(..., min_length=1, description="one prompt per keyframe (prompt travel between them)")
    frames: int = Field(16, ge=1, description=f"number of frames (at most {MAX_FRAMES} here)")
    keyframes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_PROMPTS, description="frame of each prompt, starting at 0 and increasing (default: evenly "
        "spaced)")
    seeds: list[Seed] | None = Field(None, max_length=MAX_PROMPTS, description="seed of each keyframe, noise slerped "
                                     "between them (default: seed, seed + 1, ...)")
    seed: int = Field(-1, ge=-1, lt=2**32, description="first keyframe's seed (-1: random, reported in the job)")
    zoom: Motion = Field(None, description=f"zoom per frame (> 1 moves in): {SCHEDULE}; any motion field turns on "
                         "img2img feedback")
    angle: Motion = Field(None, description=f"turn per frame in degrees, counter-clockwise: {SCHEDULE}")
    translation_x: Motion = Field(None, description=f"shift per frame in pixels, right: {SCHEDULE}")
    translation_y: Motion = Field(None, description=f"shift per frame in pixels, down: {SCHEDULE}")
    strength: Motion = Field(None, description="Deforum's strength schedule: how much of the previous frame each frame "
                             "keeps, 0..1 (default 0.65)")
    color_coherence: bool = Field(True, description="match each frame's colours to the first frame's (LAB)")
    motion: bool | None = Field(None, description="force img2img feedback on or off (null: on when a motion "
                                "schedule is given)")
    format: Literal["gif", "webp", "mp4"] = Field("gif", description="the animation file (mp4 needs PyAV on the "
                                                  "server)")
    ms: int = Field(125, ge=1, le=10_000, description="milliseconds per frame in the file")
    model: str | None = Field(None, description="a name from GET /api/v1/models (default: the server's model)")
    negative_prompt: str = ""
    steps: int = Field(20, description="sampling steps of each frame (motion frames run strength's share of them)")
    cfg_scale: float = 7.0
    sampler: str = "dpmpp_2m"
    scheduler: str | None = None
    width: int | None = Field(None, description="frame width (null: the model's default size)")
    height: int | None = None
    clip_skip: int = 1
    eta: float | None = None


@dataclasses.dataclass(eq=False)
class AnimateTask:
    """One animation job's settings and, as it runs, its frames (kept) and finally its file."""

    settings: object  # easel.animate.AnimationSettings
    request: GenerationRequest  # steps, CFG, sampler, size, negative prompt of every frame
    fmt: str
    server: object  # the server's Settings (limits checked again once the model's default size is known)
    frames: list = dataclasses.field(default_factory=list)  # PNG bytes with infotext, one per frame made
    file: bytes | None = None
    smoothness: dict | None = None
    frame_step: int = 0  # sampler steps done in the current frame
    job_id: str = ""

    def run(self, job, pipe) -> None:
        """Draw the frames (each a preview as it is made), then write the animation of those made."""
        from easel.animate import animate, smoothness
        w, h = base_size(self.request, pipe.config.default_size)
        request = dataclasses.replace(self.request, width=w, height=h)
        check_animation(self.settings.frames, request, self.server, pipe.config)
        reporter = StepReporter(job, count_steps=False)
        images = []

        def step(d: dict) -> None:
            reporter(d)
            self.frame_step = reporter.step_in_part

        def frame_made(n: int, image, params: dict) -> None:
            from easel.serve.preview import to_png
            images.append(image)
            self.frames.append(to_png(image, params))
            now = time.monotonic()
            if job._last_t is not None:
                job._step_times.append(now - job._last_t)  # the ETA counts frames
            job._last_t, job.step, reporter.step_in_part, self.frame_step = now, n + 1, 0, 0
            show_preview(job, image)

        job.total, job._last_t = self.settings.frames, time.monotonic()
        animate(pipe, self.settings, None, request, callback=step, should_stop=reporter.should_stop,
                on_image=frame_made)
        if images:
            self.smoothness = smoothness(images)
            self.file = encode(images, self.fmt, self.settings.ms)
        job.version += 1

    def to_dict(self) -> dict:
        """What the job's JSON says about it: progress in frames, and the URLs of what is made."""
        s, base = self.settings, f"{PREFIX}/animate/{self.job_id}"
        return {"kind": KIND, "label": f"animate {len(s.prompts)} prompt(s), {s.frames} frames: {s.prompts[0][:80]}",
                "frames": s.frames, "frames_done": len(self.frames), "frame_step": self.frame_step,
                "format": self.fmt, "prompts": list(s.prompts), "seeds": s.seed_list(), "keyframes": s.keyframe_list(),
                "smoothness": self.smoothness, "animation": f"{base}/animation" if self.file else None,
                "frame_urls": [f"{base}/frames/{n}.png" for n in range(len(self.frames))]}


def encode(images: list, fmt: str, ms: int) -> bytes:
    """The animation file's bytes (written through easel.animation, the one writer)."""
    from easel.animation import save_animation
    with tempfile.TemporaryDirectory(prefix="easel_animate_") as folder:
        path = save_animation(images, Path(folder) / f"animation.{fmt}", ms=ms, hold_last=1)
        return path.read_bytes()


def check_animation(frames: int, frame: GenerationRequest, server, config=None) -> None:
    """The server's limits on a whole animation: frames, frames x pixels, and each frame as a generation."""
    if frames > MAX_FRAMES:
        raise FixedLimit("max_frames", frames, MAX_FRAMES, "frames")
    admit(frame, server, config)  # size, steps, prompt length, memory of one frame
    if config is None and (frame.width is None or frame.height is None):
        return  # the size is the model's default: checked again once the model is loaded
    w, h = base_size(frame, config.default_size if config is not None else 8)
    pixels = frames * w * h
    if pixels > MAX_ANIMATION_PIXELS:
        raise FixedLimit("max_animation_pixels", pixels, MAX_ANIMATION_PIXELS,
                         f"frames x width x height ({frames} x {w}x{h})")
    need = pixels * FRAME_BYTES_PER_PIXEL
    if server.max_memory_bytes and need > server.max_memory_bytes:
        raise MemoryLimit(f"{frames} frames of {w}x{h} need about {need} bytes kept, over this server's max_memory of "
                          f"{server.max_memory_bytes} bytes; ask for fewer or smaller frames", need,
                          server.max_memory_bytes)


def prepare(app: FastAPI, body: AnimateBody) -> tuple[AnimateTask, str | None]:
    """The checked task of a request and its model name (ValueError / LimitError: a 4xx before anything runs)."""
    from easel.animate import AnimationSettings
    from easel.animation import check_format
    from easel.serve.trust import check_names
    queue, server = app.state.queue, app.state.settings
    if len(body.prompts) > MAX_PROMPTS:
        raise FixedLimit("max_prompts", len(body.prompts), MAX_PROMPTS, "the number of prompts")
    chars = sum(len(p) for p in body.prompts) + len(body.negative_prompt)
    if chars > MAX_PROMPT_CHARS:
        raise FixedLimit("max_prompt_chars", chars, MAX_PROMPT_CHARS, "the prompts' length in characters")
    if body.frames > MAX_FRAMES:  # before the schedules are evaluated at every frame
        raise FixedLimit("max_frames", body.frames, MAX_FRAMES, "frames")
    model = queue.check_model(body.model)
    seed = body.seed if body.seed >= 0 else random.randrange(2**32)
    fields = body.model_dump(include={"negative_prompt", "steps", "cfg_scale", "sampler", "scheduler", "width",
                                      "height", "clip_skip", "eta"})
    request = GenerationRequest(prompt=body.prompts[0], seed=seed, batch_size=1, **fields)
    request.check()
    for i, prompt in enumerate(body.prompts):  # a LoRA tag in any prompt names a listed LoRA
        try:
            check_names(dataclasses.replace(request, prompt=prompt), queue)
        except ValueError as e:
            raise ValueError(f"prompts[{i}]: {str(e).removeprefix('prompt: ')}") from None
    motion = {k: None if getattr(body, k) is None else str(getattr(body, k))
              for k in ("zoom", "angle", "translation_x", "translation_y", "strength")}
    settings = AnimationSettings(list(body.prompts), body.frames, body.keyframes, body.seeds, seed,
                                 color_coherence=body.color_coherence, motion=body.motion, ms=body.ms, **motion)
    settings.check()
    check_format(body.format)
    check_animation(body.frames, request, server, queue.model_config(model))
    return AnimateTask(settings, request, body.format, server), model


def router(app: FastAPI, job_summary) -> APIRouter:
    """POST /animate and a finished animation's file and frames; `job_summary(job, queue)` is the API's job JSON."""
    r = APIRouter()
    queue = app.state.queue

    @r.post("/animate", status_code=202, summary="Queue an animation (easel animate: prompt travel, Deforum-style "
            "zoom/pan/rotation with img2img feedback); progress in frames on GET /api/v1/jobs/{id} and its events, "
            "cancel with DELETE /api/v1/jobs/{id}", responses=SUBMIT_RESPONSES)
    def submit_animation(body: AnimateBody) -> JSONResponse:
        task, model = prepare(app, body)
        job = submit(app, KIND, task, model, body.frames, task.request)
        return accepted(job, job_summary(job, queue))

    @r.get("/animate/{job_id}/animation", summary="The finished animation (GIF, WebP or MP4) of the frames made",
           response_class=Response, responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                                  for t in MEDIA_TYPES.values()}}} | FILE_ERRORS)
    def animation(job_id: str) -> Response:
        job, task = task_of(queue, job_id, AnimateTask, "animation")
        finished(job)
        if task.file is None:
            raise HTTPException(409, f"job {job_id} was {job.state} before its first frame: no animation")
        return Response(task.file, media_type=MEDIA_TYPES[task.fmt], headers={
            "Cache-Control": "max-age=3600", "Content-Disposition": f'inline; filename="easel-{job_id}.{task.fmt}"'})

    @r.get("/animate/{job_id}/frames/{n}.png", summary="Frame n of an animation job, as PNG with its parameters "
           "(ready as soon as it is made)", response_class=Response, responses=PNG | FILE_ERRORS)
    def frame(job_id: str, n: int) -> Response:
        job, task = task_of(queue, job_id, AnimateTask, "animation")
        return png(pick(task.frames, n, job, "frame"))

    return r
