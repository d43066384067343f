"""Metrics text, JSON-lines logs, PNG/preview helpers, `easel serve` flags, and the router plug-in hook."""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import types

import httpx
import numpy as np
import pytest
import torch
from fastapi import APIRouter
from PIL import Image

from easel.pipelines.metadata import read_png_params
from easel.pipelines.pipeline import Pipeline
from easel.serve import cli as serve_cli
from easel.serve.app import Settings, create_app, register_routers
from easel.serve.jobs import JobQueue
from easel.serve.logs import JSONFormatter, setup_json_logging
from easel.serve.metrics import Metrics
from easel.serve.preview import latent_preview, to_png
from tests.conftest import make_tiny


def test_metrics_text_format():
    m = Metrics()
    for s in (0.003, 0.03, 0.03, 7.0, 100.0):
        m.step(s)
    m.submitted(), m.submitted(), m.started(), m.rejected()
    m.finished("done", 4)
    text = m.render()
    assert "# TYPE easel_step_seconds histogram" in text and text.endswith("\n")
    assert 'easel_step_seconds_bucket{le="0.005"} 1' in text
    assert 'easel_step_seconds_bucket{le="0.05"} 3' in text
    assert 'easel_step_seconds_bucket{le="10"} 4' in text and 'easel_step_seconds_bucket{le="+Inf"} 5' in text
    assert "easel_step_seconds_count 5" in text and "easel_step_seconds_sum 107.063000" in text
    assert "easel_jobs_submitted_total 2" in text and 'easel_jobs_finished_total{state="done"} 1' in text
    assert "easel_images_generated_total 4" in text and "easel_jobs_rejected_total 1" in text
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("easel_")


def test_metrics_endpoint_after_a_job(start_server, tmp_path):
    tiny = Pipeline(make_tiny(tmp_path, "sd1"))
    server = start_server(Settings(), JobQueue(loader=lambda name, device: tiny))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job_id = c.post("/api/v1/jobs", json={"prompt": "a star", "steps": 2, "batch_size": 2}).json()["id"]
        assert server.queue.get(job_id).wait(60)
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for sample in ("easel_jobs_submitted_total 1", "easel_jobs_started_total 1", 'easel_jobs_finished_total{state="done"} 1',
                   "easel_images_generated_total 2", "easel_step_seconds_count 2", "easel_jobs_queued 0",
                   "easel_jobs_running 0", "easel_queue_capacity 16"):
        assert sample in r.text.splitlines(), sample


def test_json_log_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("easel.serve.test")
    logger.addHandler(handler)
    try:
        logger.warning("job finished", extra={"event": "job_done", "job": "000001-abc", "seconds": 1.5})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["msg"] == "job finished" and line["level"] == "warning" and line["logger"] == "easel.serve.test"
    assert (line["event"], line["job"], line["seconds"]) == ("job_done", "000001-abc", 1.5) and "T" in line["ts"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_flags_to_settings():
    s = serve_cli.settings_from_args(parse([]))
    assert (s.host, s.port, s.model, s.api_auth, s.token, s.cors_origins) == ("127.0.0.1", 7860, None, None, None, [])
    s = serve_cli.settings_from_args(parse(["--host", "0.0.0.0", "--port", "8000", "--model", "shapeworld",
                                            "--api-auth", "u:p", "--token", "t", "--max-queue", "3",
                                            "--cors-origin", "http://a", "--cors-origin", "http://b",
                                            "--max-body-mb", "1", "--output-dir", "saved"]))
    assert (s.host, s.port, s.model, s.api_auth, s.token, s.max_queue) == ("0.0.0.0", 8000, "shapeworld", "u:p", "t", 3)
    assert s.cors_origins == ["http://a", "http://b"] and s.max_body_bytes == 2**20
    assert s.output_dir == "saved"  # the folder A1111's save_images writes under
    with pytest.raises(ValueError, match="user:password"):
        serve_cli.settings_from_args(parse(["--api-auth", "justuser"]))
    with pytest.raises(ValueError, match="--max-queue must be positive"):
        serve_cli.settings_from_args(parse(["--max-queue", "0"]))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("::", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert serve_cli.is_loopback(host) is loopback


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_warns_when_listening_beyond_this_machine(monkeypatch, caplog, host, warned):
    import uvicorn
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    with caplog.at_level(logging.INFO, logger="easel.serve"):
        serve_cli.serve(Settings(host=host, port=1234))
    assert ran and ran[0]["host"] == host and ran[0]["port"] == 1234
    exposed = [r for r in caplog.records if getattr(r, "event", None) == "exposed"]
    assert bool(exposed) is warned
    if warned:
        assert exposed[0].levelno == logging.WARNING and "--api-auth or --token" in exposed[0].getMessage()


def test_setup_json_logging_routes_uvicorn_through_json():
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        setup_json_logging(logging.INFO, stream)
        logging.getLogger("uvicorn.error").info("Started server process")
        assert json.loads(stream.getvalue().splitlines()[-1])["logger"] == "uvicorn.error"
    finally:
        root.handlers[:], root.level = before


def test_register_routers_includes_plugins_that_exist(monkeypatch):
    plugin = types.ModuleType("easel.serve.a1111")

    def router(app):
        r = APIRouter()
        r.add_api_route("/sdapi/v1/ping", lambda: {"queue": app.state.queue.max_queued}, methods=["GET"])
        return r
    plugin.router = router
    quiet = types.ModuleType("easel.serve.ui")
    quiet.router = lambda app: None
    monkeypatch.setitem(sys.modules, "easel.serve.a1111", plugin)
    monkeypatch.setitem(sys.modules, "easel.serve.ui", quiet)
    monkeypatch.setitem(sys.modules, "easel.serve.openai_images", None)  # None in sys.modules: import fails
    app = create_app(Settings(max_queue=5), JobQueue(max_queued=5))
    from fastapi.testclient import TestClient
    assert TestClient(app).get("/sdapi/v1/ping").json() == {"queue": 5}
    assert register_routers(app) == ["a1111", "train"]  # ui returned None; openai_images is missing


def test_png_bytes_carry_parameters():
    params = {"prompt": "a red star", "negative_prompt": "", "steps": 4, "seed": 9, "width": 8, "height": 8,
              "cfg_scale": 7.0, "sampler_label": "Euler"}
    png = to_png(Image.new("RGB", (8, 8)), params)
    stored = read_png_params(io.BytesIO(png))
    assert stored["easel"] == params and "Seed: 9" in stored["parameters"]
    assert read_png_params(io.BytesIO(to_png(Image.new("RGB", (8, 8)))))["easel"] is None


def test_latent_previews(tmp_path, one_thread):
    loaded = make_tiny(tmp_path, "sd1")
    f = loaded.model.config.vae.downsample
    torch.manual_seed(0)
    latent = torch.randn(2, 4, 8, 8)
    full = latent_preview(latent, loaded, "full")
    approx = latent_preview(latent, loaded, "approx")
    assert full.size == approx.size == (8 * f, 8 * f) and approx.mode == "RGB"
    assert latent_preview(latent, None).size == (8, 8)  # no model: the latent channels themselves
    # approx is the model's own fitted map (easel.pipelines.preview), applied to the first image of the batch.
    from easel.pipelines.preview import LatentPreviewer
    expected = LatentPreviewer.for_model(loaded).to_images(latent[1:2])[0]
    assert np.array_equal(np.asarray(latent_preview(latent[1:], loaded)), np.asarray(expected))
    assert not np.array_equal(np.asarray(approx), np.asarray(expected))
