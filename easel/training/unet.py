"""Train the denoising UNet (Ho et al. 2020; latent diffusion, Rombach et al. 2022) on cached VAE latents.

Images are rendered and encoded once (posterior mean, scaled) and cached with their captions' token
ids; the cache is rebuilt whenever the VAE file or the tokenizer changes. The frozen CLIP text encoder
runs on the fly (no grad): it is small, and a cache of 77 x 128 states per caption would not fit.

Objective: eps-prediction (or v) with min-SNR-5 loss weights (Hang et al. 2023), uniform integer
timesteps, 10% empty captions so that classifier-free guidance works (Ho & Salimans 2022).

Bilingual caches hold each scene's caption in every language of `langs` (paraphrase r is in langs[r % len]), and
can draw relation scenes more often than the world does (`relation_share`): relations are learnt last.
A warm start (`UnetRun.init`) continues from another model's UNet instead of fresh weights, also into a UNet
with attention at other levels (the blocks both have are kept, new ones start as identities). With
`text_lr_scale` the text encoder trains with the UNet (as Imagen's and the prototype's did): the diffusion loss
teaches it what the UNet needs from the words (which object a relation puts left), which contrastive CLIP
training alone did not.
"""
from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from easel.models.clip import CLIPTextModel
from easel.models.configs import ModelConfig
from easel.models.unet import UNetModel
from easel.samplers.denoisers import DiscreteSchedule, EpsDenoiser, VDenoiser, make_alphas_cumprod
from easel.text.tokenizer import CLIPTokenizer
from easel.training.common import (DistInfo, LoopConfig, Trainer, TrainingError, load_checkpoint, save_atomic,
                                   step_generator, warm_start, write_json)
from easel.world.dataset import TRAIN_SEEDS, eval_seeds

CACHE_VERSION = 2


def file_digest(*paths: Path) -> str:
    """sha256 over files' bytes: the cache key of the VAE and tokenizer a latent cache was made with."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(vae, tok: CLIPTokenizer, seeds: list[int], size: int = 64, captions_per_image: int = 2,
                   chunk: int = 256, progress: bool = True, langs: tuple[str, ...] = ("en",),
                   relation_share: float = 0.0, with_objects: bool = False) -> dict:
    """Render and encode scenes: latents (N, C, h, w) fp16 (scaled), token ids (N, R, 77) int32, captions; with
    `with_objects` also the objects' places (N, 5, 3) = (cx, cy, r) for layout sketches."""
    from tqdm import tqdm

    from easel.world.captions import caption
    from easel.world.dataset import mixed_scene, to_tensor
    from easel.world.render import render_array
    from easel.world.sketch import objects_array
    latents, ids, captions, places = [], [], [], []
    for i in tqdm(range(0, len(seeds), chunk), desc="encode latents", disable=not progress, file=sys.stderr):
        batch = seeds[i:i + chunk]
        scenes = [mixed_scene(s, relation_share) for s in batch]
        x = torch.stack([to_tensor(render_array(scene, size)) for scene in scenes])  # (b, 3, H, W)
        latents.append(vae.encode_latents(x).half())
        # Paraphrase r of a scene is the caption of seed + r * TRAIN_SEEDS (as ShapeWorldDataset rounds).
        caps = [[caption(scene, s + r * TRAIN_SEEDS, langs[r % len(langs)]) for r in range(captions_per_image)]
                for scene, s in zip(scenes, batch)]
        flat = [c for row in caps for c in row]
        ids.append(tok(flat, max_length=77).to(torch.int32).view(len(batch), captions_per_image, 77))
        captions += caps
        places += [objects_array(scene.objects) for scene in scenes]
    out = {"latents": torch.cat(latents), "ids": torch.cat(ids), "captions": captions}
    if with_objects:
        out["objects"] = torch.from_numpy(np.stack(places))
    return out


def load_or_build_cache(path: Path, vae_path: Path, tok_dir: Path, n_train: int, n_val: int, size: int,
                        progress: bool = True, langs: tuple[str, ...] = ("en",), relation_share: float = 0.0) -> dict:
    """The latent cache at `path`, rebuilt when missing or made with another VAE/tokenizer/size/caption mix."""
    from easel.training.vae import load_vae
    key = {"version": CACHE_VERSION, "vae": file_digest(vae_path),
           "tokenizer": file_digest(tok_dir / "vocab.json", tok_dir / "merges.txt"),
           "n_train": n_train, "n_val": n_val, "size": size, "langs": list(langs), "relation_share": relation_share}
    if path.exists():
        cache = load_checkpoint(path)
        if cache.get("key") == key:
            return cache
        print(f"[unet] latent cache {path} is stale (VAE, tokenizer or size changed): re-encoding", file=sys.stderr)
    vae, tok = load_vae(vae_path), CLIPTokenizer.from_dir(tok_dir)
    cache = {"key": key, "scale_factor": vae.config.scale_factor,
             "train": encode_dataset(vae, tok, list(range(n_train)), size, captions_per_image=max(2, len(langs)),
                                     progress=progress, langs=langs, relation_share=relation_share),
             "val": encode_dataset(vae, tok, eval_seeds(n_val), size, captions_per_image=1, progress=progress)}
    save_atomic(cache, path)
    return cache


class LatentBatches:
    """Global batch of a step = the next `batch` positions of an endless sequence of epoch permutations."""

    def __init__(self, data: dict, batch: int, seed: int):
        self.latents, self.ids = data["latents"], data["ids"]
        self.n, self.batch, self.seed = len(self.latents), batch, seed

    @lru_cache(maxsize=2)
    def _perm(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=step_generator(self.seed, epoch, stream=7))

    def indices(self, step: int) -> Tensor:
        """Dataset indices of the step's global batch (a function of the step alone: exact resume)."""
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        out = torch.empty(self.batch, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos.div(self.n, rounding_mode="floor") == epoch
            out[sel] = self._perm(epoch)[pos[sel] % self.n]
        return out


def make_denoiser(unet: UNetModel, cfg: ModelConfig):
    """The eps/v wrapper of the model's prediction type over its training schedule."""
    schedule = DiscreteSchedule(make_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                                    cfg.beta_schedule))
    return (VDenoiser if cfg.prediction == "v" else EpsDenoiser)(unet, schedule)


@dataclass
class UnetRun:
    """What `train_unet` needs besides the loop settings."""

    out: Path
    model: ModelConfig  # the full model config: UNet, text encoder, schedule, prediction
    text_encoder: CLIPTextModel
    empty_ids: Tensor  # (77,) token ids of the empty caption (the unconditional input)
    data: dict  # the cache from `load_or_build_cache`
    loop: LoopConfig = field(default_factory=LoopConfig)
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    init: dict | None = None  # UNet weights to start from; a grown UNet's extra blocks keep their (identity) init
    text_lr_scale: float | None = None  # train the text encoder too, at this fraction of the UNet's learning rate
    ground_weight: float = 0.0  # weight of the token-grounding loss (easel.training.grounding); 0: off
    grounding: dict | None = None  # its cache: object masks and token bitmasks of the training scenes


class UNetAndText(nn.Module):
    """The UNet and the text encoder as one trainable module (joint training: one optimizer, one EMA)."""

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


_UPSAMPLE = re.compile(r"^(output_blocks\.\d+)\.(\d+)\.conv\.(weight|bias)$")


def regrow_unet_weights(weights: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """`weights` renamed for a UNet with attention at other levels: an up block's upsampler sits after its
    transformer, so adding or removing that transformer moves `output_blocks.I.J.conv` to another J."""
    out = {}
    for key, value in weights.items():
        m = _UPSAMPLE.match(key)
        if m and key not in own:
            moved = [f"{m[1]}.{j}.conv.{m[3]}" for j in range(1, 4)]
            key = next((k for k in moved if k in own and k not in weights and own[k].shape == value.shape), key)
        out[key] = value
    return out


def sample_inputs(run: UnetRun, step: int, batches: LatentBatches, schedule: DiscreteSchedule):
    """The global batch of a step: dataset indices, paraphrase choice, dropout, timesteps and noise."""
    B = run.loop.batch_size
    gen = step_generator(run.loop.seed, step)
    idx = batches.indices(step)
    paraphrase = torch.randint(0, batches.ids.shape[1], (B,), generator=gen)
    drop = torch.rand(B, generator=gen) < run.caption_dropout
    t = torch.randint(0, schedule.num_timesteps, (B,), generator=gen)
    noise = torch.randn(B, *batches.latents.shape[1:], generator=gen)
    return idx, paraphrase, drop, schedule.sigmas[t], noise


def unet_step(run: UnetRun, denoiser, batches: LatentBatches, step: int, info: DistInfo) -> tuple[Tensor, dict]:
    """Loss of one step on this rank's slice of the global batch."""
    idx, paraphrase, drop, sigma, noise = sample_inputs(run, step, batches, denoiser.schedule)
    mine = info.shard(run.loop.batch_size)
    idx, paraphrase, drop, sigma, noise = idx[mine], paraphrase[mine], drop[mine], sigma[mine], noise[mine]
    ids = batches.ids[idx, paraphrase].long()  # (b, 77)
    ids[drop] = run.empty_ids
    with torch.set_grad_enabled(run.text_lr_scale is not None):
        context, _ = run.text_encoder(ids.to(info.device), clip_skip=run.model.clip_skip,
                                      final_norm=run.model.text_final_norm)
    x0 = batches.latents[idx].float().to(info.device)
    if not run.ground_weight:
        return denoiser.loss(x0, noise.to(info.device), sigma.to(info.device), min_snr_gamma=run.min_snr_gamma,
                             context=context.float()), {}
    from easel.training.grounding import AttentionTap, grounding_loss
    bits = run.grounding["tokens"][idx, paraphrase].to(info.device)
    bits[drop] = 0  # an empty caption names nothing
    with AttentionTap(denoiser) as tap:
        loss = denoiser.loss(x0, noise.to(info.device), sigma.to(info.device), min_snr_gamma=run.min_snr_gamma,
                             context=context.float())
    ground = grounding_loss(tap.maps, bits, run.grounding["masks"][idx].to(info.device))
    return loss + run.ground_weight * ground, {"ground": float(ground.detach())}


@torch.no_grad()
def validation_loss(run: UnetRun, denoiser, n: int | None = None, seed: int = 99) -> float:
    """Unweighted denoising loss on held-out latents at fixed noise, stratified over 8 timestep bands."""
    val = run.data["val"]
    n = min(n or len(val["latents"]), len(val["latents"]))
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    T = denoiser.schedule.num_timesteps
    dev = next(run.text_encoder.parameters()).device
    for band in range(8):
        t = torch.randint(band * T // 8, (band + 1) * T // 8, (n,), generator=gen)
        noise = torch.randn(n, *val["latents"].shape[1:], generator=gen)
        for i in range(0, n, 128):
            ids = val["ids"][i:i + 128, 0].long().to(dev)
            context, _ = run.text_encoder(ids, clip_skip=run.model.clip_skip, final_norm=run.model.text_final_norm)
            x0 = val["latents"][i:i + 128].float().to(dev)
            sigma = denoiser.schedule.sigmas[t[i:i + 128]].to(dev)
            total += float(denoiser.loss(x0, noise[i:i + 128].to(dev), sigma, reduce=False, context=context).sum())
    return total / (8 * n)


def train_unet(run: UnetRun, info: DistInfo | None = None) -> dict:
    """Train; save raw and EMA weights (unet_raw / unet_ema .safetensors) and their validation losses."""
    info = info or DistInfo()
    if run.model.unet.context_dim != run.text_encoder.config.hidden_size:
        raise TrainingError(f"UNet context_dim {run.model.unet.context_dim} != text encoder width "
                            f"{run.text_encoder.config.hidden_size}")
    torch.manual_seed(run.loop.seed)
    unet = UNetModel(run.model.unet).to(info.device)
    if run.init is not None:
        own = unet.state_dict()
        init = regrow_unet_weights(run.init, own)
        dropped = sorted(set(init) - set(own))
        fresh = warm_start(unet, init, "UNet", drop_missing=True)
        if info.main and (fresh or dropped):
            print(f"[unet] warm start: {len(fresh)} tensors start fresh, {len(dropped)} of the old UNet's have no "
                  f"place in this one", file=sys.stderr)
    joint = run.text_lr_scale is not None
    run.text_encoder.to(info.device).eval().requires_grad_(joint)
    denoiser = make_denoiser(unet, run.model)
    batches = LatentBatches(run.data["train"], run.loop.batch_size, run.loop.seed)
    trained = UNetAndText(unet, run.text_encoder) if joint else unet
    trainer = Trainer("unet", run.out, trained, run.loop, info,
                      lr_scale={"text_encoder.": run.text_lr_scale} if joint else None)
    trainer.run(lambda step: unet_step(run, denoiser, batches, step, info))
    if not info.main:
        return {}
    trained.eval()
    metrics = {"steps": trainer.step, "samples_seen": trainer.step * run.loop.batch_size}
    for name in ("raw", "ema") if trainer.ema else ("raw",):
        weights = trainer.final_weights(name == "ema")
        trained.load_state_dict(weights)
        metrics[f"{name}_val_loss"] = round(validation_loss(run, denoiser), 5)
        save_weights(weights, run.out, name, joint)
    metrics["chosen_by_val_loss"] = min(("raw", "ema") if trainer.ema else ("raw",),
                                        key=lambda k: metrics[f"{k}_val_loss"])
    write_json(run.out / "metrics.json", metrics)
    return metrics


def save_weights(weights: dict[str, Tensor], out: Path, name: str, joint: bool) -> None:
    """unet_NAME.safetensors, and with joint training text_encoder_NAME.safetensors beside it."""
    cpu = {k: v.float().cpu().contiguous() for k, v in weights.items()}
    if not joint:
        save_file(cpu, str(out / f"unet_{name}.safetensors"))
        return
    for part in ("unet", "text_encoder"):
        sub = {k[len(part) + 1:]: v for k, v in cpu.items() if k.startswith(part + ".")}
        save_file(sub, str(out / f"{part}_{name}.safetensors"))
