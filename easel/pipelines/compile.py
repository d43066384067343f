"""`--compile` / `easel.load(..., compile=True)`: the UNet through torch.compile (inductor), its compiled code cached
on disk so that a second process skips inductor's code generation and C++ builds. Freezing (weights as constants,
prepacked) is an option, off by default: on the built-in model it made a warm-cache start 5x slower (119 s vs 22 s,
bench/compile_start.py), the freezing passes running again in every process.

The cache lives in one folder per (model hash, latent shape, dtype, device, torch version, CPU vector ISA, options):
`<cache root>/<key>/`, inductor's own caches (FX graph, AOTAutograd, kernels) inside it. Each folder holds a
manifest of those fields; a folder whose manifest does not match its key (or cannot be read) is stale and is
emptied and rebuilt, never trusted. With freezing the weights are baked into the compiled code as constants, so
keying by model hash keeps one model's code from serving another.

Without freezing the compiled code reads the live weights, so a LoRA merged for one request just works. With
freezing, weights changed in place after compiling are noticed by the parameters' version counters; such calls run
the eager UNet, which sees the live weights, so images stay right (just not faster).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CACHE_ENV = "EASEL_COMPILE_CACHE"  # overrides the cache root
FORMAT = 1  # bump when what easel compiles changes, so old folders are not reused
_INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def cache_root() -> Path:
    """Where compiled code is kept: $EASEL_COMPILE_CACHE, else ~/.cache/easel/compiled."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "easel" / "compiled")


def key_fields(model_hash: str, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
               torch_version: str | None = None, isa: str | None = None, freezing: bool = False) -> dict:
    """Everything that changes the compiled code of one UNet call."""
    return {"format": FORMAT, "model_hash": model_hash, "shape": [int(s) for s in shape], "dtype": str(dtype),
            "device": str(device), "torch": torch_version or torch.__version__,
            "isa": isa or torch.backends.cpu.get_cpu_capability(), "freezing": bool(freezing)}


def cache_key(fields: dict) -> str:
    """A short, filesystem-safe hash of the key fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(fields: dict, root: Path | None = None) -> Path:
    """The folder for `fields`, created with its manifest; a stale one (manifest missing, unreadable or for other
    fields) is emptied first."""
    folder = (root or cache_root()) / cache_key(fields)
    manifest = folder / "manifest.json"
    if folder.exists():
        try:
            fresh = json.loads(manifest.read_text()) == fields
        except (OSError, ValueError):
            fresh = False
        if fresh:
            return folder
        log.info("compile cache %s is stale: rebuilding it", folder)
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    from easel.files import atomic_path
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(fields, sort_keys=True, indent=1))
    return folder


@contextlib.contextmanager
def inductor_cache(folder: Path):
    """Point inductor's caches (read when it compiles) at `folder` for the duration of the block."""
    before = os.environ.get(_INDUCTOR_ENV)
    os.environ[_INDUCTOR_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_INDUCTOR_ENV, None)
        else:
            os.environ[_INDUCTOR_ENV] = before


def compiler_missing() -> str | None:
    """Why torch.compile cannot build CPU code here (no C++ compiler, no inductor), or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import importlib
        importlib.import_module("torch._inductor")
    except ImportError as e:
        return f"torch's inductor compiler does not import ({e})"
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None or not shutil.which(cxx):
        return "no C++ compiler (g++ or clang++) on PATH: install one (apt-get install g++) or run without --compile"
    return None


class CompilerMissing(ValueError):
    """torch.compile cannot build code on this machine (the message says why and what to do)."""


class CompiledForward:
    """A module's forward through torch.compile, with inductor's on-disk cache chosen per input shape, and the
    eager forward whenever the weights changed since compiling."""

    def __init__(self, module: torch.nn.Module, model_hash: str, freezing: bool = False, root: Path | None = None):
        self.eager = module.forward  # the bound forward as it was (the class's)
        self.params = list(module.parameters())
        self.versions = self._versions()
        self.model_hash, self.freezing, self.root = model_hash, freezing, root
        # freezing is read from inductor's global config when the first call compiles (torch.compile's `options`
        # do not reach it in torch 2.13), so it is patched around each call
        self.compiled = torch.compile(self.eager, backend="inductor")
        self._warned = False
        self.folders: dict[tuple[int, ...], Path] = {}

    def _versions(self) -> int:
        """Sum of the parameters' in-place version counters: it moves when any weight is written in place."""
        return sum(p._version for p in self.params)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The compiled forward (compiling, or loading from the cache, on a new shape); with freezing, eager once
        the weights moved (without it the compiled code reads the live weights)."""
        if self.freezing and self._versions() != self.versions:
            if not self._warned:
                log.warning("weights changed since they were frozen into the compiled UNet (a LoRA?): running it "
                            "eagerly")
                self._warned = True
            return self.eager(x, *args, **kwargs)
        from torch._inductor import config
        with inductor_cache(self._folder(tuple(x.shape))), config.patch(freezing=self.freezing), torch.no_grad():
            return self.compiled(x, *args, **kwargs)

    def _folder(self, shape: tuple[int, ...]) -> Path:
        """The cache folder of one input shape (checked once per process, not at every step)."""
        if shape not in self.folders:
            p = self.params[0]
            fields = key_fields(self.model_hash, shape, p.dtype, p.device.type, freezing=self.freezing)
            self.folders[shape] = cache_folder(fields, self.root)
        return self.folders[shape]


def compile_module(module: torch.nn.Module, model_hash: str, freezing: bool = False,
                   root: Path | None = None) -> CompiledForward:
    """Make `module(...)` run compiled (its state dict, names and weights unchanged); returns the wrapper."""
    reason = compiler_missing()
    if reason is not None:
        raise CompilerMissing(f"cannot compile: {reason}")
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        return module.__dict__["forward"]
    wrapper = CompiledForward(module, model_hash, freezing, root)
    module.forward = wrapper  # an instance attribute: nn.Module.__call__ looks it up first
    return wrapper


def uncompile_module(module: torch.nn.Module) -> None:
    """Back to the eager forward."""
    module.__dict__.pop("forward", None)


def compile_pipeline(pipe, freezing: bool = False, root: Path | None = None):
    """Compile a Pipeline's UNet in place (what `--compile`, `easel.load(compile=True)` and a server option call);
    returns the pipeline. The first image of each new size compiles (minutes for SD1.5 at 512; a warm disk cache
    makes it much shorter); later images are faster."""
    model = pipe.loaded.model
    compile_module(model.unet, pipe.loaded.hash or _weights_hash(model.unet), freezing, root)
    return pipe


def _weights_hash(module: torch.nn.Module) -> str:
    """A content hash for a model loaded without a file hash (built in memory): a sample of every tensor."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().numpy().tobytes())
    return h.hexdigest()[:16]
