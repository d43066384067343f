"""SDXL refiner pipeline: its `y` vector and denoising against diffusers, and the base -> refiner switch."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import make_tiny
from easel.models.configs import SD15, SDXL, VAEConfig
from easel.pipelines import common, plan
from easel.pipelines.conditioning import refiner_vector
from easel.pipelines.refiner import check_pair, switch_step
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import sample_latents
from easel.samplers import NoiseSource
from easel.weights.model_io import save_model

# diffusers' schedulers trip numpy 2's __array__ deprecations on every step
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random SDXL base and a tiny random SDXL refiner (different text encoders and context widths)."""
    d = tmp_path_factory.mktemp("refiner")
    return make_tiny(d / "base", "sdxl"), make_tiny(d / "refiner", "sdxl-refiner")


def _request(**kw) -> GenerationRequest:
    opts = dict(prompt="a red cat", negative_prompt="blue dog", width=32, height=32, steps=6, cfg_scale=5.0,
                sampler="euler", scheduler="karras", seed=1, batch_size=2)
    return GenerationRequest(**{**opts, **kw}).resolved(32, 1)


def denoise_from(loaded, req, x, sigmas, source):
    """`req`'s sampler with `loaded`'s guided denoiser from x (already at noise level sigmas[0]) down `sigmas`."""
    denoiser = plan.request_denoiser(loaded, req, x.shape[0], sigmas)
    return plan.run(plan.SamplingPlan(req.sampler, sigmas, torch.zeros_like(x), source, denoiser, latent=x))


def refine_switch(base, refiner, req, seeds, callback=None):
    """One txt2img batch with the refiner taking over at req.refiner_switch_at (the pipelines' own path)."""
    return sample_latents(base, req, seeds, callback, refiner=refiner)


def test_refiner_vector_matches_diffusers_add_time_ids():
    """pooled text, then original size, crop corner and aesthetic score embedded as diffusers' add_time_proj does."""
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import Timesteps
    pooled = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    ours = refiner_vector(pooled, original_size=(48, 32), crops=(4, 8), aesthetic_score=2.5)
    time_ids = torch.tensor([48.0, 32.0, 4.0, 8.0, 2.5])
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(time_ids).reshape(1, -1)  # (1, 5 * 256)
    assert ours.shape == (2, 32 + 5 * 256)
    torch.testing.assert_close(ours, torch.cat([pooled, theirs.expand(2, -1)], dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scores", [(6.0, 2.5), (7.5, 1.0)], ids=["default-scores", "custom-scores"])
def test_refiner_denoising_matches_diffusers_img2img(tmp_path, models, scores):
    """Same weights (written as a diffusers folder), same noised latent, Euler over the same sigmas: diffusers'
    StableDiffusionXLImg2ImgPipeline (strength 0.4 of 10 steps) and easel's refiner give the same latents."""
    diffusers = pytest.importorskip("diffusers")
    loaded = models[1]
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(save_model(loaded, tmp_path / "r", to="diffusers"))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(10)
    sigmas = pipe.scheduler.sigmas[6:].clone()  # strength 0.4: the last 4 of 10 steps (and the final 0)
    gen = torch.Generator().manual_seed(5)
    clean, noise = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    noised = clean + noise * sigmas[0]
    aesthetic, negative = scores
    theirs = pipe("a red cat", negative_prompt="blue dog", image=clean, strength=0.4, num_inference_steps=10,
                  guidance_scale=5.0, latents=noised.clone(), aesthetic_score=aesthetic,
                  negative_aesthetic_score=negative, output_type="latent").images
    req = _request(steps=10, batch_size=1, extra={"aesthetic_score": aesthetic, "negative_aesthetic_score": negative})
    ours = denoise_from(loaded, req, noised.clone(), sigmas, NoiseSource.from_seed([0]))
    assert (ours - noised).abs().max() > 0.1  # the refiner really moved the latent
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_switch_step_rounds_half_up():
    assert [switch_step(20, 0.8), switch_step(5, 0.5), switch_step(4, 1.0), switch_step(3, 0.1)] == [16, 3, 4, 0]


def _steps(run) -> tuple[torch.Tensor, list[dict]]:
    seen = []
    out = run(lambda d: seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in d.items()}))
    return out, seen


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_switch_keeps_the_first_k_steps_then_refines(models, sampler):
    base, refiner = models
    req = _request(sampler=sampler, refiner_switch_at=0.5)  # 6 steps: k = 3
    only, only_steps = _steps(lambda cb: sample_latents(base, req, [1, 2], cb))
    mixed, mixed_steps = _steps(lambda cb: refine_switch(base, refiner, req, [1, 2], cb))
    assert [d["i"] for d in mixed_steps] == list(range(6))
    assert [d["model"] for d in mixed_steps] == ["base"] * 3 + ["refiner"] * 3
    for i in range(3):
        assert torch.equal(only_steps[i]["x"], mixed_steps[i]["x"]), i
        assert torch.equal(only_steps[i]["denoised"], mixed_steps[i]["denoised"]), i
    assert torch.equal(only_steps[3]["x"], mixed_steps[3]["x"])  # the refiner starts where the base left off
    assert (only_steps[3]["denoised"] - mixed_steps[3]["denoised"]).abs().max() > 1e-3
    assert mixed.shape == only.shape and (mixed - only).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "heun"])
def test_switching_to_the_same_model_changes_nothing(models, sampler):
    """One sampler run across the switch: noise generators and multistep history continue, so a 'refiner'
    that is the base model itself gives the base-only latents exactly."""
    base = models[0]
    req = _request(sampler=sampler, steps=4, refiner_switch_at=0.5)
    assert torch.equal(refine_switch(base, base, req, [3, 4]), sample_latents(base, req, [3, 4]))


def test_switch_at_the_ends(models):
    base, refiner = models
    req = _request(steps=3, refiner_switch_at=1.0)
    only, seen = _steps(lambda cb: refine_switch(base, refiner, req, [7], cb))
    assert [d["model"] for d in seen] == ["base"] * 3 and torch.equal(only, sample_latents(base, req, [7]))
    req = _request(steps=3, refiner_switch_at=0.1)  # k = 0: the refiner alone, from pure noise
    alone, seen = _steps(lambda cb: refine_switch(base, refiner, req, [7], cb))
    assert [d["model"] for d in seen] == ["refiner"] * 3
    sigmas = common.sigmas_for(common.make_schedule(refiner.model), "karras", 3)
    noise, source = common.initial_noise([7], (4, 16, 16))
    want = denoise_from(refiner, req, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, source)
    assert torch.equal(alone, want) and (alone - only).abs().max() > 1e-3


def test_refiner_from_another_latent_space_is_named():
    other = dataclasses.replace(SDXL, vae=VAEConfig(ch_mult=(1, 2)))  # 1/2 scale latents instead of 1/8
    check_pair(SimpleNamespace(config=SD15), SimpleNamespace(config=SDXL))  # same latent shape: allowed (as A1111)
    with pytest.raises(ValueError, match="same family"):
        check_pair(SimpleNamespace(config=SDXL), SimpleNamespace(config=other))
