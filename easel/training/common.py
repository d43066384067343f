"""What every training loop shares: distributed set-up, the step loop with exact resume, EMA, logging.

A loop is a function `loss_fn(step) -> (loss, metrics)` that builds *its own* batch from the step
number alone (data indices and noise come from generators seeded by (seed, step)). That one rule
gives exact resume (a restarted run sees the same batches) and data parallelism that equals a
single process: every rank draws the same global batch and computes its own slice of it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from easel.files import atomic_path, save_image, write_text
from easel.training.settings import LoopConfig, TrainingError  # noqa: F401 (re-exported: loops import them here)


# --- distributed -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel job (world 1 = plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on the process that logs, evaluates and writes files."""
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """This rank's slice of a global batch (the batch must split evenly)."""
        if global_batch % self.world:
            raise TrainingError(f"batch size {global_batch} does not split over {self.world} processes: "
                                f"use a multiple of {self.world}")
        n = global_batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU), if any."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistInfo(rank, world, local, torch.device(f"cuda:{local}" if want_cuda else "cpu"))


def teardown_distributed() -> None:
    """Leave the process group (no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class StepLoss(nn.Module):
    """The trained module and a loop's loss function as one module: DistributedDataParallel wraps this, so every
    loop's step (whatever modules its loss calls) is one DDP forward, and backward averages the gradients."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *step):
        """(loss, metrics) of a step (or of micro-batch k of a step)."""
        return self.loss_fn(*step)


def data_parallel(module: nn.Module, info: DistInfo) -> nn.Module:
    """`module` in PyTorch's DistributedDataParallel when there are several processes, else as it is: one code path
    for 1 and N processes (gloo on CPU, NCCL on GPU)."""
    if info.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [info.device.index] if info.device.type == "cuda" else None
    # Unused parameters exist in some steps (a caption dropped, a LoRA past the clip-skip layer): let DDP find them.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if info.world > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's integer on every rank (e.g. a step budget measured on rank 0)."""
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.world > 1:
        dist.barrier()


# --- randomness ---------------------------------------------------------------------------------

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): the batch of a step is reproducible."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream)


def rng_state() -> dict:
    """Global RNG states (python, numpy, torch) for the checkpoint."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: the checkpoint then holds only what weights_only loading accepts.
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # checkpoints before safe loading: an ndarray
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast context when asked (helps convolution-heavy models on CPU), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# --- schedule and EMA --------------------------------------------------------------------------

def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `final_frac * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of the weights with warm-up: decay_t = min(max, (1 + t) / (10 + t)).

    The warm-up keeps early averages from being dominated by the random initial weights; a short
    horizon (max 0.995, ~200 steps) suits runs of a few thousand steps (measured on a ShapeWorld prototype: an
    EMA of 0.999 over a ~4,300-step run drew shapes worse than the raw weights, 0.46 vs 0.60).
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.995):
        self.max_decay = max_decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self) -> float:
        """Decay used by the next update."""
        return min(self.max_decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights."""
        d = self.decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        """For the checkpoint."""
        return {"max_decay": self.max_decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict."""
        self.max_decay, self.updates, self.shadow = state["max_decay"], state["updates"], state["shadow"]

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict of `model` with the averaged floating-point tensors."""
        out = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v).clone() for k, v in out.items()}


def warm_start(model: nn.Module, weights: dict, what: str, drop_missing: bool = False) -> list[str]:
    """Load `weights` into `model` where shapes match; -> the model's keys left at their fresh initialisation.
    `drop_missing`: weights the model has no place for (a block the new architecture removed) are left out."""
    own = model.state_dict()
    if drop_missing:
        weights = {k: v for k, v in weights.items() if k in own}
    bad = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{what}: the warm-start weights do not fit the model: {bad[:5]}")
    model.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))


# --- files ------------------------------------------------------------------------------------

def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill or a full disk never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A training checkpoint or cache, loaded safely (weights_only): a crafted pickle is refused, its code unrun."""
    from easel.weights.load import safe_torch_load
    # Checkpoints written before the numpy RNG state became a tensor hold one uint32 ndarray: numpy's array
    # reconstruction builds arrays only, never calls code, so it is allowed for them.
    allow = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Int64DType, _numpy_reconstruct()]
    return safe_torch_load(path, map_location, allow=tuple(allow), what="training checkpoint")


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # numpy 1
    return _reconstruct


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (stage markers, metrics)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def resume_if_same_inputs(loop: LoopConfig, path: Path, inputs: dict, info: DistInfo, warning: str) -> LoopConfig:
    """`loop`, with resume off (and `warning` printed) when `path` records other inputs than `inputs`: a checkpoint
    started on other inputs (a retrained tokenizer, another base model) is never resumed. Then records `inputs`."""
    if loop.resume and path.exists() and json.loads(path.read_text()) != inputs:
        if info.main:
            print(warning, file=sys.stderr)
        loop = dataclasses.replace(loop, resume=False)
    barrier(info)  # every rank reads the file before rank 0 rewrites it
    if info.main:
        write_json(path, inputs)
    return loop


class JsonlLog:
    """Append-only JSON-lines log; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        """Append one record."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """All records so far."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# --- the loop ---------------------------------------------------------------------------------

class Trainer:
    """Runs `loss_fn(step)` for the step budget: AdamW, warm-up + cosine, clipping, EMA, checkpoints, logs."""

    CALIBRATE_STEPS = (3, 15)  # time steps 3..15 to turn --minutes into a step budget

    def __init__(self, name: str, out_dir: str | os.PathLike, model: nn.Module, cfg: LoopConfig,
                 info: DistInfo | None = None, lr_scale: dict[str, float] | None = None, grad_accum: int = 1):
        self.name, self.out, self.model, self.cfg = name, Path(out_dir), model, cfg
        self.grad_accum = grad_accum  # micro-batches per step: loss_fn(step, k) for k < grad_accum
        self.info = info or DistInfo()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # No weight decay on biases, norms and scalars (the temperature): it would only pull them to 0.
        # `lr_scale` {name prefix: factor}: e.g. a warm-started tower learns slower than a fresh one.
        scale = lambda n: next((f for prefix, f in (lr_scale or {}).items() if n.startswith(prefix)), 1.0)  # noqa: E731
        groups = []
        for factor in sorted({scale(n) for n, _ in named}):
            for decay, test in ((cfg.weight_decay, lambda p: p.ndim >= 2), (0.0, lambda p: p.ndim < 2)):
                params = [p for n, p in named if scale(n) == factor and test(p)]
                if params:
                    groups.append({"params": params, "weight_decay": decay, "lr_scale": factor})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.total = None if cfg.minutes else cfg.steps
        self.ckpt_path = self.out / "checkpoint.pt"
        resumed = self._maybe_resume()
        broadcast_module(model, self.info)
        self.log = JsonlLog(self.out / "log.jsonl", self.step if resumed else None) if self.info.main else None

    # checkpoints
    def state(self) -> dict:
        """Everything needed to continue bit-identically."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "step": self.step,
                "schedule": {"total": self.total, "warmup": self.cfg.warmup, "lr": self.cfg.lr},
                "data_position": self.step * self.cfg.batch_size, "rng": rng_state(),
                "config": dataclasses.asdict(self.cfg), "world": self.info.world}

    def save(self) -> None:
        """Write the checkpoint (rank 0 only)."""
        if self.info.main:
            save_atomic(self.state(), self.ckpt_path)

    def _maybe_resume(self) -> bool:
        if not (self.cfg.resume and self.ckpt_path.exists()):
            return False
        state = load_checkpoint(self.ckpt_path, map_location=self.info.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.step, self.total = state["step"], state["schedule"]["total"]
        if not self.cfg.minutes and self.cfg.steps != self.total:
            self.total = self.cfg.steps  # an explicit --steps extends (or shortens) a finished run
        set_rng_state(state["rng"])
        if self.info.main:
            print(f"[{self.name}] resuming at step {self.step} from {self.ckpt_path}", file=sys.stderr)
        return True

    # the loop
    def run(self, loss_fn: Callable[..., tuple[torch.Tensor, dict]]) -> None:
        """Train until the step budget is used; checkpoints every `ckpt_every` steps and at the end.
        `loss_fn(step)` (or `loss_fn(step, k)` with grad_accum > 1) is this rank's loss; under torchrun it runs as
        one DistributedDataParallel forward, so the gradients are averaged over the processes."""
        cfg, info = self.cfg, self.info
        forward = data_parallel(StepLoss(self.model, loss_fn), info)
        bar = self._bar()
        t_last, samples_since, t_cal = time.perf_counter(), 0, None
        try:
            while self.total is None or self.step < self.total:
                if self.total is None and self.step == self.CALIBRATE_STEPS[0]:
                    t_cal = time.perf_counter()
                lr = lr_at(self.step, self.total or 10**9, cfg.lr, cfg.warmup)
                metrics = self._one_step(forward, lr)
                self.step += 1
                samples_since += cfg.batch_size
                if self.total is None and self.step == self.CALIBRATE_STEPS[1] + 1:
                    self._fix_budget(t_cal, bar)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                if info.main and (self.step % cfg.log_every == 0 or self.step == self.total):
                    now = time.perf_counter()
                    rate = samples_since / max(now - t_last, 1e-9)
                    self.log.write({"step": self.step, "lr": lr, "samples_per_s": round(rate, 2), **metrics})
                    t_last, samples_since = now, 0
                if self.step % cfg.ckpt_every == 0:
                    self.checkpoint()
        except KeyboardInterrupt:
            self.checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
        self.checkpoint()

    def checkpoint(self) -> None:
        """Save the checkpoint and redraw the loss curve (rank 0)."""
        self.save()
        if self.info.main and self.log is not None:
            plot_loss_curve(self.log.records(), self.out / "loss.png", title=self.name)

    def _one_step(self, forward, lr: float) -> dict:
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for k in range(self.grad_accum):
            last = k == self.grad_accum - 1
            # DDP averages gradients once per step: the micro-batches before the last accumulate locally.
            local = forward.no_sync() if not last and hasattr(forward, "no_sync") else nullcontext()
            with local:
                with autocast(self.cfg.bf16, self.info.device):
                    loss, metrics = forward(self.step, k) if self.grad_accum > 1 else forward(self.step)
                (loss / self.grad_accum).backward()
            for key, v in {"loss": float(loss.detach()), **metrics}.items():
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
                sums[key] = sums.get(key, 0.0) + v / self.grad_accum if numeric else v  # the mean over micro-batches
        grad_norm = float(nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf")))
        self.opt.step()
        if self.ema:
            self.ema.update(self.model)
        return {**sums, "grad_norm": round(grad_norm, 4)}

    def _fix_budget(self, t_cal: float, bar) -> None:
        per_step = (time.perf_counter() - t_cal) / (self.CALIBRATE_STEPS[1] - self.CALIBRATE_STEPS[0] + 1)
        total = max(self.step + 1, int(self.cfg.minutes * 60 / per_step))
        self.total = broadcast_int(total, self.info)
        if bar is not None:
            bar.total = self.total
            bar.refresh()
        if self.info.main:
            print(f"[{self.name}] {per_step:.3f} s/step: {self.cfg.minutes} min -> {self.total} steps", file=sys.stderr)

    def _bar(self):
        if not (self.cfg.progress and self.info.main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.total, initial=self.step, desc=self.name, unit="step", file=sys.stderr,
                    dynamic_ncols=True)

    def final_weights(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """The model's raw or EMA state dict."""
        if use_ema and self.ema is not None:
            return self.ema.weights(self.model)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


# --- loss curve ---------------------------------------------------------------------------------

def plot_loss_curve(records: list[dict], path: Path, title: str = "", key: str = "loss") -> Path | None:
    """Draw loss (log scale) against step with Pillow: raw points in grey, a smoothed line in blue."""
    from PIL import Image, ImageDraw
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if len(pts) < 2:
        return None
    W, H, L, R, T, B = 640, 360, 64, 16, 28, 40
    steps = [s for s, _ in pts]
    logs = [math.log10(v) for _, v in pts]
    lo, hi = min(logs), max(logs)
    hi = hi if hi > lo else lo + 1
    x = lambda s: L + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (W - L - R)  # noqa: E731
    y = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((L, T, W - R, H - B), outline="black")
    for k in range(5):  # y ticks, evenly spaced in log space
        v = lo + (hi - lo) * k / 4
        d.line((L - 4, y(v), L, y(v)), fill="black")
        d.text((4, y(v) - 6), f"{10 ** v:.3g}", fill="black")
    for k in range(5):
        s = steps[0] + (steps[-1] - steps[0]) * k / 4
        d.text((x(s) - 10, H - B + 6), f"{int(s)}", fill="black")
    for (s, _), v in zip(pts, logs):
        d.ellipse((x(s) - 1.5, y(v) - 1.5, x(s) + 1.5, y(v) + 1.5), fill=(175, 175, 175))
    half = len(logs) // 60  # centred moving average in log space: smooth without lagging behind
    smooth = [sum(logs[max(0, i - half):i + half + 1]) / len(logs[max(0, i - half):i + half + 1])
              for i in range(len(logs))]
    d.line([(x(s), y(v)) for s, v in zip(steps, smooth)], fill=(30, 80, 220), width=2)
    d.text((L, 8), f"{title} {key} (log scale) vs step; last {pts[-1][1]:.4g}", fill="black")
    save_image(img, path)
    return path
