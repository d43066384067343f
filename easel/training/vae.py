"""Train the VAE (AutoencoderKL, Kingma & Welling 2014; the SD first stage) on ShapeWorld renders.

Reconstruction loss is L1 + MSE, weighted `object_weight` times more on object pixels: most pixels
are flat grey, and an unweighted loss happily returns small stars, crosses and diamonds as blobs
(measured on a prototype: 36 dB PSNR overall but 25.7 dB on object pixels; 5x weight on them raised
the judge's ceiling for two-object scenes from 0.47 to 0.68). A very small KL term keeps the latent space smooth.

After training, latents are standardised per channel. VAEConfig holds one scalar scale, so the
per-channel mean and relative scale are folded exactly into the 1x1 `quant_conv` / `post_quant_conv`
(linear maps on either side of the latent), and the remaining global 1/std goes into `scale_factor`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from easel.models.configs import VAEConfig
from easel.models.vae import AutoencoderKL
from easel.training.common import DistInfo, LoopConfig, Trainer, step_generator, write_json
from easel.world.dataset import TRAIN_SEEDS, eval_seeds, render_batch

OBJECT_THRESHOLD = 0.1  # in [-1, 1] units (~13 grey levels): far above the render noise (std 2 levels)


def object_mask(x: Tensor) -> Tensor:
    """(B, 1, H, W) True where a pixel differs from the image's background (its per-channel median)."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, C, 1, 1): objects cover < half the image
    return (x - bg).abs().amax(dim=1, keepdim=True) > OBJECT_THRESHOLD


def vae_loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, object_weight: float = 5.0,
             kl_weight: float = 1e-6) -> tuple[Tensor, dict]:
    """Object-weighted L1 + MSE, plus kl_weight * KL (summed over latent dims, per pixel as in LDM)."""
    w = 1.0 + (object_weight - 1.0) * object_mask(x).float()  # (B, 1, H, W)
    err = recon.float() - x
    l1, l2 = (w * err.abs()).mean(), (w * err.square()).mean()
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).sum() / x.numel()
    return l1 + l2 + kl_weight * kl, {"l1": round(float(l1.detach()), 5), "mse": round(float(l2.detach()), 6),
                                     "kl": round(float(kl.detach()), 3)}


def psnr(mse: float) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, n: int = 256, size: int = 64, device: torch.device = torch.device("cpu")) -> dict:
    """PSNR of posterior-mean reconstructions on held-out scenes: all pixels and object pixels only."""
    vae.eval()
    images, _ = render_batch(eval_seeds(n), size)
    se_all = se_obj = n_obj = 0.0
    for i in range(0, n, 64):
        x = images[i:i + 64].to(device)
        recon = vae.decode(vae.encode(x)[0]).float().clamp(-1, 1)
        err = (recon - x).square()  # (b, 3, H, W)
        mask = object_mask(x).expand_as(err)
        se_all += float(err.sum())
        se_obj += float(err[mask].sum())
        n_obj += float(mask.sum())
    vae.train()
    return {"psnr": round(psnr(se_all / images.numel()), 2), "psnr_objects": round(psnr(se_obj / max(n_obj, 1)), 2)}


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, n: int = 2048, size: int = 64, seed: int = 123,
                 device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (C,) of posterior means over n training renders."""
    vae.eval()
    total = total_sq = count = 0
    for i in range(0, n, 128):
        x, _ = render_batch([(seed * 104729 + i + k) % TRAIN_SEEDS for k in range(min(128, n - i))], size)
        z = vae.encode(x.to(device))[0].double()  # (b, C, h, w)
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + z.square().sum(dim=(0, 2, 3))
        count += z.numel() // z.shape[1]
    mean = total / count
    return mean.float(), (total_sq / count - mean.square()).clamp_min(1e-12).sqrt().float()


@torch.no_grad()
def fold_latent_stats(vae: AutoencoderKL, mean: Tensor, std: Tensor) -> float:
    """Make latent channel c be (z_c - mean_c) * s / std_c, with s the RMS of the stds; returns 1/s.

    quant_conv's mean outputs are shifted and scaled, its log-variance outputs shifted by
    2 log(ratio); post_quant_conv undoes the map on its input side. Decoding is unchanged.
    """
    C = mean.numel()
    s = float(std.square().mean().sqrt())
    ratio = s / std  # (C,)
    qc, pq = vae.quant_conv, vae.post_quant_conv
    qc.weight[:C] *= ratio[:, None, None, None]
    qc.bias[:C] = (qc.bias[:C] - mean) * ratio
    qc.bias[C:] += 2 * ratio.log()
    # post(z) = W (z / ratio + mean) + b
    pq.bias += (pq.weight[:, :, 0, 0] @ mean)
    pq.weight /= ratio[None, :, None, None]
    return 1.0 / s


@dataclass
class VaeRun:
    """What `train_vae` needs besides the loop settings."""

    out: Path
    config: VAEConfig
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(bf16=True))
    image_size: int = 64
    object_weight: float = 5.0
    kl_weight: float = 1e-6
    eval_n: int = 256


def vae_step(vae: AutoencoderKL, run: VaeRun, step: int, info: DistInfo) -> tuple[Tensor, dict]:
    """Loss of step `step`: fresh renders every step; posterior noise drawn for the global batch and sliced,
    so that a data-parallel run sees exactly the numbers a single process would."""
    B = run.loop.batch_size
    mine = info.shard(B)
    seeds = [(run.loop.seed * 15485863 + step * B + i) % TRAIN_SEEDS for i in range(B)]
    x, _ = render_batch(seeds[mine], run.image_size)
    x = x.to(info.device)
    mean, logvar = vae.encode(x)
    noise = torch.randn((B, *mean.shape[1:]), generator=step_generator(run.loop.seed, step))[mine]
    recon = vae.decode(mean + torch.exp(0.5 * logvar) * noise.to(mean))
    return vae_loss(x, recon, mean, logvar, run.object_weight, run.kl_weight)


def train_vae(run: VaeRun, info: DistInfo | None = None) -> dict:
    """Train, keep raw or EMA weights (higher object PSNR), standardise the latents, save; -> metrics."""
    info = info or DistInfo()
    torch.manual_seed(run.loop.seed)
    vae = AutoencoderKL(run.config).to(info.device)
    trainer = Trainer("vae", run.out, vae, run.loop, info)
    trainer.run(lambda step: vae_step(vae, run, step, info))
    if not info.main:
        return {}
    results = {}
    for name in ("raw", "ema") if trainer.ema else ("raw",):
        vae.load_state_dict(trainer.final_weights(name == "ema"))
        results[name] = evaluate_vae(vae, run.eval_n, run.image_size, info.device)
    best = max(results, key=lambda k: results[k]["psnr_objects"])
    vae.load_state_dict(trainer.final_weights(best == "ema"))
    mean, std = latent_stats(vae, size=run.image_size, device=info.device)
    scale = fold_latent_stats(vae, mean, std)
    cfg = dataclasses.replace(run.config, scale_factor=scale, shift_factor=0.0)
    save_vae(vae, cfg, run.out / "vae.safetensors")
    metrics = {"chosen": best, **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
               "scale_factor": scale, "latent_mean_before": mean.tolist(), "latent_std_before": std.tolist(),
               "steps": trainer.step}
    write_json(run.out / "metrics.json", metrics)
    return metrics


def save_vae(vae: AutoencoderKL, cfg: VAEConfig, path: Path) -> None:
    """Weights (CompVis keys) with the VAEConfig as JSON metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(path), metadata={"vae_config": json.dumps(dataclasses.asdict(cfg))})


def load_vae(path: str | os.PathLike) -> AutoencoderKL:
    """A VAE saved by `save_vae`, config included."""
    from safetensors import safe_open

    from easel.models.sd import load_strict
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["vae_config"])
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})
    vae = AutoencoderKL(cfg)
    load_strict(vae, load_file(str(path)), "VAE")
    return vae.eval().requires_grad_(False)
