"""Images over HTTP: PNG bytes with the generation parameters, and cheap previews of a denoising step."""
from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from easel.pipelines import common
from easel.pipelines.metadata import png_info


def to_png(image: Image.Image, params: dict | None = None) -> bytes:
    """PNG bytes; with params, the same `parameters` (A1111) and `easel` (JSON) text chunks as saved files."""
    info = png_info(params, default=str) if params else None
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def to_base64_png(image: Image.Image, params: dict | None = None) -> str:
    """Base64 text of `to_png` (what JSON bodies carry)."""
    return base64.b64encode(to_png(image, params)).decode("ascii")


@torch.no_grad()
def latent_preview(latent: torch.Tensor, loaded=None, mode: str = "approx") -> Image.Image:
    """A preview of a denoised latent (1, C, h, w) of a LoadedModel: 'full' decodes with the VAE, 'approx'
    applies the model's fitted linear latent -> RGB map (A1111's "approx cheap", easel.pipelines.preview)."""
    latent = latent[:1].detach()
    if loaded is None:
        return _channels_as_rgb(latent)
    if mode == "full":
        return common.decode(loaded.model, latent)[0]
    from easel.pipelines.preview import LatentPreviewer
    return LatentPreviewer.for_model(loaded).to_images(latent.float())[0]


def _channels_as_rgb(latent: torch.Tensor) -> Image.Image:
    """No model at hand: the first three latent channels, each stretched to the full range."""
    x = latent.float().cpu()[0, :3]  # (3, h, w)
    if x.shape[0] < 3:
        x = x[:1].expand(3, -1, -1)
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    return common.to_pil(x[None])[0]
