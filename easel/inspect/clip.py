"""CLIP space: which images and captions the model's CLIP puts close together, and which hard negatives it tells apart.

With an image tower (the built-in model ships one fitted to its frozen text encoder: `clip_vision.safetensors`
beside it; `--image-tower FILE` for another) this is the figure of contrastive training: ShapeWorld renders (rows)
against their own captions and every caption's hard negatives (colours or shapes swapped, relation flipped, count
changed), in the shared embedding space, and the nearest captions of each image. Stable Diffusion checkpoints keep
only CLIP's text tower, so for them it is the text-text matrix: each caption against a paraphrase of itself, the
other paraphrases and the hard negatives. The text embedding is the one contrastive training pulls together: the
final-normed hidden state at <|endoftext|> (projected, when an image tower is there).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

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


def scene_batch(n: int, seed: int = 0) -> list[tuple[object, str]]:
    """n held-out ShapeWorld (scene, caption) pairs, relation captions alternating with the others."""
    from easel.world.captions import parse_caption
    from easel.world.dataset import eval_scenes
    if n < 2:
        raise ValueError(f"--count must be at least 2 (got {n}): a similarity matrix needs captions to confuse")
    pool = eval_scenes(8 * n, seed)
    with_rel = [p for p in pool if parse_caption(p[1]).relation is not None]
    others = [p for p in pool if parse_caption(p[1]).relation is None]
    mixed = [p for pair in zip(with_rel, others) for p in pair] + with_rel[len(others):] + others[len(with_rel):]
    return mixed[:n]  # so that every kind of hard negative shows


def caption_batch(n: int, seed: int = 0, images: bool = False) -> tuple[list[str], list[Column]]:
    """n ShapeWorld captions and the gallery: per caption its paraphrase (or, for the image-text matrix, the
    caption itself), then its hard negatives."""
    from easel.training.negatives import hard_negatives
    captions = [c for _, c in scene_batch(n, seed)]
    rng = np.random.default_rng([seed, 0xC11F])
    columns = []
    for i, text in enumerate(captions):
        columns.append(Column(text if images else paraphrase(text, rng), i, "same"))
        columns += [Column(neg, i, kind) for kind, neg in hard_negatives(text, rng).items()]
    return captions, columns


def renders(n: int, seed: int, size: int) -> torch.Tensor:
    """The scenes of `scene_batch(n, seed)` rendered at `size`: (n, 3, size, size) in [-1, 1]."""
    from easel.world.dataset import to_tensor
    from easel.world.render import render_array
    return torch.stack([to_tensor(render_array(scene, size)) for scene, _ in scene_batch(n, seed)])


@torch.no_grad()
def image_text_matrix(model, tok, images: torch.Tensor, columns: list[Column]) -> np.ndarray:
    """Cosine similarity of each image (rows) with each gallery caption, in the contrastive model's shared space."""
    from easel.training.clip import tokenize_short
    img = model.embed_images(images.float())
    txt = model.embed_text(tokenize_short(tok, [c.text for c in columns]))
    return (img @ txt.T).numpy()


def nearest(sims: np.ndarray, columns: list[Column], k: int = 3) -> list[list[tuple[float, Column]]]:
    """Per row, the k most similar gallery captions with their cosine, nearest first."""
    return [[(float(row[j]), columns[j]) for j in np.argsort(-row)[:k]] for row in sims]


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


def format_scores(scores: dict[str, float], n: int, images: bool = False) -> str:
    """The accuracies as lines for the terminal."""
    what = "each image's own caption" if images else "the own paraphrase"
    lines = [f"top-1 retrieval of {what} among {n} captions: {scores['top1']:.0%}",
             f"  ... with every caption's hard negatives in the gallery too: {scores['top1_with_negatives']:.0%}"]
    lines += [f"  {'caption' if images else 'paraphrase'} closer than the {k[6:]} negative: {v:.0%}"
              for k, v in scores.items() if k.startswith("beats_")]
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


def format_nearest(near: list[list[tuple[float, Column]]], captions: list[str]) -> str:
    """Each image's nearest captions as terminal lines (an x marks a caption that is not the image's own)."""
    lines = []
    for i, row in enumerate(near):
        lines.append(f"image {i + 1} ({captions[i]}):")
        lines += [f"  {'=' if c.owner == i and c.kind == 'same' else 'x'} {s:.3f} {c.text}" for s, c in row]
    return "\n".join(lines)


def _thumb(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] as a CELL-high thumbnail."""
    arr = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize((CELL, CELL), Image.LANCZOS)


def matrix_figure(sims: np.ndarray, captions: list[str], columns: list[Column], title: str,
                  images: torch.Tensor | None = None) -> Image.Image:
    """The heat-map matrix: rows = captions (or images, drawn at the row's start), columns (labels written
    upwards) = paraphrases or captions and hard negatives, each row's group framed, the best column of each row
    marked, the values written in the cells."""
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
        img.paste(_label(f"{i + 1}. {captions[i]}", rows_w - (CELL + 2 if images is not None else 0), right=True),
                  (0, y0 + i * CELL))
        if images is not None:
            img.paste(_thumb(images[i]), (rows_w - CELL - 1, y0 + i * CELL))
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
    own = "caption" if images is not None else "paraphrase"
    d.text((6, y0 + n * CELL + 10), f"cosine similarity x 100, dark {lo:.2f} .. bright {hi:.2f}; green: the row's "
           f"{own} (N=) and its hard negatives (Nx [kind]); blue: the row's nearest column", fill=draw.INK,
           font=draw.font(12))
    return img


def nearest_figure(images: torch.Tensor, near: list[list[tuple[float, Column]]], title: str) -> Image.Image:
    """Each image, large, beside its nearest captions with their cosine (green: its own caption; red: not)."""
    side, row_h, text_w = 72, 80, 420
    cols = 2
    rows = (len(near) + cols - 1) // cols
    img = Image.new("RGB", (cols * (side + text_w + 16) + 8, 34 + rows * row_h), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill=draw.INK, font=draw.font(14))
    f = draw.font(12)
    for i, row in enumerate(near):
        x, y = 8 + (i % cols) * (side + text_w + 16), 34 + (i // cols) * row_h
        arr = ((images[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        img.paste(Image.fromarray(arr).resize((side, side), Image.NEAREST), (x, y))
        for k, (score, c) in enumerate(row):
            own = c.owner == i and c.kind == "same"
            colour = (20, 130, 50) if own else (190, 40, 40)
            line = draw.fit_text(d, f"{score:.2f} {'' if own else '[' + c.kind + '] ' if c.owner == i else '[other] '}"
                                 f"{c.text}", f, text_w - 8)
            d.text((x + side + 8, y + 4 + 22 * k), line, fill=colour, font=f)
    return img


def image_tower(path: str | None, loaded):
    """The contrastive model for `loaded` from `path`, else the built-in model's own tower, else None."""
    from easel.training.clip_image_tower import builtin_tower_path, load_tower
    from easel.weights.registry import BUILTIN_FILE
    if path:
        return load_tower(path, loaded)
    if Path(loaded.source).resolve() == BUILTIN_FILE.resolve() and builtin_tower_path().is_file():
        return load_tower(builtin_tower_path(), loaded)
    return None


def write_text_text(loaded, count: int, seed: int, out: Path) -> tuple[list[Path], list[str]]:
    """The text-text matrix of captions vs paraphrases and hard negatives: (clip.png, clip.npz), and the scores as
    terminal lines."""
    from tqdm import tqdm
    from easel.files import save_image
    captions, columns = caption_batch(count, seed)
    encoder, tok = loaded.model.text_encoders[0], loaded.tokenizers[0]
    with tqdm(total=1, unit="text batch", file=sys.stderr, leave=False) as bar:
        sims = similarity_matrix(encoder, tok, captions, columns)
        bar.update(1)
    scores = retrieval(sims, columns)
    title = (f"text-text CLIP similarity ({len(captions)} captions; no image tower for this model): top-1 "
             f"{scores['top1']:.0%}, with hard negatives {scores['top1_with_negatives']:.0%}")
    return ([save_image(matrix_figure(sims, captions, columns, title), out / "clip.png"),
             write_npz(out / "clip.npz", sims, captions, columns)], [format_scores(scores, len(captions))])


def write_image_text(loaded, count: int, seed: int, out: Path, tower) -> tuple[list[Path], list[str]]:
    """The image-text matrix (renders vs captions and hard negatives) and each image's nearest captions:
    (clip.png, nearest.png, clip.npz), and the scores as terminal lines."""
    from tqdm import tqdm
    from easel.files import save_image
    captions, columns = caption_batch(count, seed, images=True)
    images = renders(count, seed, tower.vision.config.image_size)
    with tqdm(total=1, unit="batch", file=sys.stderr, leave=False) as bar:
        sims = image_text_matrix(tower, loaded.tokenizers[0], images, columns)
        bar.update(1)
    scores = retrieval(sims, columns)
    near = nearest(sims, columns)
    title = (f"image-text CLIP similarity ({len(captions)} renders x their captions and hard negatives): top-1 "
             f"{scores['top1']:.0%}, with hard negatives {scores['top1_with_negatives']:.0%}")
    paths = [save_image(matrix_figure(sims, captions, columns, title, images=images), out / "clip.png"),
             save_image(nearest_figure(images, near, "each render's three nearest captions (green: its own)"),
                        out / "nearest.png"),
             write_npz(out / "clip.npz", sims, captions, columns)]
    return paths, [format_scores(scores, len(captions), images=True), format_nearest(near, captions)]
