"""The sampling plan: what progress counts equals what runs, sizes, wrappers and observers, eta, NaN, stops."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from easel.pipelines import common, plan
from easel.pipelines.names import resolve_upscaler, sampler_and_schedule
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.pipelines.sizes import final_size
from easel.samplers import resolve_scheduler

pytestmark = pytest.mark.usefixtures("one_thread_module")  # see tests/conftest.py

FAST = dict(width=16, height=16, steps=4, seed=3, batch_size=1, cfg_scale=3.0)


def _image(w=16, h=16) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 12 % 256, y * 12 % 256, np.full_like(x, 90)], -1).astype(np.uint8))


def _mask(w=16, h=16) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[4:12, 4:12] = 255
    return Image.fromarray(m)


REQUESTS = {
    "txt2img": dict(n_iter=2),
    "hires": dict(enable_hr=True, hr_scale=1.5, hr_denoising_strength=0.6),
    "hires-fixed-steps": dict(enable_hr=True, hr_scale=2, hr_second_pass_steps=3, hr_denoising_strength=0.3),
    "img2img": dict(init_images=[_image()], denoising_strength=0.5, n_iter=2),
    "img2img-strength-0": dict(init_images=[_image()], denoising_strength=0.0),
    "inpaint": dict(init_images=[_image()], mask=_mask(), denoising_strength=0.8),
    "outpaint": dict(init_images=[_image()], outpaint_left=8, outpaint_down=16, denoising_strength=0.75),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_count_steps_and_final_size_are_what_runs(tiny_sd1, name):
    """Progress totals and size limits read the same plan arithmetic as the modes: the counts and sizes agree."""
    req = GenerationRequest("a red cat", **{**FAST, **REQUESTS[name]})
    seen = []
    results = Pipeline(tiny_sd1).generate(req, lambda d: seen.append(d))
    assert len(seen) == plan.count_steps(req)
    assert {r.image.size for r in results} == {final_size(req, 16)}
    assert all(d["steps"] == plan.pass_steps(req)[0 if d.get("phase", "base") == "base" else 1] for d in seen)


def test_observers_and_wrappers_see_every_step(tiny_sd1):
    req = GenerationRequest("a red cat", **FAST).resolved(16, 1)
    p = plan.build_plan(tiny_sd1, req, [3], plan.request_sigmas(tiny_sd1.model, req))
    calls, observed = [], []

    def wrapper(inner):
        def denoise(x, sigma, **kw):
            calls.append(float(sigma[0]))
            return inner(x, sigma, **kw)
        return denoise
    out = plan.run(p.wrap(wrapper).observe(observed.append).tagged(phase="test"))
    assert [d["i"] for d in observed] == list(range(p.steps)) and {d["phase"] for d in observed} == {"test"}
    assert len(calls) == p.steps  # dpmpp_2m: one model call per step
    torch.testing.assert_close(out, plan.run(p))  # observing and a pass-through wrapper change nothing


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc", "euler_a"])
def test_eta_is_accepted_with_every_sampler(tiny_sd1, sampler):
    """A1111 clients send eta on every call: samplers without an eta option ignore it (no 500)."""
    base = GenerationRequest("x", sampler=sampler, **FAST)
    with_eta = Pipeline(tiny_sd1).generate(dataclasses.replace(base, eta=0.3))[0].image
    without = Pipeline(tiny_sd1).generate(base)[0].image
    same = np.array_equal(np.asarray(with_eta), np.asarray(without))
    assert same == (sampler != "euler_a")  # only the ancestral sampler's result depends on eta


def test_nan_weights_are_named_not_a_black_image(tiny_sd1):
    with torch.no_grad():
        tiny_sd1.model.unet.out[-1].bias.fill_(float("nan"))
    with pytest.raises(common.NonFiniteOutput, match="NaN"):
        Pipeline(tiny_sd1).generate(GenerationRequest("x", **FAST))


def test_each_batch_is_handed_over_as_it_finishes(tiny_sd1):
    seen_at = []
    steps = []
    Pipeline(tiny_sd1).generate(GenerationRequest("x", n_iter=3, **FAST), lambda d: steps.append(d),
                                on_batch=lambda batch: seen_at.append((len(steps), [r.params["seed"] for r in batch])))
    assert seen_at == [(4, [3]), (8, [4]), (12, [5])]


def test_should_stop_reaches_inside_the_vae_decode(tiny_sd1):
    """A cancel during a (tiled) decode stops the request there: no image of that batch comes out."""
    polls = []

    def should_stop():
        polls.append(1)
        return True
    out = Pipeline(tiny_sd1).generate(GenerationRequest("x", tiled_vae=True, **FAST), should_stop=should_stop)
    assert out == [] and polls


def test_names_resolve_one_way_everywhere():
    assert resolve_scheduler("Karras") == "karras" and resolve_scheduler("SGM Uniform") == "sgm_uniform"
    assert resolve_upscaler("Latent (bicubic)") == "latent-bicubic" and resolve_upscaler("lanczos") == "lanczos"
    assert sampler_and_schedule("DPM++ 2M Karras", None) == ("dpmpp_2m", "karras")
    assert sampler_and_schedule("DPM++ 2M Karras", "karras") == ("dpmpp_2m", "karras")
    assert sampler_and_schedule("UniPC", None) == ("uni_pc", None)
    assert sampler_and_schedule("uni_pc_bh2", "Exponential") == ("uni_pc_bh2", "exponential")
    with pytest.raises(ValueError, match="names the karras schedule but scheduler is 'exponential'"):
        sampler_and_schedule("DPM++ 2M Karras", "exponential")
    r = GenerationRequest(sampler="Euler a", scheduler="Karras", hr_upscaler="Latent (antialiased)").resolved(64, 1)
    assert (r.sampler, r.scheduler, r.hr_upscaler) == ("euler_a", "karras", "latent-antialiased")
    assert GenerationRequest(sampler="DPM++ 2M SDE Exponential").resolved(64, 1).scheduler == "exponential"
    assert GenerationRequest().resolved(64, 1).scheduler == "karras"  # the default when nothing names one


def test_automatic_is_the_samplers_preferred_schedule_everywhere():
    """A1111's "Automatic": the sampler's own preference (DPM++ 2M: Karras, 2M SDE: Exponential), else "normal";
    the same answer through the request (CLI, native API) as through the A1111 routes."""
    from easel.serve.a1111_schema import resolve_a1111_sampler
    assert sampler_and_schedule("DPM++ 2M", "Automatic") == ("dpmpp_2m", "karras")
    assert sampler_and_schedule("dpmpp_2m_sde", "automatic") == ("dpmpp_2m_sde", "exponential")
    assert sampler_and_schedule("Euler a", "Automatic") == ("euler_a", "normal")
    assert sampler_and_schedule("DPM++ 2M SDE Exponential", "Automatic") == ("dpmpp_2m_sde", "exponential")
    for sampler in ("DPM++ 2M", "DPM++ SDE", "Euler", "DPM++ 2M SDE", "UniPC"):
        via_request = GenerationRequest(sampler=sampler, scheduler="Automatic").resolved(64, 1)
        assert (via_request.sampler, via_request.scheduler) == resolve_a1111_sampler(sampler, "Automatic"), sampler


def test_extend_plan_reaches_every_plan_a_mode_builds(tiny_sd1):
    """The hook see-inside capture and ControlNet use: both hires passes get it, and observing changes nothing."""
    seen = []

    def extend(p, loaded):
        assert loaded is tiny_sd1
        return p.observe(lambda d: seen.append(d.get("phase")))
    req = GenerationRequest("x", enable_hr=True, hr_scale=1.5, **FAST)
    with_ext = Pipeline(tiny_sd1).generate(req, extend_plan=extend)
    assert seen == ["base"] * 4 + ["hires"] * plan.pass_steps(req)[1]
    assert np.array_equal(np.asarray(with_ext[0].image), np.asarray(Pipeline(tiny_sd1).generate(req)[0].image))


def test_an_interrupted_batch_comes_out_as_it_stood(tiny_sd1):
    """A1111's interrupt: sampling stops, the batch is decoded from the last x0 prediction, no later batch or pass."""
    seen = []

    def interrupt_at_step_1(d):
        seen.append(d)
        if d["i"] == 1:
            raise common.Interrupted()
    req = GenerationRequest("x", n_iter=2, **FAST)
    out = Pipeline(tiny_sd1).generate(req, interrupt_at_step_1)
    assert [r.params["seed"] for r in out] == [3] and len(seen) == 2
    want = common.decode(tiny_sd1.model, seen[-1]["denoised"])[0]
    assert np.array_equal(np.asarray(out[0].image), np.asarray(want))
    seen.clear()
    hires = Pipeline(tiny_sd1).generate(dataclasses.replace(req, enable_hr=True, hr_scale=2), interrupt_at_step_1)
    assert len(hires) == 1 and hires[0].image.size == (32, 32) and {d["phase"] for d in seen} == {"base"}


def test_upscaler_choices_and_labels_name_the_same_upscalers():
    """request.HR_UPSCALERS (the UI's choices, kept torch-free) and names.UPSCALER_LABELS list one set, in order."""
    from easel.pipelines.names import UPSCALER_LABELS
    from easel.pipelines.request import HR_UPSCALERS
    assert tuple(UPSCALER_LABELS) == HR_UPSCALERS
