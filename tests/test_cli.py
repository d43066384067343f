"""The `easel` command line, run in-process on a tiny single-file model."""
import json

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
    (["info", "/nonexistent.png"], "not a readable image"),
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
