"""Limits (4xx naming the limit and the value), body size, auth on every route, CORS: over real HTTP."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from easel.serve.app import Settings

LIMITS = Settings(max_pixels=64 * 64, max_steps=10, max_batch=4, max_body_bytes=20_000, max_input_pixels=64 * 64)


def b64_png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def limited(start_server):
    server = start_server(LIMITS)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield server, c


@pytest.mark.parametrize("body, limit, value", [
    ({"width": 128, "height": 64}, "max_pixels", 128 * 64),
    ({"width": 64, "height": 64, "enable_hr": True, "hr_scale": 2.0}, "max_pixels", 128 * 128),
    ({"width": 64, "height": 64, "outpaint_left": 64, "init_images": [b64_png((64, 64))]}, "max_pixels", 128 * 64),
    ({"steps": 11}, "max_steps", 11),
    ({"enable_hr": True, "hr_second_pass_steps": 12, "hr_scale": 1.0}, "max_steps", 12),
    ({"batch_size": 2, "n_iter": 3}, "max_batch", 6),
    ({"init_images": [b64_png((128, 64))], "width": 64, "height": 64}, "max_input_pixels", 128 * 64),
])
def test_each_limit_is_a_400_naming_limit_and_value(limited, body, limit, value):
    server, c = limited
    r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 4, **body})
    assert r.status_code == 400
    err = r.json()
    assert (err["limit"], err["value"]) == (limit, value) and limit in err["error"] and str(value) in err["error"]
    assert server.queue.jobs() == []


def test_body_size_limit_with_and_without_content_length(limited):
    server, c = limited
    big = {"prompt": "x" * 30_000}
    r = c.post("/api/v1/jobs", json=big)
    assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes" and r.json()["value"] > 20_000

    def chunks():  # no Content-Length: the server must count while reading
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'
    r = c.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes"
    assert server.queue.jobs() == []


def test_bad_types_and_values(limited):
    _, c = limited
    r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": "many", "colour": "red"})
    assert r.status_code == 422 and "steps" in r.json()["error"] and "colour" in r.json()["error"]
    r = c.post("/api/v1/jobs", json={"prompt": "x", "sampler": "warp_drive"})
    assert r.status_code == 400 and "warp_drive" in r.json()["error"]
    r = c.post("/api/v1/jobs", json={"prompt": "x", "width": 60})
    assert r.status_code == 400 and "multiple of 8" in r.json()["error"]
    r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 4, "model": "/etc/passwd"})
    assert r.status_code == 400 and "unknown model" in r.json()["error"]
    r = c.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


ROUTES = ["/api/v1/samplers", "/docs", "/openapi.json", "/metrics", "/api/v1/jobs/x"]


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_no_auth_by_default(start_server):
    server = start_server(Settings())
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/api/v1/samplers").status_code == 200 and c.get("/docs").status_code == 200


def test_basic_auth_on_every_route(start_server):
    server = start_server(Settings(api_auth="alice:s3cret,bob:pa:ss"))
    with httpx.Client(base_url=server.url) as c:
        for path in ROUTES:
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Basic") and "--api-auth" in r.json()["error"]
            assert c.get(path, headers=basic("alice", "wrong")).status_code == 401
            assert c.get(path, headers=basic("alice", "s3cret")).status_code != 401
        assert c.get("/api/v1/samplers", headers=basic("bob", "pa:ss")).status_code == 200
        assert c.post("/api/v1/jobs", json={"prompt": "x"}).status_code == 401
        assert c.get("/api/v1/samplers", headers={"Authorization": "Basic !!notbase64"}).status_code == 401


def test_bearer_token_and_query_token(start_server):
    server = start_server(Settings(token="t0ken"))
    with httpx.Client(base_url=server.url) as c:
        for path in ROUTES:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer t0ken"}).status_code != 401
        assert c.get("/api/v1/samplers?token=t0ken").status_code == 200
        assert c.get("/api/v1/samplers?token=t0ke").status_code == 401
        assert c.get("/api/v1/samplers", headers=basic("t0ken", "")).status_code == 401


def test_cors_off_unless_origins_given(start_server):
    origin = {"Origin": "http://ui.example"}
    off = start_server(Settings())
    with httpx.Client(base_url=off.url) as c:
        assert "access-control-allow-origin" not in c.get("/api/v1/samplers", headers=origin).headers
    on = start_server(Settings(cors_origins=["http://ui.example"], token="t"))
    with httpx.Client(base_url=on.url) as c:
        r = c.get("/api/v1/samplers", headers={**origin, "Authorization": "Bearer t"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        pre = c.options("/api/v1/jobs", headers={**origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
        other = c.get("/api/v1/samplers", headers={"Origin": "http://evil.example", "Authorization": "Bearer t"})
        assert "access-control-allow-origin" not in other.headers
