"""AutoencoderKL: the Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", CompVis `ldm/modules/diffusionmodules/model.py`).

Module names equal the CompVis checkpoint keys after stripping `first_stage_model.`, so loading a
single-file checkpoint is a prefix strip. The encoder maps an image in [-1, 1] to the mean and log
variance of a diagonal Gaussian over latents 8x smaller per side; the decoder maps latents back.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from easel.models.configs import VAEConfig
from easel.models.layers import fast_layout

# Largest attention score matrix (bytes) the VAE lets SDPA's math kernel build; above it the flash kernel runs.
MATH_ATTENTION_BYTES = 16 << 20


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as in CompVis `Normalize` (eps 1e-6, affine)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no graph is being recorded (saves one full-size activation at inference)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 stages with a residual; 1x1 `nin_shortcut` when channels change."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        # Adding into conv2's fresh output is safe for autograd (conv does not save its output).
        return h.add_(self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in CompVis."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose width is all channels.
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        if B * (H * W) ** 2 * q.element_size() > MATH_ATTENTION_BYTES:
            # A transposed view (channel stride H*W) sends CPU SDPA to its math kernel, which builds the whole
            # (HW)^2 score matrix (16 GiB for a 256x256 latent); with unit stride it runs the flash kernel in
            # blocks. Small NCHW maps keep the math kernel: its scores are cheap there. On channels_last maps
            # (the fast path) q/k/v already have unit stride, so this is free and the flash kernel always runs.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding right and bottom by one (CompVis's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`."""

    def __init__(self, channels: list[int], groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(channels[:-1], channels[1:]))
        if resample == "down":
            self.downsample = Downsample(channels[-1])
        elif resample == "up":
            self.upsample = Upsample(channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        # The resampler is registered under the checkpoint's name, or not at all (last level).
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        prev = cfg.ch
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(Level([prev] + [w] * cfg.num_res_blocks, cfg.norm_groups, None if last else "down"))
            prev = w
        self.mid = MidBlock(prev, cfg.norm_groups)
        self.norm_out = _norm(prev, cfg.norm_groups)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, on_level: Callable[[], None] | None = None) -> torch.Tensor:
        """`on_level()` runs after each level (a point where a long encode can be cancelled by raising)."""
        h = self.conv_in(fast_layout(x))  # channels_last on the CPU: see easel.models.layers.FAST_PATHS
        for level in self.down:
            h = level(h)
            if on_level is not None:
                on_level()
        return self.conv_out(_silu(self.norm_out(self.mid(h)))).contiguous()  # 8 channels: a cheap copy


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[i]` is the level at the resolution of encoder level i, so the forward pass walks `up` backwards
    (diffusers' `up_blocks` count the other way).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        levels = []
        prev = widths[-1]
        for i in reversed(range(len(widths))):
            chans = [prev] + [widths[i]] * (cfg.num_res_blocks + 1)
            levels.append(Level(chans, cfg.norm_groups, "up" if i > 0 else None))
            prev = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(prev, cfg.norm_groups)
        self.conv_out = nn.Conv2d(prev, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, on_level: Callable[[], None] | None = None) -> torch.Tensor:
        """`on_level()` runs after each level (a point where a long decode can be cancelled by raising)."""
        h = self.mid(self.conv_in(fast_layout(z)))  # channels_last on the CPU: see easel.models.layers.FAST_PATHS
        for level in reversed(self.up):
            h = level(h)
            if on_level is not None:
                on_level()
        return self.conv_out(_silu(self.norm_out(h))).contiguous()  # 3 channels: a cheap copy


class AutoencoderKL(nn.Module):
    """The SD VAE: `encode` to a diagonal Gaussian over latents, `decode` latents to an image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor, tiled: bool | None = False, on_tile: Callable[[], None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, embed_dim, H/f, W/f).

        `tiled`: False encodes in one pass, True in overlapping blended tiles, None tiles when the one pass would
        exceed TILE_BUDGET_BYTES. `on_tile()` runs after each tile, or each level of one pass (raise in it to stop).
        """
        _check_size(x, self.config.downsample)
        f = self.config.downsample
        tile = self._tile(tiled, x.shape[0], x.shape[-2] // f, x.shape[-1] // f, x.element_size(), encode=True)
        if tile is None:
            moments = self.quant_conv(self.encoder(x, on_tile))
        else:
            moments = run_tiled(self._encode_full, x, tile, None, f, encode=True, on_tile=on_tile)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # CompVis DiagonalGaussianDistribution's clamp

    def _encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int | None = None, *,
               tiled: bool | None = False, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f) in about [-1, 1].

        With `tile` (latent cells), decode overlapping tiles of that size and cross-fade them (see `run_tiled`);
        else `tiled` as in `encode`. `on_tile()` runs after each tile, or each level of one pass (raise to stop).
        """
        if tile is None:
            tile = self._tile(tiled, z.shape[0], z.shape[-2], z.shape[-1], z.element_size(), encode=False)
            if tile is None:
                return self.decoder(self.post_quant_conv(z), on_tile)
            return run_tiled(self._decode_full, z, tile, overlap, self.config.downsample, on_tile=on_tile)
        return decode_tiled(self._decode_full, z, tile, overlap, self.config.downsample, on_tile)

    def _decode_full(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _tile(self, tiled: bool | None, batch: int, h: int, w: int, itemsize: int, encode: bool) -> int | None:
        """Tile side (latent cells) for a pass over (batch, h, w) latents, or None for one untiled pass."""
        if tiled is None:
            return auto_tile(self.config, batch, h, w, itemsize, encode)
        if not isinstance(tiled, bool):
            raise TypeError(f"tiled must be True, False or None (got {tiled!r}); give a tile size as tile=")
        return tile_size(self.config, itemsize, encode) if tiled else None

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = False, *, tiled: bool | None = None,
                       on_tile: Callable[[], None] | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> diffusion latents `(z - shift) * scale`; z is the mean or a posterior sample.

        Sampling noise is drawn on the CPU from `generator`, so a seed gives the same latents on any device.
        `tiled` None (default) tiles large images automatically; True/False force it (see `encode`).
        """
        mean, logvar = self.encode(x, tiled=tiled, on_tile=on_tile)
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * _cpu_randn(mean, generator)
        return (z - self.config.shift_factor) * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor, tiled: bool | None = None,
                       on_tile: Callable[[], None] | None = None, *, tile: int | None = None,
                       overlap: int | None = None) -> torch.Tensor:
        """Diffusion latents -> image in about [-1, 1].

        `tiled` None (default) decodes in tiles when one pass would exceed TILE_BUDGET_BYTES (so small latents
        decode exactly as an untiled pass), True/False force it; `tile` (latent cells) fixes the tile size.
        `on_tile()` runs after each tile (after each decoder level when untiled), so a caller can raise in it to
        cancel a long decode.
        """
        if isinstance(tiled, int) and not isinstance(tiled, bool):
            tile, tiled = tiled, True  # the old positional `tile`
        z = latents / self.config.scale_factor + self.config.shift_factor
        return self.decode(z, tile=tile, overlap=overlap, tiled=tiled, on_tile=on_tile)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction from a posterior sample, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * _cpu_randn(mean, generator)
        return self.decode(z), mean, logvar


def _cpu_randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the CPU in fp32 then moved."""
    noise = torch.randn(like.shape, generator=generator, device="cpu", dtype=torch.float32)
    return noise.to(like.device, like.dtype)


def _check_size(x: torch.Tensor, factor: int) -> None:
    """Reject images whose sides the encoder cannot halve evenly (the latent grid would be misaligned)."""
    if x.ndim != 4:
        raise ValueError(f"VAE.encode expects images shaped (B, C, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"image size {W}x{H} is not a multiple of {factor}: resize or crop it to a multiple "
                         f"of {factor} (e.g. {W // factor * factor}x{H // factor * factor})")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), spread evenly, overlapping >= `overlap`."""
    if size <= tile:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def fit_tile(size: int, tile: int, overlap: int) -> int:
    """The shortest tile length (<= `tile`) that covers `size` with as few tiles as `tile` needs: the same number
    of tiles, less work in the overlaps (512 cells in tiles of at most 362 overlapping by 90: two of 301)."""
    if size <= tile:
        return size
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return max(overlap + 1, math.ceil((size + (n - 1) * overlap) / n))


def _ramp(starts: list[int], i: int, tile: int, size: int, f: int) -> torch.Tensor:
    """Blend weight along one axis of tile i: rises linearly over the overlap with each neighbour."""
    length = min(tile, size) * f
    t = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if i > 0:
        w = torch.minimum(w, t / ((starts[i - 1] + tile - starts[i]) * f))
    if i < len(starts) - 1:
        w = torch.minimum(w, (length - t) / ((starts[i] + tile - starts[i + 1]) * f))
    return w


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int,
                 overlap: int | None, f: int, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Decode latent tiles of `tile` cells overlapping by `overlap` (default tile // 4) and blend them; one
    tile covering everything is a plain decode of the whole batch."""
    if z.shape[-2] <= tile and z.shape[-1] <= tile:
        _check_tile(tile, tile // 4 if overlap is None else overlap)
        return decode(z)
    return run_tiled(decode, z, tile, overlap, f, on_tile=on_tile)


def _check_tile(tile: int, overlap: int) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile ({tile}) must be >= 1 and overlap ({overlap}) in [0, tile)")


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int | None, f: int,
              encode: bool = False, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Run a decoder (latents -> pixels f times larger) or, with `encode`, an encoder (pixels -> latent moments)
    over tiles of at most `tile` latent cells a side overlapping by at least `overlap` (default tile // 4), one
    image at a time.

    Each output value is a weighted mean of the tiles covering it, weights ramping linearly to ~0 at a tile's
    inner edges, so there are no seams. Not bit-equal to one pass: GroupNorm statistics and the mid-block
    attention see one tile at a time. Memory: one image's tile plus the fp32 result.
    """
    overlap = tile // 4 if overlap is None else overlap
    _check_tile(tile, overlap)
    f_in, f_out = (f, 1) if encode else (1, f)
    h, w = x.shape[-2] // f_in, x.shape[-1] // f_in  # latent cells
    th, tw = fit_tile(h, tile, overlap), fit_tile(w, tile, overlap)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    ramps_y = [_ramp(ys, i, th, h, f_out).to(x.device) for i in range(len(ys))]
    ramps_x = [_ramp(xs, i, tw, w, f_out).to(x.device) for i in range(len(xs))]
    out = weight = None
    for b in range(x.shape[0]):
        for iy, y in enumerate(ys):
            for ix, x0 in enumerate(xs):
                part = x[b:b + 1, :, y * f_in:(y + th) * f_in, x0 * f_in:(x0 + tw) * f_in]
                piece = fn(part).float()  # (1, C_out, th*f_out, tw*f_out)
                if out is None:
                    out = torch.zeros(x.shape[0], piece.shape[1], h * f_out, w * f_out, device=x.device)
                    weight = torch.zeros(h * f_out, w * f_out, device=x.device)
                wt = ramps_y[iy][:, None] * ramps_x[ix][None, :]  # (th*f_out, tw*f_out)
                region = (slice(y * f_out, y * f_out + piece.shape[-2]),
                          slice(x0 * f_out, x0 * f_out + piece.shape[-1]))
                out[(b, slice(None), *region)] += piece[0] * wt
                if b == 0:
                    weight[region] += wt
                del piece, part
                if on_tile is not None:
                    on_tile()
    return (out / weight).to(x.dtype)


# ---- memory estimates (elements of activations; see easel.pipelines.memory for the request-level total) ----

def _resnet_elems(c_in: int, c_out: int) -> int:
    """Live activations per position inside a ResnetBlock: input, norm1, conv1, norm2, conv2, shortcut."""
    return 2 * c_in + 4 * c_out


def decode_elements(cfg: VAEConfig, batch: int, h: int, w: int) -> int:
    """Peak number of activation elements alive during an untiled decode of (batch, C, h, w) latents."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    cells = h * w
    peak = cells * (cfg.z_channels * 2 + max(_resnet_elems(widths[-1], widths[-1]), 10 * widths[-1]))
    prev = widths[-1]
    for i in reversed(range(len(widths))):
        area = cells * 4 ** (len(widths) - 1 - i)
        peak = max(peak, area * _resnet_elems(prev, widths[i]))
        if i > 0:  # the upsample: input, interpolated copy and conv output at twice the side
            peak = max(peak, area * (widths[i] + 8 * widths[i]))
        prev = widths[i]
    full = cells * cfg.downsample ** 2
    peak = max(peak, full * (2 * widths[0] + 2 * cfg.out_ch))
    return batch * peak


def encode_elements(cfg: VAEConfig, batch: int, height: int, width: int) -> int:
    """Peak number of activation elements alive during an untiled encode of (batch, 3, height, width) images."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    area = height * width
    peak = area * (cfg.in_channels + 2 * cfg.ch)
    prev = cfg.ch
    for i, wd in enumerate(widths):
        peak = max(peak, area * _resnet_elems(prev, wd))
        if i < len(widths) - 1:
            area = -(-area // 4)
        prev = wd
    peak = max(peak, area * 10 * widths[-1])  # mid-block attention: norm, q, k, v, their copies, output
    return batch * (peak + height * width * cfg.in_channels)


# Above this estimated working set a decode/encode runs in tiles. A fixed size, not a share of this machine's
# free memory, so that a request gives the same image on every machine; 1 GiB keeps a 512x512 SD image in one
# piece and makes SD's tiles 64 latent cells (512 px) wide, the size diffusers tiles at.
TILE_BUDGET_BYTES = 1 << 30
MIN_TILE = 16  # latent cells: smaller tiles see too little context for the blend to hide their edges


def auto_tile(cfg: VAEConfig, batch: int, h: int, w: int, itemsize: int, encode: bool = False) -> int | None:
    """Tile side (latent cells) when the untiled pass over (batch, h, w) latents would exceed the budget, else None."""
    if _elements(cfg, batch, h, w, encode) * itemsize <= TILE_BUDGET_BYTES:
        return None
    return tile_size(cfg, itemsize, encode)


def tile_size(cfg: VAEConfig, itemsize: int, encode: bool = False) -> int:
    """Largest square tile (latent cells, one image) whose working set fits TILE_BUDGET_BYTES."""
    per_cell = _elements(cfg, 1, 1, 1, encode) * itemsize
    return max(MIN_TILE, math.isqrt(TILE_BUDGET_BYTES // per_cell))


def tiled_elements(cfg: VAEConfig, batch: int, h: int, w: int, tile: int, encode: bool = False) -> int:
    """Peak elements of a tiled pass: one image's tile at a time, plus the blended result and its weights."""
    f = cfg.downsample
    tile_work = _elements(cfg, 1, min(tile, h), min(tile, w), encode)
    out = batch * h * w * (2 * cfg.embed_dim + 1) if encode else (batch * cfg.out_ch + 1) * h * w * f * f
    return tile_work + out


def _elements(cfg: VAEConfig, batch: int, h: int, w: int, encode: bool) -> int:
    f = cfg.downsample
    return encode_elements(cfg, batch, h * f, w * f) if encode else decode_elements(cfg, batch, h, w)
