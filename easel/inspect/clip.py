"""CLIP space: which captions the loaded text encoder puts close together, and which hard negatives it tells apart.

The built-in model ships its text tower only (`easel train clip` saves the ViT image tower in clip.safetensors, which
is not copied into easel/assets/shapeworld/), so this is the text-text similarity matrix the issue asks for on
text-tower-only checkpoints: each ShapeWorld caption (rows) against a paraphrase of itself, the other captions'
paraphrases and every caption's hard negatives (colours or shapes swapped, relation flipped, count changed).
The embedding is the one contrastive training pulls together: the final-normed hidden state at <|endoftext|>.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from easel.inspect import draw


@dataclass
class Column:
    """One caption of the gallery: a paraphrase of row `owner` (kind 'same') or one of its hard negatives."""

    text: str
    owner: int
    kind: str  # same | colour | shape | relation | count


def paraphrase(text: str, rng: np.random.Generator, tries: int = 8) -> str:
    """The same facts in other words (size words, joiners, relation phrase drawn anew), if any differ."""
    from easel.world.captions import describe, parse_caption
    parsed = parse_caption(text)
    out = text
    for _ in range(tries):
        out = describe(list(parsed.mentions), parsed.relation, rng)
        if out != text:
            break
    return out


def caption_batch(n: int, seed: int = 0) -> tuple[list[str], list[Column]]:
    """n ShapeWorld captions and the gallery: per caption its paraphrase, then its hard negatives."""
    from easel.training.negatives import hard_negatives
    from easel.world.captions import parse_caption
    from easel.world.dataset import eval_scenes
    if n < 2:
        raise ValueError(f"--count must be at least 2 (got {n}): a similarity matrix needs captions to confuse")
    rng = np.random.default_rng([seed, 0xC11F])
    pool = [c for _, c in eval_scenes(8 * n, seed)]
    with_rel = [c for c in pool if parse_caption(c).relation is not None]
    others = [c for c in pool if parse_caption(c).relation is None]
    mixed = [c for pair in zip(with_rel, others) for c in pair] + with_rel[len(others):] + others[len(with_rel):]
    captions = mixed[:n]  # relation captions alternate with the others, so that every negative kind shows
    columns = []
    for i, text in enumerate(captions):
        columns.append(Column(paraphrase(text, rng), i, "same"))
        columns += [Column(neg, i, kind) for kind, neg in hard_negatives(text, rng).items()]
    return captions, columns


@torch.no_grad()
def embed_texts(encoder, tok, texts: list[str]) -> torch.Tensor:
    """Texts -> unit-norm pooled text embeddings (N, P), float32 on the CPU."""
    from easel.training.clip import tokenize_short
    device = next(encoder.parameters()).device
    _, pooled = encoder(tokenize_short(tok, texts).to(device), clip_skip=1, need_pooled=True)
    return F.normalize(pooled.float(), dim=-1).cpu()


def similarity_matrix(encoder, tok, captions: list[str], columns: list[Column]) -> np.ndarray:
    """Cosine similarity (rows = captions, columns = gallery)."""
    rows = embed_texts(encoder, tok, captions)
    cols = embed_texts(encoder, tok, [c.text for c in columns])
    return (rows @ cols.T).numpy()


def retrieval(sims: np.ndarray, columns: list[Column]) -> dict[str, float]:
    """Top-1 accuracy: the caption's own paraphrase ranks first among the paraphrases alone, and among
    paraphrases plus every hard negative; and per kind, how often the paraphrase beats that negative."""
    own = np.array([c.kind == "same" for c in columns])
    owner = np.array([c.owner for c in columns])
    target = np.array([int(np.flatnonzero(own & (owner == i))[0]) for i in range(sims.shape[0])])
    masked = np.where(own[None, :], sims, -np.inf)
    out = {"top1": float(np.mean(masked.argmax(axis=1) == target)),
           "top1_with_negatives": float(np.mean(sims.argmax(axis=1) == target))}
    for kind in ("colour", "shape", "relation", "count"):
        wins = [sims[c.owner, target[c.owner]] > sims[c.owner, j] for j, c in enumerate(columns) if c.kind == kind]
        if wins:
            out[f"beats_{kind}"] = float(np.mean(wins))
    return out


def write_npz(path, sims: np.ndarray, captions: list[str], columns: list[Column]):
    """The matrix with its row and column captions, column kinds and owners, for people who analyse it."""
    np.savez(path, similarity=sims, rows=np.array(captions), columns=np.array([c.text for c in columns]),
             kinds=np.array([c.kind for c in columns]), owners=np.array([c.owner for c in columns]))
    return path


def format_scores(scores: dict[str, float], n: int) -> str:
    """The accuracies as lines for the terminal."""
    lines = [f"top-1 retrieval of the own paraphrase among {n} captions: {scores['top1']:.0%}",
             f"  ... with every caption's hard negatives in the gallery too: {scores['top1_with_negatives']:.0%}"]
    lines += [f"  paraphrase closer than the {k[6:]} negative: {v:.0%}" for k, v in scores.items()
              if k.startswith("beats_")]
    return "\n".join(lines)


CELL = 22


def _label(text: str, width: int, size: int = 12, right: bool = False) -> Image.Image:
    """A one-line label image `width` wide and CELL high, cut to fit."""
    img = Image.new("RGB", (width, CELL), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    f = draw.font(size)
    text = draw.fit_text(d, text, f, width - 6)
    x = width - 4 - d.textlength(text, font=f) if right else 2
    d.text((x, (CELL - size) // 2 - 1), text, fill=draw.INK, font=f)
    return img


def matrix_figure(sims: np.ndarray, captions: list[str], columns: list[Column], title: str) -> Image.Image:
    """The heat-map matrix: rows = captions, columns (labels written upwards) = paraphrases and hard negatives,
    each caption's group framed, the best column of each row marked, the values written in the cells."""
    rows_w, cols_h, top = 360, 390, 30
    n, m = sims.shape
    w, h = rows_w + m * CELL + 10, top + cols_h + n * CELL + 40
    img = Image.new("RGB", (w, h), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    f = draw.font(9)
    d.text((6, 6), title, fill=draw.INK, font=draw.font(15))
    y0 = top + cols_h
    for j, c in enumerate(columns):
        tag = "" if c.kind == "same" else f"[{c.kind}] "
        label = _label(f"{c.owner + 1}{'=' if c.kind == 'same' else 'x'} {tag}{c.text}", cols_h).rotate(90, expand=True)
        img.paste(label, (rows_w + j * CELL, top))
    shown = draw.normalise(sims)  # colours span this matrix's own range; the numbers give the cosine itself
    for i in range(n):
        img.paste(_label(f"{i + 1}. {captions[i]}", rows_w, right=True), (0, y0 + i * CELL))
        for j in range(m):
            x, y = rows_w + j * CELL, y0 + i * CELL
            colour = tuple(int(v) for v in draw.colormap(shown[i, j]))
            d.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=colour)
            ink = draw.INK if shown[i, j] > 0.55 else (235, 235, 235)
            number = f"{round(100 * float(sims[i, j]))}"
            d.text((x + (CELL - d.textlength(number, font=f)) / 2, y + 6), number, fill=ink, font=f)
    for i in range(n):  # frame each caption's own group of columns on its row, then mark the nearest column inside
        js = [j for j, c in enumerate(columns) if c.owner == i]
        d.rectangle([rows_w + js[0] * CELL, y0 + i * CELL, rows_w + (js[-1] + 1) * CELL - 1, y0 + (i + 1) * CELL - 1],
                    outline=(40, 220, 60), width=2)
        x, y = rows_w + int(sims[i].argmax()) * CELL, y0 + i * CELL
        d.rectangle([x + 3, y + 3, x + CELL - 4, y + CELL - 4], outline=(0, 190, 255), width=2)
    lo, hi = float(sims.min()), float(sims.max())
    d.text((6, y0 + n * CELL + 10), f"cosine similarity x 100, dark {lo:.2f} .. bright {hi:.2f}; green: the row's "
           f"paraphrase (N=) and its hard negatives (Nx [kind]); blue: the row's nearest column", fill=draw.INK,
           font=draw.font(12))
    return img
