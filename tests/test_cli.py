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
    import shutil
    for folder in ("ESRGAN", "upscale_models", "loras", "ControlNet"):  # upscalers, LoRAs, ControlNets: no checkpoints
        (tiny_sd1_file.parent / folder).mkdir(exist_ok=True)
        shutil.copy(tiny_sd1_file, tiny_sd1_file.parent / folder / f"not-a-model-{folder}.safetensors")
    monkeypatch.setenv("EASEL_MODELS", str(tiny_sd1_file.parent))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-sd1" in out and "not-a-model" not in out


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


# -- issue 9: --from, names, help, errors ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch2_models(tmp_path_factory):
    """A models folder holding a tiny model whose default batch is 2 (as the built-in model's is 4)."""
    import dataclasses
    from tests.conftest import make_tiny
    from easel.weights.model_io import save_model
    d = tmp_path_factory.mktemp("models")
    loaded = make_tiny(tmp_path_factory.mktemp("src"))
    loaded.model.config = dataclasses.replace(loaded.model.config, default_batch=2)
    save_model(loaded, d / "tiny-b2.safetensors")
    return d


def test_from_finds_the_model_and_reproduces_one_image(tmp_path, batch2_models, monkeypatch, capsys):
    monkeypatch.setenv("EASEL_MODELS", str(batch2_models))
    out, again = tmp_path / "out", tmp_path / "again"
    assert main(["generate", "a red cat", "--model", "tiny-b2", "--seed", "5", "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-5.png", "00001-6.png"]  # the model's batch of 2
    # No --model: the PNG's Model / Model hash name the model; one image, the one that PNG holds.
    assert main(["generate", "--from", str(out / "00001-6.png"), "--out", str(again)]) == 0
    assert "model from the image: tiny-b2" in capsys.readouterr().err
    assert [p.name for p in again.glob("*.png")] == ["00000-6.png"]
    diff = np.abs(np.asarray(Image.open(again / "00000-6.png")).astype(int) -
                  np.asarray(Image.open(out / "00001-6.png")).astype(int))
    assert diff.max() <= 2  # alone rather than second of a batch: float summation order only


def test_from_finds_an_a1111_model_by_hash(tmp_path, batch2_models, monkeypatch):
    from easel.cli import model_of_image
    from easel.weights.load import file_hash
    monkeypatch.setenv("EASEL_MODELS", str(batch2_models))
    model = batch2_models / "tiny-b2.safetensors"
    # A1111 names the file as it was called on its machine: the hash still finds it.
    assert model_of_image({"model": "renamed", "model_hash": file_hash(model)}) == str(model)


def test_from_warns_naming_a_model_it_cannot_find(tmp_path, monkeypatch, caplog):
    from easel.cli import model_of_image
    monkeypatch.setenv("EASEL_MODELS", str(tmp_path))
    with caplog.at_level("WARNING", logger="easel"):
        assert model_of_image({"model": "sd_xl_base_1.0", "model_hash": "31e35c80fc"}) is None
    assert "'sd_xl_base_1.0' [31e35c80fc]" in caplog.text and "--model" in caplog.text


def _a1111_png(path, text):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_from_keeps_ensd_and_warns_when_it_matters(tmp_path, caplog):
    from easel.cli import build_parser, from_image_fields, request_from_args
    png = _a1111_png(tmp_path / "a.png", "x\nSteps: 3, Sampler: Euler a, Seed: 1, Size: 32x32, ENSD: 31337")
    args = build_parser().parse_args(["generate", "--from", str(png)])
    with caplog.at_level("WARNING", logger="easel"):
        req = request_from_args(args, from_image_fields(args))
    assert req.extra == {"eta_noise_seed_delta": 31337} and (req.batch_size, req.n_iter) == (1, 1)
    assert "ENSD 31337" in caplog.text
    caplog.clear()
    args = build_parser().parse_args(["generate", "--from", str(png), "--sampler", "euler", "-n", "3"])
    with caplog.at_level("WARNING", logger="easel"):
        req = request_from_args(args, from_image_fields(args))
    assert caplog.text == "" and req.batch_size == 3  # a noiseless sampler: ENSD changes nothing; flags win


def test_a_sampler_flag_brings_its_own_schedule_over_the_image(tmp_path):
    from easel.cli import build_parser, from_image_fields, request_from_args
    png = _a1111_png(tmp_path / "a.png", "x\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1")
    args = build_parser().parse_args(["generate", "--from", str(png), "--sampler", "DPM++ 2M Exponential"])
    req = request_from_args(args, from_image_fields(args)).resolved(32, 1)
    assert (req.sampler, req.scheduler) == ("dpmpp_2m", "exponential")


@pytest.mark.parametrize("flags,expect", [
    (["--sampler", "Euler a", "--scheduler", "Karras"], "Sampler: Euler a, Schedule type: Karras"),
    (["--sampler", "DPM++ 2M", "--scheduler", "exponential"], "Schedule type: Exponential"),
    (["--sampler", "dpmpp_2m", "--hires", "--hr-upscaler", "Latent (bicubic)", "--hr-scale", "1.5", "--hr-steps", "1"],
     "Hires upscaler: Latent (bicubic)"),
])
def test_name_flags_take_every_name_the_resolver_takes(tmp_path, tiny_sd1_file, capsys, flags, expect):
    out = tmp_path / "out"
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--steps", "2", "--width", "16", "--height", "16",
                 "-n", "1", "--out", str(out), *flags]) == 0
    capsys.readouterr()
    assert main(["info", str(next(out.glob("*.png")))]) == 0
    assert expect in capsys.readouterr().out


def test_explicit_scheduler_is_never_silently_overridden(tmp_path, tiny_sd1_file, capsys):
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--sampler", "DPM++ 2M Karras", "--scheduler",
                 "exponential", "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "easel: error:" in err and "karras" in err and "exponential" in err


def _all_actions(parser, path=()):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_actions(sub, path + (name,))
        else:
            yield path, action


def test_help_says_each_default_once():
    from easel.cli import build_parser
    twice = [(" ".join(path), a.dest) for path, a in _all_actions(build_parser())
             if a.help and a.help.lower().count("(default") > 1]
    assert twice == []


def test_debug_shows_the_traceback(tmp_path, tiny_sd1_file, monkeypatch):
    args = ["generate", "x", "--width", "30", "--model", str(tiny_sd1_file), "--out", str(tmp_path)]
    assert main(args) == 2
    with pytest.raises(ValueError, match="multiple of 8"):
        main(["--debug", *args])
    monkeypatch.setenv("EASEL_DEBUG", "1")
    with pytest.raises(ValueError, match="multiple of 8"):
        main(args)


@pytest.mark.parametrize("error,match", [(MemoryError(), "out of memory"),
                                         (PermissionError(13, "Permission denied", "/x/out"),
                                          "Permission denied: /x/out"),
                                         (OSError(28, "No space left on device"), "no space left on the disk")])
def test_known_errors_are_one_line(monkeypatch, capsys, error, match):
    import easel.cli as cli

    def fail(args):
        raise error
    monkeypatch.setattr(cli, "cmd_samplers", fail)
    assert main(["samplers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and match in err and "Traceback" not in err and err.count("\n") == 1
