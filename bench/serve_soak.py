"""Soak the server: mixed requests on all three APIs with model switches, printing the resident memory (RSS).

    python bench/serve_soak.py --seconds 180 --switch-every 15

Runs a real uvicorn server in this process on the built-in model and a tiny random SD1-layout model (written to
a temporary model folder), switching the default model through POST /sdapi/v1/options. Prints RSS at the start,
after warm-up and at each switch, and the growth after warm-up: flat means no leak per job or per model switch.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tiny_model_folder(root: Path) -> Path:
    """A model folder with one tiny random SD1-layout checkpoint (and its tokenizer)."""
    from easel.weights.model_io import save_model
    from tests.conftest import make_tiny
    folder = root / "models"
    folder.mkdir()
    save_model(make_tiny(root, "sd1"), folder / "tiny-sd1.safetensors")
    return folder


def soak(seconds: float, switch_every: float, threads: int = 3, log=print) -> dict:
    """Run the soak; {'rss_start', 'rss_warm', 'rss_end', 'rss_max', 'switches', 'answers', 'errors'}."""
    import httpx
    import torch

    from easel.serve.app import Settings, create_app
    from tests.serve.conftest import LiveServer
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="easel-soak-"))
    os.environ["EASEL_MODELS"] = str(tiny_model_folder(root))
    os.environ.setdefault("EASEL_CACHE", str(root / "cache"))
    out = {"rss_start": rss_mb(), "switches": 0, "answers": {}, "errors": []}
    server = LiveServer(create_app(Settings(max_queue=8, max_pixels=64 * 64, max_steps=4))).start()
    stop, lock = threading.Event(), threading.Lock()
    bodies = [("/sdapi/v1/txt2img", {"prompt": "a red star", "steps": 2, "width": 32, "height": 32}),
              ("/api/v1/jobs", {"prompt": "a blue circle", "steps": 2, "width": 32, "height": 32, "batch_size": 1}),
              ("/v1/images/generations", {"prompt": "a green square", "size": "32x32", "steps": 2})]

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            i = k
            while not stop.is_set():
                url, body = bodies[i % len(bodies)]
                try:
                    code = c.post(url, json=body).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    out["answers"][code] = out["answers"].get(code, 0) + 1
                i += 1
    workers = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    try:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            time.sleep(min(5.0, seconds / 4))
            out["rss_warm"] = out["rss_max"] = rss_mb()
            log(f"rss start {out['rss_start']:.0f} MiB, after warm-up {out['rss_warm']:.0f} MiB")
            end, models = time.monotonic() + seconds, ["tiny-sd1", "shapeworld"]
            while time.monotonic() < end:
                time.sleep(switch_every)
                r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[out["switches"] % 2]})
                if r.status_code != 200:
                    out["errors"].append(r.text)
                out["switches"] += 1
                out["rss_max"] = max(out["rss_max"], rss_mb())
                log(f"switch {out['switches']:3d} -> {models[(out['switches'] - 1) % 2]:10s} rss {rss_mb():.0f} MiB "
                    f"answers {dict(out['answers'])}")
    finally:
        stop.set()
        for t in workers:
            t.join(120)
        server.stop()
    out["rss_end"] = rss_mb()
    log(f"rss end {out['rss_end']:.0f} MiB, max {out['rss_max']:.0f} MiB, growth after warm-up "
        f"{out['rss_end'] - out['rss_warm']:+.0f} MiB over {out['switches']} switches; answers {out['answers']}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--switch-every", type=float, default=15)
    p.add_argument("--threads", type=int, default=3)
    a = p.parse_args()
    out = soak(a.seconds, a.switch_every, a.threads)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
