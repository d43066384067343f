"""The native task jobs over real HTTP (issue 13): POST /api/v1/animate, /api/v1/xyz and /api/v1/extras run on the
queue with the generations, report progress, stop on DELETE keeping what was made, hand out their files, and refuse
what will not run with a 4xx naming the field or the limit (before anything is queued)."""
from __future__ import annotations

import collections
import importlib.util
import io
import time

import httpx
import pytest
from PIL import Image

from easel.serve.app import Settings
from easel.serve.jobs import JobQueue
from tests.serve.conftest import Gated, builtin_pipe
from tests.serve.test_a1111 import b64_png

LIMITS = Settings(max_queue=8, max_pixels=96 * 96, max_steps=10, max_batch=8, max_input_pixels=64 * 64,
                  max_memory_bytes=2**30)
TRAVEL = {"prompts": ["a red circle", "a blue square"], "frames": 3, "steps": 2, "seed": 5}
PLOT = {"prompt": "a red star above a blue circle", "steps": 2, "seed": 3,
        "axes": [{"axis": "x", "field": "cfg_scale", "values": "3,7"},
                 {"axis": "y", "field": "steps", "values": [1, 2]}]}
FINISHED = ("done", "failed", "cancelled", "interrupted")


@pytest.fixture
def server(start_server):
    return start_server(LIMITS)


class GatedTask(Gated):
    """A pipeline whose `hold_at`-th run (0: the first frame or cell) waits at its first step until the test opens
    the gate; with the model config that the tasks read."""

    def __init__(self, pipe, hold_at: int = 0):
        super().__init__(pipe, batch=0, step=0)
        self.hold_at, self.runs = hold_at, 0

    @property
    def config(self):
        return self.pipe.config

    def generate(self, req, callback=None, **hooks):
        run, self.runs = self.runs, self.runs + 1
        if run != self.hold_at:
            return self.pipe.generate(req, callback, **hooks)
        return super().generate(req, callback, **hooks)


def gated_server(start_server, hold_at: int = 0):
    """(server, gate): a server whose `hold_at`-th run waits at its first step until the test opens the gate."""
    gated = GatedTask(builtin_pipe(), hold_at)
    return start_server(LIMITS, JobQueue(max_queued=8, loader=lambda name, device: gated)), gated


def wait_job(client, job_id: str, timeout: float = 60) -> dict:
    """The job's JSON once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in FINISHED:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    im = Image.open(io.BytesIO(response.content))
    im.load()
    return im


def picture(w: int = 20, h: int = 12) -> Image.Image:
    im = Image.new("RGB", (w, h), "navy")
    im.paste((250, 200, 0), (4, 3, w // 2, h - 2))
    return im


# -- animate --------------------------------------------------------------------------------------------------------

def test_animate_job_reports_frames_and_serves_file_and_frames(client):
    r = client.post("/api/v1/animate", json={**TRAVEL, "zoom": "0:(1.0), 2:(1.1)", "format": "webp"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["kind"] == "animate" and job["total"] == 3 and job["task"]["seeds"] == [5, 6]
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done["error"]
    task = done["task"]
    assert (done["step"], done["total"], task["frames_done"]) == (3, 3, 3)  # progress counts frames
    assert task["animation"] == f"/api/v1/animate/{job['id']}/animation" and len(task["frame_urls"]) == 3
    assert set(task["smoothness"]) == {"largest_step", "mean_step", "first_to_last", "ratio"}
    file = client.get(task["animation"])
    assert file.headers["content-type"] == "image/webp"
    anim = image(file)
    assert anim.n_frames == 3 and anim.size == (64, 64)
    first = image(client.get(task["frame_urls"][0]))
    text = first.info["parameters"]
    assert text.startswith("a red circle") and "Seed: 5" in text and "Steps: 2" in text
    assert "Denoising strength: 0.35" in image(client.get(task["frame_urls"][2])).info["parameters"]  # img2img
    missing = client.get(f"/api/v1/animate/{job['id']}/frames/3.png")
    assert missing.status_code == 404 and "ask for 0..2" in missing.json()["error"]
    # At its keyframe a frame is the plain generation of its prompt and seed.
    gen = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 2, "seed": 5, "batch_size": 1})
    assert wait_job(client, gen.json()["id"])["state"] == "done"
    plain = image(client.get(f"/api/v1/jobs/{gen.json()['id']}/images/0.png"))
    assert plain.tobytes() == first.convert("RGB").tobytes()
    listed = client.get("/api/v1/jobs", params={"kind": "animate"}).json()
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/ui/jobs").status_code == 200  # the web UI's queue lists task jobs too


@pytest.mark.parametrize("fields, status, what", [
    ({"frames": 1000}, 400, "max_frames"),
    ({"steps": 50}, 400, "max_steps"),
    ({"width": 128, "height": 128}, 400, "max_pixels"),
    ({"zoom": "0:(foo)"}, 400, "unknown name 'foo' in zoom"),
    ({"zoom": "0:(9**9**9)"}, 400, "zoom"),
    ({"zoom": "0:(" + "-" * 2000 + "1)"}, 422, "zoom"),
    ({"strength": "0:(1.5)"}, 400, "strength must stay within 0..1"),
    ({"keyframes": [0, 5]}, 400, "keyframes must start at 0, increase, and stay below frames=3"),
    ({"seeds": [1]}, 400, "got 1 seeds for 2 prompts"),
    ({"prompts": ["a <lora:nowhere:1> star"]}, 400, "prompts[0]: LoRA 'nowhere' is not one of this server's LoRAs"),
    ({"sampler": "nope"}, 400, "sampler"),
    ({"format": "avi"}, 422, "format"),
    ({"prompts": []}, 422, "prompts"),
    ({"seed": 2**40}, 422, "seed"),
])
def test_animate_refuses_bad_requests_before_queueing(client, server, fields, status, what):
    r = client.post("/api/v1/animate", json={**TRAVEL, **fields})
    assert r.status_code == status, r.text
    assert what in r.json()["error"]
    assert server.queue.jobs() == []  # nothing was queued


def test_animate_refuses_frames_times_pixels_over_the_limit(client, server, monkeypatch):
    from easel.serve import animate_job
    monkeypatch.setattr(animate_job, "MAX_ANIMATION_PIXELS", 10 * 64 * 64)
    r = client.post("/api/v1/animate", json={**TRAVEL, "frames": 11, "width": 64, "height": 64})
    assert r.status_code == 400 and r.json()["limit"] == "max_animation_pixels"
    assert "frames x width x height (11 x 64x64)" in r.json()["error"]
    assert r.json()["error"].endswith("(max_animation_pixels); ask for less")  # no server flag sets it: none named


def test_animate_cancel_keeps_the_frames_made(start_server):
    server, gated = gated_server(start_server, hold_at=2)  # holds the third frame
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job = c.post("/api/v1/animate", json={**TRAVEL, "frames": 6}).json()
        assert gated.reached.wait(30)
        running = c.get(f"/api/v1/jobs/{job['id']}").json()
        assert running["state"] == "running" and (running["step"], running["total"]) == (2, 6)
        assert c.get(f"/api/v1/animate/{job['id']}/frames/1.png").status_code == 200  # ready as soon as made
        assert c.get(f"/api/v1/animate/{job['id']}/animation").status_code == 409  # not finished yet
        assert c.delete(f"/api/v1/jobs/{job['id']}").json()["cancel_requested"]
        gated.gate.set()
        done = wait_job(c, job["id"])
        assert done["state"] == "cancelled" and done["task"]["frames_done"] == 2  # the frame being drawn is dropped
        assert image(c.get(f"/api/v1/animate/{job['id']}/animation")).n_frames == 2
        assert c.delete(f"/api/v1/jobs/{job['id']}").status_code == 409


def test_deeply_nested_schedule_is_a_clear_error():
    from easel.animate import parse_schedule
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_schedule("0:(" + "-" * 5000 + "1)", "zoom")
    with pytest.raises(ValueError, match="zoom '0:\\(9\\*\\*9\\*\\*9\\)' fails at frame 0"):
        parse_schedule("0:(9**9**9)", "zoom").at(0)  # a float overflow at once, not an integer of 370M digits


# -- X/Y/Z plot -----------------------------------------------------------------------------------------------------

def test_xyz_job_makes_grid_and_cells(client):
    r = client.post("/api/v1/xyz", json=PLOT)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "xyz" and job["total"] == 1 + 1 + 2 + 2  # the steps of every cell
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done["error"]
    task = done["task"]
    assert task["shape"] == [2, 2, 1] and task["cells_done"] == 4 and done["step"] == 6
    assert [a["labels"] for a in task["axes"]] == [["CFG Scale: 3", "CFG Scale: 7"], ["Steps: 1", "Steps: 2"]]
    grid = image(client.get(task["grid"]))
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # two columns and two rows of 64 px, and the labels
    assert 'Script: X/Y/Z plot, X Type: CFG Scale, X Values: "3,7", Y Type: Steps, Y Values: "1,2"' in \
        grid.info["parameters"]
    cells = [image(client.get(u)) for u in task["cell_urls"]]
    assert [c.size for c in cells] == [(64, 64)] * 4
    texts = [c.info["parameters"] for c in cells]  # X fastest, then Y
    assert "Steps: 1" in texts[0] and "CFG scale: 3" in texts[0] and "CFG scale: 7" in texts[1]
    assert "Steps: 2" in texts[2] and all("Seed: 3" in t for t in texts)
    assert client.get(f"/api/v1/xyz/{job['id']}/cells/4.png").status_code == 404
    wrong = client.get(f"/api/v1/jobs/{job['id']}/images/0.png")  # a generation's route: says where the files are
    assert wrong.status_code == 404 and "(xyz) is not a generation" in wrong.json()["error"]


@pytest.mark.parametrize("axes, status, what", [
    ([{"axis": "x", "field": "stepz", "values": "1,2"}], 400, "did you mean 'steps'"),
    ([{"axis": "x", "field": "steps", "values": "a,b"}], 400, "axes[0] (x): steps: 'a' is not a whole number"),
    ([{"axis": "x", "field": "model", "values": "a,b"}], 400, "script_name \"x/y/z plot\""),
    ([{"axis": "x", "field": "seed", "values": "1-9"}], 400, "max_batch"),
    ([{"axis": "x", "field": "steps", "values": "1"}, {"axis": "x", "field": "seed", "values": "1"}], 400,
     "axes: give each of x, y and z at most once (x given twice)"),
    ([{"axis": "x", "field": "seed", "values": "1,2"}, {"axis": "y", "field": "size", "values": "64x64,4x4"}], 400,
     "x axis seed=1, y axis size=4x4: width must be a positive multiple of 8"),
    ([{"axis": "x", "field": "steps", "values": "20,30"}], 400, "max_steps"),
    ([{"axis": "x", "field": "hr_upscaler", "values": "/etc/passwd"}], 400, "never a path"),
    ([{"axis": "x", "field": "prompt_sr", "values": "green,blue"}], 400, "x axis prompt_sr: the first value 'green' is "
     "not in the prompt"),
    ([], 422, "axes"),
    ([{"axis": "w", "field": "steps", "values": "1"}], 422, "axes.0.axis"),
])
def test_xyz_refuses_bad_axes_before_queueing(client, server, axes, status, what):
    r = client.post("/api/v1/xyz", json={**PLOT, "axes": axes})
    assert r.status_code == status, r.text
    assert what in r.json()["error"]
    assert server.queue.jobs() == []


def test_xyz_refuses_inspect(client):
    r = client.post("/api/v1/xyz", json={**PLOT, "inspect": True})
    assert r.status_code == 400 and "does not capture inside" in r.json()["error"]


def test_xyz_cancel_keeps_cells_and_has_no_grid(start_server):
    server, gated = gated_server(start_server, hold_at=1)  # holds the second cell
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job = c.post("/api/v1/xyz", json=PLOT).json()
        assert gated.reached.wait(30)
        c.delete(f"/api/v1/jobs/{job['id']}")
        gated.gate.set()
        done = wait_job(c, job["id"])
        assert done["state"] == "cancelled" and done["task"]["cells_done"] == 1 and done["task"]["grid"] is None
        grid = c.get(f"/api/v1/xyz/{job['id']}/grid.png")
        assert grid.status_code == 409 and "after 1 of 4 cells" in grid.json()["error"]
        assert image(c.get(f"/api/v1/xyz/{job['id']}/cells/0.png")).size == (64, 64)


# -- extras ---------------------------------------------------------------------------------------------------------

def test_extras_job_upscales_and_keeps_parameters(client):
    from PIL import PngImagePlugin
    src = picture()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a red star\nSteps: 2, Seed: 7")
    buf = io.BytesIO()
    src.save(buf, format="PNG", pnginfo=meta)
    import base64
    r = client.post("/api/v1/extras", json={"image": base64.b64encode(buf.getvalue()).decode(), "scale": 3})
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "extras" and r.json()["task"]["output_size"] == [60, 36]
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "done", done["error"]
    out = image(client.get(done["task"]["image"]))
    assert out.size == (60, 36) and out.convert("RGB").tobytes() == src.resize((60, 36), Image.LANCZOS).tobytes()
    assert out.info["parameters"] == ("a red star\nSteps: 2, Seed: 7\n"
                                      "Postprocess upscale by: 3, Postprocess upscaler: lanczos")


@pytest.mark.parametrize("fields, status, what", [
    ({"upscaler": "/etc/passwd"}, 400, "never a path"),
    ({"upscaler": "4x-Nothing"}, 400, "not one of this server's upscalers"),
    ({"upscaler": "None"}, 400, "upscales nothing"),
    ({"scale": 10}, 413, "max_pixels"),
    ({"scale": 0}, 422, "scale"),
    ({"scale": 100}, 422, "scale"),
    ({"image": "not base64!"}, 400, "image is not base64"),
    ({"image": b64_png(picture(80, 80))}, 400, "max_input_pixels"),
])
def test_extras_refuses_bad_requests(client, server, fields, status, what):
    r = client.post("/api/v1/extras", json={"image": b64_png(picture()), **fields})
    assert r.status_code == status, r.text
    assert what in r.json()["error"]
    assert server.queue.jobs() == []


def test_extras_cancelled_while_queued(start_server):
    server, gated = gated_server(start_server)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        hold = c.post("/api/v1/jobs", json={"prompt": "hold", "steps": 2, "batch_size": 1}).json()
        assert gated.reached.wait(30)
        job = c.post("/api/v1/extras", json={"image": b64_png(picture())}).json()
        assert job["state"] == "queued" and job["position"] == 0
        assert c.delete(f"/api/v1/jobs/{job['id']}").status_code == 200
        gated.gate.set()
        assert wait_job(c, job["id"])["state"] == "cancelled"
        gone = c.get(f"/api/v1/extras/{job['id']}/image.png")
        assert gone.status_code == 409 and "before the image was finished" in gone.json()["error"]
        assert wait_job(c, hold["id"])["state"] == "done"
        wrong = c.get(f"/api/v1/extras/{hold['id']}/image.png")  # a generation is not an upscale
        assert wrong.status_code == 404 and "no upscale job" in wrong.json()["error"]


def test_web_ui_queue_lists_every_task_kind(client):
    """/ui/jobs read training fields off any task and answered 500 once an A1111 Extras job was remembered."""
    assert client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(picture()), "upscaler_1": "Lanczos"}
                       ).status_code == 200
    job = client.post("/api/v1/extras", json={"image": b64_png(picture()), "scale": 2}).json()
    wait_job(client, job["id"])
    listed = client.get("/ui/jobs")
    assert listed.status_code == 200, listed.text
    assert [(j["mode"], j["prompt"]) for j in listed.json()] == [("extras", "extras"),
                                                                  ("extras", "upscale 20x12 to 40x24 (lanczos)")]


@pytest.mark.skipif(importlib.util.find_spec("spandrel") is None, reason="spandrel is not installed")
def test_extras_with_an_upscaler_file(start_server, tmp_path, monkeypatch):
    from tests.test_upscale import arch, write_safetensors
    write_safetensors(arch("compact", 2), tmp_path / "models" / "upscalers" / "RealESRGAN_x2plus.safetensors")
    monkeypatch.setenv("EASEL_MODELS", str(tmp_path / "models"))
    server = start_server(LIMITS)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        listed = c.get("/api/v1/upscalers").json()
        assert listed == [{"name": "lanczos", "kind": "pixel", "scale": None},
                          {"name": "nearest", "kind": "pixel", "scale": None},
                          {"name": "R-ESRGAN 2x+", "kind": "model", "scale": 2}]
        job = c.post("/api/v1/extras", json={"image": b64_png(picture()), "upscaler": "R-ESRGAN 2x+"}).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "done" and done["total"] >= 1 and done["step"] == done["total"]  # tiles
        out = image(c.get(done["task"]["image"]))
        assert out.size == (40, 24) and "Postprocess upscaler: R-ESRGAN 2x+" in out.info["parameters"]


# -- the schema -----------------------------------------------------------------------------------------------------

def test_task_routes_are_documented(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/animate", "/api/v1/xyz", "/api/v1/extras"):
        post = spec["paths"][path]["post"]
        assert {"202", "400", "413", "422", "503"} <= set(post["responses"]), path
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    for path in ("/api/v1/animate/{job_id}/animation", "/api/v1/animate/{job_id}/frames/{n}.png",
                 "/api/v1/xyz/{job_id}/grid.png", "/api/v1/xyz/{job_id}/cells/{n}.png",
                 "/api/v1/extras/{job_id}/image.png"):
        assert {"200", "400", "404", "409"} <= set(spec["paths"][path]["get"]["responses"]), path
    kind = next(p for p in spec["paths"]["/api/v1/jobs"]["get"]["parameters"] if p["name"] == "kind")
    assert kind["description"] == "only jobs of this kind: generate, train, animate, xyz, extras"


@pytest.mark.slow
def test_task_routes_under_schema_fuzzing(start_server):
    """The schema fuzzing of tests/serve/test_fuzz.py, more examples, on these routes only."""
    from tests.serve.test_fuzz import FUZZ_LIMITS, _fuzz_operation, describe, schemathesis
    server = start_server(FUZZ_LIMITS)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    report = {"calls": 0, "by_status": collections.Counter(), "failures": [],
              "by_operation": collections.defaultdict(collections.Counter)}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.startswith(("/api/v1/animate", "/api/v1/xyz", "/api/v1/extras", "/api/v1/upscalers")):
            _fuzz_operation(op, server.url, 15, report)
            _fuzz_operation(op, server.url, 5, report, negative=True)
    assert len(report["by_operation"]) == 9 and report["calls"] > 100
    assert not report["failures"], describe(report["failures"])
    for job in server.queue.jobs():  # what the fuzzing queued: stopped, so the server closes quickly
        server.queue.cancel(job.id)
