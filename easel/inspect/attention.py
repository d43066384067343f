"""Per-token cross-attention heat maps from a capture (DAAM: Tang et al. 2022, "What the DAAM").

Each map is the attention probability that image positions give a token, averaged over heads and over every
cross-attention layer call (all resolutions, upsampled to the latent's size, each layer weighted equally) and
step. At every latent position the maps of all 77 (x chunks) slots sum to 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from easel.files import atomic_path, save_image
from easel.inspect import draw
from easel.inspect.capture import AttentionSum, Capture
from easel.inspect.tokens import END, PAD, START, Slot, content, words


def layer_average(attn: AttentionSum, size: tuple[int, int]) -> torch.Tensor:
    """(B, S, h, w): the attention averaged over every layer call, each resolution upsampled to `size` (bilinear)."""
    total, calls = None, 0
    for res, s in attn.sums.items():
        s = s.float().cpu()
        m = s.transpose(1, 2).reshape(s.shape[0], s.shape[2], *res)  # summed over this level's calls
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False) if res != size else m
        total = m if total is None else total + m
        calls += attn.count[res]
    if total is None:
        raise ValueError("no cross-attention was captured (the model has no cross-attention layers, or no step ran)")
    return total / calls


def capture_maps(cap: Capture, text: str) -> torch.Tensor:
    """(B, S, h, w) token maps of one prompt text over every run of a capture (a hires pass's maps and the first
    pass's are brought to the largest latent size and averaged by layer calls)."""
    runs = [r for r in cap.runs if text in r.attention]
    if not runs:
        raise ValueError(f"no attention was captured for the prompt text {text!r}")
    size = max((r.latent_size for r in runs), key=lambda s: s[0] * s[1])
    total, calls = 0, 0
    for r in runs:
        n = sum(r.attention[text].count.values())
        total = total + layer_average(r.attention[text], size) * n
        calls += n
    return total / calls


def slot_labels(slots: list[Slot], positions: int) -> list[Slot]:
    """Slots for every context position the maps have: a context padded with the empty prompt's chunks (to match
    a longer negative prompt, as A1111) gets those chunks' start/end/padding labels."""
    out = list(slots[:positions])
    per_chunk = 1 + max(s.position for s in slots if s.chunk == 0)
    while len(out) < positions:
        p = len(out)
        j = p % per_chunk
        kind, piece = ("start", START) if j == 0 else ("end", END) if j == 1 else ("pad", PAD)
        out.append(Slot(p, p // per_chunk, -1, piece, kind, 1.0))
    return out


def word_maps(maps: np.ndarray, slots: list[Slot]) -> list[tuple[str, np.ndarray, list[Slot]]]:
    """(word, map, pieces): each word's map is the mean of its BPE pieces' maps (DAAM's word merge)."""
    return [(w, maps[[s.position for s in group]].mean(axis=0), group) for w, group in words(slots)]


def write_attention(folder: str | Path, image: Image.Image, maps: torch.Tensor, slots: list[Slot]) -> dict:
    """Write attention.npz (every slot, keyed '<position>:<token>', at latent resolution), one overlay PNG per
    prompt token (tokens/) and per word (words/), and attention.png (the image with every word's overlay).
    `maps` (S, h, w) is one image's. Returns {'tokens': [...], 'words': [...]} of the written paths."""
    folder = Path(folder)
    maps_np = maps.float().numpy()
    labels = slot_labels(slots, maps_np.shape[0])
    with atomic_path(folder / "attention.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{s.key: maps_np[s.position] for s in labels})
    big = draw.enlarge(image, 256)
    written = {"tokens": [], "words": []}
    for s in content(labels):
        path = folder / "tokens" / f"{s.position:03d}-{_safe(s.piece)}.png"
        _save(draw.captioned(draw.overlay(big, draw.normalise(maps_np[s.position])), f"{s.position}: {s.piece}"),
              path)
        written["tokens"].append(path)
    panels = [draw.captioned(big, "image")]
    for n, (word, m, _) in enumerate(word_maps(maps_np, labels)):
        panel = draw.captioned(draw.overlay(big, draw.normalise(m)), word)
        _save(panel, folder / "words" / f"{n:02d}-{_safe(word)}.png")
        written["words"].append(folder / "words" / f"{n:02d}-{_safe(word)}.png")
        panels.append(panel)
    _save(draw.grid(panels, cols=min(len(panels), 5)), folder / "attention.png")
    return written


def _safe(text: str) -> str:
    """A token or word as a file-name part."""
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in text.strip())
    return keep[:40] or "_"


def _save(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)


def write_levels(path: str | Path, image: Image.Image, attn: AttentionSum, slots: list[Slot],
                 image_index: int = 0) -> Path:
    """levels.png: each word's map at each query resolution of the UNet (rows, finest first), over the image."""
    big = draw.enlarge(image, 160).resize((160, 160 * image.height // image.width), Image.LANCZOS)
    rows = []
    for size in sorted(attn.sums, key=lambda s: -s[0] * s[1]):
        maps = attn.mean(size)[image_index].numpy()  # (S, h, w)
        labels = slot_labels(slots, maps.shape[0])
        row = [draw.captioned(big, f"{size[0]}x{size[1]} queries ({attn.count[size]} layer calls)", 11)]
        row += [draw.captioned(draw.overlay(big, draw.normalise(m)), w, 11) for w, m, _ in word_maps(maps, labels)]
        rows.append(row)
    cols = max(len(r) for r in rows)
    return save_image(draw.grid([im for r in rows for im in r + [Image.new("RGB", (1, 1), draw.BACKGROUND)] *
                                 (cols - len(r))], cols=cols), Path(path))


def write_animation(path: str | Path, image: Image.Image, attn: AttentionSum, slots: list[Slot],
                    image_index: int = 0, ms: int = 300) -> Path | None:
    """attention.gif (.webp, .mp4): the words' maps step by step (each step's own layer calls), over the final image."""
    from easel.animation import save_animation
    frames = []
    big = draw.enlarge(image, 128).resize((128, 128 * image.height // image.width), Image.LANCZOS)
    steps = attn.step_maps()
    for i, maps in steps:
        maps = maps[image_index].numpy()
        labels = slot_labels(slots, maps.shape[0])
        cells = [draw.captioned(draw.overlay(big, draw.normalise(m)), w, 11) for w, m, _ in word_maps(maps, labels)]
        if cells:
            frames.append(draw.captioned(draw.grid(cells, cols=min(len(cells), 8)), f"step {i + 1}/{len(steps)}"))
    return save_animation(frames, path, ms) if frames else None


def write_self_attention(path: str | Path, image: Image.Image, sa, image_index: int = 0) -> Path:
    """self-attention.png: where the queried position (marked) looks, at each resolution of the UNet."""
    from PIL import ImageDraw
    big = draw.enlarge(image, 192)
    fy, fx = sa.query
    panels = []
    for size in sorted(sa.sums, key=lambda s: -s[0] * s[1]):
        panel = draw.overlay(big, draw.normalise(sa.mean(size)[image_index].numpy()))
        d = ImageDraw.Draw(panel)
        x, y = fx * (panel.width - 1), fy * (panel.height - 1)
        d.line([(x - 7, y), (x + 7, y)], fill=(0, 255, 255), width=2)
        d.line([(x, y - 7), (x, y + 7)], fill=(0, 255, 255), width=2)
        panels.append(draw.captioned(panel, f"{size[0]}x{size[1]} ({sa.count[size]} layer calls)", 12))
    return save_image(draw.titled(draw.grid(panels, cols=len(panels)), "self-attention of the marked position"),
                      Path(path))
