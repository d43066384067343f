"""img2img: parity with diffusers' img2img pipeline, strength limits, resize modes, batches, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from easel.pipelines import common, plan
from easel.pipelines.images import resize_image
from easel.pipelines.img2img import img2img
from easel.pipelines.sizes import image_default_size as default_size
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.weights.model_io import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # see tests/conftest.py


def gradient_image(w: int = 32, h: int = 32) -> Image.Image:
    """A smooth colour ramp with a bright square: structure the VAE can carry."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = 240
    return Image.fromarray(arr)


def _diffusers_img2img(tmp_path, tiny_sd1_file, scheduler_cls: str, **scheduler_config):
    diffusers = pytest.importorskip("diffusers")
    loaded = load_model(tiny_sd1_file)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        save_model(loaded, tmp_path / "pipe", to="diffusers"), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return loaded, pipe


# diffusers' 'leading' spacing of Euler is ComfyUI's ddim_uniform, its 'trailing' spacing is ComfyUI's simple.
@pytest.mark.parametrize("sampler,scheduler,scheduler_cls,spacing", [
    ("euler", "ddim_uniform", "EulerDiscreteScheduler", "leading"),
    ("dpmpp_2m", "simple", "DPMSolverMultistepScheduler", "trailing")])
def test_matches_diffusers_img2img_pipeline(tmp_path, tiny_sd1_file, sampler, scheduler, scheduler_cls, spacing):
    """Same weights, same encoded image, same seeds: the sliced schedule (the last int(steps*strength) steps) gives
    diffusers' latents."""
    loaded, pipe = _diffusers_img2img(tmp_path, tiny_sd1_file, scheduler_cls, timestep_spacing=spacing)
    image = gradient_image()
    ours_init = common.encode(loaded.model, [image])  # (1, 4, 16, 16)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    theirs_init = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(ours_init, theirs_init, rtol=1e-4, atol=1e-4)

    req = GenerationRequest("a red cat", "blue dog", width=32, height=32, steps=10, cfg_scale=6.0, sampler=sampler,
                            scheduler=scheduler, seed=5, batch_size=2).resolved(32, 2)
    seeds = [5, 6]
    sigmas = plan.img2img_sigmas(plan.request_sigmas(loaded.model, req), 0.6)
    ours = plan.run(plan.build_plan(loaded, req, seeds, sigmas, ours_init))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = pipe(["a red cat"] * 2, image=ours_init.repeat(2, 1, 1, 1), strength=0.6, num_inference_steps=10,
                  guidance_scale=6.0, negative_prompt=["blue dog"] * 2, generator=gens, output_type="latent").images
    assert (ours - ours_init).abs().max() > 0.1  # the image was actually changed
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_runs_the_last_int_steps_times_strength_steps(tiny_sd1):
    seen = []
    req = GenerationRequest("a cat", init_images=[gradient_image()], steps=10, denoising_strength=0.35, seed=1,
                            batch_size=1, sampler="euler")
    img2img(tiny_sd1, req, callback=lambda d: seen.append((d["i"], d["steps"])))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_strength_zero_keeps_the_image_and_strength_one_replaces_it(tiny_sd1):
    image = gradient_image()
    opts = dict(init_images=[image], steps=4, seed=3, batch_size=1, sampler="euler")
    kept = np.asarray(img2img(tiny_sd1, GenerationRequest("a cat", denoising_strength=0.0, **opts))[0].image)
    roundtrip = np.asarray(common.decode(tiny_sd1.model, common.encode(tiny_sd1.model, [image]))[0])
    assert np.array_equal(kept, roundtrip)  # only the VAE round trip, no denoising
    low = np.asarray(img2img(tiny_sd1, GenerationRequest("a cat", denoising_strength=0.3, **opts))[0].image)
    high = np.asarray(img2img(tiny_sd1, GenerationRequest("a cat", denoising_strength=1.0, **opts))[0].image)
    dist = lambda a: np.abs(a.astype(float) - roundtrip).mean()  # noqa: E731
    assert dist(low) < dist(high)


def test_one_init_image_for_the_whole_batch_and_params(tiny_sd1):
    res = Pipeline(tiny_sd1).generate(GenerationRequest("a cat", init_images=[gradient_image(40, 24)], steps=2,
                                                        seed=7, batch_size=2, n_iter=2, denoising_strength=0.5))
    assert [r.params["seed"] for r in res] == [7, 8, 9, 10]
    assert res[0].image.size == (40, 24)  # the init image's size when width/height are not given
    p = res[0].params
    assert (p["mode"], p["denoising_strength"], p["resize_mode"]) == ("img2img", 0.5, "just_resize")
    assert not np.array_equal(np.asarray(res[0].image), np.asarray(res[1].image))


def test_pipeline_method_and_explicit_size(tiny_sd1):
    out = Pipeline(tiny_sd1).img2img(gradient_image(), "a cat", width=16, height=24, steps=2, seed=1, batch_size=1)
    assert len(out) == 1 and out[0].size == (16, 24)


def test_builtin_model_img2img():
    import easel
    pipe = easel.load()
    src = pipe.txt2img("a red star", steps=4, seed=2, batch_size=1)[0]
    out = pipe.img2img(src, "a blue circle", steps=4, seed=2, batch_size=1, denoising_strength=0.5)[0]
    assert out.size == src.size == (64, 64)
    assert 1 < np.abs(np.asarray(out, float) - np.asarray(src, float)).mean() < 100


def test_resize_mode_fits_the_init_image(tiny_sd1, monkeypatch):
    """The init image goes through images.resize_image with the request's mode before encoding."""
    from easel.pipelines import img2img as mod
    seen = []

    def spy(im, w, h, m):
        seen.append((im.size, w, h, m))
        return resize_image(im, w, h, m)
    monkeypatch.setattr(mod, "resize_image", spy)
    res = img2img(tiny_sd1, GenerationRequest("x", init_images=[gradient_image(40, 20)], width=16, height=16, steps=1,
                                              seed=1, batch_size=1, resize_mode="crop_and_resize"))
    assert seen == [((40, 20), 16, 16, "crop_and_resize")]
    assert res[0].image.size == (16, 16) and res[0].params["resize_mode"] == "crop_and_resize"


def test_default_size():
    assert default_size((100, 50), None, None) == (104, 48)
    assert default_size((100, 50), 64, None) == (64, 32)
    assert default_size((100, 50), None, 32) == (64, 32)


@pytest.mark.parametrize("opts,match", [
    (dict(denoising_strength=1.5), "denoising_strength"), (dict(resize_mode="stretch"), "resize_mode"),
    (dict(batch_size=3, init_images=[gradient_image()] * 2), "init images"),
])
def test_bad_requests_name_the_field(tiny_sd1, opts, match):
    req = GenerationRequest("x", **{"init_images": [gradient_image()], "steps": 1, **opts})
    with pytest.raises(ValueError, match=match):
        img2img(tiny_sd1, req)


def test_skip_and_interrupt(tiny_sd1):
    def stop(kind, when):
        def cb(d):
            if d["batch"] == when and d["i"] == 0:
                raise kind()
        return cb
    req = GenerationRequest("x", init_images=[gradient_image()], steps=2, seed=1, batch_size=1, n_iter=3)
    assert [r.params["seed"] for r in img2img(tiny_sd1, req, stop(common.Skipped, 1))] == [1, 3]
    assert [r.params["seed"] for r in img2img(tiny_sd1, req, stop(common.Interrupted, 1))] == [1, 2]
