"""Hostile inputs over real HTTP: every one a clear 4xx (never a 500), nothing read outside the server's lists,
and the server still serving afterwards. Limits are tight (64x64) so that the walk-arounds of issue 9 show."""
from __future__ import annotations

import base64
import io
import json
import struct
import sys
import threading
import zlib

import httpx
import pytest
import torch
from PIL import Image

from easel.serve.app import Settings

LIMITS = Settings(max_pixels=64 * 64, max_steps=10, max_batch=4, max_body_bytes=2_000_000, max_input_pixels=64 * 64)
FAST = {"prompt": "a red star", "steps": 2, "seed": 1, "width": 64, "height": 64, "batch_size": 1}

# -- watching what the server opens ------------------------------------------------------------------------------

_OPENED: list[str] = []
_WATCH = threading.Event()


def _audit(event: str, args) -> None:
    if _WATCH.is_set() and event == "open" and args and isinstance(args[0], (str, bytes)):
        _OPENED.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only while a test watches


@pytest.fixture
def opened():
    """The paths opened (by any thread) while the test runs."""
    _OPENED.clear()
    _WATCH.set()
    yield _OPENED
    _WATCH.clear()


# -- images that lie ------------------------------------------------------------------------------------------------

def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def giant_1bit_png(side: int = 30000) -> str:
    """A valid 1-bit PNG header announcing side x side pixels, whose pixel data is a few bytes (a decoder would
    allocate side*side/8 bytes before noticing): what a 109 KB bomb looks like to a header check."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def truncated_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[:200]).decode()


@pytest.fixture
def server(start_server):
    return start_server(Settings(**{**LIMITS.__dict__}))


def still_serving(c: httpx.Client) -> None:
    r = c.post("/sdapi/v1/txt2img", json=FAST)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


# -- limits ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, limit", [
    ({"width": 4096, "height": None}, "max_pixels"),  # one side alone: the other is the model's, still counted
    ({"width": None, "height": 93060862263285616}, "max_pixels"),  # was a 500 asking for 5e18 bytes
    ({"enable_hr": True, "hr_scale": 16.0}, "max_pixels"),  # the second pass's size counts
    ({"enable_hr": True, "hr_scale": 1e300}, "max_pixels"),
    ({"enable_hr": True, "hr_resize_x": 10**12}, "max_pixels"),
    ({"seed_resize_from_w": 10**9, "seed_resize_from_h": 10**9}, "max_pixels"),
    ({"steps": 10**18}, "max_steps"),
    ({"batch_size": 1, "n_iter": 10**12}, "max_batch"),
])
def test_limits_count_what_runs_on_every_api(client, server, body, limit):
    r = client.post("/api/v1/jobs", json={**FAST, **body})  # null: the model's size
    assert r.status_code == 400 and r.json()["limit"] == limit, r.text
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **body})
    assert r.status_code == 400 and r.json()["limit"] == limit, r.text
    assert server.queue.jobs() == []


def test_mask_blur_absurd_ints_and_nan_are_4xx(client, server):
    image = png_b64(Image.new("RGB", (64, 64), (200, 10, 10)))
    r = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [image], "mask": image, "mask_blur": 2_000_000})
    assert r.status_code == 400 and r.json()["limit"] == "max_mask_blur"
    for field in ("cfg_scale", "denoising_strength", "hr_scale", "eta", "refiner_switch_at"):
        raw = json.dumps({**FAST, field: 1.0}).replace("1.0", "NaN")
        r = client.post("/api/v1/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and field in r.json()["error"], (field, r.text)
        raw = json.dumps({**FAST, field: 1.0}).replace("1.0", "Infinity")
        r = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (field, r.text)
    for body in ({"seed": 2**64}, {"subseed": 2**70}, {"clip_skip": 0}, {"n_iter": -(10**30)}, {"width": -8}):
        assert client.post("/api/v1/jobs", json={**FAST, **body}).status_code == 400, body
    assert server.queue.jobs() == []
    still_serving(client)


def test_unset_batch_counts_as_the_models_default(start_server):
    """--max-batch 4 on the built-in model (default batch 4): n_iter 2 without batch_size is 8 images."""
    server = start_server(Settings(max_batch=4, max_pixels=64 * 64))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"prompt": "x", "steps": 1, "n_iter": 2}
        # Before the model is loaded the server cannot know its default: the worker checks once it has it.
        job = c.post("/api/v1/jobs", json=body).json()
        server.queue.get(job["id"]).wait(60)
        done = c.get(f"/api/v1/jobs/{job['id']}").json()
        assert done["state"] == "failed" and "max_batch" in done["error"] and "8" in done["error"]
        assert c.get(f"/api/v1/jobs/{job['id']}/images/0.png").status_code == 400
        r = c.post("/api/v1/jobs", json=body)  # now it knows: refused at once
        assert r.status_code == 400 and (r.json()["limit"], r.json()["value"]) == ("max_batch", 8)
        assert c.post("/api/v1/jobs", json={**body, "n_iter": 1}).status_code == 202


@pytest.mark.parametrize("image, what", [
    (giant_1bit_png(), "max_input_pixels"), (truncated_png(), "truncated"), ("bm90IGFuIGltYWdl", "image"),
    ("%%%", "base64"), (png_b64(Image.new("RGB", (65, 64))), "max_input_pixels"),
])
def test_hostile_images_are_4xx_before_decoding(client, server, image, what):
    r = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [image]})
    assert r.status_code == 400 and what in r.text, r.text
    r = client.post("/api/v1/jobs", json={**FAST, "init_images": [image]})
    assert r.status_code == 400 and what in r.text, r.text
    r = client.post("/api/v1/jobs", json={**FAST, "init_images": [png_b64(Image.new("RGB", (64, 64)))],
                                          "mask": image})
    assert r.status_code == 400 and what in r.text, r.text
    if what != "truncated":  # png-info reads only the header and text chunks: a cut pixel stream does not matter
        r = client.post("/sdapi/v1/png-info", json={"image": image})
        assert r.status_code == 400, r.text
    assert server.queue.jobs() == []


def test_wrong_size_mask_and_odd_image_modes_run_or_are_4xx(client):
    image = png_b64(Image.new("RGB", (64, 64), (10, 10, 200)))
    for mask in (Image.new("L", (32, 48), 255), Image.new("1", (64, 64), 1), Image.new("RGBA", (8, 8))):
        r = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [image], "mask": png_b64(mask)})
        assert r.status_code in (200, 400), r.text
    for im in (Image.new("P", (64, 64)), Image.new("I;16", (64, 64)), Image.new("LA", (64, 64))):
        r = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [png_b64(im)]})
        assert r.status_code in (200, 400), r.text
    still_serving(client)


# -- names taken as paths -------------------------------------------------------------------------------------------

@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A file the server must never open, and LoRA / model folders that do not contain it."""
    secret = tmp_path / "secret" / "canary.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp_path / "loras").mkdir()
    monkeypatch.setenv("EASEL_LORA_DIRS", str(tmp_path / "loras"))
    return secret


def path_names(secret) -> list[str]:
    return [str(secret), str(secret.with_suffix("")), str(secret.parent / "missing.safetensors"),
            f"../../{secret.parent.name}/canary", "~/.bashrc", "/etc/shadow", "org/name", "..", "C:\\x\\y"]


def test_paths_in_every_name_field_are_refused_alike(client, server, canary, opened):
    seen = {}
    for name in path_names(canary):
        tag = f"a red star <lora:{name}:1>"
        answers = [
            client.post("/api/v1/jobs", json={**FAST, "prompt": tag}),
            client.post("/api/v1/jobs", json={**FAST, "loras": [f"{name}:0.5"]}),
            client.post("/api/v1/jobs", json={**FAST, "negative_prompt": tag}),
            client.post("/api/v1/jobs", json={**FAST, "refiner_checkpoint": name}),
            client.post("/api/v1/jobs", json={**FAST, "model": name}),
            client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": tag}),
            client.post("/sdapi/v1/txt2img", json={**FAST, "loras": [name]}),
            client.post("/sdapi/v1/txt2img", json={**FAST, "refiner_checkpoint": name}),
            client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": name}}),
            client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}),
            client.post("/v1/images/generations", json={"prompt": tag, "size": "64x64", "steps": 2}),
            client.post("/v1/images/generations", json={"prompt": "x", "model": name, "size": "64x64"}),
        ]
        for r in answers:
            assert r.status_code in (400, 404), (name, r.request.url, r.text)
            assert "unknown format" not in r.text.lower() and "cannot read" not in r.text.lower()
        seen[name] = [(r.status_code, r.text.replace(json.dumps(name)[1:-1], "NAME")) for r in answers]
    # A file that exists and one that does not get the same answers: they tell a client nothing about the disk.
    assert seen[str(canary)] == seen[str(canary.parent / "missing.safetensors")]
    assert not [p for p in opened if "secret" in p or p.endswith(".bashrc") or p == "/etc/shadow"]
    assert server.queue.jobs() == []
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] != str(canary)


def test_the_same_answer_whether_or_not_the_file_exists(client, canary):
    there, missing = str(canary), str(canary.parent / "missing.safetensors")
    for field in ("prompt", "loras"):
        answers = []
        for name in (there, missing):
            body = {**FAST, "prompt": f"x <lora:{name}:1>"} if field == "prompt" else {**FAST, "loras": [name]}
            r = client.post("/api/v1/jobs", json=body)
            answers.append((r.status_code, r.json()["error"].replace(name, "NAME")))
        assert answers[0] == answers[1]


def test_listed_names_still_work_and_embeddings_are_names(client, server, canary, opened, tmp_path, monkeypatch):
    (tmp_path / "emb").mkdir()
    monkeypatch.setenv("EASEL_EMBEDDING_DIRS", str(tmp_path / "emb"))
    r = client.post("/api/v1/jobs", json={**FAST, "prompt": f"a red star {canary} {canary.with_suffix('')}"})
    assert r.status_code == 202  # words that look like paths are words: embeddings are found by name only
    assert server.queue.get(r.json()["id"]).wait(60)
    assert server.queue.get(r.json()["id"]).state == "done"
    assert not [p for p in opened if "secret" in p]


# -- LoRA files that lie -------------------------------------------------------------------------------------------

def builtin_lora() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from easel.weights.lora import list_loras
    return load_file(next(e["path"] for e in list_loras() if e["name"] == "shapeworld-lcm"))


def test_bad_lora_files_in_the_lora_folder(client, server, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setenv("EASEL_LORA_DIRS", str(folder))
    sd = builtin_lora()
    save_file({k: torch.full_like(v, float("nan")) if "lora_up" in k else v for k, v in sd.items()},
              folder / "nan.safetensors")
    save_file({"model.diffusion_model.foo.weight": torch.zeros(4, 4)}, folder / "alien.safetensors")
    header = json.dumps({"x.lora_down.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}})
    (folder / "lying.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    (folder / "truncated.safetensors").write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\x7f{")
    (folder / "pickle.ckpt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    before = client.post("/sdapi/v1/txt2img", json=FAST).json()["images"][0]
    for name in ("alien", "lying", "truncated", "pickle"):
        r = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": f"a red star <lora:{name}:1>"})
        assert r.status_code == 400 and name in r.json()["error"], (name, r.text)
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a red star <lora:nan:1>"})
    assert r.status_code in (200, 400), r.text  # NaN weights: a clear error or an image, never a 500
    after = client.post("/sdapi/v1/txt2img", json=FAST).json()["images"][0]
    assert after == before  # the weights were put back: the next image is the same as before


def test_error_messages_do_not_tell_where_the_servers_files_are(tmp_path, monkeypatch):
    """A message that names a server folder (an upscaler not found lists the model folders) reaches a client with
    placeholders instead of the paths."""
    import os
    from easel.serve.jobs import describe_error
    from easel.serve.trust import hide_paths
    models = tmp_path / "srv" / "models"
    monkeypatch.setenv("EASEL_MODELS", str(models))
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "srv" / "cache"))
    text = (f"put files in {models}/ESRGAN or {tmp_path / 'srv' / 'cache'}/models/x, see {tmp_path / 'srv' / 'cache'}"
            f"/compiled, not {os.getcwd()}/x")
    hidden = hide_paths(text)
    assert str(tmp_path) not in hidden and os.getcwd() not in hidden
    assert "<model folder>/ESRGAN" in hidden and "<model folder>/x" in hidden and "<cache>/compiled" in hidden
    assert "<server folder>/x" in hidden
    assert str(tmp_path) not in describe_error(ValueError(text))
