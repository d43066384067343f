"""UNet key map and config between easel (CompVis/SGM checkpoint layout) and diffusers `UNet2DConditionModel`.

The layouts differ only in names: CompVis numbers its blocks flat (`input_blocks.N.M`), diffusers nests
them (`down_blocks.i.resnets.j`). Tensors keep their shapes, including SD1's 1x1-conv `proj_in`/`proj_out`
(diffusers builds a conv there too when `use_linear_projection` is false).
"""
from __future__ import annotations

from typing import Mapping

from easel.models.configs import UNetConfig

# (ours, diffusers) module renames; every entry carries a weight and a bias.
TOP = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
       ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
SDXL_ADD = [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
SKIP = ("skip_connection", "conv_shortcut")
# Transformer parameters carry the same names in both layouts.
TRANSFORMER = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]
TRANSFORMER_BLOCK = ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                     "attn1.to_out.0.bias", "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
                     "attn2.to_out.0.weight", "attn2.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
                     "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                     "norm2.bias", "norm3.weight", "norm3.bias"]


def _wb(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}


def _resnet(ours: str, theirs: str, skip: bool) -> dict[str, str]:
    m: dict[str, str] = {}
    for a, b in RESNET + ([SKIP] if skip else []):
        m.update(_wb(f"{ours}.{a}", f"{theirs}.{b}"))
    return m


def _transformer(ours: str, theirs: str, depth: int) -> dict[str, str]:
    names = TRANSFORMER + [f"transformer_blocks.{k}.{p}" for k in range(depth) for p in TRANSFORMER_BLOCK]
    return {f"{ours}.{n}": f"{theirs}.{n}" for n in names}


def diffusers_map(cfg: UNetConfig) -> dict[str, str]:
    """Every easel (CompVis) UNet key -> its diffusers `UNet2DConditionModel` key, for this config."""
    m: dict[str, str] = {}
    for a, b in TOP + (SDXL_ADD if cfg.adm_in_channels else []):
        m.update(_wb(a, b))
    mc, nrb, depth = cfg.model_channels, cfg.num_res_blocks, cfg.transformer_depth
    chans = [mc * k for k in cfg.channel_mult]
    n, ch, skips = 1, mc, [mc]  # input_blocks.0 is conv_in
    for i, out in enumerate(chans):
        for j in range(nrb):
            m.update(_resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", ch != out))
            if depth[i]:
                m.update(_transformer(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depth[i]))
            n, ch = n + 1, out
            skips.append(ch)
        if i != len(chans) - 1:
            m.update(_wb(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            n += 1
            skips.append(ch)
    m.update(_resnet("middle_block.0", "mid_block.resnets.0", False))
    if cfg.transformer_depth_middle:
        m.update(_transformer("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth_middle))
    m.update(_resnet(f"middle_block.{2 if cfg.transformer_depth_middle else 1}", "mid_block.resnets.1", False))
    n = 0
    for u, i in enumerate(reversed(range(len(chans)))):  # diffusers counts up_blocks from the bottom
        for j in range(nrb + 1):
            m.update(_resnet(f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", ch + skips.pop() != chans[i]))
            ch = chans[i]
            if depth[i]:
                m.update(_transformer(f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}", depth[i]))
            if i and j == nrb:  # the upsampler follows the attention when there is one
                m.update(_wb(f"output_blocks.{n}.{2 if depth[i] else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
            n += 1
    return m


def _remap(sd: Mapping, table: dict[str, str], what: str) -> dict:
    missing = sorted(set(table) - set(sd))
    unexpected = sorted(set(sd) - set(table))
    if missing or unexpected:
        raise KeyError(
            f"{what} state dict does not match this UNet config: {len(missing)} missing keys "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Check that the config (preset) matches the "
            f"weights, and that prefixes such as `model.diffusion_model.` were stripped.")
    return {table[k]: v for k, v in sd.items()}


def to_diffusers(sd: Mapping, cfg: UNetConfig) -> dict:
    """Rename an easel/CompVis UNet state dict (no prefix) to diffusers keys; raises on any mismatch."""
    return _remap(sd, diffusers_map(cfg), "easel (CompVis-layout) UNet")


def from_diffusers(sd: Mapping, cfg: UNetConfig) -> dict:
    """Rename a diffusers `UNet2DConditionModel` state dict to easel/CompVis keys; raises on any mismatch."""
    inverse = {v: k for k, v in diffusers_map(cfg).items()}
    return _remap(sd, inverse, "diffusers UNet")


def diffusers_config(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """The `unet/config.json` of a diffusers folder for this UNet (`sample_size` = latent side, 64 for 512 px)."""
    levels, mid = len(cfg.channel_mult), cfg.transformer_depth_middle
    if not mid or cfg.transformer_depth[-1] not in (0, mid):
        raise ValueError(f"diffusers cannot express transformer_depth_middle={mid} with transformer_depth="
                         f"{cfg.transformer_depth}: its middle block reuses the last level's depth and always "
                         f"has attention. Save in the CompVis (single-file) layout instead.")
    attn = [d > 0 for d in cfg.transformer_depth]
    chans = [cfg.model_channels * k for k in cfg.channel_mult]
    heads = [cfg.heads(c)[0] for c in chans]
    # diffusers names the head COUNT `attention_head_dim`; the mid block uses the last level's count.
    head_field = cfg.num_heads if cfg.num_head_channels <= 0 else heads
    d = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": head_field,
        # A level without attention ignores its entry; the last one also sets the middle block's depth.
        "transformer_layers_per_block": [d or (mid if i == levels - 1 else 1)
                                         for i, d in enumerate(cfg.transformer_depth)],
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_groups,
    }
    if cfg.adm_in_channels:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return d


# diffusers options easel does not implement, with the value every SD1/SD2/SDXL UNet uses.
_FIXED = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
          "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "class_embed_type": None,
          "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
          "conv_out_kernel": 3, "time_cond_proj_dim": None, "encoder_hid_dim": None, "num_class_embeds": None,
          "dual_cross_attention": False, "only_cross_attention": False, "resnet_out_scale_factor": 1.0,
          "mid_block_type": "UNetMidBlock2DCrossAttn", "time_embedding_dim": None, "timestep_post_act": None,
          "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
          "encoder_hid_dim_type": None, "resnet_skip_time_act": False, "time_embedding_act_fn": None}


def _check_supported(d: Mapping) -> None:
    for key, want in _FIXED.items():
        got = d.get(key, want)
        if got != want and not (isinstance(want, (int, float)) and isinstance(got, (int, float))
                                and abs(got - want) < 1e-9):
            raise ValueError(f"unsupported diffusers UNet option {key}={got!r} (easel implements {want!r}): "
                             f"this is not an SD1/SD2/SDXL UNet")
    add_type, add_dim = d.get("addition_embed_type"), d.get("addition_time_embed_dim", 256)
    if add_type not in (None, "text_time") or add_dim not in (None, 256):
        raise ValueError(f"unsupported addition_embed_type={add_type!r} / addition_time_embed_dim={add_dim!r}: "
                         f"easel supports SDXL's 'text_time' with 256")
    for key in ("layers_per_block", "cross_attention_dim"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and len(set(v)) > 1:
            raise ValueError(f"per-level {key}={v!r} is not supported: easel uses one value for the whole UNet")
    depths = d.get("transformer_layers_per_block", 1)
    if d.get("reverse_transformer_layers_per_block") or (
            isinstance(depths, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in depths)):
        raise ValueError(f"per-block transformer depths {depths!r} are not supported: easel uses one depth per level")


def _head_fields(d: Mapping, chans: list[int]) -> dict:
    """Turn diffusers' head counts (misnamed `attention_head_dim`) into num_heads or num_head_channels."""
    counts = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    if isinstance(counts, int):
        return {"num_heads": counts, "num_head_channels": -1}
    counts = list(counts)
    widths = [c // n for c, n in zip(chans, counts)]
    if len(set(widths)) == 1 and all(c == n * widths[0] for c, n in zip(chans, counts)):
        return {"num_heads": -1, "num_head_channels": widths[0]}  # SD2/SDXL: fixed width (yaml: num_heads -1)
    if len(set(counts)) == 1:
        return {"num_heads": counts[0], "num_head_channels": -1}
    raise ValueError(f"attention heads {counts} for widths {chans} are neither a fixed count nor a fixed width")


def config_from_diffusers(d: Mapping) -> UNetConfig:
    """Build a `UNetConfig` from a diffusers `unet/config.json` dict (SD1.x, SD2.x, SDXL, inpainting)."""
    _check_supported(d)
    chans = list(d["block_out_channels"])
    mc = chans[0]
    if any(c % mc for c in chans):
        raise ValueError(f"block_out_channels {chans} are not multiples of the first level's width")
    attn = [t.startswith("CrossAttn") for t in d["down_block_types"]]
    if [t.startswith("CrossAttn") for t in reversed(d["up_block_types"])] != attn:
        raise ValueError(f"up_block_types {d['up_block_types']} do not mirror down_block_types {d['down_block_types']}")
    layers = d.get("transformer_layers_per_block", 1)
    layers = [layers] * len(chans) if isinstance(layers, int) else list(layers)
    cross = d["cross_attention_dim"]
    layers_per_block = d.get("layers_per_block", 2)
    num_res_blocks = layers_per_block if isinstance(layers_per_block, int) else layers_per_block[0]
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(c // mc for c in chans), num_res_blocks=num_res_blocks,
        transformer_depth=tuple(n if a else 0 for n, a in zip(layers, attn)),
        transformer_depth_middle=layers[-1],
        context_dim=cross[0] if isinstance(cross, (list, tuple)) else cross,
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=(d.get("projection_class_embeddings_input_dim") or 0
                         if d.get("addition_embed_type") == "text_time" else 0),
        norm_groups=d.get("norm_num_groups", 32),
        **_head_fields(d, chans),
    )
