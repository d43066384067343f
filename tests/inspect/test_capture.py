"""Capture records without changing a number; the attention it keeps is the layers' own softmax(QK^T/sqrt(d))."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from easel.inspect.attention import layer_average
from easel.inspect.capture import Capture, _query_size, step_grid
from easel.models.layers import BasicTransformerBlock
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(results) -> list[np.ndarray]:
    return [np.asarray(r.image) for r in results]


def _same_with_and_without(pipe: Pipeline, make_request) -> Capture:
    """Generate twice, capture off then on; assert identical pixels; return the capture."""
    plain = _pixels(pipe.generate(make_request()))
    with Capture() as cap:
        captured = _pixels(pipe.generate(make_request(), extend_plan=cap))
    assert len(plain) == len(captured)
    for a, b in zip(plain, captured):
        assert np.array_equal(a, b)
    return cap


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_sde", "uni_pc"])
def test_txt2img_identical_with_capture_for_samplers(tmp_path, sampler):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    cap = _same_with_and_without(pipe, lambda: GenerationRequest("a red cat", steps=3, seed=5, batch_size=2,
                                                                   sampler=sampler, scheduler="karras"))
    (run,) = cap.runs
    assert [s.i for s in run.steps] == [0, 1, 2]
    assert run.attention["a red cat"].count  # attention was recorded too


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_layouts_identical_and_captured(tmp_path, family):
    pipe = Pipeline(make_tiny(tmp_path, family))
    cap = _same_with_and_without(pipe, lambda: GenerationRequest("a blue dog", steps=2, seed=1, batch_size=1,
                                                                   sampler="euler"))
    maps = layer_average(cap.runs[0].attention["a blue dog"], cap.runs[0].latent_size)
    # each latent position's attention over the context sums to 1
    assert torch.allclose(maps.sum(dim=1), torch.ones(1, *cap.runs[0].latent_size), atol=1e-5)


def _picture_and_mask(size: int = 32):
    g = np.random.default_rng(0)
    img = Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    return img, mask


def test_img2img_and_inpaint_identical_with_capture(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    img, mask = _picture_and_mask()
    cap = _same_with_and_without(pipe, lambda: GenerationRequest(
        "a cat", init_images=[img], denoising_strength=0.6, steps=5, seed=2, batch_size=1, sampler="dpmpp_2m"))
    assert len(cap.runs[0].steps) == 3  # int(5 * 0.6): the tail of the schedule
    cap = _same_with_and_without(pipe, lambda: GenerationRequest(
        "a dog", init_images=[img], mask=mask, denoising_strength=0.8, steps=3, seed=2, batch_size=1,
        sampler="euler_a"))
    rec = cap.runs[0].steps[0]
    # the sampler's x0 is the inpaint blend; the guided x0 before it differs outside the mask
    assert rec.guided is not None and not torch.equal(rec.guided, rec.x0)


def test_nine_channel_inpainting_model_identical_with_capture(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1-inpaint"))
    img, mask = _picture_and_mask()
    cap = _same_with_and_without(pipe, lambda: GenerationRequest(
        "a cat", init_images=[img], mask=mask, denoising_strength=1.0, steps=2, seed=2, batch_size=1,
        sampler="euler"))
    assert cap.runs[0].attention["a cat"].count and cap.runs[0].steps[0].cond.shape[1] == 4  # the latent's channels


def test_hires_and_batches_give_one_run_per_plan(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    cap = _same_with_and_without(pipe, lambda: GenerationRequest(
        "a cat", steps=2, seed=1, batch_size=1, n_iter=2, enable_hr=True, hr_scale=1.5, hr_denoising_strength=0.5,
        sampler="euler"))
    assert len(cap.runs) == 4
    assert [r.tags.get("phase") for r in cap.runs] == ["base", "hires", "base", "hires"]
    assert cap.runs[1].latent_size[0] > cap.runs[0].latent_size[0]


def test_cfg_parts_recompose_the_guided_prediction(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    with Capture() as cap:
        pipe.generate(GenerationRequest("a red cat", "a dog", steps=3, seed=4, batch_size=2, cfg_scale=6.0,
                                        sampler="heun"), extend_plan=cap)
    for rec in cap.runs[0].steps:
        assert torch.allclose(rec.guided, rec.uncond + 6.0 * (rec.cond - rec.uncond), atol=1e-4)
        assert torch.equal(rec.guided, rec.x0)  # what the sampler used at that step (heun's 2nd call not mixed in)
        assert torch.allclose(rec.noise * rec.sigma, rec.x - rec.x0, atol=1e-4)
        assert not torch.equal(rec.uncond, rec.cond)


def test_guidance_scale_one_has_no_uncond(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    with Capture() as cap:
        pipe.generate(GenerationRequest("a red cat", steps=2, seed=4, batch_size=1, cfg_scale=1.0, sampler="euler"),
                      extend_plan=cap)
    rec = cap.runs[0].steps[0]
    assert rec.uncond is None and torch.equal(rec.cond, rec.x0)
    assert cap.runs[0].attention["a red cat"].count  # the cond rows are the whole batch


def _direct_attention(tmp_path, prompt: str, negative: str, cfg: float, batch: int):
    """(capture, {(h, w): summed head-mean probabilities of the cond rows}) computed independently: the raw
    attn2 inputs recorded by a plain hook, then the textbook formula with the layer's weights."""
    loaded = make_tiny(tmp_path, "sd1", seed=3)
    pipe = Pipeline(loaded)
    inputs = []
    blocks = [m for m in loaded.model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    hooks = [b.attn2.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0], args[1])))
             for b in blocks]
    req = GenerationRequest(prompt, negative, steps=2, seed=9, batch_size=batch, cfg_scale=cfg, sampler="euler")
    try:
        with Capture() as cap:
            pipe.generate(req, extend_plan=cap)
    finally:
        for h in hooks:
            h.remove()
    expected: dict[tuple[int, int], torch.Tensor] = {}
    latent = cap.runs[0].latent_size
    for mod, x, ctx in inputs:
        rows = slice(batch, 2 * batch) if cfg != 1 else slice(0, batch)
        q = mod.to_q(x[rows]).double()
        k = mod.to_k(ctx[rows]).double()
        B, T, _ = q.shape
        q = q.reshape(B, T, mod.heads, -1).permute(0, 2, 1, 3)  # (B, h, T, d)
        k = k.reshape(B, k.shape[1], mod.heads, -1).permute(0, 2, 1, 3)  # (B, h, S, d)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(dim=1)  # (B, T, S)
        size = _query_size(T, latent)
        expected[size] = expected.get(size, 0) + p
    return cap, expected, len(inputs)


def test_attention_equals_direct_computation_from_the_layer_weights(tmp_path):
    cap, expected, calls = _direct_attention(tmp_path, "a red cat", "a dog", cfg=5.0, batch=2)
    attn = cap.runs[0].attention["a red cat"]
    assert sum(attn.count.values()) == calls == 2 * 7  # 2 steps x 7 cross-attention layers in the tiny SD1
    assert set(attn.sums) == set(expected) == {(16, 16), (8, 8)}
    for size, want in expected.items():
        assert torch.allclose(attn.sums[size].double(), want, atol=1e-5)
    assert attn.steps == {0, 1}


def test_attention_is_of_the_cond_rows_not_the_uncond(tmp_path):
    cap, expected, _ = _direct_attention(tmp_path, "a red cat", "blue dog star", cfg=5.0, batch=1)
    attn = cap.runs[0].attention["a red cat"]
    uncond_like = _direct_attention(tmp_path / "u", "blue dog star", "", cfg=1.0, batch=1)[1]
    size = (16, 16)
    assert torch.allclose(attn.sums[size].double(), expected[size], atol=1e-5)
    assert not torch.allclose(attn.sums[size].double(), uncond_like[size], atol=1e-3)


def test_capture_close_removes_every_hook(tmp_path):
    loaded = make_tiny(tmp_path, "sd1")
    attn = [b.attn2 for b in loaded.model.unet.modules() if isinstance(b, BasicTransformerBlock)]
    with Capture() as cap:
        Pipeline(loaded).generate(GenerationRequest("a cat", steps=1, seed=1, batch_size=1), extend_plan=cap)
        assert all(a._forward_hooks for a in attn)
    assert not any(a._forward_hooks for a in attn)


def test_query_size_rounds_odd_sides_up():
    assert _query_size(13 * 9, (13, 9)) == (13, 9)
    assert _query_size(7 * 5, (13, 9)) == (7, 5)
    assert _query_size(4 * 3, (13, 9)) == (4, 3)
    with pytest.raises(ValueError, match="cannot place 50"):
        _query_size(50, (13, 9))


def test_per_step_maps_are_small_and_average_to_one(tmp_path):
    pipe = Pipeline(make_tiny(tmp_path, "sd1"))
    with Capture() as cap:
        pipe.generate(GenerationRequest("a cat", steps=3, seed=1, batch_size=1, sampler="heun"), extend_plan=cap)
    attn = cap.runs[0].attention["a cat"]
    steps = attn.step_maps()
    assert [i for i, _ in steps] == [0, 1, 2]
    assert sum(attn.step_count.values()) == sum(attn.count.values())  # every layer call lands in one step
    for _, m in steps:
        assert m.shape == (1, 77, 16, 16) and torch.allclose(m.sum(dim=1), torch.ones(1, 16, 16), atol=1e-5)
    assert step_grid((128, 128)) == (32, 32) and step_grid((100, 60)) == (25, 15) and step_grid((13, 9)) == (13, 9)


def test_film_strip_steps_spread_evenly_with_first_and_last():
    from easel.inspect.steps import pick_steps
    assert pick_steps(3, 8) == [0, 1, 2]
    assert pick_steps(20, 5) == [0, 5, 10, 14, 19]


def test_steps_carry_the_schedule_sigmas(tmp_path):
    """The film strip's and the schedule plot's sigmas are the sampler's: sigmas[i] and sigmas[i + 1]."""
    from easel.pipelines import common
    loaded = make_tiny(tmp_path, "sd1")
    with Capture(attention=False) as cap:
        Pipeline(loaded).generate(GenerationRequest("a cat", steps=4, seed=1, batch_size=1, sampler="euler",
                                                    scheduler="exponential"), extend_plan=cap)
    sigmas = common.sigmas_for(common.make_schedule(loaded.model), "exponential", 4).tolist()
    assert [s.sigma for s in cap.runs[0].steps] == pytest.approx(sigmas[:-1])
    assert [s.sigma_next for s in cap.runs[0].steps] == pytest.approx(sigmas[1:])
    assert cap.runs[0].attention == {}


def test_overhead_measure_reports_times_and_bytes(tmp_path):
    from easel.inspect.overhead import measure
    r = measure(Pipeline(make_tiny(tmp_path, "sd1")), 32, 2, repeats=1)
    assert r["off"] > 0 and r["on"] > 0 and r["attention_bytes"] > 0 and r["step_bytes"] > 0
    with pytest.raises(ValueError, match="unknown preset 'SD9'"):
        from easel.inspect.overhead import random_pipeline
        random_pipeline("SD9")


def test_a_failing_model_call_leaves_no_call_in_flight(tmp_path):
    """An error inside the UNet propagates as it is, and the capture is ready for the next generation."""
    loaded = make_tiny(tmp_path, "sd1")
    pipe = Pipeline(loaded)

    def boom(module, args):
        raise RuntimeError("boom")
    handle = loaded.model.unet.out.register_forward_pre_hook(boom)
    with Capture() as cap:
        with pytest.raises(RuntimeError, match="boom"):
            pipe.generate(GenerationRequest("a cat", steps=1, seed=1, batch_size=1), extend_plan=cap)
        assert cap._call is None
        handle.remove()
        pipe.generate(GenerationRequest("a cat", steps=1, seed=1, batch_size=1), extend_plan=cap)
    assert cap.runs[-1].steps[0].guided is not None


def test_self_attention_of_a_queried_position_equals_direct_computation(tmp_path):
    loaded = make_tiny(tmp_path, "sd1", seed=2)
    inputs = []
    hooks = [b.attn1.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0])))
             for b in loaded.model.unet.modules() if isinstance(b, BasicTransformerBlock)]
    try:
        with Capture(attention=False, self_query=(0.25, 0.75)) as cap:
            Pipeline(loaded).generate(GenerationRequest("a cat", "a dog", steps=1, seed=3, batch_size=1,
                                                        sampler="euler"), extend_plan=cap)
    finally:
        for h in hooks:
            h.remove()
    got = cap.runs[0].self_attention
    assert cap.runs[0].attention == {}  # cross-attention not asked for
    want: dict = {}
    for mod, x in inputs:
        size = _query_size(x.shape[1], cap.runs[0].latent_size)
        index = int(0.25 * size[0]) * size[1] + int(0.75 * size[1])
        q = mod.to_q(x[1:2, index:index + 1]).double().reshape(1, 1, mod.heads, -1).permute(0, 2, 1, 3)
        k = mod.to_k(x[1:2]).double().reshape(1, x.shape[1], mod.heads, -1).permute(0, 2, 1, 3)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(dim=1)[:, 0]  # (1, T)
        want[size] = want.get(size, 0) + p
    assert set(got.sums) == set(want) == {(16, 16), (8, 8)}
    for size, p in want.items():
        assert torch.allclose(got.sums[size].double(), p, atol=1e-5)
        assert torch.allclose(got.mean(size).sum(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError, match="fractions of the image"):
        Capture(self_query=(0.5, 2.0))
