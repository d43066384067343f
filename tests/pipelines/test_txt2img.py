"""txt2img on tiny random-weight models: parity with diffusers, determinism, seeds, errors."""
import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from easel.pipelines import common
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import sample_latents, txt2img
from easel.weights.model_io import load_model, save_model


def test_matches_diffusers_stable_diffusion_pipeline(tmp_path, tiny_sd1_file):
    """Same single file, same scheduler (Euler, 'leading' timesteps = ddim_uniform), same noise -> same image."""
    diffusers = pytest.importorskip("diffusers")
    loaded = load_model(tiny_sd1_file)
    folder = save_model(loaded, tmp_path / "pipe", to="diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    req = GenerationRequest("a red cat", "blue dog", width=32, height=32, steps=10, cfg_scale=6.0, sampler="euler",
                            scheduler="ddim_uniform", seed=123, batch_size=2).resolved(32, 1)
    seeds = [123, 124]
    noise, _ = common.initial_noise(seeds, (4, 16, 16))  # the tiny VAE downsamples by 2
    ours = sample_latents(loaded, req, seeds)
    theirs = pipe(["a red cat"] * 2, negative_prompt=["blue dog"] * 2, num_inference_steps=10, guidance_scale=6.0,
                  height=32, width=32, latents=noise.clone(), output_type="latent").images
    assert ours.abs().max() > 0.1  # a real signal, not a degenerate all-zero output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    image = pipe(["a red cat"], negative_prompt=["blue dog"], num_inference_steps=10, guidance_scale=6.0,
                 height=32, width=32, latents=noise[:1].clone(), output_type="np").images[0]
    mine = np.asarray(txt2img(loaded, GenerationRequest(**{**req.to_dict(), "batch_size": 1}))[0].image)
    assert np.abs(mine.astype(float) - image * 255).max() <= 1.0


def test_same_seed_same_pixels_and_batches_count_up(tiny_sd1):
    pipe = Pipeline(tiny_sd1)
    opts = dict(width=32, height=32, steps=4, sampler="euler_a", scheduler="karras")
    a = pipe.txt2img("a red cat", seed=7, batch_size=2, **opts)
    b = pipe.txt2img("a red cat", seed=8, batch_size=1, **opts)
    c = pipe.txt2img("a red cat", seed=7, batch_size=1, **opts)
    d = pipe.txt2img("a red cat", seed=7, batch_size=2, **opts)
    px = lambda im: np.asarray(im).astype(int)  # noqa: E731
    assert np.array_equal(px(a[0]), px(d[0])) and np.array_equal(px(a[1]), px(d[1]))  # same request: same bytes
    # Image 2 of a batch is image 1 of seed + 1 alone (up to float summation order, which depends on batch size).
    assert np.abs(px(a[1]) - px(b[0])).max() <= 2 and np.abs(px(a[0]) - px(c[0])).max() <= 2
    assert np.abs(px(a[0]) - px(a[1])).mean() > 5


def test_n_iter_and_params(tiny_sd1):
    results = Pipeline(tiny_sd1).generate(GenerationRequest("a cat", width=32, height=24, steps=2, seed=5,
                                                            batch_size=2, n_iter=2, sampler="DPM++ 2M Karras"))
    assert [r.params["seed"] for r in results] == [5, 6, 7, 8]
    assert results[0].image.size == (32, 24)
    p = results[0].params
    assert (p["sampler"], p["scheduler"], p["steps"]) == ("dpmpp_2m", "karras", 2)


@pytest.mark.parametrize("field,value,match", [("width", 30, "multiple of 8"), ("height", 0, "multiple of 8"),
                                               ("steps", 0, "steps"), ("sampler", "nope", "unknown sampler"),
                                               ("scheduler", "nope", "unknown scheduler")])
def test_bad_requests_name_the_field(tiny_sd1, field, value, match):
    with pytest.raises(ValueError, match=match):
        Pipeline(tiny_sd1).txt2img("x", **{"width": 32, "height": 32, "steps": 2, field: value})


def test_sdxl_and_v_prediction_models_generate(tmp_path):
    for family in ("sdxl", "sd2"):
        imgs = Pipeline(make_tiny(tmp_path / family, family)).txt2img("a cat", width=32, height=32, steps=2, seed=1)
        assert imgs[0].size == (32, 32) and np.asarray(imgs[0]).std() > 0


def test_callback_sees_every_step(tiny_sd1):
    seen = []
    Pipeline(tiny_sd1).txt2img("x", width=32, height=32, steps=3, seed=1, callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2]


def test_sdxl_matches_diffusers_sdxl_pipeline(tmp_path):
    """Two text encoders, pooled text and size/crop conditioning give the same latents as diffusers' SDXL pipeline.

    ddim_uniform equals diffusers' 'leading' spacing when the step count divides 1000 (ComfyUI's rule adds a step
    otherwise), hence 5 steps."""
    diffusers = pytest.importorskip("diffusers")
    loaded = make_tiny(tmp_path, "sdxl")
    folder = save_model(loaded, tmp_path / "xl", to="diffusers")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    req = GenerationRequest("a red cat", "blue dog", width=32, height=32, steps=5, cfg_scale=5.0, sampler="euler",
                            scheduler="ddim_uniform", seed=3, batch_size=1).resolved(32, 1)
    noise, _ = common.initial_noise([3], (4, 16, 16))
    ours = sample_latents(loaded, req, [3])
    theirs = pipe("a red cat", negative_prompt="blue dog", num_inference_steps=5, guidance_scale=5.0, height=32,
                  width=32, latents=noise.clone(), output_type="latent").images
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_diffusers_reads_our_single_file(tmp_path, tiny_sd1_file):
    """diffusers' own single-file loader (given the component configs) reads the CompVis layout we write."""
    diffusers = pytest.importorskip("diffusers")
    loaded = load_model(tiny_sd1_file)
    folder = save_model(loaded, tmp_path / "cfg", to="diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(tiny_sd1_file), config=str(folder),
                                                              local_files_only=True, safety_checker=None)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_sd2_v_prediction_matches_diffusers(tmp_path):
    """SD2 layout (OpenCLIP text encoder at the penultimate layer) with v-prediction, against diffusers."""
    diffusers = pytest.importorskip("diffusers")
    loaded = make_tiny(tmp_path, "sd2")
    assert loaded.model.config.prediction == "v"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(save_model(loaded, tmp_path / "sd2", to="diffusers"),
                                                             safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    req = GenerationRequest("a red cat", "", width=32, height=32, steps=5, cfg_scale=4.0, sampler="euler",
                            scheduler="ddim_uniform", seed=9, batch_size=1).resolved(32, 1)
    noise, _ = common.initial_noise([9], (4, 16, 16))
    ours = sample_latents(loaded, req, [9])
    theirs = pipe("a red cat", negative_prompt="", num_inference_steps=5, guidance_scale=4.0, height=32, width=32,
                  latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
