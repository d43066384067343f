"""Detect a model's preset from the keys and shapes of its single-file state dict (as ComfyUI does).

Shapes fix almost everything. Two facts are not visible in shapes and follow the model family:
the attention head layout (SD1: 8 heads; SD2/SDXL: 64-wide heads) and SD2's prediction type
(v for the 768 model, eps for 512-base), for which we use, in order: the config easel writes into
safetensors metadata, an explicit `v_pred` marker key, and ComfyUI's weight-statistics heuristic.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from easel.models.configs import (CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, PRESETS, CLIPTextConfig, ModelConfig,
                                  UNetConfig, VAEConfig)
from easel.weights.load import CheckpointError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# The SDXL refiner conditions on OpenCLIP bigG alone, so its tower is embedder 0 (OpenCLIP layout).
SDXL_REFINER_TEXT = "conditioner.embedders.0.model."
# SDXL's size/crop/aesthetic-score conditioning: each number becomes one 256-wide sinusoidal embedding in `y`.
SDXL_EMBED_DIM = 256


def family(sd: dict[str, torch.Tensor]) -> str:
    """'sd1', 'sd2', 'sdxl' or 'sdxl-refiner' from which text-encoder prefix the checkpoint uses."""
    if any(k.startswith(SDXL_TEXT[1]) for k in sd):
        return "sdxl"
    if any(k.startswith(SDXL_REFINER_TEXT) for k in sd):
        return "sdxl-refiner"
    if any(k.startswith(SD2_TEXT) for k in sd):
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in sd):
        return "sd1"
    if not any(k.startswith(UNET) for k in sd):
        raise CheckpointError(
            "this file has no 'model.diffusion_model.*' weights, so it is not a Stable Diffusion checkpoint "
            "(a VAE or LoRA file goes in --vae / --lora, a diffusers model is a folder with model_index.json)")
    raise CheckpointError("the checkpoint has a UNet but no text encoder weights (cond_stage_model.* or "
                          "conditioner.embedders.*); easel needs a complete SD checkpoint")


def detect_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  prediction: str | None = None) -> ModelConfig:
    """Build the ModelConfig of a single-file checkpoint; metadata written by easel wins."""
    if metadata and "easel_config" in metadata:
        cfg = ModelConfig.from_json(metadata["easel_config"])
    else:
        cfg = _config_from_shapes(sd)
    if prediction:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        cfg = dataclasses.replace(cfg, prediction=prediction)
    return cfg


def _config_from_shapes(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """Read every config field that shapes determine; take the rest from the family."""
    fam = family(sd)
    unet_sd = strip(sd, UNET)
    heads = dict(num_heads=8, num_head_channels=-1) if fam == "sd1" else dict(num_heads=-1, num_head_channels=64)
    unet = unet_config_from_shapes(unet_sd, **heads)
    vae = vae_config_from_shapes(strip(sd, VAE), scale_factor=0.13025 if fam.startswith("sdxl") else 0.18215)
    if fam == "sd1":
        texts = (clip_config_from_hf(strip(sd, SD1_TEXT), CLIP_L),)
    elif fam == "sd2":
        texts = (clip_config_from_openclip(strip(sd, SD2_TEXT), OPENCLIP_H),)
    elif fam == "sdxl-refiner":
        texts = (clip_config_from_openclip(strip(sd, SDXL_REFINER_TEXT), OPENCLIP_BIGG),)
    else:
        texts = (clip_config_from_hf(strip(sd, SDXL_TEXT[0]), CLIP_L),
                 clip_config_from_openclip(strip(sd, SDXL_TEXT[1]), OPENCLIP_BIGG))
    base = {"sd1": "sd15", "sd2": "sd21" if _sd2_prediction(sd) == "v" else "sd21-base", "sdxl": "sdxl",
            "sdxl-refiner": "sdxl-refiner"}[fam]
    cfg = dataclasses.replace(PRESETS[base], unet=unet, vae=vae, text_encoders=texts)
    return dataclasses.replace(cfg, name=_preset_name(cfg))


def is_refiner(cfg: ModelConfig) -> bool:
    """True for SDXL-refiner-style models: `y` = pooled text + (original size, crop, aesthetic score) embeddings.

    The layout of `y` follows from its width (as diffusers checks it): the SDXL base adds six 256-wide
    embeddings to the pooled text (original size, crop, target size), the refiner five (aesthetic score
    instead of the target size).
    """
    if not cfg.pooled_text or not cfg.unet.adm_in_channels or not cfg.text_encoders:
        return False
    last = cfg.text_encoders[-1]
    pooled = last.projection_dim or last.hidden_size
    return cfg.unet.adm_in_channels == pooled + 5 * SDXL_EMBED_DIM


def _preset_name(cfg: ModelConfig) -> str:
    """The name of the preset this config equals, else 'custom'."""
    for name, preset in PRESETS.items():
        if dataclasses.replace(preset, name="") == dataclasses.replace(cfg, name=""):
            return name
    return "custom"


def _sd2_prediction(sd: dict[str, torch.Tensor]) -> str:
    """(Only meaningful for SD2 files.) SD2 768-v and 512-base share every key; a 'v_pred' key or ComfyUI's statistic tells them apart."""
    if "v_pred" in sd:
        return "v"
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if key in sd and not sd[key].is_meta and torch.std(sd[key].float(), unbiased=False) > 0.09:
        return "v"
    return "eps"


def strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-dict under `prefix`, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(sd: dict, pattern: str) -> int:
    """1 + the largest N such that some key matches `pattern` with N in its group, or 0."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in sd if (m := rx.match(k))]
    return max(found) + 1 if found else 0


def unet_config_from_shapes(sd: dict[str, torch.Tensor], num_heads: int = 8, num_head_channels: int = -1) -> UNetConfig:
    """UNetConfig from a CompVis-layout UNet state dict (prefix stripped)."""
    conv_in = _need(sd, "input_blocks.0.0.weight", "UNet")
    mc = conv_in.shape[0]
    mults, depths, n_res = [], [], 0
    block, level_blocks = 1, 0
    n_input = _count(sd, r"input_blocks\.(\d+)\.")
    while block < n_input:
        if f"input_blocks.{block}.0.op.weight" in sd:  # downsampler closes a level
            n_res, level_blocks = level_blocks, 0
            block += 1
            continue
        if level_blocks == 0:
            mults.append(sd[f"input_blocks.{block}.0.in_layers.2.weight"].shape[0] // mc)
            depths.append(_count(sd, rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\."))
        level_blocks += 1
        block += 1
    n_res = n_res or level_blocks
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=_need(sd, "out.2.weight", "UNet").shape[0],
        model_channels=mc, channel_mult=tuple(mults), num_res_blocks=n_res, transformer_depth=tuple(depths),
        transformer_depth_middle=_count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=to_k.shape[1] if to_k is not None else 768,
        use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else 0,
    )


def vae_config_from_shapes(sd: dict[str, torch.Tensor], scale_factor: float = 0.18215) -> VAEConfig:
    """VAEConfig from a CompVis-layout VAE state dict (prefix stripped)."""
    ch = _need(sd, "encoder.conv_in.weight", "VAE").shape[0]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    mults = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch=ch, ch_mult=mults, num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=sd["encoder.conv_out.weight"].shape[0] // 2, embed_dim=sd["quant_conv.weight"].shape[0] // 2,
        scale_factor=scale_factor,
    )


def clip_config_from_hf(sd: dict[str, torch.Tensor], family_cfg: CLIPTextConfig) -> CLIPTextConfig:
    """CLIPTextConfig from an HF-layout text encoder state dict (with or without 'text_model.')."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    tok = _need(sd, "embeddings.token_embedding.weight", "text encoder")
    proj = sd.get("text_projection.weight")
    return dataclasses.replace(
        family_cfg, vocab_size=tok.shape[0], hidden_size=tok.shape[1],
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(1, tok.shape[1] // 64), projection_dim=proj.shape[0] if proj is not None else 0,
    )


def clip_config_from_openclip(sd: dict[str, torch.Tensor], family_cfg: CLIPTextConfig) -> CLIPTextConfig:
    """CLIPTextConfig from an OpenCLIP-layout text tower (prefix stripped)."""
    tok = _need(sd, "token_embedding.weight", "text encoder")
    proj = sd.get("text_projection")
    return dataclasses.replace(
        family_cfg, vocab_size=tok.shape[0], hidden_size=tok.shape[1],
        max_position_embeddings=sd["positional_embedding"].shape[0],
        num_hidden_layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_attention_heads=max(1, tok.shape[1] // 64), projection_dim=proj.shape[1] if proj is not None else 0,
    )


def _need(sd: dict, key: str, what: str) -> torch.Tensor:
    """sd[key], or an error that says which part of the checkpoint is incomplete."""
    if key not in sd:
        raise CheckpointError(f"the {what} weights are incomplete: '{key}' is missing")
    return sd[key]
