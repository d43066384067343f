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
GOLDEN = "7efcb5af9762813c14662d19d26cfdbd102e6c07e1c0f62e0c3ff2f30276b71c"


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
