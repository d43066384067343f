"""Single-file checkpoints in the original CompVis / SGM layout: split into components and join back."""
from __future__ import annotations

import re

import torch

from easel.models.configs import ModelConfig
from easel.weights import keys_clip
from easel.weights.detect import SD1_TEXT, SD2_TEXT, SDXL_REFINER_TEXT, SDXL_TEXT, UNET, VAE, is_refiner, strip
from easel.weights.load import CheckpointError

# Keys real checkpoints carry that are not weights of the three networks (schedule buffers, EMA
# copies, training-only losses, markers). They are skipped on load and reported in the info.
NOT_WEIGHTS = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights$|logvar$|"
    r"denoiser\.|v_pred$|ztsnr$|edm_|first_stage_model\.loss\.|model\.diffusion_model\.__)")


def text_layout(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(prefix, 'hf' | 'openclip') for each text encoder, following the family's original layout."""
    if len(cfg.text_encoders) == 2:
        return [(SDXL_TEXT[0], "hf"), (SDXL_TEXT[1], "openclip")]
    if len(cfg.text_encoders) == 1 and is_refiner(cfg):
        return [(SDXL_REFINER_TEXT, "openclip")]  # SGM refiner: bigG is its only (first) embedder
    if len(cfg.text_encoders) == 1:
        openclip = cfg.text_encoders[0].hidden_act == "gelu"  # OpenCLIP towers (SD2) use exact GELU
        return [(SD2_TEXT, "openclip") if openclip else (SD1_TEXT, "hf")]
    raise CheckpointError(f"cannot lay out {len(cfg.text_encoders)} text encoders in a single file")


def split(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Component state dicts in our layout, and the names of keys that were not weights (skipped)."""
    parts = {"unet": strip(sd, UNET), "vae": strip(sd, VAE)}
    prefixes = [UNET, VAE]
    for i, (prefix, layout) in enumerate(text_layout(cfg)):
        sub = strip(sd, prefix)
        parts[f"text_encoder.{i}"] = (keys_clip.from_hf(sub) if layout == "hf"
                                      else _from_openclip(sub, cfg.text_encoders[i]))
        prefixes.append(prefix)
    parts["unet"] = {k: v for k, v in parts["unet"].items() if not NOT_WEIGHTS.match(UNET + k)}
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not NOT_WEIGHTS.match(VAE + k)}
    skipped = [k for k in sd if NOT_WEIGHTS.match(k) or not k.startswith(tuple(prefixes))]
    return parts, skipped


def _from_openclip(sub: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """OpenCLIP tower -> our HF layout (the tower's unused `logit_scale` is dropped)."""
    out = keys_clip.from_openclip(sub, cfg)
    return out[0] if isinstance(out, tuple) else out


def join(parts: dict[str, dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One single-file state dict from component state dicts (inverse of `split`)."""
    sd = {UNET + k: v for k, v in parts["unet"].items()}
    sd.update({VAE + k: v for k, v in parts["vae"].items()})
    for i, (prefix, layout) in enumerate(text_layout(cfg)):
        enc = parts[f"text_encoder.{i}"]
        enc = keys_clip.to_hf(enc) if layout == "hf" else keys_clip.to_openclip(enc, cfg.text_encoders[i])
        sd.update({prefix + k: v for k, v in enc.items()})
    return sd
