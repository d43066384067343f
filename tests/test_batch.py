"""`easel batch FILE`: parsing and bad-line errors, grouping, resuming, sharding by RANK/WORLD_SIZE, and the jointly
sampled images against `easel generate`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from easel.cli import main
from easel.pipelines.batch_run import (BatchFileError, JointDenoiser, make_groups, pending_groups, read_batch_file,
                                       shard)

FAST = ["--steps", "2", "--width", "32", "--height", "32"]


def write(tmp_path, *lines: str):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_lines_prompts_json_and_fixed_seeds(tmp_path):
    path = write(tmp_path, "a red cat", "", "# a comment", '{"prompt": "a blue dog", "seed": 70, "cfg_scale": 5}',
                 '{"prompt": "a star", "batch_size": 2}', "a green circle")
    lines = read_batch_file(path, {"steps": 3}, base_seed=100)
    assert [line.number for line in lines] == [1, 4, 5, 6]
    assert [line.request.prompt for line in lines] == ["a red cat", "a blue dog", "a star", "a green circle"]
    assert [line.request.steps for line in lines] == [3, 3, 3, 3]  # the flags are every line's defaults
    assert lines[1].request.cfg_scale == 5
    # a line's own seed is kept; the others count images from --seed, so each line's seeds are fixed by the file
    assert [line.seeds for line in lines] == [[100], [70], [102, 103], [104]]
    assert lines[2].paths(tmp_path)[1].name == "00005-01-103.png"


@pytest.mark.parametrize("line,expect", [
    ('{"prompt": "x", "stesp": 3}', "line 2: unknown request field 'stesp'; did you mean 'steps'?"),
    ('{"prompt": "x", "steps": "8"}', 'line 2: steps must be a whole number (got "8")'),
    ('{"prompt": "x", "width": 501}', "line 2: width must be a positive multiple of 8 (got 501); try 504"),
    ('{"prompt": "x",}', "line 2: not valid JSON"),
    ('{"prompt": ["x"]}', 'line 2: prompt must be a string (got ["x"])'),
    ('{"prompt": "x", "model": "sd15"}', "line 2: 'model' cannot change per line"),
    ('{"prompt": "x", "sampler": "bogus"}', "line 2: unknown sampler"),
])
def test_bad_lines_name_the_line_and_the_fix(tmp_path, line, expect):
    path = write(tmp_path, "fine", line)
    with pytest.raises(BatchFileError) as e:
        read_batch_file(path)
    assert expect in str(e.value)


def test_every_bad_line_is_reported_and_nothing_is_made(tmp_path, tiny_sd1_file, capsys):
    path = write(tmp_path, '{"cfg": 5}', "ok", '{"steps": 0}')
    out = tmp_path / "out"
    assert main(["batch", str(path), "--model", str(tiny_sd1_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error:") and "2 bad line(s)" in err and "Traceback" not in err
    assert "line 1: unknown request field 'cfg'" in err and "line 3: steps must be at least 1" in err
    assert not out.exists()


@pytest.mark.parametrize("text,match", [("", "holds no requests"), (b"\xff\xfe\x00x", "not UTF-8")])
def test_empty_or_binary_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ValueError, match=match):
        read_batch_file(path)


def test_random_seed_flag_is_refused(tmp_path, capsys):
    assert main(["batch", str(write(tmp_path, "x")), "--seed", "-1"]) == 2
    assert "needs a fixed --seed" in capsys.readouterr().err


def test_groups_join_consecutive_compatible_lines_up_to_max_batch(tmp_path):
    path = write(tmp_path, "a", "b", '{"prompt": "c", "cfg_scale": 3, "clip_skip": 2}', "d", "e",
                 '{"prompt": "f", "steps": 9}', '{"prompt": "g", "enable_hr": true}', "h",
                 '{"prompt": "i", "batch_size": 3}')
    groups = make_groups(read_batch_file(path), max_batch=4)
    # prompts, guidance and clip skip may differ within a group; steps, hires fix and the batch limit may not
    assert [[line.request.prompt for line in g] for g in groups] == [
        ["a", "b", "c", "d"], ["e"], ["f"], ["g"], ["h", "i"]]
    with pytest.raises(ValueError, match="--max-batch must be at least 1"):
        make_groups(read_batch_file(path), max_batch=0)


def test_shards_split_the_groups_without_overlap(tmp_path):
    lines = read_batch_file(write(tmp_path, *"abcdefg"))
    shards = [pending_groups(lines, tmp_path / "out", 2, rank, 3)[0] for rank in range(3)]
    numbers = [[line.number for g in s for line in g] for s in shards]
    assert numbers == [[1, 2, 7], [3, 4], [5, 6]]


@pytest.mark.parametrize("env,match", [({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..WORLD_SIZE-1"),
                                       ({"RANK": "x"}, "must be integers")])
def test_bad_rank_is_a_clear_error(monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        shard()


def run_batch_cli(path, model, out, *extra):
    assert main(["batch", str(path), "--model", str(model), "--out", str(out), *FAST, *extra]) == 0
    return sorted(p.name for p in out.glob("*.png"))


def test_batch_writes_named_pngs_with_infotext_like_generate(tmp_path, tiny_sd1_file, capsys):
    path = write(tmp_path, "a red cat", '{"prompt": "a blue dog", "seed": 70, "negative_prompt": "cat"}',
                 '{"prompt": "a star", "batch_size": 2, "cfg_scale": 4}')
    out = tmp_path / "out"
    names = run_batch_cli(path, tiny_sd1_file, out, "--seed", "5")
    assert names == ["00001-00-5.png", "00002-00-70.png", "00003-00-7.png", "00003-01-8.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in sorted(names, key=lambda n: n)]
    assert main(["info", "--json", str(out / "00002-00-70.png")]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["prompt"] == "a blue dog" and params["negative_prompt"] == "cat" and params["seed"] == 70
    assert params["steps"] == 2 and params["width"] == 32 and params["model_hash"]
    # the four images were sampled as one batch: each equals `easel generate` of its line (up to float order)
    for name, args in [("00002-00-70.png", ["a blue dog", "--negative-prompt", "cat", "--seed", "70"]),
                       ("00003-01-8.png", ["a star", "--cfg-scale", "4", "--seed", "8"])]:
        solo = tmp_path / name
        assert main(["generate", *args, "--model", str(tiny_sd1_file), "--out", str(solo), *FAST]) == 0
        assert np.abs(pixels(next(solo.glob("*.png"))) - pixels(out / name)).max() <= 2


def test_a_partial_run_resumes_with_the_same_images(tmp_path, tiny_sd1_file, capsys):
    path = write(tmp_path, "a", "b", "c", '{"prompt": "d", "steps": 3}')
    out = tmp_path / "out"
    names = run_batch_cli(path, tiny_sd1_file, out, "--max-batch", "2")
    before = {n: pixels(out / n) for n in names}
    # as a killed run leaves it: one image of the first group and the last line missing, a stray temp file
    (out / names[1]).unlink()
    (out / names[3]).unlink()
    (out / f".{names[1]}.abc.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert run_batch_cli(path, tiny_sd1_file, out, "--max-batch", "2") == names
    captured = capsys.readouterr()
    assert captured.out.split() == [str(out / names[1]), str(out / names[3])]  # only the missing ones
    assert "2 images written, 2 already there" in captured.err
    for n in names:  # the group was remade whole, so the remade image has the very same pixels
        assert (pixels(out / n) == before[n]).all()
    capsys.readouterr()
    run_batch_cli(path, tiny_sd1_file, out)
    assert "0 images written, 4 already there" in capsys.readouterr().err


def test_two_ranks_make_each_image_once_and_the_same_as_one_process(tmp_path, tiny_sd1_file, monkeypatch, capsys):
    path = write(tmp_path, *(f"shape {i}" for i in range(5)))
    alone = tmp_path / "alone"
    names = run_batch_cli(path, tiny_sd1_file, alone, "--max-batch", "2")
    sharded = tmp_path / "sharded"
    written = []
    for rank in (0, 1):  # what torchrun --nproc-per-node 2 sets in each process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        capsys.readouterr()
        run_batch_cli(path, tiny_sd1_file, sharded, "--max-batch", "2")
        written.append(capsys.readouterr().out.split())
    assert [len(w) for w in written] == [3, 2] and not set(written[0]) & set(written[1])
    assert sorted(p.name for p in sharded.glob("*.png")) == names
    for n in names:
        assert (pixels(sharded / n) == pixels(alone / n)).all()


def test_joint_denoiser_equals_each_lines_guided_denoiser(tiny_sd1):
    from easel.pipelines import plan
    from easel.pipelines.request import GenerationRequest
    reqs = [GenerationRequest("a red cat", "dog", steps=2, width=32, height=32, seed=1, batch_size=1),
            GenerationRequest("a (blue:1.3) star AND a circle", steps=2, width=32, height=32, seed=2, batch_size=2,
                              cfg_scale=3.0),
            GenerationRequest("a green " * 60, steps=2, width=32, height=32, seed=3, batch_size=1, cfg_scale=1.0)]
    reqs = [r.resolved(32, 1) for r in reqs]
    sigmas = plan.request_sigmas(tiny_sd1.model, reqs[0])
    guided = [plan.build_plan(tiny_sd1, r, list(range(r.batch_size)), sigmas).denoiser for r in reqs]
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = sigmas[0]
    with torch.no_grad():
        alone = [g(xs, sigma) for g, xs in zip(guided, x.split([1, 2, 1]))]
        assert torch.equal(JointDenoiser(guided[:1], [1])(x[:1], sigma), alone[0])  # the same model_call as forward
        joint = JointDenoiser(guided, [1, 2, 1])(x, sigma)
    torch.testing.assert_close(joint, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_builtin_model_batch_file(tmp_path, capsys):
    from easel.weights.registry import builtin_model
    if builtin_model() is None:
        pytest.skip("this install has no built-in model")
    path = write(tmp_path, "a red star above a blue circle", '{"prompt": "a green square", "seed": 3}')
    out = tmp_path / "out"
    assert main(["batch", str(path), "--out", str(out), "--steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00001-00-0.png", "00002-00-3.png"]
    assert Image.open(out / "00002-00-3.png").size == (64, 64)


def test_lines_that_cannot_join_run_alone_through_the_pipeline(tmp_path, tiny_sd1_file, capsys):
    """A hires-fix line (or an edit, a LoRA, ...) goes through Pipeline.generate with its own batch."""
    path = write(tmp_path, "a red cat", '{"prompt": "a blue dog", "enable_hr": true, "hr_scale": 1.5, "batch_size": 2}')
    out = tmp_path / "out"
    assert run_batch_cli(path, tiny_sd1_file, out, "--seed", "3") == ["00001-00-3.png", "00002-00-4.png",
                                                                      "00002-01-5.png"]
    assert Image.open(out / "00002-01-5.png").size == (48, 48)
    capsys.readouterr()
    assert main(["info", "--json", str(out / "00002-01-5.png")]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["enable_hr"] is True and params["seed"] == 5 and params["prompt"] == "a blue dog"


def test_controlnet_lines_never_join(tmp_path):
    """ControlNets are applied by Pipeline.generate: a line with them must not be sampled in a joint batch."""
    from easel.pipelines.batch_run import joint_key
    line = read_batch_file(write(tmp_path, "a"))[0]
    assert joint_key(line.request) is not None
    line.request.controlnets = [object()]  # any unit
    assert joint_key(line.request) is None


@pytest.mark.parametrize("fields", [{"prompt": "a {red|blue} star"}, {"prompt": "a __colour__ star"},
                                    {"prompt": "a star", "styles": ["photo"]}])
def test_lines_with_styles_or_wildcards_never_join(tmp_path, monkeypatch, fields):
    """Their prompts are drawn per image (and may bring LoRA tags) by Pipeline.generate."""
    from easel.pipelines.batch_run import joint_key
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "colour.txt").write_text("red\nblue\n")
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nphoto,{prompt} photo,\n")
    monkeypatch.setenv("EASEL_WILDCARDS", str(tmp_path / "wildcards"))
    monkeypatch.setenv("EASEL_STYLES", str(tmp_path / "styles.csv"))
    lines = read_batch_file(write(tmp_path, "a star", json.dumps(fields)))
    assert joint_key(lines[0].request) is not None and joint_key(lines[1].request) is None


@pytest.mark.parametrize("field", [{"deepcache": 3}, {"tome": 0.5}, {"cfg_cutoff": 0.6}])
def test_lines_with_other_accelerations_never_share_a_batch(tmp_path, field):
    """An acceleration changes how the whole model batch samples: a line may share one only with equal settings."""
    from easel.pipelines.batch_run import joint_key
    lines = read_batch_file(write(tmp_path, "a star", json.dumps({"prompt": "a circle", **field}),
                                  json.dumps({"prompt": "a square", **field})))
    assert joint_key(lines[0].request) != joint_key(lines[1].request) == joint_key(lines[2].request)
