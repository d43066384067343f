"""ShapeWorld scene sampling and rendering: determinism, layout rules, held-out combinations."""
from __future__ import annotations

import numpy as np
import pytest

from easel.world.render import render, render_array
from easel.world.scenes import (BORDER, HELD_OUT_PAIRS, HELD_OUT_RELATIONS, MARGIN, MIN_SEP, RELATION_DOMINANCE,
                                SHAPES, SIZES, Obj, is_held_out, relation, sample_scene)

SEEDS = range(1500)


@pytest.fixture(scope="module")
def scenes():
    return [sample_scene(s) for s in SEEDS]


def test_same_seed_same_scene_and_bytes():
    assert sample_scene(123) == sample_scene(123)
    for size in (64, 128):
        assert render(sample_scene(123), size).tobytes() == render(sample_scene(123), size).tobytes()
    assert render(sample_scene(123)).tobytes() != render(sample_scene(124)).tobytes()


def test_render_sizes_and_background_is_grey():
    scene = sample_scene(7)
    for size in (64, 128):
        img = render_array(scene, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        corner = img[:2, :2].astype(int)  # objects keep a border, so corners are background
        assert (corner.max(-1) - corner.min(-1)).max() <= 2  # achromatic (noise is luminance only)
        assert abs(int(corner.mean()) - scene.background) < 10


def test_objects_never_overlap_and_stay_inside(scenes):
    for scene in scenes:
        objs = scene.objects
        for o in objs:
            assert o.radius + BORDER - 1e-9 <= o.cx <= 1 - o.radius - BORDER + 1e-9
            assert o.radius + BORDER - 1e-9 <= o.cy <= 1 - o.radius - BORDER + 1e-9
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + MARGIN - 1e-9


def test_kinds_and_counts(scenes):
    kinds = {s.kind for s in scenes}
    assert kinds == {"single", "list", "relation", "count"}
    for s in scenes:
        n = len(s.objects)
        if s.kind == "count":
            assert 2 <= n <= 5 and len({(o.colour, o.shape, o.size) for o in s.objects}) == 1
        elif s.kind == "single":
            assert n == 1
        elif s.kind == "relation":
            assert n == 2
        else:
            assert 2 <= n <= 4 and len({(o.colour, o.shape) for o in s.objects}) == n  # unambiguous names
        assert all(o.radius == SIZES[o.size] and o.shape in SHAPES for o in s.objects)


def test_held_out_never_in_training_scenes(scenes):
    for s in scenes:
        assert not any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects)
        for a in s.objects:
            for b in s.objects:
                if a is not b:
                    assert (a.shape, relation(a, b), b.shape) not in HELD_OUT_RELATIONS
    assert any(is_held_out(sample_scene(s, exclude_held_out=False).objects) for s in range(300))


def test_relation_scenes_are_unambiguous(scenes):
    for s in (s for s in scenes if s.kind == "relation"):
        a, b = s.objects
        dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
        assert max(dx, dy) >= RELATION_DOMINANCE * min(dx, dy)
        assert relation(a, b) is not None and relation(b, a) is not None


def test_relation_rule():
    def obj(x, y):
        return Obj("circle", "red", "small", x, y, 0.1)
    assert relation(obj(0.2, 0.5), obj(0.8, 0.5)) == "left"
    assert relation(obj(0.8, 0.5), obj(0.2, 0.5)) == "right"
    assert relation(obj(0.5, 0.2), obj(0.5, 0.8)) == "above"  # y grows downwards
    assert relation(obj(0.5, 0.8), obj(0.5, 0.2)) == "below"
    assert relation(obj(0.5, 0.5), obj(0.5 + MIN_SEP * 0.9, 0.5)) is None
    assert relation(obj(0.2, 0.2), obj(0.6, 0.7)) == "above"  # dominant axis decides
