"""`easel train finetune DATA --out FILE`: fine-tune the UNet (and optionally the text encoders) of any loaded
model on a user's images; EMA optional; DreamBooth's prior preservation optional (Ruiz et al. 2023).

The loss is `easel train lora`'s (the model's own eps/v denoising loss, min-SNR, noise offset) on the whole UNet.
Prior preservation keeps the model's idea of the class: before training, the model itself draws `--class-images`
pictures of `--class-prompt` (saved in the run folder, made once and reused after a restart), and every step adds
their denoising loss, weighted by `--prior-weight`, to the data loss, so that "a photo of sks dog" learns the dog
while "a photo of a dog" stays what it was. The VAE never trains (its latents are cached); the result is the whole
model, as one `.safetensors` or a diffusers folder (`--to diffusers`), its metadata naming the base and the data.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from easel.training.common import (DistInfo, LoopConfig, TrainingError, barrier, resume_if_same_inputs,
                                   step_generator)
from easel.training.dataset_folder import UserDataset
from easel.training.lora_train import LR_SCHEDULERS, ScheduledTrainer
from easel.training.user_train import (Batch, Latents, NoiseOptions, TextCache, denoising_loss, encode_text,
                                       gradient_checkpointing, make_batch, make_denoiser, rank_rows, save_samples,
                                       token_ids, unet_cond)
from easel.weights.model_io import LoadedModel


@dataclass(frozen=True)
class PriorOptions:
    """DreamBooth's prior preservation: class images the model draws itself, and the weight of their loss."""

    class_prompt: str
    count: int = 50
    weight: float = 1.0
    steps: int = 20  # sampler steps per class image


@dataclass
class FinetuneRun:
    """Everything `train_finetune` needs."""

    data: UserDataset
    base: LoadedModel
    out: Path  # the model to write (.safetensors, or a folder with to="diffusers")
    run_dir: Path
    loop: LoopConfig
    text_encoder: bool = False
    lr_scheduler: str = "constant"
    grad_accum: int = 1
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    prior: PriorOptions | None = None
    gradient_checkpointing: bool = False
    to: str = "single-file"
    sample_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0


class Trainable(nn.Module):
    """The parts of a model that train: its UNet, and its text encoders when asked (the VAE never)."""

    def __init__(self, model: nn.Module, text_encoder: bool):
        super().__init__()
        self.unet = model.unet.requires_grad_(True)
        if text_encoder:
            self.text_encoders = nn.ModuleList(model.text_encoders).requires_grad_(True)


def class_images(run: FinetuneRun) -> list[Path]:
    """The prior's class images, drawn by the base model with fixed seeds; those already in the run folder are kept
    (a restart draws only the missing ones)."""
    from tqdm import tqdm

    from easel.pipelines.metadata import save_png
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    folder = run.run_dir / "class_images"
    paths = [folder / f"{k:04d}.png" for k in range(run.prior.count)]
    missing = [k for k, p in enumerate(paths) if not p.exists()]
    if missing:
        pipe = Pipeline(run.base)
        for k in tqdm(missing, desc="class images", unit="image", disable=not run.loop.progress):
            req = GenerationRequest(prompt=run.prior.class_prompt, seed=run.loop.seed * 100003 + k,
                                    steps=run.prior.steps, batch_size=1)
            result = pipe.generate(req)[0]
            save_png(result.image, paths[k], result.params)
    return paths


class ClassLatents:
    """The class images' VAE latents (one size: the model's default), batched by step like the data."""

    def __init__(self, base: LoadedModel, paths: list[Path]):
        from PIL import Image

        from easel.pipelines.common import encode
        self.prompt_count = len(paths)
        with torch.no_grad():
            self.latents = torch.cat([encode(base.model, [Image.open(p).convert("RGB")]).float().cpu()
                                      for p in paths])  # (N, C, h, w)

    def batch(self, data_step: int, batch_size: int, seed: int, prompt: str, info: DistInfo) -> Batch:
        """This process's rows of a seeded batch of class latents, all captioned with the class prompt."""
        gen = step_generator(seed, data_step, stream=3)
        rows = rank_rows(batch_size, info)
        idx = torch.randint(0, len(self.latents), (batch_size,), generator=gen)[rows]
        h, w = self.latents.shape[-2:]
        return Batch(self.latents[idx], [prompt] * len(idx), [(h, w, 0, 0)] * len(idx), rows, batch_size)


def batch_loss(run: FinetuneRun, denoiser, batch: Batch, gen: torch.Generator, info: DistInfo,
               texts: TextCache | None) -> Tensor:
    """This process's part of the global mean denoising loss of a batch (text from `texts` when the text encoders
    are frozen, else encoded with gradients)."""
    if texts is not None:
        context, pooled = texts.encode(batch.captions)
    else:
        context, pooled = encode_text(run.base, token_ids(run.base, batch.captions))
    loss = denoising_loss(run.base, denoiser, batch.latents, unet_cond(run.base, context, pooled, batch), gen,
                          run.noise, batch.rows, batch.total)
    return loss * batch.share(info)


def finetune_step(run: FinetuneRun, denoiser, latents: Latents, prior: ClassLatents | None, info: DistInfo,
                  step: int, k: int = 0, texts: TextCache | None = None) -> tuple[Tensor, dict]:
    """Loss of micro-batch k of an optimizer step (data, plus the weighted prior), on this process's rows."""
    if info.main and k == 0 and run.sample_every and step % run.sample_every == 0 and run.sample_prompts:
        save_samples(run.base, run.sample_prompts, run.run_dir / "samples" / f"step_{step:06d}.png")
    data_step = step * run.grad_accum + k
    gen = step_generator(run.loop.seed, data_step, stream=2)
    data = batch_loss(run, denoiser, make_batch(run.data, latents, data_step, run.loop.batch_size, run.loop.seed,
                                                info), gen, info, texts)
    if prior is None:
        return data, {"data_loss": float(data.detach())}
    cls = prior.batch(data_step, run.loop.batch_size, run.loop.seed, run.prior.class_prompt, info)
    prior_loss = batch_loss(run, denoiser, cls, gen, info, texts)
    return data + run.prior.weight * prior_loss, {"data_loss": float(data.detach()),
                                                  "prior_loss": float(prior_loss.detach())}


def check_run(run: FinetuneRun) -> None:
    """TrainingError naming the flag when a setting cannot work."""
    if run.lr_scheduler not in LR_SCHEDULERS:
        raise TrainingError(f"--lr-scheduler {run.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    if run.grad_accum < 1:
        raise TrainingError(f"--grad-accum must be >= 1 (got {run.grad_accum})")
    if run.to not in ("single-file", "diffusers"):
        raise TrainingError(f"--to {run.to!r}: choose single-file or diffusers")
    if run.to == "single-file" and run.out.suffix != ".safetensors":
        raise TrainingError(f"--out {run.out} must end in .safetensors (or use --to diffusers for a folder)")
    if run.prior is not None and (run.prior.count < 1 or run.prior.weight < 0 or not run.prior.class_prompt.strip()):
        raise TrainingError("prior preservation needs --class-prompt, --class-images >= 1 and --prior-weight >= 0")


def train_finetune(run: FinetuneRun, info: DistInfo | None = None) -> dict:
    """Fine-tune, then write the whole model (EMA weights where --ema-decay is set); returns the run's numbers."""
    from easel.training.common import write_json
    check_run(run)
    info = info or DistInfo()
    started = time.time()
    if run.prior and info.main:
        class_images(run)  # drawn once, by the first process
    barrier(info)
    prior = ClassLatents(run.base, class_images(run)) if run.prior else None
    latents = Latents(run.base, run.data, run.run_dir / "latents.pt", run.loop.progress)
    trainable = Trainable(run.base.model, run.text_encoder)
    trainer = ScheduledTrainer("finetune", run.run_dir, trainable, _guard_resume(run, info), info,
                               grad_accum=run.grad_accum)
    trainer.scheduler = run.lr_scheduler
    denoiser = make_denoiser(run.base)
    run.base.model.unet.train()
    keep = gradient_checkpointing(run.base.model.unet) if run.gradient_checkpointing else contextlib.nullcontext()
    texts = None if run.text_encoder else TextCache(run.base, run.run_dir / "text.pt")
    try:
        with keep:
            trainer.run(lambda step, k=0: finetune_step(run, denoiser, latents, prior, info, step, k, texts))
        if texts is not None and info.main:
            texts.save()
    finally:
        run.base.model.eval().requires_grad_(False)
    trainable.load_state_dict(trainer.final_weights(trainer.ema is not None))
    if not info.main:
        return {}
    if run.sample_every and run.sample_prompts:
        save_samples(run.base, run.sample_prompts, run.run_dir / "samples" / f"step_{trainer.step:06d}.png")
    path = save_finetuned(run, trainer.step)
    records = trainer.log.records() if trainer.log else []
    metrics = {"model": str(path), "steps": trainer.step, "ema": trainer.ema is not None,
               "first_loss": records[0]["loss"] if records else None,
               "last_loss": records[-1]["loss"] if records else None,
               "minutes": round((time.time() - started) / 60, 2), "run_dir": str(run.run_dir)}
    write_json(run.run_dir / "result.json", metrics)
    return metrics


def _guard_resume(run: FinetuneRun, info: DistInfo) -> LoopConfig:
    """Resume only a checkpoint of the same base model, data and trained parts."""
    inputs = {"base_hash": run.base.hash, "text_encoder": run.text_encoder, "grad_accum": run.grad_accum,
              "batch_size": run.loop.batch_size, "seed": run.loop.seed, "ema": run.loop.ema_decay,
              "prior": None if run.prior is None else [run.prior.class_prompt, run.prior.count, run.prior.weight],
              "data": [[str(it.path), it.caption, it.repeats] for it in run.data.items]}
    return resume_if_same_inputs(run.loop, run.run_dir / "inputs.json", inputs, info,
                                 f"[finetune] {run.run_dir / 'checkpoint.pt'} was made for another model, data or "
                                 "settings: starting over")


def save_finetuned(run: FinetuneRun, steps: int) -> Path:
    """Write the fine-tuned model as the base's kind of file, with metadata naming the base and the data."""
    import json

    from easel.weights.model_io import LoadedModel as Loaded, save_model
    meta = {"easel_kind": "finetune", "easel_base_model": Path(run.base.source).name, "easel_base_hash": run.base.hash,
            "easel_training": json.dumps({"steps": steps, "data": str(run.data.root), "images": len(run.data.items),
                                          "text_encoder": run.text_encoder, "lr": run.loop.lr,
                                          "ema_decay": run.loop.ema_decay,
                                          "prior": None if run.prior is None else run.prior.class_prompt})}
    return save_model(Loaded(run.base.model, run.base.tokenizers, run.base.source, ""), run.out, to=run.to,
                      extra_metadata=meta)
