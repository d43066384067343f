"""VAE state dicts: our (CompVis) keys <-> diffusers `AutoencoderKL` keys, and its `vae/config.json`.

Two differences besides names: diffusers counts decoder `up_blocks` from the lowest resolution
(CompVis `decoder.up.N` counts from the highest), and stores the mid-block attention projections
as linear `(C, C)` weights where CompVis has 1x1 convs `(C, C, 1, 1)`.
"""
from __future__ import annotations

import logging
import re

import torch

from easel.models.configs import VAEConfig

log = logging.getLogger(__name__)

# Module renames (ours, theirs) that do not depend on the config.
TOP = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
]
RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
SHORTCUT = ("nin_shortcut", "conv_shortcut")
ATTENTION = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
# Attention projections that are 1x1 convs in our layout and linear layers in diffusers.
LINEAR_IN_DIFFUSERS = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
# Names used by diffusers < 0.14 (and many VAE files converted then); accepted on input.
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Keys of standalone VAE files that are not weights of the autoencoder (training loss, EMA copies).
NOISE = ("loss.", "model_ema.")
PREFIXES = ("first_stage_model.", "vae.")


def _resnet(ours: str, theirs: str, shortcut: bool) -> list[tuple[str, str]]:
    """Module pairs of one ResnetBlock."""
    pairs = RESNET + ([SHORTCUT] if shortcut else [])
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in pairs]


def _mid(side: str) -> list[tuple[str, str]]:
    """Module pairs of the encoder's or decoder's mid block."""
    pairs = _resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
    pairs += [(f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}") for a, b in ATTENTION]
    return pairs + _resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)


def module_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(our module, diffusers module) for every parameterised module of the VAE."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    n = len(widths)
    pairs = list(TOP) + _mid("encoder") + _mid("decoder")
    for i in range(n):  # encoder levels: same index on both sides
        for j in range(cfg.num_res_blocks):
            into = (widths[i - 1] if i > 0 else cfg.ch) if j == 0 else widths[i]
            pairs += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", into != widths[i])
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for i in range(n):  # decoder levels: CompVis up.i is diffusers up_blocks.(n-1-i)
        for j in range(cfg.num_res_blocks + 1):
            into = (widths[i + 1] if i < n - 1 else widths[-1]) if j == 0 else widths[i]
            pairs += _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}",
                             into != widths[i])
        if i > 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"))
    return pairs


def diffusers_map(cfg: VAEConfig) -> dict[str, str]:
    """Our key -> diffusers AutoencoderKL key, for every weight and bias."""
    return {f"{a}.{p}": f"{b}.{p}" for a, b in module_pairs(cfg) for p in ("weight", "bias")}


def to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE state dict -> diffusers AutoencoderKL state dict (attention convs become linears)."""
    mapping = diffusers_map(cfg)
    _check_keys(set(sd), set(mapping), "our", "VAEConfig does not match these weights")
    out = {}
    for ours, theirs in mapping.items():
        t = sd[ours]
        out[theirs] = t.reshape(t.shape[:2]) if LINEAR_IN_DIFFUSERS.search(ours) else t  # (C, C, 1, 1) -> (C, C)
    return out


def from_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict (new or pre-0.14 attention names) -> ours."""
    sd = {_new_attention_name(k): v for k, v in sd.items()}
    mapping = diffusers_map(cfg)
    _check_keys(set(sd), set(mapping.values()), "diffusers", "check the VAE config.json")
    out = {}
    for ours, theirs in mapping.items():
        t = sd[theirs]
        if LINEAR_IN_DIFFUSERS.search(ours) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
        out[ours] = t
    return out


def _new_attention_name(key: str) -> str:
    """'...attentions.0.query.weight' -> '...attentions.0.to_q.weight' (pre-0.14 diffusers names)."""
    m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m.group(1)}{OLD_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key


def _check_keys(have: set[str], want: set[str], layout: str, hint: str) -> None:
    """Raise a ValueError listing missing and unexpected keys, if any."""
    missing, unexpected = sorted(want - have), sorted(have - want)
    if not missing and not unexpected:
        return

    def show(title: str, items: list[str]) -> str:
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more if items else ""

    raise ValueError(f"the {layout}-layout VAE weights do not match the VAE config:"
                     + show("missing", missing) + show("unexpected", unexpected) + f"\n  Fix: {hint}.")


def diffusers_config(cfg: VAEConfig, sample_size: int = 512) -> dict:
    """The diffusers `vae/config.json` dict for this VAE (`sample_size`: the model's image size)."""
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"diffusers' AutoencoderKL needs z_channels == embed_dim, got {cfg.z_channels} "
                         f"and {cfg.embed_dim}; this VAE cannot be saved as a diffusers folder")
    n = len(cfg.ch_mult)
    d = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "latent_channels": cfg.z_channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
        "force_upcast": True,
    }
    if cfg.shift_factor:
        d["shift_factor"] = cfg.shift_factor
    return d


def config_from_diffusers(d: dict) -> VAEConfig:
    """VAEConfig from a diffusers `vae/config.json` dict; unsupported variants are named in the error."""
    _check_supported(d)
    widths = list(d.get("block_out_channels", [64]))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first: not a CompVis-style VAE")
    latent = d.get("latent_channels", 4)
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=d.get("layers_per_block", 1),
        z_channels=latent, embed_dim=latent, norm_groups=d.get("norm_num_groups", 32),
        scale_factor=float(d.get("scaling_factor", 0.18215)), shift_factor=float(d.get("shift_factor") or 0.0),
    )


def _check_supported(d: dict) -> None:
    """Reject diffusers AutoencoderKL options our CompVis-layout VAE does not implement."""
    n = len(d.get("block_out_channels", [64]))
    problems = []
    if list(d.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types {d['down_block_types']}")
    if list(d.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types {d['up_block_types']}")
    if d.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {d['act_fn']!r}")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not d.get(flag, True):
            problems.append(f"{flag}=false")
    if d.get("latents_mean") is not None or d.get("latents_std") is not None:
        problems.append("per-channel latents_mean/latents_std")
    if problems:
        raise ValueError("unsupported diffusers VAE config (" + "; ".join(problems) + "): easel implements the "
                         "SD1/SD2/SDXL AutoencoderKL only")


def vae_state_from_any(sd: dict[str, torch.Tensor], cfg: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """A standalone VAE file (CompVis or diffusers keys, optional `first_stage_model.`/`vae.` prefix) -> our keys.

    Non-weights (`loss.*`, `model_ema.*`) are dropped and logged. Diffusers files need no config: the
    architecture is read from shapes unless `cfg` is given.
    """
    sd = _strip_prefix(sd)
    dropped = sorted(k for k in sd if k.startswith(NOISE))
    if dropped:
        log.info("VAE file: dropped %d non-weight keys (%s%s)", len(dropped), ", ".join(dropped[:4]),
                 " ..." if len(dropped) > 4 else "")
    sd = {k: v for k, v in sd.items() if not k.startswith(NOISE)}
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        sample = ", ".join(sorted(sd)[:5]) or "(no keys)"
        raise ValueError(f"this file is not a VAE: it has no encoder.conv_in / decoder.conv_out weights "
                         f"(keys start: {sample}). Pass a VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors "
                         f"or a diffusers vae/diffusion_pytorch_model.safetensors)")
    if any(".down_blocks." in k or ".mid_block." in k for k in sd):
        return from_diffusers(sd, cfg or _config_from_diffusers_shapes(sd))
    return sd


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `first_stage_model.` (VAE inside a full checkpoint) or `vae.` when every VAE key has it."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _config_from_diffusers_shapes(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """VAEConfig (default norm groups and scale) read from the shapes of a diffusers VAE state dict."""
    def count(pattern: str) -> int:
        return len({m.group(1) for k in sd if (m := re.match(pattern, k))})

    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = count(r"encoder\.down_blocks\.(\d+)\.")
    widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    latent = sd["decoder.conv_in.weight"].shape[1]
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch=ch, ch_mult=tuple(w // ch for w in widths), z_channels=latent, embed_dim=latent,
        num_res_blocks=count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
    )
