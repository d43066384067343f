"""Training jobs through a real server on the built-in model: a LoRA trained in 2 steps and then used by a
generation, an embedding, cancel (checkpoint kept, no output file, resumed by the same request), the train root
as the only place datasets come from, and bad settings as 4xx naming the fix."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from easel.serve.app import Settings
from tests.serve.conftest import builtin_pipe

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60), "yellow": (230, 210, 40)}


def write_dataset(folder: Path, n: int = 4) -> Path:
    """n 64x64 pictures of a circle with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (colour, rgb) in enumerate(list(COLOURS.items())[:n]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((12 + k, 12, 50, 50), fill=rgb)
        im.save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"a {colour} circle")
    return folder


@pytest.fixture
def train_env(tmp_path, monkeypatch):
    """(root, loras, embeddings): a train root with the dataset 'circles'; results go to the tmp folders."""
    root = tmp_path / "root"
    write_dataset(root / "circles")
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    monkeypatch.setenv("EASEL_LORA_DIRS", str(loras))
    monkeypatch.setenv("EASEL_EMBEDDING_DIRS", str(embeddings))
    monkeypatch.chdir(tmp_path)  # run folders under ./outputs/train
    return root, loras, embeddings


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] not in (
            "done", "failed", "cancelled", "interrupted"):
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.05)
    return job


def lora_body(**kw) -> dict:
    return {"kind": "lora", "dataset": "circles", "name": "circles", "steps": 2, "batch_size": 2, "rank": 2} | kw


def test_training_is_off_without_a_train_root(start_server):
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for r in (c.post("/api/v1/train", json=lora_body()), c.get("/api/v1/train/datasets")):
            assert r.status_code == 403 and "--train-root" in r.json()["error"]
        assert c.get("/ui/config.json").json()["training"] is False


def test_lora_job_trains_and_generation_uses_the_lora(start_server, train_env):
    root, loras, _ = train_env
    weights = {k: v.clone() for k, v in list(builtin_pipe().loaded.model.state_dict().items())[::40]}
    server = start_server(Settings(train_root=str(root)))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/api/v1/train/datasets").json()["datasets"] == [{"name": "circles", "images": 4}]
        r = c.post("/api/v1/train", json=lora_body(sample_every=1, sample_prompts=["a red circle"]))
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "done" and job["kind"] == "train", job
        assert (job["step"], job["total"]) == (2, 2)
        train = job["train"]
        assert train["result"]["file"] == "circles.safetensors" and train["result"]["steps"] == 2
        assert train["use"] == "<lora:circles:1>" and train["loss"] is not None and train["resumed_from"] is None
        assert (loras / "circles.safetensors").is_file()
        records = c.get(f"/api/v1/train/{job['id']}/log").json()["records"]
        assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
        assert c.get(f"/api/v1/train/{job['id']}/log", params={"after": 1}).json()["records"][0]["step"] == 2
        assert [s["step"] for s in train["samples"]] == [0, 1, 2]  # before each step, and at the end
        png = c.get(train["samples"][-1]["url"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert c.get(f"/api/v1/train/{job['id']}/samples/7.png").status_code == 404
        assert "circles" in [x["name"] for x in c.get("/api/v1/loras").json()]

        gen = c.post("/api/v1/jobs", json={"prompt": "a red circle <lora:circles:1>", "steps": 2, "seed": 1})
        assert gen.status_code == 202, gen.text
        done = wait_job(c, gen.json()["id"])
        assert done["state"] == "done", done
        assert "circles" in done["params"][0]["lora_hashes"]  # loaded and applied, not just named
        listed = c.get("/api/v1/jobs", params={"kind": "train"}).json()
        assert [j["id"] for j in listed] == [job["id"]]
        ui_row = next(j for j in c.get("/ui/jobs").json() if j["id"] == job["id"])
        assert ui_row["mode"] == "train" and ui_row["prompt"] == "train lora circles on circles"
        # the same name again is refused unless asked to replace it
        again = c.post("/api/v1/train", json=lora_body())
        assert again.status_code == 409 and "overwrite" in again.json()["error"]
    after = builtin_pipe().loaded.model.state_dict()
    assert all(after[k].equal(v) for k, v in weights.items())  # the served model is untouched


def test_embedding_job_writes_the_embedding(start_server, train_env):
    root, _, embeddings = train_env
    server = start_server(Settings(train_root=str(root)))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/api/v1/train", json={"kind": "embedding", "dataset": "circles", "name": "roundthing",
                                          "init_word": "circle", "steps": 2, "batch_size": 2})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "done", job
        assert job["train"]["use"] == "roundthing" and job["train"]["result"]["vectors"] == 1
    from easel.weights.embeddings import load_embedding
    assert load_embedding(embeddings / "roundthing.safetensors").num_vectors == 1


def test_cancel_stops_at_a_step_keeps_the_checkpoint_and_resumes(start_server, train_env):
    root, loras, _ = train_env
    server = start_server(Settings(train_root=str(root)))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        job_id = c.post("/api/v1/train", json=lora_body(steps=400)).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/api/v1/jobs/{job_id}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        assert job["phase"] == "training" and job["total"] == 400
        assert c.delete(f"/api/v1/jobs/{job_id}").status_code == 200
        job = wait_job(c, job_id)
        assert job["state"] == "cancelled" and 1 <= job["step"] < 400, job
        assert not (loras / "circles.safetensors").exists()  # nothing half-written, nothing written
        run = Path("outputs/train/lora-circles")
        import torch
        stopped = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
        assert stopped >= job["step"]
        # the same request with a few more steps continues from the checkpoint
        again = c.post("/api/v1/train", json=lora_body(steps=stopped + 1))
        assert again.status_code == 202, again.text
        done = wait_job(c, again.json()["id"])
        assert done["state"] == "done" and done["train"]["result"]["steps"] == stopped + 1
        assert done["train"]["resumed_from"] == stopped
        assert [r["step"] for r in c.get(f"/api/v1/train/{done['id']}/log").json()["records"]][-1] == stopped + 1
        assert (loras / "circles.safetensors").is_file()
        # and the server still generates
        gen = c.post("/api/v1/jobs", json={"prompt": "a blue circle", "steps": 2})
        assert wait_job(c, gen.json()["id"])["state"] == "done"


@pytest.mark.parametrize("dataset", ["../root", "/etc", "~", "circles/../../", "missing", ".hidden", "out",
                                     "circles\\..", "", "a\x00b"])
def test_datasets_outside_the_root_are_refused(start_server, train_env, dataset, tmp_path):
    root, _, _ = train_env
    (root / ".hidden").mkdir()
    write_dataset(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "out")  # a link out of the root
    server = start_server(Settings(train_root=str(root)))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/api/v1/train", json=lora_body(dataset=dataset))
        assert r.status_code in (400, 422), r.text
        if r.status_code == 400:
            assert "not a folder under this server's train root" in r.json()["error"]
        assert [d["name"] for d in c.get("/api/v1/train/datasets").json()["datasets"]] == ["circles"]
    assert not server.queue.jobs()


def test_bad_settings_are_4xx_naming_the_fix(start_server, train_env, tmp_path):
    root, loras, _ = train_env
    nocaps = root / "nocaps"
    nocaps.mkdir()
    Image.new("RGB", (64, 64)).save(nocaps / "x.png")
    loras.mkdir()
    (loras / "taken.safetensors").write_bytes(b"x")
    server = start_server(Settings(train_root=str(root), max_train_steps=100, max_batch=4))
    cases = [({"steps": 1000}, 400, "--max-train-steps"), ({"batch_size": 8}, 400, "--max-batch"),
             ({"name": "../x"}, 422, "name"), ({"kind": "embedding"}, 400, "init_word"),
             ({"lr": -1}, 422, "lr"), ({"lr_scheduler": "wavy"}, 422, "lr_scheduler"),
             ({"rank": 0}, 422, "rank"), ({"nope": 1}, 422, "nope"), ({"model": "nosuch"}, 400, "unknown model"),
             ({"dataset": "nocaps"}, 400, "missing caption: nocaps/x.png has no x.txt"),
             ({"name": "taken"}, 409, "overwrite: true"),
             ({"dataset": "nocaps", "on_bad": "error"}, 400, "on_bad skip"),
             ({"sample_every": 5, "steps": 2}, 400, "sample_every"), ({"resolution": 4096}, 400, "--max-pixels"),
             ({"sample_prompts": ["a <lora:/etc/shadow:1>"]}, 400, "sample_prompts[0]: prompt: LoRA '/etc/shadow' "
              "is not one of this server's LoRAs")]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for fields, status, words in cases:
            r = c.post("/api/v1/train", json=lora_body(**fields))
            assert r.status_code == status and words in r.json()["error"], (fields, r.status_code, r.text)
        assert c.get("/api/v1/train/nosuch/log").status_code == 404
    assert not server.queue.jobs()


def test_openapi_lists_the_training_routes(start_server):
    server = start_server()
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for path in ("/api/v1/train", "/api/v1/train/datasets", "/api/v1/train/{job_id}/log",
                 "/api/v1/train/{job_id}/samples/{step}.png"):
        assert path in spec["paths"], path
    body = spec["components"]["schemas"]["TrainBody"]
    assert {"kind", "dataset", "name", "steps", "rank", "lr", "init_word", "sample_every"} <= set(body["properties"])
    assert {"403", "409", "413"} <= set(spec["paths"]["/api/v1/train"]["post"]["responses"])
    assert "kind" in [p["name"] for p in spec["paths"]["/api/v1/jobs"]["get"]["parameters"]]


def test_serve_flags_turn_training_on(tmp_path):
    import argparse

    from easel.serve import cli as serve_cli
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_parser(parser.add_subparsers(dest="command"))
    parse = lambda argv: parser.parse_args(["serve", *argv])  # noqa: E731
    s = serve_cli.settings_from_args(parse([]))
    assert s.train_root is None and s.max_train_steps == 5000  # off by default
    s = serve_cli.settings_from_args(parse(["--train-root", str(tmp_path), "--max-train-steps", "50"]))
    assert (s.train_root, s.max_train_steps) == (str(tmp_path), 50)
    with pytest.raises(ValueError, match="--train-root .*no such folder"):
        serve_cli.settings_from_args(parse(["--train-root", str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match="--max-train-steps must be positive"):
        serve_cli.settings_from_args(parse(["--max-train-steps", "0"]))
