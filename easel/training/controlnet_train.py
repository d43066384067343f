"""`easel train controlnet`: a layout ControlNet for a ShapeWorld model (Zhang, Rao & Agrawala 2023).

The condition is a layout sketch (`easel.world.sketch`): white blobs on black where the scene's objects are, drawn
roughly (jittered centre, size, squash and a wobbly outline; new jitter every time a scene is drawn), so the
ControlNet learns "an object here, about this big" and the prompt still says what it is. The model's UNet, text
encoder and VAE stay frozen; the ControlNet starts as a copy of the UNet's encoder with zero convolutions (it changes
nothing at step 0) and learns the model's own denoising loss (eps, min-SNR-5, 10% empty captions) with its residuals
added to the UNet's skips. Scenes are rendered and encoded once (`controlnet_latents.pt`, rebuilt when the model or
the scene mix changes); a killed run resumes from `checkpoint.pt`.

Result: `<out>/<name>.safetensors` in the ControlNet 1.1 layout (`control_model.` keys; any easel ControlNet loader
reads it), and `metrics.json` with the held-out denoising loss with and without the sketch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from easel.models.controlnet import ControlNet, ControlNetConfig
from easel.training.common import (DistInfo, LoopConfig, Trainer, TrainingError, load_checkpoint, save_atomic,
                                   write_json)
from easel.training.unet import LatentBatches, encode_dataset, make_denoiser, sample_inputs
from easel.weights.model_io import LoadedModel
from easel.world.sketch import draw_blobs

CACHE_VERSION = 1
CONDITION = "layout sketch: white blobs on black where objects go (preprocessor none)"


class ControlledUNet(nn.Module):
    """The frozen UNet with the ControlNet's residuals: what the denoiser wraps while training."""

    def __init__(self, unet: nn.Module, controlnet: ControlNet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor | None = None) -> Tensor:
        """eps for latents x at timesteps t; hint (B, 3, H, W) in [0, 1], None = the UNet alone."""
        control = None if hint is None else self.controlnet(x, hint, t, context)
        return self.unet(x, t, context, control=control)


def controlnet_from_unet(base: LoadedModel) -> ControlNet:
    """A fresh ControlNet for the model: its encoder copied from the UNet, zero convs and hint output zero."""
    net = ControlNet(ControlNetConfig.for_model(base.model.config))
    unet_sd, own = base.model.unet.state_dict(), net.state_dict()
    copied = {k: unet_sd[k] for k, v in own.items() if k in unet_sd and unet_sd[k].shape == v.shape}
    net.load_state_dict(copied, strict=False)
    return net


# --- data ------------------------------------------------------------------------------------------

def load_or_build_cache(path: Path, base: LoadedModel, n: int, n_val: int, relation_share: float,
                        progress: bool) -> dict:
    """Latents, token ids and object places of n training and n_val held-out scenes (cached at `path`)."""
    from easel.world.dataset import eval_seeds
    key = {"version": CACHE_VERSION, "model": base.hash, "n": n, "n_val": n_val, "relation_share": relation_share,
           "size": base.model.config.default_size}
    if path.exists():
        cache = load_checkpoint(path)
        if cache.get("key") == key:
            return cache
        print(f"[controlnet] {path} was made for another model or scene mix: encoding again", file=sys.stderr)
    vae, tok, size = base.model.vae, base.tokenizers[0], base.model.config.default_size
    cache = {"key": key,
             "train": encode_dataset(vae, tok, list(range(n)), size, progress=progress, relation_share=relation_share,
                                     with_objects=True),
             "val": encode_dataset(vae, tok, eval_seeds(n_val), size, captions_per_image=1, progress=progress,
                                   with_objects=True)}
    save_atomic(cache, path)
    return cache


def hints(places: Tensor, size: int, seed: int, step: int) -> Tensor:
    """Layout sketches (B, 3, size, size) in [0, 1] for object places (B, K, 3); new jitter every step."""
    rng = np.random.default_rng([seed, step, 0x5CE7C4])
    mask = torch.from_numpy(draw_blobs(places.numpy(), size, rng))
    return mask[:, None].expand(-1, 3, -1, -1).contiguous()


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class ControlRun:
    """What `train_controlnet` needs besides the loop settings."""

    out: Path
    base: LoadedModel
    data: dict
    loop: LoopConfig
    name: str = "shapeworld-layout"
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0


def _context(base: LoadedModel, ids: Tensor) -> Tensor:
    """The frozen text encoder's states for token ids (B, 77)."""
    cfg = base.model.config
    with torch.no_grad():
        context, _ = base.model.text_encoders[0](ids, clip_skip=cfg.clip_skip, final_norm=cfg.text_final_norm)
    return context.float()


def control_step(run: ControlRun, denoiser, batches: LatentBatches, places: Tensor, empty_ids: Tensor, step: int,
                 info: DistInfo) -> tuple[Tensor, dict]:
    """Loss of one step on this rank's slice of the global batch."""
    idx, paraphrase, drop, sigma, noise = sample_inputs(run, step, batches, denoiser.schedule)
    size = run.base.model.config.default_size
    hint = hints(places[idx], size, run.loop.seed, step)
    mine = info.shard(run.loop.batch_size)
    idx, paraphrase, drop, sigma, noise, hint = (v[mine] for v in (idx, paraphrase, drop, sigma, noise, hint))
    ids = batches.ids[idx, paraphrase].long()
    ids[drop] = empty_ids
    x0 = batches.latents[idx].float()
    loss = denoiser.loss(x0, noise, sigma, min_snr_gamma=run.min_snr_gamma, context=_context(run.base, ids),
                         hint=hint)
    return loss, {}


@torch.no_grad()
def validation_losses(run: ControlRun, denoiser, seed: int = 99) -> dict[str, float]:
    """Held-out denoising loss (unweighted, 8 timestep bands, fixed noise and sketches) with and without the sketch."""
    val = run.data["val"]
    n, T, size = len(val["latents"]), denoiser.schedule.num_timesteps, run.base.model.config.default_size
    gen = torch.Generator().manual_seed(seed)
    hint = hints(val["objects"], size, seed, 0)
    totals = {"with_sketch": 0.0, "without_sketch": 0.0}
    for band in range(8):
        t = torch.randint(band * T // 8, (band + 1) * T // 8, (n,), generator=gen)
        noise = torch.randn(val["latents"].shape, generator=gen)
        for i in range(0, n, 128):
            sl = slice(i, i + 128)
            context, x0, sigma = _context(run.base, val["ids"][sl, 0].long()), val["latents"][sl].float(), \
                denoiser.schedule.sigmas[t[sl]]
            for key, h in (("with_sketch", hint[sl]), ("without_sketch", None)):
                totals[key] += float(denoiser.loss(x0, noise[sl], sigma, reduce=False, context=context,
                                                   hint=h).sum())
    return {k: round(v / (8 * n), 5) for k, v in totals.items()}


def save_controlnet(weights: dict[str, Tensor], path: Path, base: LoadedModel) -> Path:
    """The ControlNet as a ControlNet 1.1 file (`control_model.` keys) with what it is for in the metadata."""
    from easel.weights.load import write_safetensors
    sd = {f"control_model.{k}": v.float().cpu().contiguous() for k, v in weights.items()}
    meta = {"kind": "controlnet", "condition": CONDITION, "base_model": base.name, "base_model_hash": base.hash}
    write_safetensors(sd, path, meta)
    return path


def train_controlnet(run: ControlRun, info: DistInfo | None = None) -> dict:
    """Train; write <name>.safetensors (EMA or raw, whichever has the lower held-out loss) and metrics.json."""
    info = info or DistInfo()
    torch.manual_seed(run.loop.seed)
    base = run.base
    unet = base.model.unet.float().eval().requires_grad_(False)
    base.model.text_encoders.float().eval().requires_grad_(False)
    net = controlnet_from_unet(base).train()
    denoiser = make_denoiser(ControlledUNet(unet, net), base.model.config)
    batches = LatentBatches(run.data["train"], run.loop.batch_size, run.loop.seed)
    places = run.data["train"]["objects"]
    trainer = Trainer("controlnet", run.out, net, run.loop, info)
    empty_ids = base.tokenizers[0]([""], max_length=77)[0]  # the unconditional caption's token ids
    trainer.run(lambda step: control_step(run, denoiser, batches, places, empty_ids, step, info))
    if not info.main:
        return {}
    net.eval()
    metrics: dict = {"steps": trainer.step, "samples_seen": trainer.step * run.loop.batch_size}
    kinds = ("raw", "ema") if trainer.ema else ("raw",)
    weights = {k: trainer.final_weights(k == "ema") for k in kinds}
    for k in kinds:
        net.load_state_dict(weights[k])
        metrics[f"{k}_val_loss"] = validation_losses(run, denoiser)
    chosen = min(kinds, key=lambda k: metrics[f"{k}_val_loss"]["with_sketch"])
    metrics["chosen"] = chosen
    path = save_controlnet(weights[chosen], run.out / f"{run.name}.safetensors", base)
    metrics["file"] = str(path)
    write_json(run.out / "metrics.json", metrics)
    return metrics


def run_from_args(args: argparse.Namespace, info: DistInfo) -> dict:
    """`easel train controlnet`: load the model, build or read the scene cache, train."""
    from easel.training.common import barrier
    from easel.training.controlnet_cli import loop_from_args
    from easel.weights.model_io import load_model
    from easel.weights.registry import resolve_model
    loop = loop_from_args(args)
    base = load_model(resolve_model(args.model))
    if base.model.config.default_size is None or len(base.model.config.text_encoders) != 1:
        raise TrainingError("easel train controlnet trains layout ControlNets for ShapeWorld models (the built-in "
                            "one or one made by `easel train all`); other models have no ShapeWorld to learn from")
    out = Path(args.out)
    cache = out / "controlnet_latents.pt"
    n_val = min(512, max(8, args.scenes // 50))  # held-out scenes for the loss with and without sketches
    if info.main:  # rank 0 encodes; the others read its cache
        data = load_or_build_cache(cache, base, args.scenes, n_val, args.relation_share, args.progress)
    barrier(info)
    if not info.main:
        data = load_or_build_cache(cache, base, args.scenes, n_val, args.relation_share, False)
    run = ControlRun(out, base, data, loop, args.name, args.caption_dropout)
    return train_controlnet(run, info)
