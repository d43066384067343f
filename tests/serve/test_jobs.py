"""JobQueue: order, bounds, cancel / interrupt / skip, failures, model switching, progress (no HTTP)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from easel.pipelines.pipeline import Pipeline
from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    JobQueue,
    QueueFull,
    estimate_steps,
)
from easel.serve.metrics import Metrics
from tests.conftest import make_tiny
from tests.serve.conftest import Gated


class FakePipeline:
    """Counts steps like a sampler; `gate` (an Event) holds it at step `hold_at` until set."""

    def __init__(self, name="fake", gate: threading.Event | None = None, hold_at: int = 0, fail: str | None = None):
        self.name, self.gate, self.hold_at, self.fail = name, gate, hold_at, fail
        self.ran: list[str] = []  # prompts, in the order they ran

    def generate(self, req, callback=None, **hooks):
        self.ran.append(req.prompt)
        if self.fail:
            raise ValueError(self.fail)
        for i in range(req.steps):
            if self.gate is not None and i == self.hold_at:
                assert self.gate.wait(20), "test gate never opened"
            callback({"i": i, "denoised": torch.zeros(1, 4, 2, 2)})
        return [_Result(Image.new("RGB", (8, 8)), {"prompt": req.prompt, "model": self.name})]


class _Result:
    def __init__(self, image, params):
        self.image, self.params = image, params


def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


@pytest.fixture
def queues():
    made = []

    def make(**kw):
        kw.setdefault("model_names", lambda: ["a", "b"])
        made.append(JobQueue(**kw))
        return made[-1]
    yield make
    for q in made:
        q.stop()


def test_fifo_results_and_states(queues):
    pipe = FakePipeline()
    q = queues(loader=lambda name, device: pipe, metrics=Metrics())
    jobs = [q.submit(GenerationRequest(f"p{i}", steps=2)) for i in range(5)]
    assert all(j.wait(20) for j in jobs)
    assert pipe.ran == [f"p{i}" for i in range(5)]
    assert [j.state for j in jobs] == [DONE] * 5 and all(j.runs == 1 for j in jobs)
    assert jobs[0].results[0].params["prompt"] == "p0" and jobs[0].step == jobs[0].total == 2
    assert q.metrics.n_finished["done"] == 5 and q.metrics.step_count == 10 and q.metrics.n_images == 5


def test_concurrent_submissions_bounded_and_each_runs_once(queues):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    q = queues(max_queued=5, loader=lambda name, device: pipe)
    accepted, rejected, lock = [], [], threading.Lock()

    def submit(i):
        try:
            job = q.submit(GenerationRequest(f"p{i}", steps=1))
            with lock:
                accepted.append(job)
        except QueueFull as e:
            with lock:
                rejected.append(e)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The worker holds at most one job (blocked at the gate), the queue five more.
    assert 5 <= len(accepted) <= 6 and len(rejected) == 25 - len(accepted)
    assert all(e.retry_after >= 1 for e in rejected)
    gate.set()
    assert all(j.wait(20) for j in accepted)
    assert sorted(pipe.ran) == sorted(j.request.prompt for j in accepted)  # each accepted job ran exactly once
    assert all(j.state == DONE and j.runs == 1 for j in accepted)


def test_cancel_queued_and_running(queues):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate, hold_at=2)
    q = queues(loader=lambda name, device: pipe)
    running = q.submit(GenerationRequest("run", steps=10))
    queued = q.submit(GenerationRequest("wait", steps=10))
    wait_until(lambda: running.state == RUNNING and running.step == 2)  # held at its third step
    assert q.cancel(queued.id).state == CANCELLED and queued.wait(0)
    assert q.position(queued) is None
    q.cancel(running.id)
    assert running.pending == {"cancel"} and queued.pending == set()
    gate.set()
    assert running.wait(20)
    assert running.state == CANCELLED and running.step == 3  # stopped at the first step after the cancel
    assert pipe.ran == ["run"]  # the cancelled queued job never ran
    assert q.cancel("no-such-job") is None


@pytest.fixture
def tiny_pipe(tmp_path):
    return Pipeline(make_tiny(tmp_path, "sd1"))


@pytest.mark.parametrize("action, seeds", [("interrupt", [7, 8]), ("skip", [7, 9])])
def test_interrupt_keeps_finished_batches_and_skip_drops_one(queues, tiny_pipe, one_thread, action, seeds):
    gated = Gated(tiny_pipe, batch=1, step=0)
    q = queues(loader=lambda name, device: gated)
    job = q.submit(GenerationRequest("a red cat", steps=2, batch_size=1, n_iter=3, seed=7, width=32, height=32))
    assert gated.reached.wait(20)
    assert getattr(q, action)() is job
    assert job.pending == {action}  # the public view of what was asked, before the worker acts on it
    gated.gate.set()
    # An interrupted job says so (a state of its own) and keeps the batches finished before it, and the one it
    # stopped as it stood (A1111).
    assert job.wait(20) and job.state == (INTERRUPTED if action == "interrupt" else DONE)
    assert [r.params["seed"] for r in job.results] == seeds
    assert job.pending == ({"interrupt"} if action == "interrupt" else set())  # a skip is used up by its batch


def test_failure_is_recorded_and_worker_keeps_serving(queues):
    good = FakePipeline("good")
    pipes = {"a": FakePipeline("a", fail="this model is broken: fix it"), "b": good}
    q = queues(loader=lambda name, device: pipes[name])
    bad = q.submit(GenerationRequest("x", steps=1), model="a")
    ok = q.submit(GenerationRequest("y", steps=1), model="b")
    assert bad.wait(20) and ok.wait(20)
    assert bad.state == FAILED and bad.error == "this model is broken: fix it" and bad.results == []
    assert ok.state == DONE and good.ran == ["y"]


def test_loader_error_fails_the_job_only(queues):
    def loader(name, device):
        if name == "a":
            raise FileNotFoundError("model a is gone: run `easel models`")
        return FakePipeline(name)
    q = queues(loader=loader)
    bad, ok = q.submit(GenerationRequest("x", steps=1), model="a"), q.submit(GenerationRequest("y", steps=1), model="b")
    assert bad.wait(20) and ok.wait(20)
    assert (bad.state, bad.error, ok.state) == (FAILED, "model a is gone: run `easel models`", DONE)


def test_model_switching_loads_lazily_and_rejects_unknown_names(queues):
    loads = []

    def loader(name, device):
        loads.append(name)
        return FakePipeline(str(name))
    q = queues(loader=loader, default_model="a")
    jobs = [q.submit(GenerationRequest(str(i), steps=1), model=m) for i, m in enumerate(["a", None, "b", "b", "a"])]
    assert all(j.wait(20) for j in jobs)
    assert loads == ["a", "b", "a"]  # None is the default by name: a model is kept until a job asks for another
    assert [j.results[0].params["model"] for j in jobs] == ["a", "a", "b", "b", "a"]
    for bad in ("c", "/etc/passwd", "../models/a"):
        with pytest.raises(ValueError, match="unknown model"):
            q.submit(GenerationRequest("x"), model=bad)
    q.set_default_model("b")  # e.g. A1111's POST /options: every API's model-less jobs follow it
    job = q.submit(GenerationRequest("after", steps=1))
    assert job.wait(20) and job.model == "b" and job.results[0].params["model"] == "b" and loads[-1] == "b"
    with pytest.raises(ValueError, match="unknown model"):
        q.set_default_model("c")
    assert q.default_model == "b"


def test_startup_model_path_stays_selectable_by_name(queues, tmp_path, monkeypatch):
    import easel
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"x")
    loaded = []
    monkeypatch.setattr(easel, "load", lambda spec, dtype, device: loaded.append(spec) or FakePipeline(str(spec)))
    q = queues(default_model=str(weights))  # the default loader: names resolve to what the server was given
    assert q.default_model == "mine" and q.known_models() == {"mine": str(weights.resolve())}
    q.set_default_model("a")
    q.set_default_model("mine")  # switching away and back works
    job = q.submit(GenerationRequest("p", steps=1))
    assert job.wait(20) and job.state == DONE and job.model == "mine" and loaded == [str(weights.resolve())]
    with pytest.raises(ValueError, match="never give paths"):
        q.submit(GenerationRequest("p"), model=str(weights))  # requests name models, even this one


class Raising:
    """A pipeline whose generate raises what `make()` raises."""

    def __init__(self, make):
        self.make = make

    def generate(self, req, callback=None, **hooks):
        self.make()


def _lora(tmp_path):
    from easel.weights.lora import find_lora
    find_lora("no-such-lora", dirs=[tmp_path])


def _embedding(tmp_path):
    from easel.weights.embeddings import load_embedding
    load_embedding(tmp_path / "gone.pt")


def _empty_mask(tmp_path):
    from easel.pipelines.images import mask_crop_region
    mask_crop_region(Image.new("L", (8, 8), 0))


def _plain_value_error(tmp_path):
    raise ValueError("not from easel")


def _crash(tmp_path):
    raise RuntimeError("device lost\n" + "noise " * 200)


@pytest.mark.parametrize("make, kind, error", [
    (_lora, "user", "LoRA 'no-such-lora' not found"), (_embedding, "user", "no such embedding file"),
    (_empty_mask, "user", "the mask is empty (no white pixels)"),
    (_plain_value_error, "server", "not from easel"), (_crash, "server", "RuntimeError: device lost")])
def test_user_errors_and_server_errors(queues, tmp_path, caplog, make, kind, error):
    q = queues(loader=lambda name, device: Raising(lambda: make(tmp_path)))
    with caplog.at_level("INFO", logger="easel.serve"):
        job = q.submit(GenerationRequest("x", steps=1))
        assert job.wait(20)
    assert (job.state, job.error_kind, job.to_dict()["error_kind"]) == (FAILED, kind, kind)
    assert job.error.startswith(error) and (kind == "user" or job.error == error)  # a server error: first line only
    record = next(r for r in caplog.records if getattr(r, "event", None) == "job_failed")
    assert (record.exc_info is not None) == (kind == "server")  # the traceback is logged for server errors only


def test_a_model_that_will_not_load_is_a_server_error(queues):
    q = queues()  # the default loader; "a" passes the name check but is in no model folder (deleted since?)
    job = q.submit(GenerationRequest("x", steps=1), model="a")
    assert job.wait(20) and job.state == FAILED
    assert job.error_kind == "server" and "model 'a' not found" in job.error  # easel's ValueError, but not the request's fault


def test_invalid_request_is_rejected_at_submit(queues):
    q = queues(loader=lambda name, device: FakePipeline())
    with pytest.raises(ValueError, match="steps must be at least 1"):
        q.submit(GenerationRequest("x", steps=0))
    assert q.jobs() == []


def test_progress_eta_and_preview(queues, tiny_pipe, one_thread):
    gated = Gated(tiny_pipe, batch=0, step=1)
    q = queues(loader=lambda name, device: gated)
    assert q.progress()["state"] == "idle"
    job = q.submit(GenerationRequest("a red cat", steps=4, batch_size=1, seed=1, width=32, height=32))
    assert gated.reached.wait(20)
    p = q.progress()
    assert (p["id"], p["state"], p["step"], p["total"]) == (job.id, RUNNING, 2, 4)
    assert p["eta_s"] is not None and p["eta_s"] >= 0
    png = p["preview"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    gated.gate.set()
    assert job.wait(20)
    assert q.progress(job.id)["preview"] is None and q.progress(job.id)["step"] == 4


def test_stop_cancels_queued_jobs(queues):
    gate = threading.Event()
    q = queues(loader=lambda name, device: FakePipeline(gate=gate))
    first, second = q.submit(GenerationRequest("1", steps=2)), q.submit(GenerationRequest("2", steps=2))
    wait_until(lambda: first.state == RUNNING)
    threading.Timer(0.2, gate.set).start()
    q.stop()
    assert second.state == CANCELLED and first.state == CANCELLED
    with pytest.raises(QueueFull):
        q.submit(GenerationRequest("3"))


def test_estimate_steps_counts_batches_hires_and_img2img():
    assert estimate_steps(GenerationRequest(steps=10, n_iter=3)) == 30
    assert estimate_steps(GenerationRequest(steps=10, enable_hr=True, hr_second_pass_steps=4)) == 14
    img = Image.new("RGB", (8, 8))
    assert estimate_steps(GenerationRequest(steps=10, init_images=[img], denoising_strength=0.5)) == 5


def test_forgets_oldest_finished_jobs(queues):
    q = queues(loader=lambda name, device: FakePipeline(), keep_finished=2)
    jobs = [q.submit(GenerationRequest(str(i), steps=1)) for i in range(4)]
    assert all(j.wait(20) for j in jobs)
    assert [j.id for j in q.jobs()] == [jobs[2].id, jobs[3].id] and q.get(jobs[0].id) is None
    assert QUEUED not in {j.state for j in q.jobs()}
