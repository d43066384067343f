"""ShapeWorld torch datasets, evaluation seeds, batch rendering and the sample grid."""
from __future__ import annotations

import torch
from PIL import Image

from easel.world.captions import parse_caption
from easel.world.dataset import (EVAL_SEED_BASE, TRAIN_SEEDS, ShapeWorldDataset, ShapeWorldStream, caption_corpus,
                                 eval_scenes, eval_seeds, render_batch, sample_grid)


def test_dataset_items_are_images_in_range_with_captions():
    ds = ShapeWorldDataset(8, size=64, start=100)
    x, text = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    parse_caption(text)
    batch, caps = render_batch([103], 64)
    assert torch.equal(batch[0], x) and caps[0] == text  # the fast path renders the same thing


def test_caption_rounds_paraphrase_the_same_scene():
    a, b = ShapeWorldDataset(50, caption_round=0), ShapeWorldDataset(50, caption_round=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(3))
    assert any(a[i][1] != b[i][1] for i in range(50))


def test_eval_seeds_are_disjoint_from_training():
    seeds = eval_seeds(100, seed=0) + eval_seeds(100, seed=1)
    assert len(set(seeds)) == 200 and min(seeds) >= EVAL_SEED_BASE > TRAIN_SEEDS
    (scene, text), = eval_scenes(1, seed=2)
    parse_caption(text)
    assert ShapeWorldDataset(4, split="eval").seeds == eval_seeds(4)


def test_stream_shards_over_workers():
    loader = torch.utils.data.DataLoader(ShapeWorldStream(size=32), batch_size=4, num_workers=0)
    x, caps = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and len(caps) == 4


def test_sample_grid_writes_png_atomically(tmp_path):
    path = sample_grid(5, 0, tmp_path / "out" / "grid.png", size=64)
    assert Image.open(path).size[0] > 5 * 64
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_caption_corpus():
    corpus = caption_corpus(50, seed=10)
    assert len(corpus) == 50 and len(set(corpus)) > 30
