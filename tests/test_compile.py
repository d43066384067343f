"""`--compile`: the compiled UNet gives the eager images (within float rounding), its on-disk cache is keyed by
everything that changes the compiled code, a stale cache folder is rebuilt, and weights changed in place (a LoRA)
are never served stale compiled code."""
import json

import numpy as np
import pytest
import torch

from easel.pipelines.compile import (cache_folder, cache_key, compile_module, compiler_missing, key_fields,
                                     uncompile_module)

needs_compiler = pytest.mark.skipif(compiler_missing() is not None, reason=f"cannot compile: {compiler_missing()}")
BASE = dict(model_hash="abc123", shape=(2, 4, 64, 64), dtype=torch.bfloat16, device="cpu", torch_version="2.13.0",
            isa="AVX512", freezing=True)


@pytest.mark.parametrize("change", [{"model_hash": "abc124"}, {"shape": (2, 4, 96, 64)}, {"shape": (4, 4, 64, 64)},
                                    {"dtype": torch.float32}, {"torch_version": "2.14.0"}, {"device": "cuda"},
                                    {"isa": "AVX2"}, {"freezing": False}])
def test_cache_key_changes_with_each_input(change):
    assert cache_key(key_fields(**{**BASE, **change})) != cache_key(key_fields(**BASE))


def test_cache_key_is_stable():
    assert cache_key(key_fields(**BASE)) == cache_key(key_fields(**dict(BASE)))
    assert key_fields(**BASE)["torch"] == "2.13.0"
    assert key_fields("h", (1,), torch.float32)["torch"] == torch.__version__


@pytest.mark.parametrize("manifest", [None, "{not json", json.dumps({"model_hash": "other"})])
def test_a_stale_cache_folder_is_emptied_not_trusted(tmp_path, manifest):
    fields = key_fields(**BASE)
    folder = cache_folder(fields, tmp_path)
    (folder / "fxgraph").mkdir()
    (folder / "fxgraph" / "entry").write_text("compiled for these fields")
    assert cache_folder(fields, tmp_path) == folder and (folder / "fxgraph" / "entry").exists()  # fresh: kept
    if manifest is None:
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text(manifest)
    assert cache_folder(fields, tmp_path) == folder
    assert not (folder / "fxgraph").exists()  # emptied and rebuilt
    assert json.loads((folder / "manifest.json").read_text()) == fields


class Block(torch.nn.Module):
    """Two linears and a GELU: small enough to compile in seconds; in bf16 freezing prepacks their weights."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.slow
@needs_compiler
def test_compiled_module_matches_eager_caches_on_disk_and_sees_weight_changes(tmp_path, one_thread):
    torch.manual_seed(0)
    block = Block().eval().requires_grad_(False).to(torch.bfloat16)
    x = torch.randn(4, 32).to(torch.bfloat16)
    eager = block(x)
    wrapper = compile_module(block, "h1", freezing=True, root=tmp_path)
    assert compile_module(block, "h1", freezing=True, root=tmp_path) is wrapper  # compiling twice wraps once
    torch.testing.assert_close(block(x), eager, atol=2e-2, rtol=2e-2)
    assert list(block.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]  # names unchanged
    folder = cache_folder(key_fields("h1", tuple(x.shape), torch.bfloat16, freezing=True), tmp_path)
    assert len(list(folder.rglob("*"))) > 2  # inductor wrote its caches into the keyed folder
    with torch.no_grad():  # as a LoRA merge does: weights written in place after compiling
        block.a.weight.mul_(2)
        changed = Block.forward(block, x)
        stale = wrapper.compiled(x)  # the compiled code alone: frozen (prepacked) weights from before
    assert not torch.allclose(stale, changed, atol=2e-2)  # freezing is on, so the guard below is needed
    torch.testing.assert_close(block(x), changed)  # the guarded call runs eagerly on the new weights
    uncompile_module(block)
    assert "forward" not in block.__dict__


@pytest.mark.slow
@needs_compiler
def test_compiled_pipeline_gives_the_eager_image(tmp_path, tiny_sd1, one_thread):
    """Inductor fuses and reorders float ops: pixels agree within 2 levels of 255."""
    from easel.pipelines.compile import compile_pipeline
    from easel.pipelines.pipeline import Pipeline
    pipe = Pipeline(tiny_sd1)
    options = dict(steps=2, width=32, height=32, seed=1, batch_size=1)
    eager = np.asarray(pipe.txt2img("a red cat", **options)[0]).astype(int)
    compile_pipeline(pipe, root=tmp_path / "cache")
    compiled = np.asarray(pipe.txt2img("a red cat", **options)[0]).astype(int)
    assert np.abs(compiled - eager).max() <= 2
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one key: one model, shape and dtype


def test_compile_switch_reaches_the_pipeline(tmp_path, tiny_sd1_file, monkeypatch):
    """`easel generate --compile` and `easel.load(compile=True)` compile the UNet; without them nothing is."""
    import easel
    from easel.cli import main
    from easel.pipelines import compile as compile_mod
    calls = []
    monkeypatch.setattr(compile_mod, "compile_pipeline", lambda pipe, **kw: calls.append(pipe) or pipe)
    assert easel.load(str(tiny_sd1_file)) is not None and calls == []
    pipe = easel.load(str(tiny_sd1_file), compile=True)
    assert calls == [pipe]
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--steps", "1", "--width", "32", "--height", "32",
                 "--out", str(tmp_path), "--compile"]) == 0
    assert len(calls) == 2


def test_no_compiler_is_one_clear_line(tmp_path, tiny_sd1_file, monkeypatch, capsys):
    from easel.cli import main
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    assert main(["generate", "x", "--model", str(tiny_sd1_file), "--out", str(tmp_path), "--compile"]) == 2
    err = capsys.readouterr().err
    assert "cannot compile: no C++ compiler" in err and "run without --compile" in err and "Traceback" not in err


@pytest.mark.slow
@needs_compiler
def test_without_freezing_the_compiled_code_reads_the_live_weights(tmp_path, one_thread):
    """A LoRA merged after compiling is applied by the compiled code itself (no eager fallback needed)."""
    torch.manual_seed(0)
    block = Block().eval().requires_grad_(False)
    x = torch.randn(4, 32)
    wrapper = compile_module(block, "h2", root=tmp_path)
    block(x)
    with torch.no_grad():
        block.a.weight.mul_(2)
        changed = Block.forward(block, x)
        torch.testing.assert_close(wrapper.compiled(x), changed, atol=1e-5, rtol=1e-5)
