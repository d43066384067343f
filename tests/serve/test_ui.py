"""The web UI's server side (no browser): the page and its files, the form's config, PNG info, infotexts,
and static checks that the page's scripts, HTML and the request schema agree."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from easel import __version__
from easel.pipelines.metadata import infotext
from easel.pipelines.request import INPAINTING_FILLS, GenerationRequest
from easel.serve import ui
from easel.serve.app import Settings, create_app
from easel.serve.jobs import JobQueue
from easel.serve.preview import to_png

HTML = (ui.STATIC_DIR / "index.html").read_text()
SCRIPTS = {name: (ui.STATIC_DIR / name).read_text() for name in ui.ASSETS if name.endswith(".js")}
PARAMS = {"mode": "txt2img", "prompt": "a red star", "negative_prompt": "blue", "steps": 7, "sampler": "euler_a",
          "scheduler": "karras", "sampler_label": "Euler a", "scheduler_label": "Karras", "cfg_scale": 6.5,
          "seed": 42, "width": 64, "height": 64, "clip_skip": 1, "eta": None, "model": "shapeworld",
          "model_hash": "abc", "dtype": "fp32"}


class _Result:
    def __init__(self, image, params):
        self.image, self.params = image, params


class FakePipeline:
    """Returns one 8x8 image per request with the request's prompt in its parameters."""

    def generate(self, req, callback=None):
        return [_Result(Image.new("RGB", (8, 8)), dict(PARAMS, prompt=req.prompt))]


@pytest.fixture
def client():
    queue = JobQueue(loader=lambda name, device: FakePipeline())
    with TestClient(create_app(Settings(max_steps=42), queue)) as c:
        yield c


def png_bytes(text: dict[str, str] | None = None, fmt: str = "PNG", **save) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), "red").save(buf, format=fmt, **({"pnginfo": info} if fmt == "PNG" else save))
    return buf.getvalue()


def test_page_and_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for tab in ("txt2img", "img2img", "Inpaint", "Outpaint", "PNG info"):
        assert f">{tab}</button>" in r.text
    assert f'src="/ui/ui.js?v={__version__}"' in r.text
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', r.text).group(1))["imports"]
    assert imports["/ui/form.js"] == f"/ui/form.js?v={__version__}"
    for name, kind in ui.ASSETS.items():
        f = client.get(f"/ui/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind), name
    for bad in ("nothing.js", "index.html", "..%2Fui.py", "%2e%2e%2fapp.py"):
        assert client.get(f"/ui/{bad}").status_code == 404, bad  # a fixed list: nothing else leaves the folder


def test_token_reaches_every_file_the_page_loads():
    with TestClient(create_app(Settings(token="s3cret"), JobQueue(loader=lambda n, d: FakePipeline()))) as c:
        assert c.get("/").status_code == 401
        page = c.get("/?token=s3cret").text
        query = f"v={__version__}&token=s3cret"
        assert f'href="/ui/ui.css?{query.replace("&", "&amp;")}"' in page
        imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', page).group(1))["imports"]
        assert set(imports.values()) == {f"/ui/{n}?{query}" for n in SCRIPTS}
        assert c.get(imports["/ui/form.js"]).status_code == 200


def test_config_comes_from_the_schema_and_the_model_file(client):
    cfg = client.get("/ui/config.json").json()
    defaults = GenerationRequest()
    assert cfg["defaults"]["steps"] == defaults.steps and cfg["defaults"]["sampler"] == defaults.sampler
    assert not {"dtype", "device", "init_images", "mask", "extra"} & set(cfg["defaults"])
    assert cfg["choices"]["inpainting_fill"] == list(INPAINTING_FILLS) and "original" in INPAINTING_FILLS
    assert cfg["model"] == {"name": "shapeworld", "default_size": 64, "default_batch": 4}  # the built-in's header
    assert cfg["limits"]["max_steps"] == 42 and cfg["version"] == __version__


def test_model_defaults_of_unknown_models_are_left_to_the_server(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"not read")
    assert ui.model_defaults(str(tmp_path / "m.ckpt"))["default_size"] is None
    assert ui.model_defaults("no-such-model") == {"name": "no-such-model", "default_size": None, "default_batch": None}


def test_png_info_of_an_easel_image(client):
    r = client.post("/ui/png-info", content=to_png(Image.new("RGB", (64, 64)), PARAMS))
    info = r.json()
    assert r.status_code == 200 and info["parameters"] == infotext(PARAMS)
    assert info["easel"] == json.loads(json.dumps(PARAMS))
    assert info["request"]["prompt"] == "a red star" and info["request"]["seed"] == 42
    assert "sampler_label" not in info["request"] and "model_hash" not in info["request"]  # only request fields
    GenerationRequest.from_dict(info["request"]).check()  # the fields make a valid request as they are
    assert (info["width"], info["height"], info["format"]) == (64, 64, "PNG")


A1111_TEXT = ("a cat, best quality\nNegative prompt: dog\nSteps: 12, Sampler: Euler a, Schedule type: Karras, "
              "CFG scale: 6, Seed: 5, Size: 512x768, Model: something")


def test_png_info_of_an_a1111_png(client):
    info = client.post("/ui/png-info", content=png_bytes({"parameters": A1111_TEXT, "Software": "x"})).json()
    assert info["parameters"] == A1111_TEXT and info["easel"] is None and info["other"] == {"Software": "x"}
    req = info["request"]
    assert req["prompt"] == "a cat, best quality" and req["negative_prompt"] == "dog"
    assert (req["steps"], req["seed"], req["cfg_scale"], req["width"], req["height"]) == (12, 5, 6.0, 512, 768)
    assert req["sampler"] == "euler_a" and req["scheduler"] == "karras"  # labels become the form's names


@pytest.mark.parametrize("order", ["utf-16-be", "utf-16-le"])
def test_png_info_of_an_a1111_jpeg(client, order):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_TEXT.encode(order)
    info = client.post("/ui/png-info", content=png_bytes(fmt="JPEG", exif=exif.tobytes())).json()
    assert info["format"] == "JPEG" and info["parameters"] == A1111_TEXT and info["request"]["seed"] == 5


def test_png_info_errors_say_what_is_wrong(client):
    assert client.post("/ui/png-info", content=png_bytes()).json()["parameters"] is None  # no text: not an error
    r = client.post("/ui/png-info", content=b"hello")
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    r = client.post("/ui/png-info", content=b"")
    assert r.status_code == 400 and "no image received" in r.json()["error"]


def test_infotexts_of_a_job(client):
    job = client.post("/api/v1/jobs", json={"prompt": "a blue square", "steps": 2}).json()
    deadline = time.monotonic() + 10
    while client.get(f"/api/v1/jobs/{job['id']}").json()["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = client.get(f"/ui/jobs/{job['id']}/infotext").json()
    assert r["infotexts"] == [infotext(dict(PARAMS, prompt="a blue square"))]
    assert client.get("/ui/jobs/nope/infotext").status_code == 404


# -- static checks: the HTML, the scripts and the request schema agree ---------------------------------------
def html_ids() -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', HTML))


def test_every_element_a_script_looks_up_exists():
    used = {m for src in SCRIPTS.values() for m in re.findall(r'\$\("([\w-]+)"\)', src)}
    templated = {f"send-{t}" for t in ("img2img", "inpaint", "outpaint")} | \
                {f"pnginfo-{t}" for t in ("txt2img", "img2img", "inpaint")} | \
                {f"outpaint_{s}" for s in ("left", "right", "up", "down")}
    assert len(used) > 40
    assert not (used | templated) - html_ids()
    assert len(re.findall(r'\sid="', HTML)) == len(html_ids())  # ids are unique


def test_every_import_between_scripts_exists():
    for name, src in SCRIPTS.items():
        for names, module in re.findall(r"import \{([^}]*)\} from \"\./([\w.]+)\"", src):
            assert module in SCRIPTS, f"{name} imports {module}, which the server does not serve"
            exported = set(re.findall(r"export (?:async )?(?:function|const) ([\w$]+)", SCRIPTS[module]))
            missing = {n.strip() for n in names.split(",") if n.strip()} - exported
            assert not missing, f"{name} imports {missing} from {module}, which does not export them"


def test_form_fields_are_request_fields():
    fields = dict(re.findall(r'id="([\w-]+)" data-field="(\w+)"', HTML))
    assert all(k == v for k, v in fields.items())  # the id is the field name (the scripts rely on it)
    schema = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert set(fields.values()) <= schema
    wanted = {"prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale", "seed", "width", "height",
              "batch_size", "n_iter", "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler",
              "hr_second_pass_steps", "hr_denoising_strength", "mask_blur", "inpainting_fill", "outpaint_left",
              "outpaint_right", "outpaint_up", "outpaint_down", "subseed", "subseed_strength", "preview_every"}
    assert wanted <= set(fields.values())
    assert len(re.findall(r"data-field=", HTML)) == len(fields)  # every data-field sits on an element with that id
