"""Read and write state dicts: `.safetensors` directly, `.ckpt`/`.pt` only through the safe unpickler."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from easel.files import atomic_path, write_text

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the problem and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint wanted to run code or build objects that plain weights never need."""


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a weights file on the CPU, with the safetensors metadata (empty for pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise CheckpointError(
        f"{path.name}: unknown weights format '{path.suffix}'; easel reads .safetensors, "
        f"and {', '.join(PICKLE_SUFFIXES)} through torch.load(weights_only=True)"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a truncated or foreign file gets a clear error."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path.name} is not a readable .safetensors file ({e}); "
                              "re-download it or check that it is complete") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Read a pickle checkpoint without ever executing code from it."""
    return _unwrap(safe_torch_load(path, mmap=_is_zip(path)), path)


def safe_torch_load(path: str | os.PathLike, map_location="cpu", *, allow: tuple = (), mmap: bool = False,
                    what: str = "checkpoint"):
    """torch.load with weights_only=True (tensors, containers, numbers and strings; `allow`: further globals that
    cannot run code): a pickle that asks for anything else is refused with an UnsafeCheckpointError, code unrun."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if "GLOBAL" not in reason:
            raise CheckpointError(f"{path.name} is not a readable {what} ({reason})") from None
        raise UnsafeCheckpointError(
            f"{path} asks the unpickler to build objects that are not plain tensors ({reason}). "
            "easel refused to load it and ran none of its code. If you trust the file, convert it to "
            ".safetensors with a tool you trust, or ask its author for a .safetensors version; a training "
            "run's checkpoint or cache that you did not write: delete it and start the run again."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path.name} is not a readable {what} ({_first_line(e)})") from None


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped; old tar/legacy pickles cannot."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _unpickler_reason(e: Exception) -> str:
    """The one informative line of torch's long weights_only error ('... unsupported GLOBAL posix.system ...')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "error" in ln.lower()]
    return (useful[-1] if useful else _first_line(e)).removeprefix("Please file an issue with the following so that "
                                                                     "we can make `weights_only=True` compatible with your use case: ")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Lightning checkpoints nest the weights under 'state_dict'; keep only the tensors."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a dictionary of weights")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def write_safetensors(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename), so a crash never leaves half a file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """A1111's model hash: the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a whole file, cached on disk by path, size and mtime (hashing a checkpoint takes seconds)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return cache[key]


def cache_dir() -> Path:
    """easel's cache folder: $EASEL_CACHE, else ~/.cache/easel."""
    return Path(os.environ.get("EASEL_CACHE") or Path.home() / ".cache" / "easel")
