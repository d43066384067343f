"""A1111's Extras over HTTP (issue 13): /sdapi/v1/extra-single-image and /extra-batch-images run as jobs on the
queue, upscalers named from the server's folders only (never paths), outputs over max_pixels or max_memory a 413
before anything runs; a random-weight Real-ESRGAN compact 2x file and Lanczos on small images."""
from __future__ import annotations

import importlib.util

import httpx
import pytest
from PIL import Image

from easel.serve.app import Settings
from tests.serve.test_a1111 import b64_png, decode

needs_spandrel = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None, reason="spandrel is not installed")


def picture(w: int = 20, h: int = 12) -> Image.Image:
    im = Image.new("RGB", (w, h), "navy")
    im.paste((250, 200, 0), (4, 3, w // 2, h - 2))
    return im


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A model folder with upscalers/RealESRGAN_x2plus.safetensors (a random-weight compact 2x network)."""
    root = tmp_path / "models"
    if importlib.util.find_spec("spandrel") is not None:
        from tests.test_upscale import arch, write_safetensors
        write_safetensors(arch("compact", 2), root / "upscalers" / "RealESRGAN_x2plus.safetensors")
    monkeypatch.setenv("EASEL_MODELS", str(root))
    return root


@pytest.fixture
def server(start_server, models):
    return start_server(Settings(max_queue=4, max_pixels=96 * 96, max_input_pixels=64 * 64,
                                 max_memory_bytes=2**30))


def test_extra_single_image_runs_as_a_job(client, server):
    before = len(server.queue.jobs())
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(picture()), "upscaler_1": "Lanczos",
                                                          "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    out = decode(r.json()["image"])
    assert out.size == (60, 36) and r.json()["html_info"].startswith("Postprocess upscale by: 3")
    assert out.tobytes() == picture().resize((60, 36), Image.LANCZOS).tobytes()
    jobs = server.queue.jobs()
    assert len(jobs) == before + 1 and jobs[-1].state == "done" and jobs[-1].task.to_dict()["kind"] == "extras"
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(picture()), "resize_mode": 1,
                                                          "upscaling_resize_w": 30, "upscaling_resize_h": 30,
                                                          "upscaler_1": "nearest"})
    assert r.status_code == 200 and decode(r.json()["image"]).size == (30, 30)


@needs_spandrel
def test_extras_with_an_upscaler_file_by_a1111_label_and_batch(client):
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64_png(picture()), "name": "a"}, {"data": b64_png(picture(10, 10)), "name": "b"}],
        "upscaler_1": "R-ESRGAN 2x+", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    assert [decode(b).size for b in r.json()["images"]] == [(40, 24), (20, 20)]
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "R-ESRGAN 2x+" in names


def test_upscaler_list_has_no_server_paths(client, models):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert listed[:3] and all(u["model_path"] is None for u in listed) and str(models) not in str(listed)


@pytest.mark.parametrize("fields, status, what", [
    ({"upscaler_1": "/etc/passwd"}, 400, "never a path"),
    ({"upscaler_1": "../upscalers/RealESRGAN_x2plus.safetensors"}, 400, "never a path"),
    ({"upscaler_1": "4x-Nothing"}, 400, "not one of this server's upscalers"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 10}, 413, "max_pixels"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 4000, "upscaling_resize_h": 4000}, 413,
     "max_pixels"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": -1}, 400, "upscaling_resize must be positive"),
    ({"upscaler_1": "Lanczos", "resize_mode": 3}, 400, "resize_mode must be 0"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 1}, 400, "face restoration"),
    ({"upscaler_1": "Lanczos", "image": b64_png(picture(100, 100))}, 400, "max_input_pixels"),
    ({"upscaler_1": "Lanczos", "image": "not base64!"}, 400, "image is not base64"),
])
def test_extras_errors_before_anything_is_queued(client, server, fields, status, what):
    before = len(server.queue.jobs())
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(picture()), **fields})
    assert r.status_code == status and what in r.text, r.text
    assert len(server.queue.jobs()) == before


def test_extras_memory_limit_is_a_413(start_server, models):
    server = start_server(Settings(max_pixels=2048 * 2048, max_memory_bytes=10**6))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/sdapi/v1/extra-single-image", json={"image": b64_png(picture()), "upscaler_1": "Lanczos",
                                                         "upscaling_resize": 20})
    assert r.status_code == 413 and r.json()["limit"] == "max_memory" and "max_memory" in r.json()["error"]


def test_hires_upscaler_paths_refused(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "steps": 1, "enable_hr": True,
                                               "hr_upscaler": "/tmp/x/RealESRGAN_x2plus.safetensors"})
    assert r.status_code == 400 and "never a path" in r.json()["error"]
    r = client.post("/api/v1/jobs", json={"prompt": "a star", "steps": 1, "enable_hr": True,
                                          "hr_upscaler": "../RealESRGAN_x2plus.safetensors"})
    assert r.status_code == 400 and "never a path" in r.json()["error"]


def test_openapi_lists_the_extras_routes(client):
    doc = client.get("/openapi.json").json()
    assert {"/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images"} <= set(doc["paths"])
    assert "413" in doc["paths"]["/sdapi/v1/extra-single-image"]["post"]["responses"]
