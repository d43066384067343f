"""Layout sketches: blobs where the objects are, about their size, rough but never off the object."""
import numpy as np
import pytest

from easel.world.scenes import sample_scene
from easel.world.sketch import MAX_OBJECTS, draw_blobs, objects_array, sketch_at, sketch_of


def test_exact_circle_has_the_area_and_place_asked():
    mask = draw_blobs(np.array([[0.25, 0.75, 0.125]]), 128, None)
    assert abs(mask.sum() / (np.pi * (0.125 * 128) ** 2) - 1) < 0.03
    assert mask[96, 32] == 1 and mask[32, 96] == 0  # (x 0.25, y 0.75) is row 96, column 32


def test_jittered_blobs_cover_every_object_centre_and_little_else():
    for seed in range(40):
        scene = sample_scene(seed)
        sketch = np.asarray(sketch_of(scene.objects, 64, seed))[..., 0] > 127
        for o in scene.objects:
            assert sketch[int(o.cy * 64), int(o.cx * 64)], (seed, o)
        circles = draw_blobs(objects_array(scene.objects), 64, None)
        assert sketch.sum() < 2.2 * circles.sum()  # rough, not a different layout


def test_same_seed_same_sketch_other_seed_other_jitter():
    objects = sample_scene(3).objects
    a, b, c = (np.asarray(sketch_of(objects, 64, s)) for s in (7, 7, 8))
    assert (a == b).all() and (a != c).any()


def test_empty_rows_draw_nothing_and_too_many_objects_is_an_error():
    assert np.asarray(sketch_at([], 32)).max() == 0
    with pytest.raises(ValueError, match="at most"):
        sketch_at([(0.5, 0.5, 0.1)] * (MAX_OBJECTS + 1))


def test_command_draws_blobs_from_numbers_and_names_bad_ones(tmp_path, capsys):
    from PIL import Image

    from easel.world.sketch import main
    out = tmp_path / "s.png"
    assert main(["--blob", "0.25,0.5", "--blob", "0.75,0.5,0.1", "--out", str(out)]) == 0
    arr = np.asarray(Image.open(out))[..., 0]
    assert arr.shape == (64, 64) and arr[32, 16] == 255 and arr[32, 48] == 255 and arr[5, 5] == 0
    with pytest.raises(SystemExit):
        main(["--blob", "1.5,0.5", "--out", str(out)])
    assert "fractions of the image side" in capsys.readouterr().err
