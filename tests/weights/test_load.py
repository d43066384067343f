"""Reading weight files: safe pickles only, clear errors, atomic writes."""
import os

import pytest
import torch

from easel.weights.load import CheckpointError, UnsafeCheckpointError, read_state_dict, write_safetensors


class RunsCode:
    """A pickle payload that would create a file if unpickled with the unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="ran none of its code"):
        read_state_dict(path)
    assert not marker.exists()


def test_lightning_ckpt_is_unwrapped(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.arange(3.0)}, "global_step": 5}, path)
    sd, meta = read_state_dict(path)
    assert list(sd) == ["a.weight"] and meta == {}
    assert torch.equal(sd["a.weight"], torch.arange(3.0))


def test_safetensors_roundtrip_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors({"k": torch.randn(3, 4)}, path, {"easel_config": "{}"})
    sd, meta = read_state_dict(path)
    assert sd["k"].shape == (3, 4) and meta["easel_config"] == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp files left


@pytest.mark.parametrize("name,content,match", [
    ("bad.safetensors", b"not a safetensors file", "not a readable .safetensors"),
    ("bad.ckpt", b"garbage", "not a readable checkpoint"),
    ("model.onnx", b"x", "unknown weights format"),
])
def test_bad_files_get_clear_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "nope.safetensors")
