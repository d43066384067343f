"""ControlNet key layouts: which file format a state dict is in, its config from key shapes, diffusers -> CompVis.

Three layouts exist in the wild, all read here:
- CompVis / ControlNet 1.1 (`lllyasviel/ControlNet-v1-1` .pth, their safetensors conversions):
  `control_model.input_blocks...`, `control_model.input_hint_block.N`, `control_model.zero_convs.N.0`,
  `control_model.middle_block_out.0` (some conversions drop the `control_model.` prefix; ControlNet 1.0
  files also carry the whole Stable Diffusion model beside it, which is not needed and is skipped).
- diffusers (`ControlNetModel`, folders or single files with its keys): `conv_in`, `time_embedding`,
  `down_blocks`, `mid_block`, `controlnet_cond_embedding.{conv_in,blocks.N,conv_out}`,
  `controlnet_down_blocks.N`, `controlnet_mid_block` (and `add_embedding` for SDXL).
The encoder's renames are the UNet's own table (`keys_unet.diffusers_map`); only the ControlNet parts are here.
"""
from __future__ import annotations

import dataclasses

import torch

from easel.models.configs import UNetConfig
from easel.models.controlnet import ControlNetConfig, encoder_skip_channels
from easel.weights import keys_unet
from easel.weights.detect import _count, unet_config_from_shapes
from easel.weights.load import CheckpointError

ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
# Parts of a ControlNet 1.0 checkpoint that are the Stable Diffusion model it was trained with, not the ControlNet.
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
COMPVIS_MARK, DIFFUSERS_MARK = "input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"


def file_layout(sd: dict[str, torch.Tensor], name: str) -> str:
    """'compvis' or 'diffusers'; a clear error for files that are not ControlNets (or kinds easel cannot run)."""
    if DIFFUSERS_MARK in sd:
        return "diffusers"
    if COMPVIS_MARK in sd:
        return "compvis"
    if "lora_controlnet" in sd:
        raise CheckpointError(f"{name} is a Control-LoRA (Stability's LoRA-compressed ControlNet), which easel "
                              "does not run yet: use a full ControlNet file")
    if any(k.startswith(("adapter.", "body.")) for k in sd):
        raise CheckpointError(f"{name} looks like a T2I-Adapter, not a ControlNet: easel runs ControlNets only")
    if any(k.startswith("model.diffusion_model.") for k in sd):
        raise CheckpointError(f"{name} is a Stable Diffusion checkpoint, not a ControlNet: pass it as --model")
    raise CheckpointError(f"{name} is not a ControlNet: it has neither `{COMPVIS_MARK}` (ControlNet 1.1 / CompVis) "
                          f"nor `{DIFFUSERS_MARK}` (diffusers); first keys: {sorted(sd)[:5]}")


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet's own keys: `control_model.` removed, a ControlNet 1.0 file's Stable Diffusion weights left
    out (they are the base model, loaded separately)."""
    if not any(k.startswith("control_model.") for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("control_model."):
            out[k.removeprefix("control_model.")] = v
        elif not k.startswith(SD_PREFIXES):
            out[k] = v  # anything else stays, so that strict loading names it
    return out


def config_from_compvis(sd: dict[str, torch.Tensor], base: UNetConfig, pooling: bool = False) -> ControlNetConfig:
    """ControlNetConfig from CompVis-layout keys and shapes; head counts (not in the shapes) from the base UNet."""
    # A ControlNet has no output conv: its out_channels are the base UNet's, given here so the UNet detector runs.
    unet = unet_config_from_shapes({**sd, "out.2.weight": torch.empty(base.out_channels, 0)},
                                   base.num_heads, base.num_head_channels)
    unet = dataclasses.replace(unet, norm_groups=base.norm_groups)
    if not any(k.endswith("attn2.to_k.weight") for k in sd):  # no attention: text width and projection unused
        unet = dataclasses.replace(unet, context_dim=base.context_dim,
                                   use_linear_in_transformer=base.use_linear_in_transformer)
    convs = [sd[f"input_hint_block.{i}.weight"] for i in range(0, 64, 2) if f"input_hint_block.{i}.weight" in sd]
    return _config(unet, convs, pooling)


def _config(unet: UNetConfig, convs: list[torch.Tensor], pooling: bool) -> ControlNetConfig:
    """The config from the encoder's and the hint block's conv weights (conv_in, pairs..., conv_out)."""
    if len(convs) < 2 or len(convs) % 2:
        raise CheckpointError(f"the ControlNet's hint block has {len(convs)} convolutions; expected an even number "
                              "(conv in, pairs of convs, conv out): the file is damaged or not a ControlNet")
    widths = (convs[0].shape[0], *(convs[i].shape[0] for i in range(2, len(convs) - 1, 2)))
    return ControlNetConfig(unet, hint_channels=convs[0].shape[1], hint_block_channels=widths,
                            global_average_pooling=pooling)


def config_from_diffusers_keys(sd: dict[str, torch.Tensor], base: UNetConfig,
                               pooling: bool = False) -> ControlNetConfig:
    """ControlNetConfig from diffusers-layout keys and shapes (a single file without its config.json)."""
    need = lambda k: _need(sd, k)  # noqa: E731
    mc = need("conv_in.weight").shape[0]
    levels = _count(sd, r"down_blocks\.(\d+)\.")
    chans = [need(f"down_blocks.{i}.resnets.0.conv1.weight").shape[0] for i in range(levels)]
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    add = sd.get("add_embedding.linear_1.weight")
    unet = dataclasses.replace(
        base, in_channels=need("conv_in.weight").shape[1], model_channels=mc,
        channel_mult=tuple(c // mc for c in chans), num_res_blocks=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        transformer_depth=tuple(_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                                for i in range(levels)),
        transformer_depth_middle=_count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        context_dim=to_k.shape[1] if to_k is not None else base.context_dim,
        use_linear_in_transformer=base.use_linear_in_transformer if proj_in is None else proj_in.ndim == 2,
        adm_in_channels=add.shape[1] if add is not None else 0)
    n = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    convs = [need("controlnet_cond_embedding.conv_in.weight"),
             *(need(f"controlnet_cond_embedding.blocks.{j}.weight") for j in range(n)),
             need("controlnet_cond_embedding.conv_out.weight")]
    return _config(unet, convs, pooling)


def diffusers_map(cfg: ControlNetConfig) -> dict[str, str]:
    """Every CompVis ControlNet key -> its diffusers `ControlNetModel` key."""
    m = {k: v for k, v in keys_unet.diffusers_map(cfg.unet).items() if k.startswith(ENCODER_PREFIXES)}
    convs = len(cfg.hint_block_channels) * 2  # conv_in, (conv, stride-2 conv) per width step, conv_out
    names = ["conv_in", *(f"blocks.{j}" for j in range(convs - 2)), "conv_out"]
    for i, name in enumerate(names):
        m.update(_wb(f"input_hint_block.{2 * i}", f"controlnet_cond_embedding.{name}"))
    for n in range(len(encoder_skip_channels(cfg.unet)) - 1):
        m.update(_wb(f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}"))
    m.update(_wb("middle_block_out.0", "controlnet_mid_block"))
    return m


def from_diffusers(sd: dict[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict under CompVis keys; keys outside the table keep their names (so that the
    strict load names them)."""
    inverse = {v: k for k, v in diffusers_map(cfg).items()}
    return {inverse.get(k, k): v for k, v in sd.items()}


def to_diffusers(sd: dict[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """A CompVis ControlNet state dict under diffusers keys (for tests against diffusers and for export)."""
    table = diffusers_map(cfg)
    missing = sorted(set(table) - set(sd))
    if missing:
        raise KeyError(f"ControlNet state dict lacks {len(missing)} keys: {missing[:6]}")
    return {table[k]: v for k, v in sd.items() if k in table}


def diffusers_config(cfg: ControlNetConfig) -> dict:
    """The config.json of a diffusers `ControlNetModel` for this ControlNet."""
    d = keys_unet.diffusers_config(dataclasses.replace(cfg.unet, out_channels=cfg.unet.in_channels))
    for key in ("up_block_types", "out_channels", "sample_size", "center_input_sample"):
        d.pop(key, None)
    d.update(_class_name="ControlNetModel", conditioning_channels=cfg.hint_channels,
             conditioning_embedding_out_channels=list(cfg.hint_block_channels),
             controlnet_conditioning_channel_order="rgb", global_pool_conditions=cfg.global_average_pooling)
    if cfg.unet.adm_in_channels:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=cfg.unet.adm_in_channels)
    return d


def _wb(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"the ControlNet weights are incomplete: '{key}' is missing")
    return sd[key]
