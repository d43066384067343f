"""The models a server can run: names requests may use, the loader behind them, and the one model a worker holds.

Model names come from the model folders (easel.weights.registry) and from the models the server was started with
(`JobQueue.register_model`); requests name models, they never give paths.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("easel.serve")

Loader = Callable[[str | None, str], object]  # (model name, None: the built-in model; device) -> Pipeline
BUILTIN_NAME = "shapeworld"  # the registry's name for the built-in model


def default_loader(known: dict[str, str] | None = None, dtype: str = "fp32") -> Loader:
    """A loader for model names: those in `known` (name -> path or spec the server was started with) first,
    then the model folders; None loads the built-in model."""
    known = {} if known is None else known  # the queue's own dict: later registrations count

    def load(name: str | None, device: str):
        import easel
        from easel.weights.registry import list_models
        spec = known.get(name) if name is not None else None
        if name is not None and spec is None:
            spec = next((str(e.path) for e in list_models() if e.name == name), None)
            if spec is None:
                raise ValueError(f"model {name!r} not found; GET /api/v1/models lists the models")
        return easel.load(spec, dtype=dtype, device=device)
    return load


def registry_names() -> list[str]:
    """Model names a request may ask for (from the model folders; never paths)."""
    from easel.weights.registry import list_models
    return [e.name for e in list_models()]


def model_entries(queue) -> list:
    """ModelEntry items for the models requests may name: those the server was started with (a --model path,
    under its name) first, then the model folders' others. `queue` is the JobQueue (anything with
    `known_models()`: this module stays below easel.serve.jobs)."""
    from easel.weights.registry import ModelEntry, list_models
    found = list_models()
    in_folders = {e.name for e in found}
    # a path, or a spec the folders do not have (a hub id); a folder model's own name needs no second entry
    started = [ModelEntry(name, Path(spec), "single-file" if Path(spec).is_file() else "diffusers")
               for name, spec in queue.known_models().items() if Path(spec).exists() or name not in in_folders]
    names = {e.name for e in started}
    return started + [e for e in found if e.name not in names]


def builtin_name() -> str | None:
    """The built-in model's name when this install has it."""
    from easel.weights.registry import builtin_model
    return BUILTIN_NAME if builtin_model() else None


class ModelCache:
    """The one model a worker holds; switching frees the old one before loading the next."""

    def __init__(self, loader: Loader, device: str):
        self.loader, self.device, self.name, self.pipe = loader, device, object(), None

    def holds(self, name: str | None) -> bool:
        """True when model `name` is the one loaded (a job for it starts without loading)."""
        return self.pipe is not None and name == self.name

    def get(self, name: str | None):
        """The pipeline of model `name` (None: the built-in), loaded unless it is the one held."""
        if self.pipe is None or name != self.name:
            self.pipe, self.name = None, object()  # drop the old weights first: two models may not fit
            log.info("loading model", extra={"event": "model_load", "model": name, "device": self.device})
            self.pipe, self.name = self.loader(name, self.device), name
        return self.pipe
