"""The web UI's ControlNet panel and styles (issue 13): the native list routes and POST /api/v1/preprocess through
a real server, then the panel in headless Chromium: open it, upload and draw control images, preview a
preprocessor, and submit a job with a random-weight ControlNet from a ControlNet folder under the models dir."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from easel.serve.app import Settings
from tests.serve.conftest import builtin_pipe

CN = "random-cn"
STYLES = 'name,prompt,negative_prompt\nSharp,"{prompt}, sharp focus",blurry\nPlain,,\n'


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sketch(size: int = 64) -> Image.Image:
    """Black blobs on white: canny finds their outlines."""
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).ellipse((10, 10, size - 20, size - 20), fill="black")
    return im


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models dir whose ControlNet/ folder holds one random-weight ControlNet for the built-in model."""
    from easel.pipelines.control_sheet import random_controlnet_file
    root = tmp_path_factory.mktemp("models")
    (root / "ControlNet").mkdir()
    random_controlnet_file(builtin_pipe().config, root / "ControlNet" / f"{CN}.safetensors")
    return root


@pytest.fixture
def server(start_server, models_dir, tmp_path, monkeypatch):
    """A server that finds the ControlNet through $EASEL_MODELS/ControlNet and has a styles.csv."""
    monkeypatch.setenv("EASEL_MODELS", str(models_dir))
    monkeypatch.delenv("EASEL_CONTROLNETS", raising=False)
    styles = tmp_path / "styles.csv"
    styles.write_text(STYLES)
    monkeypatch.setenv("EASEL_STYLES", str(styles))
    return start_server(Settings(max_queue=4, max_pixels=64 * 64, max_input_pixels=128 * 128))


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_lists_give_names_never_paths(client, models_dir):
    r = client.get("/api/v1/controlnets")
    assert r.status_code == 200 and r.json() == [{"name": CN}, {"name": "shapeworld-layout"}]  # then the built-in's
    assert str(models_dir) not in r.text
    pres = {p["name"]: p for p in client.get("/api/v1/preprocessors").json()}
    assert pres["canny"]["threshold_a"] == 100 and pres["canny"]["threshold_b"] == 200
    assert pres["inpaint"]["needs_mask"] and "scribble_xdog" in pres["scribble"]["aliases"]
    assert "depth" not in pres  # needs weights easel does not ship
    assert client.get("/api/v1/styles").json() == [
        {"name": "Sharp", "prompt": "{prompt}, sharp focus", "negative_prompt": "blurry"},
        {"name": "Plain", "prompt": "", "negative_prompt": ""}]
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/api/v1/controlnets", "/api/v1/preprocessors", "/api/v1/preprocess", "/api/v1/styles"):
        assert route in paths


def test_preprocess_returns_the_hint(client):
    from easel.pipelines.control_pre import hint_image, preprocess
    r = client.post("/api/v1/preprocess", json={"image": "data:image/png;base64," + png_b64(sketch()),
                                                "preprocessor": "canny", "threshold_a": 50})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["preprocessor"], out["width"], out["height"]) == ("canny", 64, 64)
    got = Image.open(io.BytesIO(base64.b64decode(out["image"])))
    assert got.convert("RGB").tobytes() == hint_image(preprocess("canny", sketch(), 50, None)).tobytes()
    assert 0 < (np.asarray(got.convert("L")) > 128).mean() < 0.25  # outlines, not a flat picture
    alias = client.post("/api/v1/preprocess", json={"image": png_b64(sketch()), "preprocessor": "binary"}).json()
    assert alias["preprocessor"] == "threshold"


@pytest.mark.parametrize("body, status, words", [
    ({"image": "", "preprocessor": "canny"}, 400, "image is empty"),
    ({"image": "not base64!", "preprocessor": "canny"}, 400, "not base64"),
    ({"image": base64.b64encode(b"hello").decode(), "preprocessor": "canny"}, 400, "image"),
    ({"image": "SMALL", "preprocessor": "depth"}, 400, "dpt_hybrid"),
    ({"image": "SMALL", "preprocessor": "nope"}, 400, "unknown preprocessor"),
    ({"image": "SMALL", "preprocessor": "inpaint"}, 400, "needs a mask"),
    ({"image": "BIG", "preprocessor": "canny"}, 400, "max_input_pixels"),
    ({"preprocessor": "canny"}, 422, "image"),
])
def test_preprocess_errors_are_4xx_naming_the_problem(client, body, status, words):
    images = {"SMALL": png_b64(sketch(32)), "BIG": png_b64(Image.new("1", (200, 200)))}  # 40000 > 64*64 pixels
    body = {k: images.get(v, v) for k, v in body.items()}
    r = client.post("/api/v1/preprocess", json=body)
    assert r.status_code == status, r.text
    assert words in r.text


def test_styles_list_is_empty_without_a_styles_file(start_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./styles.csv
    monkeypatch.delenv("EASEL_STYLES", raising=False)
    with httpx.Client(base_url=start_server().url) as c:
        assert c.get("/api/v1/styles").json() == []
        assert "/" not in "".join(e["name"] for e in c.get("/api/v1/controlnets").json())  # names only


# -- the panel in a real browser ---------------------------------------------------------------------------------
def _browser_module():
    from tests.serve import test_ui_browser
    return test_ui_browser


@pytest.fixture(scope="module")
def browser():
    mod = pytest.importorskip("tests.serve.test_ui_browser")
    if mod.CHROMIUM is None:
        pytest.skip("no chromium found: `apt-get install chromium` (or set EASEL_CHROMIUM)")
    import os
    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with mod.sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=mod.CHROMIUM, args=args)
        yield b
        b.close()


@pytest.mark.slow
def test_panel_uploads_draws_previews_and_submits(browser, server, tmp_path):
    mod = _browser_module()
    context, page, errors = mod.open_ui(browser, server)
    try:
        assert page.is_visible("#styles-box")
        assert page.locator("#styles option").all_inner_texts() == ["Sharp", "Plain"]
        page.click("#controlnet > summary")
        assert page.is_visible("#cn-units") and page.is_hidden("#cn-none")
        assert page.locator("#cn0-model option").all_inner_texts() == [CN, "shapeworld-layout"]
        assert page.locator("#cn-units .cn-unit").count() == 3
        # unit 0: an uploaded sketch, canny, previewed
        path = tmp_path / "sketch.png"
        sketch().save(path)
        page.set_input_files("#cn0-file", str(path))
        page.wait_for_selector("#cn0-canvas:not([hidden])")
        page.check("#cn0-enabled")
        page.select_option("#cn0-preprocessor", "canny")
        assert page.get_attribute("#cn0-threshold_a", "placeholder") == "100"
        page.click("#cn0-preview")
        page.wait_for_selector("#cn0[data-previewed=canny]")
        assert page.evaluate("document.getElementById('cn0-hint').naturalWidth") == 64
        page.fill("#cn0-weight", "0.7")
        page.fill("#cn0-guidance_end", "0.8")
        page.select_option("#cn0-control_mode", "prompt")
        # unit 1: drawn white on black with the mouse
        page.click("#cn1 > summary")
        page.click("#cn1-draw")
        box = page.locator("#cn1-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
        page.mouse.up()
        lit = page.evaluate("(() => { const c = document.getElementById('cn1-canvas');"
                            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                            " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 200; return n / (d.length / 4); })()")
        assert 0.01 < lit < 0.5  # a white stroke on black
        page.check("#cn1-enabled")
        page.select_option("#cn1-resize_mode", "just_resize")
        page.select_option("#styles", ["Sharp"])
        page.fill("#prompt", "a red star")
        page.fill("#steps", "2")
        page.fill("#seed", "5")
        job_id = mod.generate(page)
        job = server.queue.get(job_id)
        assert job.state == "done", job.error
        assert job.request.styles == ["Sharp"]
        units = job.results[0].params["controlnet_units"]
        assert [u["model"] for u in units] == [CN, CN]
        assert units[0]["preprocessor"] == "canny" and units[0]["weight"] == 0.7
        assert units[0]["guidance_end"] == 0.8 and units[0]["control_mode"] == "prompt"
        assert units[1]["preprocessor"] == "none" and units[1]["resize_mode"] == "just_resize"
        # the panel comes back after a reload (settings and the images)
        mod.reload(page)
        assert page.is_checked("#cn0-enabled") and page.input_value("#cn0-weight") == "0.7"
        page.wait_for_selector("#cn1-canvas:not([hidden])")
        assert page.evaluate("[...document.getElementById('styles').selectedOptions].map(o => o.value)") == ["Sharp"]
        # an enabled unit without an image is refused in the page, naming the unit
        page.click("#cn2 > summary")
        page.check("#cn2-enabled")
        page.click("#generate")
        assert "ControlNet unit 2 needs a control image" in page.inner_text("#error")
    finally:
        context.close()
    assert not errors, f"the page reported errors: {errors}"


@pytest.mark.slow
def test_panel_says_where_to_put_controlnets(browser, start_server, tmp_path, monkeypatch):
    mod = _browser_module()
    monkeypatch.setenv("EASEL_MODELS", str(tmp_path))  # no ControlNet folder
    from easel.weights import controlnet_load
    monkeypatch.setattr(controlnet_load, "BUILTIN_CONTROLNETS", tmp_path / "none")  # an install without them
    monkeypatch.delenv("EASEL_CONTROLNETS", raising=False)
    monkeypatch.setenv("EASEL_STYLES", "")  # no styles file either
    monkeypatch.chdir(tmp_path)
    context, page, errors = mod.open_ui(browser, start_server())
    try:
        page.click("#controlnet > summary")
        if page.evaluate("fetch('/api/v1/controlnets').then(r => r.json()).then(l => l.length)"):
            pytest.skip("this machine has ControlNets in its default model folders")
        assert page.is_visible("#cn-none") and page.is_hidden("#cn-units")
        assert "models/ControlNet" in page.inner_text("#cn-none")
        assert page.is_hidden("#styles-box")
    finally:
        context.close()
    assert not errors, f"the page reported errors: {errors}"
