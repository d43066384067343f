"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023).

At the highest-resolution transformer blocks, self-attention costs grow with the square of the number of positions.
Before each of those self-attentions, a fraction r of the tokens is merged into similar ones (bipartite soft
matching): each 2x2 cell of the feature map keeps one randomly chosen destination token, every other token is a
source matched to its most similar destination (cosine), and the r*N best-matched sources are averaged into their
destinations. Attention runs on the N - r*N tokens left; its output is unmerged (each merged source takes its
destination's output) so the rest of the block sees all N positions again. The random choices come from a generator
seeded once per sampling run, so that the same request gives the same image.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

TOME_SEED = 0  # seed of the destination choices (one generator per sampling run)


def highest_transformer_size(unet, h: int, w: int) -> tuple[int, int]:
    """(h, w) of the feature map at the first level with transformers, for a latent of h x w (Downsample rounds up)."""
    level = next((i for i, d in enumerate(unet.cfg.transformer_depth) if d), None)
    if level is None:
        raise ValueError("token merging needs a UNet with transformer blocks (this one has none)")
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def self_attentions(unet) -> list[torch.nn.Module]:
    """Every transformer block's self-attention (`attn1`) in the UNet."""
    return [m.attn1 for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]


def destination_positions(h: int, w: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) token positions of an h x w map: one random destination in every whole 2x2 cell;
    everything else (the other three, and an odd last row or column) is a source."""
    hc, wc = h // 2, w // 2
    pick = torch.randint(4, (hc, wc, 1), generator=generator).to(device)
    cells = torch.zeros(hc, wc, 4, dtype=torch.int64, device=device).scatter_(2, pick, -1)  # -1 marks a destination
    cells = cells.view(hc, wc, 2, 2).transpose(1, 2).reshape(hc * 2, wc * 2)  # back to the map's row-major order
    grid = torch.zeros(h, w, dtype=torch.int64, device=device)
    grid[:hc * 2, :wc * 2] = cells
    order = grid.reshape(-1).argsort(stable=True)  # destinations (-1) first, each group in position order
    return order[:hc * wc], order[hc * wc:]


def bipartite_soft_matching(x: torch.Tensor, h: int, w: int, r: int,
                            generator: torch.Generator) -> tuple[Callable, Callable]:
    """(merge, unmerge) for tokens x (B, N = h*w, C): merge (B, N, C) -> (B, N - r, C) averages the r sources most
    similar to a destination into it; unmerge (B, N - r, C) -> (B, N, C) gives each merged source its destination's
    value."""
    B, N, _ = x.shape
    dst_pos, src_pos = destination_positions(h, w, generator, x.device)
    r = min(r, len(src_pos))
    if r <= 0:
        return (lambda t: t), (lambda t: t)
    metric = F.normalize(x.float(), dim=-1)  # cosine similarity, in float32 so that bf16 ties do not decide
    scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)  # (B, N_src, N_dst)
    best, best_dst = scores.max(dim=-1)  # (B, N_src): each source's closest destination
    edges = best.argsort(dim=-1, descending=True, stable=True)  # sources, most similar first
    moved, kept = edges[:, :r], edges[:, r:]  # (B, r), (B, N_src - r) indices into the sources
    into = best_dst.gather(1, moved)  # (B, r): the destination each moved source joins
    moved_pos, kept_pos = src_pos[moved], src_pos[kept]  # token positions (B, r), (B, N_src - r)

    def rows(idx: torch.Tensor, c: int) -> torch.Tensor:
        return idx[..., None].expand(-1, -1, c)

    def merge(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[-1]
        dst = t[:, dst_pos].scatter_reduce(1, rows(into, c), t.gather(1, rows(moved_pos, c)), reduce="mean",
                                           include_self=True)  # (B, N_dst, c)
        return torch.cat([t.gather(1, rows(kept_pos, c)), dst], dim=1)  # (B, N - r, c)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c, n_kept = t.shape[-1], kept_pos.shape[1]
        kept_t, dst = t[:, :n_kept], t[:, n_kept:]
        out = t.new_empty(B, N, c)
        out[:, dst_pos] = dst
        out.scatter_(1, rows(kept_pos, c), kept_t)
        out.scatter_(1, rows(moved_pos, c), dst.gather(1, rows(into, c)))
        return out
    return merge, unmerge


@contextlib.contextmanager
def merging(unet, ratio: float, latent_size: tuple[int, int], generator: torch.Generator):
    """Within the block, the UNet's highest-resolution self-attentions merge `ratio` of their tokens (patched on the
    instances for the block only; the state dict and every other module are untouched)."""
    h, w = highest_transformer_size(unet, *latent_size)
    patched = []
    for attn in self_attentions(unet):
        had = "forward" in attn.__dict__  # an instance forward of someone else's: put it back afterwards
        patched.append((attn, had, attn.__dict__.get("forward")))
        attn.forward = _merged_forward(attn.forward, h, w, ratio, generator)
    try:
        yield
    finally:
        for attn, had, old in patched:
            if had:
                attn.forward = old
            else:
                del attn.forward


def _merged_forward(forward: Callable, h: int, w: int, ratio: float, generator: torch.Generator) -> Callable:
    """`forward` of a self-attention with ToMe around it at the h x w level (other levels pass through)."""
    def merged(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None or x.shape[1] != h * w:
            return forward(x, context)
        merge, unmerge = bipartite_soft_matching(x, h, w, int(x.shape[1] * ratio), generator)
        return unmerge(forward(merge(x)))
    return merged
