"""ControlNet preprocessors without weights: what each makes of simple pictures, names, and the errors."""
import numpy as np
import pytest
from PIL import Image

from easel.pipelines.control_pre import PREPROCESSORS, canonical, hint_image, preprocess
from easel.pipelines.control_unit import CONTROL_RESIZE_MODES
from easel.pipelines.request import RESIZE_MODES


def square(size=48, lo=30, hi=220) -> Image.Image:
    arr = np.full((size, size, 3), lo, np.uint8)
    arr[12:36, 12:36] = hi
    return Image.fromarray(arr)


def test_canny_outlines_a_square_and_nothing_else():
    edges = preprocess("canny", square())[..., 0]
    assert set(np.unique(edges)) == {0.0, 1.0}
    ys, xs = np.nonzero(edges)
    assert 10 <= ys.min() and ys.max() <= 37 and 10 <= xs.min() and xs.max() <= 37  # on the boundary
    assert edges[16:32, 16:32].sum() == 0 and edges[:8].sum() == 0  # not inside, not in the flat background
    assert edges[11:13, 12:36].sum() + edges[35:37, 12:36].sum() >= 24  # the top and bottom sides are found
    assert preprocess("canny", square(), threshold_a=2000, threshold_b=3000).sum() == 0  # thresholds matter


def test_canny_sees_a_colour_edge_of_equal_grey():
    """OpenCV's Canny on a colour image takes each pixel's strongest channel: red next to green of the same luma
    still has an edge."""
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = (200, 60, 60)
    arr[:, 16:] = (60, 127, 60)  # about the same grey level
    assert preprocess("canny", Image.fromarray(arr))[:, 14:18].sum() > 0


def test_threshold_invert_and_none():
    x = preprocess("threshold", square(), threshold_a=100)
    assert x[20, 20, 0] == 1 and x[0, 0, 0] == 0
    np.testing.assert_allclose(preprocess("invert", square()), 1 - np.asarray(square()) / 255.0, atol=1e-6)
    np.testing.assert_allclose(preprocess("none", square()), np.asarray(square()) / 255.0, atol=1e-6)


def test_lineart_and_scribble_draw_dark_lines_white():
    arr = np.full((48, 48, 3), 255, np.uint8)
    arr[:, 23:25] = 0  # a black line on white paper
    for name in ("lineart", "scribble"):
        hint = preprocess(name, Image.fromarray(arr))[..., 0]
        assert hint[:, 23:25].mean() > 0.3 and hint[:, :10].max() == 0, name
        assert preprocess(name, Image.new("RGB", (48, 48), (90, 90, 90))).max() == 0, name  # flat: nothing


def test_segmentation_gives_one_flat_colour_per_region():
    arr = np.zeros((48, 48, 3), np.uint8)
    arr[:, :16], arr[:, 16:32], arr[:, 32:] = (200, 30, 30), (30, 200, 30), (128, 128, 128)
    rng = np.random.default_rng(0)
    noisy = (arr + rng.integers(-6, 7, arr.shape)).clip(0, 255).astype(np.uint8)
    seg = preprocess("segmentation", Image.fromarray(noisy))
    colours = {tuple(c) for c in seg[:, 4:12].reshape(-1, 3)} | {tuple(c) for c in seg[:, 20:28].reshape(-1, 3)} \
        | {tuple(c) for c in seg[:, 36:44].reshape(-1, 3)}
    assert len(colours) == 3  # noise does not split a region; three regions, three colours


def test_inpaint_marks_the_masked_pixels_minus_one():
    mask = Image.new("L", (48, 48), 0)
    mask.paste(255, (0, 0, 10, 10))
    hint = preprocess("inpaint", square(), mask=mask)
    assert (hint[:10, :10] == -1).all() and hint[20:, 20:].min() >= 0
    assert np.asarray(hint_image(hint))[:10, :10].max() == 0  # shown black
    with pytest.raises(ValueError, match="needs a mask"):
        preprocess("inpaint", square())


def test_names_aliases_and_errors():
    assert canonical("scribble_xdog") == "scribble" and canonical("Binary") == "threshold"
    assert canonical("inpaint_global_harmonious") == "inpaint" and canonical("") == "none"
    with pytest.raises(ValueError, match="body_pose_model.pth.*preprocessor 'none'"):
        canonical("openpose")
    with pytest.raises(ValueError, match="dpt_hybrid-midas"):
        canonical("depth_midas")
    with pytest.raises(ValueError, match="unknown preprocessor 'blurp'; choose one of none, canny"):
        canonical("blurp")


def test_every_preprocessor_returns_a_float_hint_of_the_image_size():
    mask = Image.new("L", (40, 24), 255)
    for name in PREPROCESSORS:
        hint = preprocess(name, square().resize((40, 24)), mask=mask)
        assert hint.shape == (24, 40, 3) and hint.dtype == np.float32, name


def test_resize_modes_are_the_requests():
    assert CONTROL_RESIZE_MODES == RESIZE_MODES


def test_contact_sheet_draws_every_preprocessor(tmp_path):
    from easel.pipelines.control_sheet import CELL, main
    square().save(tmp_path / "in.png")
    Image.new("L", (48, 48), 255).save(tmp_path / "mask.png")
    assert main([str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").width == CELL * len(PREPROCESSORS)  # the image + all but "none"
