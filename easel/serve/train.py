"""Training jobs on the server: `POST /api/v1/train` runs `easel train lora|embedding` on a dataset folder under
the server's `--train-root`, queued with the generations (one job at a time on the worker's model).

    curl -s localhost:7860/api/v1/train -d '{"kind": "lora", "dataset": "hearts", "name": "heart", "steps": 300}'
    curl -s localhost:7860/api/v1/jobs/ID              # step / total, eta_s, train.loss, train.samples, train.result
    curl -s localhost:7860/api/v1/train/ID/log         # the loss curve: one record per step
    curl -X DELETE localhost:7860/api/v1/jobs/ID       # stops at the next step; the checkpoint stays

Datasets are named, never given as paths: a request names a folder relative to the train root, and anything that
resolves outside it (`..`, an absolute path, a symbolic link out) is refused with the same message whether or not it
exists. The trainers are easel.training's own; the job sees each step through the dataset (`_Watched`), which is
where a cancel stops the run: the Trainer then writes its checkpoint, and the output file is never written (the
trainers write it atomically, and only after the last step). The finished file goes into the first LoRA (or
embedding) folder, so the next generation can name it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path, PurePosixPath
from typing import Literal

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from easel.pipelines.common import Interrupted
from easel.serve.jobs import FINISHED, TRAIN, TRAINING, Job
from easel.serve.schema import ERROR_SCHEMA, NOT_FOUND, LimitError, MemoryLimit
from easel.training.dataset_folder import IMAGE_SUFFIXES, DataOptions, UserDataset
from easel.training.settings import TrainingError

log = logging.getLogger("easel.serve")
PREFIX = "/api/v1/train"
MAX_LISTED = 200  # datasets listed at most
MAX_COUNTED = 5000  # images counted per dataset at most (the list stays quick on a big root)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DISABLED = ("training is off on this server: start it with --train-root DIR (a folder whose sub-folders are "
            "datasets of images with .txt captions) to allow training jobs")


def _errors(*pairs: tuple[int, str]) -> dict:
    return {s: {"description": d, "content": {"application/json": {"schema": ERROR_SCHEMA}}} for s, d in pairs}


OFF = _errors((403, "Training is off: the server was started without --train-root"))
SUBMIT_RESPONSES = OFF | _errors(
    (400, "A bad setting, a dataset outside the train root or unusable, or over a limit; the message names it"),
    (409, "A file or a queued training job of that name exists (send overwrite: true, or another name)"),
    (413, "The estimated training memory is over --max-memory"),
    (503, "The queue is full; retry after Retry-After seconds"))


class TrainBody(BaseModel):
    """The settings of `easel train lora` / `easel train embedding` (unset: the command's defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": {
        "kind": "lora", "dataset": "hearts", "name": "heart", "steps": 300, "rank": 8, "lr": 1e-3,
        "sample_prompts": ["a red heart"], "sample_every": 50}})

    kind: Literal["lora", "embedding"] = Field("lora", description="LoRA, or textual inversion (an embedding)")
    dataset: str = Field(..., min_length=1, max_length=255, description="a folder under the server's train root, "
                         "relative to it (GET /api/v1/train/datasets lists them); never a path outside it")
    name: str = Field(..., pattern=NAME_PATTERN, description="what to call the result: the file's name, "
                      "<lora:NAME:1> or the embedding's word in prompts (letters, digits, _ and -)")
    model: str | None = Field(None, description="the model to train on, a name from GET /api/v1/models "
                              "(default: the server's model)")
    overwrite: bool = Field(False, description="replace an existing LoRA or embedding of that name")
    steps: int | None = Field(None, ge=1, description="optimizer steps (default: 500 for a LoRA, 1000 for an "
                              "embedding; at most the server's --max-train-steps)")
    batch_size: int | None = Field(None, ge=1, description="images per micro-batch (default 4; at most --max-batch)")
    grad_accum: int = Field(1, ge=1, le=64, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, le=1, description="learning rate (default 1e-4 LoRA, 5e-3 embedding)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup: int = Field(0, ge=0, description="warm-up steps")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of data order, noise and initial weights")
    min_snr_gamma: float | None = Field(None, gt=0, le=100, description="min-SNR loss weighting (5 is the paper's)")
    noise_offset: float = Field(0.0, ge=0, le=1, description="noise offset (0.05-0.1 typical)")
    rank: int = Field(8, ge=1, le=256, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, le=4096, description="LoRA alpha (default: the rank)")
    conv: bool = Field(False, description="LoRA on the convolutions too (LoCon)")
    text_encoder: bool = Field(False, description="LoRA on the text encoder(s) too")
    init_word: str | None = Field(None, min_length=1, max_length=100, description="embedding: a word the model "
                                  "knows to start the vectors from (required for kind embedding)")
    vectors: int = Field(1, ge=1, le=75, description="embedding: token vectors per text encoder")
    resolution: int | None = Field(None, ge=64, description="training side in pixels (default: the model's)")
    random_crop: bool = False
    flip: bool = Field(False, description="random horizontal flips (off: captions may say left and right)")
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    shuffle_tags: bool = False
    keep_tags: int = Field(0, ge=0, le=100)
    on_bad: Literal["skip", "error"] = Field("skip", description="unreadable images, missing captions, "
                                             "too-small images: skip them, or refuse the dataset")
    sample_prompts: list[str] = Field(default_factory=list, max_length=4, description="prompts drawn with fixed "
                                      "seeds every sample_every steps (default: the dataset's first caption)")
    sample_every: int = Field(0, ge=0, description="sample images every N steps (0: never)")


# --- datasets -------------------------------------------------------------------------------------------------

def train_root(settings) -> Path:
    """The train root, resolved; HTTP 403 naming the flag when training is off."""
    if not settings.train_root:
        raise HTTPException(403, DISABLED)
    return Path(settings.train_root).expanduser().resolve()


def dataset_path(root: Path, name: str) -> Path:
    """The folder `name` under `root`; ValueError (the same for every refused name, existing or not) otherwise."""
    refused = ValueError(f"dataset {name[:100]!r} is not a folder under this server's train root: give a folder "
                         "name relative to it, as GET /api/v1/train/datasets lists them (paths outside it, "
                         "'..' and hidden folders are refused)")
    parts = PurePosixPath(name).parts
    if (not parts or "\x00" in name or "\\" in name or name.startswith(("/", "~"))
            or any(p in (".", "..") or p.startswith(".") for p in parts)):
        raise refused
    path = (root / name).resolve()  # follows links: one that points outside the root is caught below
    if path == root or not path.is_relative_to(root) or not path.is_dir():
        raise refused
    return path


def list_datasets(root: Path) -> list[dict]:
    """[{name, images}] of the root's sub-folders (hidden ones and links out of the root left out)."""
    out = []
    for d in sorted(root.iterdir()):
        if len(out) >= MAX_LISTED:
            break
        if d.name.startswith(".") or not d.is_dir() or not d.resolve().is_relative_to(root):
            continue
        count = 0
        for p in d.rglob("*"):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                count += 1
                if count >= MAX_COUNTED:
                    break
        out.append({"name": d.name, "images": count})
    return out


def api_message(text: str, root: Path | None = None) -> str:
    """A trainer's message in this API's words: flags spelt as fields (`--min-size` -> `min_size`), files named
    relative to the train root."""
    text = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)
    return text.replace(f"{root}/", "") if root is not None else text


# --- the task a training job runs -------------------------------------------------------------------------------

class Cancelled(KeyboardInterrupt):
    """Raised at a step when the job was cancelled: the Trainer checkpoints on KeyboardInterrupt, then re-raises."""


@dataclasses.dataclass(eq=False)
class TrainTask:
    """One training job's settings, files and progress (Job.task of a kind "train" job)."""

    body: TrainBody
    dataset: Path
    out: Path  # the LoRA / embedding file written at the end
    run_dir: Path  # checkpoint.pt, log.jsonl, loss.png, samples/
    images: int  # usable images found when the job was submitted
    root: Path | None = None  # the train root (messages name files relative to it)
    settings: object = None  # the server's Settings (limits and memory, checked again once the model is loaded)
    started_training: bool = False  # the Trainer reached its first step (the log is this run's from then on)
    last: dict = dataclasses.field(default_factory=dict)  # the newest log record
    result: dict | None = None
    resumed_from: int | None = None  # the step a checkpoint of the same run and settings continued from
    warnings: list = dataclasses.field(default_factory=list)  # the files the data scan skipped, and why
    since: float = dataclasses.field(default_factory=time.time)
    url_id: str = ""  # the job's id, set once queued

    def to_dict(self) -> dict:
        """What the job's JSON says about its training (no server paths but the names)."""
        b = self.body
        return {"kind": b.kind, "name": b.name, "dataset": b.dataset, "images": self.images, "file": self.out.name,
                "use": f"<lora:{b.name}:1>" if b.kind == "lora" else b.name,
                "settings": b.model_dump(), "loss": self.last.get("loss"), "lr": self.last.get("lr"),
                "samples": self.samples(), "result": self.result, "resumed_from": self.resumed_from,
                "warnings": self.warnings[-20:]}

    def samples(self) -> list[dict]:
        """This run's sample sheets, oldest first: [{step, url}]."""
        folder = self.run_dir / "samples"
        if not folder.is_dir():
            return []
        out = []
        for p in sorted(folder.glob("step_*.png")):
            m = re.fullmatch(r"step_(\d+)\.png", p.name)
            if m and p.stat().st_mtime >= self.since - 1:  # a previous run's sheets are not this job's
                out.append({"step": int(m.group(1)), "url": f"{PREFIX}/{self.url_id}/samples/{int(m.group(1))}.png"})
        return out

    def records(self, after: int = 0) -> list[dict]:
        """Log records with step > after (none before the Trainer has started: the file may be an old run's)."""
        path = self.run_dir / "log.jsonl"
        if not self.started_training or not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line being written
            if isinstance(r, dict) and r.get("step", 0) > after:
                out.append({k: r[k] for k in ("step", "loss", "lr", "grad_norm") if k in r})
        return out

    def _tail(self) -> dict:
        """The log's last complete record."""
        path = self.run_dir / "log.jsonl"
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return {}
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return {}

    # the work, on the worker thread
    def run(self, job: Job, pipe) -> None:
        """Train on the worker's model; Interrupted when cancelled (checkpoint kept, no output file)."""
        base = pipe.loaded
        model = base.model
        model.eval().requires_grad_(False)  # generation never needs gradients; the trainers want them off
        embeddings = base.embeddings
        try:
            result = self._train(job, base)
        except Cancelled:
            job._stopped = True
            raise Interrupted() from None
        except TrainingError as e:  # and DatasetError: the message in this API's words (a 400)
            raise ValueError(api_message(str(e), self.root)) from None
        finally:
            base.embeddings = embeddings  # the embedding trainer's samples put the trained one in for a moment
        self.result = {k: v for k, v in result.items() if k not in ("lora", "embedding", "run_dir")}
        self.result["file"] = self.out.name
        job.version += 1

    def _train(self, job: Job, base) -> dict:
        from easel.training.lora_train import LoraRun, train_lora
        from easel.training.user_cli import EMBEDDING_LOOP, LORA_LOOP
        from easel.training.user_train import NoiseOptions
        b = self.body
        check_memory_for(b, base.model.config, self.settings)
        ds = self._dataset(job, base)
        loop = dataclasses.replace(LORA_LOOP if b.kind == "lora" else EMBEDDING_LOOP, progress=False,
                                   seed=b.seed, warmup=b.warmup)
        loop = dataclasses.replace(loop, **{k: getattr(b, k) for k in ("steps", "batch_size", "lr")
                                            if getattr(b, k) is not None})
        job.total = loop.steps
        noise = NoiseOptions(b.min_snr_gamma, b.noise_offset)
        prompts = b.sample_prompts or ([self._default_prompt(ds)] if b.sample_every else [])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if b.kind == "lora":
            run = LoraRun(ds, base, self.out, self.run_dir, loop, b.rank, b.alpha, b.conv, b.text_encoder,
                          b.lr_scheduler, b.grad_accum, noise, prompts, b.sample_every)
            return train_lora(run)
        from easel.training.embedding_train import EmbeddingRun, train_embedding
        run = EmbeddingRun(ds, base, self.out, self.run_dir, loop, b.name, b.init_word, b.vectors, b.lr_scheduler,
                           b.grad_accum, noise, prompts, b.sample_every)
        return train_embedding(run)

    def _default_prompt(self, ds) -> str:
        """The sample prompt when none is given: the first caption (with the embedding's word in it)."""
        caption = ds.items[0].caption
        if self.body.kind == "embedding":
            from easel.training.embedding_train import name_caption
            return name_caption(caption, self.body.name)
        return caption or self.body.name

    def _dataset(self, job: Job, base):
        """The dataset at the model's resolution, reporting each step to the job."""
        cfg = base.model.config
        resolution = self.body.resolution or cfg.default_size
        if resolution % (cfg.vae.downsample * 2):
            raise ValueError(f"resolution {resolution} must be a multiple of {cfg.vae.downsample * 2}")
        self.warnings = []  # scanned again: the folder may have changed since the job was queued
        ds = _Watched(self.dataset, data_options(self.body, resolution), log=self._warn)
        ds.on_batch = self._stepper(job)
        return ds

    def _warn(self, line: str) -> None:
        self.warnings.append(api_message(line, self.root))
        log.info("training data", extra={"event": "train_data", "message": line})

    def _stepper(self, job: Job):
        """The per-micro-batch hook: progress (step, ETA, loss) at each optimizer step, and the cancel check."""
        accum = self.body.grad_accum

        def on_batch(data_step: int) -> None:
            if data_step % accum:
                return
            step, now = data_step // accum, time.monotonic()
            if job._flags & {"cancel", "interrupt"}:
                raise Cancelled()
            if self.started_training and job._last_t is not None and step > job.step:
                job._step_times.append((now - job._last_t) / (step - job.step))
            if not self.started_training:
                self.resumed_from = step or None  # a checkpoint of the same run continued
            self.started_training = True
            job._last_t, job.step, job.phase = now, step, TRAINING
            self.last = self._tail() if step else {}
            job.version += 1
        return on_batch



def data_options(body: TrainBody, resolution: int):
    """DataOptions of a request at a resolution."""
    return DataOptions(resolution=resolution, random_crop=body.random_crop, flip=body.flip,
                       caption_dropout=body.caption_dropout, shuffle_tags=body.shuffle_tags,
                       keep_tags=body.keep_tags, on_bad=body.on_bad)


class _Watched(UserDataset):
    """A UserDataset that calls `on_batch(data_step)` before each batch: the trainers' one per-step hook."""

    on_batch = None

    def batch_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        if self.on_batch is not None:
            self.on_batch(step)
        return super().batch_indices(step, batch_size, seed)


# --- limits ---------------------------------------------------------------------------------------------------

def train_peak_bytes(config, batch: int, resolution: int, dtype: str = "fp32") -> int:
    """A coarse upper bound of a training step's memory: the weights, and every UNet block's activations kept
    for the backward pass (bounded by one forward's peak working set times the number of blocks)."""
    from easel.pipelines import memory
    item = memory.ITEMSIZE.get(dtype, 4)
    lh = lw = max(1, resolution // config.vae.downsample)
    u = config.unet
    blocks = len(u.channel_mult) * (2 * u.num_res_blocks + 1) + 1
    acts = memory.unet_elements(u, batch, lh, lw) * blocks * item
    encode = memory.vae_elements(config, 1, lh, lw, item, encode=True, tiled=None) * item
    return memory.RUNTIME_BYTES + memory.weight_bytes(config, item) + int((acts + encode) * memory.SAFETY)


def check_memory_for(body: TrainBody, config, settings) -> None:
    """MemoryLimit (413) when the training's estimated memory is over the server's max_memory."""
    if settings is None or not settings.max_memory_bytes or config is None:
        return
    resolution = body.resolution or config.default_size
    need = train_peak_bytes(config, body.batch_size or 4, resolution, settings.dtype)
    if need > settings.max_memory_bytes:
        raise MemoryLimit(f"training at batch_size {body.batch_size or 4} and resolution {resolution} needs about "
                          f"{need / 2**30:.1f} GiB, over this server's max_memory of "
                          f"{settings.max_memory_bytes / 2**30:.1f} GiB: lower batch_size (and raise grad_accum) "
                          "or the resolution, or start the server with a higher --max-memory",
                          need, settings.max_memory_bytes)


def check_limits(body: TrainBody, settings) -> None:
    """LimitError naming the limit for steps, batch or resolution over the server's."""
    if body.steps is not None and body.steps > settings.max_train_steps:
        raise LimitError("--max-train-steps", body.steps, settings.max_train_steps, "steps")
    if body.batch_size is not None and body.batch_size > settings.max_batch:
        raise LimitError("--max-batch", body.batch_size, settings.max_batch, "batch_size")
    if body.resolution is not None and body.resolution ** 2 > settings.max_pixels:
        raise LimitError("--max-pixels", body.resolution ** 2, settings.max_pixels, "resolution squared")
    if body.sample_every and body.sample_every > (body.steps or 10**9):
        raise ValueError(f"sample_every {body.sample_every} is more than steps {body.steps}: no sample would be "
                         "drawn before the end (lower it, or 0 for none)")
    for p in body.sample_prompts:
        if not p.strip() or len(p) > 1000:
            raise ValueError("each of sample_prompts must be non-empty text of at most 1000 characters")
    if body.kind == "embedding" and not (body.init_word or "").strip():
        raise ValueError("kind embedding needs init_word: a word the model knows to start the vectors from "
                         "(e.g. the subject's class, 'dog')")


def check_sample_prompts(prompts: list[str]) -> None:
    """The LoRAs a sample prompt names must be the server's, as in any generation request (names, never paths)."""
    from easel.pipelines.request import GenerationRequest
    from easel.serve.trust import check_names
    for i, prompt in enumerate(prompts):
        try:
            check_names(GenerationRequest(prompt=prompt), None)
        except ValueError as e:
            raise ValueError(f"sample_prompts[{i}]: {e}") from None


def output_path(body: TrainBody) -> Path:
    """Where the result goes: the first LoRA folder (EASEL_LORA_DIRS, else ./models/Lora) or embedding folder."""
    if body.kind == "lora":
        from easel.weights.lora import lora_dirs
        folder = lora_dirs()[0]
    else:
        from easel.weights.embeddings import embedding_dirs
        folder = embedding_dirs()[0]
    return folder / f"{body.name}.safetensors"


def runs_folder(settings) -> Path:
    """Where run folders go: <--output-dir, default ./outputs>/train."""
    return Path(settings.output_dir or "outputs").expanduser() / "train"


def prepare(app: FastAPI, body: TrainBody) -> TrainTask:
    """The checked task of a request: root, dataset, limits, name conflicts and the data itself (4xx otherwise)."""
    settings, queue = app.state.settings, app.state.queue
    root = train_root(settings)
    path = dataset_path(root, body.dataset)
    check_limits(body, settings)
    check_sample_prompts(body.sample_prompts)
    model = queue.check_model(body.model)
    config = queue.model_config(model)
    check_memory_for(body, config, settings)
    out = output_path(body)
    if out.exists() and not body.overwrite:
        raise HTTPException(409, f"a {body.kind} called {body.name!r} exists ({out.name}): choose another name, "
                                 "or send overwrite: true to replace it")
    for job in queue.jobs():
        task = job.task
        if isinstance(task, TrainTask) and job.state not in FINISHED and task.out == out:
            raise HTTPException(409, f"job {job.id} is already training {body.kind} {body.name!r}: cancel it, or "
                                     "choose another name")
    resolution = body.resolution or (config.default_size if config is not None else 64)
    warnings = []
    try:  # scanned now for a quick answer; scanned again once the model (and its resolution) is loaded
        ds = UserDataset(path, data_options(body, resolution), log=warnings.append)
    except TrainingError as e:
        why = "".join(f"; {w}" for w in warnings[:3]) + (" ..." if len(warnings) > 3 else "")
        raise ValueError(api_message(str(e) + why, root)) from None
    run_dir = runs_folder(settings) / f"{body.kind}-{body.name}"
    return TrainTask(body, path, out, run_dir, len(ds.items), settings=settings, root=root,
                     warnings=[api_message(w, root) for w in warnings])


# --- routes ---------------------------------------------------------------------------------------------------

def router(app: FastAPI) -> APIRouter:
    """POST /api/v1/train, the datasets, and a training job's log and sample images."""
    r = APIRouter(prefix=PREFIX, tags=["training"])
    queue = app.state.queue

    def task_of(job_id: str) -> TrainTask:
        job = queue.get(job_id)
        if job is None or not isinstance(job.task, TrainTask):
            raise HTTPException(404, f"no training job {job_id!r} (unknown, not a training job, or forgotten)")
        return job.task

    @r.post("", status_code=202, summary="Queue a training job (LoRA or embedding) on a dataset folder under the "
            "train root; follow it with GET /api/v1/jobs/{id}, cancel it with DELETE", responses=SUBMIT_RESPONSES)
    def submit(body: TrainBody) -> JSONResponse:
        from easel.serve.api import job_summary
        task = prepare(app, body)
        task.since = time.time()
        job = queue.submit_task(TRAIN, task, body.model, body.steps or 0)
        task.url_id = job.id
        log.info("training queued", extra={"event": "train_queued", "job": job.id, "kind": body.kind,
                                            "dataset": body.dataset, "name": body.name})
        return JSONResponse(job_summary(job, queue), status_code=202,
                            headers={"Location": f"/api/v1/jobs/{job.id}"})

    @r.get("/datasets", summary="The dataset folders under the train root, with their image counts",
           responses=OFF)
    def datasets() -> dict:
        root = train_root(app.state.settings)
        return {"datasets": list_datasets(root), "max_train_steps": app.state.settings.max_train_steps}

    @r.get("/{job_id}/log", summary="A training job's loss curve: one record (step, loss, lr, grad_norm) per step",
           responses=NOT_FOUND)
    def train_log(job_id: str, after: int = Query(0, ge=0, description="only steps after this one")) -> dict:
        task = task_of(job_id)
        job = queue.get(job_id)
        return {"id": job_id, "state": job.state, "step": job.step, "total": job.total,
                "records": task.records(after)}

    @r.get("/{job_id}/samples/{step}.png", summary="The sample images drawn at a step (named in the job's "
           "train.samples)", response_class=Response, responses={200: {"content": {"image/png": {
               "schema": {"type": "string", "format": "binary"}}}}} | NOT_FOUND)
    def sample(job_id: str, step: int) -> Response:
        task = task_of(job_id)
        if step < 0 or not any(s["step"] == step for s in task.samples()):
            raise HTTPException(404, f"job {job_id} has no sample at step {step}: its train.samples lists them")
        path = task.run_dir / "samples" / f"step_{step:06d}.png"
        return Response(path.read_bytes(), media_type="image/png")

    return r

