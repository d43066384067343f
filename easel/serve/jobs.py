"""The job queue behind the server: bounded FIFO, one worker thread per device, each running one job at a time.

    queue = JobQueue(max_queued=16)
    job = queue.submit(GenerationRequest("a red star"), model=None)   # None: the server's current default model
    job.wait(); job.state == "done"; job.results[0].image, job.results[0].params

Jobs are cancelled, interrupted or skipped from any thread: the worker's step callback sees the flag and
raises `Interrupted` / `Skipped` (easel.pipelines.common), which the pipelines turn into A1111's semantics.
A failed job says whose fault it was: error_kind "user" (a bad input the pipeline found: answer 400) or
"server" (anything unexpected: 500, with the traceback in the log).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from easel.pipelines.common import Interrupted, Skipped
from easel.pipelines.request import GenerationRequest
from easel.serve.models import Loader, ModelCache, builtin_name, default_loader, registry_names

# (request, model config[, inspect]) -> None, raising when over a limit (inspect: the capture's memory counted too)
Admit = Callable[..., None]

log = logging.getLogger("easel.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
INTERRUPTED = "interrupted"  # stopped by an interrupt: the images finished before it are kept (A1111)
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)
# Job.phase while running: what the worker does now, so that a progress bar can say "loading the model" only
# when it really loads one.
LOADING, PREPARING, SAMPLING = "loading_model", "preparing", "sampling"
INSPECTING = "inspecting"  # after sampling, a job submitted with inspect=True draws its capture (easel.serve.inside)
GENERATE, LOAD = "generate", "load"  # Job.kind: a generation, or a model load asked for by a settings change
TRAIN = "train"  # Job.kind: a training run on the worker's model (Job.task does the work: easel.serve.train)
EXTRAS = "extras"  # Job.kind: an upscale (A1111's Extras) run as a task (easel.serve.a1111_extras)
TRAINING = "training"  # Job.phase of a training job once its steps run
USER_ERROR, SERVER_ERROR = "user", "server"  # Job.error_kind of a failed job
_EASEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../easel/


class QueueFull(RuntimeError):
    """The bounded queue has no room; `retry_after` is a guess in seconds at when it will."""

    def __init__(self, max_queued: int, retry_after: int):
        super().__init__(f"the queue is full ({max_queued} jobs waiting); retry in about {retry_after} s")
        self.max_queued, self.retry_after = max_queued, retry_after


@dataclass(eq=False)
class Job:
    """One request waiting, running or finished; results are GeneratedImage (image, params) items."""

    id: str
    request: GenerationRequest
    model: str | None
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total: int = 0
    error: str | None = None
    error_kind: str | None = None  # when failed: USER_ERROR (the request's fault) or SERVER_ERROR
    error_status: int | None = None  # when failed for a limit: the HTTP status that says so (413 for memory)
    phase: str = QUEUED  # while running: LOADING, PREPARING or SAMPLING; then the final state
    kind: str = GENERATE
    results: list = field(default_factory=list)
    runs: int = 0  # how many times a worker took it (always 0 or 1; tests hold us to that)
    inspect: bool = False  # capture what happens inside (steps, attention, tokens): see easel.serve.inside
    inside: object | None = None  # the drawn capture (an easel.serve.inside.Inside) once the job is finished
    inside_error: str | None = None  # why a job submitted with inspect has no capture (failed, or dropped)
    device: str | None = None
    task: object | None = None  # kinds TRAIN, EXTRAS: what runs instead of a generation (`task.run(job, pipe)`)
    version: int = 0  # bumped on every change so watchers (server-sent events) know when to send
    _flags: set = field(default_factory=set, repr=False)
    _step_times: list = field(default_factory=list, repr=False)
    _last_t: float | None = field(default=None, repr=False)
    _preview: tuple | None = field(default=None, repr=False)  # (step, "image" | "latent", value)
    _preview_png: tuple | None = field(default=None, repr=False)  # (step, PNG bytes) cache
    _decoder: Callable | None = field(default=None, repr=False)  # latent -> PIL image, set while running
    _batches: list = field(default_factory=list, repr=False)  # images of the batches finished so far (on_batch)
    _stopped: bool = field(default=False, repr=False)  # an interrupt or cancel actually stopped the work
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished (done, failed or cancelled); False on timeout."""
        return self._done.wait(timeout)

    @property
    def pending(self) -> frozenset[str]:
        """Stop requests made for this job: "cancel" and "interrupt" (kept once made) and "skip" (until the
        batch it drops is gone)."""
        return frozenset(self._flags)

    @property
    def images(self) -> list:
        """The finished PIL images."""
        return [r.image for r in self.results]

    def eta_s(self) -> float | None:
        """Seconds left, from the mean step time so far (None before the first step or when not running)."""
        if self.state != RUNNING or not self._step_times:
            return None
        mean = sum(self._step_times[-50:]) / len(self._step_times[-50:])
        return round(max(self.total - self.step, 0) * mean, 3)

    @property
    def preview_step(self) -> int | None:
        """The step of the latest preview (None when there is none)."""
        return self._preview[0] if self._preview else None

    def preview_png(self) -> bytes | None:
        """PNG bytes of the latest preview: the pipeline's own, else the denoised latent decoded on demand."""
        from easel.serve.preview import to_png
        pv = self._preview
        if pv is None:
            return None
        if self._preview_png and self._preview_png[0] == pv[0]:
            return self._preview_png[1]
        step, kind, value = pv
        if kind == "latent":
            if self._decoder is None:
                return None
            value = self._decoder(value)
        elif isinstance(value, (list, tuple)):  # the pipeline's previews: one PIL image per batch image
            value = value[0]
        elif not isinstance(value, Image.Image):  # a preview tensor (B, 3, H, W) in [-1, 1]
            from easel.pipelines.common import to_pil
            value = to_pil(value.reshape(-1, *value.shape[-3:])[:1].float().cpu())[0]
        png = to_png(value)
        self._preview_png = (step, png)
        return png

    def to_dict(self) -> dict:
        """JSON-able summary (without images)."""
        return {"id": self.id, "state": self.state, "phase": self.phase, "model": self.model, "created": self.created,
                "started": self.started, "finished": self.finished, "step": self.step, "total": self.total,
                "progress": round(self.step / self.total, 4) if self.total else (1.0 if self.state == DONE else 0.0),
                "eta_s": self.eta_s(), "error": self.error, "error_kind": self.error_kind, "n_images": len(self.results),
                "params": [r.params for r in self.results], "request": self.request.to_dict(images="marker"),
                "inspect": self.inspect, "inside_error": self.inside_error, "kind": self.kind,
                "train": self.task.to_dict() if self.task is not None else None}


def estimate_steps(req: GenerationRequest) -> int:
    """Sampler steps a request will take, as its sampling plans count them (progress totals and ETAs)."""
    from easel.pipelines.plan import count_steps
    return count_steps(req)


class JobQueue:
    """Bounded FIFO of generation jobs served by one worker thread per device."""

    def __init__(self, max_queued: int = 16, loader: Loader | None = None, default_model: str | None = None,
                 devices: Sequence[str] = ("cpu",), keep_finished: int = 200, metrics=None,
                 model_names: Callable[[], list[str]] | None = None, dtype: str = "fp32", keep_inside: int = 16):
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1 (got {max_queued})")
        self.max_queued, self.devices, self.keep_finished = max_queued, list(devices), keep_finished
        self.keep_inside = keep_inside  # finished jobs whose capture (inspect) is kept: the newest ones
        self._inside: collections.deque[Job] = collections.deque()
        self._known: dict[str, str] = {}  # models the server was started with: name -> path or spec
        self._loader = loader or default_loader(self._known, dtype)
        self._model_names = model_names or registry_names
        if default_model is None and model_names is None:  # the real model folders: the built-in is in them
            default_model = builtin_name()  # named, so that asking for it by name reuses the loaded model
        self.default_model = None if default_model is None else self.register_model(default_model)
        self.metrics = metrics
        self.admit: Admit | None = None  # the server's limits, checked again once the model (and its defaults) is known
        self._configs: dict[str | None, object] = {}  # model name -> ModelConfig, for every model loaded so far
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # every job still remembered, in submission order
        self._running: dict[str, Job | None] = {d: None for d in self.devices}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._job_seconds: collections.deque[float] = collections.deque(maxlen=20)
        self._seq = itertools.count(1)

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads (idempotent; submit() calls it too)."""
        with self._cond:
            if self._threads or self._stopping:
                return
            for device in self.devices:
                t = threading.Thread(target=self._work, args=(device,), name=f"easel-worker-{device}", daemon=True)
                self._threads.append(t)
                t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel queued jobs, interrupt running ones and wait for the workers to end."""
        with self._cond:
            self._stopping = True
            for job in list(self._queue):
                self._finish_queued(job, CANCELLED, "server shutting down")
            for job in self._running.values():
                if job is not None:
                    job._flags.add("cancel")
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # -- models -------------------------------------------------------------------------------------------
    def register_model(self, spec: str) -> str:
        """Make a model the server was started with (a path, registry name or hub id: trusted, it does not come
        from a request) selectable by name: a file's stem, a folder's name, else the spec itself. Returns the
        name; it hides a model-folder entry of the same name."""
        path = Path(spec).expanduser()
        name = (path.stem if path.is_file() else path.name) if path.exists() else str(spec)
        self._known[name] = str(path.resolve()) if path.exists() else str(spec)
        return name

    def known_models(self) -> dict[str, str]:
        """The models registered with register_model: name -> path (or spec)."""
        return dict(self._known)

    def check_model(self, model: str | None) -> str | None:
        """The model name if a request may use it (None: default); ValueError listing the names otherwise."""
        if model is None or model == self.default_model or model in self._known:
            return model
        names = self._model_names()
        if model not in names:
            choices = [*self._known, *(n for n in names if n not in self._known)]
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(choices) or '(none found)'} "
                             "(requests name models; they never give paths)")
        return model

    def set_default_model(self, model: str | None) -> None:
        """Make `model` (a name) what requests without a model run from now on, on every API."""
        self.default_model = self.check_model(model)

    def model_config(self, model: str | None) -> object | None:
        """The ModelConfig of `model` (None: the default) once a worker has loaded it; None before."""
        return self._configs.get(self.default_model if model is None else model)

    def model_spec(self, model: str) -> str:
        """What loads `model` (a checked name): the path the server was started with, else the name itself."""
        return self._known.get(model, model)

    def load(self, model: str | None) -> Job:
        """Queue a job that only loads `model` into the workers' cache (a settings change: load before switching);
        it fails, naming why, when the model cannot load."""
        model = self.check_model(model)
        return self._enqueue(Job(self._new_id(), GenerationRequest(), model, kind=LOAD, total=0))

    # -- submitting and looking up ------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, model: str | None = None, inspect: bool = False) -> Job:
        """Queue a request (checked first: ValueError names the field); QueueFull when the queue has no room.
        model None runs the default model of the moment the job is queued; `inspect`: also capture and draw what
        happens inside (Job.inside)."""
        req.check()
        model = self.check_model(model)
        if model is None:
            model = self.default_model
        draw_seeds(req)
        job = self._enqueue(Job(self._new_id(), req, model, total=estimate_steps(req), inspect=inspect))
        log.info("job queued", extra={"event": "job_queued", "job": job.id, "model": model, "mode": req.mode})
        return job

    def submit_task(self, kind: str, task, model: str | None, total: int) -> Job:
        """Queue a job that runs `task.run(job, pipe)` on the worker's model `model` (None: the default) instead of
        a generation: one at a time with the generations, listed, cancelled and followed like them."""
        model = self.check_model(model)
        if model is None:
            model = self.default_model
        job = self._enqueue(Job(self._new_id(), GenerationRequest(), model, total=total, kind=kind, task=task))
        log.info("job queued", extra={"event": "job_queued", "job": job.id, "model": model, "mode": kind})
        return job

    def _new_id(self) -> str:
        return f"{next(self._seq):06d}-{uuid.uuid4().hex[:10]}"

    def _enqueue(self, job: Job) -> Job:
        """Put a job at the end of the queue (QueueFull when there is no room)."""
        self.start()
        with self._cond:
            if self._stopping:
                raise QueueFull(self.max_queued, 60)
            if len(self._queue) >= self.max_queued:
                if self.metrics:
                    self.metrics.rejected()
                raise QueueFull(self.max_queued, self.retry_after())
            if job.kind != LOAD:  # a model load is nobody's job to list
                self._jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify()
        if self.metrics and job.kind == GENERATE:
            self.metrics.submitted()
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id (None if unknown or forgotten)."""
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every remembered job, oldest first."""
        with self._cond:
            return list(self._jobs.values())

    def running(self) -> Job | None:
        """The running job (the first device's, when there are several)."""
        return next((j for j in self._running.values() if j is not None), None)

    def position(self, job: Job) -> int | None:
        """0-based place in the queue (None when not queued)."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def counts(self) -> dict[str, int]:
        """Number of remembered jobs in each state."""
        out = dict.fromkeys((QUEUED, RUNNING, DONE, FAILED, CANCELLED), 0)
        for job in self.jobs():
            out[job.state] = out.get(job.state, 0) + 1  # interrupted too
        return out

    def queued(self) -> int:
        """Jobs waiting."""
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until the queue likely has room: one recent job's mean duration, at least 1."""
        mean = sum(self._job_seconds) / len(self._job_seconds) if self._job_seconds else 1.0
        return max(1, math.ceil(mean))

    # -- control ------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one leaves the queue, a running one stops at its next step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return job
            if job.state == QUEUED:
                self._finish_queued(job, CANCELLED, None)
                return job
            job._flags.add("cancel")
        log.info("job cancel requested", extra={"event": "job_cancel", "job": job_id})
        return job

    def interrupt(self) -> Job | None:
        """Stop the running job(s) at the next step, keeping finished images (A1111 interrupt)."""
        return self._flag_running("interrupt")

    def skip(self) -> Job | None:
        """Drop the running job's current batch and go on with its next one (A1111 skip)."""
        return self._flag_running("skip")

    def _flag_running(self, flag: str) -> Job | None:
        jobs = [j for j in self._running.values() if j is not None]
        for job in jobs:
            job._flags.add(flag)
        return jobs[0] if jobs else None

    def progress(self, job_id: str | None = None, preview: bool = True) -> dict:
        """{id, state, step, total, progress, eta_s, preview PNG bytes or None} of a job (default: the running
        one; state 'idle' when nothing runs)."""
        job = self.get(job_id) if job_id else self.running()
        if job is None:
            return {"id": job_id, "state": "idle" if job_id is None else "unknown", "step": 0, "total": 0,
                    "progress": 0.0, "eta_s": None, "preview": None, "queued": self.queued()}
        d = job.to_dict()
        png = None
        if preview:
            try:
                png = job.preview_png()
            except Exception:  # a preview must never break progress reporting
                log.exception("preview failed", extra={"event": "preview_error", "job": job.id})
        return {"id": job.id, "state": job.state, "phase": job.phase, "step": d["step"], "total": d["total"], "progress": d["progress"],
                "eta_s": d["eta_s"], "preview": png, "preview_step": job.preview_step, "queued": self.queued(),
                "position": self.position(job)}

    # -- the worker ---------------------------------------------------------------------------------------
    def _take(self, device: str) -> Job | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.state, job.started, job.device = RUNNING, time.time(), device
            job.runs += 1
            job.version += 1
            self._running[device] = job
            return job

    def _work(self, device: str) -> None:
        cache = ModelCache(self._loader, device)
        while True:
            job = self._take(device)
            if job is None:
                return
            try:
                self._run(job, cache)
            except BaseException:  # never let one job take the worker down
                log.exception("worker error", extra={"event": "worker_error", "job": job.id})

    def _run(self, job: Job, cache: ModelCache) -> None:
        if self.metrics and job.kind == GENERATE:
            self.metrics.started()
        log.info("job started", extra={"event": "job_started", "job": job.id, "device": cache.device})
        results, state, pipe = [], DONE, None
        try:
            job.phase = PREPARING if cache.holds(job.model) else LOADING
            job.version += 1
            pipe = cache.get(job.model)
            self._configs[job.model] = getattr(pipe, "config", None)
            if job.kind == GENERATE:
                job.phase = PREPARING
                job.version += 1
                results = self._generate(job, pipe)
            elif job.task is not None:  # any other kind (training, extras) is a task that does its own work
                job.phase = PREPARING
                job.version += 1
                job.task.run(job, pipe)
        except (Interrupted, Skipped):
            results = list(job._batches)  # a pipeline that does not catch them itself: keep the finished batches
            job._stopped = True
        except Exception as e:
            self._fail(job, e, pipe)
            state = FAILED
        if state == DONE and job._stopped:
            state = CANCELLED if "cancel" in job._flags else INTERRUPTED if "interrupt" in job._flags else DONE
        elif state == DONE and "cancel" in job._flags:
            state = CANCELLED
        self._finish_running(job, list(results or []), state, job.error)

    def _generate(self, job: Job, pipe) -> list:
        """Run the job's request on `pipe`, after the server's limits with the model's own defaults."""
        config = self._configs.get(job.model)
        if self.admit is not None and config is not None:
            if job.inspect:  # the capture's memory counts too
                self.admit(job.request, config, True)
            else:
                self.admit(job.request, config)
        job._decoder = _preview_decoder(pipe, job.request.preview_mode)
        job._last_t = time.monotonic()
        capture = None
        hooks = {}
        if job.inspect:
            from easel.serve.inside import JobCapture
            capture = hooks["extend_plan"] = JobCapture()
        try:
            # Pipeline.generate writes dtype/device into the request: give it a copy, keep the job's as sent.
            results = pipe.generate(dataclasses.replace(job.request), self._callback(job),
                                    on_batch=job._batches.extend, should_stop=self._should_stop(job), **hooks)
        finally:
            if capture is not None:
                capture.close()  # the hooks leave the model before any other job runs on it
        if capture is not None:
            self._draw_inside(job, capture, results)
        return results

    def _draw_inside(self, job: Job, capture, results: list) -> None:
        """Draw a job's capture (Job.inside), keeping the drawings of the newest `keep_inside` jobs only. A
        drawing that fails costs the job nothing but its capture (Job.inside_error says why)."""
        from easel.serve.inside import draw_inside
        if not results:
            job.inside_error = "the job made no image to look inside (stopped before its first batch finished)"
            return
        job.phase = INSPECTING
        job.version += 1
        try:
            job.inside = draw_inside(capture, results, job.request)
        except Exception as e:
            job.inside_error = f"the capture could not be drawn: {describe_error(e, SERVER_ERROR)}"
            log.exception("capture failed", extra={"event": "inside_error", "job": job.id})
            return
        with self._cond:
            self._inside.append(job)
            while len(self._inside) > self.keep_inside:
                old = self._inside.popleft()
                old.inside = None
                old.inside_error = (f"the capture was dropped: the server keeps those of the last {self.keep_inside} "
                                    "inspected jobs; submit the request again with inspect: true")

    @staticmethod
    def _should_stop(job: Job):
        """The pipeline's should_stop for a job: polled between VAE tiles."""
        def should_stop() -> bool:
            # Only a cancel cuts a VAE decode short: an interrupt stops sampling, and the batch it stopped is
            # still decoded from its last x0 prediction (A1111 returns the images as they stand).
            stop = "cancel" in job._flags
            job._stopped = job._stopped or stop
            return stop
        return should_stop

    def _fail(self, job: Job, e: Exception, pipe) -> None:
        """Record why a job failed: a limit (with its status), a bad input (400) or the server's fault (500)."""
        status = getattr(e, "http_status", None)
        # Only the pipeline judges the request: a model that will not load is the server's problem.
        user = status is not None or (pipe is not None and is_user_error(e))
        job.error_kind, job.error_status = (USER_ERROR if user else SERVER_ERROR), status
        job.error = describe_error(e, job.error_kind)
        extra = {"event": "job_failed", "job": job.id, "error": job.error, "error_kind": job.error_kind}
        if job.error_kind == USER_ERROR:
            log.info("job failed: bad request", extra=extra)
        else:
            log.exception("job failed", extra=extra)

    def _callback(self, job: Job):
        def on_step(d: dict) -> None:
            now = time.monotonic()
            dt, job._last_t = now - job._last_t, now
            job._step_times.append(dt)
            job.step += 1
            job.total = max(job.total, job.step)
            job.phase = SAMPLING
            every = job.request.preview_every
            if d.get("preview") is not None:
                job._preview = (job.step, "image", d["preview"])
            elif d.get("denoised") is not None and (every <= 0 or job.step % every == 0):
                # preview_every N: the preview changes every N steps, as the client asked (0: every step, decoded
                # only when someone asks for it)
                job._preview = (job.step, "latent", d["denoised"][:1].detach())
            job.version += 1
            if self.metrics:
                self.metrics.step(dt)
            if job._flags & {"cancel", "interrupt"}:
                job._stopped = True
                raise Interrupted()
            if "skip" in job._flags:
                job._flags.discard("skip")
                raise Skipped()
        return on_step

    def _finish_running(self, job: Job, results: list, state: str, error: str | None) -> None:
        with self._cond:
            job.results, job.state, job.error, job.finished = results, state, error, time.time()
            job.phase, job._batches = state, []
            if state == DONE:
                job.step = job.total = max(job.step, job.total)
            # Dropping the decoder lets go of the model it holds. A pipeline-made preview (small images) stays, so
            # a client that connects after a fast job still gets its last preview; a latent one needs the decoder.
            if job._preview is not None and job._preview[1] == "latent":
                job._preview, job._preview_png = None, None
            job._decoder = None
            self._running[job.device] = None
            self._job_seconds.append(job.finished - job.started)
            self._forget_old()
            job.version += 1
        job._done.set()
        if self.metrics and job.kind == GENERATE:
            self.metrics.finished(state, len(results))
        log.info("job finished", extra={"event": "job_" + state, "job": job.id, "images": len(results),
                                        "seconds": round(job.finished - job.started, 3), "steps": job.step})

    def _finish_queued(self, job: Job, state: str, error: str | None) -> None:
        """Finish a job that never ran (caller holds the lock)."""
        self._queue.remove(job)
        job.state, job.phase, job.error, job.finished = state, state, error, time.time()
        job.version += 1
        job._done.set()
        if self.metrics and job.kind == GENERATE:
            self.metrics.finished(state, 0, ran=False)
        log.info("job cancelled while queued", extra={"event": "job_" + state, "job": job.id})

    def _forget_old(self) -> None:
        """Keep at most `keep_finished` finished jobs (their images live in memory)."""
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]


def draw_seeds(req: GenerationRequest) -> None:
    """Draw the random seed and variation seed a request leaves to chance (-1) now, so that the job, its progress
    and A1111's all_seeds / all_subseeds report the ones that run."""
    if req.seed is None or req.seed < 0:
        req.seed = random.randrange(2**32)
    if req.subseed is None or req.subseed < 0:
        req.subseed = random.randrange(2**32)


def _preview_decoder(pipe, mode: str):
    """latent (1, C, h, w) -> PIL image, with the pipeline's model when it has one."""
    from easel.serve.preview import latent_preview
    loaded = getattr(pipe, "loaded", None)  # a LoadedModel for real pipelines; test doubles may have none
    return lambda latent: latent_preview(latent, loaded, mode)


def is_user_error(e: BaseException) -> bool:
    """True for a bad input the pipeline found: a ValueError (LoraError, EmbeddingError ...) raised in easel's
    own code. A ValueError from elsewhere (torch, a plug-in, a test double) is unexpected: a server error."""
    if not isinstance(e, ValueError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the innermost frame: where it was raised
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_EASEL_DIR)


def describe_error(e: BaseException, kind: str = USER_ERROR, max_chars: int = 300) -> str:
    """A message for the client. A user error is told whole (easel's errors name the problem and the fix);
    a server error by its first line only, with the type unless it is one of ours (the traceback is logged)."""
    from easel.serve.trust import hide_paths
    text = hide_paths(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    if kind == USER_ERROR:
        return text
    first = text.strip().split("\n")[0][:max_chars]
    if first and isinstance(e, (ValueError, FileNotFoundError, KeyError)):
        return first  # e.g. a model file that is gone: the message already says so
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
