"""PNG parameters: A1111 text chunk and JSON, both ways."""
from PIL import Image

from easel.pipelines.metadata import infotext, parse_infotext, read_png_params, save_png

PARAMS = {"prompt": "a red star, (blue:1.2)", "negative_prompt": "blurry", "steps": 20, "sampler_label": "DPM++ 2M",
          "scheduler_label": "Karras", "cfg_scale": 7.0, "seed": 42, "width": 64, "height": 48,
          "model_hash": "abcdef0123", "model": "tiny", "clip_skip": 2}


def test_infotext_has_a1111_shape():
    text = infotext(PARAMS)
    lines = text.split("\n")
    assert lines[0] == "a red star, (blue:1.2)"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, "
                               "Size: 64x48, Model hash: abcdef0123, Model: tiny, Clip skip: 2")


def test_parse_roundtrip_and_a1111_text():
    parsed = parse_infotext(infotext(PARAMS))
    assert parsed["prompt"] == PARAMS["prompt"] and parsed["negative_prompt"] == "blurry"
    assert parsed["Steps"] == "20" and parsed["Size"] == "64x48" and parsed["Seed"] == "42"
    a1111 = ('masterpiece, cat\nwith a hat\nNegative prompt: ugly\nSteps: 30, Sampler: Euler a, CFG scale: 5.5, '
             'Seed: 7, Size: 512x768, Model hash: 6ce0161689, Lora hashes: "a: 1, b: 2", Version: v1.10.1')
    p = parse_infotext(a1111)
    assert p["prompt"] == "masterpiece, cat\nwith a hat" and p["negative_prompt"] == "ugly"
    assert p["Sampler"] == "Euler a" and p["CFG scale"] == "5.5" and p["Lora hashes"] == "a: 1, b: 2"
    assert parse_infotext("just a prompt")["prompt"] == "just a prompt"


def test_png_carries_both_chunks(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", PARAMS)
    stored = read_png_params(path)
    assert stored["easel"] == PARAMS
    assert stored["parameters"].startswith("a red star")
