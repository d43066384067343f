"""Hires fix: base pass = txt2img, upscalers, second-pass options and step counts, parameters."""
import numpy as np
import pytest
import torch

from easel.pipelines import common
from easel.pipelines.hires import hires, hires_size, second_pass_request, upscale_latents
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import sample_latents

pytestmark = pytest.mark.usefixtures("one_thread_module")  # see tests/conftest.py


def _req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cat", width=16, height=16, steps=4, seed=11, batch_size=1, sampler="euler",
                enable_hr=True)
    return GenerationRequest(**{**base, **kw})


def test_strength_zero_is_the_upscaled_txt2img_image(tiny_sd1):
    req = _req(hr_upscaler="latent-nearest", hr_denoising_strength=0.0, hr_scale=2.0)
    out = hires(tiny_sd1, req)[0].image
    base = sample_latents(tiny_sd1, req.resolved(32, 1), [11])  # (1, 4, 8, 8)
    up = base.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2 by hand
    expected = common.decode(tiny_sd1.model, up)[0]
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_step_counts_of_both_passes(tiny_sd1):
    phases = []
    hires(tiny_sd1, _req(steps=6, hr_denoising_strength=0.5), callback=lambda d: phases.append(d["phase"]))
    assert phases == ["base"] * 6 + ["hires"] * 3  # int(6 * 0.5) of a 6-step schedule
    phases.clear()
    hires(tiny_sd1, _req(steps=6, hr_denoising_strength=0.3, hr_second_pass_steps=4),
          callback=lambda d: phases.append(d["phase"]))
    assert phases == ["base"] * 6 + ["hires"] * 4  # A1111: hires steps are the steps actually run


@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic", "latent-antialiased", "lanczos"])
def test_upscalers_give_the_hires_size(tiny_sd1, upscaler):
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upscale_latents(tiny_sd1, lat, 48, 32, upscaler)
    assert up.shape == (2, 4, 16, 24)
    if upscaler != "lanczos":  # smooth interpolation keeps the mean of a latent close
        assert abs(float(up.mean() - lat.mean())) < 0.1


def test_hires_size():
    assert hires_size(_req(hr_scale=1.5).resolved(32, 1)) == (24, 24)
    assert hires_size(_req(width=32, height=16, hr_resize_x=64).resolved(32, 1)) == (64, 32)
    assert hires_size(_req(width=32, height=16, hr_resize_y=40).resolved(32, 1)) == (80, 40)
    assert hires_size(_req(hr_resize_x=40, hr_resize_y=24).resolved(32, 1)) == (40, 24)


def test_second_pass_options_default_to_the_first_pass():
    same = second_pass_request(_req().resolved(32, 1))
    assert (same.prompt, same.sampler, same.cfg_scale, same.steps, same.width) == ("a red cat", "euler", 7.0, 4, 32)
    other = second_pass_request(_req(hr_prompt="a dog", hr_negative_prompt="blur", hr_sampler="dpmpp_2m",
                                     hr_scheduler="karras", hr_cfg_scale=3.0).resolved(32, 1))
    assert (other.prompt, other.negative_prompt, other.sampler, other.scheduler, other.cfg_scale) == \
        ("a dog", "blur", "dpmpp_2m", "karras", 3.0)


def test_hr_prompt_is_encoded_for_the_second_pass_only(tiny_sd1, monkeypatch):
    from easel.pipelines import conditioning
    seen, build = [], conditioning.build_conditioning

    def spy(loaded, prompt, negative, steps, *args, hires_steps=None, **kw):
        seen.append((prompt, negative, steps, hires_steps))
        return build(loaded, prompt, negative, steps, *args, hires_steps=hires_steps, **kw)
    monkeypatch.setattr(conditioning, "build_conditioning", spy)
    a = np.asarray(hires(tiny_sd1, _req(hr_prompt="a blue dog", hr_negative_prompt="green"))[0].image, float)
    # A1111: the second pass's [a:b:when] counts the first pass's steps, then the hires steps (same as steps here)
    assert seen == [("a red cat", "", 4, None), ("a blue dog", "green", 4, 4)]
    b = np.asarray(hires(tiny_sd1, _req(hr_second_pass_steps=3))[0].image, float)
    assert seen[2:] == [("a red cat", "", 4, None), ("a red cat", "", 4, 3)] and not np.array_equal(a, b)


def test_hires_prompt_editing_reaches_into_the_second_pass(tiny_sd1):
    """[a:b:5] with 4 first-pass steps is step 5 - 4 = 1 of the hires pass: b from the step after it (A1111)."""
    from easel.pipelines import conditioning
    cond, _ = conditioning.build_conditioning(tiny_sd1, "[a red cat:a blue dog:5]", "", 4, 1, 16, 16, hires_steps=4)
    assert [t for s in range(4) for t, _ in cond.texts_at(s)] == ["a red cat"] * 2 + ["a blue dog"] * 2
    runs = {}
    for prompt in ("a red cat", "[a red cat:a blue dog:4]"):  # 4 = the last first-pass step: b in the hires pass
        seen = runs[prompt] = []
        hires(tiny_sd1, _req(prompt=prompt), lambda d, seen=seen: seen.append((d["phase"], d["denoised"].clone())))
    same = [torch.equal(a[1], b[1]) for a, b in zip(*runs.values())]
    assert [p for p, _ in runs["a red cat"]] == ["base"] * 4 + ["hires"] * 2  # int(4 * 0.5) hires steps
    assert same == [True] * 4 + [False] * 2


def test_dispatch_seeds_and_params(tiny_sd1):
    res = Pipeline(tiny_sd1).generate(_req(batch_size=2, hr_upscaler="lanczos", hr_second_pass_steps=2,
                                           sampler="DPM++ 2M Karras", hr_sampler="Euler a"))
    assert [r.params["seed"] for r in res] == [11, 12] and res[0].image.size == (32, 32)
    p = res[0].params
    assert (p["width"], p["hr_width"], p["hr_upscaler"], p["hr_second_pass_steps"]) == (16, 32, "lanczos", 2)
    assert (p["hr_sampler"], p["denoising_strength"], p["enable_hr"]) == ("euler_a", 0.5, True)


def test_builtin_model_hires():
    import easel
    out = easel.load().txt2img("a red star", steps=3, seed=4, batch_size=1, enable_hr=True, hr_scale=1.5,
                               hr_denoising_strength=0.4)[0]
    assert out.size == (96, 96) and np.asarray(out).std() > 5


def test_bad_upscaler_names_the_choices(tiny_sd1):
    with pytest.raises(ValueError, match="hr_upscaler.*latent-nearest"):
        hires(tiny_sd1, _req(hr_upscaler="esrgan"))
