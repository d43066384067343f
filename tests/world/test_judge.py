"""The analytic scene parser: components, colours, shapes, sizes and centres of renders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from easel.world.judge import parse
from easel.world.render import render, render_array
from easel.world.scenes import sample_scene
from easel.world.segment import _boundary_corners, _hull_area, label_components


def test_label_components_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 50)) < density
        ours, n = label_components(mask)
        ref, m = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == m
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n  # same partition, up to renumbering
    assert label_components(np.zeros((4, 4), bool))[1] == 0


def test_hull_area_of_pixel_sets():
    ys, xs = np.mgrid[0:5, 0:7]
    assert _hull_area(_boundary_corners(ys.ravel(), xs.ravel())) == 35.0
    ys, xs = np.nonzero(np.tril(np.ones((4, 4), bool)))  # staircase: hull (0,0) (1,0) (4,3) (4,4) (0,4)
    assert _hull_area(_boundary_corners(ys, xs)) == 11.5


def _check(scene, found, side):
    assert len(found) == len(scene.objects)
    for o in scene.objects:
        d = min(found, key=lambda f: (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2)
        assert np.hypot(d.cx - o.cx, d.cy - o.cy) * side < 1.0  # centre within a pixel
        assert (d.colour, d.shape, d.size) == (o.colour, o.shape, o.size)


@pytest.mark.parametrize("side", [64, 128])
def test_parse_recovers_every_object_of_renders(side):
    for s in range(40):
        scene = sample_scene(10_000 + s, exclude_held_out=False)
        _check(scene, parse(render(scene, side)), side)


def test_parse_reads_blurred_renders_and_tensors():
    for s in range(30):
        scene = sample_scene(20_000 + s)
        _check(scene, parse(render(scene).filter(ImageFilter.GaussianBlur(1.0))), 64)
    scene = sample_scene(3)
    x = torch.from_numpy(render_array(scene)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    assert [(d.colour, d.shape) for d in parse(x)] == [(d.colour, d.shape) for d in parse(render(scene))]


def test_parse_of_grey_image_is_empty():
    grey = np.full((64, 64, 3), 128, np.uint8)
    grey += np.random.default_rng(0).integers(0, 6, (64, 64, 1), dtype=np.uint8)
    assert parse(grey) == []
    with pytest.raises(ValueError, match="uint8"):
        parse(grey.astype(np.float32))
