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


# -- the one reader: read_image_params / read_image_metadata -------------------------------------------------------

import io  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
from PIL import PngImagePlugin  # noqa: E402

from easel.pipelines.metadata import (  # noqa: E402
    infotext_fields, open_image, read_image_metadata, read_image_params)

A1111_TEXT = ("a cat\nNegative prompt: ugly\nSteps: 12, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, "
              "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned, ENSD: 31337, Version: v1.10.1")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int, bit_depth: int = 8, color: int = 2, text: bytes = b"") -> bytes:
    """A PNG whose header announces width x height, with a tiny (truncated) IDAT: what an attacker sends."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    extra = _chunk(b"tEXt", b"parameters\0" + text) if text else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height,bit_depth,color", [(30000, 30000, 1, 0), (13000, 13000, 8, 2)])
def test_huge_png_refused_from_its_header(width, height, bit_depth, color):
    data = _png_header(width, height, bit_depth, color, text=A1111_TEXT.encode())
    for read in (read_image_params, read_image_metadata, open_image):
        with pytest.raises(ValueError, match=f"{width}x{height}.*over the limit"):
            read(data)
    # A caller with a larger limit (the server's --max-pixels) reads the text, still without decoding the pixels.
    assert read_image_params(data, max_pixels=None)["steps"] == 12


def test_pil_bomb_limit_is_a_clear_error_for_other_formats():
    # A header PIL itself refuses (over 2 x Image.MAX_IMAGE_PIXELS) must still be one ValueError, not a traceback.
    data = _png_header(30000, 30000, 1, 0)
    with pytest.raises(ValueError, match="too large|over the limit"):
        open_image(data, max_pixels=None)


def test_reads_text_after_the_pixels_and_ztxt():
    # A1111/PIL write text before IDAT, but other tools after it: found without decoding (im.text would decode).
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    raw = buf.getvalue()
    iend = raw.rindex(b"IEND") - 4
    ztxt = _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(A1111_TEXT.encode()))
    meta = read_image_metadata(raw[:iend] + ztxt + raw[iend:])
    assert meta["parameters"] == A1111_TEXT and (meta["width"], meta["format"]) == (8, "PNG")


def test_ztxt_bomb_is_skipped_not_inflated():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    raw = buf.getvalue()
    bomb = _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * (64 << 20)))  # 64 MB of text in ~64 KB
    iend = raw.rindex(b"IEND") - 4
    assert read_image_metadata(raw[:iend] + bomb + raw[iend:])["parameters"] is None


def test_easel_json_wins_and_paths_bytes_files_agree(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", PARAMS)
    assert read_image_params(path) == read_image_params(str(path)) == read_image_params(path.read_bytes()) == PARAMS
    assert read_image_params(io.BytesIO(path.read_bytes())) == PARAMS


def test_a1111_text_becomes_request_fields():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    p = read_image_params(buf.getvalue())
    assert (p["prompt"], p["negative_prompt"], p["steps"], p["cfg_scale"], p["seed"]) == ("a cat", "ugly", 12, 5.5, 7)
    assert (p["width"], p["height"], p["sampler"], p["scheduler"]) == (512, 768, "dpmpp_2m", "karras")
    assert (p["model"], p["model_hash"]) == ("v1-5-pruned", "6ce0161689")
    assert p["extra"] == {"eta_noise_seed_delta": 31337}  # kept, never dropped silently


def test_schedule_type_beats_the_label_schedule_and_hires_labels_resolve():
    p = infotext_fields("x\nSteps: 4, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Denoising strength: 0.4, "
                        "Hires upscale: 2, Hires upscaler: Latent (bicubic)")
    assert (p["sampler"], p["scheduler"]) == ("dpmpp_2m", "exponential")
    assert (p["enable_hr"], p["hr_upscaler"], p["hr_denoising_strength"]) == (True, "latent-bicubic", 0.4)
    assert "denoising_strength" not in p


def test_jpeg_exif_user_comment():
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", exif=exif)
    meta = read_image_metadata(buf.getvalue())
    assert meta["format"] == "JPEG" and meta["parameters"] == A1111_TEXT
    assert read_image_params(buf.getvalue())["steps"] == 12


@pytest.mark.parametrize("data,match", [(b"", "empty"), (b"not an image", "not an image"),
                                        (b"\x89PNG\r\n\x1a\n\0\0", "not a valid PNG")])
def test_bad_bytes_are_clear_errors(data, match):
    with pytest.raises(ValueError, match=match):
        read_image_metadata(data)


def test_malformed_value_is_a_clear_error():
    with pytest.raises(ValueError, match="malformed value"):
        infotext_fields("x\nSteps: many, Seed: 1")


def test_ti_hashes_written_like_a1111():
    text = infotext(dict(PARAMS, ti_hashes={"bad-hands": "a1b2c3d4e5f6", "style": "0011223344ff"},
                         lora_hashes={"lcm": "ffee"}))
    assert 'Lora hashes: "lcm: ffee", TI hashes: "bad-hands: a1b2c3d4e5f6, style: 0011223344ff"' in text
    assert parse_infotext(text)["TI hashes"] == "bad-hands: a1b2c3d4e5f6, style: 0011223344ff"


def test_edit_options_read_back_from_infotext():
    params = dict(PARAMS, mode="outpaint", mask_blur=3, inpainting_fill="latent_noise", inpaint_full_res=True,
                  inpaint_full_res_padding=16, inpainting_mask_invert=True, outpaint_left=16, outpaint_up=8,
                  denoising_strength=0.6)
    p = infotext_fields(infotext(params))
    assert (p["mask_blur"], p["inpainting_fill"], p["inpaint_full_res"], p["inpaint_full_res_padding"]) == \
        (3, "latent_noise", True, 16)
    assert (p["inpainting_mask_invert"], p["outpaint_left"], p["outpaint_up"], p["denoising_strength"]) == \
        (True, 16, 8, 0.6)
