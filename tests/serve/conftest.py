"""Serve fixtures: a real uvicorn server on a free localhost port, the built-in model loaded once, and a gated
pipeline that holds a job running until the test lets it go."""
from __future__ import annotations

import functools
import socket
import threading
import time

import pytest
import torch


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` from a background thread; `url` is its base address."""

    def __init__(self, app):
        import uvicorn
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    @property
    def queue(self):
        """The app's JobQueue (same process, so tests can look inside)."""
        return self.app.state.queue


@pytest.fixture(scope="session", autouse=True)
def serve_cache(tmp_path_factory):
    """Fitted preview maps are cached under $EASEL_CACHE: keep the tests' out of the user's cache."""
    import os
    before = os.environ.get("EASEL_CACHE")
    os.environ["EASEL_CACHE"] = str(tmp_path_factory.mktemp("easel_cache"))
    yield
    if before is None:
        os.environ.pop("EASEL_CACHE", None)
    else:
        os.environ["EASEL_CACHE"] = before


@pytest.fixture(scope="session")
def serve_threads():
    """Tiny models gain nothing from a second thread on this shared machine (the worker uses torch's pool)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def builtin_pipe():
    """The built-in ShapeWorld model, loaded once (on first use) for every server test."""
    import easel
    return easel.load()


def builtin_loader(name, device):
    """A JobQueue loader that hands out the built-in model (whatever the name)."""
    return builtin_pipe()


class Gated:
    """A pipeline whose step callback waits at (batch, step) until the test opens the gate: a job held running."""

    def __init__(self, pipe, batch: int, step: int):
        self.pipe, self.at, self.gate, self.reached = pipe, (batch, step), threading.Event(), threading.Event()

    def generate(self, req, callback=None, **hooks):
        def cb(d):
            callback(d)  # progress first, then hold: a flag set meanwhile is seen at the next step
            if (d.get("batch", 0), d["i"]) == self.at:
                self.reached.set()
                assert self.gate.wait(30)
        return self.pipe.generate(req, cb, **hooks)

    @property
    def loaded(self):
        return self.pipe.loaded


@pytest.fixture
def start_server(serve_threads):
    """Factory: start_server(Settings(...), queue=None) -> a running LiveServer, stopped after the test.
    Without a queue, the server gets one that serves the built-in model."""
    from easel.serve.app import Settings, create_app
    from easel.serve.jobs import JobQueue
    servers = []

    def start(settings: Settings | None = None, queue: JobQueue | None = None) -> LiveServer:
        settings = settings or Settings()
        queue = queue or JobQueue(max_queued=settings.max_queue, loader=builtin_loader)
        servers.append(LiveServer(create_app(settings, queue)).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def client(server):
    """An HTTP client of the module's `server` fixture (each test module starts the server its tests need)."""
    import httpx
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
