"""Variation seeds (A1111's "Extra" seed options): blend a seed's noise with a subseed's by spherical
interpolation, and keep a composition found at one size when the image size changes ("resize seed from").

The draws follow A1111 (`modules/rng.py`, `ImageRNG.first`) with its CPU random source, so a seed,
subseed and strength written in an A1111 infotext select the same starting noise here:

- the seed's own generator draws one full-size noise tensor and then continues for ancestral samplers;
- the subseed's noise and the noise of a resized seed come from fresh generators, drawn at the
  "resize from" size, blended there, and pasted centred into the full-size noise.
"""
from __future__ import annotations

import torch

from easel.samplers import NoiseSource

# Above this mean cosine the two noises point the same way and slerp's sin(omega) ~ 0 would divide by
# ~0; A1111 falls back to a straight linear blend there.
PARALLEL_DOT = 0.9995


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) along `dim` (Shoemake 1985; A1111 `rng.slerp`).

    A1111 passes one image's noise (C, H, W) and normalises along dim 1, so every (channel, column)
    vector of H values is interpolated on its own great circle; `dim=1` keeps that, so A1111 variation
    seeds give the same noise. Nearly parallel inputs fall back to linear interpolation.
    """
    a_unit = a / a.norm(dim=dim, keepdim=True)
    b_unit = b / b.norm(dim=dim, keepdim=True)
    dot = (a_unit * b_unit).sum(dim)  # (C, W) for a (C, H, W) input
    if dot.mean() > PARALLEL_DOT:
        # A1111 writes this as a*t + b*(1-t) (weights swapped); it only fires when a ~ b, where
        # both agree, so the textbook order is kept.
        return a * (1 - t) + b * t
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    wa = (torch.sin((1.0 - t) * omega) / so).unsqueeze(dim)
    wb = (torch.sin(t * omega) / so).unsqueeze(dim)
    return wa * a + wb * b


def variation_noise(seeds: list[int], shape: tuple[int, ...], subseeds: list[int] | None = None,
                    subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                    latent_factor: int = 8) -> tuple[torch.Tensor, NoiseSource]:
    """Unit noise (B, C, h, w) per seed, blended towards each subseed's noise by `subseed_strength`
    (slerp) and drawn at `seed_resize_from` = (width, height) pixels then pasted centred (A1111 variations).

    With strength 0 and no resize this is exactly `common.initial_noise`. The NoiseSource continues each
    seed's own generator (after its one full-size draw), for ancestral and SDE samplers.
    """
    shape = tuple(shape)
    if subseeds is not None and not subseeds and subseed_strength != 0:
        raise ValueError("subseed_strength is set but subseeds is empty: pass one subseed per image")
    small = _drawn_shape(shape, seed_resize_from, latent_factor)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    mixing = subseeds is not None and subseed_strength != 0
    images = []
    for i, (seed, gen) in enumerate(zip(seeds, gens)):
        # Unresized noise comes from the seed's own generator; resized noise from a fresh one, because
        # the own generator must draw the full-size canvas (and stay in step for the sampler).
        noise = torch.randn(shape, generator=gen) if small == shape else _randn(seed, small)
        if mixing:
            sub = subseeds[i] if i < len(subseeds) else 0  # A1111: missing subseeds count as 0
            noise = slerp(subseed_strength, noise, _randn(sub, small))
        if small != shape:
            noise = paste_centred(noise, torch.randn(shape, generator=gen))
        images.append(noise)
    return torch.stack(images), NoiseSource(gens)  # (B, C, h, w)


def paste_centred(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy `src` (C, h, w) into the centre of `dst` (C, H, W), cropping its centre when it is larger.

    The offsets round down as in A1111, so odd differences put the extra cell on the right/bottom.
    """
    ty, sy, h = _centred_span(dst.shape[1], src.shape[1])
    tx, sx, w = _centred_span(dst.shape[2], src.shape[2])
    out = dst.clone()
    out[:, ty:ty + h, tx:tx + w] = src[:, sy:sy + h, sx:sx + w]
    return out


def _centred_span(target: int, source: int) -> tuple[int, int, int]:
    """(start in target, start in source, length) of the centred overlap along one axis."""
    d = (target - source) // 2
    length = source if d >= 0 else source + 2 * d
    return max(d, 0), max(-d, 0), length


def _drawn_shape(shape: tuple[int, ...], resize_from: tuple[int, int] | None, factor: int) -> tuple[int, ...]:
    """The (C, h, w) the seed's noise is drawn at: `shape`, or the 'resize seed from' size in latent cells."""
    if resize_from is None or resize_from[0] <= 0 or resize_from[1] <= 0:  # A1111: 0 means "off"
        return shape
    w, h = resize_from[0] // factor, resize_from[1] // factor
    if w == 0 or h == 0:
        raise ValueError(f"seed_resize_from {tuple(resize_from)} is smaller than one latent cell ({factor} px): "
                         f"use at least {factor}x{factor} pixels, or 0x0 to turn it off")
    return (shape[0], h, w)


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The first noise tensor of a fresh CPU generator seeded with `seed`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
