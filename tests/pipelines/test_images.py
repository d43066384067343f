"""Image and mask operations of inpainting: resize modes, mask blur, crop regions, fill, paste-back."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from easel.pipelines import images


def _arr(im):
    return np.asarray(im).astype(int)


def _box_mask(size=(32, 32), box=(10, 12, 17, 19)):
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)  # PIL boxes are inclusive here
    return m


def test_resize_modes_sizes_and_content():
    # A wide image: red left half, blue right half, with a green top row.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    a[0] = (0, 255, 0)
    img = Image.fromarray(a)
    for mode in images.RESIZE_MODES:
        assert images.resize_image(img, 32, 32, mode).size == (32, 32)
    stretched = _arr(images.resize_image(img, 32, 32, "just_resize"))
    assert stretched[16, 2, 0] > 200 and stretched[16, 29, 2] > 200
    cropped = _arr(images.resize_image(img, 32, 32, "crop_and_resize"))  # scaled to 64x32, centre 32 columns
    assert cropped[16, 2, 0] > 200 and cropped[16, 29, 2] > 200 and cropped[0, 16, 1] > 150
    filled = _arr(images.resize_image(img, 32, 32, "resize_and_fill"))  # fitted as 32x16 at rows 8..23
    assert np.array_equal(filled[:8], np.repeat(filled[8:9], 8, axis=0))  # top border = first row stretched
    assert np.array_equal(filled[24:], np.repeat(filled[23:24], 8, axis=0))
    assert filled[8, 16, 1] > 150 and filled[16, 2, 0] > 200
    with pytest.raises(ValueError, match="resize mode"):
        images.resize_image(img, 32, 32, "squash")


def test_same_size_resize_is_exact():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    for mode in images.RESIZE_MODES:
        assert np.array_equal(_arr(images.resize_image(img, 24, 16, mode)), _arr(img))


def _reference_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Straightforward separable convolution with mirrored borders (cv2 BORDER_REFLECT_101), x then y."""
    r = int(2.5 * sigma + 0.5)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    out = a.astype(float)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        out = sum(k[i] * np.take(p, np.arange(i, i + a.shape[axis]), axis=axis) for i in range(2 * r + 1))
        out = np.rint(out).clip(0, 255)
    return out.astype(np.uint8)


def test_blur_matches_reference_and_stops_at_its_radius():
    m = np.asarray(_box_mask())
    for sigma in (1, 4):
        blurred = images.blur_mask(m, sigma)
        assert np.array_equal(blurred, _reference_blur(m, sigma))
    blurred = images.blur_mask(m, 4)
    r = images.blur_radius(4)  # 10 px
    ys, xs = np.nonzero(blurred)
    assert xs.min() >= 10 - r and xs.max() <= 17 + r and ys.min() >= 12 - r and ys.max() <= 19 + r
    assert blurred[15, 13] > 0 and blurred[15, 17 + 3] > 0  # spread a few pixels out


def test_prepare_mask_invert_alpha_and_resize():
    m = _box_mask()
    inv = images.prepare_mask(m, blur=0, invert=True)
    assert inv.mode == "L" and _arr(inv)[0, 0] == 255 and _arr(inv)[15, 13] == 0
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((10, 12, 17, 19), fill=(255, 0, 0, 255))  # painted strokes, transparent rest
    assert np.array_equal(_arr(images.prepare_mask(rgba, blur=0)), _arr(m))
    assert images.prepare_mask(m, 16, 24, blur=2).size == (16, 24)


def test_crop_region_and_aspect_expansion():
    m = _box_mask((64, 48), (10, 12, 17, 19))
    assert images.mask_crop_region(m) == (10, 12, 18, 20)
    assert images.mask_crop_region(m, padding=12) == (0, 0, 30, 32)
    x1, y1, x2, y2 = images.expand_to_aspect((10, 12, 18, 20), 64, 32, 64, 48)  # to 2:1
    assert (x2 - x1, y2 - y1) == (16, 8) and (x1, x2) == (6, 22)
    x1, y1, x2, y2 = images.expand_to_aspect((0, 0, 8, 40), 32, 32, 64, 48)  # at the left edge: slides right
    assert (x1, y1, x2, y2) == (0, 0, 40, 40)
    with pytest.raises(ValueError, match="mask is empty"):
        images.mask_crop_region(Image.new("L", (8, 8), 0))


def test_fill_takes_surrounding_colours_and_keeps_the_rest():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (200, 30, 30)
    a[:, 16:] = (30, 30, 200)
    a[8:24, 8:24] = (0, 255, 0)  # the content to remove
    mask = _box_mask((32, 32), (8, 8, 23, 23))
    out = _arr(images.fill_masked(Image.fromarray(a), mask))
    keep = _arr(mask) == 0
    assert np.array_equal(out[keep], a[keep])
    assert out[8:24, 8:24, 1].max() < 80  # the green is gone
    assert out[16, 9, 0] > out[16, 9, 2] and out[16, 22, 2] > out[16, 22, 0]  # each side takes its neighbour


def test_paste_back_exact_outside_the_mask():
    rng = np.random.default_rng(1)
    orig = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    gen = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = images.prepare_mask(_box_mask(), blur=2)
    out = _arr(images.paste_back(orig, gen, mask))
    zero, full = _arr(mask) == 0, _arr(mask) == 255
    assert np.array_equal(out[zero], _arr(orig)[zero]) and np.array_equal(out[full], _arr(gen)[full])
    # "Only masked": a 16x16 result pasted into the box (8, 8, 24, 24) of the original.
    small = Image.new("RGB", (16, 16), (1, 2, 3))
    region_mask = _box_mask((32, 32), (8, 8, 23, 23))
    out = _arr(images.paste_back(orig, small, region_mask, (8, 8, 24, 24)))
    assert (out[8:24, 8:24] == (1, 2, 3)).all() and np.array_equal(out[:8], _arr(orig)[:8])


def test_overlay_doubles_and_latent_mask_rounds():
    m = Image.fromarray(np.array([[0, 64, 127, 200]], np.uint8))
    assert _arr(images.overlay_alpha(m)).tolist() == [[0, 128, 254, 255]]
    big = _box_mask((32, 32), (8, 8, 23, 23))  # covers latent cells 4..11 at a factor 2
    lm = images.latent_mask(big, 16, 16)
    assert lm.shape == (1, 1, 16, 16) and set(lm.unique().tolist()) == {0.0, 1.0}
    assert lm[0, 0, 4:12, 4:12].all() and lm.sum() == 64
