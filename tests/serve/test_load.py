"""Load: concurrent blocking requests on all three APIs against a small queue (every one answered, none lost or
run twice), and a short soak with model switches whose resident memory stays bounded (bench/serve_soak.py runs
the long one and prints the numbers)."""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import httpx
import pytest

from easel.serve.app import Settings

FAST = {"prompt": "a red star", "steps": 2, "width": 32, "height": 32}


def test_concurrent_blocking_requests_all_answered_once(start_server):
    server = start_server(Settings(max_queue=2, max_pixels=64 * 64))
    answers, lock = [], threading.Lock()

    def call(i: int) -> None:
        url, body = [("/sdapi/v1/txt2img", {**FAST, "seed": 1000 + i}),
                     ("/v1/images/generations", {"prompt": "a red star", "size": "32x32", "steps": 2,
                                                 "seed": 1000 + i})][i % 2]
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post(url, json=body)
        with lock:
            answers.append((i, r.status_code, r.json()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(answers) == 16 and {code for _, code, _ in answers} <= {200, 503}
    ok = [(i, body) for i, code, body in answers if code == 200]
    seeds = [json.loads(b["info"])["all_seeds"][0] if "info" in b else b["easel"]["seeds"][0] for _, b in ok]
    assert sorted(seeds) == sorted(1000 + i for i, _ in ok)  # each answer carries its own request's image
    jobs = server.queue.jobs()
    assert len(jobs) == len(ok) and all(j.runs == 1 and j.state == "done" for j in jobs)


@pytest.mark.slow
def test_short_soak_with_model_switches_keeps_memory_bounded(tmp_path, monkeypatch, serve_threads):
    spec = importlib.util.spec_from_file_location("serve_soak", Path(__file__).parents[2] / "bench" / "serve_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = soak.soak(seconds=12, switch_every=2, threads=2)
    print(f"\nsoak: rss warm {out['rss_warm']:.0f} MiB -> end {out['rss_end']:.0f} MiB (max {out['rss_max']:.0f}), "
          f"{out['switches']} switches, answers {out['answers']}")
    assert not out["errors"] and out["switches"] >= 4 and set(out["answers"]) <= {200, 202, 503}
    assert out["rss_end"] - out["rss_warm"] < 400  # generous: a leak of one model per switch would pass it soon
