"""ControlNet over HTTP (issue 13): sd-webui-controlnet's `alwayson_scripts.controlnet` and /controlnet routes, the
native API's `controlnets`, names never paths, the unit cap and the input pixel limit; the built-in model with a
random-weight ControlNet, 2 steps at 64 px."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from easel.serve.app import Settings
from tests.serve.conftest import builtin_pipe
from tests.serve.test_a1111 import b64_png, decode

FAST = {"prompt": "a red star above a blue circle", "steps": 2, "batch_size": 1, "seed": 3}
CN = "random-cn"


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """A folder holding one random-weight ControlNet for the built-in model (a name the server lists)."""
    from easel.pipelines.control_sheet import random_controlnet_file
    folder = tmp_path_factory.mktemp("controlnets")
    random_controlnet_file(builtin_pipe().config, folder / f"{CN}.safetensors")
    return folder


@pytest.fixture
def client(start_server, controlnet_dir, monkeypatch):
    monkeypatch.setenv("EASEL_CONTROLNETS", str(controlnet_dir))
    server = start_server(Settings(max_queue=4, max_input_pixels=128 * 128))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sketch(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).ellipse((10, 10, size - 20, size - 20), fill="black")
    return im


def unit(**kw) -> dict:
    return {"enabled": True, "model": CN, "module": "canny", "image": b64_png(sketch()), "weight": 1.0,
            "resize_mode": "Crop and Resize", "control_mode": "Balanced", "processor_res": 64, **kw}


def test_a1111_controlnet_unit_runs_and_is_recorded(client):
    body = {**FAST, "alwayson_scripts": {"controlnet": {"args": [unit(), {"enabled": False, "model": CN}]},
                                         "adetailer": {"args": [True]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "ControlNet 0: \"Module: canny, Model: random-cn" in info["infotexts"][0]
    assert "ControlNet 1" not in info["infotexts"][0]  # the disabled unit does not run
    assert info["unsupported"] == ["alwayson_scripts.adetailer"]
    plain = client.post("/sdapi/v1/txt2img", json=FAST)
    assert decode(r.json()["images"][0]).tobytes() != decode(plain.json()["images"][0]).tobytes()


def test_a1111_controlnet_refuses_paths_extra_units_and_huge_images(client, controlnet_dir):
    path = str(controlnet_dir / f"{CN}.safetensors")
    for model in (path, "/etc/shadow", "../random-cn", "nope"):
        args = [unit(model=model)]
        r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": args}}})
        assert r.status_code == 400 and "not one of this server's ControlNets" in r.json()["error"], r.text
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": [unit()] * 5}}})
    assert r.status_code == 400 and r.json()["limit"] == "max_controlnets", r.text
    big = [unit(image=b64_png(sketch(200)))]
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": big}}})
    assert r.status_code == 400 and r.json()["limit"] == "max_input_pixels", r.text
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": "x"}}})
    assert r.status_code == 400 and "list" in r.json()["error"]


def test_native_controlnets_checked_like_a1111(client):
    good = {"model": f"{CN} [0123456789]", "image": b64_png(sketch()), "preprocessor": "canny", "weight": 0.5}
    r = client.post("/api/v1/jobs", json={**FAST, "controlnets": [good]})
    assert r.status_code == 202, r.text
    for bad, what in (({**good, "model": "/etc/passwd"}, "not one of this server's ControlNets"),
                      ({**good, "image": b64_png(sketch(200))}, "max_input_pixels"),
                      ({**good, "weight": 5}, "weight must be a number between 0 and 2"),
                      ({**good, "preprocessor": "depth"}, "dpt_hybrid")):
        r = client.post("/api/v1/jobs", json={**FAST, "controlnets": [bad]})
        assert r.status_code == 400 and what in r.text, r.text
    r = client.post("/api/v1/jobs", json={**FAST, "controlnets": [good] * 5})
    assert r.status_code == 400 and r.json()["limit"] == "max_controlnets"
    r = client.post("/api/v1/jobs", json={**FAST, "controlnets": [{**good, "colour": 1}]})
    assert r.status_code == 422 and "colour" in r.text


def test_controlnet_lists_and_detect(client, controlnet_dir):
    models = client.get("/controlnet/model_list").json()["model_list"]
    # The user's ControlNet, then the built-in model's own (shapeworld-layout), each with its hash, no paths.
    assert len(models) == 2 and models[0].startswith(f"{CN} [") and str(controlnet_dir) not in json.dumps(models)
    assert models[1].startswith("shapeworld-layout [")
    modules = client.get("/controlnet/module_list").json()
    assert {"none", "canny", "scribble", "binary", "scribble_xdog"} <= set(modules["module_list"])
    assert modules["module_detail"]["canny"]["sliders"][0]["value"] == 100
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                "controlnet_input_images": [b64_png(sketch(48))]})
    assert r.status_code == 200, r.text
    hint = decode(r.json()["images"][0])
    assert hint.size == (48, 48) and hint.convert("L").getextrema() == (0, 255)
    r = client.post("/controlnet/detect", json={"controlnet_module": "openpose",
                                                "controlnet_input_images": [b64_png(sketch())]})
    assert r.status_code == 400 and "body_pose_model.pth" in r.json()["error"]
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                "controlnet_input_images": [b64_png(sketch(200))]})
    assert r.status_code == 400 and r.json()["limit"] == "max_input_pixels"


def test_openapi_has_the_controlnet_shapes(client):
    doc = client.get("/openapi.json").json()
    assert {"/controlnet/model_list", "/controlnet/module_list", "/controlnet/detect"} <= set(doc["paths"])
    item = doc["components"]["schemas"]["JobBody"]["properties"]["controlnets"]["items"]
    assert item["$ref"].endswith("/ControlUnitBody")
    assert "guidance_end" in doc["components"]["schemas"]["ControlUnitBody"]["properties"]


def test_weight_zero_is_the_image_without_controlnet_and_img2img_uses_the_init_image(client):
    plain = client.post("/sdapi/v1/txt2img", json=FAST).json()["images"][0]
    zero = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": [
        unit(weight=0)]}}})
    assert zero.status_code == 200 and decode(zero.json()["images"][0]).tobytes() == decode(plain).tobytes()
    no_image = unit()
    del no_image["image"]
    body = {**FAST, "init_images": [b64_png(sketch())], "denoising_strength": 0.5,
            "alwayson_scripts": {"controlnet": {"args": [no_image]}}}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200 and "ControlNet 0" in json.loads(r.json()["info"])["infotexts"][0], r.text
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": [no_image]}}})
    assert r.status_code == 400 and "has no image" in r.json()["error"]


def test_native_controlnet_job_runs_and_records_its_unit(client):
    good = {"model": CN, "image": b64_png(sketch()), "preprocessor": "scribble_xdog", "weight": 0.7}
    job = client.post("/api/v1/jobs", json={**FAST, "controlnets": [good]}).json()
    for _ in range(600):
        done = client.get(f"/api/v1/jobs/{job['id']}").json()
        if done["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert done["state"] == "done", done
    params = done["params"][0]
    assert params["controlnet_units"][0]["model"] == CN and params["controlnet_units"][0]["weight"] == 0.7
    assert params["controlnet_infotext"]["ControlNet 0"].startswith("Module: scribble, Model: random-cn [")
