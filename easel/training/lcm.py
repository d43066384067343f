"""`easel train lcm-lora`: latent consistency distillation into a LoRA (Luo et al. 2023, LCM and LCM-LoRA).

The student is the base UNet with a trainable LoRA; the teacher is the same UNet with the LoRA switched
off. On the skipping-step DDIM grid t = k-1, 2k-1, ..., T-1 (k = T / 50) one step draws a cached latent x0,
noises it to t_{n+k}, lets the teacher (classifier-free guidance at scale w) take one DDIM step to t_n, and
trains the student's consistency function at t_{n+k} to equal its own prediction at t_n (no gradient, no
separate target network: LCM-LoRA's choice). The consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t)
meets the boundary condition f(x, 0) = x; the loss is pseudo-Huber (c = 0.001).

The guidance is baked into the LoRA, so the result samples in ~4 steps with the `lcm` sampler at CFG 1-2.
The LoRA is a kohya file written by `easel.weights.lora.save_lora` (any LoRA loader of easel reads it).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from easel.samplers.denoisers import make_alphas_cumprod
from easel.training.common import (DistInfo, LoopConfig, Trainer, TrainingError, load_checkpoint,
                                   resume_if_same_inputs, save_atomic, step_generator, write_json)
from easel.training.lcm_cli import DEFAULT_LOOP, TARGETS, loop_from_args, parse_guidance
from easel.training.unet import LatentBatches, encode_dataset
from easel.weights.model_io import LoadedModel

LORA_NAME = "lcm-lora.safetensors"
RECOMMENDED = {"sampler": "lcm", "scheduler": "sgm_uniform", "steps": 4, "cfg_scale": [1.0, 2.0]}


# --- the LoRA, as a parametrization of the frozen UNet's weights ---------------------------------

class LoraPair(nn.Module):
    """One layer's trainable factors; as a parametrization its weight reads W + (alpha / rank) * up @ down.

    Patching the weight (rather than hooking the layer's output) also covers layers the UNet applies through
    their weight directly (SD1's 1x1-conv proj_in/out), and is exactly what `apply_loras` merges from the file.
    """

    def __init__(self, weight: Tensor, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        rank = min(rank, weight.shape[0], weight[0].numel())
        down = torch.empty(rank, *weight.shape[1:], device=weight.device)  # (r, in) or (r, in, kh, kw): LoCon
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)  # nn.Linear's own init, as PEFT does
        self.down = nn.Parameter(down)
        up = torch.zeros(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), device=weight.device)
        self.up = nn.Parameter(up)  # 0: training starts from the base model exactly
        self.alpha, self.enabled = float(alpha), True

    def forward(self, weight: Tensor) -> Tensor:
        """The layer's effective weight."""
        if not self.enabled:
            return weight
        delta = self.up.flatten(1) @ self.down.flatten(1)  # (out, r) @ (r, in * kh * kw)
        return weight + (delta * (self.alpha / self.down.shape[0])).view_as(weight).to(weight.dtype)


class LoraAdapters(nn.Module):
    """LoRA pairs on the UNet layers matching `targets`; `remove()` restores the original weights exactly."""

    def __init__(self, unet: nn.Module, rank: int = 16, alpha: float | None = None, targets: str = "all",
                 seed: int = 0):
        super().__init__()
        if targets not in TARGETS:
            raise TrainingError(f"unknown LoRA targets {targets!r}: choose one of {', '.join(TARGETS)}")
        pattern, gen = re.compile(TARGETS[targets]), torch.Generator().manual_seed(seed)
        self.layers = {n: m for n, m in unet.named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d)) and pattern.search("." + n)}
        if not self.layers:
            raise TrainingError(f"no UNet layer matches the LoRA targets {targets!r}")
        # Module names cannot hold dots: `input_blocks.1.1` is stored as `input_blocks__1__1`.
        self.pairs = nn.ModuleDict({n.replace(".", "__"): LoraPair(m.weight, rank, alpha or rank, gen)
                                    for n, m in self.layers.items()})
        for n, m in self.layers.items():
            parametrize.register_parametrization(m, "weight", self.pairs[n.replace(".", "__")])

    @contextmanager
    def off(self):
        """Run the UNet without the LoRA inside the block (the teacher)."""
        for p in self.pairs.values():
            p.enabled = False
        try:
            yield
        finally:
            for p in self.pairs.values():
                p.enabled = True

    def remove(self) -> None:
        """Take the LoRA off the UNet: every layer gets its original weight tensor back."""
        for m in self.layers.values():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    @torch.no_grad()
    def load_lora(self, path: str | Path, model: nn.Module) -> int:
        """Start from a LoRA file's factors (e.g. the LCM-LoRA of the model this one was continued from), for every
        layer it has with this rank; `model` is the StableDiffusion whose UNet carries the adapters. -> layers set."""
        from easel.weights import lora_keys
        from easel.weights.lora import read_lora
        targets, done = lora_keys.target_names(model), 0
        for stem, layer in read_lora(path).layers.items():
            module = targets.get(lora_keys.normalize(stem), "")
            pair = self.pairs[key] if (key := module.removeprefix(lora_keys.UNET).replace(".", "__")) in self.pairs \
                else None
            if pair is None or layer.down.numel() != pair.down.numel() or layer.up.numel() != pair.up.numel():
                continue
            pair.down.copy_(layer.down.reshape(pair.down.shape))
            pair.up.copy_(layer.up.reshape(pair.up.shape) * (layer.scale * pair.down.shape[0] / pair.alpha))
            done += 1
        return done

    def lora_layers(self, state: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{`unet.<module path>`: (down, up, alpha)} for `save_lora`, from the live weights or a state dict."""
        state = state or self.state_dict()
        out = {}
        for n in self.layers:
            key = n.replace(".", "__")
            out[f"unet.{n}"] = (state[f"pairs.{key}.down"].detach().float().cpu(),
                                state[f"pairs.{key}.up"].detach().float().cpu(), self.pairs[key].alpha)
        return out


# --- the skipping-step DDIM solver and the consistency function -----------------------------------

class ConsistencySchedule:
    """The DDIM grid of LCM distillation (t_n = (n+1)k - 1) and the boundary-condition scalings."""

    def __init__(self, alphas_cumprod: Tensor, num_ddim_timesteps: int = 50, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5):
        self.a = alphas_cumprod.float()
        T = len(self.a)
        self.k = T // num_ddim_timesteps
        self.grid = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1  # (N,) 19, 39, ..., 999 for T = 1000
        self.timestep_scaling, self.sigma_data = timestep_scaling, sigma_data

    def pair(self, n: Tensor) -> tuple[Tensor, Tensor]:
        """(t_{n+k}, t_n) for grid indices n: where the student starts and where the teacher's step lands."""
        start = self.grid[n]
        return start, (start - self.k).clamp(min=0)

    def _ab(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        a = self.a.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (the VP forward process, as the UNet was trained)."""
        sa, sb = self._ab(t, x0.ndim)
        return sa * x0 + sb * noise

    def x0_eps(self, out: Tensor, x: Tensor, t: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """The network output (eps or v) at x_t as (predicted x0, predicted noise)."""
        sa, sb = self._ab(t, x.ndim)
        if prediction == "v":
            return sa * x - sb * out, sa * out + sb * x
        return (x - sb * out) / sa, out

    def ddim_step(self, x0: Tensor, eps: Tensor, t_to: Tensor) -> Tensor:
        """Deterministic DDIM (Song et al. 2021) from the predicted (x0, eps) to timestep t_to."""
        sa, sb = self._ab(t_to, x0.ndim)
        return sa * x0 + sb * eps

    def consistency(self, x0: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t) = c_skip x + c_out x0 with c_skip(0) = 1, c_out(0) = 0 (LCM's boundary condition)."""
        s = (t.float() * self.timestep_scaling).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s / (s**2 + self.sigma_data**2).sqrt()
        return c_skip * x + c_out * x0


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c): L2 near 0, L1 beyond c (Song & Dhariwal 2023)."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).mean()


# --- the run --------------------------------------------------------------------------------------

@dataclass
class LcmRun:
    """What `train_lcm_lora` needs besides the loop settings."""

    out: Path  # <run>/lcm_lora
    base: LoadedModel  # the teacher; the student is the same UNet plus the LoRA
    data: dict  # a latent cache as `easel.training.unet.load_or_build_cache` writes it
    loop: LoopConfig = field(default_factory=lambda: DEFAULT_LOOP)
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: str = "all"
    guidance: tuple[float, float] = (5.0, 5.0)  # teacher CFG scale (uncond + w (cond - uncond)), drawn in [lo, hi]
    num_ddim_timesteps: int = 50
    huber_c: float = 0.001
    eval_prompts: int = 16  # validation captions for the 4-step-vs-reference check after training
    init_lora: Path | None = None  # an LCM-LoRA to start from (e.g. the one of the model this base continues)


def sample_inputs(run: LcmRun, step: int, batches: LatentBatches, sched: ConsistencySchedule):
    """The global batch of a step: dataset indices, paraphrases, grid indices, guidance scales and noise."""
    B, N = run.loop.batch_size, len(sched.grid)
    gen = step_generator(run.loop.seed, step)
    idx = batches.indices(step)
    paraphrase = torch.randint(0, batches.ids.shape[1], (B,), generator=gen)
    n = torch.randint(0, N, (B,), generator=gen)
    lo, hi = run.guidance
    w = lo + (hi - lo) * torch.rand(B, generator=gen)
    noise = torch.randn(B, *batches.latents.shape[1:], generator=gen)
    return idx, paraphrase, n, w, noise


def lcm_loss(run: LcmRun, adapters: LoraAdapters, sched: ConsistencySchedule, x0: Tensor, noise: Tensor,
             n: Tensor, w: Tensor, context: Tensor, uncond: Tensor) -> Tensor:
    """Consistency distillation loss of one batch: student f(x_{t+k}, t+k) against its own f at the teacher's x_t."""
    unet, pred = run.base.model.unet, run.base.model.config.prediction
    t_from, t_to = (t.to(x0.device) for t in sched.pair(n))
    x_from = sched.noised(x0, noise, t_from)
    out = unet(x_from, t_from.float(), context=context)
    student = sched.consistency(sched.x0_eps(out, x_from, t_from, pred)[0], x_from, t_from)
    with torch.no_grad():
        with adapters.off():
            both = unet(torch.cat([x_from, x_from]), torch.cat([t_from, t_from]).float(),
                        context=torch.cat([context, uncond.expand_as(context)]))  # (2B, C, h, w)
        x0_c, eps_c = sched.x0_eps(both[:len(x0)], x_from, t_from, pred)
        x0_u, eps_u = sched.x0_eps(both[len(x0):], x_from, t_from, pred)
        w = w.to(x0.device).reshape(-1, 1, 1, 1)
        x_to = sched.ddim_step(x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u), t_to)
        out_to = unet(x_to, t_to.float(), context=context)
        target = sched.consistency(sched.x0_eps(out_to, x_to, t_to, pred)[0], x_to, t_to)
    return pseudo_huber(student, target, run.huber_c)


def lcm_step(run: LcmRun, adapters: LoraAdapters, sched: ConsistencySchedule, batches: LatentBatches,
             uncond: Tensor, step: int, info: DistInfo) -> tuple[Tensor, dict]:
    """Loss of one step on this rank's slice of the global batch."""
    idx, paraphrase, n, w, noise = sample_inputs(run, step, batches, sched)
    mine = info.shard(run.loop.batch_size)
    idx, paraphrase, n, w, noise = idx[mine], paraphrase[mine], n[mine], w[mine], noise[mine]
    ids = batches.ids[idx, paraphrase].long()  # (b, 77)
    with torch.no_grad():
        context, _ = run.base.model.encode_text([ids.to(info.device)])
    x0 = batches.latents[idx].float().to(info.device)
    return lcm_loss(run, adapters, sched, x0, noise.to(info.device), n, w, context, uncond), {}


def _uncond_context(base: LoadedModel) -> Tensor:
    """(1, 77, D) text-encoder states of the empty caption."""
    ids = base.tokenizers[0]([""], max_length=77)
    with torch.no_grad():
        return base.model.encode_text([ids.to(base.model.device)])[0]


def make_schedule(base: LoadedModel, num_ddim_timesteps: int = 50) -> ConsistencySchedule:
    """The consistency schedule over the base model's training betas."""
    cfg = base.model.config
    return ConsistencySchedule(make_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                                   cfg.beta_schedule), num_ddim_timesteps)


def train_lcm_lora(run: LcmRun, info: DistInfo | None = None) -> dict:
    """Distil; save <out>/lcm-lora.safetensors (kohya) and metrics.json with the 4-step check."""
    info = info or DistInfo()
    if run.base.model.config.unet.adm_in_channels:
        raise TrainingError("lcm-lora distils SD1/SD2-layout models (the ShapeWorld model); SDXL is not supported")
    run.base.model.to(info.device).eval().requires_grad_(False)
    adapters = LoraAdapters(run.base.model.unet, run.rank, run.alpha, run.targets, run.loop.seed).to(info.device)
    if run.init_lora is not None:
        n = adapters.load_lora(run.init_lora, run.base.model)
        if info.main:
            print(f"[lcm-lora] starting from {run.init_lora}: {n} of {len(adapters.pairs)} layers", file=sys.stderr)
    sched = make_schedule(run.base, run.num_ddim_timesteps)
    batches = LatentBatches(run.data["train"], run.loop.batch_size, run.loop.seed)
    uncond = _uncond_context(run.base)
    trainer = Trainer("lcm-lora", run.out, adapters, _guard_resume(run, info), info)
    try:
        trainer.run(lambda step: lcm_step(run, adapters, sched, batches, uncond, step, info))
    finally:
        adapters.remove()
    if not info.main:
        return {}
    path = save_lcm_lora(run.out / LORA_NAME, adapters.lora_layers(trainer.final_weights(trainer.ema is not None)),
                         run)
    metrics = {"steps": trainer.step, "lora": str(path), "lora_kb": round(path.stat().st_size / 1024, 1),
               "layers": len(adapters.layers), "rank": run.rank, "targets": run.targets}
    if run.eval_prompts:
        prompts = [c[0] for c in run.data.get("val", run.data["train"])["captions"][:run.eval_prompts]]
        metrics.update(compare_to_reference(run.base, path, prompts, cfg_scale=sum(run.guidance) / 2))
    write_json(run.out / "metrics.json", metrics)
    return metrics


def _guard_resume(run: LcmRun, info: DistInfo) -> LoopConfig:
    """The loop settings, with resume off when the checkpoint was made for another base model or LoRA shape."""
    inputs = {"base_hash": run.base.hash, "rank": run.rank, "alpha": run.alpha, "targets": run.targets}
    return resume_if_same_inputs(run.loop, run.out / "inputs.json", inputs, info,
                                 f"[lcm-lora] {run.out / 'checkpoint.pt'} was made for another base model, rank or "
                                 "targets: starting over")


def save_lcm_lora(path: Path, layers: dict, run: LcmRun) -> Path:
    """Write the kohya LoRA with metadata naming the base model and the settings to sample it with."""
    from easel.weights.lora import save_lora
    metadata = {
        "easel_kind": "lcm-lora", "easel_base_model": Path(run.base.source).name, "easel_base_hash": run.base.hash,
        "easel_recommended": json.dumps(RECOMMENDED), "easel_teacher_cfg": json.dumps(list(run.guidance)),
        "ss_network_dim": str(run.rank), "ss_network_alpha": str(run.alpha or run.rank),
    }
    return save_lora(path, layers, fmt="kohya", family="sd1", config=run.base.model.config, metadata=metadata)


# --- checking the result ---------------------------------------------------------------------------

@torch.no_grad()
def sample_images(base: LoadedModel, prompts: list[str], sampler: str, scheduler: str, steps: int,
                  cfg_scale: float, seed: int = 1000) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] for `prompts`, one seed per image (seed + i)."""
    from easel.pipelines.plan import sample_plain_batch
    latents = sample_plain_batch(base, prompts, sampler, scheduler, steps, cfg_scale, seed)
    return (base.model.vae.decode_latents(latents.to(base.model.dtype)).float().clamp(-1, 1) + 1) / 2


def compare_to_reference(base: LoadedModel, lora: Path, prompts: list[str], cfg_scale: float = 5.0,
                         lcm_cfg: float = 1.0) -> dict:
    """Pixel MSE of 4-step LCM images to the base model's 25-step DPM++ 2M Karras images, with and without the LoRA."""
    from easel.weights.lora import apply_loras
    ref = sample_images(base, prompts, "dpmpp_2m", "karras", 25, cfg_scale)
    plain = sample_images(base, prompts, "lcm", "sgm_uniform", 4, lcm_cfg)
    with apply_loras(base.model, [(lora, 1.0)]):
        lcm = sample_images(base, prompts, "lcm", "sgm_uniform", 4, lcm_cfg)
    return {"mse_4step_lcm_lora": round(float((lcm - ref).pow(2).mean()), 5),
            "mse_4step_lcm_base": round(float((plain - ref).pow(2).mean()), 5), "reference_cfg": cfg_scale}


# --- data -------------------------------------------------------------------------------------------

def cache_problem(data: dict, base: LoadedModel) -> str:
    """Why a latent cache does not fit the base model ('' when it does): tokenizer, latent shape or VAE."""
    from easel.world.dataset import mixed_scene, to_tensor
    from easel.world.render import render_array
    model, train = base.model, data["train"]
    side = model.config.default_size // model.config.vae.downsample
    if tuple(train["latents"].shape[1:]) != (model.config.unet.in_channels, side, side):
        return f"latents of shape {tuple(train['latents'].shape[1:])}, the model makes {side}x{side}"
    caps = [c[0] for c in train["captions"][:8]]
    if not torch.equal(base.tokenizers[0](caps, max_length=77), train["ids"][:8, 0].long()):
        return "its captions were tokenized by another tokenizer"
    share = data.get("key", {}).get("relation_share", 0.0)  # how the cache drew its scenes
    with torch.no_grad():  # train latent i is the encoded scene of seed i
        x = torch.stack([to_tensor(render_array(mixed_scene(i, share), model.config.default_size)) for i in range(4)])
        z = model.vae.encode_latents(x.to(model.device, next(model.vae.parameters()).dtype))
    ref = train["latents"][:4].float().to(z.device)
    err = float((z.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-8))
    return "" if err < 1e-3 else f"it was encoded by another VAE (relative error {err:.3g})"


def load_latents(cache: Path, base: LoadedModel, out: Path, n_latents: int = 20000, progress: bool = True) -> dict:
    """The run's UNet latent cache when it fits the base model, else one encoded with the base model's own VAE."""
    for path in dict.fromkeys([cache, out / "latents.pt"]):
        if path.exists():
            data = load_checkpoint(path)
            problem = cache_problem(data, base)
            if not problem:
                return data
            print(f"[lcm-lora] not using {path}: {problem}", file=sys.stderr)
    from easel.world.dataset import eval_seeds
    print(f"[lcm-lora] encoding {n_latents} ShapeWorld images with the base model's VAE -> {out / 'latents.pt'}",
          file=sys.stderr)
    vae, tok, size = base.model.vae, base.tokenizers[0], base.model.config.default_size
    data = {"scale_factor": base.model.config.vae.scale_factor,
            "train": encode_dataset(vae, tok, list(range(n_latents)), size, progress=progress),
            "val": encode_dataset(vae, tok, eval_seeds(64), size, captions_per_image=1, progress=progress)}
    save_atomic(data, out / "latents.pt")
    return data


def run_from_args(args: argparse.Namespace, info) -> dict:
    """`easel train lcm-lora`: load the base model and the latents, then distil (`info`: a DistInfo)."""
    from easel.training.common import barrier
    from easel.weights.model_io import load_model
    from easel.weights.registry import resolve_model
    root = Path(args.out)
    out = root / "lcm_lora"
    base_path = Path(args.base) if args.base else root / "shapeworld.safetensors"
    if not base_path.exists():
        if args.base:
            raise TrainingError(f"--base {base_path} does not exist: pass a model file")
        base_path = resolve_model(None)
        if info.main:
            print(f"[lcm-lora] {root / 'shapeworld.safetensors'} not found: distilling the built-in model "
                  f"{base_path}", file=sys.stderr)
    base = load_model(base_path)
    cache = Path(args.cache) if args.cache else root / "unet" / "latents.pt"
    if info.main:  # rank 0 first: it encodes a new cache when none fits, the others then read that one
        data = load_latents(cache, base, out, args.latents, args.progress)
    barrier(info)
    if not info.main:
        data = load_latents(cache, base, out, args.latents, progress=False)
    init = getattr(args, "init_lora", None)
    if init:
        from easel.weights.lora import find_lora
        init = find_lora(init)
    run = LcmRun(out, base, data, loop_from_args(args), args.rank, None, args.targets, parse_guidance(args.cfg),
                 eval_prompts=args.eval_prompts, init_lora=init)
    return train_lcm_lora(run, info)
