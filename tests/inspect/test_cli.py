"""`easel inspect attention|tokens|steps` on the built-in model (64 px, two steps: fast)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from easel.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red star above a blue circle"
FAST = ["--steps", "2", "--seed", "7", "--sampler", "euler"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))


def test_attention_folder_has_the_generated_image_and_a_map_per_token(tmp_path, capsys):
    gen, out = tmp_path / "gen", tmp_path / "attn"
    assert main(["generate", PROMPT, "-n", "1", *FAST, "-o", str(gen)]) == 0
    assert main(["inspect", "attention", PROMPT, *FAST, "-o", str(out)]) == 0
    generated = np.asarray(Image.open(next(gen.glob("*.png"))))
    assert np.array_equal(np.asarray(Image.open(out / "image.png")), generated)  # the same image, bit for bit
    with np.load(out / "attention.npz") as npz:
        maps = {k: npz[k] for k in npz.files}
    assert "2:red" in maps and "7:circle" in maps and "0:<start>" in maps and "8:<end>" in maps
    assert len(maps) == 77 and maps["2:red"].shape == (16, 16)  # every slot, at the latent's resolution
    assert np.allclose(sum(maps.values()), 1.0, atol=1e-4)  # each position's attention over the slots sums to 1
    assert len(list((out / "tokens").glob("*.png"))) == 7
    assert sorted(p.name for p in (out / "words").glob("*.png"))[:3] == ["00-a.png", "01-red.png", "02-star.png"]
    assert Image.open(out / "attention.png").width > 256
    assert Image.open(out / "levels.png").height > 300  # the built-in UNet attends at two resolutions
    assert Image.open(out / "attention.gif").n_frames == 2  # one frame per step
    assert "attention.npz" in capsys.readouterr().out


def test_colour_words_attend_to_their_own_object(tmp_path):
    """On the built-in model the map of 'red' peaks on the red star and 'blue' on the blue circle."""
    out = tmp_path / "attn"
    assert main(["inspect", "attention", PROMPT, "--steps", "6", "--seed", "3", "-o", str(out)]) == 0
    img = np.asarray(Image.open(out / "image.png").convert("RGB")).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    assert red.sum() > 20 and blue.sum() > 20
    with np.load(out / "attention.npz") as npz:
        up = {k: np.asarray(Image.fromarray(npz[k]).resize(img.shape[1::-1], Image.BILINEAR)) for k in ("2:red",
                                                                                                       "6:blue")}
    assert up["2:red"][red].mean() > up["2:red"][blue].mean()
    assert up["6:blue"][blue].mean() > up["6:blue"][red].mean()


def test_tokens_prints_the_slots_and_draws_them(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["inspect", "tokens", "a (red:1.2) star BREAK a circle", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "<start>" in text and "<end>" in text and "1.20" in text and "..x" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["78", "1"] == lines[[n for n, w in enumerate(lines) if w[3:4] == ["a"]][1]][:2]  # chunk 2 at 77 + 1
    assert Image.open(out / "tokens.png").width > 400


def test_steps_writes_the_strip_the_cfg_parts_the_animation_and_the_schedule(tmp_path):
    out = tmp_path / "steps"
    assert main(["inspect", "steps", PROMPT, "--steps", "3", "--seed", "1", "-o", str(out), "--animation", "gif,webp"]) == 0
    for name in ("image.png", "steps.png", "cfg.png", "schedule.png", "steps.gif", "steps.webp"):
        assert (out / name).is_file(), name
    assert Image.open(out / "steps.gif").n_frames == 3 and Image.open(out / "steps.webp").n_frames == 3


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["inspect", "steps", PROMPT, "--frames", "1", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "easel: error: --frames must be at least 2 (got 1)"
    assert main(["inspect", "attention", PROMPT, "--animation", "gif,avi", "-o", str(tmp_path / "a")]) == 2
    assert "unknown animation format 'avi'; choose one of gif, webp, mp4" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["inspect", "attention", PROMPT, "--sampler", "nonsense", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("easel: error:") and "nonsense" in err and "\n" not in err


def test_steps_compares_schedules_and_guidance_scales(tmp_path):
    out = tmp_path / "steps"
    assert main(["inspect", "steps", PROMPT, *FAST, "--schedules", "karras,Exponential", "--cfg-scales", "1,5",
                 "-o", str(out)]) == 0
    assert Image.open(out / "schedules.png").width > 300
    assert Image.open(out / "cfg-scales.png").height > 2 * 160  # a row per scale


def test_bad_comparison_lists_are_one_line_errors(tmp_path, capsys):
    assert main(["inspect", "steps", PROMPT, "--cfg-scales", "1,x", "-o", str(tmp_path)]) == 2
    assert "--cfg-scales takes numbers separated by commas" in capsys.readouterr().err
    assert main(["inspect", "steps", PROMPT, *FAST, "--schedules", "karras,bogus", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and err.count("\n") == 1


def test_attention_of_an_empty_prompt_maps_start_end_and_padding(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["inspect", "attention", "", "--steps", "1", "-o", str(out)]) == 0
    with np.load(out / "attention.npz") as npz:
        assert npz.files[:3] == ["0:<start>", "1:<end>", "2:<pad>"] and len(npz.files) == 77
    assert not (out / "attention.gif").exists() and "attention.gif" not in capsys.readouterr().out


def test_self_query_draws_where_a_pixel_looks_and_checks_the_point(tmp_path, capsys):
    out = tmp_path / "self"
    assert main(["inspect", "attention", PROMPT, *FAST, "--self-query", "14,14", "-o", str(out)]) == 0
    assert Image.open(out / "self-attention.png").width > 300  # one panel per resolution
    assert main(["inspect", "attention", PROMPT, *FAST, "--self-query", "64,3", "-o", str(out)]) == 2
    assert "--self-query 64,3 lies outside the 64x64 image" in capsys.readouterr().err
    assert main(["inspect", "attention", PROMPT, "--self-query", "middle", "-o", str(out)]) == 2
    assert "--self-query takes X,Y in pixels" in capsys.readouterr().err
