"""Live previews while sampling: a per-model linear latent -> RGB map (fast) or the full VAE decode.

The map is the "approx" preview of A1111/ComfyUI (`latent_rgb_factors`), but fitted for each model from
its own VAE instead of hard-coded per family: encode a handful of varied images, decode them, and
regress the average colour of each latent cell's pixels on the cell's latent vector (least squares).
It is found, in order, in the checkpoint's safetensors metadata (`easel.latent_rgb`), in the cache
(~/.cache/easel/previews/<vae hash>.json), or fitted on first use and cached (a second for the
built-in model, ~15 CPU-seconds for an SD VAE).
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from easel.files import save_image, write_text
from easel.pipelines import common
from easel.pipelines.request import PREVIEW_MODES
from easel.weights.load import cache_dir
from easel.weights.model_io import LoadedModel

log = logging.getLogger("easel")
LATENT_RGB_KEY = "easel.latent_rgb"
PreviewSink = Callable[[int, list[Image.Image]], None]
_FORMAT = 1
_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, LatentPreviewer] = weakref.WeakKeyDictionary()


class LatentPreviewer:
    """A linear map from latent channels to RGB: rgb = latent @ weight + bias, per latent cell."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, factor: int, vae_hash: str = ""):
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != (3,):
            raise ValueError(f"a latent->RGB map needs weight (C, 3) and bias (3,), got {tuple(weight.shape)} "
                             f"and {tuple(bias.shape)}")
        self.weight, self.bias = weight.float().cpu(), bias.float().cpu()
        self.factor, self.vae_hash = int(factor), vae_hash

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> RGB (B, 3, h*f, w*f) in [-1, 1], each cell a flat block (nearest)."""
        w = self.weight.to(latents.device)
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), w) + self.bias.to(latents.device).view(1, 3, 1, 1)
        return rgb.clamp(-1, 1).repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)

    def to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, C, h, w) -> preview PIL images at the size the VAE would decode to."""
        return common.to_pil(self.to_rgb(latents))

    def to_json(self) -> str:
        """The map as the JSON stored in checkpoint metadata and in the cache."""
        return json.dumps({"format": _FORMAT, "weight": self.weight.tolist(), "bias": self.bias.tolist(),
                           "factor": self.factor, "vae_hash": self.vae_hash})

    @classmethod
    def from_json(cls, text: str) -> LatentPreviewer:
        """Read a map written by `to_json` (ValueError if it is not one)."""
        try:
            d = json.loads(text)
            return cls(torch.tensor(d["weight"]), torch.tensor(d["bias"]), d["factor"], d.get("vae_hash", ""))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"not a latent->RGB preview map ({e})") from None

    @classmethod
    def fit(cls, vae: torch.nn.Module) -> LatentPreviewer:
        """Fit the map for a VAE on `calibration_images` (see `fit_latent_rgb`)."""
        f = vae.config.downsample
        # 16 latent cells a side, capped at 64 px so an SD VAE (f=8) fits in seconds on a CPU.
        weight, bias = fit_latent_rgb(vae, calibration_images(min(max(16 * f, 32), 64)))
        return cls(weight, bias, f, vae_hash(vae))

    @classmethod
    def for_model(cls, loaded: LoadedModel) -> LatentPreviewer:
        """The model's map: from its checkpoint metadata, else the cache, else fitted now and cached."""
        vae = loaded.model.vae
        if vae not in _MEMO:
            _MEMO[vae] = _find_or_fit(loaded)
        return _MEMO[vae]


@torch.no_grad()
def fit_latent_rgb(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares latent -> RGB map (weight (C, 3), bias (3,)) from images (N, 3, H, W) in [-1, 1].

    The target is the VAE's own decode of the latents, average-pooled to one colour per latent cell,
    so the map imitates the full preview (and works for a VAE that reconstructs badly, too).
    """
    p = next(vae.parameters())
    latents = vae.encode_latents(images.to(p.device, p.dtype))
    decoded = vae.decode_latents(latents).float().clamp(-1, 1)
    target = F.avg_pool2d(decoded, vae.config.downsample)  # (N, 3, h, w)
    x = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N*h*w, C)
    y = target.double().permute(0, 2, 3, 1).reshape(-1, 3)  # (N*h*w, 3)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)  # bias column
    coef = torch.linalg.lstsq(x.cpu(), y.cpu()).solution  # (C + 1, 3)
    return coef[:-1].float(), coef[-1].float()


def calibration_images(size: int = 64, shapeworld: int = 16) -> torch.Tensor:
    """Varied images (N, 3, size, size) in [-1, 1]: ShapeWorld scenes, colour ramps and smooth colour fields."""
    from easel.world.dataset import render_batch
    scenes, _ = render_batch(list(range(shapeworld)), size)
    ramp = torch.linspace(-1, 1, size)
    ramps = [torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                          torch.full((size, size), b)]) for b in (-1.0, -1 / 3, 1 / 3, 1.0)]
    g = torch.Generator().manual_seed(0)
    fields = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bilinear",
                           align_corners=True)
    return torch.cat([scenes, torch.stack(ramps), fields])


def vae_hash(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's weights and latent scaling (identical for fp32 and bf16 loads of one file)."""
    h = hashlib.sha256(f"{vae.config.scale_factor}:{vae.config.shift_factor}".encode())
    for name, t in sorted(vae.state_dict().items()):
        # Rounded to bf16 so that loading the same checkpoint in fp32 or bf16 finds the same cache entry.
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(digest: str) -> Path:
    """Where the fitted map of the VAE with this hash is cached."""
    return cache_dir() / "previews" / f"{digest}.json"


def latent_rgb_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The safetensors metadata entry that ships a model's preview map with it ({'easel.latent_rgb': json})."""
    return {LATENT_RGB_KEY: LatentPreviewer.for_model(loaded).to_json()}


def _find_or_fit(loaded: LoadedModel) -> LatentPreviewer:
    """Metadata of the checkpoint, then the cache, then a fresh fit (written to the cache)."""
    vae = loaded.model.vae
    digest = vae_hash(vae)
    stored = _from_metadata(loaded.source)
    # A map stored for another VAE (the user swapped in `--vae`) would show wrong colours: ignore it.
    if stored is not None and stored.vae_hash in ("", digest):
        return stored
    path = cache_path(digest)
    if path.is_file():
        try:
            return LatentPreviewer.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable preview cache %s (%s); fitting again", path, e)
    previewer = LatentPreviewer.fit(vae)
    try:
        write_text(path, previewer.to_json())
    except OSError as e:  # a read-only home still gets previews, just not cached
        log.warning("could not cache the preview map in %s (%s)", path, e)
    return previewer


def _from_metadata(source: str) -> LatentPreviewer | None:
    """The map stored in a single-file checkpoint's safetensors metadata, if any."""
    path = Path(source) if source else None
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(LATENT_RGB_KEY)
        return LatentPreviewer.from_json(text) if text else None
    except Exception as e:  # a foreign header must not stop generation; previews fall back to fitting
        log.warning("ignoring the preview map in %s (%s)", path.name, e)
        return None


def preview_callback(loaded: LoadedModel, every: int, mode: str, sink: PreviewSink,
                     inner: common.StepCallback | None = None) -> common.StepCallback:
    """A step callback: calls `inner(d)` every step and `sink(step, images)` every `every` steps
    (step counted from 1) with previews of `d['denoised']`: the linear map ('approx') or the VAE ('full')."""
    if every < 1:
        raise ValueError(f"preview every {every} steps: use a positive number of steps (0 turns previews off "
                         "and needs no preview callback)")
    if mode not in PREVIEW_MODES:
        raise ValueError(f"unknown preview mode {mode!r}; choose 'approx' (fast linear map) or 'full' (VAE decode)")
    render = LatentPreviewer.for_model(loaded).to_images if mode == "approx" else (
        lambda latents: common.decode(loaded.model, latents))

    def callback(d: dict) -> None:
        if inner is not None:
            inner(d)  # first, so that Interrupted / Skipped from the caller stop before a wasted preview
        step = d["i"] + 1
        if step % every == 0:
            sink(step, render(d["denoised"]))

    return callback


def write_preview_frames(folder: str | Path) -> PreviewSink:
    """A preview sink that writes `step_NNN_k.png` into `folder` (k counts images across batches)."""
    folder = Path(folder)
    state = {"last": 0, "offset": 0, "count": 0}

    def sink(step: int, images: list[Image.Image]) -> None:
        if step <= state["last"]:  # the step count restarted: a new batch, so number its images after the last
            state["offset"] += state["count"]
        state["last"], state["count"] = step, len(images)
        for k, im in enumerate(images):
            save_image(im, folder / f"step_{step:03d}_{state['offset'] + k}.png")

    return sink
