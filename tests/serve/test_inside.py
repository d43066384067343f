"""See inside over the native API: a job submitted with "inspect": true returns its capture (film strip, schedule,
token table, per-token attention maps) through a real started server on the built-in model, with the same image
as without it, bounded memory and clear errors."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from easel.serve.app import Settings
from easel.serve.jobs import JobQueue
from tests.serve.conftest import builtin_loader, builtin_pipe
from tests.serve.test_server import wait_state

FAST = {"prompt": "a red star above a blue circle", "steps": 3, "batch_size": 1, "seed": 5}


@pytest.fixture
def server(start_server):
    return start_server(Settings(max_queue=8))


def run_job(client: httpx.Client, body: dict) -> dict:
    """Submit, wait until done, return the job."""
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_state(client, r.json()["id"])
    assert job["state"] == "done", job
    return job


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_inside_round_trip(client):
    from easel.inspect.tokens import token_table
    from easel.pipelines.common import embedding_library
    job = run_job(client, {**FAST, "inspect": True, "steps": 26})
    assert job["inspect"] is True and job["inside"] == f"/api/v1/jobs/{job['id']}/inside"
    inside = client.get(job["inside"]).json()
    assert inside["id"] == job["id"] and inside["image"] == job["images"][0]
    assert inside["text"] == FAST["prompt"] and (inside["width"], inside["height"]) == (64, 64)

    (p,) = inside["passes"]  # txt2img: one pass
    assert p["total_steps"] == 26 and len(p["sigmas"]) == 27 and p["sigmas"][-1] == 0.0
    assert p["sigmas"] == sorted(p["sigmas"], reverse=True)
    steps = p["steps"]
    assert len(steps) == 24 and steps[0]["i"] == 0 and steps[-1]["i"] == 25  # at most MAX_FRAMES, ends kept
    for s in steps:  # each kept step's sigma is the schedule's
        assert (s["sigma"], s["sigma_next"]) == pytest.approx((p["sigmas"][s["i"]], p["sigmas"][s["i"] + 1]))
    last = steps[-1]
    assert pixels(client, last["x0"]).shape == (64, 64, 3)
    for kind in ("latent", "noise"):
        assert pixels(client, last[kind]).ndim == 3

    # the token view is `easel inspect tokens --json`'s table
    loaded = builtin_pipe().loaded
    assert inside["tokens"] == token_table(loaded, FAST["prompt"], 1, embedding_library(loaded))
    attn = inside["attention"]
    pieces = [(t["position"], t["piece"]) for t in attn["tokens"]]
    assert pieces[:4] == [(0, "<start>"), (1, "a"), (2, "red"), (3, "star")] and pieces[-1] == (8, "<end>")
    assert [w["word"] for w in attn["words"]] == ["a", "red", "star", "above", "a", "blue", "circle"]
    assert pixels(client, attn["tokens"][2]["map"]).shape[:2] == pixels(client, attn["words"][1]["map"]).shape[:2]
    assert "values" not in attn["tokens"][0]


def test_inside_raw_maps_and_embedded_pictures(client):
    job = run_job(client, {**FAST, "inspect": True})
    raw = client.get(job["inside"], params={"raw": "true", "embed": "true"}).json()
    attn = raw["attention"]
    h, w = attn["size"]
    assert [h, w] == raw["passes"][0]["latent_size"] == [16, 16]
    values = np.array([t["values"] for t in attn["tokens"]])  # (tokens, h, w), at the latent's resolution
    assert values.shape == (len(attn["tokens"]), h, w)
    assert (values >= 0).all() and (values.sum(axis=0) <= 1 + 1e-5).all()  # padding slots hold the rest of 1
    assert values[2].mean() == pytest.approx(attn["tokens"][2]["mass"], rel=1e-5)
    png = raw["passes"][0]["steps"][0]["x0"]
    assert png.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).size == (64, 64)


def small_png() -> str:
    """A 64x64 init image as base64."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("extra", [{}, {"sampler": "dpmpp_2m", "enable_hr": True, "hr_scale": 1.5, "batch_size": 2},
                                   {"init_images": "PNG", "denoising_strength": 0.6, "sampler": "heun"}])
def test_capture_gives_the_same_images(client, extra):
    body = {**FAST, **extra}
    if body.get("init_images") == "PNG":  # img2img
        body["init_images"] = [small_png()]
    plain = run_job(client, body)
    inspected = run_job(client, {**body, "inspect": True})
    assert len(plain["images"]) == len(inspected["images"]) >= 1
    for a, b in zip(plain["images"], inspected["images"]):
        assert np.array_equal(pixels(client, a), pixels(client, b))  # bit-identical, same seed
    inside = client.get(inspected["inside"]).json()
    if extra.get("enable_hr"):  # the first image's two passes: base then hires, the later batches dropped
        assert [p["phase"] for p in inside["passes"]] == ["base", "hires"]
        assert inside["passes"][1]["latent_size"] == [24, 24] and inside["attention"]["size"] == [24, 24]


def test_inside_errors_name_the_problem(client, server):
    plain = run_job(client, FAST)
    r = client.get(f"/api/v1/jobs/{plain['id']}/inside")
    assert r.status_code == 404 and '"inspect": true' in r.json()["error"]
    assert plain["inside"] is None and plain["inspect"] is False
    assert client.get("/api/v1/jobs/nope/inside").status_code == 404
    job = run_job(client, {**FAST, "inspect": True})
    r = client.get(f"/api/v1/jobs/{job['id']}/inside/../../images/0.png")
    assert r.status_code == 404
    r = client.get(f"/api/v1/jobs/{job['id']}/inside/token-99.png")
    assert r.status_code == 404 and "no picture 'token-99'" in r.json()["error"]
    r = client.post("/api/v1/jobs", json={**FAST, "inspect": "yes please"})
    assert r.status_code == 422 and "inspect" in r.json()["error"]


def test_running_job_has_no_capture_yet(start_server):
    from tests.serve.conftest import Gated
    gated = Gated(builtin_pipe(), batch=0, step=1)
    server = start_server(Settings(), JobQueue(loader=lambda name, device: gated))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job_id = client.post("/api/v1/jobs", json={**FAST, "inspect": True}).json()["id"]
        assert gated.reached.wait(30)
        r = client.get(f"/api/v1/jobs/{job_id}/inside")
        assert r.status_code == 409 and "running" in r.json()["error"]
        gated.gate.set()
        assert wait_state(client, job_id)["inside"] is not None


def test_only_the_newest_captures_are_kept(start_server):
    queue = JobQueue(loader=builtin_loader, keep_inside=1)
    server = start_server(Settings(), queue)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first = run_job(client, {**FAST, "inspect": True})
        second = run_job(client, {**FAST, "inspect": True, "seed": 6})
        r = client.get(f"/api/v1/jobs/{first['id']}/inside")
        assert r.status_code == 410 and "last 1 inspected jobs" in r.json()["error"]
        assert client.get(second["inside"]).status_code == 200
        assert client.get(f"/api/v1/jobs/{first['id']}").json()["inside"] is None


def test_capture_memory_is_counted_against_max_memory(start_server):
    import dataclasses

    from easel.pipelines.memory import estimate_peak_bytes
    from easel.pipelines.request import GenerationRequest
    from easel.serve.inside import capture_bytes
    config = builtin_pipe().config
    req = dataclasses.replace(GenerationRequest(**FAST), width=64, height=64, dtype="fp32").resolved(64, 1)
    need, extra = estimate_peak_bytes(config, req), capture_bytes(config, req)
    assert extra > 0
    server = start_server(Settings(max_memory_bytes=need + extra // 2))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        run_job(client, FAST)  # fits (and loads the model, so the next requests are checked on its config)
        r = client.post("/api/v1/jobs", json={**FAST, "inspect": True})
        assert r.status_code == 413 and "inspect" in r.json()["error"] and r.json()["limit"] == "max_memory"


def test_capture_keeps_one_image_and_few_frames():
    from easel.pipelines.request import GenerationRequest
    from easel.serve.inside import MAX_FRAMES, JobCapture
    cap = JobCapture()
    try:
        builtin_pipe().generate(GenerationRequest("two green squares", steps=26, seed=1, batch_size=2, n_iter=2),
                                extend_plan=cap)
    finally:
        cap.close()
    assert len(cap.capture.runs) == len(cap.passes) == 1  # the second batch's run was dropped
    run = cap.capture.runs[0]
    assert len(run.steps) == MAX_FRAMES and all(s.x.shape[0] == s.x0.shape[0] == 1 for s in run.steps)
    assert all(s.x._base is None for s in run.steps)  # copies, not views of the whole batch


def test_openapi_documents_the_field_and_the_routes(client):
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["JobBody"]["properties"]["inspect"]
    assert body["type"] == "boolean" and body["default"] is False and "inside" in body["description"]
    inside = schema["paths"]["/api/v1/jobs/{job_id}/inside"]["get"]
    assert {"200", "404", "409", "410"} <= set(inside["responses"])
    assert {p["name"] for p in inside["parameters"]} == {"job_id", "raw", "embed"}
    picture = schema["paths"]["/api/v1/jobs/{job_id}/inside/{name}.png"]["get"]
    assert "image/png" in picture["responses"]["200"]["content"]


def test_drawing_is_a_phase_and_its_failure_costs_only_the_capture(server, client, monkeypatch):
    import easel.serve.inside as inside
    phases, real = [], inside.draw_inside

    def spy(*args):
        phases.append(server.queue.running().phase)  # what progress events and the page show meanwhile
        if len(phases) == 2:
            raise RuntimeError("boom")
        return real(*args)
    monkeypatch.setattr(inside, "draw_inside", spy)
    run_job(client, {**FAST, "inspect": True})
    job = run_job(client, {**FAST, "inspect": True})  # the drawing fails: the job is still done, with its image
    assert phases == ["inspecting", "inspecting"]
    assert job["inside"] is None and "could not be drawn: RuntimeError: boom" in job["inside_error"]
    assert pixels(client, job["images"][0]).shape == (64, 64, 3)
    r = client.get(f"/api/v1/jobs/{job['id']}/inside")
    assert r.status_code == 410 and "boom" in r.json()["error"]
