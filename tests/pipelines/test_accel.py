"""Opt-in lossy accelerations (easel.pipelines.accel) on tiny random-weight models: off is the exact path bit for
bit, on changes the image a little and runs less of the UNet, the same seed gives the same image, bad values fail
clearly. No timing: speed is measured by bench/accel.py."""
import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from easel.pipelines import accel, plan
from easel.pipelines.accel import tome as tome_lib
from easel.pipelines.accel.cfg_cutoff import CutoffGuidedDenoiser, guided_steps
from easel.pipelines.accel.deepcache import FeatureCache
from easel.pipelines.accel.wrapper import AccelUNet
from easel.pipelines.metadata import infotext, infotext_fields
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import image_params, sample_latents
from easel.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [11, 12]
ON = {"deepcache": {"deepcache": 3}, "cfg_cutoff": {"cfg_cutoff": 0.5}, "tome": {"tome": 0.5}}
# How far "on" may move the latents on these random-weight models: mean |on - exact| / mean |exact| (the bench
# measures the real cost on SD1.5-sized weights and on the built-in model).
TOLERANCE = {"deepcache": 0.25, "cfg_cutoff": 0.01, "tome": 0.03}  # measured here: 0.11, 1e-4, 0.005


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {fam: make_tiny(tmp_path_factory.mktemp(fam), fam) for fam in ("sd1", "sdxl")}


def request(**kw) -> GenerationRequest:
    opts = dict(width=32, height=32, steps=8, cfg_scale=6.0, sampler="dpmpp_2m", seed=SEEDS[0], batch_size=2)
    return GenerationRequest("a red cat", "blue dog", **{**opts, **kw}).resolved(32, 2)


def latents(loaded, **kw) -> torch.Tensor:
    with torch.no_grad():
        return sample_latents(loaded, request(**kw), SEEDS)


class Counter:
    """Forward hooks that count what the UNet runs: blocks, UNet batch rows, tokens into the first level's attn1."""

    def __init__(self, unet):
        self.blocks = self.rows = self.tokens = 0
        first = [m.attn1.to_q for m in unet.modules() if hasattr(m, "attn1")]
        self.handles = [b.register_forward_hook(self._block) for b in (*unet.input_blocks, unet.middle_block,
                                                                       *unet.output_blocks)]
        self.handles.append(unet.register_forward_pre_hook(self._rows))
        self.handles += [q.register_forward_hook(self._tokens) for q in first]

    def _block(self, *_):
        self.blocks += 1

    def _rows(self, _, args):
        self.rows += args[0].shape[0]

    def _tokens(self, _, args, __):
        self.tokens += args[0].shape[0] * args[0].shape[1]

    def close(self):
        for h in self.handles:
            h.remove()


def counted(loaded, **kw) -> Counter:
    c = Counter(loaded.model.unet)
    try:
        latents(loaded, **kw)
    finally:
        c.close()
    return c


# --- off is the exact path --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_forward_split_in_full_is_forward(models, family):
    unet = models[family].model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    y = torch.randn(2, unet.cfg.adm_in_channels, generator=g) if unet.cfg.adm_in_channels else None
    with torch.no_grad():
        exact = unet(x, torch.tensor([500, 500]), ctx, y)
        for branch in range(len(unet.input_blocks)):
            out, deep = unet.forward_split(x, torch.tensor([500, 500]), ctx, y, branch=branch)
            assert torch.equal(out, exact) and deep is not None
            again, _ = unet.forward_split(x, torch.tensor([500, 500]), ctx, y, branch=branch, deep=deep)
            assert torch.equal(again, exact)  # same step, same features: the shallow path rebuilds the output


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_off_values_through_the_wrappers_are_bit_identical(models, family, monkeypatch):
    """deepcache=1, tome=0 and cfg_cutoff=1 forced through AccelUNet / CutoffGuidedDenoiser give the exact bits."""
    loaded = models[family]
    exact = latents(loaded)
    def off(fn):
        wrapped = AccelUNet(fn, deepcache=1, tome=0.0)
        wrapped.cache = FeatureCache(1)  # the cache's route at interval 1: every call in full, through forward_split
        return wrapped
    monkeypatch.setattr(accel, "unet_wrapper", lambda req: off)
    monkeypatch.setattr(plan.conditioning, "GuidedDenoiser", lambda *a: CutoffGuidedDenoiser(*a, cutoff=1.0))
    assert torch.equal(latents(loaded), exact)


def test_off_is_the_default_and_adds_nothing(models):
    req = request()
    assert (req.deepcache, req.cfg_cutoff, req.tome) == (1, 1.0, 0.0) and not accel.is_on(req)
    assert accel.unet_wrapper(req) is None and accel.params(req) == {}
    assert "DeepCache" not in infotext(image_params(models["sd1"], req, SEEDS[0]))


# --- on: close, cheaper, deterministic ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("name", list(ON))
def test_on_changes_a_little_and_runs_less(models, family, name):
    loaded = models[family]
    exact_count = counted(loaded)
    exact = latents(loaded)
    on_count = counted(loaded, **ON[name])
    on = latents(loaded, **ON[name])
    assert not torch.equal(on, exact)
    rel = float((on - exact).abs().mean() / exact.abs().mean())
    assert rel < TOLERANCE[name], rel
    assert torch.equal(latents(loaded, **ON[name]), on)  # same seed, same latents
    if name == "deepcache":  # 8 calls, the full UNet at calls 0, 3, 6: 3 of 8 run every block
        assert on_count.blocks < exact_count.blocks * 0.75
        assert on_count.rows == exact_count.rows
    elif name == "cfg_cutoff":  # 4 of 8 steps without the negative half
        assert on_count.rows == exact_count.rows * 3 // 4
    else:  # half the first level's self-attention tokens merged away
        assert on_count.tokens < exact_count.tokens and on_count.blocks == exact_count.blocks


def test_deepcache_runs_every_nth_call_in_full(models):
    unet = models["sd1"].model.unet
    cache = FeatureCache(3)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, unet.cfg.context_dim)
    with torch.no_grad():
        for _ in range(7):
            cache(unet, x, torch.tensor([10, 10]), ctx, None, None)
        assert (cache.full_calls, cache.cached_calls) == (3, 4)  # calls 0, 3, 6 in full
        cache(unet, x[:1], torch.tensor([10]), ctx[:1], None, None)  # a different batch cannot reuse the features
        assert cache.full_calls == 4


def test_cfg_cutoff_step_count():
    assert [guided_steps(10, f) for f in (0.0, 0.05, 0.6, 0.61, 1.0)] == [0, 1, 6, 7, 10]
    assert guided_steps(20, 0.55) == 11


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_with_all_three(models, family, sampler):
    kw = dict(sampler=sampler, steps=4, deepcache=2, cfg_cutoff=0.5, tome=0.3)
    a = latents(models[family], **kw)
    assert torch.isfinite(a).all() and torch.equal(latents(models[family], **kw), a)


def test_tome_merge_and_unmerge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5 * 7, 8, generator=g)  # an odd map: the last row and column are sources only
    merge, unmerge = tome_lib.bipartite_soft_matching(x, 5, 7, 10, g)
    m = merge(x)
    assert m.shape == (2, 35 - 10, 8) and unmerge(m).shape == x.shape
    same = torch.ones(1, 16, 4)  # identical tokens: merging and unmerging gives them back
    merge, unmerge = tome_lib.bipartite_soft_matching(same, 4, 4, 6, g)
    assert torch.equal(unmerge(merge(same)), same)
    merge, unmerge = tome_lib.bipartite_soft_matching(x, 5, 7, 0, g)  # r = 0: nothing moves
    assert torch.equal(unmerge(merge(x)), x)


def test_tome_patch_is_undone(models):
    unet = models["sd1"].model.unet
    attns = tome_lib.self_attentions(unet)
    with tome_lib.merging(unet, 0.5, (16, 16), torch.Generator()):
        assert all("forward" in a.__dict__ for a in attns)
    assert not any("forward" in a.__dict__ for a in attns)
    assert set(unet.state_dict()) == set(models["sd1"].model.unet.state_dict())


# --- parameters, errors -----------------------------------------------------------------------------------------
def test_infotext_records_and_reads_back(models):
    req = request(deepcache=3, cfg_cutoff=0.6, tome=0.5)
    text = infotext(image_params(models["sd1"], req, SEEDS[0]))
    assert "DeepCache: 3" in text and "CFG cutoff: 0.6" in text and "ToMe: 0.5" in text
    back = infotext_fields(text)
    assert (back["deepcache"], back["cfg_cutoff"], back["tome"]) == (3, 0.6, 0.5)


@pytest.mark.parametrize("field,value", [("deepcache", 0), ("deepcache", 2.5), ("deepcache", True),
                                         ("cfg_cutoff", -0.1), ("cfg_cutoff", 1.5), ("tome", 1.0), ("tome", -0.2)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        request(**{field: value})


@pytest.mark.parametrize("flag,value", [("--deepcache", "0"), ("--cfg-cutoff", "2"), ("--tome", "1")])
def test_cli_bad_values_exit_2(tmp_path, tiny_sd1_file, capsys, flag, value):
    from easel.cli import main
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--out", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and flag.strip("-").replace("-", "_") in err and "Traceback" not in err


def test_native_api_rejects_bad_values():
    from fastapi.testclient import TestClient
    from easel.serve.app import Settings, create_app
    from easel.serve.jobs import JobQueue

    def no_model(name, device):
        raise AssertionError("a rejected request must not load a model")
    with TestClient(create_app(Settings(), JobQueue(loader=no_model))) as c:
        for body in ({"deepcache": 0}, {"cfg_cutoff": 1.5}, {"tome": 1.0}):
            r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, **body})
            assert 400 <= r.status_code < 500 and next(iter(body)) in r.text, r.text


def test_a1111_override_settings_carry_the_accelerations():
    from easel.serve.a1111_schema import to_request
    body = {"prompt": "x", "override_settings": {"deepcache": 3, "cfg_cutoff": 0.6, "tome": 0.5}}
    mapped = to_request(body, set(body), False, {}, lambda title: title)
    req = mapped.request
    assert (req.deepcache, req.cfg_cutoff, req.tome) == (3, 0.6, 0.5) and not mapped.unsupported
    with pytest.raises(ValueError, match="tome"):
        to_request({"prompt": "x", "override_settings": {"tome": 1.0}}, {"prompt"}, False, {}, lambda t: t)


def test_a1111_api_rejects_bad_values():
    from fastapi.testclient import TestClient
    from easel.serve.app import Settings, create_app
    from easel.serve.jobs import JobQueue

    def no_model(name, device):
        raise AssertionError("a rejected request must not load a model")
    with TestClient(create_app(Settings(), JobQueue(loader=no_model))) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "override_settings": {"deepcache": 0}})
        assert 400 <= r.status_code < 500 and "deepcache" in r.text, r.text


def test_controlnet_and_inpainting_model_with_accelerations(tmp_path):
    """ControlNet residuals still reach a cached call's shallow skips (control.hook_unet finds the UNetFn under
    AccelUNet), and a 9-channel inpainting model's extra channels pass through."""
    from PIL import Image
    from tests.pipelines.test_control import control_image, controlnet_file
    from easel.pipelines.control_unit import ControlUnit
    from easel.pipelines.pipeline import Pipeline
    kw = dict(width=32, height=32, steps=4, sampler="euler", seed=5, deepcache=2, tome=0.5, cfg_scale=5.0)
    loaded = make_tiny(tmp_path / "sd1", "sd1")
    path = controlnet_file(tmp_path)[0]
    pipe = Pipeline(loaded)
    with torch.no_grad():
        plain, zero, on = (np.asarray(pipe.generate(GenerationRequest("a red cat", "blue dog", controlnets=units, **kw))
                                      [0].image).astype(int)
                           for units in ([], [ControlUnit(str(path), control_image(), weight=0.0)],
                                         [ControlUnit(str(path), control_image())]))
    assert np.array_equal(plain, zero) and np.abs(plain - on).max() > 3
    inpaint = Pipeline(make_tiny(tmp_path / "inp", "sd1-inpaint"))
    init = control_image(seed=4)
    with torch.no_grad():
        out = inpaint.generate(GenerationRequest("a red cat", init_images=[init], mask=Image.new("L", (32, 32), 255),
                                                 **kw))
    assert out[0].image.size == (32, 32) and out[0].params["deepcache"] == 2


def test_compiled_unet_is_refused_clearly(models, monkeypatch):
    from easel.pipelines.compile import CompiledForward
    unet = models["sd1"].model.unet
    fake = object.__new__(CompiledForward)  # only its type matters to the check; nothing is compiled
    monkeypatch.setitem(unet.__dict__, "forward", fake)
    with pytest.raises(ValueError, match="compile"):
        latents(models["sd1"], deepcache=2)
