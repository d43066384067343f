"""Outpainting: canvas geometry, pre-fill, mask with overlap, and the original kept beyond the feathered seam."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny
from easel.pipelines import images
from easel.pipelines.inpaint import changed_outside
from easel.pipelines.outpaint import extend_canvas, margins, outpaint, outpaint_mask
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")


def picture(w=32, h=24, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_margins_round_up_to_8():
    req = GenerationRequest(outpaint_left=5, outpaint_right=0, outpaint_up=8, outpaint_down=9)
    assert margins(req) == (8, 0, 8, 16)


def test_canvas_stretches_edges_with_noise_only_in_the_border():
    img = picture()
    canvas = np.asarray(extend_canvas(img, 8, 0, 0, 16, seed=1), dtype=int)
    assert canvas.shape == (40, 40, 3)
    assert np.array_equal(canvas[:24, 8:], np.asarray(img))  # the image itself untouched
    border = canvas[:24, :8] - np.asarray(img, dtype=int)[:, :1]  # left border vs the stretched first column
    assert 10 < border.std() < 40 and abs(border.mean()) < 5
    noiseless = np.asarray(extend_canvas(img, 8, 0, 0, 16, noise=0), dtype=int)
    assert np.array_equal(noiseless[30, 8:], np.asarray(img)[-1])  # bottom border repeats the last row
    assert np.array_equal(canvas, np.asarray(extend_canvas(img, 8, 0, 0, 16, seed=1)))  # seeded


def test_mask_covers_border_plus_overlap_on_extended_sides_only():
    m = np.asarray(outpaint_mask((32, 24), 8, 0, 0, 16, overlap=4))
    assert m.shape == (40, 40)
    assert (m[:, :12] == 255).all() and (m[20:] == 255).all()  # border + 4 px overlap (left, bottom)
    assert (m[:20, 12:] == 0).all()  # untouched top and right edges of the image


@pytest.mark.parametrize("inpainting_model", [False, True])
def test_outpaint_keeps_the_image_beyond_the_seam(tmp_path, tiny_sd1, inpainting_model):
    loaded = make_tiny(tmp_path, "sd1-inpaint") if inpainting_model else tiny_sd1
    img = picture()
    req = GenerationRequest("a red cat", init_images=[img], outpaint_left=8, outpaint_down=8, steps=3, seed=2,
                            batch_size=1, sampler="euler", mask_blur=2, denoising_strength=0.9)
    out = outpaint(loaded, req)
    res = out[0].image
    assert res.size == (40, 32)
    assert out[0].params["mode"] == "outpaint" and (out[0].params["width"], out[0].params["height"]) == (32, 24)
    placed = Image.new("RGB", res.size)
    placed.paste(img, (8, 0))
    # Unchanged: everything outside the mask (border + max(2*blur, 8) px overlap) grown by the blur's reach.
    seam = images.prepare_mask(outpaint_mask((32, 24), 8, 0, 0, 8, overlap=8), blur=2)
    assert changed_outside(placed, res, seam) == 0
    assert np.asarray(res, dtype=int)[:, :4].std() > 5  # the new border is painted, not flat


def test_pipeline_outpaint_and_user_mask_union(tiny_sd1):
    img = picture()
    mask = Image.new("L", img.size, 0)
    mask.paste(255, (20, 4, 28, 12))
    res = Pipeline(tiny_sd1).outpaint(img, "a cat", right=8, steps=2, seed=1, batch_size=1, mask=mask, mask_blur=0)
    assert res[0].size == (40, 24)
    diff = np.abs(np.asarray(res[0], dtype=int)[:, :32] - np.asarray(img, dtype=int))
    assert diff[4:12, 20:28].mean() > 10  # the user's mask was repainted too
    assert diff[14:, :16].max() == 0  # far from both masks: exact


def test_outpaint_needs_a_margin(tiny_sd1):
    with pytest.raises(ValueError, match="at least one"):
        outpaint(tiny_sd1, GenerationRequest("x", init_images=[picture()], steps=2))


def test_infotext_says_the_canvas_size_and_reads_back_the_source_size(tiny_sd1):
    from easel.pipelines.metadata import infotext, infotext_fields
    src = Image.new("RGB", (32, 24), (90, 120, 200))
    out = Pipeline(tiny_sd1).outpaint(src, "a red cat", left=8, down=13, steps=2, seed=1, batch_size=1)
    assert out[0].size == (40, 40)  # 13 px rounds up to 16
    res = Pipeline(tiny_sd1).generate(GenerationRequest("a red cat", init_images=[src], outpaint_left=8,
                                                        outpaint_down=13, steps=2, seed=1, batch_size=1))[0]
    text = infotext(res.params)
    assert "Size: 40x40" in text and "Outpaint: " in text
    fields = infotext_fields(text)
    assert (fields["width"], fields["height"], fields["outpaint_left"], fields["outpaint_down"]) == (32, 24, 8, 13)
