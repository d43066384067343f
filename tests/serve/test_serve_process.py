"""`python -m easel.serve.cli` as a real process: token auth, a job end to end, every log line JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import free_port


@pytest.mark.slow
def test_serve_process_end_to_end():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "easel.serve.cli", "--port", str(port), "--token", "t0k",
                             "--max-queue", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    auth = {"Authorization": "Bearer t0k"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, "server exited early"
                try:
                    if c.get("/api/v1/samplers", headers=auth).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
            assert c.get("/api/v1/samplers").status_code == 401
            job_id = c.post("/api/v1/jobs", headers=auth, json={"prompt": "a red star", "steps": 2,
                                                                "batch_size": 1}).json()["id"]
            while (job := c.get(f"/api/v1/jobs/{job_id}", headers=auth).json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline + 60
                time.sleep(0.05)
            assert job["state"] == "done"
            assert c.get(job["images"][0], headers=auth).headers["content-type"] == "image/png"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line must be JSON
    events = {line.get("event") for line in lines}
    assert {"serving", "job_queued", "job_started", "job_done", "model_load"} <= events
    assert "exposed" not in events  # 127.0.0.1 by default: no warning
    assert any(line["logger"] == "uvicorn.access" for line in lines)
