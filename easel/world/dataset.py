"""ShapeWorld as torch datasets: scenes rendered on the fly from seeds, images in [-1, 1].

Training seeds are 0 .. 2**31-1 and evaluation seeds start at EVAL_SEED_BASE, so fixed evaluation
sets never share a scene seed with training. Images are never flipped (left/right carry meaning).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from easel.files import save_image

from .captions import caption, caption_corpus, vocabulary
from .grid import captioned_grid
from .render import render_array
from .scenes import Scene, sample_scene

__all__ = ["ShapeWorldDataset", "ShapeWorldStream", "render_batch", "eval_seeds", "eval_scenes",
           "to_tensor", "sample_grid", "mixed_scene", "scene_language", "vocabulary", "caption_corpus", "TRAIN_SEEDS", "EVAL_SEED_BASE"]

TRAIN_SEEDS = 2**31
EVAL_SEED_BASE = 2**40
_EVAL_SET_STRIDE = 2**24  # eval set k uses seeds EVAL_SEED_BASE + k * stride + i


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float32 tensor in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
    return t.float().div_(127.5).sub_(1.0)


def eval_seeds(n: int, seed: int = 0) -> list[int]:
    """Seeds of the fixed evaluation set number `seed` (disjoint from all training seeds)."""
    if not 0 < n <= _EVAL_SET_STRIDE:
        raise ValueError(f"eval set size must be in 1..{_EVAL_SET_STRIDE}, got {n}")
    base = EVAL_SEED_BASE + seed * _EVAL_SET_STRIDE
    return list(range(base, base + n))


def eval_scenes(n: int, seed: int = 0) -> list[tuple[Scene, str]]:
    """A fixed evaluation set of (scene, caption), from seeds no training index ever maps to."""
    scenes = [(s, sample_scene(s)) for s in eval_seeds(n, seed)]
    return [(scene, caption(scene, s)) for s, scene in scenes]


def mixed_scene(seed: int, relation_share: float) -> Scene:
    """The scene of a training seed, drawn as a relation scene with probability `relation_share`."""
    if relation_share > 0 and np.random.default_rng([seed, 0x4E1]).random() < relation_share:
        return sample_scene(seed, "relation")
    return sample_scene(seed)


def scene_language(seed: int, zh_share: float) -> str:
    """The language of a seed's caption: Chinese with probability `zh_share`."""
    return "zh" if zh_share > 0 and np.random.default_rng([seed, 0x2C]).random() < zh_share else "en"


def render_batch(seeds: list[int], size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Render the scenes of many seeds: (N, 3, size, size) tensor in [-1, 1] and their captions."""
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    captions = []
    for k, s in enumerate(seeds):
        scene = sample_scene(s)
        images[k] = render_array(scene, size)
        captions.append(caption(scene, s))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return batch.float().div_(127.5).sub_(1.0), captions


class ShapeWorldDataset(Dataset):
    """Map-style dataset: index i -> (image (3, H, W) in [-1, 1], caption) of seed `start + i`.

    split="eval" maps indices to the evaluation seeds instead. `caption_round` > 0 draws other
    paraphrases for the same scenes (e.g. pass the epoch number)."""

    def __init__(self, n: int, size: int = 64, start: int = 0, split: str = "train",
                 caption_round: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if split == "train" and not (0 <= start and start + n <= TRAIN_SEEDS):
            raise ValueError(f"training seeds are 0..{TRAIN_SEEDS - 1}: start={start}, n={n} is out of range")
        self.n, self.size, self.caption_round = n, size, caption_round
        self.seeds = range(start, start + n) if split == "train" else eval_seeds(n, start)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        seed = self.seeds[i]
        scene = sample_scene(seed)
        return to_tensor(render_array(scene, self.size)), caption(scene, seed + self.caption_round * TRAIN_SEEDS)


class ShapeWorldStream(IterableDataset):
    """Endless training stream over seeds start, start+1, ...; DataLoader workers take turns."""

    def __init__(self, size: int = 64, start: int = 0):
        self.size, self.start = size, start

    def __iter__(self):
        info = get_worker_info()
        seed = self.start + (info.id if info else 0)
        step = info.num_workers if info else 1
        while True:
            scene = sample_scene(seed % TRAIN_SEEDS)
            yield to_tensor(render_array(scene, self.size)), caption(scene, seed)
            seed += step


def sample_grid(n: int, seed: int, path: str | os.PathLike, size: int = 64) -> Path:
    """Write a PNG grid of n training renders (seeds seed..seed+n-1) with captions under each, atomically."""
    scenes = [(sample_scene(s), s) for s in range(seed, seed + n)]
    images = [Image.fromarray(render_array(scene, size)) for scene, _ in scenes]
    return save_image(captioned_grid(images, [caption(scene, s) for scene, s in scenes]), path)
