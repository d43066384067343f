"""The web UI's server side (no browser): the page and its files, the form's config, PNG info, infotexts,
and static checks that the page's scripts, HTML and the request schema agree."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import time
import zlib

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

    def generate(self, req, callback=None, **hooks):
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


def test_token_stays_out_of_urls():
    """/?token=... answers with the token in an HttpOnly cookie, and no URL in the page carries it: the browser
    authenticates every asset, fetch, image and event stream with the cookie (URLs land in access logs)."""
    with TestClient(create_app(Settings(token="s3cret"), JobQueue(loader=lambda n, d: FakePipeline()))) as c:
        assert c.get("/").status_code == 401
        r = c.get("/?token=s3cret")
        assert r.status_code == 200 and "s3cret" not in r.text
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("easel_token=s3cret;") and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', r.text).group(1))["imports"]
        assert set(imports.values()) == {f"/ui/{n}?v={__version__}" for n in SCRIPTS}
        for url in [*imports.values(), "/ui/config.json", "/api/v1/jobs", "/"]:
            assert c.get(url).status_code == 200, url  # the cookie alone
        c.cookies.clear()
        assert c.get(imports["/ui/form.js"]).status_code == 401
        c.cookies.set("easel_token", "wrong")
        assert c.get("/ui/config.json").status_code == 401


def test_no_cookie_without_a_token(client):
    assert "set-cookie" not in client.get("/?token=anything").headers


def test_config_comes_from_the_schema_and_the_model_file(client):
    cfg = client.get("/ui/config.json").json()
    defaults = GenerationRequest()
    assert cfg["defaults"]["steps"] == defaults.steps and cfg["defaults"]["sampler"] == defaults.sampler
    assert not {"dtype", "device", "init_images", "mask", "extra"} & set(cfg["defaults"])
    assert cfg["choices"]["inpainting_fill"] == list(INPAINTING_FILLS) and "original" in INPAINTING_FILLS
    assert cfg["model"] == {"name": "shapeworld", "default_size": 64, "default_batch": 4}  # the built-in's header
    assert cfg["limits"]["max_steps"] == 42 and cfg["version"] == __version__
    assert {"done", "cancelled", "interrupted"} <= set(cfg["finished_states"])


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


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width x height (1 bit) but holds no pixels: what a reader must refuse before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_png_info_of_odd_files(client):
    """A JSON chunk that is not easel's own, and an image too large to ever decode: answers, never a 500."""
    info = client.post("/ui/png-info", content=png_bytes({"easel": json.dumps({"prompt": "only this"})})).json()
    assert info["easel"] == {"prompt": "only this"} and info["request"] == {"prompt": "only this"}
    r = client.post("/ui/png-info", content=png_header(30000, 30000))  # 900 MP announced: refused unread
    assert r.status_code == 400 and "30000" in r.json()["error"]


def test_png_info_errors_say_what_is_wrong(client):
    assert client.post("/ui/png-info", content=png_bytes()).json()["parameters"] is None  # no text: not an error
    r = client.post("/ui/png-info", content=b"hello")
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    r = client.post("/ui/png-info", content=b"")
    assert r.status_code == 400 and "no image received" in r.json()["error"]


def wait_finished(client, job_id: str) -> dict:
    deadline = time.monotonic() + 10
    while (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return job


def test_ui_jobs_list_what_a_reload_shows(client):
    """/ui/jobs: every job as the queue lists it; full=true (and /ui/jobs/{id}) adds the gallery's data."""
    ids = [client.post("/api/v1/jobs", json={"prompt": p, "steps": 2}).json()["id"] for p in ("one", "x" * 300)]
    for i in ids:
        wait_finished(client, i)
    rows = client.get("/ui/jobs").json()
    assert [r["id"] for r in rows] == ids and [r["state"] for r in rows] == ["done", "done"]
    assert rows[0]["prompt"] == "one" and len(rows[1]["prompt"]) == ui.PROMPT_CHARS  # a row, not the whole text
    assert rows[0]["mode"] == "txt2img" and rows[0]["n_images"] == 1 and "params" not in rows[0]
    full = client.get("/ui/jobs?full=true").json()[0]
    assert full["images"] == [f"/api/v1/jobs/{ids[0]}/images/0.png"]
    assert full["infotexts"] == [infotext(dict(PARAMS, prompt="one"))] and full["params"][0]["seed"] == 42
    assert client.get(f"/ui/jobs/{ids[0]}").json() == full
    assert full["infotexts"][0].startswith("one\nNegative prompt: blue\nSteps: 7, Sampler: Euler a")
    r = client.get("/ui/jobs/nope")
    assert r.status_code == 404 and "no job 'nope'" in r.json()["error"]


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
    schema = {f.name for f in dataclasses.fields(GenerationRequest)} | {"inspect"}  # inspect: a job option
    assert set(fields.values()) <= schema
    from easel.serve.schema import JobBody
    assert set(fields.values()) <= set(JobBody.model_fields)  # the page posts them to /api/v1/jobs
    wanted = {"prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale", "seed", "width", "height",
              "batch_size", "n_iter", "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler",
              "hr_second_pass_steps", "hr_denoising_strength", "mask_blur", "inpainting_fill", "outpaint_left",
              "outpaint_right", "outpaint_up", "outpaint_down", "subseed", "subseed_strength", "preview_every"}
    assert wanted <= set(fields.values())
    assert len(re.findall(r"data-field=", HTML)) == len(fields)  # every data-field sits on an element with that id


# -- WCAG AA contrast, computed from the colours in ui.css ---------------------------------------------------
def css_colours(scheme: str) -> dict[str, str]:
    """The --name: #rgb / #rrggbb variables of ui.css for a colour scheme (light overrides the dark defaults),
    as #rrggbb."""
    css = (ui.STATIC_DIR / "ui.css").read_text()

    def block(text: str) -> dict[str, str]:
        found = re.findall(r"--([\w-]+):\s*#([0-9a-fA-F]{6}|[0-9a-fA-F]{3})\b", text)
        return {name: "#" + (h if len(h) == 6 else "".join(c * 2 for c in h)) for name, h in found}

    light_at = css.index("@media (prefers-color-scheme: light)")
    colours = block(css[css.index(":root"):light_at])
    if scheme == "light":
        colours.update(block(css[light_at:css.index("}", light_at)]))
    return colours


def luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of #rrggbb."""
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(int(hex_colour[i:i + 2], 16) / 255) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula():
    assert contrast("#000000", "#ffffff") == pytest.approx(21)
    assert contrast("#ffffff", "#e8743b") == pytest.approx(3.0, abs=0.05)  # the old Generate button: fails AA
    assert contrast("#ff6b6b", "#ffffff") == pytest.approx(2.78, abs=0.05)  # the old light-mode error: fails too


# (text colour, background it is drawn on) for every text the page draws
TEXT_ON = [("text", "bg"), ("text", "panel"), ("text", "field"), ("muted", "bg"), ("muted", "panel"),
           ("muted", "field"), ("error", "panel"), ("error", "bg"), ("error", "field"), ("accent-text", "accent")]


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_text_colours_meet_wcag_aa(scheme):
    colours = css_colours(scheme)
    low = {f"{fg} on {bg}": round(contrast(colours[fg], colours[bg]), 2) for fg, bg in TEXT_ON
           if contrast(colours[fg], colours[bg]) < 4.5}
    assert not low, f"{scheme}: under 4.5:1 (WCAG AA, normal text): {low}"
    css = (ui.STATIC_DIR / "ui.css").read_text()
    assert re.search(r"button\.primary \{[^}]*[^-]color: var\(--accent-text\)", css)  # the pairs are the ones used
    assert re.search(r"\.error \{[^}]*color: var\(--error\)", css)
