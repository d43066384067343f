"""Capture: record what happens inside an ordinary generation, without changing a single number.

A `Capture` is an `extend_plan` function for `Pipeline.generate`: every sampling plan a mode builds passes
through it, and it adds

- a step observer that keeps, per step, the latent x, sigma, the x0 prediction and the predicted noise
  (x - x0) / sigma (the sampler's own step dict: nothing is recomputed);
- read-only hooks on the plan's `GuidedDenoiser` and on its inner eps/v denoiser, which see the batched
  [uncond, cond, AND parts] model call and keep the uncond, cond and guided x0 of the call each step reports;
- read-only forward hooks on every cross-attention layer (`attn2`) of the UNet that recompute the
  attention probabilities softmax(QK^T / sqrt(d)) from the layer's own `to_q`/`to_k` and inputs (SDPA does
  not return them), for the cond rows only, averaged over heads and summed per query resolution over
  layers, calls and steps as they arrive (DAAM, Tang et al. 2022), so memory stays a few maps per level.

Hooks read tensors and never return a value, so the sampled images are bit-identical with capture on and off.

    with Capture() as cap:
        images = pipe.generate(request, extend_plan=cap)
    cap.runs[0].steps[3].x0, cap.runs[0].attention[text].maps
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easel.models.layers import SCORE_BYTES, BasicTransformerBlock, CrossAttention, attention_probs  # noqa: F401


@dataclass
class StepRecord:
    """One sampler step of one run: tensors (B, C, h, w) on the CPU in float32."""

    i: int
    sigma: float
    sigma_next: float
    x: Tensor  # the noisy latent the step starts from
    x0: Tensor  # the sampler's x0 prediction (after guidance and any inpaint blend)
    tags: dict = field(default_factory=dict)  # batch, phase, model, ... from the plan
    uncond: Tensor | None = None  # the negative prompt's x0 (None when CFG was skipped at scale 1)
    cond: Tensor | None = None  # the (first AND part of the) prompt's x0
    guided: Tensor | None = None  # uncond + scale * sum_i w_i (c_i - uncond), before any inpaint blend

    @property
    def noise(self) -> Tensor:
        """The predicted noise (x - x0) / sigma: what an eps-prediction UNet outputs, for any parameterisation."""
        return (self.x - self.x0) / self.sigma

    @property
    def unit_x(self) -> Tensor:
        """x / sqrt(1 + sigma^2): the latent at unit variance, as the UNet receives it."""
        return self.x / (1 + self.sigma ** 2) ** 0.5


@dataclass
class AttentionSum:
    """Cross-attention of one prompt text, summed as it runs: per query resolution (h, w), probabilities
    (B, h*w, S) averaged over heads and summed over layers and calls; `count[(h, w)]` layer calls summed."""

    text: str
    sums: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # on the model's device until read
    count: dict[tuple[int, int], int] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)
    # per step: (B, S, h, w) summed over that step's layer calls on a grid of at most STEP_GRID a side
    by_step: dict[int, Tensor] = field(default_factory=dict)
    step_count: dict[int, int] = field(default_factory=dict)

    def add(self, size: tuple[int, int], probs: Tensor) -> None:
        """Add one layer call's head-averaged probabilities (B, h*w, S) (kept on their device: no sync per layer)."""
        probs = probs.detach().float()
        if size in self.sums:
            self.sums[size] += probs
        else:
            self.sums[size] = probs.clone()
        self.count[size] = self.count.get(size, 0) + 1

    def add_step(self, step: int, size: tuple[int, int], probs: Tensor, grid: tuple[int, int]) -> None:
        """Add one layer call's probabilities (B, h*w, S) to its step's map, resized to `grid` (h, w)."""
        m = probs.detach().float().transpose(1, 2).reshape(probs.shape[0], probs.shape[2], *size)  # (B, S, h, w)
        if size != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        self.by_step[step] = self.by_step[step] + m if step in self.by_step else m
        self.step_count[step] = self.step_count.get(step, 0) + 1

    def step_maps(self) -> list[tuple[int, Tensor]]:
        """(step, (B, S, h, w) average over that step's layer calls) in step order, on the CPU."""
        return [(i, self.by_step[i].cpu() / self.step_count[i]) for i in sorted(self.by_step)]

    def mean(self, size: tuple[int, int]) -> Tensor:
        """The average attention (B, S, h, w) at one resolution: each query's probabilities sum to 1 over S."""
        h, w = size
        m = self.sums[size].cpu() / self.count[size]  # (B, h*w, S)
        return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)


@dataclass
class SelfAttentionSum:
    """Self-attention of one queried image position: per resolution (h, w), the probabilities (B, h*w) over all
    positions, averaged over heads, summed over layers and calls; `count[(h, w)]` layer calls."""

    query: tuple[float, float]  # (y, x) as fractions of the image's height and width
    sums: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    count: dict[tuple[int, int], int] = field(default_factory=dict)

    def mean(self, size: tuple[int, int]) -> Tensor:
        """(B, h, w): where the queried position looks at this resolution (sums to 1 over the map)."""
        return (self.sums[size].cpu() / self.count[size]).reshape(-1, *size)


@dataclass
class Run:
    """One sampler run (one plan): its steps and its cross-attention per prompt text."""

    index: int
    steps: list[StepRecord] = field(default_factory=list)
    attention: dict[str, AttentionSum] = field(default_factory=dict)
    latent_size: tuple[int, int] | None = None  # (h, w) of the latents
    self_attention: SelfAttentionSum | None = None  # with Capture(self_query=...)
    _last: tuple[float, dict] | None = field(default=None, repr=False)  # (sigma, parts) of the latest model call

    @property
    def tags(self) -> dict:
        """The plan's tags (batch, phase, ...) as its steps report them."""
        return self.steps[0].tags if self.steps else {}


@dataclass
class _Call:
    """What the hooks know about the model call in flight."""

    run: Run
    step: int
    text: str
    batch: int  # images in the sampler's batch
    rows: slice | None = None  # the cond rows of the model batch (set by the inner denoiser's pre-hook)
    size: tuple[int, int] = (0, 0)  # latent (h, w)
    sigma: float = 0.0
    parts: dict = field(default_factory=dict)  # uncond / cond / guided x0 of this call


class Capture:
    """An `extend_plan` function that records steps, CFG parts and cross-attention of every plan it sees."""

    def __init__(self, steps: bool = True, attention: bool = True, cfg: bool = True, per_step: bool = True,
                 self_query: tuple[float, float] | None = None):
        """`steps`: keep each step's tensors; `attention`: cross-attention sums (`per_step`: also one small map
        per step, for animations); `cfg`: the uncond/cond/guided parts of each step; `self_query` (y, x) in
        [0, 1]: also the self-attention of that image position."""
        if self_query is not None and not all(0 <= v <= 1 for v in self_query):
            raise ValueError(f"self_query is (y, x) as fractions of the image in [0, 1], got {self_query}")
        self.keep_steps, self.keep_attention, self.keep_cfg, self.per_step = steps, attention, cfg, per_step
        self.self_query = self_query
        self.runs: list[Run] = []
        self._handles: list = []
        self._unets: set[int] = set()
        self._call: _Call | None = None

    # --- the extension point ---------------------------------------------------------------------------
    def __call__(self, plan, loaded):
        """Extend one plan: observe its steps and hook its guided denoiser (and the UNet's attention, once)."""
        run = Run(len(self.runs))
        if self.self_query is not None:
            run.self_attention = SelfAttentionSum(self.self_query)
        self.runs.append(run)
        if self.keep_attention or self.self_query is not None:
            self._hook_attention(loaded.model.unet)
        for guided in _guided_denoisers(plan.denoiser):
            self._hook_guided(guided, run)
        return plan.observe(lambda d: self._observe(run, d))

    def close(self) -> None:
        """Remove every hook (the model is as it was)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unets.clear()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- steps -----------------------------------------------------------------------------------------
    def _observe(self, run: Run, d: dict) -> None:
        """Keep one step's tensors (copies on the CPU: the sampler reuses its buffers)."""
        x = d["x"]
        run.latent_size = tuple(x.shape[-2:])
        if not self.keep_steps:
            return
        tags = {k: v for k, v in d.items() if k not in ("x", "denoised", "sigma", "sigma_next", "i", "preview")}
        rec = StepRecord(int(d["i"]), float(d["sigma"]), float(d.get("sigma_next", 0.0)), _keep(x),
                         _keep(d["denoised"]), tags)
        # Every sampler reports a step right after evaluating the denoiser at (x, sigma): the latest call is it.
        last, run._last = run._last, None
        at = float(d.get("sigma_hat", d["sigma"]))
        if last is not None and abs(last[0] - at) <= 1e-4 * max(at, 1e-8):
            rec.uncond, rec.cond, rec.guided = (last[1].get(k) for k in ("uncond", "cond", "guided"))
        run.steps.append(rec)

    # --- the guided denoiser: which rows are cond, and the CFG parts ------------------------------------
    def _hook_guided(self, guided: nn.Module, run: Run) -> None:
        """Hooks on a GuidedDenoiser and on its inner denoiser (both run per model evaluation)."""
        def before(module, args, kwargs):
            x, sigma = _x_sigma(args, kwargs)
            s = float(torch.as_tensor(sigma).reshape(-1)[0])
            step = module.step_of(s)
            self._call = _Call(run, step, module.cond.texts_at(step)[0][0], x.shape[0], None, tuple(x.shape[-2:]), s)

        def after(module, args, kwargs, out):
            call, self._call = self._call, None  # always called, so a failed call leaves no state behind
            if call is not None and out is not None and self.keep_cfg and self.keep_steps:
                call.parts["guided"] = _keep(out)
                run._last = (call.sigma, call.parts)

        def inner_before(module, args, kwargs):
            call = self._call
            if call is None:
                return
            rows = _x_sigma(args, kwargs)[0].shape[0]
            k = rows // call.batch
            # GuidedDenoiser batches [uncond, AND part 1, ...]; at scale 1 with one part only the cond rows
            call.rows = slice(call.batch, 2 * call.batch) if k > 1 else slice(0, call.batch)

        def inner_after(module, args, kwargs, out):
            call = self._call
            if call is None or not (self.keep_cfg and self.keep_steps):
                return
            call.parts["cond"] = _keep(out[call.rows])
            if call.rows.start > 0:
                call.parts["uncond"] = _keep(out[:call.batch])

        self._handles += [guided.register_forward_pre_hook(before, with_kwargs=True),
                          guided.register_forward_hook(after, with_kwargs=True, always_call=True),
                          guided.inner.register_forward_pre_hook(inner_before, with_kwargs=True),
                          guided.inner.register_forward_hook(inner_after, with_kwargs=True)]

    # --- cross-attention -------------------------------------------------------------------------------
    def _hook_attention(self, unet: nn.Module) -> None:
        """A read-only forward hook on each transformer block's cross-attention (`attn2`), once per UNet."""
        if id(unet) in self._unets:
            return
        self._unets.add(id(unet))
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                self._handles.append(block.attn2.register_forward_hook(self._on_attention, with_kwargs=True))
                if self.self_query is not None:
                    self._handles.append(block.attn1.register_forward_hook(self._on_self_attention,
                                                                           with_kwargs=True))

    def _on_attention(self, module: CrossAttention, args, kwargs, out) -> None:
        """Add the cond rows' head-averaged attention probabilities of this layer call to the run's sums."""
        call = self._call
        if call is None or call.rows is None or not self.keep_attention:
            return
        x = args[0] if args else kwargs["x"]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        size = _query_size(x.shape[1], call.size)
        with torch.no_grad():
            probs = attention_probs(module, x[call.rows], context[call.rows])  # (B, T, S)
        sums = call.run.attention.get(call.text)
        if sums is None:
            sums = call.run.attention[call.text] = AttentionSum(call.text)
        sums.add(size, probs)
        sums.steps.add(call.step)
        if self.per_step:
            sums.add_step(call.step, size, probs, step_grid(call.size))

    def _on_self_attention(self, module: CrossAttention, args, kwargs, out) -> None:
        """Add where the queried position looks in this self-attention layer call (cond rows, head mean)."""
        call = self._call
        if call is None or call.rows is None or call.run.self_attention is None:
            return
        x = args[0] if args else kwargs["x"]
        size = _query_size(x.shape[1], call.size)
        fy, fx = call.run.self_attention.query
        index = min(int(fy * size[0]), size[0] - 1) * size[1] + min(int(fx * size[1]), size[1] - 1)
        rows = x[call.rows]
        with torch.no_grad():
            probs = attention_probs(module, rows[:, index:index + 1], rows)[:, 0]  # (B, h*w)
        sums = call.run.self_attention
        sums.sums[size] = sums.sums[size] + probs if size in sums.sums else probs.detach().float()
        sums.count[size] = sums.count.get(size, 0) + 1


STEP_GRID = 32  # per-step attention maps are kept at most this many cells a side (bounded memory at 1024 px)


def step_grid(latent: tuple[int, int]) -> tuple[int, int]:
    """The grid of per-step maps: the latent's (h, w) shrunk by a whole factor to at most STEP_GRID a side."""
    f = -(-max(latent) // STEP_GRID)
    return -(-latent[0] // f), -(-latent[1] // f)


def _query_size(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a feature map with `tokens` positions inside a UNet over a latent of size `latent` (each
    downsample halves a side, rounding up)."""
    h, w = latent
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"cannot place {tokens} attention queries on a {latent[0]}x{latent[1]} latent's levels")
    return h, w


def _x_sigma(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """(x, sigma) of a denoiser call, given positionally or by name."""
    x = args[0] if args else kwargs["x"]
    sigma = args[1] if len(args) > 1 else kwargs["sigma"]
    return x, sigma


def _keep(t: Tensor) -> Tensor:
    """A float32 CPU copy (never a view of a buffer the sampler may reuse)."""
    return t.detach().float().cpu().clone()


def _guided_denoisers(denoiser) -> list[nn.Module]:
    """The GuidedDenoisers of a wrapper stack (wrappers keep what they wrap as `.inner`; a refiner switch
    keeps `.base` and `.refiner`)."""
    from easel.pipelines.conditioning import GuidedDenoiser
    found, todo = [], [denoiser]
    while todo:
        d = todo.pop()
        if d is None:
            continue
        if isinstance(d, GuidedDenoiser):
            found.append(d)
            continue
        todo += [getattr(d, name, None) for name in ("inner", "base", "refiner")]
    return found
