"""The OpenAI images API (/v1/images/generations) over real HTTP: the built-in model, 2 steps at 64 px."""
from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from easel.pipelines.request import GenerationRequest
from easel.serve.app import Settings
from easel.serve.jobs import JobQueue
from tests.serve.conftest import builtin_pipe

URL = "/v1/images/generations"
FAST = {"prompt": "a red star above a blue circle", "size": "64x64", "steps": 2}


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def assert_openai_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)
    return err


@pytest.fixture
def client(start_server):
    server = start_server(Settings(max_pixels=128 * 128))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_generations_b64_json_with_seeds_and_unsupported_options(client):
    r = client.post(URL, json={**FAST, "n": 2, "seed": 9, "model": "dall-e-3", "quality": "hd", "style": "vivid",
                               "user": "someone", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert isinstance(d["created"], int) and abs(d["created"] - time.time()) < 120
    images = [decode(item["b64_json"]) for item in d["data"]]
    assert len(images) == 2 and all(im.size == (64, 64) and im.format == "PNG" for im in images)
    assert "Seed: 10" in images[1].text["parameters"] and "Steps: 2" in images[1].text["parameters"]
    assert d["easel"]["seeds"] == [9, 10] and d["easel"]["model"] == "shapeworld"
    assert d["easel"]["unsupported"] == ["quality", "style"]  # user has no effect on images: not listed
    jpeg = client.post(URL, json={"prompt": "a blue circle", "steps": 2, "output_format": "jpeg",
                                  "output_compression": 80, "model": "shapeworld"}).json()
    assert decode(jpeg["data"][0]["b64_json"]).format == "JPEG" and jpeg["size"] == "64x64"  # the model's size
    assert jpeg["easel"]["unsupported"] == []


def test_errors_in_openai_shape(client):
    err = assert_openai_error(client.post(URL, json={**FAST, "response_format": "url"}), 400, "response_format")
    assert "b64_json" in err["message"] and err["type"] == "invalid_request_error"
    assert "bogus" in assert_openai_error(client.post(URL, json={**FAST, "bogus": 1}), 400, "bogus")["message"]
    assert_openai_error(client.post(URL, json={"size": "64x64"}), 400, "prompt")
    assert_openai_error(client.post(URL, json={**FAST, "n": 11}), 400, "n")
    assert "multiple of 8" in assert_openai_error(client.post(URL, json={**FAST, "size": "60x64"}), 400,
                                                  "size")["message"]
    assert_openai_error(client.post(URL, json={**FAST, "size": "big"}), 400, "size")
    assert_openai_error(client.post(URL, json={**FAST, "size": "256x256"}), 400, "size", "max_pixels")
    assert_openai_error(client.post(URL, json={**FAST, "sampler": "nope"}), 400, "sampler")
    assert_openai_error(client.post(URL, json={**FAST, "stream": True}), 400, "stream")
    assert_openai_error(client.post(URL, json={**FAST, "output_format": "gif"}), 400, "output_format")
    assert_openai_error(client.post(URL, json={**FAST, "model": "no-such-model"}), 404, "model", "model_not_found")
    assert_openai_error(client.post(URL, content=b"{not json", headers={"content-type": "application/json"}),
                        400, None)
    assert_openai_error(client.post(URL, json=["a list"]), 400, None)
    assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]


class Held:
    """The built-in pipeline, held before it starts until the test opens the gate."""

    def __init__(self):
        self.gate, self.started, self.fail = threading.Event(), threading.Event(), None

    def generate(self, req, callback=None, **hooks):
        self.started.set()
        assert self.gate.wait(30)
        if self.fail:
            raise ValueError(self.fail)
        return builtin_pipe().generate(req, callback)

    @property
    def loaded(self):
        return builtin_pipe().loaded


def test_queue_full_and_failure_in_openai_shape(start_server):
    held = Held()
    server = start_server(Settings(max_queue=1), JobQueue(max_queued=1, loader=lambda name, device: held))
    running = server.queue.submit(GenerationRequest("hold", steps=2, batch_size=1))
    assert held.started.wait(30)
    waiting = server.queue.submit(GenerationRequest("wait", steps=2, batch_size=1))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(URL, json=FAST)
        err = assert_openai_error(r, 503, None, "queue_full")
        assert err["type"] == "server_error" and int(r.headers["retry-after"]) >= 1
        held.gate.set()
        assert running.wait(30) and waiting.wait(30)
        held.fail = "model file is broken: fix it"  # a job that fails in the pipeline
        err = assert_openai_error(c.post(URL, json=FAST), 500, None, "failed")
        assert "model file is broken: fix it" in err["message"] and err["type"] == "server_error"
