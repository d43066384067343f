"""Submitting to the queue from any API: names and limits checked first, the job's outcome as an HTTP status.

`enqueue(app, req, model)` checks what a request names (easel.serve.trust), the server's limits with the model's
defaults when it is loaded (easel.serve.schema), and its estimated peak memory (easel.pipelines.memory) before
queueing; `await wait_for(job)` waits without holding a thread; `failure(job)` gives the status and message of a
failed job (400: the request's fault, 413: over a memory limit, 500: the server's).
"""
from __future__ import annotations

import asyncio
import dataclasses

from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import USER_ERROR, Job
from easel.serve.schema import MemoryLimit, base_size, check_limits
from easel.serve.trust import check_names


def enqueue(app, req: GenerationRequest, model: str | None = None, inspect: bool = False) -> Job:
    """Check names, limits and memory, then queue (ValueError / LimitError -> 4xx, QueueFull -> 503); `inspect`:
    the job also captures what happens inside (easel.serve.inside)."""
    queue, settings = app.state.queue, app.state.settings
    model = queue.check_model(model)
    check_names(req, queue)
    admit(req, settings, queue.model_config(model), inspect)
    return queue.submit(req, model, inspect=inspect)


def admit(req: GenerationRequest, settings, config=None, inspect: bool = False) -> None:
    """The server's limits on a request, and its memory estimate (with the capture's, for `inspect`) once the
    model's config is known."""
    check_limits(req, settings, config)
    if config is not None:
        check_memory(req, settings, config, inspect)


def check_memory(req: GenerationRequest, settings, config, inspect: bool = False) -> None:
    """MemoryLimit (413) when the request's estimated peak memory on this model (plus what its capture holds, for
    `inspect`) is over settings.max_memory_bytes."""
    if not settings.max_memory_bytes:
        return
    from easel.pipelines.memory import MemoryLimitError, check_fits, estimate_peak_bytes
    w, h = base_size(req, config.default_size)
    resolved = dataclasses.replace(req, width=w, height=h, dtype=settings.dtype).resolved(
        config.default_size, config.default_batch)
    # A refiner is counted as a second model of the base's size: an SDXL refiner (one text encoder, a smaller
    # UNet) is smaller than its base, so this bounds it without loading it first.
    refiner = config if req.refiner_checkpoint else None
    extra = 0
    if inspect:
        from easel.serve.inside import capture_bytes
        extra = capture_bytes(config, resolved)
    try:
        check_fits(config, resolved, settings.max_memory_bytes - extra, refiner)
    except MemoryLimitError as e:
        counted = f", less {extra} bytes for the capture of \"inspect\": true" if extra else ""
        raise MemoryLimit(f"{e} (this server's max_memory is {settings.max_memory_bytes} bytes{counted}; "
                          "start it with a higher --max-memory to allow more)",
                          estimate_peak_bytes(config, resolved, refiner) + extra, settings.max_memory_bytes) from None


def failure(job: Job) -> tuple[int, str]:
    """(HTTP status, message) for a failed job: 400 (or a limit's own status) with the message when the request
    was at fault, else 500 with a short message (the traceback is in the server's log)."""
    if job.error_kind == USER_ERROR:
        return job.error_status or 400, job.error or "bad request"
    return 500, f"generation failed: {job.error} (the server's log has the details)"


async def wait_for(job: Job, timeout: float | None = None, poll_s: float = 0.05) -> bool:
    """Wait for a job to finish without holding a thread; False on timeout."""
    waited = 0.0
    while not job.wait(0):
        if timeout is not None and waited >= timeout:
            return False
        await asyncio.sleep(poll_s)
        waited += poll_s
    return True
