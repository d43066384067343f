"""`easel train lora`: on tiny SD1 / SD2 (v-prediction) / SDXL models only the LoRA learns and the frozen weights
stay bit-identical, the kohya file holds exactly the trained LoRA with its ss_* metadata, easel loads it by name,
diffusers' load_lora_weights fuses the same weights, and a killed run resumes to the same result."""
from __future__ import annotations

import json
import math

import pytest
import torch

from easel.training import lora_train
from easel.training.common import LoopConfig, load_checkpoint
from easel.training.dataset_folder import DataOptions, UserDataset
from easel.training.lora_train import LoraRun, scheduled_lr, train_lora
from easel.training.user_train import NoiseOptions
from easel.weights.lora import apply_loras, read_lora
from tests.conftest import make_tiny
from tests.training.user_data import make_folder


def tiny_run(tmp_path, base, steps=3, **kw) -> LoraRun:
    data = make_folder(tmp_path / "data", 6, sizes=((40, 40), (60, 30)))
    ds = UserDataset(data, DataOptions(resolution=32, bucket_step=16, **kw.pop("data", {})))
    loop = LoopConfig(steps=steps, batch_size=2, lr=1e-2, warmup=0, ema_decay=None, ckpt_every=100, log_every=1,
                      progress=False)
    return LoraRun(ds, base, tmp_path / "out" / "mine.safetensors", tmp_path / "out" / "mine_run", loop, rank=4, **kw)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_only_the_lora_learns(tmp_path, family):
    base = make_tiny(tmp_path, family)
    before = _snapshot(base.model)
    run = tiny_run(tmp_path, base, conv=True, text_encoder=True, noise=NoiseOptions(min_snr_gamma=5.0))
    metrics = train_lora(run)
    after = base.model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    records = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert (run.run_dir / "loss.png").exists()
    lora = read_lora(run.out)
    ups = [layer.up for layer in lora.layers.values()]
    assert metrics["layers"] == len(lora.layers) and all(float(u.abs().max()) > 0 for u in ups)  # up starts at 0
    kinds = {("te" if "_te" in stem else "unet", layer.down.ndim) for stem, layer in lora.layers.items()}
    assert kinds == {("te", 2), ("unet", 2), ("unet", 4)}  # linear, LoCon convs and text-encoder layers
    meta = lora.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_max_train_steps"] == "3" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_v_parameterization"] == str(family == "sd2")
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 6}}


def test_the_file_is_the_trained_lora_and_loads_by_name(tmp_path, monkeypatch):
    base = make_tiny(tmp_path, "sd1")
    run = tiny_run(tmp_path, base, steps=2)
    train_lora(run)
    state = load_checkpoint(run.run_dir / "checkpoint.pt")["model"]
    monkeypatch.setenv("EASEL_LORA_DIRS", str(run.out.parent))
    modules = dict(base.model.named_modules())
    with apply_loras(base.model, [("mine", 1.0)]) as patch:  # found by name in the LoRA folders
        assert patch.unmatched == [] and patch.applied == len(state) // 2
        for key in [k for k in state if k.endswith(".up")][:20]:
            path = key.removeprefix("pairs.").removesuffix(".up").replace("__", ".")
            down, up = state[key.removesuffix("up") + "down"], state[key]
            layer = modules[path]
            want = patch.originals[path] + (up.flatten(1) @ down.flatten(1)).view_as(layer.weight)  # alpha = rank
            torch.testing.assert_close(layer.weight, want, rtol=1e-6, atol=1e-7)
    from easel.pipelines.pipeline import Pipeline
    from easel.pipelines.request import GenerationRequest
    pipe = Pipeline(base)
    req = dict(seed=1, steps=3, width=32, height=32)
    plain = pipe.generate(GenerationRequest(prompt="a red circle", **req))[0].image
    with_lora = pipe.generate(GenerationRequest(prompt="a red circle <lora:mine:1>", **req))[0].image
    assert plain.tobytes() != with_lora.tobytes()


def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch):
    kw = dict(steps=4, grad_accum=2, lr_scheduler="cosine", noise=NoiseOptions(min_snr_gamma=5.0, noise_offset=0.1),
              data={"flip": True, "shuffle_tags": True, "keep_tags": 1, "caption_dropout": 0.3})
    whole = tiny_run(tmp_path / "a", make_tiny(tmp_path / "a", "sd1"), **{**kw, "data": dict(kw["data"])})
    train_lora(whole)
    resumed = tiny_run(tmp_path / "b", make_tiny(tmp_path / "b", "sd1"), **{**kw, "data": dict(kw["data"])})
    step_fn = lora_train.lora_step

    def killed_at_2(run, denoiser, latents, info, step, k=0, texts=None):
        if step == 2:
            raise KeyboardInterrupt
        return step_fn(run, denoiser, latents, info, step, k, texts)

    monkeypatch.setattr(lora_train, "lora_step", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        train_lora(resumed)
    assert load_checkpoint(resumed.run_dir / "checkpoint.pt")["step"] == 2 and not resumed.out.exists()
    monkeypatch.setattr(lora_train, "lora_step", step_fn)
    train_lora(resumed)
    a, b = read_lora(whole.out).layers, read_lora(resumed.out).layers
    assert a.keys() == b.keys() and all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)
    logs = [[json.loads(x)["loss"] for x in (r.run_dir / "log.jsonl").read_text().splitlines()]
            for r in (whole, resumed)]
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_lr_schedules():
    assert [scheduled_lr("constant", s, 10, 1.0, 2) for s in (0, 5)] == [1.0, 1.0]
    assert [scheduled_lr("constant_with_warmup", s, 10, 1.0, 2) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert scheduled_lr("cosine", 10, 10, 1.0, 0) == pytest.approx(0.0) and scheduled_lr("linear", 5, 10, 1.0, 0) == 0.5


def test_cli_trains_samples_and_reports_bad_flags(tmp_path, capsys):
    from easel.cli import main
    from easel.weights.model_io import save_model
    model = save_model(make_tiny(tmp_path / "m", "sd1"), tmp_path / "tiny.safetensors")
    data = make_folder(tmp_path / "data", 4)
    out = tmp_path / "mine.safetensors"
    args = ["train", "lora", str(data), "--model", str(model), "--steps", "2", "--batch-size", "2", "--no-progress",
            "--sample-prompt", "a red circle", "--sample-every", "1", "--rank", "2"]
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert read_lora(out).metadata["ss_sd_model_name"] == "tiny.safetensors"
    assert sorted(p.name for p in (tmp_path / "mine_run" / "samples").iterdir()) == [
        "step_000000.png", "step_000001.png", "step_000002.png"]
    assert main([*args, "--out", str(tmp_path / "mine.ckpt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--grad-accum", "0"]) == 2
    assert "--grad-accum must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_diffusers_loads_the_trained_lora_onto_the_same_base(tmp_path):
    """The kohya file, fused by diffusers' load_lora_weights onto the base saved as a diffusers folder, gives the
    same weights and UNet outputs as easel applying it."""
    from tests.weights.test_lora import _compare_outputs, _compare_weights, _diffusers_pipe
    base = make_tiny(tmp_path, "sd1")
    run = tiny_run(tmp_path, base, conv=True, text_encoder=True)
    train_lora(run)
    pipe = _diffusers_pipe(base, tmp_path / "diffusers")
    pipe.load_lora_weights(str(run.out))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    with apply_loras(base.model, [(run.out, 1.0)]) as patch:
        assert patch.unmatched == []
        _compare_weights(base.model, pipe)
        _compare_outputs(base.model, pipe, xl=False)


def test_cached_latents_equal_fresh_ones_and_are_reused(tmp_path, monkeypatch):
    from easel.training.user_train import Latents
    base = make_tiny(tmp_path, "sdxl")
    run = tiny_run(tmp_path, base, data={"flip": True})
    cache = tmp_path / "latents.pt"
    latents = Latents(base, run.data, cache, progress=False)
    assert len(latents.table) == 2 * len(run.data.items) and cache.exists()
    for i in range(len(run.data.items)):
        for flip in (False, True):
            cached, fresh = latents.get(i, None, flip), latents._encode(i, None, flip)
            assert torch.equal(cached[0], fresh[0]) and cached[1] == fresh[1]
    monkeypatch.setattr(Latents, "_encode", lambda *a: pytest.fail("encoded again instead of read back"))
    again = Latents(base, run.data, cache, progress=False)
    assert again.table.keys() == latents.table.keys()
    assert all(torch.equal(again.table[k], latents.table[k]) for k in latents.table)


@pytest.mark.slow
def test_two_processes_under_torchrun_train_the_same_lora_as_one(tmp_path):
    """One code path for 1 and N processes: DistributedDataParallel (gloo) over the same global batch gives the
    LoRA one process trains (up to float summation order), uneven bucket remainders included."""
    import subprocess
    import sys
    from easel.weights.model_io import save_model
    model = save_model(make_tiny(tmp_path / "m", "sd1"), tmp_path / "tiny.safetensors")
    data = make_folder(tmp_path / "data", 7, sizes=((40, 40), (60, 30)))  # buckets of 4 and 3: a 3-row batch too
    args = ["train", "lora", str(data), "--model", str(model), "--steps", "3", "--batch-size", "4", "--no-progress",
            "--rank", "2", "--resolution", "32", "--bucket-step", "16", "--lr", "1e-2", "--grad-accum", "2"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "easel.cli", *args, "--out", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == str(tmp_path / "two.safetensors")  # printed once, by the first process
    from easel.cli import main
    assert main([*args, "--out", str(tmp_path / "one.safetensors"), "--threads", "1"]) == 0
    a, b = read_lora(tmp_path / "one.safetensors").layers, read_lora(tmp_path / "two.safetensors").layers
    assert a.keys() == b.keys()
    assert all(float(a[k].up.abs().max()) > 0 for k in a)  # it trained
    # Equal up to float summation order: the all-reduce adds the halves' gradients in another order, and Adam's
    # normalisation turns 1e-8 gradient differences into ~1e-5 weight differences, against updates of ~1e-2.
    worst = max(float((a[k].up - b[k].up).abs().max()) for k in a)
    moved = max(float(a[k].up.abs().max()) for k in a)
    assert worst < 1e-4 < 1e-2 < moved, (worst, moved)
    assert all(torch.allclose(a[k].down, b[k].down, atol=1e-4) for k in a)


def test_text_cache_encodes_each_caption_once_and_is_reused(tmp_path, monkeypatch):
    """With the text encoders frozen, each distinct caption is encoded once, equal to a fresh encoding, and the
    table in the run folder serves the next run on the same model (and only that model)."""
    from easel.training import user_train
    from easel.training.user_train import TextCache, encode_text, token_ids
    base = make_tiny(tmp_path, "sd1")
    calls = []
    real = user_train.encode_text
    monkeypatch.setattr(user_train, "encode_text", lambda b, ids, *a: calls.append(ids[0].shape[0]) or real(b, ids, *a))
    cache = TextCache(base, tmp_path / "text.pt")
    context, pooled = cache.encode(["a red circle", "a blue circle", "a red circle"])
    assert calls == [1, 1] and pooled is None and context.shape[0] == 3
    assert torch.equal(context[0], context[2])
    with torch.no_grad():
        fresh, _ = encode_text(base, token_ids(base, ["a blue circle"]))
    assert torch.equal(context[1], fresh[0])
    cache.encode(["a blue circle"])
    assert calls == [1, 1]  # already there
    cache.save()
    again = TextCache(base, tmp_path / "text.pt")
    assert set(again.rows) == {"a red circle", "a blue circle"}
    other = make_tiny(tmp_path / "other", "sd1", seed=5)
    other.hash = "another model"
    assert TextCache(other, tmp_path / "text.pt").rows == {}
    run = tiny_run(tmp_path / "run", base, steps=2, gradient_checkpointing=True)
    train_lora(run)
    assert (run.run_dir / "text.pt").exists()
    assert "forward" not in vars(base.model.unet.input_blocks[1])  # checkpointing is off again after the run
