"""A small Vision Transformer image encoder (Dosovitskiy et al. 2021) with CLIP's projection, for training
a text encoder contrastively (Radford et al. 2021) on ShapeWorld.

Stable Diffusion never runs this half of CLIP; it exists so that easel can train its own text encoder
the way CLIP's was trained. Layout follows CLIP's ViT: patch embedding, class token, learned positions,
pre-LayerNorm, bidirectional transformer blocks, final LayerNorm on the class token, linear projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easel.models.clip import quick_gelu


@dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT hyper-parameters; `projection_dim` is the shared image-text embedding width."""

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    projection_dim: int = 128
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block with full (not causal) self-attention."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.layer_norm2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        qkv = self.qkv(self.layer_norm1(x)).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.out_proj(y)
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class CLIPVisionModel(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> projected embedding (B, projection_dim)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} does not split into {cfg.num_attention_heads} heads")
        self.config = cfg
        width = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(cfg.num_patches + 1, width) * 0.02)
        self.pre_layrnorm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)  # CLIP's own spelling
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(width, cfg.projection_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        """Embed images; the class token's final state, projected."""
        if images.shape[-1] != self.config.image_size or images.shape[-2] != self.config.image_size:
            raise ValueError(f"the image encoder takes {self.config.image_size}px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = self.pre_layrnorm(torch.cat([cls, x], dim=1) + self.position_embedding)  # (B, N + 1, C)
        for layer in self.layers:
            x = layer(x)
        return self.visual_projection(self.post_layernorm(x[:, 0]))  # (B, P)
