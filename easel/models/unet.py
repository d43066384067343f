"""The denoising UNet of Stable Diffusion 1.x / 2.x / XL (CompVis `openaimodel.UNetModel`, SGM layout).

Module names equal the original checkpoint keys after stripping `model.diffusion_model.`:
`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, `time_embed`, `label_emb` (SDXL), `out`.
One config (`UNetConfig`) describes all three families; see `easel.models.configs`.
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch
from torch import nn

from easel.models.configs import UNetConfig
from easel.models.layers import (Downsample, ResBlock, SpatialTransformer, Upsample, group_norm,
                                 timestep_embedding)

SDXL_TIME_EMBED_DIM = 256  # width of each of SDXL's six size/crop embeddings

# Hook for opt-in lossy accelerations (easel.pipelines.accel, DeepCache): while set, `UNetModel.forward` hands its
# call to `route(unet, x, timesteps, context, y, control)`, which returns the output or None (run as usual). A context
# variable and not a patched method, so that it applies to one thread's sampling run only and every other caller of
# the same module (another server worker, the exact path) is untouched.
FORWARD_ROUTE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("unet_forward_route", default=None)


class Block(nn.Sequential):
    """A CompVis `TimestepEmbedSequential`: hands the timestep embedding and text to the layers that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise-prediction UNet: (noisy latent, timestep, text tokens[, SDXL vector]) -> eps or v."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:
            # Nested Sequential reproduces the SGM key `label_emb.0.0` (a class-embedding container).
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        self._build_levels()
        self.out = nn.Sequential(group_norm(cfg.norm_groups, mc), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self._zero_init()

    def _transformer(self, channels: int, depth: int) -> SpatialTransformer:
        cfg = self.cfg
        heads, head_dim = cfg.heads(channels)
        if heads * head_dim != channels:
            raise ValueError(f"{channels} channels do not split into heads (num_heads={cfg.num_heads}, "
                             f"num_head_channels={cfg.num_head_channels}): pick values that divide every level")
        return SpatialTransformer(channels, heads, head_dim, depth, cfg.context_dim,
                                  cfg.use_linear_in_transformer, cfg.norm_groups)

    def _build_levels(self) -> None:
        """Create input/middle/output blocks in checkpoint order, tracking the skip channels."""
        cfg = self.cfg
        mc, emb_dim, g, levels = cfg.model_channels, cfg.model_channels * 4, cfg.norm_groups, len(cfg.channel_mult)
        if len(cfg.transformer_depth) != levels:
            raise ValueError(f"transformer_depth {cfg.transformer_depth} needs one entry per level "
                             f"of channel_mult {cfg.channel_mult}")
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mc * mult, g)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(self._transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skips.append(ch)
        middle = [ResBlock(ch, emb_dim, ch, g)]
        if cfg.transformer_depth_middle:
            middle.append(self._transformer(ch, cfg.transformer_depth_middle))
        self.middle_block = Block(*middle, ResBlock(ch, emb_dim, ch, g))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mc * mult, g)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(self._transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))  # lands at `.1` or `.2` depending on attention
                self.output_blocks.append(Block(*layers))

    def _zero_init(self) -> None:
        """Zero the last layer of every residual branch and the output conv, as CompVis does for training."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.out_layers[3].weight), nn.init.zeros_(m.out_layers[3].bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.out[2].weight), nn.init.zeros_(self.out[2].bias)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights; inputs are cast to it and the output back to the input's dtype."""
        return self.out[2].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Predict eps (or v) for latents `x` (B, C, H, W) at `timesteps` (B,) or scalar, text `context` (B, T, D).
        `control`: ControlNet residuals, one per skip connection and the middle block's last (cldm's
        ControlledUnetModel adds them there)."""
        route = FORWARD_ROUTE.get()
        if route is not None:
            out = route(self, x, timesteps, context, y, control)
            if out is not None:
                return out
        return self.forward_split(x, timesteps, context, y, control)[0]

    def forward_split(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None, *,
                      branch: int | None = None, deep: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, split at skip branch `branch` for feature caching (DeepCache, Ma et al. 2023): returns (output,
        the features entering output block L-1-branch, which pairs with input block `branch`). With `deep` (those
        features from an earlier call), only input blocks 0..branch and output blocks L-1-branch.. run."""
        cfg, dtype = self.cfg, self.dtype
        if cfg.adm_in_channels and y is None:
            raise ValueError("this UNet (SDXL-style, adm_in_channels>0) needs `y`: build it with `sdxl_vector`")
        if y is not None and not cfg.adm_in_channels:
            raise ValueError("this UNet has no `label_emb` (adm_in_channels=0): pass y=None")
        if x.shape[1] != cfg.in_channels:
            hint = (" (an inpainting UNet: latent + mask + masked-image latent; use inpainting)"
                    if cfg.in_channels == 9 else "")
            raise ValueError(f"this UNet takes {cfg.in_channels} input channels{hint}, got x with {x.shape[1]}")
        if branch is not None and not 0 <= branch < len(self.input_blocks):
            raise ValueError(f"branch must be in [0, {len(self.input_blocks)}) (got {branch})")
        if deep is not None and branch is None:
            raise ValueError("forward_split: `deep` features need the `branch` they were taken at")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))  # (B, 4 mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"got {len(control)} ControlNet residuals for a UNet with {len(self.input_blocks)} skips "
                             "and a middle block")
        h, context = x.to(dtype), context.to(dtype)
        n_in = len(self.input_blocks) if deep is None else branch + 1  # the shallow path stops at `branch`
        skips = []
        for block in self.input_blocks[:n_in]:
            h = block(h, emb, context)
            skips.append(h)
        if deep is None:
            h = self.middle_block(h, emb, context)
        if control is not None:
            control = [c.to(dtype) for c in control]
            if deep is None:
                h = h + control.pop()
            skips = [s + c for s, c in zip(skips, control)]  # zip: only the skips that ran
        first = 0 if deep is None else len(self.output_blocks) - 1 - branch
        if deep is not None:
            h = deep.to(dtype)
        kept = None
        for j, block in enumerate(self.output_blocks[first:], start=first):
            if branch is not None and j == len(self.output_blocks) - 1 - branch:
                kept = h  # the deep part's features, what a cached call reuses
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            # An upsampler must land exactly on the next skip's size (odd sizes round up on the way down).
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype), kept


def sdxl_size_embedding(original_size: tuple[int, int], crop_coords: tuple[int, int],
                        target_size: tuple[int, int], batch: int) -> torch.Tensor:
    """SDXL micro-conditioning: the six ints (orig h, w, crop top, left, target h, w) each as a 256-d embedding."""
    ids = torch.tensor([*original_size, *crop_coords, *target_size], dtype=torch.float32)  # (6,)
    emb = timestep_embedding(ids, SDXL_TIME_EMBED_DIM).reshape(1, -1)  # (1, 6 * 256)
    return emb.expand(batch, -1)


def sdxl_vector(pooled: torch.Tensor, original_size: tuple[int, int] = (1024, 1024),
                crops: tuple[int, int] = (0, 0), target_size: tuple[int, int] = (1024, 1024)) -> torch.Tensor:
    """SDXL's `y` (B, 2816): pooled text (B, 1280) followed by the size/crop embeddings, as SGM builds it."""
    sizes = sdxl_size_embedding(original_size, crops, target_size, pooled.shape[0]).to(pooled)
    return torch.cat([pooled, sizes], dim=-1)  # (B, 1280 + 6 * 256)
