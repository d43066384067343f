"""`easel train lora DATA --out FILE`: a LoRA (Hu et al. 2021) of any loaded model trained on a user's images.

The LoRA factors are parametrizations of the frozen model's weights (`easel.training.lcm.LoraPair`): the layer
computes with W + (alpha / rank) * up @ down, so the UNet and text encoders run unchanged, and removing the
parametrizations gives every original tensor back bit for bit. Targets: the UNet's transformer layers (attention
q/k/v/out, proj_in/out, feed-forward) by default; `--conv` adds the ResBlock and sampling convolutions (LoCon);
`--text-encoder` adds the text encoders' attention and MLP layers.

The output is a kohya `.safetensors` (written by `easel.weights.lora.save_lora`) with kohya's `ss_*` training
metadata, which A1111, ComfyUI, diffusers' `load_lora_weights` and easel (`<lora:name:1>`) read.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from easel.training.common import DistInfo, LoopConfig, Trainer, TrainingError, resume_if_same_inputs, step_generator
from easel.training.dataset_folder import UserDataset
from easel.training.lcm import LoraPair
from easel.training.lcm_cli import TARGETS
from easel.training.user_train import (Latents, NoiseOptions, TextCache, denoising_loss, encode_text, family_of,
                                       gradient_checkpointing, kohya_base_version, make_batch, make_denoiser,
                                       save_samples, token_ids, unet_cond)
from easel.weights.model_io import LoadedModel

TEXT_TARGETS = r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


class LoraNetwork(nn.Module):
    """LoRA pairs on the matching layers of the UNet (and text encoders); `remove()` restores the weights."""

    def __init__(self, model: nn.Module, rank: int = 8, alpha: float | None = None, conv: bool = False,
                 text: bool = False, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        parts = [("unet", model.unet, TARGETS["all" if conv else "transformer"])]
        if text:
            parts += [(f"text_encoders.{i}", enc, TEXT_TARGETS) for i, enc in enumerate(model.text_encoders)]
        self.layers = {}
        for prefix, module, pattern in parts:
            rx = re.compile(pattern)
            self.layers.update({f"{prefix}.{n}": m for n, m in module.named_modules()
                                if isinstance(m, (nn.Linear, nn.Conv2d)) and rx.search("." + n)
                                and not _unused(model, prefix, n)})
        if not self.layers:
            raise TrainingError("no layer of this model takes a LoRA (no attention layers found)")
        # Module names cannot hold dots: `unet.input_blocks.1.1` is stored as `unet__input_blocks__1__1`.
        self.pairs = nn.ModuleDict({n.replace(".", "__"): LoraPair(m.weight, rank, alpha or rank, gen)
                                    for n, m in self.layers.items()})
        for n, m in self.layers.items():
            parametrize.register_parametrization(m, "weight", self.pairs[n.replace(".", "__")])

    def remove(self) -> None:
        """Take the LoRA off: every layer gets its original weight tensor back."""
        for m in self.layers.values():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    def lora_layers(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module path: (down, up, alpha)} as `save_lora` takes them."""
        return {n: (p.down.detach().float().cpu(), p.up.detach().float().cpu(), p.alpha)
                for n, p in ((n, self.pairs[n.replace(".", "__")]) for n in self.layers)}


def _unused(model: nn.Module, prefix: str, name: str) -> bool:
    """True for a text-encoder layer after the one the UNet reads (clip skip) when no pooled output needs it:
    a LoRA there would never get a gradient."""
    m = re.match(r"text_encoders\.(\d+)$", prefix)
    layer = re.search(r"encoder\.layers\.(\d+)\.", name)
    if not (m and layer):
        return False
    cfg, i = model.config, int(m.group(1))
    if cfg.pooled_text and i == len(model.text_encoders) - 1:
        return False
    return int(layer.group(1)) > cfg.text_encoders[i].num_hidden_layers - cfg.clip_skip


def scheduled_lr(name: str, step: int, total: int, base: float, warmup: int) -> float:
    """The learning rate of a step: constant, constant after warm-up, cosine or linear decay to 0 (kohya's names)."""
    if name != "constant" and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        import math
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress) if name == "linear" else base


class ScheduledTrainer(Trainer):
    """The shared Trainer with a named learning-rate schedule instead of its warm-up + cosine."""

    scheduler = "constant"

    def _one_step(self, loss_fn, lr: float) -> dict:
        lr = scheduled_lr(self.scheduler, self.step, self.total or self.cfg.steps, self.cfg.lr, self.cfg.warmup)
        return {**super()._one_step(loss_fn, lr), "lr": lr}


@dataclass
class LoraRun:
    """Everything `train_lora` needs."""

    data: UserDataset
    base: LoadedModel
    out: Path  # the .safetensors to write
    run_dir: Path  # checkpoint.pt, log.jsonl, loss.png, samples/, latents.pt
    loop: LoopConfig
    rank: int = 8
    alpha: float | None = None
    conv: bool = False
    text_encoder: bool = False
    lr_scheduler: str = "constant"
    grad_accum: int = 1
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    sample_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0
    sample_steps: int = 20
    gradient_checkpointing: bool = False


def lora_step(run: LoraRun, denoiser, latents: Latents, info: DistInfo, step: int, k: int = 0,
              texts: TextCache | None = None) -> tuple[Tensor, dict]:
    """Loss of micro-batch k of an optimizer step, on this process's rows of the global batch (text from `texts`
    when the text encoders are frozen)."""
    if info.main and k == 0 and run.sample_every and step % run.sample_every == 0 and run.sample_prompts:
        save_samples(run.base, run.sample_prompts, run.run_dir / "samples" / f"step_{step:06d}.png")
    data_step = step * run.grad_accum + k
    batch = make_batch(run.data, latents, data_step, run.loop.batch_size, run.loop.seed, info)
    if texts is not None:
        context, pooled = texts.encode(batch.captions)
    else:
        context, pooled = encode_text(run.base, token_ids(run.base, batch.captions))
    gen = step_generator(run.loop.seed, data_step, stream=2)
    loss = denoising_loss(run.base, denoiser, batch.latents, unet_cond(run.base, context, pooled, batch), gen,
                          run.noise, batch.rows, batch.total)
    return loss * batch.share(info), {}


def train_lora(run: LoraRun, info: DistInfo | None = None) -> dict:
    """Train, then write the kohya file; returns the run's numbers."""
    if run.lr_scheduler not in LR_SCHEDULERS:
        raise TrainingError(f"--lr-scheduler {run.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    if run.grad_accum < 1 or run.rank < 1:
        raise TrainingError(f"--grad-accum and --rank must be >= 1 (got {run.grad_accum}, {run.rank})")
    info = info or DistInfo()
    started = time.time()
    latents = Latents(run.base, run.data, run.run_dir / "latents.pt", run.loop.progress)
    net = LoraNetwork(run.base.model, run.rank, run.alpha, run.conv, run.text_encoder, run.loop.seed)
    trainer = ScheduledTrainer("lora", run.run_dir, net, _guard_resume(run, info), info,
                               grad_accum=run.grad_accum)
    trainer.scheduler = run.lr_scheduler
    denoiser = make_denoiser(run.base)
    texts = None if run.text_encoder else TextCache(run.base, run.run_dir / "text.pt")
    keep = gradient_checkpointing(run.base.model.unet) if run.gradient_checkpointing else contextlib.nullcontext()
    try:
        with keep:
            trainer.run(lambda step, k=0: lora_step(run, denoiser, latents, info, step, k, texts))
        if texts is not None and info.main:
            texts.save()
        if info.main and run.sample_every and run.sample_prompts:
            save_samples(run.base, run.sample_prompts, run.run_dir / "samples" / f"step_{trainer.step:06d}.png")
    finally:
        net.remove()
    if not info.main:
        return {}
    layers = net.lora_layers()
    path = save_trained_lora(run, layers, trainer.step, started)
    records = trainer.log.records() if trainer.log else []
    return {"lora": str(path), "steps": trainer.step, "layers": len(layers), "rank": run.rank,
            "first_loss": records[0]["loss"] if records else None,
            "last_loss": records[-1]["loss"] if records else None,
            "minutes": round((time.time() - started) / 60, 2), "run_dir": str(run.run_dir)}


def _guard_resume(run: LoraRun, info: DistInfo) -> LoopConfig:
    """Resume only a checkpoint of the same base model, data, LoRA shape and batch settings."""
    inputs = {"base_hash": run.base.hash, "base": run.base.source, "rank": run.rank, "alpha": run.alpha,
              "conv": run.conv, "text_encoder": run.text_encoder, "grad_accum": run.grad_accum,
              "batch_size": run.loop.batch_size, "seed": run.loop.seed,
              "data": [[str(it.path), it.caption, it.repeats] for it in run.data.items]}
    return resume_if_same_inputs(run.loop, run.run_dir / "inputs.json", inputs, info,
                                 f"[lora] {run.run_dir / 'checkpoint.pt'} was made for another model, data or LoRA "
                                 "shape: starting over")


def kohya_metadata(run: LoraRun, steps: int, started: float) -> dict[str, str]:
    """kohya-ss sd-scripts' `ss_*` training metadata (what A1111's LoRA tab and civitai show)."""
    ds, cfg, loop = run.data, run.base.model.config, run.loop
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for it in ds.items:
        group = tags.setdefault(it.group, {})
        for tag in (t.strip() for t in it.caption.split(",") if t.strip()):
            group[tag] = group.get(tag, 0) + 1
        d = dirs.setdefault(it.group, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
    buckets = {}
    for it in ds.items:
        buckets.setdefault(f"{it.bucket[0]}x{it.bucket[1]}", 0)
        buckets[f"{it.bucket[0]}x{it.bucket[1]}"] += 1
    images = sum(it.repeats for it in ds.items)
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(run.alpha or run.rank), "ss_learning_rate": str(loop.lr),
        "ss_unet_lr": str(loop.lr), "ss_text_encoder_lr": str(loop.lr if run.text_encoder else 0),
        "ss_lr_scheduler": run.lr_scheduler, "ss_lr_warmup_steps": str(loop.warmup),
        "ss_max_train_steps": str(steps), "ss_num_train_images": str(images),
        "ss_num_epochs": str(max(1, -(-steps * run.grad_accum // max(1, ds.batches_per_epoch(loop.batch_size))))),
        "ss_batch_size_per_device": str(loop.batch_size), "ss_gradient_accumulation_steps": str(run.grad_accum),
        "ss_min_snr_gamma": str(run.noise.min_snr_gamma), "ss_noise_offset": str(run.noise.noise_offset),
        "ss_seed": str(loop.seed), "ss_resolution": json.dumps([ds.opts.resolution, ds.opts.resolution]),
        "ss_enable_bucket": "True", "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_mixed_precision": "bf16" if loop.bf16 else "no", "ss_optimizer": "torch.optim.AdamW",
        "ss_sd_model_name": Path(run.base.source).name or cfg.name, "ss_sd_model_hash": run.base.hash,
        "ss_v2": str(family_of(cfg) == "sd2"), "ss_base_model_version": kohya_base_version(cfg),
        "ss_v_parameterization": str(cfg.prediction == "v"), "ss_network_train_unet_only": str(not run.text_encoder),
        "ss_caption_dropout_rate": str(ds.opts.caption_dropout), "ss_shuffle_caption": str(ds.opts.shuffle_tags),
        "ss_keep_tokens": str(ds.opts.keep_tags), "ss_flip_aug": str(ds.opts.flip),
        "ss_random_crop": str(ds.opts.random_crop), "ss_output_name": run.out.stem,
        "ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs),
        "ss_training_started_at": str(started), "ss_training_finished_at": str(time.time()),
        "ss_training_comment": "trained with easel train lora",
    }
    if run.conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(run.rank), "conv_alpha": str(run.alpha or run.rank)})
    return meta


def save_trained_lora(run: LoraRun, layers: dict, steps: int, started: float) -> Path:
    """Write the kohya LoRA of the run with its metadata."""
    from easel.weights.lora import save_lora
    meta = {**kohya_metadata(run, steps, started), "easel_kind": "lora",
            "easel_base_model": Path(run.base.source).name, "easel_base_hash": run.base.hash}
    return save_lora(run.out, layers, fmt="kohya", family=family_of(run.base.model.config),
                     config=run.base.model.config, metadata=meta)
