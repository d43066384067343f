"""ControlNet during sampling, on tiny random-weight models: parity with diffusers' ControlNet pipelines, weight 0 is
the image without it, A1111's control modes and guidance window, several units, img2img / inpaint / hires, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_tiny
from tests.models.test_controlnet import random_controlnet
from easel.pipelines import common
from easel.pipelines.control import ActiveControl, ControlledUNet, ControlSet, StepTracker
from easel.pipelines.control_unit import ControlUnit
from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.pipelines.txt2img import sample_latents
from easel.weights import controlnet_keys as keys
from easel.weights.load import write_safetensors
from easel.weights.model_io import save_model


def controlnet_file(tmp_path, family="sd1", seed=0, name="cn"):
    """A random-weight ControlNet of the tiny family as a ControlNet 1.1 single file."""
    net, cfg = random_controlnet(family, seed)
    path = tmp_path / f"{name}-{family}.safetensors"
    write_safetensors({"control_model." + k: v for k, v in net.state_dict().items()}, path)
    return path, net, cfg


def control_image(size=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[8:24, 4:14] = 255
    arr[4:12, 18:30] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def generate(loaded, units, **options):
    opts = dict(width=32, height=32, steps=4, sampler="euler", scheduler="karras", seed=5, cfg_scale=5.0)
    req = GenerationRequest("a red cat", "blue dog", controlnets=units, **{**opts, **options})
    return Pipeline(loaded).generate(req)


def latents_of(loaded, units, **options):
    """The final latents of a txt2img request with these ControlNet units (through the pipeline's hook-up)."""
    out = {}

    def grab(p, _loaded):
        return p.observe(lambda d: out.__setitem__("x", d["denoised"]))
    opts = dict(width=32, height=32, steps=4, sampler="euler", scheduler="karras", seed=5, cfg_scale=5.0)
    req = GenerationRequest("a red cat", "blue dog", controlnets=units, **{**opts, **options})
    with torch.no_grad():
        Pipeline(loaded).generate(req, extend_plan=grab)
    return out["x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("control")
    return make_tiny(d, "sd1"), d


def test_weight_zero_is_bit_identical_to_no_controlnet(tiny):
    loaded, d = tiny
    path = controlnet_file(d)[0]
    plain = np.asarray(generate(loaded, [])[0].image)
    zero = np.asarray(generate(loaded, [ControlUnit(str(path), control_image(), weight=0.0)])[0].image)
    on = np.asarray(generate(loaded, [ControlUnit(str(path), control_image())])[0].image)
    assert np.array_equal(plain, zero)
    assert np.abs(plain.astype(int) - on.astype(int)).max() > 5  # and a real ControlNet does change the image


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_matches_diffusers_controlnet_pipelines(tmp_path, family):
    """Same weights, image, noise and scheduler as diffusers' StableDiffusion(XL)ControlNetPipeline: the first
    step's residuals and the final latents agree to float precision (SD2: v-prediction, OpenCLIP text)."""
    diffusers = pytest.importorskip("diffusers")
    loaded = make_tiny(tmp_path, family)
    path, net, cfg = controlnet_file(tmp_path, family)
    ref = diffusers.ControlNetModel.from_config(keys.diffusers_config(cfg)).eval()
    ref.load_state_dict(keys.to_diffusers(net.state_dict(), cfg), strict=True)
    kind = diffusers.StableDiffusionXLControlNetPipeline if family == "sdxl" else \
        diffusers.StableDiffusionControlNetPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = kind.from_pretrained(save_model(loaded, tmp_path / "pipe", to="diffusers"), controlnet=ref, **extra)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, seeds, steps = control_image(), [11], 5
    noise, _ = common.initial_noise(seeds, (4, 16, 16))
    first = {}
    hook = ref.register_forward_hook(lambda m, a, out: None if first.setdefault("theirs", [*out[0], out[1]]) else None)
    theirs = pipe("a red cat", negative_prompt="blue dog", image=image, num_inference_steps=steps, guidance_scale=5.0,
                  height=32, width=32, latents=noise.clone(), output_type="latent").images
    hook.remove()
    req = GenerationRequest("a red cat", "blue dog", width=32, height=32, steps=steps, cfg_scale=5.0, sampler="euler",
                            scheduler="ddim_uniform", seed=11, batch_size=1,
                            controlnets=[ControlUnit(str(path), image, resize_mode="just_resize")]).resolved(32, 1)
    controls = ControlSet.for_request(loaded, req)
    net = controls.controls[0].control.net
    hook = net.register_forward_hook(lambda m, a, out: None if first.setdefault("ours", out) else None)
    from easel.pipelines import plan
    with plan.extending(controls.extend), torch.no_grad():
        ours = sample_latents(loaded, req, seeds)
    hook.remove()
    for a, b in zip(first["ours"], first["theirs"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = sample_latents(loaded, req.__class__(**{**req.__dict__, "controlnets": []}), seeds)
    assert float((ours - plain).abs().max()) > 1e-3  # the ControlNet matters in this comparison
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def tracker_call(control_mode, batch=1, rows=2, weight=0.5):
    """Residuals one unit makes for a CFG batch (negative rows first) under a control mode."""
    net, cfg = random_controlnet()

    class Loaded:  # what ActiveControl reads of a LoadedControlNet
        pass
    lc = Loaded()
    lc.net = net
    active = ActiveControl(ControlUnit("x", control_image(), weight=weight, control_mode=control_mode), lc,
                           control_image(), None)
    tracker = StepTracker(lambda x, s: x, torch.tensor([3.0, 1.0, 0.0]))
    tracker.batch = batch
    x, hint = torch.randn(rows, 4, 16, 16), active.hint(32, 32)
    cond = {"context": torch.randn(rows, 7, 32)}
    unet = ControlledUNet(None, [active], [hint], tracker)
    with torch.no_grad():
        raw = net(x, hint.expand(rows, -1, -1, -1), torch.tensor(5.0), cond["context"])
        return raw, unet.residuals(active, hint, x, torch.tensor(5.0), cond)


def test_control_modes_follow_sd_webui_controlnet():
    raw, balanced = tracker_call("balanced")
    for r, b in zip(raw, balanced):
        torch.testing.assert_close(b, r * 0.5)
    raw, prompt = tracker_call("My prompt is more important")
    n = len(raw)
    for k, (r, p) in enumerate(zip(raw, prompt)):  # both halves, decaying towards the first skip
        torch.testing.assert_close(p, r * 0.5 * 0.825 ** (n - 1 - k))
    raw, control = tracker_call(2)  # "ControlNet is more important", by A1111's index
    for k, (r, c) in enumerate(zip(raw, control)):
        assert float(c[0].abs().max()) == 0  # the negative prompt's row runs without ControlNet
        torch.testing.assert_close(c[1], r[1] * 0.5 * 0.825 ** (n - 1 - k))
    raw, alone = tracker_call("control", batch=2, rows=2)  # CFG scale 1: no negative rows, all prompt rows kept
    torch.testing.assert_close(alone[-1], raw[-1] * 0.5)


def test_guidance_window_uses_a1111s_rule(tiny):
    """Active at step i of n when start <= i/n <= end: with 4 steps and end 0.5, steps 0, 1 and 2 run it."""
    loaded, d = tiny
    path = controlnet_file(d)[0]
    calls = []
    units = [ControlUnit(str(path), control_image(), guidance_start=0.0, guidance_end=0.5)]
    req = GenerationRequest("a red cat", width=32, height=32, steps=4, sampler="euler", seed=1, controlnets=units)
    controls = ControlSet.for_request(loaded, req)
    net = controls.controls[0].control.net
    hook = net.register_forward_hook(lambda m, a, out: None if calls.append(1) else None)
    from easel.pipelines import plan
    with plan.extending(controls.extend):
        sample_latents(loaded, req.resolved(32, 1), [1])
    hook.remove()
    assert len(calls) == 3


def test_two_controlnets_add_up_and_order_matters_not(tiny):
    loaded, d = tiny
    a, b = controlnet_file(d, seed=1, name="a")[0], controlnet_file(d, seed=2, name="b")[0]
    ua, ub = ControlUnit(str(a), control_image(seed=0)), ControlUnit(str(b), control_image(seed=1), weight=0.7)
    both = latents_of(loaded, [ua, ub])
    swapped = latents_of(loaded, [ub, ua])
    torch.testing.assert_close(both, swapped, rtol=1e-5, atol=1e-5)
    assert float((both - latents_of(loaded, [ua])).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires"])
def test_runs_in_every_mode_and_changes_the_image(tiny, mode):
    loaded, d = tiny
    path = controlnet_file(d)[0]
    init = control_image(seed=3).resize((32, 32))
    opts = {"img2img": dict(init_images=[init], denoising_strength=0.7),
            "inpaint": dict(init_images=[init], mask=Image.new("L", (32, 32), 255), denoising_strength=0.9),
            "hires": dict(enable_hr=True, hr_scale=1.5, hr_denoising_strength=0.6)}[mode]
    unit = lambda w: ControlUnit(str(path), None if mode != "hires" else control_image(), weight=w)  # noqa: E731
    plain, on = (np.asarray(generate(loaded, [unit(w)], **opts)[0].image).astype(int) for w in (0.0, 1.0))
    assert np.abs(plain - on).max() > 3


def test_inpainting_model_runs_a_four_channel_controlnet(tmp_path):
    loaded = make_tiny(tmp_path, "sd1-inpaint")
    path = controlnet_file(tmp_path)[0]
    init = control_image(seed=4)
    res = generate(loaded, [ControlUnit(str(path), preprocessor="inpaint")], init_images=[init],
                   mask=Image.new("L", (32, 32), 255))
    assert res[0].image.size == (32, 32)


def test_params_record_units_and_a1111_text(tiny):
    loaded, d = tiny
    path = controlnet_file(d)[0]
    res = generate(loaded, [ControlUnit(str(path), control_image(), weight=0.8, preprocessor="canny",
                                        control_mode="prompt", guidance_end=0.9)])
    p = res[0].params
    assert p["controlnet_units"][0]["weight"] == 0.8 and p["controlnet_units"][0]["model_name"] == "cn-sd1"
    text = p["controlnet_infotext"]["ControlNet 0"]
    assert text.startswith("Module: canny, Model: ") and "Weight: 0.8" in text
    assert "Control Mode: My prompt is more important" in text and "Guidance End: 0.9" in text
    from easel.pipelines.metadata import infotext
    line = infotext(p).splitlines()[-1]  # as sd-webui-controlnet writes it: quoted, before Version
    assert f'ControlNet 0: "{text}", Version: ' in line


def test_request_round_trip_and_errors(tiny):
    loaded, d = tiny
    unit = {"model": "cn", "input_image": common.to_pil(torch.zeros(1, 3, 8, 8))[0], "module": "canny",
            "control_mode": "ControlNet is more important", "resize_mode": "Just Resize"}
    req = GenerationRequest("x", controlnets=[unit])
    u = req.controlnets[0]
    assert (u.preprocessor, u.control_mode, u.resize_mode) == ("canny", "control", "just_resize")
    back = GenerationRequest.from_dict(req.to_dict(images="base64"))
    assert back.controlnets[0].image.size == (8, 8) and back.controlnets[0].control_mode == "control"
    bad = [({"weight": 3}, r"controlnets\[0\].weight must be a number between 0 and 2"),
           ({"guidance_start": 0.8, "guidance_end": 0.2}, "after guidance_end"),
           ({"control_mode": "loud"}, r"unknown controlnets\[0\].control_mode"),
           ({"preprocessor": "depth"}, "dpt_hybrid-midas-501f0c75.pt"),
           ({"preprocessor": "openpose"}, "body_pose_model.pth"),
           ({"image": None}, "has no image.*--control-image")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            GenerationRequest("x", controlnets=[{**{"model": "cn", "image": control_image()}, **change}]).check()
    with pytest.raises(ValueError, match="unknown field.*strength"):
        GenerationRequest("x", controlnets=[{"model": "cn", "strength": 1}])
    with pytest.raises(FileNotFoundError, match="ControlNet 'nope' not found"):
        generate(loaded, [ControlUnit("nope", control_image())])


def test_only_masked_inpainting_crops_the_hint_like_the_init_image(tiny):
    """With inpaint_full_res the processed picture is a crop around the mask: the hint is cropped the same way."""
    from easel.pipelines import images
    loaded, d = tiny
    path = controlnet_file(d)[0]
    init = control_image(size=64, seed=5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 56, 56))
    req = GenerationRequest("x", width=32, height=32, init_images=[init], mask=mask, inpaint_full_res=True,
                            inpaint_full_res_padding=4, mask_blur=0,
                            controlnets=[ControlUnit(str(path), None, resize_mode="just_resize")])
    hint = ControlSet.for_request(loaded, req).controls[0].hint(32, 32)[0].permute(1, 2, 0).numpy()
    region = images.expand_to_aspect(images.mask_crop_region(mask, 4), 32, 32, 64, 64)
    work = np.asarray(images.crop_for_region(init, region, 32, 32)) / 255.0
    np.testing.assert_allclose(hint, work, atol=1e-6)
    assert region != (0, 0, 64, 64)


def test_a1111_alwayson_units(tiny, tmp_path, monkeypatch):
    """sd-webui-controlnet's API units: disabled ones skipped, image dicts, labels, " [hash]" model names."""
    from easel.pipelines.control_unit import from_a1111
    from easel.pipelines.request import decode_image, image_to_base64
    from easel.weights.controlnet_load import list_controlnets, resolve_controlnet
    loaded, d = tiny
    folder = tmp_path / "ControlNet"
    folder.mkdir()
    path = controlnet_file(folder, name="control_v11p_sd15_canny")[0]
    monkeypatch.setenv("EASEL_CONTROLNETS", str(folder))
    b64 = image_to_base64(control_image())
    units = from_a1111([
        {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny-sd1 [0123abcd]", "weight": 0.7,
         "image": {"image": b64, "mask": None}, "resize_mode": "Just Resize", "lowvram": False,
         "processor_res": 512, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.1,
         "guidance_end": 0.9, "control_mode": 1, "pixel_perfect": True},
        {"enabled": False, "model": "x", "image": b64},
        {"model": "None"},
        {"input_image": b64, "model": "control_v11p_sd15_canny-sd1", "guessmode": True}], decode_image)
    assert [u.control_mode for u in units] == ["prompt", "control"]
    assert units[0].resize_mode == "just_resize" and units[0].image.size == (32, 32)
    assert resolve_controlnet(units[0].model) == path and list_controlnets()[0] == path
    res = generate(loaded, units)
    assert res[0].params["controlnet_units"][1]["control_mode"] == "control"
    with pytest.raises(ValueError, match=r"args\[0\] must be an object"):
        from_a1111(["canny"])


def test_hires_pass_softens_canny_units_only(tiny):
    """sd-webui-controlnet forces the decaying scales on canny units in the hires pass, and only there."""
    loaded, d = tiny
    path = controlnet_file(d)[0]
    seen = []

    def spy(p, _):
        node = p.denoiser.inner.inner  # StepTracker -> GuidedDenoiser -> eps wrapper
        seen.append((tuple(p.noise.shape[-2:]), node.model.hires_pass))
        return p
    from easel.pipelines import plan
    from easel.pipelines.pipeline import mode_preparer
    req = GenerationRequest("x", width=32, height=32, steps=2, seed=1, enable_hr=True, hr_scale=1.5,
                            controlnets=[ControlUnit(str(path), control_image(), preprocessor="canny")])
    with plan.extending(ControlSet.for_request(loaded, req).extend, spy), torch.no_grad():
        plan.run_batches(*mode_preparer("txt2img", True)(loaded, req))
    assert seen == [((16, 16), False), ((24, 24), True)]
    unit = lambda pre: ActiveControl(ControlUnit("x", preprocessor=pre), None, control_image(), None)  # noqa: E731
    assert unit("canny").scales(3, hires_pass=True) == [0.825 ** 2, 0.825, 1.0]
    assert unit("none").scales(3, hires_pass=True) == [1.0] * 3 and unit("canny").scales(3) == [1.0] * 3
