"""The request schema's new fields, Pipeline dispatch by mode, and skip/interrupt of the batch loop."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from easel.pipelines import common
from easel.pipelines.pipeline import Pipeline, mode_preparer
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import sample_latents, txt2img

pytestmark = pytest.mark.usefixtures("one_thread_module")  # see tests/conftest.py


def _image(w=32, h=32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 8 % 256, y * 8 % 256, np.full_like(x, 60)], -1).astype(np.uint8))


def _mask(w=32, h=32) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return Image.fromarray(m)


def test_mode_follows_the_inputs():
    im = _image()
    assert GenerationRequest().mode == "txt2img"
    assert GenerationRequest(enable_hr=True).mode == "txt2img"
    assert GenerationRequest(init_images=[im]).mode == "img2img"
    assert GenerationRequest(init_images=[im], mask=_mask()).mode == "inpaint"
    assert GenerationRequest(init_images=[im], mask=_mask(), outpaint_up=8).mode == "outpaint"


def test_a1111_indices_and_hyphens_become_names():
    r = GenerationRequest(resize_mode=2, inpainting_fill="latent-nothing")
    assert (r.resize_mode, r.inpainting_fill) == ("resize_and_fill", "latent_nothing")
    # A1111's numbering: 0 fill, 1 original, 2 latent noise, 3 latent nothing; the default stays "original"
    assert [GenerationRequest(inpainting_fill=i).inpainting_fill for i in range(4)] == \
        ["fill", "original", "latent_noise", "latent_nothing"]
    assert GenerationRequest().inpainting_fill == "original"


def test_to_dict_is_json_and_images_round_trip_as_base64():
    req = GenerationRequest("x", init_images=[_image(16, 8)], mask=_mask(16, 8), loras=["a:0.5"])
    marked = req.to_dict()
    assert json.loads(json.dumps(marked))["init_images"] == ["<image 16x8>"] and marked["mask"] == "<image 16x8>"
    assert "init_images" not in req.to_dict(images="drop")
    back = GenerationRequest.from_dict(json.loads(json.dumps(req.to_dict(images="base64"))))
    assert back.mode == "inpaint" and back.loras == ["a:0.5"]
    assert np.array_equal(np.asarray(back.init_images[0]), np.asarray(req.init_images[0]))
    with pytest.raises(ValueError, match="placeholder"):
        GenerationRequest.from_dict(marked)
    with pytest.raises(ValueError, match="init_images\\[0\\] is not a base64"):
        GenerationRequest.from_dict({"init_images": ["%%%"]})
    with pytest.raises(ValueError, match="unknown request field"):
        GenerationRequest.from_dict({"strength": 0.5})


@pytest.mark.parametrize("field,value,match", [
    ("denoising_strength", -0.1, "denoising_strength must be between 0 and 1"),
    ("resize_mode", "squash", "resize_mode.*just_resize, crop_and_resize, resize_and_fill"),
    ("inpainting_fill", "blur", "inpainting_fill.*latent_noise"), ("mask_blur", -1, "mask_blur"),
    ("outpaint_left", -8, "outpaint_left"), ("hr_scale", 0, "hr_scale"), ("hr_upscaler", "esrgan", "hr_upscaler"),
    ("hr_second_pass_steps", -1, "hr_second_pass_steps"), ("hr_denoising_strength", 2, "hr_denoising_strength"),
    ("hr_sampler", "nope", "unknown hr_sampler"), ("hr_scheduler", "nope", "unknown hr_scheduler"),
    ("subseed_strength", 1.5, "subseed_strength"), ("seed_resize_from_w", -1, "seed_resize_from_w"),
    ("loras", [""], "loras\\[0\\]"), ("refiner_switch_at", 0, "refiner_switch_at"),
    ("preview_every", -1, "preview_every"), ("preview_mode", "fast", "preview_mode.*approx, full"),
    ("mask", _mask(), "inpaint needs an image"), ("init_images", ["a.png"], "init_images\\[0\\] must be a PIL"),
])
def test_new_fields_are_checked_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        GenerationRequest(**{field: value}).check()


def test_skip_drops_a_batch_and_interrupt_keeps_the_finished(tiny_sd1):
    req = GenerationRequest("x", width=16, height=16, steps=2, seed=1, batch_size=2, n_iter=3)

    def raise_at(kind, batch):
        def cb(d):
            if d["batch"] == batch and d["i"] == 1:
                raise kind()
        return cb
    assert [r.params["seed"] for r in txt2img(tiny_sd1, req, raise_at(common.Skipped, 1))] == [1, 2, 5, 6]
    # an interrupt stops sampling: its batch comes out as it stood (from the last x0 prediction), then no more
    assert [r.params["seed"] for r in txt2img(tiny_sd1, req, raise_at(common.Interrupted, 1))] == [1, 2, 3, 4]
    assert [r.params["seed"] for r in txt2img(tiny_sd1, req, raise_at(common.Interrupted, 0))] == [1, 2]


def test_variation_seeds_reach_every_mode_through_the_core(tiny_sd1):
    """The plan draws A1111 variation noise when subseed_strength or seed_resize_from is set."""
    from easel.pipelines.noise import variation_noise
    base = GenerationRequest("x", width=16, height=16, steps=1, seed=4, subseed=40, batch_size=2, sampler="euler",
                             cfg_scale=1.0).resolved(16, 2)
    starts = []  # the unit noise each run started from: x at step 0 = noise * sqrt(1 + sigma0^2)
    cb = lambda d: starts.append(d["x"] / (1 + d["sigma"] ** 2) ** 0.5)  # noqa: E731
    sample_latents(tiny_sd1, base, [4, 5], callback=cb)
    sample_latents(tiny_sd1, dataclasses.replace(base, subseed_strength=0.5), [4, 5], callback=cb)
    plain, _ = common.initial_noise([4, 5], (4, 8, 8))
    varied, _ = variation_noise([4, 5], (4, 8, 8), [40, 41], 0.5, None, 2)  # subseeds count up from 40
    torch.testing.assert_close(starts[0], plain)
    torch.testing.assert_close(starts[1], varied)
    assert (varied - plain).abs().mean() > 0.1
    params = txt2img(tiny_sd1, dataclasses.replace(base, subseed_strength=0.5, seed_resize_from_w=8,
                                                   seed_resize_from_h=8))[1].params
    assert (params["subseed"], params["subseed_strength"], params["seed_resize_from_w"]) == (41, 0.5, 8)


def test_mode_dispatch():
    from easel.pipelines import hires, img2img, txt2img as txt2img_module
    assert mode_preparer("txt2img") is txt2img_module.prepare and mode_preparer("txt2img", True) is hires.prepare
    assert mode_preparer("img2img") is img2img.prepare and mode_preparer("img2img", True) is img2img.prepare
    with pytest.raises(ValueError, match="unknown mode"):
        mode_preparer("video")


def _all_modes(pipe: Pipeline, size: int, **opts) -> dict:
    im, mask = _image(size, size), _mask(size, size)
    return {
        "txt2img": pipe.txt2img("a red star", **opts),
        "hires": pipe.txt2img("a red star", enable_hr=True, hr_scale=1.5, hr_denoising_strength=0.5, **opts),
        "img2img": pipe.img2img(im, "a red star", denoising_strength=0.6, **opts),
        "inpaint": pipe.inpaint(im, mask, "a red star", **opts),
        "outpaint": pipe.outpaint(im, "a red star", right=16, down=8, **opts),
    }


@pytest.mark.parametrize("which", [pytest.param("builtin", marks=pytest.mark.slow), "tiny"])
def test_every_mode_runs_through_the_pipeline(which, tiny_sd1):
    import easel
    pipe, size = (easel.load(), 64) if which == "builtin" else (Pipeline(tiny_sd1), 32)
    out = _all_modes(pipe, size, steps=3, seed=2, batch_size=1)
    sizes = {k: v[0].size for k, v in out.items()}
    assert sizes == {"txt2img": (size, size), "hires": (size * 3 // 2, size * 3 // 2), "img2img": (size, size),
                     "inpaint": (size, size), "outpaint": (size + 16, size + 8)}
    assert all(len(v) == 1 and np.asarray(v[0]).std() > 1 for v in out.values())
    # inpaint keeps the unmasked pixels of the source
    src, res = np.asarray(_image(size, size), int), np.asarray(out["inpaint"][0], int)
    keep = np.asarray(_mask(size, size)) == 0
    assert np.abs(src - res)[keep].mean() < np.abs(src - res)[~keep].mean()


def test_outpaint_method_needs_a_side(tiny_sd1):
    with pytest.raises(ValueError, match="left, right, up, down"):
        Pipeline(tiny_sd1).outpaint(_image(), "x")
