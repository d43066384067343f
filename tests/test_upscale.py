"""Upscalers: random-weight ESRGAN (RRDBNet), Real-ESRGAN compact (SRVGGNet) and SwinIR files written the way
people have them (.safetensors, BasicSR .pth), found by A1111's names, tiled without seams, used by hires fix,
`easel upscale` and SD upscale; clear errors for files that are not upscalers."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from easel.upscale import find, tiles
from easel.upscale.model import NotAnUpscaler, load_upscaler, spandrel
from easel.upscale.run import upscale_image, upscale_tensor
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
needs_spandrel = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                    reason="spandrel is not installed (pip install --no-deps spandrel einops)")


def arch(name: str, scale: int = 4) -> torch.nn.Module:
    """A small random-weight network of one of spandrel's architectures."""
    spandrel()  # importing spandrel first (it may need the torchvision stand-in)
    torch.manual_seed(0)
    if name == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN
        return ESRGAN(num_filters=8, num_blocks=1, scale=scale)
    if name == "compact":
        from spandrel.architectures.Compact import Compact
        return Compact(num_feat=8, num_conv=2, upscale=scale)
    from spandrel.architectures.SwinIR import SwinIR
    return SwinIR(embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=scale, img_size=16,
                  upsampler="pixelshuffledirect")


def write_safetensors(net: torch.nn.Module, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A model folder with ESRGAN/4x-Tiny.safetensors, RealESRGAN/RealESRGAN_x4plus.pth (BasicSR's
    {'params_ema': ...}) and upscalers/RealESRGAN_x2plus.safetensors (a compact 2x)."""
    root = tmp_path / "models"
    write_safetensors(arch("esrgan"), root / "ESRGAN" / "4x-Tiny.safetensors")
    (root / "RealESRGAN").mkdir(parents=True)
    torch.save({"params_ema": arch("esrgan").state_dict()}, root / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    write_safetensors(arch("compact", 2), root / "upscalers" / "RealESRGAN_x2plus.safetensors")
    monkeypatch.setenv("EASEL_MODELS", str(root))
    return root


def random_image(w: int = 37, h: int = 29, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@needs_spandrel
@pytest.mark.parametrize("name", ["esrgan", "compact", "swinir"])
def test_tiled_equals_untiled(tmp_path, name):
    """Overlapping, feathered tiles give the whole-image result: no seams (zero padding at a tile's edge only
    matters inside the part of the overlap that the ramp gives no weight)."""
    path = tmp_path / f"{name}.safetensors"
    write_safetensors(arch(name, 2 if name == "swinir" else 4), path)
    model = load_upscaler(path)
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(1))
    whole = upscale_tensor(model, x, tile=0)
    tiled = upscale_tensor(model, x, tile=24, overlap=12)
    assert whole.shape == tiled.shape == (1, 3, 40 * model.scale, 52 * model.scale)
    assert (whole - tiled).abs().max() < 0.02  # outputs span about 0..1
    naive = upscale_tensor(model, x, tile=24, overlap=0)  # what blending prevents: a seam
    assert (whole - naive).abs().max() > (whole - tiled).abs().max()


def test_blend_weights_reassemble_an_image_exactly():
    """With a network that has no context (nearest-neighbour upsampling), the tiled result is the same image:
    the weights add up to 1 everywhere, including where the last tile overlaps more than asked."""
    x = torch.rand(1, 3, 50, 70)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=3, mode="nearest")  # noqa: E731
    got = tiles.tiled_apply(up, x, 3, tile=16, overlap=6)
    assert torch.allclose(got, up(x), atol=1e-6)
    assert tiles.tile_starts(50, 16, 6) == [0, 10, 20, 30, 34]
    with pytest.raises(ValueError, match="overlap"):
        tiles.tile_starts(50, 16, 16)


@needs_spandrel
def test_progress_reports_every_tile(tmp_path):
    path = tmp_path / "e.safetensors"
    write_safetensors(arch("esrgan"), path)
    seen = []
    upscale_image(random_image(40, 20), str(path), tile=16, overlap=4, on_tile=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 6) for k in range(1, 7)]  # 3 x 2 tiles


@needs_spandrel
def test_found_by_a1111_label_stem_and_folder(models):
    assert find.find_upscaler("R-ESRGAN 4x+").path.name == "RealESRGAN_x4plus.pth"
    assert find.find_upscaler("r_esrgan 2x+").path.name == "RealESRGAN_x2plus.safetensors"
    assert find.find_upscaler("4x-tiny").name == "4x-Tiny"
    assert {e.name for e in find.list_upscalers()} == {"4x-Tiny", "R-ESRGAN 4x+", "R-ESRGAN 2x+"}
    with pytest.raises(find.UpscalerNotFound, match=r"4x-Tiny.*ESRGAN"):
        find.find_upscaler("4x-UltraSharp")
    with pytest.raises(find.UpscalerNotFound, match="LDSR is a latent-diffusion upscaler"):
        find.find_upscaler("LDSR")


@needs_spandrel
def test_basicsr_pth_loads_with_weights_only(models):
    """A Real-ESRGAN .pth ({'params_ema': state dict}) loads through torch.load(weights_only=True)."""
    model = load_upscaler(find.find_upscaler("R-ESRGAN 4x+").path)
    assert model.scale == 4 and model.architecture.name == "ESRGAN"
    out = upscale_image(random_image(), "R-ESRGAN 4x+")
    assert out.size == (37 * 4, 29 * 4)


@needs_spandrel
def test_scales(models):
    """Default: the model's scale; a 2x model asked for 3x runs twice, then Lanczos down to the exact size."""
    im = random_image(20, 12)
    assert upscale_image(im, "R-ESRGAN 2x+").size == (40, 24)
    assert upscale_image(im, "R-ESRGAN 2x+", 3).size == (60, 36)
    assert upscale_image(im, "R-ESRGAN 2x+", size=(50, 31)).size == (50, 31)
    assert upscale_image(im, "lanczos").size == (40, 24)
    big = upscale_image(im, "nearest", 4)
    assert big.size == (80, 48) and big.getpixel((3, 3)) == im.getpixel((0, 0))
    with pytest.raises(ValueError, match="scale must be positive"):
        upscale_image(im, "lanczos", 0)


@needs_spandrel
def test_not_an_upscaler(tmp_path):
    sd_like = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd_like))
    with pytest.raises(NotAnUpscaler, match="Stable Diffusion checkpoint: use it as --model"):
        load_upscaler(sd_like)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(NotAnUpscaler, match="holds no weights"):
        load_upscaler(empty)


@needs_spandrel
def test_pickle_that_runs_code_is_refused(tmp_path):
    from easel.weights.load import UnsafeCheckpointError

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"w": torch.zeros(1)}, "x": Boom()}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_upscaler(path)


@needs_spandrel
def test_hires_fix_uses_upscaler_files_by_a1111_name(tmp_path, models):
    from easel.pipelines.metadata import infotext
    from easel.pipelines.names import resolve_upscaler, upscaler_label
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    assert resolve_upscaler("R-ESRGAN 4x+") == "R-ESRGAN 4x+"
    assert resolve_upscaler("Latent (bicubic)") == "latent-bicubic"  # the built-in names still come first
    path = str(models / "ESRGAN" / "4x-Tiny.safetensors")
    assert resolve_upscaler(path) == path and upscaler_label(path) == "4x-Tiny"  # a path stays a path
    with pytest.raises(ValueError, match="unknown hr_upscaler 'nope'.*4x-Tiny"):
        resolve_upscaler("nope")
    pipe = Pipeline(make_tiny(tmp_path / "m"))
    req = GenerationRequest("a cat", steps=2, seed=1, batch_size=1, enable_hr=True, hr_scale=2,
                            hr_upscaler="R-ESRGAN 4x+", hr_denoising_strength=0.3)
    out = pipe.generate(req)[0]
    assert out.image.size == (64, 64)
    assert "Hires upscaler: R-ESRGAN 4x+" in infotext(out.params)
    import dataclasses
    lanczos = pipe.generate(dataclasses.replace(req, hr_upscaler="lanczos"))[0]
    assert lanczos.image.tobytes() != out.image.tobytes()  # the network ran, not a Lanczos fallback
    nearest = pipe.generate(GenerationRequest("a cat", steps=2, seed=1, batch_size=1, enable_hr=True,
                                              hr_upscaler="Nearest"))[0]
    assert nearest.image.size == (64, 64) and "Hires upscaler: Nearest" in infotext(nearest.params)


@needs_spandrel
def test_cli_upscale(tmp_path, models, capsys):
    from easel.cli import main
    src = tmp_path / "in.png"
    random_image(24, 16).save(src)
    out = tmp_path / "out.png"
    assert main(["upscale", str(src), "--upscaler", "4x-Tiny", "--tile", "16", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (96, 64)
        assert im.text["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-Tiny"
    assert main(["upscale", "--list"]) == 0
    assert "R-ESRGAN 4x+" in capsys.readouterr().out
    assert main(["upscale"]) == 2 and "give the IMAGE" in capsys.readouterr().err
    assert main(["upscale", str(src), "--upscaler", "4x-Nope", "--out", str(out)]) == 2
    assert "unknown upscaler '4x-Nope'" in capsys.readouterr().err
    not_upscaler = tmp_path / "models" / "ESRGAN" / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(not_upscaler))
    assert main(["upscale", str(src), "--upscaler", "vae", "--out", str(out)]) == 2
    assert "looks like a VAE" in capsys.readouterr().err


@needs_spandrel
def test_sd_upscale_tiles_and_seed(tmp_path, models):
    """SD upscale: the upscaled size, rounded to multiples of 8; every tile repainted; deterministic."""
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    from easel.upscale.sd_upscale import sd_upscale
    pipe = Pipeline(make_tiny(tmp_path / "m"))  # tiles of the model's 32 px
    req = GenerationRequest("a cat", steps=2, seed=5, denoising_strength=0.4)
    seen = []
    a, params = sd_upscale(pipe, random_image(30, 20), req, "R-ESRGAN 2x+", 2, overlap=8,
                           on_tile=lambda d, t: seen.append(t))
    b, _ = sd_upscale(pipe, random_image(30, 20), req, "R-ESRGAN 2x+", 2, overlap=8)
    assert a.size == (64, 40) and seen == [6] * 6  # 3 x 2 tiles of 32 px
    assert a.tobytes() == b.tobytes()
    assert params["sd_upscale_tiles"] == 6 and params["final_width"] == 64
    with pytest.raises(ValueError, match="overlap"):
        sd_upscale(pipe, random_image(30, 20), req, "lanczos", 2, overlap=32)


def test_sd_upscale_tiles_keep_their_source_colours(tmp_path):
    """A random model repaints every tile in its own colours; colour matching brings each back to its source's."""
    import numpy as np
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    from easel.upscale.sd_upscale import sd_upscale
    pipe = Pipeline(make_tiny(tmp_path / "m"))
    source = Image.new("RGB", (32, 32), (200, 40, 40))
    req = GenerationRequest("a cat", steps=2, seed=5, denoising_strength=0.9)
    matched, _ = sd_upscale(pipe, source, req, "nearest", 2, overlap=8)
    raw, _ = sd_upscale(pipe, source, req, "nearest", 2, overlap=8, color_match=False)
    err = lambda im: np.abs(np.asarray(im, float).mean((0, 1)) - (200, 40, 40)).max()  # noqa: E731
    assert err(matched) < 3 < err(raw)


@needs_spandrel
def test_a1111_extras_and_upscaler_list(models):
    """What /sdapi/v1/extra-single-image and /sdapi/v1/upscalers answer (the servers call these)."""
    from easel.upscale.extras import a1111_upscalers, extras_single_image
    im = random_image(20, 10)
    out, info = extras_single_image(im, upscaler_1="R-ESRGAN 4x+", upscaling_resize=2)
    assert out.size == (40, 20) and info == "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+"
    out, _ = extras_single_image(im, resize_mode=1, upscaling_resize_w=30, upscaling_resize_h=30,
                                 upscaler_1="Lanczos")
    assert out.size == (30, 30)  # covered and centre-cropped
    out, _ = extras_single_image(im, resize_mode=1, upscaling_resize_w=30, upscaling_resize_h=30,
                                 upscaling_crop=False, upscaler_1="nearest", upscaler_2="4x-Tiny",
                                 extras_upscaler_2_visibility=0.5)
    assert out.size == (30, 30)
    assert extras_single_image(im)[0].size == (20, 10)  # upscaler_1 None: nothing to do
    with pytest.raises(ValueError, match="gfpgan_visibility: face restoration"):
        extras_single_image(im, upscaler_1="Lanczos", gfpgan_visibility=0.5)
    with pytest.raises(ValueError, match="resize_mode must be 0"):
        extras_single_image(im, upscaler_1="Lanczos", resize_mode=2)
    with pytest.raises(ValueError, match="unknown upscaler 'ESRGAN_4x'.*ESRGAN_4x.pth"):
        extras_single_image(im, upscaler_1="ESRGAN_4x")
    names = {u["name"]: u for u in a1111_upscalers()}
    assert list(names)[:3] == ["None", "Lanczos", "Nearest"]
    assert names["R-ESRGAN 2x+"]["scale"] == 2 and names["4x-Tiny"]["scale"] == 4
    assert names["4x-Tiny"]["model_path"].endswith("4x-Tiny.safetensors")
