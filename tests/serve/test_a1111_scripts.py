"""A1111's script_name "x/y/z plot" and styles over HTTP (issue 13): the grid then the cells with their infotexts,
every cell a job on the queue, every error a 400 before anything runs; the built-in model, 1-2 steps at 64 px."""
from __future__ import annotations

import json

import pytest

from easel.pipelines.metadata import parse_infotext
from easel.serve.app import Settings
from easel.xyz_a1111 import menu
from tests.serve.test_a1111 import decode

FAST = {"prompt": "a red star above a blue circle", "steps": 2, "batch_size": 1, "seed": 3}


def index(label: str) -> int:
    """A1111's txt2img axis menu index of a label (what its clients send as the type)."""
    return [lbl for lbl, _ in menu(False)].index(label)


@pytest.fixture
def server(start_server, tmp_path, monkeypatch):
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nphoto,{prompt}; a photo,blurry\n")
    monkeypatch.setenv("EASEL_STYLES", str(tmp_path / "styles.csv"))
    return start_server(Settings(max_queue=4, max_batch=6))


def test_xyz_plot_grid_then_cells_each_a_real_generation(client, server):
    before = len(server.queue.jobs())
    body = {**FAST, "script_name": "X/Y/Z Plot", "script_args": [index("Steps"), "1,2", None, "CFG Scale", "1, 7", []]}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    d, info = r.json(), json.loads(r.json()["info"])
    images = [decode(b) for b in d["images"]]
    assert len(images) == 5 and len(info["infotexts"]) == 5 and info["index_of_first_image"] == 1
    assert images[0].width > 2 * 64 and images[0].height > 2 * 64  # the labelled grid
    assert "Script: X/Y/Z plot" in info["infotexts"][0] and images[0].text["parameters"] == info["infotexts"][0]
    cells = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [(c["Steps"], c["CFG scale"]) for c in cells] == [("1", "1"), ("2", "1"), ("1", "7"), ("2", "7")]
    assert all(c["Seed"] == "3" for c in cells) and info["all_seeds"] == [3] * 5
    assert len(server.queue.jobs()) == before + 4  # every cell ran as its own job on the queue
    plain = client.post("/sdapi/v1/txt2img", json={**FAST, "cfg_scale": 7})
    assert decode(plain.json()["images"][0]).tobytes() == images[4].tobytes()


@pytest.mark.parametrize("body, message", [
    ({"script_name": "Prompt matrix", "script_args": []}, "'x/y/z plot'"),
    ({"script_name": "x/y/z plot", "script_args": ["Steps", "0,1", None]}, "steps"),
    ({"script_name": "x/y/z plot", "script_args": ["VAE", "a", None]}, "not supported by easel"),
    ({"script_name": "x/y/z plot", "script_args": ["Checkpoint name", "/etc/passwd", None]}, "checkpoint"),
    ({"script_name": "x/y/z plot", "script_args": ["Steps", "1-7", None]}, "max_batch"),
    ({"script_name": "x/y/z plot", "script_args": ["Steps"]}, "script_args"),
    ({"script_name": "x/y/z plot", "script_args": ["Prompt S/R", "green,blue", None]}, "not in the prompt"),
    ({"script_name": "x/y/z plot", "script_args": ["Styles", "photo,nope", None]}, "nope"),
    ({"script_name": "x/y/z plot", "script_args": ["Hires upscaler", "Lanczos,/etc/x.pth", None]}, "never a path"),
    ({"script_name": "x/y/z plot", "script_args": ["Refiner checkpoint", "/etc/passwd", None]}, "refiner"),
])
def test_xyz_errors_are_400s_before_anything_runs(client, server, body, message):
    before = len(server.queue.jobs())
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **body})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert len(server.queue.jobs()) == before


def test_styles_apply_and_are_listed(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "steps": 1, "styles": ["photo"]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["styles"] == ["photo"] and "styles" not in info["unsupported"]
    text = parse_infotext(info["infotexts"][0])
    assert text["prompt"] == FAST["prompt"] + "; a photo" and text["negative_prompt"] == "blurry"
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "styles": ["nope"]})
    assert r.status_code == 400 and "photo" in r.json()["error"]
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "photo", "prompt": "{prompt}; a photo", "negative_prompt": "blurry"}]
    assert client.get("/sdapi/v1/scripts").json()["txt2img"] == ["x/y/z plot"]


def test_xyz_checkpoint_axis_takes_the_server_titles(client):
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles
    body = {**FAST, "steps": 1, "script_name": "x/y/z plot", "script_args": ["Checkpoint name", titles[0], []]}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and "X Type: Checkpoint" in json.loads(r.json()["info"])["infotexts"][0]
