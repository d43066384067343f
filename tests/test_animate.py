"""Animation: schedules (A1111 / Deforum syntax), prompt travel through the sampling plan (keyframes equal plain
generations, frames in between change a little), 2D motion, colour coherence, files and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from easel import animate as anim
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# --- schedules ---------------------------------------------------------------------------------------------------
def test_schedule_interpolates_and_holds():
    s = anim.parse_schedule("0:(1.0), 10:(1.5), 20:(0.5)")
    assert [s.at(f) for f in (0, 5, 10, 15, 20, 30)] == [1.0, 1.25, 1.5, 1.0, 0.5, 0.5]
    assert anim.parse_schedule("5:(2)").at(0) == 2.0  # held before the first keyframe
    assert anim.parse_schedule("0.65").at(7) == 0.65 and anim.parse_schedule("0: (0.65)").constant == 0.65
    assert anim.parse_schedule("10:(1), 0:(3)").at(5) == 2.0  # keyframes in any order


def test_schedule_expressions_of_t():
    s = anim.parse_schedule("0:(1 + 0.5*sin(t*pi/2)), 4:(max(t, 2))")
    assert math.isclose(s.at(1), 1.5 + (2 - 1.5) * 0.25) and s.constant is None  # both ends evaluated at t
    assert s.at(6) == 6.0


@pytest.mark.parametrize("text,match", [
    ("", "keyframes like"), ("0:(1), x:(2)", "frame number"), ("0:(1), 0:(2)", "frame appears twice"),
    ("0:(__import__('os'))", "unknown function"), ("0:(open(1))", "unknown function"), ("0:(q)", "unknown name 'q'"),
    ("0:(1/(t-3))", "fails at frame 3"), ("0:('a')", "only numbers"), ("0:(1", "keyframes like"),
])
def test_schedule_errors_are_clear(text, match):
    with pytest.raises(ValueError, match=match):
        s = anim.parse_schedule(text, "zoom")
        [s.at(f) for f in range(6)]


# --- pieces --------------------------------------------------------------------------------------------------------
def test_keyframes_and_travel_position():
    assert anim.even_keyframes(3, 25) == [0, 12, 24] and anim.even_keyframes(1, 9) == [0]
    assert anim.travel_position([0, 12, 24], 6) == (0, 0.5)
    assert anim.travel_position([0, 12, 24], 12) == (0, 1.0)
    assert anim.travel_position([0, 12, 24], 24) == (1, 1.0)


def test_slerp_ends_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    assert torch.allclose(anim.slerp(a, b, 0), a, atol=1e-6) and torch.allclose(anim.slerp(a, b, 1), b, atol=1e-6)
    mid = anim.slerp(a, b, 0.5)
    norm = (float(a.norm()) + float(b.norm())) / 2
    assert abs(float(mid.norm()) - norm) < 0.05 * norm
    assert float((a + b).div(2).norm()) < 0.8 * norm  # lerp would shrink it by ~30 %


def centre_of(image: Image.Image) -> tuple[float, float]:
    x = np.asarray(image)[..., 0].astype(float)
    ys, xs = np.nonzero(x > 60)
    return xs.mean(), ys.mean()


def test_warp_moves_as_documented():
    a = np.zeros((64, 96, 3), np.uint8)
    a[26:29, 36:39] = 255
    im = Image.fromarray(a)  # a dot at (37, 27); the centre is (47.5, 31.5)
    assert centre_of(anim.warp(im, 2.0)) == (26.5, 22.5)  # zoom in: twice as far from the centre
    assert centre_of(anim.warp(im, 1, 0, 5, -3)) == (42.0, 24.0)  # right 5, up 3
    assert centre_of(anim.warp(im, 1, 90)) == (43.0, 42.0)  # counter-clockwise: upper left -> lower left
    assert anim.warp(im) is im
    with pytest.raises(ValueError, match="zoom must be positive"):
        anim.warp(im, 0)


def test_match_colors_moves_lab_statistics():
    g = np.random.default_rng(0)
    ref = Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    dark = Image.fromarray((np.asarray(ref) * 0.4 + np.array([0, 0, 60])).astype(np.uint8))
    lab = lambda im: anim.rgb_to_lab(np.asarray(im, np.float64) / 255).reshape(-1, 3)  # noqa: E731
    fixed = anim.match_colors(dark, ref)
    assert np.abs(lab(fixed).mean(0) - lab(ref).mean(0)).max() < 2.5
    assert np.abs(lab(dark).mean(0) - lab(ref).mean(0)).max() > 10
    rgb = g.random((50, 3))
    assert np.allclose(anim.lab_to_rgb(anim.rgb_to_lab(rgb)), rgb, atol=1e-6)


def test_smoothness():
    frames = [Image.new("RGB", (4, 4), (v, v, v)) for v in (0, 10, 20, 60)]
    s = anim.smoothness(frames)
    assert (s["largest_step"], s["first_to_last"]) == (40.0, 60.0) and math.isclose(s["ratio"], 40 / 60)


# --- whole animations on a tiny model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from easel.pipelines.pipeline import Pipeline
    return Pipeline(make_tiny(tmp_path_factory.mktemp("m")))


def request(**kw):
    from easel.pipelines.request import GenerationRequest
    return GenerationRequest(steps=3, cfg_scale=5.0, sampler="euler", scheduler="karras", **kw)


def test_travel_keyframes_equal_plain_generations(pipe):
    """At a keyframe a frame is exactly `generate(prompt, seed)`; between them, conditioning and noise move."""
    out = anim.animate(pipe, ["a red cat", "a blue dog"], request=request(), frames=5, seeds=[11, 22])
    first = pipe.generate(request(prompt="a red cat", seed=11, batch_size=1))[0].image
    last = pipe.generate(request(prompt="a blue dog", seed=22, batch_size=1))[0].image
    assert out.frames[0].tobytes() == first.tobytes() and out.frames[-1].tobytes() == last.tobytes()
    mids = {f.tobytes() for f in out.frames[1:-1]}
    assert len(mids) == 3 and not mids & {first.tobytes(), last.tobytes()}
    assert out.params[2]["animation"]["travel"] == 0.5 and out.params[2]["animation"]["prompt_to"] == "a blue dog"


def test_travel_mixes_conditioning_not_only_noise(pipe):
    """Same seed at both keyframes: frames differ only because the text conditioning travels."""
    out = anim.animate(pipe, ["a red cat", "a blue dog"], request=request(), frames=3, seeds=[5, 5])
    one = anim.animate(pipe, ["a red cat", "a red cat"], request=request(), frames=3, seeds=[5, 5])
    assert out.frames[1].tobytes() != one.frames[1].tobytes()
    assert len({f.tobytes() for f in one.frames}) == 1


def test_travel_conditioning_is_the_linear_mix(pipe):
    from easel.pipelines.conditioning import build_conditioning
    a, _ = build_conditioning(pipe.loaded, "a red cat", "", 3, 1, 32, 32)
    b, _ = build_conditioning(pipe.loaded, "a blue dog and a red cat and a very long prompt", "", 3, 1, 32, 32)
    mixed = anim.TravelConditioning(a, b, 0.25).at_step(0)
    assert len(mixed) == 1 and mixed[0][1] == 1.0
    expect = 0.75 * a.at_step(0)[0][0]["context"] + 0.25 * b.at_step(0)[0][0]["context"]
    assert torch.allclose(mixed[0][0]["context"], expect, atol=1e-6)
    anded, _ = build_conditioning(pipe.loaded, "a cat AND a dog :0.5", "", 3, 1, 32, 32)
    parts = anim.TravelConditioning(anded, b, 0.25).at_step(0)
    assert [w for _, w in parts] == [0.75, 0.375, 0.25]  # AND prompts mix as composable guidance


def test_retarget_leaves_the_original_stack_alone(pipe):
    from easel.pipelines import plan as plans
    from easel.pipelines.conditioning import GuidedDenoiser, build_conditioning
    req = request(prompt="a cat", seed=1).resolved(32, 1)
    p = plans.build_plan(pipe.loaded, req, [1], plans.request_sigmas(pipe.loaded.model, req))
    target, _ = build_conditioning(pipe.loaded, "a dog", "", 3, 1, 32, 32)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
    wrapped = Wrapper(p.denoiser)
    moved = anim.retarget(wrapped, target, 0.5)
    assert isinstance(moved.inner.cond, anim.TravelConditioning) and wrapped.inner is p.denoiser
    assert isinstance(p.denoiser, GuidedDenoiser) and not isinstance(p.denoiser.cond, anim.TravelConditioning)
    with pytest.raises(ValueError, match="no guided denoiser"):
        anim.retarget(lambda x, s: x, target, 0.5)


def test_motion_files_infotext_and_determinism(pipe, tmp_path):
    settings = anim.AnimationSettings(["a red cat"], frames=4, seed=3, zoom="0:(1.0), 3:(1.2)", angle="0:(2)",
                                      strength="0:(0.5)")
    out = anim.animate(pipe, settings, tmp_path / "z.gif", request(), on_frame=lambda d, t: None)
    again = anim.animate(pipe, settings, None, request())
    assert [f.tobytes() for f in out.frames] == [f.tobytes() for f in again.frames]
    with Image.open(out.path) as im:
        assert im.n_frames == 4 and im.size == (32, 32)
    pngs = sorted(out.frames_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    with Image.open(pngs[2]) as im:
        assert "Denoising strength: 0.5" in im.text["parameters"] and "Seed: 3" in im.text["parameters"]
        info = json.loads(im.text["easel"])["animation"]
    assert info["frame"] == 2 and math.isclose(info["zoom"], 1 + 0.2 * 2 / 3, rel_tol=1e-5) and info["angle"] == 2
    assert out.params[0]["mode"] == "txt2img" and out.params[1]["mode"] == "img2img"
    assert 0 < out.smoothness["largest_step"] and out.smoothness["first_to_last"] > 0


@pytest.mark.parametrize("options,match", [
    (dict(frames=0), "frames must be between"), (dict(keyframes=[0, 5]), "keyframes must start at 0"),
    (dict(keyframes=[0]), "1 keyframes for 2 prompts"), (dict(seeds=[1]), "1 seeds for 2 prompts"),
    (dict(strength="0:(1.5)"), "strength must stay within"), (dict(zoom="0:(1), 3:(-1)"), "zoom must stay positive"),
    (dict(angle="0:(sin)"), "angle"), (dict(angle="0:(1/(t-3))"), "angle '0:.1/.t-3..' fails at frame 3"),
])
def test_settings_errors(options, match):
    with pytest.raises(ValueError, match=match):
        anim.AnimationSettings(["a", "b"], **{"frames": 4, **options}).check()


def test_cli_animate(tmp_path, tiny_sd1_file, capsys):
    from easel.cli import main
    out = tmp_path / "t.webp"
    assert main(["animate", "a cat", "a dog", "--frames", "3", "--steps", "2", "--seed", "4", "--model",
                 str(tiny_sd1_file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "smoothness: largest frame-to-frame change" in captured.err and str(out) in captured.out
    with Image.open(out) as im:
        assert im.n_frames == 3
    assert len(list((tmp_path / "t-frames").glob("*.png"))) == 3
    assert main(["animate", "a cat", "--zoom", "0:(1.0), x:(2)", "--model", str(tiny_sd1_file),
                 "--out", str(out)]) == 2
    assert "zoom takes keyframes like" in capsys.readouterr().err
    assert main(["animate", "a cat", "--out", str(tmp_path / "t.avi"), "--model", str(tiny_sd1_file)]) == 2
    assert "unknown animation format" in capsys.readouterr().err
    assert main(["animate", "a", "b", "--keyframes", "0,x", "--out", str(out)]) == 2
    assert "--keyframes takes whole numbers" in capsys.readouterr().err


def test_should_stop_ends_after_the_frames_done(pipe, tmp_path):
    """A cancelled job: no frame starts once should_stop() is true; what was drawn is still written."""
    done = []
    out = anim.animate(pipe, ["a cat", "a dog"], tmp_path / "c.gif", request(), frames=6,
                       on_frame=lambda d, t: done.append(d), should_stop=lambda: len(done) >= 2)
    assert len(out.frames) == 2 and done == [1, 2]
    with Image.open(out.path) as im:
        assert im.n_frames == 2
    none = anim.animate(pipe, ["a cat"], tmp_path / "n.gif", request(), frames=3, should_stop=lambda: True)
    assert none.frames == [] and none.path is None and not (tmp_path / "n.gif").exists()
