"""The built-in ShapeWorld model: works with no flags, and a fixed prompt and seed give the same pixels (bit-exact on
a platform with a recorded hash, within a small tolerance elsewhere: see tests/golden)."""
import pytest
import torch

import easel
from easel.cli import main
from easel.weights.registry import builtin_model

pytestmark = pytest.mark.skipif(builtin_model() is None, reason="this install has no built-in model")

def test_golden_images():
    """Update with `python scripts/golden.py --update` when a change alters them on purpose (and say so)."""
    from tests import golden
    images = golden.render()
    assert len(images) == 4 and images[0].size == (64, 64)
    recorded = golden.manifest()["platforms"].get(golden.platform_key())
    if recorded is not None:  # this platform's bits were recorded: they must repeat exactly
        assert golden.pixel_hash(images) == recorded, f"built-in model output changed: {golden.pixel_hash(images)}"
        return
    diff = golden.difference(images, golden.reference_images())
    assert golden.within_tolerance(diff), f"built-in model output changed beyond float noise: {diff}"


def test_golden_tolerance_tells_a_changed_picture_from_float_noise():
    from tests import golden
    references = golden.reference_images()
    assert golden.within_tolerance(golden.difference(references, references))
    other_seed = golden.render_seed(golden.SEED + 1)
    assert not golden.within_tolerance(golden.difference(other_seed, references))


def test_platform_key_names_torch_and_the_cpu_kernels():
    import torch
    from tests import golden
    key = golden.platform_key()
    assert torch.__version__ in key and torch.backends.cpu.get_cpu_capability() in key


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
