"""The architecture of the loaded model, read from its modules: the UNet's blocks with their resolution, channels,
cross-attention, parameters and FLOPs for one call, each component's parameters, and the tensor sizes from the
prompt to the pixels."""
from __future__ import annotations

import torch
from torch import nn


def _params(module: nn.Module | None) -> int:
    """Number of parameters of a module (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def unet_blocks(unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """The UNet's top-level blocks in call order: (name, kind, module); together they hold every parameter."""
    blocks = [("time_embed", "timestep embedding", unet.time_embed)]
    if hasattr(unet, "label_emb"):
        blocks.append(("label_emb", "SDXL size/pooled-text embedding", unet.label_emb))
    blocks += [(f"input_blocks.{i}", "down", b) for i, b in enumerate(unet.input_blocks)]
    blocks.append(("middle_block", "middle", unet.middle_block))
    blocks += [(f"output_blocks.{i}", "up", b) for i, b in enumerate(unet.output_blocks)]
    blocks.append(("out", "output", unet.out))
    return blocks


def _layers(block: nn.Module) -> str:
    """The block's layer types in order, e.g. 'ResBlock + SpatialTransformer(depth 1)'."""
    names = []
    for layer in (block if isinstance(block, nn.Sequential) else [block]):
        name = type(layer).__name__
        if name == "SpatialTransformer":
            name += f"(depth {len(layer.transformer_blocks)})"
        names.append(name)
    return " + ".join(names)


def _cross_attention(block: nn.Module) -> int:
    """Number of cross-attention layers (attn2) inside a block."""
    return sum(1 for name, _ in block.named_modules() if name.endswith("attn2"))


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU scaled_dot_product_attention, which FlopCounterMode does not count by itself."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q, k, v)


def _flop_counter():
    """A FlopCounterMode that also counts attention on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


@torch.no_grad()
def unet_table(model, size: tuple[int, int]) -> list[dict]:
    """One row per UNet block for one call on a (1, C, h/f, w/f) latent of an image of `size` (w, h) with a
    77-token context: name, kind, layers, input and output shapes, cross-attention layers, parameters and FLOPs
    (FlopCounterMode)."""
    unet, cfg = model.unet, model.config
    f = latent_factor(model)
    if size[0] % f or size[1] % f:
        raise ValueError(f"the size {size[0]}x{size[1]} must be a multiple of {f} (the VAE's downsampling factor)")
    device, dtype = next(unet.parameters()).device, unet.dtype
    x = torch.zeros(1, cfg.unet.in_channels, size[1] // f, size[0] // f, device=device, dtype=dtype)
    context = torch.zeros(1, 77, cfg.unet.context_dim, device=device, dtype=dtype)
    y = torch.zeros(1, cfg.unet.adm_in_channels, device=device, dtype=dtype) if cfg.unet.adm_in_channels else None
    rows, hooks, counter = [], [], _flop_counter()
    for name, kind, block in unet_blocks(unet):
        row = {"block": name, "kind": kind, "layers": _layers(block), "cross_attention": _cross_attention(block),
               "params": _params(block)}
        rows.append(row)
        # The counter's running total before and after each block gives the block's FLOPs (blocks do not nest).
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, row=row: row.update(_start=counter.get_total_flops(), input=_shape(args[0]))))
        hooks.append(block.register_forward_hook(
            lambda m, args, out, row=row: row.update(flops=counter.get_total_flops() - row.pop("_start"),
                                                     output=_shape(out))))
        for layer in block.modules():  # where the words come in: the resolution the transformer runs at
            if type(layer).__name__ == "SpatialTransformer":
                hooks.append(layer.register_forward_pre_hook(
                    lambda m, args, row=row: row.update(cross_attention_at=_wxh(args[0]))))
    try:
        with counter:
            unet(x, torch.tensor([999], device=device), context, y)
    finally:
        for h in hooks:
            h.remove()
    for row in rows:
        out = row.get("output", [])
        row["resolution"] = f"{out[-1]}x{out[-2]}" if len(out) == 4 else "-"
    return rows


def _wxh(t: torch.Tensor) -> str:
    """A feature map's resolution as width x height, as image sizes are written."""
    return f"{t.shape[-1]}x{t.shape[-2]}"


def _shape(t) -> list[int]:
    """The shape of a tensor as a list (JSON-friendly)."""
    return list(t.shape) if isinstance(t, torch.Tensor) else []


def latent_factor(model) -> int:
    """How many pixels one latent position covers along a side (8 for SD: the VAE halves the size per level)."""
    return 2 ** (len(model.config.vae.ch_mult) - 1)


def components(model) -> list[dict]:
    """Parameters per component: each text encoder, the UNet, the VAE encoder and decoder; they sum to the model."""
    rows = [{"component": f"text encoder {i + 1}", "params": _params(enc)} for i, enc in enumerate(model.text_encoders)]
    rows.append({"component": "UNet", "params": _params(model.unet)})
    vae_parts = _params(model.vae)
    encoder = sum(_params(m) for n, m in model.vae.named_children() if "enc" in n or n == "quant_conv")
    rows += [{"component": "VAE encoder", "params": encoder},
             {"component": "VAE decoder", "params": vae_parts - encoder}]
    rest = _params(model) - sum(r["params"] for r in rows)
    if rest:
        rows.append({"component": "other", "params": rest})
    return rows


def tensor_path(model, size: tuple[int, int]) -> list[dict]:
    """The tensor sizes from prompt to pixels for one image of `size` (w, h): tokens, text embeddings, the latent,
    the UNet's prediction, the decoded image."""
    cfg, f = model.config, latent_factor(model)
    rows = [{"stage": f"prompt -> token ids (tokenizer {i + 1})", "shape": [1, enc.max_position_embeddings]}
            for i, enc in enumerate(cfg.text_encoders)]
    rows += [{"stage": f"text encoder {i + 1} -> hidden states", "shape": [1, enc.max_position_embeddings,
                                                                           enc.hidden_size]}
             for i, enc in enumerate(cfg.text_encoders)]
    rows.append({"stage": "context (cross-attention keys/values)", "shape": [1, 77, cfg.unet.context_dim]})
    if cfg.unet.adm_in_channels:
        rows.append({"stage": "SDXL vector (pooled text + sizes)", "shape": [1, cfg.unet.adm_in_channels]})
    latent = [1, cfg.vae.embed_dim, size[1] // f, size[0] // f]
    rows.append({"stage": "random latent (the sampler's start)", "shape": latent})
    if cfg.unet.in_channels != cfg.vae.embed_dim:
        rows.append({"stage": "UNet input (latent + mask + masked image)",
                     "shape": [1, cfg.unet.in_channels, *latent[2:]]})
    rows.append({"stage": f"UNet output ({cfg.prediction} prediction), every step", "shape": [1, cfg.unet.out_channels,
                                                                                               *latent[2:]]})
    rows.append({"stage": "VAE decoder -> image", "shape": [1, cfg.vae.out_ch, size[1], size[0]]})
    return rows


def describe(model, size: tuple[int, int] | None = None) -> dict:
    """Everything `easel inspect model` shows, as JSON-friendly data, for one image of `size` (w, h; default: the
    model's default size)."""
    size = size or (model.config.default_size,) * 2
    blocks = unet_table(model, size)
    return {"model": model.config.name, "size": list(size), "total_params": _params(model),
            "components": components(model), "unet_blocks": blocks, "unet_flops": sum(b["flops"] for b in blocks),
            "cross_attention_at": sorted({b["cross_attention_at"] for b in blocks if b["cross_attention"]},
                                         key=lambda r: -int(r.split("x")[0])),
            "tensors": tensor_path(model, size)}


def _channels(shape: list[int] | None) -> str:
    """The channel count of a recorded shape, or '-'."""
    return str(shape[1]) if shape and len(shape) > 1 else "-"


def _xattn(row: dict) -> str:
    """'2 @ 8x8': the block's cross-attention layers and their resolution, or nothing."""
    return f"{row['cross_attention']} @ {row['cross_attention_at']}" if row["cross_attention"] else ""


def _num(n: float) -> str:
    """A count with a unit: 1.23 G, 45.6 M, 7.89 k."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(int(n))


def format_report(info: dict) -> str:
    """The tables as text."""
    lines = [f"model {info['model']}: {_num(info['total_params'])} parameters ({info['total_params']:,})", ""]
    lines += [f"  {r['component']:<16} {_num(r['params']):>9}" for r in info["components"]]
    lines += ["", f"UNet, one call at {info['size'][0]}x{info['size'][1]} px: {_num(info['unet_flops'])}FLOPs; "
              f"cross-attention at {', '.join(info['cross_attention_at']) or 'no level'}", ""]
    head = (f"{'block':<17} {'kind':<8} {'res':>7} {'in -> out channels':>19} {'xattn':>10} {'params':>9} "
            f"{'FLOPs':>9}  layers")
    lines += [head, "-" * len(head)]
    for b in info["unet_blocks"]:
        chans = f"{_channels(b.get('input'))} -> {_channels(b.get('output'))}"
        lines.append(f"{b['block']:<17} {b['kind'].split()[0]:<8} {b['resolution']:>7} {chans:>19} "
                     f"{_xattn(b):>10} {_num(b['params']):>9} {_num(b['flops']):>9}  {b['layers']}")
    lines += ["", "tensor sizes, prompt to pixels:"]
    lines += [f"  {r['stage']:<45} {' x '.join(str(d) for d in r['shape'])}" for r in info["tensors"]]
    return "\n".join(lines)
