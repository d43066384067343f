"""Job control and what the server reports (issue 9): interrupt as its own state with the finished images, cancel
inside long decodes (should_stop), load-before-switch for /options, real subseeds, phases, memory admission,
the token kept out of URLs and logs, and an OpenAPI document that lists the real responses."""
from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from easel.pipelines.common import Interrupted
from easel.pipelines.request import GenerationRequest
from easel.serve.app import RedactSecrets, Settings
from easel.serve.jobs import CANCELLED, LOADING, PREPARING, JobQueue
from tests.serve.conftest import Gated, builtin_loader, builtin_pipe

FAST = {"prompt": "a red star", "steps": 2, "seed": 5, "batch_size": 1}


class _Result:
    def __init__(self, image, params):
        self.image, self.params = image, params


class Stoppable:
    """Finishes batch 0, then polls should_stop inside a 'decode' of batch 1 (no step callback there), raising
    Interrupted when told: what a tiled VAE decode of a large image does."""

    def __init__(self):
        self.polled, self.reached = 0, threading.Event()

    def generate(self, req, callback=None, preview_sink=None, *, on_batch=None, should_stop=None):
        params = {"prompt": req.prompt, "negative_prompt": "", "seed": req.seed, "width": 8, "height": 8,
                  "steps": 1, "sampler": "euler", "scheduler": "normal", "cfg_scale": 7.0}
        first = [_Result(Image.new("RGB", (8, 8)), params)]
        callback({"i": 0, "denoised": torch.zeros(1, 4, 1, 1)})
        on_batch(first)
        self.reached.set()
        while True:  # "decoding" batch 1
            self.polled += 1
            if should_stop():
                raise Interrupted()
            time.sleep(0.005)


def test_cancel_reaches_a_long_decode_and_keeps_finished_batches():
    """A cancel cuts a decode short (an interrupt lets the batch it stopped decode: see the pipelines' tests)."""
    pipe = Stoppable()
    q = JobQueue(loader=lambda name, device: pipe, model_names=lambda: [])
    try:
        job = q.submit(GenerationRequest("x", steps=1, n_iter=2, batch_size=1, seed=3))
        assert pipe.reached.wait(20)
        q.cancel(job.id)
        assert job.wait(20)
        assert job.state == CANCELLED and [r.params["seed"] for r in job.results] == [3] and pipe.polled >= 1
    finally:
        q.stop()


def test_a1111_interrupt_returns_the_images_as_they_stand(start_server):
    """Interrupted in its first batch of three, a job still answers that batch's image (A1111), and says so."""
    gated = Gated(builtin_pipe(), batch=0, step=0)
    server = start_server(Settings(), JobQueue(loader=lambda name, device: gated, model_names=lambda: []))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def interrupt():
            gated.reached.wait(20)
            c.post("/sdapi/v1/interrupt")
            gated.gate.set()
        threading.Thread(target=interrupt, daemon=True).start()
        r = c.post("/sdapi/v1/txt2img", json={**FAST, "steps": 3, "n_iter": 3})
        info = r.json()["info"]
        assert r.status_code == 200 and len(r.json()["images"]) == 1 and '"interrupted": true' in info
        job = c.get("/api/v1/jobs").json()[-1]
        assert job["state"] == "interrupted" and len(job["images"]) == 1


def test_options_load_first_and_switch_only_on_success(start_server, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.safetensors").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("EASEL_MODELS", str(tmp_path / "models"))

    def loader(name, device):
        if name == "broken":
            raise ValueError("broken.safetensors is not a safetensors file (header too short)")
        return builtin_loader(name, device)
    server = start_server(Settings(), JobQueue(loader=loader))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
        assert r.status_code == 400 and "cannot be loaded" in r.json()["error"] and "header too short" in r.json()["error"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
        assert c.post("/sdapi/v1/txt2img", json=FAST).status_code == 200  # later requests still work
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapeworld"}).status_code == 200
        assert server.queue.jobs()[-1].state == "done"  # the load itself is no job in the lists


def test_all_subseeds_are_the_real_ones(start_server):
    server = start_server(Settings())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        info = c.post("/sdapi/v1/txt2img", json={**FAST, "batch_size": 2, "seed": 10}).json()["info"]
        import json
        info = json.loads(info)
        assert info["all_seeds"] == [10, 11] and -1 not in info["all_subseeds"]
        assert info["all_subseeds"][1] == info["all_subseeds"][0] + 1 and info["subseed"] == info["all_subseeds"][0]
        info = json.loads(c.post("/sdapi/v1/txt2img", json={**FAST, "subseed": 77, "subseed_strength": 0.5}).json()["info"])
        assert info["all_subseeds"] == [77]


def test_loading_phase_only_when_a_model_loads():
    seen = []

    class Watching:
        def generate(self, req, callback=None, **hooks):
            seen.append(("generate", q.running().phase))
            callback({"i": 0})
            return [_Result(Image.new("RGB", (8, 8)), {})]

    def loader(name, device):
        seen.append(("load", q.running().phase))
        return Watching()
    q = JobQueue(loader=loader, model_names=lambda: ["a", "b"])
    try:
        for model in ("a", "a", "b"):
            assert q.submit(GenerationRequest("x", steps=1), model).wait(20)
        assert seen == [("load", LOADING), ("generate", PREPARING), ("generate", PREPARING), ("load", LOADING),
                        ("generate", PREPARING)]
        assert q.jobs()[-1].to_dict()["phase"] == "done"
    finally:
        q.stop()


def test_memory_admission_is_a_413_naming_the_limit(start_server):
    server = start_server(Settings(max_memory_bytes=1 << 40))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/sdapi/v1/txt2img", json=FAST).status_code == 200  # the model is loaded now: its config known
        server.app.state.settings.max_memory_bytes = 1 << 20
        for url in ("/sdapi/v1/txt2img", "/api/v1/jobs"):
            r = c.post(url, json=FAST)
            assert r.status_code == 413 and r.json()["limit"] == "max_memory" and "--max-memory" in r.json()["error"]
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 2})
        assert r.status_code == 413 and r.json()["error"]["code"] == "max_memory"


def test_memory_checked_in_the_worker_before_the_model_is_known(start_server):
    server = start_server(Settings(max_memory_bytes=1 << 20))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/sdapi/v1/txt2img", json=FAST)
        assert r.status_code == 413 and "max_memory" in r.json()["error"]


def test_token_cookie_and_redacted_access_log(start_server, caplog):
    server = start_server(Settings(token="s3cret-t0ken"))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/api/v1/samplers").status_code == 401
        r = c.post("/api/v1/session", headers={"Authorization": "Bearer s3cret-t0ken"})
        assert r.status_code == 204 and "httponly" in r.headers["set-cookie"].lower()
        assert "samesite=strict" in r.headers["set-cookie"].lower()
        assert c.get("/api/v1/samplers").status_code == 200  # the cookie alone, no token in the URL
        c.cookies.set("easel_token", "wrong")
        assert c.get("/api/v1/samplers").status_code == 401
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/api/v1/jobs/x/events?token=s3cret-t0ken&a=1", "1.1", 200),
                               None)
    assert RedactSecrets().filter(record) and "s3cret" not in record.getMessage()
    assert "token=[redacted]&a=1" in record.getMessage()
    assert any(isinstance(f, RedactSecrets) for f in logging.getLogger("uvicorn.access").filters)


def test_openapi_lists_the_real_responses(start_server):
    server = start_server(Settings())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations"):
        assert {"400", "413", "422", "503"} <= set(paths[path]["post"]["responses"]) | {"422"}, path
        assert "401" in paths[path]["post"]["responses"]
    assert "404" in paths["/api/v1/jobs/{job_id}"]["get"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]


def test_preview_every_sets_how_often_the_preview_changes():
    class Steps:
        def generate(self, req, callback=None, **hooks):
            for i in range(6):
                callback({"i": i, "denoised": torch.full((1, 4, 1, 1), float(i))})
                seen.append(job.preview_step)
            return []
    seen = []
    q = JobQueue(loader=lambda name, device: Steps(), model_names=lambda: [])
    try:
        job = q.submit(GenerationRequest("x", steps=6, preview_every=3))
        assert job.wait(20)
        assert seen == [None, None, 3, 3, 3, 6]
    finally:
        q.stop()


def test_native_job_list_has_what_reshows_a_job(start_server):
    server = start_server(Settings())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/api/v1/jobs", json=FAST)
        server.queue.get(r.json()["id"]).wait(60)
        jobs = c.get("/api/v1/jobs", params={"limit": 1}).json()
        assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["request"]["prompt"] == "a red star"
        assert jobs[0]["params"][0]["seed"] == 5 and c.get(jobs[0]["images"][0]).status_code == 200
        assert c.get("/api/v1/jobs", params={"state": "failed"}).json() == []


def test_a1111_names_go_through_the_one_resolver():
    from easel.pipelines import names
    from easel.serve.a1111_schema import Mapped, _upscaler, resolve_a1111_sampler
    assert resolve_a1111_sampler("UniPC", None) == ("uni_pc", "normal")  # A1111's UniPC: bh1, as ComfyUI's uni_pc
    assert resolve_a1111_sampler("uni_pc_bh2", "Karras") == ("uni_pc_bh2", "karras")
    assert resolve_a1111_sampler("DPM++ 2M Karras", "Automatic") == ("dpmpp_2m", "karras")
    for label in ("sgm uniform", "Exponential", "KARRAS"):
        assert resolve_a1111_sampler("Euler", label)[1] == names.resolve_scheduler(label)
    mapped = Mapped(GenerationRequest(), None)
    assert _upscaler("latent (BICUBIC)", mapped) == "latent-bicubic" and not mapped.notes
    assert _upscaler("R-ESRGAN 4x+", mapped) == "lanczos" and "Lanczos" in mapped.notes[0]
    with pytest.raises(ValueError, match="sampler_name"):
        resolve_a1111_sampler("warp drive", None)


def test_memory_check_counts_a_refiner():
    """A request with a refiner needs room for a second model (counted at the base's size, an upper bound)."""
    from easel.pipelines.memory import estimate_peak_bytes
    from easel.serve.schema import LimitError
    from easel.serve.service import check_memory
    config = builtin_pipe().config
    req = GenerationRequest("x", steps=1, batch_size=1)
    resolved = req.resolved(config.default_size, config.default_batch)
    alone, with_refiner = estimate_peak_bytes(config, resolved), estimate_peak_bytes(config, resolved, config)
    assert with_refiner > alone
    settings = Settings(max_memory_bytes=(alone + with_refiner) // 2)
    check_memory(req, settings, config)  # fits without a refiner
    with pytest.raises(LimitError, match="max_memory"):
        check_memory(GenerationRequest("x", steps=1, batch_size=1, refiner_checkpoint="xl-refiner"), settings, config)
