"""Inpainting on tiny random models (ordinary 4-channel and 9-channel inpainting UNets) and the built-in model:
every option, exactness outside the mask, the sampler wrappers, and parity with diffusers."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import make_tiny
from easel.pipelines import images
from easel.pipelines.img2img import resolve_edit_request
from easel.pipelines import plan
from easel.pipelines.inpaint import changed_outside, inpaint, inpaint_plan, prepare_inputs
from easel.pipelines.request import GenerationRequest
from easel.samplers.inpaint import ConcatInpaint, InpaintBlend
from easel.weights.model_io import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def scene(size=32, seed=0):
    """A noisy picture and a square mask aligned to the tiny VAE's 2-pixel latent cells."""
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 21, 21), fill=255)
    return img, mask


def request(img, mask, **kw):
    opts = dict(init_images=[img], mask=mask, steps=3, seed=3, batch_size=1, sampler="euler", scheduler="karras",
                cfg_scale=5.0)
    return GenerationRequest("a red cat", "blue dog", **{**opts, **kw})


def untouched(blur: int, mask: Image.Image) -> Image.Image:
    """Where the result must equal the input: outside the mask grown by the blur kernel's reach."""
    return images.prepare_mask(mask, blur=blur)


@pytest.mark.parametrize("fill", ["original", "fill", "latent_noise", "latent_nothing"])
def test_every_fill_keeps_pixels_outside_the_mask_exactly(tiny_sd1, fill):
    img, mask = scene()
    out = inpaint(tiny_sd1, request(img, mask, inpainting_fill=fill, mask_blur=2))
    assert out[0].image.size == (32, 32) and out[0].params["inpainting_fill"] == fill
    assert changed_outside(img, out[0].image, untouched(2, mask)) == 0
    inside = np.asarray(mask) == 255
    diff = np.abs(np.asarray(out[0].image, dtype=int) - np.asarray(img, dtype=int))
    assert diff[inside].mean() > 10  # the masked area was repainted


def test_fills_differ_and_same_seed_repeats(tiny_sd1):
    img, mask = scene()
    runs = {f: np.asarray(inpaint(tiny_sd1, request(img, mask, inpainting_fill=f, denoising_strength=0.5))[0].image)
            for f in ("original", "fill", "latent_nothing")}
    assert np.abs(runs["original"].astype(int) - runs["fill"]).max() > 0
    assert np.abs(runs["original"].astype(int) - runs["latent_nothing"]).max() > 0
    again = np.asarray(inpaint(tiny_sd1, request(img, mask, inpainting_fill="original", denoising_strength=0.5))[0].image)
    assert np.array_equal(again, runs["original"])


def test_strength_zero_returns_the_image_decoded_and_pasted(tiny_sd1):
    img, mask = scene()
    out = inpaint(tiny_sd1, request(img, mask, denoising_strength=0.0, mask_blur=0))[0].image
    assert changed_outside(img, out, mask) == 0


def test_invert_repaints_the_outside(tiny_sd1):
    img, mask = scene()
    out = inpaint(tiny_sd1, request(img, mask, inpainting_mask_invert=True, mask_blur=1))[0].image
    inner = Image.new("L", (32, 32), 255)  # the repaint area is everything but the square, grown by the blur
    ImageDraw.Draw(inner).rectangle((13, 13, 18, 18), fill=0)
    assert changed_outside(img, out, inner) == 0
    corner = np.abs(np.asarray(out, dtype=int)[:8, :8] - np.asarray(img, dtype=int)[:8, :8])
    assert corner.mean() > 10


def test_only_masked_works_on_a_crop_and_pastes_it_back(tiny_sd1):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle((40, 8, 47, 15), fill=255)
    req = resolve_edit_request(tiny_sd1, request(img, mask, inpaint_full_res=True, inpaint_full_res_padding=4,
                                                 mask_blur=1, width=32, height=32))
    inputs = prepare_inputs(tiny_sd1, req)
    x1, y1, x2, y2 = inputs.region
    assert x2 - x1 == y2 - y1 and x1 <= 40 - 4 - 3 and x2 >= 48 + 4 + 3  # square (32:32) around mask + pad + blur
    assert inputs.init_latent.shape[-2:] == (16, 16)  # processed at the requested size
    out = inpaint(tiny_sd1, req)[0].image
    assert out.size == (64, 48)  # the result has the original's size
    assert changed_outside(img, out, untouched(1, mask)) == 0
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(img, dtype=int))[8:16, 40:48].mean() > 10


def test_batches_seeds_and_params(tiny_sd1):
    img, mask = scene()
    out = inpaint(tiny_sd1, request(img, mask, seed=10, batch_size=2, n_iter=2, denoising_strength=0.8))
    assert [r.params["seed"] for r in out] == [10, 11, 12, 13]
    p = out[0].params
    assert p["mode"] == "inpaint" and p["denoising_strength"] == 0.8 and p["mask_blur"] == 4
    assert np.abs(np.asarray(out[0].image, dtype=int) - np.asarray(out[1].image)).max() > 0
    single = inpaint(tiny_sd1, request(img, mask, seed=11, batch_size=1, denoising_strength=0.8))[0].image
    assert np.abs(np.asarray(single, dtype=int) - np.asarray(out[1].image)).max() <= 2  # batch-size independent


def test_callback_steps_and_variation_seeds(tiny_sd1):
    img, mask = scene()
    seen = []
    base = inpaint(tiny_sd1, request(img, mask, steps=4, denoising_strength=0.5), callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1]  # int(4 * 0.5) steps of the 4-step schedule
    varied = inpaint(tiny_sd1, request(img, mask, steps=4, denoising_strength=0.5, subseed=9, subseed_strength=0.5))
    assert varied[0].params["subseed"] == 9
    assert np.abs(np.asarray(varied[0].image, dtype=int) - np.asarray(base[0].image)).max() > 0
    assert changed_outside(img, varied[0].image, untouched(4, mask)) == 0


def test_errors_name_the_problem(tiny_sd1):
    img, mask = scene()
    with pytest.raises(ValueError, match="mask is empty"):
        inpaint(tiny_sd1, request(img, Image.new("L", (32, 32), 0)))
    with pytest.raises(ValueError, match="needs a mask"):
        inpaint(tiny_sd1, GenerationRequest("x", init_images=[img], steps=2))
    with pytest.raises(ValueError, match="init images for a batch"):
        inpaint(tiny_sd1, request(img, mask, batch_size=3, init_images=[img, img]))


def test_blend_pins_the_known_region_at_every_call():
    torch.manual_seed(0)
    init, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    lmask = torch.zeros(1, 1, 8, 8)
    lmask[..., 2:6, 2:6] = 1
    seen = []

    def fake(x, sigma, **kw):
        seen.append((x.clone(), sigma.clone()))
        return x * 0.5 + 1.0

    blend = InpaintBlend(fake, init, lmask, noise)
    x = torch.randn(2, 4, 8, 8) * 3
    x0 = blend(x, torch.full((2,), 3.0))
    keep = (lmask == 0).expand_as(x)
    assert torch.allclose(seen[0][0][keep], (init + 3.0 * noise)[keep])  # noised original where known
    assert torch.equal(seen[0][0][~keep], x[~keep])  # the sampler's x where repainted
    assert torch.equal(x0[keep], init[keep]) and torch.allclose(x0[~keep], (x * 0.5 + 1.0)[~keep])


def test_concat_adds_mask_channels_for_every_call_and_the_cfg_batch():
    calls = []
    c = torch.arange(2 * 5 * 4 * 4, dtype=torch.float32).reshape(2, 5, 4, 4)
    wrapped = ConcatInpaint(lambda x, t, **kw: calls.append(x) or x[:, :4], c)
    wrapped(torch.zeros(4, 4, 4, 4), torch.zeros(4))  # uncond + cond halves of a batch of 2
    assert calls[0].shape == (4, 9, 4, 4)
    assert torch.equal(calls[0][:2, 4:], c) and torch.equal(calls[0][2:, 4:], c)
    with pytest.raises(ValueError, match="does not fit"):
        wrapped(torch.zeros(3, 4, 4, 4), torch.zeros(3))


@pytest.mark.parametrize("fill", ["original", "latent_noise"])
def test_inpainting_model_keeps_pixels_and_sees_the_mask(tmp_path, fill):
    loaded = make_tiny(tmp_path, "sd1-inpaint")
    assert loaded.model.config.is_inpaint
    img, mask = scene()
    req = resolve_edit_request(loaded, request(img, mask, inpainting_fill=fill, mask_blur=2))
    inputs = prepare_inputs(loaded, req)
    assert inputs.c_concat.shape == (1, 5, 16, 16)
    assert torch.equal(inputs.c_concat[:, :1], images.mask_tensor(inputs.work_mask)[..., ::2, ::2])
    out = inpaint(loaded, req)[0].image
    assert changed_outside(img, out, untouched(2, mask)) == 0
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(img, dtype=int))[12:20, 12:20].mean() > 10


def _diffusers_inpaint(diffusers, loaded, tmp_path, req, inputs, seed):
    """diffusers' StableDiffusionInpaintPipeline on the same weights, latents in and latents out.

    The init and masked-image latents are handed over as latents because diffusers samples the VAE posterior
    with the generator (easel takes its mean, as A1111's default); the rest (mask, noise from the same seed,
    Euler with 'leading' timesteps = ddim_uniform, strength slicing) is computed by diffusers itself."""
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(save_model(loaded, tmp_path / "pipe", to="diffusers"),
                                                                    safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    masked_latents = inputs.c_concat[:, 1:] if inputs.c_concat is not None else inputs.init_latent
    return pipe(req.prompt, image=inputs.init_latent, mask_image=req.mask, masked_image_latents=masked_latents,
                negative_prompt=req.negative_prompt, num_inference_steps=req.steps, strength=req.denoising_strength,
                guidance_scale=req.cfg_scale, height=req.height, width=req.width,
                generator=[torch.Generator().manual_seed(seed)], output_type="latent").images


@pytest.mark.slow  # importing diffusers' pipelines alone takes several seconds
@pytest.mark.parametrize("kind", ["inpainting-unet", "ordinary-unet"])
def test_matches_diffusers_inpaint_pipeline(tmp_path, tiny_sd1, kind):
    """Same weights, same seed -> same latents as diffusers, for 9-channel models (mask + masked-image latents
    concatenated at every UNet call) and for ordinary ones (known region re-noised at every step).

    At denoising strength < 1 only: at strength 1 diffusers starts from pure noise, easel (as A1111) from the
    image latent plus noise at the first sigma; and for ordinary models diffusers' first UNet call sees that pure
    noise where easel's (ComfyUI's) blend already shows the noised original. Below 1 both start from the noised
    image latent, and for Euler re-noising x before each call (easel) equals re-noising after each step
    (diffusers). The mask is aligned to latent cells with mask_blur 0, where A1111's rounded bicubic latent mask
    and diffusers' nearest downsampling agree (checked)."""
    diffusers = pytest.importorskip("diffusers")
    loaded = make_tiny(tmp_path, "sd1-inpaint") if kind == "inpainting-unet" else tiny_sd1
    img, mask = scene()
    req = resolve_edit_request(loaded, request(img, mask, mask_blur=0, steps=10, denoising_strength=0.6,
                                               scheduler="ddim_uniform", seed=5, cfg_scale=6.0))
    inputs = prepare_inputs(loaded, req)
    nearest = torch.nn.functional.interpolate(images.mask_tensor(mask), size=(16, 16))
    assert torch.equal(inputs.latent_mask, nearest)
    sigmas = plan.img2img_sigmas(plan.request_sigmas(loaded.model, req), req.denoising_strength)
    ours = plan.run(inpaint_plan(loaded, req, inputs, [5], sigmas))
    theirs = _diffusers_inpaint(diffusers, loaded, tmp_path, req, inputs, 5)
    assert (ours - inputs.init_latent).abs().max() > 0.1  # something was denoised
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_builtin_model_inpaints_and_keeps_the_rest():
    import easel
    from easel.world.render import render
    from easel.world.scenes import sample_scene
    pipe = easel.load()
    img = render(sample_scene(7, kind="single"), 64)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 47, 47), fill=255)
    for full_res in (False, True):
        out = pipe.inpaint(img, mask, "a blue circle", steps=8, seed=1, batch_size=1, inpaint_full_res=full_res,
                           inpaint_full_res_padding=8, width=64, height=64)
        assert out[0].size == (64, 64)
        assert changed_outside(img, out[0], untouched(4, mask)) == 0
