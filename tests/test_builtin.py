"""The built-in ShapeWorld model: works with no flags, and a fixed prompt and seed give the same pixels."""
import hashlib

import pytest
import torch

import easel
from easel.cli import main
from easel.weights.registry import builtin_model

pytestmark = pytest.mark.skipif(builtin_model() is None, reason="this install has no built-in model")

# sha256 of the raw RGB bytes of the 4 images of `three red stars`, seed 1, default settings, 1 thread.
# A change that alters them must say so in its commit and update this value.
GOLDEN = "0491bd3403862946f4144460b6a311b7f6e8f9de1736d31f2f18e13464b99370"


def test_golden_images(one_thread):
    images = easel.load().txt2img("three red stars", seed=1)
    assert len(images) == 4 and images[0].size == (64, 64)
    digest = hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()
    assert digest == GOLDEN, f"built-in model output changed: {digest}"


def test_generate_needs_no_flags(tmp_path, capsys):
    assert main(["generate", "a small red star above a blue circle", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 4
    capsys.readouterr()
    main(["info", str(sorted(tmp_path.glob("*.png"))[0])])
    assert "Model: shapeworld" in capsys.readouterr().out


def test_shipped_lcm_lora_is_for_this_model_and_changes_4_step_images(one_thread):
    """The LCM-LoRA beside the built-in model names its base by hash and is found by name, as a prompt tag."""
    from easel.weights.load import file_hash
    from easel.weights.lora import find_lora, read_lora
    lora = read_lora(find_lora("shapeworld-lcm"))
    assert lora.metadata["easel_kind"] == "lcm-lora"
    assert lora.metadata["easel_base_hash"] == file_hash(builtin_model())
    pipe = easel.load()
    opts = dict(seed=2, steps=4, sampler="lcm", scheduler="sgm_uniform", cfg_scale=1.0, batch_size=1)
    plain = pipe.txt2img("a blue circle", **opts)[0]
    fast = pipe.txt2img("a blue circle <lora:shapeworld-lcm:1>", **opts)[0]
    assert plain.tobytes() != fast.tobytes()
    assert pipe.txt2img("a blue circle", **opts)[0].tobytes() == plain.tobytes()  # unloaded bit-exactly
