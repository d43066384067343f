"""Training checkpoints and caches load with weights_only: a crafted pickle in a run folder never runs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from easel.training.common import LoopConfig, Trainer, load_checkpoint, rng_state
from easel.weights.load import UnsafeCheckpointError


class _Evil:
    """Pickles as a call to os.system: what an attacker puts into checkpoint.pt."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _loop(**kw) -> LoopConfig:
    return LoopConfig(steps=2, batch_size=1, warmup=1, ckpt_every=1, progress=False, **kw)


def test_crafted_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker), "step": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused to load it and ran none of its code"):
        Trainer("t", tmp_path, torch.nn.Linear(2, 2), _loop())
    assert not marker.exists()


@pytest.mark.parametrize("module,call", [("unet", "load_or_build_cache"), ("lcm", "load_latents")])
def test_crafted_latent_cache_is_refused(tmp_path, module, call):
    import importlib
    marker = tmp_path / "pwned"
    cache = tmp_path / "latents.pt"
    torch.save({"key": _Evil(marker)}, cache)
    for name in ("vae.safetensors", "vocab.json", "merges.txt"):  # the inputs the cache key digests
        (tmp_path / name).write_text("x")
    fn = getattr(importlib.import_module(f"easel.training.{module}"), call)
    args = (cache, tmp_path / "vae.safetensors", tmp_path, 1, 1, 64) if module == "unet" else (cache, None, tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        fn(*args)
    assert not marker.exists()


def test_checkpoint_resumes_with_safe_loading(tmp_path):
    model = torch.nn.Linear(2, 2)
    trainer = Trainer("t", tmp_path, model, _loop())
    trainer.step = 1
    trainer.save()
    resumed = Trainer("t", tmp_path, torch.nn.Linear(2, 2), _loop())
    assert resumed.step == 1 and torch.equal(resumed.model.weight, model.weight)


def test_checkpoint_from_before_safe_loading_still_resumes(tmp_path):
    # Older checkpoints kept numpy's RNG state as an ndarray: its reconstruction is allowed, nothing else.
    model = torch.nn.Linear(2, 2)
    trainer = Trainer("t", tmp_path, model, _loop())
    state = trainer.state()
    state["rng"] = dict(state["rng"], numpy=np.random.get_state())
    state["step"] = 1
    torch.save(state, tmp_path / "checkpoint.pt")
    expected = np.random.get_state()[1].copy()
    np.random.seed(123)
    assert Trainer("t", tmp_path, torch.nn.Linear(2, 2), _loop()).step == 1
    assert np.array_equal(np.random.get_state()[1], expected)


def test_rng_state_holds_only_safe_types(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rng.pt")) == []
    assert set(load_checkpoint(tmp_path / "rng.pt")) >= {"python", "numpy", "torch"}


def test_lcm_cli_does_not_import_the_training_module():
    # lcm -> lcm_cli only: the flags module never imports the run (it was a cycle: lcm <-> lcm_cli).
    import ast
    import inspect

    import easel.training.lcm_cli as lcm_cli
    tree = ast.parse(inspect.getsource(lcm_cli))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "easel.training.lcm" not in imported
