"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learned token embeddings in a file.

A prompt word equal to an embedding's name is replaced, before the text encoder, by the embedding's n
vectors (each takes one of the 75 token slots of a chunk). The files people have come in four layouts:

- A1111 `.pt` / `.bin`: `{'string_to_param': {'*': (n, D)}, 'name': ..., 'step': ...}`;
- `.safetensors` written by A1111-style trainers: `{'emb_params': (n, D)}`;
- SDXL: `{'clip_l': (n, 768), 'clip_g': (n, 1280)}`, one set of vectors per text encoder;
- diffusers `learned_embeds.bin` / `.safetensors`: `{'<token>': (D,) or (n, D)}`.

Pickles are read with `torch.load(weights_only=True)`: a file that wants to build anything but tensors,
numbers and strings is refused and none of its code runs.

`EmbeddingLibrary` finds embeddings by name (the file stem) in, in order: every folder of
$EASEL_EMBEDDING_DIRS (separated by ':'), ./models/embeddings and ~/.cache/easel/embeddings.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from easel.weights.load import CheckpointError, UnsafeCheckpointError, cache_dir, read_state_dict

SUFFIXES = (".safetensors", ".pt", ".bin")
SINGLE = "*"  # key of the vectors of a one-encoder embedding (SD1, SD2), as A1111's string_to_param
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: vectors for text encoder 0 and 1


class EmbeddingError(ValueError):
    """An embedding file cannot be read, or does not fit the model; the message says why and what to do."""


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding: `vectors` maps '*' (one encoder) or 'clip_l'/'clip_g' (SDXL) to (n, D)."""

    name: str
    vectors: dict[str, Tensor]

    @property
    def num_vectors(self) -> int:
        """How many token slots the embedding takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    def for_encoder(self, index: int, num_encoders: int, width: int) -> Tensor:
        """The (n, width) vectors for text encoder `index` of a model with `num_encoders` encoders."""
        key = self._key(index, num_encoders)
        vec = self.vectors[key]
        if vec.shape[1] != width:
            what = "" if key == SINGLE else f" ({key})"
            raise EmbeddingError(
                f"embedding {self.name!r}{what} has vectors of width {vec.shape[1]}, but the model's text encoder "
                f"{index} is {width} wide: it was trained for another model family (SD1: 768, SD2: 1024, "
                "SDXL: 768 + 1280). Use an embedding made for this model, or remove it from the prompt.")
        return vec

    def _key(self, index: int, num_encoders: int) -> str:
        if num_encoders == 1:
            if SINGLE not in self.vectors:
                raise EmbeddingError(f"embedding {self.name!r} is an SDXL embedding (clip_l + clip_g vectors); this "
                                     "model has one text encoder: use an SD1/SD2 embedding, or an SDXL model")
            return SINGLE
        if num_encoders == len(SDXL_KEYS) and all(k in self.vectors for k in SDXL_KEYS):
            return SDXL_KEYS[index]
        width = next(iter(self.vectors.values())).shape[1]
        raise EmbeddingError(f"embedding {self.name!r} has one set of vectors (width {width}, SD1/SD2); this model "
                             f"has {num_encoders} text encoders and needs clip_l + clip_g vectors (an SDXL embedding)")


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read a textual-inversion file (A1111 .pt/.bin/.safetensors, SDXL, diffusers learned_embeds)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"no such embedding file: {path}")
    if path.suffix not in SUFFIXES:
        raise EmbeddingError(f"{path.name}: unknown embedding format '{path.suffix}'; "
                             f"easel reads {', '.join(SUFFIXES)}")
    data = read_state_dict(path)[0] if path.suffix == ".safetensors" else _read_pickle(path)
    vectors = _vectors(data, path)
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        raise EmbeddingError(f"{path.name}: the encoders' vector counts differ ({_describe(vectors)})")
    return Embedding(path.stem, vectors)


def _read_pickle(path: Path) -> dict:
    """The whole (nested) dictionary of a pickle, never running code from it."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln]
        raise UnsafeCheckpointError(
            f"{path.name} asks the unpickler to build objects that are not plain tensors "
            f"({lines[-1].strip() if lines else 'not a weights-only pickle'}). easel refused to load it and ran "
            "none of its code. If you trust the file, re-save it as .safetensors with a tool you trust.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path.name} is not a readable embedding file ({str(e).strip()[:200]})") from None
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{path.name} holds a {type(obj).__name__}, not a textual-inversion dictionary")
    return obj


def _vectors(data: dict, path: Path) -> dict[str, Tensor]:
    """Find the vectors in any of the four layouts of the module docstring."""
    if isinstance(data.get("string_to_param"), dict):  # A1111
        params = data["string_to_param"]
        if len(params) != 1:
            raise EmbeddingError(f"{path.name}: A1111 embedding with {len(params)} placeholder strings; "
                                 "easel (as A1111) reads files with exactly one")
        return {SINGLE: _matrix(next(iter(params.values())), path)}
    if all(isinstance(data.get(k), Tensor) for k in SDXL_KEYS):  # SDXL
        return {k: _matrix(data[k], path) for k in SDXL_KEYS}
    if isinstance(data.get("emb_params"), Tensor):
        return {SINGLE: _matrix(data["emb_params"], path)}
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) == 1:  # diffusers: {'<token>': vector(s)}
        return {SINGLE: _matrix(next(iter(tensors.values())), path)}
    raise EmbeddingError(f"{path.name} is not a textual-inversion embedding: expected 'string_to_param', "
                         f"'emb_params', 'clip_l'+'clip_g' or a single token tensor, found keys {sorted(data)[:8]}")


def _matrix(value, path: Path) -> Tensor:
    """A (D,) or (n, D) tensor as (n, D) float32."""
    if not isinstance(value, Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise EmbeddingError(f"{path.name}: embedding vectors must be a (n, D) or (D,) tensor, got {shape}")
    return value.detach().float().reshape(-1, value.shape[-1])  # (n, D)


def _describe(vectors: dict[str, Tensor]) -> str:
    return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in vectors.items())


def embedding_dirs() -> list[Path]:
    """Folders searched for embeddings, in order."""
    dirs = [Path(p) for p in os.environ.get("EASEL_EMBEDDING_DIRS", "").split(os.pathsep) if p]
    return dirs + [Path("models") / "embeddings", cache_dir() / "embeddings"]


class EmbeddingLibrary:
    """Embeddings by name (file stem) from a list of folders; files are read on first use and cached."""

    def __init__(self, dirs: list[str | os.PathLike] | None = None):
        self.dirs = [Path(d).expanduser() for d in dirs] if dirs is not None else embedding_dirs()
        self._paths: dict[str, Path] | None = None
        self._stamp: tuple = ()
        self._loaded: dict[str, tuple[float, Embedding]] = {}

    def names(self) -> list[str]:
        """Names of every embedding file found (the first folder wins when two share a name)."""
        return sorted(self._scan())

    def path(self, name: str) -> Path | None:
        """The file of embedding `name`, or None."""
        return self._scan().get(name)

    def get(self, name: str) -> Embedding | None:
        """The embedding called `name`, or None when no folder has it."""
        path = self.path(name)
        if path is None:
            return None
        mtime = path.stat().st_mtime
        cached = self._loaded.get(name)
        if cached is None or cached[0] != mtime:
            cached = (mtime, load_embedding(path))
            self._loaded[name] = cached
        return cached[1]

    def __contains__(self, name: str) -> bool:
        return self.path(name) is not None

    def _scan(self) -> dict[str, Path]:
        """name -> file; rescanned when a folder's modification time changes (new or removed files)."""
        stamp = tuple((str(d), d.stat().st_mtime if d.is_dir() else None) for d in self.dirs)
        if self._paths is None or stamp != self._stamp:
            found: dict[str, Path] = {}
            for d in self.dirs:
                if d.is_dir():
                    for p in sorted(d.rglob("*")):
                        if p.is_file() and p.suffix in SUFFIXES:
                            found.setdefault(p.stem, p)
            self._paths, self._stamp = found, stamp
        return self._paths
