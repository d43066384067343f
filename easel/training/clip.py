"""Train the CLIP text encoder contrastively (Radford et al. 2021) against a small ViT on ShapeWorld.

Loss: symmetric InfoNCE with a learnable temperature. Image -> text also scores each image against
hard negatives of its own caption (colours/shapes swapped, relation flipped, count +-1), which pushes
the encoder to bind attributes to objects, not just to list words (without them a prototype gave both
objects of two-object prompts one colour).
In-batch captions that say the same thing as the positive are masked, since they are not wrong.

Bilingual (`CaptionMix`): each image's caption is English or Chinese, relation scenes can be drawn more often
than the world's own mix, the relation-flip negative can get a loss of its own (weighted up: position is what
the first model's text tower could not tell), and each caption's twin in the other language is pulled onto it
(MSE of the pooled states), so the UNet meets the same text state whichever language a prompt is in.

The pooled feature is the final-normed hidden state at <|endoftext|>; with the causal mask nothing
after that token matters, so batches are padded only to their longest caption (3-4x less work than 77).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from easel.models.clip import CLIPTextModel
from easel.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from easel.models.configs import CLIPTextConfig
from easel.text.tokenizer import CLIPTokenizer
from easel.training.common import DistInfo, LoopConfig, Trainer, warm_start, write_json
from easel.training.negatives import NEGATIVE_KINDS, caption_key, hard_negatives
from easel.world.captions import caption, parse_caption
from easel.world.dataset import TRAIN_SEEDS, eval_seeds, mixed_scene, scene_language, to_tensor
from easel.world.render import render_array
from easel.world.scenes import sample_scene

MAX_LOGIT_SCALE = math.log(100.0)


class ContrastiveCLIP(nn.Module):
    """Text encoder + image encoder + text projection + temperature: everything the contrastive loss trains."""

    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig):
        super().__init__()
        if text_cfg.projection_dim:
            raise ValueError("train the SD1-layout text encoder (projection_dim=0); the projection lives here")
        self.text = CLIPTextModel(text_cfg)
        self.vision = CLIPVisionModel(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, vision_cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        nn.init.normal_(self.text_projection.weight, std=text_cfg.hidden_size**-0.5)

    def embed_text(self, ids: Tensor) -> Tensor:
        """Token ids (N, T) -> unit-norm embeddings (N, P)."""
        _, pooled = self.text(ids, clip_skip=1, need_pooled=True)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> unit-norm embeddings (B, P)."""
        return F.normalize(self.vision(images), dim=-1)

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def tokenize_short(tok: CLIPTokenizer, texts: list[str]) -> Tensor:
    """Token ids padded to the longest text only (exact for the pooled output of a causal encoder)."""
    rows = [[tok.bos_id, *tok.encode(t)[:75], tok.eos_id] for t in texts]
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [tok.pad_id] * (longest - len(r)) for r in rows], dtype=torch.long)  # (N, T)


def contrastive_loss(img: Tensor, txt: Tensor, neg: Tensor, neg_valid: Tensor, dup: Tensor,
                     scale: Tensor) -> tuple[Tensor, dict]:
    """Symmetric InfoNCE; image i also against its own hard negatives neg[i] (B, K, P) where valid.

    dup (B, B) marks pairs (i, j != i) whose captions are interchangeable: masked out of both directions.
    """
    logits = scale * img @ txt.T  # (B, B): image i vs caption j
    logits = logits.masked_fill(dup, float("-inf"))
    neg_logits = scale * torch.einsum("bp,bkp->bk", img, neg)  # (B, K)
    neg_logits = neg_logits.masked_fill(~neg_valid, float("-inf"))
    target = torch.arange(img.shape[0], device=img.device)
    loss_i2t = F.cross_entropy(torch.cat([logits, neg_logits], dim=1), target)
    loss_t2i = F.cross_entropy(logits.T, target)
    with torch.no_grad():
        pos = logits.diagonal()[:, None]
        beats_neg = ((pos > neg_logits) | ~neg_valid).all(dim=1).float().mean()
        acc = (logits.argmax(dim=1) == target).float().mean()
    return (loss_i2t + loss_t2i) / 2, {"acc_batch": round(float(acc), 4), "acc_hardneg": round(float(beats_neg), 4)}


def duplicate_mask(captions: list[str]) -> Tensor:
    """(B, B) True where j != i and caption j says the same as caption i."""
    keys = [caption_key(parse_caption(c)) for c in captions]
    same = torch.tensor([[a == b for b in keys] for a in keys])
    return same & ~torch.eye(len(keys), dtype=torch.bool)


@dataclass(frozen=True)
class CaptionMix:
    """Which scenes and captions a CLIP batch holds (the defaults are the English-only first model's)."""

    zh_share: float = 0.0  # captions in Chinese
    relation_share: float = 0.0  # scenes drawn as relation scenes (else the world's own mix)
    relation_weight: float = 0.0  # weight of the extra image -> (caption vs its relation flip) loss
    align_weight: float = 0.0  # weight of the MSE between a caption's pooled state and its twin's (other language)

    @property
    def twins(self) -> bool:
        """True when the batch carries each caption's translation."""
        return self.align_weight > 0


BILINGUAL_MIX = CaptionMix(zh_share=0.5, relation_share=0.4, relation_weight=1.0, align_weight=1.0)


@dataclass
class ClipBatch:
    """One step's images, captions and hard negatives (already sliced to this rank)."""

    images: Tensor
    captions: list[str]
    negatives: list[list[str]]  # per image, up to len(NEGATIVE_KINDS)
    dup: Tensor
    twins: list[str] = field(default_factory=list)  # per image, the caption in the other language (or none)
    flip_slot: list[int] = field(default_factory=list)  # per image, index of its relation-flip negative, or -1


def make_batch(step: int, batch: int, size: int, seed: int, info: DistInfo, mix: CaptionMix = CaptionMix()) -> ClipBatch:
    """Render the global batch of `step` (fresh scenes every step) and keep this rank's slice."""
    seeds = [(seed * 7919 + step * batch + i) % TRAIN_SEEDS for i in range(batch)]
    mine = seeds[info.shard(batch)]
    scenes = [mixed_scene(s, mix.relation_share) for s in mine]
    images = torch.stack([to_tensor(render_array(scene, size)) for scene in scenes])  # (b, 3, H, W)
    langs = [scene_language(s, mix.zh_share) for s in mine]
    captions = [caption(scene, s, lang) for scene, s, lang in zip(scenes, mine, langs)]
    twins = [caption(scene, s, "en" if lang == "zh" else "zh") for scene, s, lang in zip(scenes, mine, langs)] \
        if mix.twins else []
    rng = np.random.default_rng([seed, step, info.rank])
    negs = [hard_negatives(c, rng) for c in captions]
    flip_slot = [list(d).index("relation") if "relation" in d else -1 for d in negs]
    return ClipBatch(images, captions, [list(d.values()) for d in negs], duplicate_mask(captions), twins, flip_slot)


def relation_flip_loss(img: Tensor, txt: Tensor, neg: Tensor, flip_slot: list[int], scale: Tensor) -> Tensor | None:
    """Mean cross-entropy of each relation image between its caption and that caption's relation flip
    (neg[i, flip_slot[i]]); None when the batch holds no relation caption."""
    rows = [i for i, k in enumerate(flip_slot) if k >= 0]
    if not rows:
        return None
    r = torch.tensor(rows, device=img.device)
    k = torch.tensor([flip_slot[i] for i in rows], device=img.device)
    pos = (img[r] * txt[r]).sum(-1)  # (R,)
    flip = (img[r] * neg[r, k]).sum(-1)  # (R,)
    logits = scale * torch.stack([pos, flip], dim=1)  # (R, 2): the caption is class 0
    return F.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long, device=img.device))


def clip_step(model: ContrastiveCLIP, tok: CLIPTokenizer, b: ClipBatch, device: torch.device,
              mix: CaptionMix = CaptionMix()) -> tuple[Tensor, dict]:
    """Loss of one batch: one text forward for the captions, all their negatives and their twins."""
    K = len(NEGATIVE_KINDS)
    flat_negs = [n for negs in b.negatives for n in negs]
    ids = tokenize_short(tok, b.captions + flat_negs + b.twins).to(device)
    _, pooled = model.text(ids, clip_skip=1, need_pooled=True)  # (B + sum K_i + twins, D)
    txt_all = F.normalize(model.text_projection(pooled), dim=-1)
    B, n_neg = len(b.captions), len(flat_negs)
    txt, negs_flat = txt_all[:B], txt_all[B:B + n_neg]
    neg = txt.new_zeros(B, K, txt.shape[1])
    valid = torch.zeros(B, K, dtype=torch.bool, device=device)
    offset = 0
    for i, negs in enumerate(b.negatives):
        neg[i, :len(negs)] = negs_flat[offset:offset + len(negs)]
        valid[i, :len(negs)] = True
        offset += len(negs)
    img = model.embed_images(b.images.to(device))
    loss, metrics = contrastive_loss(img, txt, neg, valid, b.dup.to(device), model.scale())
    if mix.relation_weight > 0:
        flip = relation_flip_loss(img, txt, neg, b.flip_slot, model.scale())
        if flip is not None:
            loss = loss + mix.relation_weight * flip
            metrics["flip_loss"] = round(float(flip.detach()), 4)
    if mix.twins:
        align = F.mse_loss(pooled[:B], pooled[B + n_neg:])
        loss = loss + mix.align_weight * align
        metrics["align_mse"] = round(float(align.detach()), 5)
    return loss, {**metrics, "temperature": round(1 / float(model.scale().detach()), 4)}


@torch.no_grad()
def evaluate_clip(model: ContrastiveCLIP, tok: CLIPTokenizer, n: int = 500, size: int = 64,
                  device: torch.device = torch.device("cpu"), lang: str = "en") -> dict:
    """Retrieval on held-out eval scenes (captions in `lang`): the true caption vs each hard negative, and top-1
    among n captions."""
    model.eval()
    seeds = eval_seeds(n)
    scenes = [sample_scene(s) for s in seeds]
    images = torch.stack([to_tensor(render_array(scene, size)) for scene in scenes]).to(device)
    captions = [caption(scene, s, lang) for scene, s in zip(scenes, seeds)]
    img = torch.cat([model.embed_images(images[i:i + 256]) for i in range(0, n, 256)])
    txt = model.embed_text(tokenize_short(tok, captions).to(device))
    rng = np.random.default_rng(1234)
    negs = [hard_negatives(c, rng) for c in captions]
    flat = [n for d in negs for n in d.values()]
    neg_emb = torch.cat([model.embed_text(tokenize_short(tok, flat[i:i + 512]).to(device))
                         for i in range(0, len(flat), 512)])  # (sum K_i, P)
    wins: dict[str, list[bool]] = {k: [] for k in NEGATIVE_KINDS}
    all_beaten, offset = [], 0
    for i, d in enumerate(negs):
        pos = float(img[i] @ txt[i])
        scores = (neg_emb[offset:offset + len(d)] @ img[i]).tolist()
        offset += len(d)
        for kind, s in zip(d, scores):
            wins[kind].append(pos > s)
        if d:
            all_beaten.append(all(pos > s for s in scores))
    sims = (img @ txt.T).masked_fill(duplicate_mask(captions).to(device), float("-inf"))  # (n, n)
    top1 = float((sims.argmax(dim=1) == torch.arange(n, device=device)).float().mean())
    model.train()
    out = {f"hardneg_{k}": round(float(np.mean(v)), 4) for k, v in wins.items() if v}
    return {**out, "hardneg_all": round(float(np.mean(all_beaten)), 4), f"top1_of_{n}": round(top1, 4)}


@dataclass
class ClipRun:
    """What `train_clip` needs besides the loop settings."""

    out: Path
    tokenizer_dir: Path
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval_n: int = 500
    mix: CaptionMix = field(default_factory=CaptionMix)
    init: dict | None = None  # ContrastiveCLIP weights to start from (a warm start); keys it lacks stay fresh
    langs: tuple[str, ...] = ("en",)  # languages the retrieval is evaluated in
    lr_scale: dict[str, float] | None = None  # {parameter name prefix: learning-rate factor}, e.g. {"text.": 0.3}


def train_clip(run: ClipRun, info: DistInfo | None = None) -> dict:
    """Train, then keep raw or EMA weights (better hard-negative retrieval) and save them; -> metrics."""
    info = info or DistInfo()
    tok = CLIPTokenizer.from_dir(run.tokenizer_dir)
    if tok.vocab_size != run.text.vocab_size:
        raise ValueError(f"text config has vocab_size {run.text.vocab_size} but the tokenizer has {tok.vocab_size}")
    torch.manual_seed(run.loop.seed)
    model = ContrastiveCLIP(run.text, run.vision).to(info.device)
    if run.init is not None:
        fresh = warm_start(model, run.init, "CLIP")
        if info.main and fresh:
            print(f"[clip] warm start: {len(fresh)} tensors start fresh ({fresh[0]} ...)", file=sys.stderr)
    trainer = Trainer("clip", run.out, model, run.loop, info, run.lr_scale)
    size = run.vision.image_size
    trainer.run(lambda step: clip_step(model, tok, make_batch(step, run.loop.batch_size, size, run.loop.seed, info,
                                                              run.mix), info.device, run.mix))
    if not info.main:
        return {}
    return _finish(run, trainer, model, tok)


def _finish(run: ClipRun, trainer: Trainer, model: ContrastiveCLIP, tok: CLIPTokenizer) -> dict:
    """Evaluate raw and EMA weights, save the better one as clip.safetensors + text_encoder.safetensors."""
    results = {}
    for name in ("raw", "ema") if trainer.ema else ("raw",):
        model.load_state_dict(trainer.final_weights(name == "ema"))
        results[name] = {}
        for lang in run.langs:  # English keys unprefixed (as the first model's), other languages prefixed
            r = evaluate_clip(model, tok, run.eval_n, run.vision.image_size, trainer.info.device, lang)
            results[name].update({(k if lang == "en" else f"{lang}_{k}"): v for k, v in r.items()})
    key = lambda k: sum(v for m, v in results[k].items() if m.endswith(("hardneg_all", f"top1_of_{run.eval_n}")))  # noqa: E731
    best = max(results, key=key)
    model.load_state_dict(trainer.final_weights(best == "ema"))
    save_clip(model, run.out)
    metrics = {"chosen": best, **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
               "steps": trainer.step}
    write_json(run.out / "metrics.json", metrics)
    return metrics


def save_clip(model: ContrastiveCLIP, out: Path) -> None:
    """clip.safetensors (both towers) and text_encoder.safetensors (HF CLIPTextModel keys, for SD)."""
    out.mkdir(parents=True, exist_ok=True)
    cpu = lambda sd: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}  # noqa: E731
    save_file(cpu(model.state_dict()), str(out / "clip.safetensors"))
    save_file(cpu(model.text.state_dict()), str(out / "text_encoder.safetensors"))


def load_text_encoder(path: str | os.PathLike, cfg: CLIPTextConfig) -> CLIPTextModel:
    """The trained text encoder, strictly loaded."""
    from easel.models.sd import load_strict
    model = CLIPTextModel(cfg)
    load_strict(model, load_file(str(path)), "text encoder")
    return model.eval().requires_grad_(False)
