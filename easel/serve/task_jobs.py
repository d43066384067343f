"""What the native API's task jobs share (animate, X/Y/Z plot, extras): queueing a task with the request it shows,
stop checks and step reporting on the worker, and handing out a finished job's files.

A task job runs `task.run(job, pipe)` on the queue's worker (easel.serve.jobs), one at a time with the generations:
listed by GET /api/v1/jobs, followed by /events and cancelled by DELETE like them. Its files (an animation, a grid,
an upscaled image) live on the task, since the queue keeps `Job.results` for generations.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from easel.pipelines.common import Interrupted
from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import FAILED, FINISHED, SAMPLING, Job
from easel.serve.schema import ERROR_SCHEMA, GENERATION_RESPONSES, LimitError
from easel.serve.service import failure

log = logging.getLogger("easel.serve")
PREFIX = "/api/v1"
STOP_FLAGS = frozenset({"cancel", "interrupt"})
SUBMIT_RESPONSES = dict(GENERATION_RESPONSES)
PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}
FILE_ERRORS = {status: {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
               for status, what in ((404, "No such job of this kind, or no such file of it"),
                                    (409, "The job has not finished (or stopped before it made this file)"),
                                    (400, "The job failed: the request was at fault"))}


class FixedLimit(LimitError):
    """A limit of easel's own (no `easel serve` flag sets it): the message says to ask for less, nothing more."""

    def __init__(self, limit: str, value, maximum, what: str):
        super().__init__(limit, value, maximum, what)
        self.args = (f"{what} is {value}, over this server's limit of {maximum} ({limit}); ask for less",)


def stop_requested(job: Job) -> bool:
    """Whether a cancel or an interrupt was asked for."""
    return bool(job.pending & STOP_FLAGS)


def submit(app, kind: str, task, model: str | None, total: int, request: GenerationRequest,
           previews: bool = True) -> Job:
    """Queue `task` as a job of `kind` (ValueError / QueueFull as for generations). The job shows
    `request` (what its images are made from); `previews`: the event stream sends the task's previews."""
    queue = app.state.queue
    job = queue.submit_task(kind, task, model, total)
    # The worker never reads a task job's request: it is what listings show, and preview_every turns on the event
    # stream's preview events (the task sets the previews itself).
    job.request = dataclasses.replace(request, preview_every=1 if previews else 0)
    task.job_id = job.id
    job.version += 1
    log.info("task queued", extra={"event": "task_queued", "job": job.id, "kind": kind})
    return job


def accepted(job: Job, summary: dict) -> JSONResponse:
    """202 Accepted with the job's JSON and where to follow it (every queued task answers so)."""
    return JSONResponse(summary, status_code=202, headers={"Location": f"{PREFIX}/jobs/{job.id}"})


class StepReporter:
    """A pipeline step callback for a task: counts sampler steps as the job's progress (ETA included) and stops
    the run when a cancel or interrupt is asked for (the pipeline keeps the image as it stands, as A1111 does)."""

    def __init__(self, job: Job, count_steps: bool = True):
        self.job, self.count_steps = job, count_steps
        self.step_in_part = 0  # sampler steps of the current part (frame, cell, image)

    def __call__(self, d: dict) -> None:
        job, now = self.job, time.monotonic()
        self.step_in_part += 1
        if self.count_steps:
            if job._last_t is not None:
                job._step_times.append(now - job._last_t)
            job._last_t = now
            job.step += 1
            job.total = max(job.total, job.step)
        job.phase = SAMPLING
        job.version += 1
        if stop_requested(job):
            job._stopped = True
            raise Interrupted()

    def should_stop(self) -> bool:
        """For the pipeline's `should_stop` (between VAE tiles) and the task's own loop."""
        stop = stop_requested(self.job)
        self.job._stopped = self.job._stopped or stop
        return stop


def show_preview(job: Job, image) -> None:
    """Make `image` the job's latest preview (the event stream sends it)."""
    job._preview = (job.step, "image", image)
    job.version += 1


def task_of(queue, job_id: str, cls: type, what: str):
    """(job, task) of a job whose task is a `cls`; 404 naming `what` otherwise."""
    job = queue.get(job_id)
    if job is None or not isinstance(job.task, cls):
        raise HTTPException(404, f"no {what} job {job_id!r} (unknown, another kind of job, or forgotten)")
    return job, job.task


def finished(job: Job) -> None:
    """409 while the job runs; the job's own error (400 / 413 / 500) when it failed."""
    if job.state not in FINISHED:
        raise HTTPException(409, f"job {job.id} is {job.state}; its files are ready when it is done")
    if job.state == FAILED:
        status, message = failure(job)
        raise HTTPException(status, f"job {job.id} failed: {message}")


def pick(items: list, n: int, job: Job, what: str):
    """items[n], or 404 naming the range (a stopped job has fewer)."""
    if not 0 <= n < len(items):
        have = f"ask for 0..{len(items) - 1}" if items else "it stopped before the first"
        raise HTTPException(404, f"job {job.id} has {len(items)} {what}(s); {have}")
    return items[n]


def png(data: bytes) -> Response:
    """A PNG answer, kept by browsers (a finished job's files never change)."""
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
