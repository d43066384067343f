"""ControlNet (Zhang, Rao & Agrawala 2023) for SD 1.x / 2.x / XL, in the CompVis `cldm` layout.

A ControlNet is a trainable copy of the UNet's encoder (`input_blocks`, `middle_block`, `time_embed`,
`label_emb` for SDXL) that also sees a condition image (edges, a sketch, a depth map). The image enters through
`input_hint_block` (a few stride-2 convs down to the latent grid, added after the first input block); every input
block's output and the middle block's leave through a zero-initialised 1x1 conv (`zero_convs.N.0`,
`middle_block_out.0`). Those outputs, scaled, are added to the UNet's skip connections and middle block
(`UNetModel.forward(..., control=residuals)`), which is all a ControlNet changes. Module names equal the checkpoint
keys of ControlNet 1.1 files after stripping `control_model.`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from easel.models.configs import ModelConfig, UNetConfig
from easel.models.layers import Downsample, ResBlock, SpatialTransformer, timestep_embedding
from easel.models.unet import Block

# Widths of the hint block's conv pairs (CompVis `input_hint_block`, diffusers' conditioning embedding): one
# stride-2 conv between consecutive widths, so 4 widths bring a 512 px hint to the 64 px latent grid.
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder layout of `unet` plus the hint block's input channels and widths."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_CHANNELS
    # ControlNet 1.1 "shuffle": residuals averaged over space and given to the prompt half only.
    global_average_pooling: bool = False

    @property
    def downsample(self) -> int:
        """Pixels of the hint image per latent cell (8 for every released ControlNet)."""
        return 2 ** (len(self.hint_block_channels) - 1)

    @staticmethod
    def for_model(model: ModelConfig, **options) -> "ControlNetConfig":
        """The ControlNet of a model: its UNet's encoder (4 latent channels even for an inpainting UNet, as
        released ControlNets take) with a hint block that brings pixels down by the VAE's factor."""
        levels = int(math.log2(model.vae.downsample)) + 1  # one stride-2 conv per halving
        if 2 ** (levels - 1) != model.vae.downsample or levels > len(HINT_CHANNELS):
            raise ValueError(f"no ControlNet hint block for a VAE that downsamples by {model.vae.downsample} "
                             f"(easel builds them for 1, 2, 4 and 8)")
        unet = dataclasses.replace(model.unet, in_channels=model.unet.out_channels)
        return ControlNetConfig(unet, hint_block_channels=HINT_CHANNELS[:levels], **options)


def encoder_skip_channels(cfg: UNetConfig) -> list[int]:
    """Channels of each input block's output (the UNet's skip connections), then the middle block's."""
    chans, ch = [cfg.model_channels], cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.model_channels * mult
        chans += [ch] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            chans.append(ch)
    return chans + [ch]


class ControlNet(nn.Module):
    """(noisy latent, hint image, timestep, text[, SDXL vector]) -> one residual per UNet skip, then the middle's."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        mc, emb_dim = u.model_channels, u.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if u.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(u.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        self.input_hint_block = _hint_block(cfg.hint_channels, cfg.hint_block_channels, mc)
        self._build_encoder()
        chans = encoder_skip_channels(u)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans[:-1])
        self.middle_block_out = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1))
        for conv in [*(z[0] for z in self.zero_convs), self.middle_block_out[0], self.input_hint_block[-1]]:
            nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)  # a fresh ControlNet changes nothing

    def _build_encoder(self) -> None:
        """`input_blocks` and `middle_block` exactly as the UNet builds them (same keys, same shapes)."""
        u = self.cfg.unet
        mc, emb_dim, g = u.model_channels, u.model_channels * 4, u.norm_groups
        transformer = lambda ch, depth: _transformer(u, ch, depth)  # noqa: E731
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(u.in_channels, mc, 3, padding=1))])
        ch = mc
        for level, mult in enumerate(u.channel_mult):
            for _ in range(u.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mc * mult, g)]
                ch = mc * mult
                if u.transformer_depth[level]:
                    layers.append(transformer(ch, u.transformer_depth[level]))
                self.input_blocks.append(Block(*layers))
            if level != len(u.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
        middle = [ResBlock(ch, emb_dim, ch, g)]
        if u.transformer_depth_middle:
            middle.append(transformer(ch, u.transformer_depth_middle))
        self.middle_block = Block(*middle, ResBlock(ch, emb_dim, ch, g))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.middle_block_out[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals for latents `x` (B, C, h, w) and `hint` (B, 3, h*f, w*f) in [0, 1], in the UNet's skip order
        (input block 0 first), the middle block's last; in x's dtype."""
        u, dtype = self.cfg.unet, self.dtype
        if u.adm_in_channels and y is None:
            raise ValueError("this ControlNet is an SDXL one (it takes the pooled-text vector y): use it with SDXL")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = self.time_embed(timestep_embedding(timesteps, u.model_channels).to(dtype))  # (B, 4 mc)
        if u.adm_in_channels:
            emb = emb + self.label_emb(y.to(dtype))
        guided = self.input_hint_block(hint.to(dtype))  # (B, mc, h, w)
        h, context = x.to(dtype), context.to(dtype)
        outs = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided  # the condition joins after the first conv, as in cldm and diffusers
            outs.append(zero(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        if self.cfg.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return [o.to(x.dtype) for o in outs]


def _transformer(u: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
    """A SpatialTransformer as the UNet builds it at this width."""
    heads, head_dim = u.heads(channels)
    if heads * head_dim != channels:
        raise ValueError(f"{channels} channels do not split into heads (num_heads={u.num_heads}, "
                         f"num_head_channels={u.num_head_channels})")
    return SpatialTransformer(channels, heads, head_dim, depth, u.context_dim, u.use_linear_in_transformer,
                              u.norm_groups)


def _hint_block(hint_channels: int, widths: tuple[int, ...], out: int) -> nn.Sequential:
    """conv, SiLU, (conv, SiLU, stride-2 conv, SiLU) per width step, zero conv: the CompVis indices 0, 2, ... 4L-2."""
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out, 3, padding=1))
    return nn.Sequential(*layers)


def check_fits(cfg: ControlNetConfig, unet: UNetConfig, name: str = "this ControlNet") -> None:
    """Raise a readable error when the ControlNet's residuals cannot be added to this UNet's skips."""
    ours, theirs = encoder_skip_channels(cfg.unet), encoder_skip_channels(unet)
    if ours != theirs or cfg.unet.context_dim != unet.context_dim:
        raise ValueError(
            f"{name} does not fit the model: it makes residuals of {ours} channels for text {cfg.unet.context_dim} "
            f"wide, the model's UNet has skips of {theirs} channels and text {unet.context_dim} wide. Use a "
            "ControlNet made for this model's family (an SD1.5 ControlNet with SD1.x models, SDXL with SDXL)")


