"""Faults: kills (SIGKILL) during training, generation and conversion, a full disk, and the modes of what easel
writes. What must hold: no partial file or folder under a final name, finished work kept, one clear error line."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from easel.cli import main
from easel.files import DiskFullError, atomic_folder, save_image
from tests.conftest import make_tiny

REPO = Path(__file__).resolve().parent.parent


def _run_killed(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python; it is expected to SIGKILL itself at the point under test."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _visible(folder: Path) -> list[str]:
    """Names under final (not dot-temp) names: what a user or a loader would pick up."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- modes: outputs honour the umask (mkstemp/mkdtemp alone made them 0600/0700) ---------------------------------

@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_outputs_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    from easel.pipelines.metadata import save_png
    from easel.training.common import save_atomic
    from easel.weights.model_io import save_model
    tiny = make_tiny(tmp_path / "src")
    with _umask(mask):
        png = save_png(Image.new("RGB", (8, 8)), tmp_path / "out" / "a.png", {"prompt": "x", "width": 8, "height": 8})
        ckpt = tmp_path / "run" / "checkpoint.pt"
        save_atomic({"step": 1}, ckpt)
        single = save_model(tiny, tmp_path / "m.safetensors")
        folder = save_model(tiny, tmp_path / "pipe", to="diffusers")
    for f in (png, ckpt, single, single.with_suffix(".tokenizer") / "vocab.json", folder / "model_index.json",
              folder / "unet" / "diffusion_pytorch_model.safetensors"):
        assert _mode(f) == file_mode, f
    for d in (single.with_suffix(".tokenizer"), folder, folder / "unet", folder / "tokenizer"):
        assert _mode(d) == dir_mode, d


# -- full disk ----------------------------------------------------------------------------------------------------

def _fail_after(n_bytes: int):
    """A PIL save that writes `n_bytes` and then meets a full disk."""
    def save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG" + b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_full_disk_while_saving_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _fail_after(1000))
    with pytest.raises(DiskFullError, match=r"no space left on the disk while writing .*a\.png"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_writing_a_folder_leaves_no_folder(tmp_path):
    with pytest.raises(DiskFullError):
        with atomic_folder(tmp_path / "pipe") as tmp:
            (tmp / "half.json").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_generate_on_a_full_disk_is_one_clear_line(tmp_path, tiny_sd1_file, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(Image.Image, "save", _fail_after(100))
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--steps", "1", "--width", "16", "--height", "16",
                 "-n", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "easel: error: no space left on the disk while writing" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and a kernel that lets this process mount): a real full disk."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("to,dst", [("diffusers", "pipe"), ("single-file", "m.safetensors")])
def test_convert_onto_a_real_full_disk(tiny_disk, tiny_sd1_file, capsys, to, dst):
    assert tiny_sd1_file.stat().st_size > 256 * 1024  # the model cannot fit: the write must fail
    assert main(["convert", str(tiny_sd1_file), str(tiny_disk / dst), "--to", to]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easel: error: no space left on the disk") and "Traceback" not in err
    assert list(tiny_disk.iterdir()) == []  # not even temp files


# -- kills ----------------------------------------------------------------------------------------------------------

def test_sigkill_during_generation_keeps_finished_batches(tmp_path, tiny_sd1_file):
    # Killed during the second of three batches: the first batch is on disk, whole; nothing else is.
    out = tmp_path / "out"
    _run_killed(f"""
        import os, signal, easel.cli as cli
        make = cli.progress_bar.__enter__
        def enter(self):
            step = make(self)
            def cb(d):
                if d.get("batch") == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                step(d)
            return cb
        cli.progress_bar.__enter__ = enter
        cli.main(["generate", "x", "--model", {str(tiny_sd1_file)!r}, "--steps", "2", "--width", "16", "--height",
                  "16", "-n", "2", "--n-iter", "3", "--seed", "7", "--out", {str(out)!r}])
    """, tmp_path)
    assert _visible(out) == ["00000-7.png", "00001-8.png"]
    for p in out.glob("*.png"):
        Image.open(p).load()


def test_sigkill_while_writing_a_png_leaves_no_partial_png(tmp_path, tiny_sd1_file):
    out = tmp_path / "out"
    _run_killed(f"""
        import os, signal
        from PIL import Image
        def save(self, fp, format=None, **kw):
            open(fp, "wb").write(b"\\x89PNG half")
            os.kill(os.getpid(), signal.SIGKILL)
        Image.Image.save = save
        import easel.cli as cli
        cli.main(["generate", "x", "--model", {str(tiny_sd1_file)!r}, "--steps", "1", "--width", "16", "--height",
                  "16", "-n", "1", "--out", {str(out)!r}])
    """, tmp_path)
    assert _visible(out) == []


@pytest.mark.parametrize("to,dst", [("diffusers", "pipe"), ("single-file", "m.safetensors")])
def test_sigkill_during_conversion_leaves_no_half_model(tmp_path, tiny_sd1_file, to, dst):
    # Killed while the tokenizer is written (after the weights for diffusers, before the rename for single files).
    out = tmp_path / "out"
    _run_killed(f"""
        import os, signal
        from easel.text.tokenizer import CLIPTokenizer
        def save(self, path):
            (path / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
            (path / "vocab.json").write_text("{{")
            os.kill(os.getpid(), signal.SIGKILL)
        CLIPTokenizer.save = save
        import easel.cli as cli
        cli.main(["convert", {str(tiny_sd1_file)!r}, {str(out / dst)!r}, "--to", {to!r}])
    """, tmp_path)
    assert _visible(out) == []


TRAIN_SCRIPT = """
    import os, signal, sys, torch
    from easel.training.common import LoopConfig, Trainer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer("t", sys.argv[1], model, LoopConfig(steps=12, batch_size=2, warmup=2, ckpt_every=4, ema_decay=0.9,
                                                          progress=False, log_every=1))
    kill_at = int(sys.argv[2])
    def loss(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(2, 4)  # from the global RNG: a resume must restore it to continue bit-exactly
        return (model(x) - x.sum(1, keepdim=True)).pow(2).mean(), {}
    trainer.run(loss)
    torch.save(trainer.final_weights(True), os.path.join(sys.argv[1], "final.pt"))
"""


def _train(run: Path, kill_at: int, killed: bool) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAIN_SCRIPT), str(run), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == (-signal.SIGKILL if killed else 0), proc.stderr[-3000:]


def test_sigkill_during_training_loses_at_most_one_interval_and_resumes_bit_exactly(tmp_path):
    from easel.training.common import load_checkpoint
    _train(tmp_path / "whole", -1, killed=False)
    _train(tmp_path / "killed", 7, killed=True)  # checkpoints at 4 and 8: step 7 is lost back to 4
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 4
    assert _visible(tmp_path / "killed") == ["checkpoint.pt", "log.jsonl", "loss.png"]
    _train(tmp_path / "killed", -1, killed=False)
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_unique_temp_names_do_not_collide(tmp_path):
    # Two writers of one target never share a temp file (the old '<name>.tmp' did).
    from easel.files import atomic_path
    with atomic_path(tmp_path / "a") as t1, atomic_path(tmp_path / "a") as t2:
        t1.write_text("1")
        t2.write_text(str(uuid.uuid4()))
        assert t1 != t2
