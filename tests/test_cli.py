"""The `easel` command line, run in-process on a tiny single-file model."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from easel.cli import main

FAST = ["--steps", "3", "--width", "32", "--height", "32"]


def test_generate_info_and_reproduce(tmp_path, tiny_sd1_file, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a red cat", "--model", str(tiny_sd1_file), "--seed", "11", "-n", "2",
                 "--out", str(out), "--negative-prompt", "dog", *FAST]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    capsys.readouterr()
    assert main(["info", str(files[1])]) == 0
    text = capsys.readouterr().out
    assert text.startswith("a red cat\nNegative prompt: dog\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras")
    assert "Seed: 12" in text and "Size: 32x32" in text and "Model hash: " in text
    assert main(["info", "--json", str(files[1])]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 12
    again = tmp_path / "again"
    assert main(["generate", "--from", str(files[1]), "--model", str(tiny_sd1_file), "--out", str(again)]) == 0
    redo = next(again.glob("*.png"))
    assert redo.name == "00000-12.png"
    # Made alone rather than as image 2 of a batch: equal up to float summation order (batch-size dependent).
    diff = np.abs(np.asarray(Image.open(redo)).astype(int) - np.asarray(Image.open(files[1])).astype(int))
    assert diff.max() <= 2


def test_building_the_parser_imports_neither_torch_nor_the_server():
    """`easel --help` stays fast: every sub-command's flags are built without torch or fastapi."""
    code = ("import sys, easel.cli; easel.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_convert_both_ways(tmp_path, tiny_sd1_file):
    folder = tmp_path / "pipe"
    assert main(["convert", str(tiny_sd1_file), str(folder), "--to", "diffusers"]) == 0
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), str(back), "--to", "single-file"]) == 0
    assert back.is_file()
    assert main(["convert", str(tiny_sd1_file), str(folder), "--to", "diffusers"]) == 2  # exists: refuse


@pytest.mark.parametrize("args,match", [
    (["generate", "x", "--width", "30"], "multiple of 8"),
    (["generate", "x", "--sampler", "bogus"], "unknown sampler"),
    (["generate", "x", "--model", "/nonexistent/model.safetensors"], "not found"),
    (["info", "/nonexistent.png"], "image not found: /nonexistent.png"),
])
def test_errors_are_one_clear_line(tmp_path, tiny_sd1_file, capsys, args, match):
    if "--model" not in args and args[0] == "generate":
        args = args + ["--model", str(tiny_sd1_file)]
    assert main(args + ["--out", str(tmp_path)] if args[0] == "generate" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and match in err and "Traceback" not in err


def test_models_lists_files(tmp_path, tiny_sd1_file, capsys, monkeypatch):
    monkeypatch.setenv("EASEL_MODELS", str(tiny_sd1_file.parent))
    assert main(["models"]) == 0
    assert "tiny-sd1" in capsys.readouterr().out


def test_tokenizer_install_fills_the_cache(tmp_path, monkeypatch, capsys):
    from tests.conftest import write_tiny_vocab
    from easel.text.tokenizer import CLIPTokenizer
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    write_tiny_vocab(tmp_path / "tok")
    assert main(["tokenizer", "install", str(tmp_path / "tok")]) == 0
    for kind in ("clip-l", "openclip"):
        tok = CLIPTokenizer.from_dir(tmp_path / "cache" / "tokenizers" / kind)
        assert tok.encode("a red cat") == CLIPTokenizer.from_dir(tmp_path / "tok").encode("a red cat")


def _source(tmp_path, size=(32, 32)):
    y, x = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([x * 7 % 256, y * 7 % 256, np.full_like(x, 100)], -1).astype(np.uint8)
    path = tmp_path / "src.png"
    Image.fromarray(arr).save(path)
    return path


def test_img2img_writes_the_image_size_and_parameters(tmp_path, tiny_sd1_file, capsys):
    out = tmp_path / "out"
    assert main(["img2img", str(_source(tmp_path, (40, 24))), "a red cat", "--model", str(tiny_sd1_file),
                 "--denoising-strength", "0.5", "--resize-mode", "crop-and-resize", "--steps", "2", "--seed", "3",
                 "-n", "1", "--out", str(out)]) == 0
    path = next(out.glob("*.png"))
    assert Image.open(path).size == (40, 24)  # no --width/--height: the image's size
    capsys.readouterr()
    assert main(["info", "--json", str(path)]) == 0
    params = json.loads(capsys.readouterr().out)
    assert (params["mode"], params["denoising_strength"], params["resize_mode"]) == ("img2img", 0.5, "crop_and_resize")
    assert main(["info", str(path)]) == 0
    assert "Denoising strength: 0.5" in capsys.readouterr().out


def test_inpaint_resizes_a_mask_of_another_size(tmp_path, tiny_sd1_file, capsys):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")  # half the image's size
    out = tmp_path / "out"
    assert main(["inpaint", str(_source(tmp_path)), str(tmp_path / "mask.png"), "a red cat", "--model",
                 str(tiny_sd1_file), "--mask-blur", "2", "--inpainting-fill", "latent-noise", "--steps", "2",
                 "--seed", "3", "-n", "1", "--out", str(out)]) == 0
    path = next(out.glob("*.png"))
    assert Image.open(path).size == (32, 32)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Mask blur: 2" in text and "Masked content: latent noise" in text


def test_outpaint_extends_the_canvas(tmp_path, tiny_sd1_file):
    out = tmp_path / "out"
    assert main(["outpaint", str(_source(tmp_path)), "a red cat", "--model", str(tiny_sd1_file), "--right", "16",
                 "--steps", "2", "--seed", "3", "-n", "1", "--out", str(out)]) == 0
    assert Image.open(next(out.glob("*.png"))).size == (48, 32)


def test_generate_hires_records_the_options(tmp_path, tiny_sd1_file, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a red cat", "--model", str(tiny_sd1_file), "--hires", "--hr-scale", "1.5",
                 "--hr-upscaler", "latent-bicubic", "--hr-steps", "1", "--hr-denoising-strength", "0.4",
                 "--steps", "2", "--width", "16", "--height", "16", "--seed", "5", "-n", "1", "--out", str(out)]) == 0
    path = next(out.glob("*.png"))
    assert Image.open(path).size == (24, 24)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Size: 16x16" in text and "Hires upscale: 1.5" in text and "Hires steps: 1" in text
    assert "Hires upscaler: Latent (bicubic)" in text and "Denoising strength: 0.4" in text
    # An A1111-written image carries only the text chunk: its hires options are read back from it.
    from PIL import PngImagePlugin
    from easel.cli import params_from_image
    from easel.pipelines.metadata import read_png_params
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", read_png_params(path)["parameters"])
    Image.open(path).save(tmp_path / "a1111.png", pnginfo=info)
    p = params_from_image(str(tmp_path / "a1111.png"))
    assert (p["enable_hr"], p["hr_scale"], p["hr_upscaler"], p["hr_second_pass_steps"]) == (True, 1.5, "latent-bicubic", 1)
    assert p["hr_denoising_strength"] == 0.4


def test_generation_flags_reach_the_request():
    from easel.cli import build_parser, request_from_args
    args = build_parser().parse_args(["generate", "x", "--lora", "a:0.5", "--lora", "b.safetensors:1", "--subseed",
                                      "9", "--subseed-strength", "0.3", "--seed-resize-from", "64x48",
                                      "--preview-every", "2", "--preview-mode", "full", "--hr-sampler", "euler",
                                      "--hr-prompt", "y"])
    req = request_from_args(args)
    assert req.loras == ["a:0.5", "b.safetensors:1"] and (req.subseed, req.subseed_strength) == (9, 0.3)
    assert (req.seed_resize_from_w, req.seed_resize_from_h) == (64, 48)
    assert (req.preview_every, req.preview_mode, req.hr_sampler, req.hr_prompt) == (2, "full", "euler", "y")
    assert req.enable_hr is False  # --hires not given: the schema's default


@pytest.mark.parametrize("make_args,match", [
    (lambda t: ["img2img", str(t / "missing.png"), "x"], "image not found"),
    (lambda t: ["img2img", str(t / "bad.png"), "x"], "is not an image"),
    (lambda t: ["img2img", str(_source(t)), "x", "--denoising-strength", "2"], "denoising_strength"),
    (lambda t: ["inpaint", str(_source(t)), str(t / "missing.png"), "x"], "mask not found"),
    (lambda t: ["outpaint", str(_source(t)), "x"], "--left"),
    (lambda t: ["generate", "x", "--seed-resize-from", "64"], "WIDTHxHEIGHT"),
    (lambda t: ["generate", "x", "--hires", "--hr-upscaler", "esrgan"], "hr_upscaler"),
])
def test_edit_errors_are_one_clear_line(tmp_path, tiny_sd1_file, capsys, make_args, match):
    (tmp_path / "bad.png").write_text("not a png")
    assert main(make_args(tmp_path) + ["--model", str(tiny_sd1_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and match in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["info"], ["generate", "--from"], ["img2img"]])
def test_huge_png_is_one_clear_line(tmp_path, tiny_sd1_file, capsys, command):
    from tests.pipelines.test_metadata import _png_header
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(30000, 30000, 1, 0, text=b"x\nSteps: 2"))
    args = command + [str(huge)] + (["x", "--model", str(tiny_sd1_file)] if command == ["img2img"] else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and "30000x30000" in err and "Traceback" not in err
