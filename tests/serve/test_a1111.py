"""The A1111 API (/sdapi/v1) over real HTTP: the built-in model, 2-4 steps at 64 px."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from easel.serve.app import Settings
from easel.serve.jobs import JobQueue
from tests.serve.conftest import Gated, builtin_pipe

FAST = {"prompt": "a red star above a blue circle", "steps": 2, "batch_size": 1}
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
             "sd_model_name", "sd_model_hash", "denoising_strength", "extra_generation_params", "infotexts",
             "clip_skip", "job_timestamp", "version", "unsupported"}


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


class Background:
    """An HTTP call running in a thread (A1111's txt2img blocks until the job is done)."""

    def __init__(self, url: str, path: str, body: dict, timeout: float = 60):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(url, path, body, timeout), daemon=True)
        self.thread.start()

    def _run(self, url, path, body, timeout):
        try:
            with httpx.Client(base_url=url, timeout=timeout) as c:
                self.result = c.post(path, json=body)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.error = e

    def join(self) -> httpx.Response:
        self.thread.join(60)
        assert self.error is None and self.result is not None, self.error
        return self.result


@pytest.fixture
def server(start_server, tmp_path):
    return start_server(Settings(max_queue=4, output_dir=str(tmp_path / "out")))  # where save_images writes


def test_txt2img_shapes_seeds_and_unsupported_fields(client):
    body = {**FAST, "batch_size": 2, "n_iter": 2, "seed": -1, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "restore_faces": True, "tiling": False, "do_not_save_grid": True, "no_such_field": 1,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "other.vae", "samples_format": "png"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert set(d) == {"images", "parameters", "info"} and isinstance(d["info"], str)
    images = [decode(b) for b in d["images"]]
    assert len(images) == 4 and all(im.size == (64, 64) and im.format == "PNG" for im in images)
    assert d["parameters"]["prompt"] == FAST["prompt"] and d["parameters"]["restore_faces"] is True
    assert d["parameters"]["cfg_scale"] == 7.0  # defaults filled in, as A1111 echoes them
    info = json.loads(d["info"])
    assert INFO_KEYS <= set(info)
    seeds = info["all_seeds"]
    assert seeds[0] >= 0 and seeds == [seeds[0] + i for i in range(4)] and info["seed"] == seeds[0]
    assert info["all_prompts"] == [FAST["prompt"]] * 4 and info["batch_size"] == 2
    assert (info["sampler_name"], info["scheduler"], info["clip_skip"]) == ("DPM++ 2M", "Karras", 2)
    assert info["sd_model_name"] == "shapeworld" and info["width"] == 64
    assert len(info["infotexts"]) == 4 and f"Seed: {seeds[3]}" in info["infotexts"][3]
    assert "Clip skip: 2" in info["infotexts"][0] and "Schedule type: Karras" in info["infotexts"][0]
    assert images[1].text["parameters"] == info["infotexts"][1]  # the PNG carries its infotext
    assert info["unsupported"] == ["override_settings.sd_vae", "no_such_field", "restore_faces"]
    assert info["ignored"] == ["override_settings.samples_format", "do_not_save_grid", "tiling"]


def test_fixed_seed_combined_sampler_label_and_save_images(client, server, tmp_path):
    body = {**FAST, "seed": 5, "n_iter": 2, "sampler_name": "Euler a Karras", "send_images": False,
            "save_images": True}
    d = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(d["info"])
    assert d["images"] == [] and info["all_seeds"] == [5, 6]
    assert (info["sampler_name"], info["scheduler"]) == ("Euler a", "Karras")
    saved = sorted((tmp_path / "out" / "txt2img-images").glob("*/*.png"))
    assert [p.name for p in saved] == ["00000-5.png", "00001-6.png"] and info["saved"] == [str(p) for p in saved]
    assert "Seed: 6" in Image.open(saved[1]).text["parameters"]
    # "Automatic" picks the sampler's preferred schedule (A1111 1.9+), and bad names are 400s that list choices.
    info = json.loads(client.post("/sdapi/v1/txt2img", json={**FAST, "sampler_name": "DPM++ 2M"}).json()["info"])
    assert info["scheduler"] == "Karras"
    bad = client.post("/sdapi/v1/txt2img", json={**FAST, "sampler_name": "Nope Sampler"})
    assert bad.status_code == 400 and "Euler a" in bad.json()["error"]
    assert client.post("/sdapi/v1/txt2img", json={**FAST, "scheduler": "weird"}).status_code == 400


def test_img2img_inpaint_with_mask_and_png_info_round_trip(client):
    pytest.importorskip("easel.pipelines.inpaint", reason="inpainting pipeline not in this build yet")
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # repaint the middle only
    body = {**FAST, "steps": 4, "seed": 21, "init_images": [b64_png(source)], "mask": b64_png(mask),
            "denoising_strength": 0.9, "mask_blur": 0, "inpainting_fill": 0, "inpaint_full_res": False,
            "resize_mode": 0, "image_cfg_scale": 1.5}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    out = decode(d["images"][0]).convert("RGB")
    info = json.loads(d["info"])
    assert out.size == (64, 64) and info["denoising_strength"] == 0.9 and info["all_seeds"] == [21]
    assert out.getpixel((2, 2)) == (200, 30, 30) and out.getpixel((61, 61)) == (200, 30, 30)  # outside the mask
    assert out.getpixel((32, 32)) != (200, 30, 30)  # inside: repainted
    assert "Denoising strength: 0.9" in info["infotexts"][0] and "Masked content: fill" in info["infotexts"][0]
    assert info["unsupported"] == ["image_cfg_scale"]
    assert d["parameters"]["init_images"] is None and d["parameters"]["mask"] is None  # include_init_images=false
    png = client.post("/sdapi/v1/png-info", json={"image": d["images"][0]}).json()
    assert png["info"] == info["infotexts"][0]
    p = png["parameters"]
    assert (p["Prompt"], p["Seed"], p["Steps"], p["Size-1"], p["Size-2"]) == (FAST["prompt"], "21", "4", "64", "64")
    assert p["Denoising strength"] == "0.9" and json.loads(png["items"]["easel"])["mode"] == "inpaint"
    assert client.post("/sdapi/v1/png-info", json={"image": b64_png(source)}).json()["info"] == ""
    missing = client.post("/sdapi/v1/img2img", json=FAST)
    assert missing.status_code == 400 and "init_images" in missing.json()["error"]
    bad = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": ["not an image"]})
    assert bad.status_code == 400 and "init_images[0]" in bad.json()["error"]


def test_enable_hr_second_pass(client):
    pytest.importorskip("easel.pipelines.hires", reason="hires fix pipeline not in this build yet")
    body = {**FAST, "seed": 8, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6,
            "hr_second_pass_steps": 2, "hr_upscaler": "R-ESRGAN 4x+", "hr_sampler_name": "Euler"}
    d = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(d["info"])
    assert decode(d["images"][0]).size == (96, 96) and info["width"] == 64  # info keeps the first pass's size
    assert info["denoising_strength"] == 0.6 and info["extra_generation_params"]["Hires upscale"] == "1.5"
    text = info["infotexts"][0]
    assert "Hires upscaler: Lanczos" in text and "Hires sampler: Euler" in text and "Hires steps: 2" in text
    assert info["notes"] == ["hr_upscaler 'R-ESRGAN 4x+' is not available in easel; used Lanczos instead"]


@pytest.mark.parametrize("action, seeds", [("interrupt", [11, 12]), ("skip", [11, 13])])
def test_progress_with_current_image_then_interrupt_or_skip(start_server, action, seeds):
    gated = Gated(builtin_pipe(), batch=1, step=0)
    server = start_server(Settings(), JobQueue(loader=lambda name, device: gated))
    c = httpx.Client(base_url=server.url, timeout=60)
    idle = c.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    call = Background(server.url, "/sdapi/v1/txt2img", {**FAST, "steps": 3, "n_iter": 3, "seed": 11})
    assert gated.reached.wait(30)
    p = c.get("/sdapi/v1/progress").json()
    st = p["state"]
    assert (st["job_count"], st["job_no"], st["sampling_step"], st["sampling_steps"]) == (3, 1, 1, 3)
    assert p["progress"] == pytest.approx(4 / 9, abs=1e-3) and p["eta_relative"] >= 0
    assert decode(p["current_image"]).mode == "RGB" and st["job"] == "scripts_txt2img"
    assert c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    c.post(f"/sdapi/v1/{action}").raise_for_status()
    flags = c.get("/sdapi/v1/progress").json()["state"]
    assert (flags["interrupted"], flags["skipped"]) == (action == "interrupt", action == "skip")
    gated.gate.set()
    r = call.join()
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and info["all_seeds"] == seeds and len(r.json()["images"]) == len(seeds)
    assert info["interrupted"] is (action == "interrupt")
    assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    c.close()


def test_queue_full_is_503_and_limits_are_400(start_server):
    gated = Gated(builtin_pipe(), batch=0, step=0)
    server = start_server(Settings(max_queue=1, max_batch=4), JobQueue(max_queued=1, loader=lambda n, d: gated))
    from easel.pipelines.request import GenerationRequest
    running = server.queue.submit(GenerationRequest("hold", steps=2, batch_size=1))
    assert gated.reached.wait(30)
    waiting = server.queue.submit(GenerationRequest("wait", steps=2, batch_size=1))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        full = c.post("/sdapi/v1/txt2img", json=FAST)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        over = c.post("/sdapi/v1/txt2img", json={**FAST, "batch_size": 5})
        assert over.status_code == 400 and over.json()["limit"] == "max_batch"
    gated.gate.set()
    assert running.wait(30) and waiting.wait(30)


def test_client_that_hangs_up_cancels_its_job(start_server):
    gated = Gated(builtin_pipe(), batch=0, step=0)
    server = start_server(Settings(), JobQueue(loader=lambda n, d: gated))
    call = Background(server.url, "/sdapi/v1/txt2img", {**FAST, "steps": 3}, timeout=1.0)
    assert gated.reached.wait(30)
    call.thread.join(30)
    assert isinstance(call.error, httpx.TimeoutException)
    job = server.queue.jobs()[0]
    deadline = time.monotonic() + 10
    while "cancel" not in job.pending:
        assert time.monotonic() < deadline, "job was not cancelled"
        time.sleep(0.05)
    gated.gate.set()
    assert job.wait(30) and job.state == "cancelled"


def test_options_switch_model_and_sd_models(start_server, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.safetensors").write_bytes(b"not really weights")
    short = hashlib.sha256(b"not really weights").hexdigest()[:10]
    monkeypatch.setenv("EASEL_MODELS", str(models))
    asked = []

    def loader(name, device):
        asked.append(name)
        return builtin_pipe()
    server = start_server(Settings(), JobQueue(loader=loader))
    c = httpx.Client(base_url=server.url, timeout=60)
    listed = {m["model_name"]: m for m in c.get("/sdapi/v1/sd-models").json()}
    assert listed["other"]["title"] == f"other.safetensors [{short}]" and listed["other"]["hash"] == short
    assert listed["other"]["filename"] == str(models / "other.safetensors") and len(listed["shapeworld"]["sha256"]) == 64
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == listed["shapeworld"]["title"]
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"other.safetensors [{short}]",
                                          "CLIP_stop_at_last_layers": 2, "outdir_samples": "/tmp/x"})
    assert r.status_code == 200 and r.json()["ignored"] == ["outdir_samples"]
    opts = c.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == f"other.safetensors [{short}]" and opts["CLIP_stop_at_last_layers"] == 2
    assert c.post("/sdapi/v1/options", json=opts).json() == {"applied": {**{k: opts[k] for k in (
        "CLIP_stop_at_last_layers", "live_previews_enable", "show_progress_type", "samples_format", "sd_vae")},
        "sd_model_checkpoint": opts["sd_model_checkpoint"]}, "ignored": []}  # posting GET's answer back is fine
    info = json.loads(c.post("/sdapi/v1/txt2img", json=FAST).json()["info"])
    assert asked[-1] == "other" and info["clip_skip"] == 2
    c.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": "shapeworld"}})
    assert asked[-1] == "shapeworld" and server.queue.default_model == "other"  # the override is per request
    bad = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.ckpt", "CLIP_stop_at_last_layers": 3})
    assert bad.status_code == 400 and "sd-models" in bad.json()["error"]
    assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2  # a bad request changes nothing
    assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    c.close()


def test_lists_samplers_schedulers_loras(client, tmp_path, monkeypatch):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"x")
    monkeypatch.setenv("EASEL_LORA_DIRS", str(loras))
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m", "dpmpp_2m"], "options": {"scheduler": "karras"}} in samplers
    assert {"name": "Euler a", "aliases": ["k_euler_a", "euler_a"], "options": {}} in samplers
    schedulers = {s["name"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["automatic"]["label"] == "Automatic" and schedulers["karras"]["default_rho"] == 7.0
    pytest.importorskip("easel.weights.lora")
    assert {"name": "style", "alias": "style", "path": str(loras / "style.safetensors"), "metadata": {}} in \
        client.get("/sdapi/v1/loras").json()
    assert {"name": "Latent (bicubic)"} in client.get("/sdapi/v1/latent-upscale-modes").json()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"} <= set(paths)
