"""Building blocks of the denoising UNet: timestep embedding, ResBlock, cross-attention transformer.

Module names equal the original CompVis checkpoint keys (`in_layers.0`, `emb_layers.1`,
`transformer_blocks.0.attn2.to_k`, `ff.net.0.proj`, ...), so a checkpoint loads by stripping a prefix.
Where the original has a parameter-free module (SiLU, Dropout) we keep an `nn.Identity`/`nn.SiLU` in its
slot only so that the indices of the modules with weights stay the same.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn


# Lossless fast paths (same results up to float rounding), on unless EASEL_FAST_PATHS=0: 4-D activations on the CPU
# run in channels_last, so oneDNN convolutions read and write them directly instead of reordering NCHW to their
# blocked layout and back around every call, GroupNorm/SiLU/upsampling keep that layout, and the VAE attention's
# q/k/v come out contiguous for SDPA's flash kernel.
FAST_PATHS = os.environ.get("EASEL_FAST_PATHS", "1") != "0"
# The UNet is left NCHW unless EASEL_UNET_CHANNELS_LAST=1: on an AVX512-BF16 Xeon without AMX its channels_last
# step measured 1.5x slower in fp32 and 1.1x slower in bf16 (its convs are mostly at small maps with many channels,
# where oneDNN's NCHW kernels win); see bench/README.md. The VAE (large maps) gains and stays channels_last.
UNET_CHANNELS_LAST = os.environ.get("EASEL_UNET_CHANNELS_LAST", "0") == "1"


@contextlib.contextmanager
def exact_paths():
    """Within the block, run the reference NCHW layouts instead of the fast paths (tests compare the two)."""
    global FAST_PATHS
    saved, FAST_PATHS = FAST_PATHS, False
    try:
        yield
    finally:
        FAST_PATHS = saved


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` in channels_last when the fast paths are on and it is a 4-D CPU tensor; else `x` unchanged."""
    if FAST_PATHS and x.ndim == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _fast_layout_in(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (fast_layout(args[0]), *args[1:]) if args else args, kwargs


def _plain_layout_out(module: nn.Module, args: tuple, kwargs: dict, out):
    # Callers may `.view` the result; a 4-channel latent costs next to nothing to copy back.
    return out.contiguous() if isinstance(out, torch.Tensor) else out


def use_fast_layout(module: nn.Module) -> nn.Module:
    """Run `module` (a UNet or ControlNet: first argument a 4-D feature map) on channels_last activations when
    the fast paths are on, returning a contiguous NCHW result; weights and state dict are left as they are."""
    if not getattr(module, "_easel_fast_layout", False):
        module.register_forward_pre_hook(_fast_layout_in, with_kwargs=True)
        module.register_forward_hook(_plain_layout_out, with_kwargs=True)
        module._easel_fast_layout = True
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first (CompVis; Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(groups: int, channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the UNet's group count; clear error if the channels cannot be split into groups."""
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups: "
                         f"choose model_channels / norm_groups so that every level's width divides evenly")
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm+SiLU, the timestep embedding added in between, and a residual path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is dropout in the original (0 for SD inference); Identity keeps `out_layers.3` in place.
        self.out_layers = nn.Sequential(group_norm(groups, out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Written out (not `self.in_layers(x)`) to run SiLU and the adds in place: fewer large allocations.
        # Autograd-safe: GroupNorm and conv backward need their inputs, never the outputs overwritten here.
        norm1, _, conv1 = self.in_layers
        h = conv1(F.silu(norm1(x), inplace=True))  # (B, C_out, H, W)
        h += self.emb_layers(emb)[:, :, None, None]
        norm2, _, _, conv2 = self.out_layers
        h = conv2(F.silu(norm2(h), inplace=True))
        return h.add_(self.skip_connection(x))


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is None), fused SDPA."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # `to_out.0`; the original's dropout has no weights

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, T, _ = x.shape
        S = context.shape[1]
        # Split heads as strided views: no copies. Their last dimension keeps unit stride, which CPU SDPA's flash
        # kernel needs; without it SDPA falls back to the math kernel and builds the whole (T, S) score matrix.
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, d)
        k = self.to_k(context).view(B, S, self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        v = self.to_v(context).view(B, S, self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, h * d); CPU SDPA already lays out (B, T, h, d)
        return self.to_out(out)


SCORE_BYTES = 64 * 2**20  # heads go through the softmax in groups whose (B, heads, T, S) scores stay under this


def attention_probs(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of a cross-attention layer, averaged over heads: (B, T, S) in float32.

    Q and K come from the layer's own projections. Heads go in groups so that the score tensor stays under
    SCORE_BYTES (at 1024 px the finest level has 16384 queries). Differentiable: training can steer them."""
    B, T, _ = x.shape
    S = context.shape[1]
    q = attn.to_q(x).float().view(B, T, attn.heads, -1).transpose(1, 2)  # (B, h, T, d)
    k = attn.to_k(context).float().view(B, S, attn.heads, -1).transpose(1, 2)  # (B, h, S, d)
    q = q * q.shape[-1] ** -0.5  # scaling q (d values per query) is cheaper than scaling the scores (S per query)
    group = max(1, min(attn.heads, SCORE_BYTES // max(1, B * T * S * 4)))
    total = torch.zeros(B, T, S, device=q.device)
    for h in range(0, attn.heads, group):
        total += (q[:, h:h + group] @ k[:, h:h + group].transpose(-1, -2)).softmax(dim=-1).sum(dim=1)  # (B, T, S)
    return total / attn.heads


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, T, inner)
        return F.gelu(gate).mul_(x)  # in place: saves one (B, T, 4C) buffer


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        # `ff.net.0` GEGLU, `.1` dropout (no weights), `.2` the output projection.
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on the text by cross-attention."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 linear: bool, groups: int = 32):
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(groups, channels, eps=1e-6)
        # SD1 checkpoints store 1x1 convs (C, C, 1, 1); SD2/SDXL linears (C, C). Same maths either way.
        proj = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = proj(inner, channels)

    @staticmethod
    def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv is a linear map over channels; applying it on (B, HW, C) avoids a layout round trip.
        return F.linear(x, layer.weight.flatten(1), layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C); free when x is channels_last
        h = self._linear(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self._linear(self.proj_out, h)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W) view
        return x + h  # x first: the sum comes out in x's (contiguous NCHW) layout, in one pass


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (rounds up for odd sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (the matching skip's size, normally 2x), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
