"""`easel train embedding DATA --name NAME --init-word WORD`: textual inversion (Gal et al. 2022).

A new word NAME gets n learned vectors per text encoder, started from the token embeddings of a word the model
knows; everything else stays frozen. Captions are tokenized exactly as a prompt is at inference
(`easel.pipelines.conditioning.tokenize_chunks` with the embedding's name matched by token ids), so the vectors
sit in the slots where generation will put them; a caption that does not name NAME gets "NAME, " in front.

Saved in A1111's format: `.safetensors` with `emb_params` (n, D) (SDXL: `clip_l` and `clip_g`), or on request a
`.pt` holding `string_to_param` (written with torch.save of plain tensors, numbers and strings only, so that
`torch.load(weights_only=True)` and A1111 both read it). Put it in an embeddings folder and use NAME in prompts.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from easel.training.common import DistInfo, LoopConfig, TrainingError, resume_if_same_inputs, step_generator
from easel.training.dataset_folder import UserDataset
from easel.training.lora_train import LR_SCHEDULERS, ScheduledTrainer
from easel.training.user_train import (Latents, NoiseOptions, denoising_loss, encode_text, make_batch,
                                       make_denoiser, save_samples, unet_cond)
from easel.weights.embeddings import SDXL_KEYS, SINGLE, Embedding
from easel.weights.model_io import LoadedModel


class EmbeddingVectors(nn.Module):
    """The trainable (n, D) vectors of each text encoder, started from the init word's token embeddings."""

    def __init__(self, base: LoadedModel, init_word: str, n: int):
        super().__init__()
        vecs = []
        for tok, enc in zip(base.tokenizers, base.model.text_encoders):
            ids = tok.encode(init_word)
            if not ids or not init_word.strip():
                raise TrainingError(f"--init-word {init_word!r} has no tokens: give a word the model knows")
            table = enc.text_model.embeddings.token_embedding.weight.detach()
            rows = torch.tensor([ids[k % len(ids)] for k in range(n)])  # A1111: the init text's vectors, cycled
            vecs.append(nn.Parameter(table[rows].float().clone()))
        self.vectors = nn.ParameterList(vecs)

    def embedding(self, name: str) -> Embedding:
        """The vectors as an `Embedding` (one encoder: '*'; SDXL: clip_l and clip_g)."""
        vs = [v.detach().float().cpu().clone() for v in self.vectors]
        return Embedding(name, {SINGLE: vs[0]} if len(vs) == 1 else dict(zip(SDXL_KEYS, vs)))


class _OneName:
    """A library holding only the embedding being trained (what EmbeddingMatcher asks of a library)."""

    def __init__(self, emb: Embedding):
        self.emb = emb

    def names(self) -> list[str]:
        return [self.emb.name]

    def get(self, name: str) -> Embedding | None:
        return self.emb if name == self.emb.name else None


def name_caption(caption: str, name: str) -> str:
    """The caption with NAME in it: as given when it names NAME, else "NAME, caption"."""
    if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", caption, flags=re.IGNORECASE):
        return caption
    return f"{name}, {caption}" if caption else name


def slot_ids(base: LoadedModel, captions: list[str], emb: Embedding) -> tuple[list[Tensor], list[Tensor]]:
    """Per encoder: ids (B, 77) as inference frames the first chunk, and the slot of each position (-1: none)."""
    from easel.pipelines.conditioning import EmbeddingMatcher, _frame, tokenize_chunks
    ids_all, slots_all = [], []
    for tok, enc in zip(base.tokenizers, base.model.config.text_encoders):
        size = enc.max_position_embeddings - 2
        matcher = EmbeddingMatcher(tok, _OneName(emb))
        rows, slots = [], []
        for cap in captions:
            chunk = tokenize_chunks([(cap, 1.0)], tok, size, matcher)[0]
            ids, _ = _frame(chunk, tok, enc.pad_token_id, size)
            slot = [-1] * len(ids)
            for offset, e in chunk.fixes:
                for k in range(e.num_vectors):
                    slot[1 + offset + k] = k  # after BOS
            rows.append(ids)
            slots.append(slot)
        ids_all.append(torch.tensor(rows))
        slots_all.append(torch.tensor(slots))
    return ids_all, slots_all


def inputs_embeds(base: LoadedModel, vectors: EmbeddingVectors, ids: list[Tensor], slots: list[Tensor]) -> list[Tensor]:
    """Token embeddings (B, 77, D) per encoder with the trainable vectors in their slots (gradients flow to them)."""
    out = []
    for enc, v, x, s in zip(base.model.text_encoders, vectors.vectors, ids, slots):
        table = enc.text_model.embeddings.token_embedding
        plain = table(x.to(table.weight.device))  # (B, T, D), frozen
        learned = v.to(plain)[s.clamp(min=0)]  # (B, T, D)
        out.append(torch.where((s >= 0).to(plain.device)[..., None], learned, plain))
    return out


@dataclass
class EmbeddingRun:
    """Everything `train_embedding` needs."""

    data: UserDataset
    base: LoadedModel
    out: Path
    run_dir: Path
    loop: LoopConfig
    name: str
    init_word: str
    num_vectors: int = 1
    lr_scheduler: str = "constant"
    grad_accum: int = 1
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    sample_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0


def embedding_step(run: EmbeddingRun, vectors: EmbeddingVectors, denoiser, latents: Latents, info: DistInfo,
                   step: int, k: int = 0) -> tuple[Tensor, dict]:
    """Loss of micro-batch k of an optimizer step, on this process's rows of the global batch."""
    if info.main and k == 0 and run.sample_every and step % run.sample_every == 0 and run.sample_prompts:
        _samples(run, vectors, step)
    emb = vectors.embedding(run.name)
    data_step = step * run.grad_accum + k
    batch = make_batch(run.data, latents, data_step, run.loop.batch_size, run.loop.seed, info)
    ids, slots = slot_ids(run.base, [name_caption(c, run.name) for c in batch.captions], emb)
    context, pooled = encode_text(run.base, ids, inputs_embeds(run.base, vectors, ids, slots))
    gen = step_generator(run.loop.seed, data_step, stream=2)
    loss = denoising_loss(run.base, denoiser, batch.latents, unet_cond(run.base, context, pooled, batch), gen,
                          run.noise, batch.rows, batch.total)
    return loss * batch.share(info), {}


def _samples(run: EmbeddingRun, vectors: EmbeddingVectors, step: int) -> None:
    save_samples(run.base, run.sample_prompts, run.run_dir / "samples" / f"step_{step:06d}.png",
                 library={run.name: vectors.embedding(run.name)})


def train_embedding(run: EmbeddingRun, info: DistInfo | None = None) -> dict:
    """Train the vectors, then write the embedding file; returns the run's numbers."""
    _check(run)
    info = info or DistInfo()
    started = time.time()
    latents = Latents(run.base, run.data, run.run_dir / "latents.pt", run.loop.progress)
    vectors = EmbeddingVectors(run.base, run.init_word, run.num_vectors).to(run.base.model.device)
    inputs = {"base_hash": run.base.hash, "base": run.base.source, "name": run.name, "init_word": run.init_word,
              "vectors": run.num_vectors, "batch_size": run.loop.batch_size, "grad_accum": run.grad_accum,
              "data": [[str(it.path), it.caption, it.repeats] for it in run.data.items]}
    loop = resume_if_same_inputs(run.loop, run.run_dir / "inputs.json", inputs, info,
                                 f"[embedding] {run.run_dir / 'checkpoint.pt'} was made for other inputs: "
                                 "starting over")
    trainer = ScheduledTrainer("embedding", run.run_dir, vectors, loop, info, grad_accum=run.grad_accum)
    trainer.scheduler = run.lr_scheduler
    denoiser = make_denoiser(run.base)
    trainer.run(lambda *step: embedding_step(run, vectors, denoiser, latents, info, *step))
    if not info.main:
        return {}
    if run.sample_every and run.sample_prompts:
        _samples(run, vectors, trainer.step)
    path = save_embedding(vectors.embedding(run.name), run.out, trainer.step, run.base)
    records = trainer.log.records() if trainer.log else []
    return {"embedding": str(path), "steps": trainer.step, "vectors": run.num_vectors,
            "first_loss": records[0]["loss"] if records else None,
            "last_loss": records[-1]["loss"] if records else None,
            "minutes": round((time.time() - started) / 60, 2), "run_dir": str(run.run_dir)}


def _check(run: EmbeddingRun) -> None:
    """TrainingError for a name, vector count or schedule that cannot work."""
    if run.lr_scheduler not in LR_SCHEDULERS:
        raise TrainingError(f"--lr-scheduler {run.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    if not 1 <= run.num_vectors <= 75:
        raise TrainingError(f"--vectors must be in 1..75 (got {run.num_vectors})")
    if not re.fullmatch(r"[\w-]+", run.name):
        raise TrainingError(f"--name {run.name!r}: use one word of letters, digits, '_' or '-' "
                            "(it is typed in prompts)")
    if run.grad_accum < 1:
        raise TrainingError(f"--grad-accum must be >= 1 (got {run.grad_accum})")


def save_embedding(emb: Embedding, path: Path, step: int, base: LoadedModel) -> Path:
    """Write A1111's embedding format: .safetensors (`emb_params`, or SDXL's clip_l/clip_g) or .pt."""
    from easel.training.common import save_atomic
    from easel.weights.load import write_safetensors
    path = Path(path)
    meta = {"name": emb.name, "step": str(step), "sd_checkpoint": base.hash,
            "sd_checkpoint_name": Path(base.source).stem if base.source else base.model.config.name}
    if path.suffix == ".pt":
        if SINGLE in emb.vectors:
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": emb.vectors[SINGLE]}}
        else:
            data = dict(emb.vectors)
        save_atomic({**data, "name": emb.name, "step": step, "sd_checkpoint": meta["sd_checkpoint"],
                     "sd_checkpoint_name": meta["sd_checkpoint_name"]}, path)
        return path
    tensors = {"emb_params": emb.vectors[SINGLE]} if SINGLE in emb.vectors else dict(emb.vectors)
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, meta)
    return path
