"""What a request may name: LoRAs and checkpoints (model, refiner) from the server's own lists, never paths.

Paths, `..`, `~`, absolute paths and hub ids (`org/name`) are for the CLI and the server's own flags. From HTTP,
a name that is not listed is refused with the same message whether or not a file of that name exists, so the
answer tells a client nothing about the server's disk; and it is refused before anything opens a file.
"""
from __future__ import annotations

from easel.pipelines.request import GenerationRequest

PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


def lora_names() -> set[str]:
    """Names a request may give a LoRA by: the file stems (folder names for diffusers LoRAs) and file names of
    GET /api/v1/loras."""
    from easel.weights.lora import list_loras
    return {n for e in list_loras() for n in (e["name"], e["path"].name)}


def requested_loras(req: GenerationRequest) -> list[tuple[str, str]]:
    """(where, name) of every LoRA a request names: <lora:...>/<lyco:...> tags in any prompt field and `loras`."""
    from easel.pipelines.networks import parse_lora_spec
    from easel.text.prompt import LORA_KINDS, extract_extra_networks
    found = []
    for where in PROMPT_FIELDS:
        for net in extract_extra_networks(getattr(req, where) or "")[1]:
            if net.kind in LORA_KINDS:
                found.append((where, net.name))
    for i, spec in enumerate(req.loras):
        found.append((f"loras[{i}]", parse_lora_spec(spec)[0] if isinstance(spec, str) else str(spec)))
    return found


def check_names(req: GenerationRequest, queue) -> None:
    """Refuse (ValueError) a LoRA or refiner a request names that is not in the server's lists, and point the
    refiner at what the server loads it from. `queue` is the JobQueue (its model names)."""
    named = requested_loras(req)
    if named:
        allowed = lora_names()
        for where, name in named:
            if name not in allowed:
                raise ValueError(f"{where}: LoRA {name!r} is not one of this server's LoRAs; requests name a LoRA "
                                 "from GET /api/v1/loras (a name, never a path)")
    if req.refiner_checkpoint:
        try:
            name = queue.check_model(req.refiner_checkpoint)
        except ValueError as e:
            raise ValueError(f"refiner_checkpoint: {e}") from None
        req.refiner_checkpoint = queue.model_spec(name)


def hide_paths(text: str) -> str:
    """`text` with the server's own folders (model folders, the cache, the working directory, the home folder)
    replaced by placeholders: an error message still names the problem and the fix, without telling a client
    where files live on the server."""
    import os
    from pathlib import Path

    from easel.weights.load import cache_dir
    from easel.weights.registry import model_dirs
    places = [(str(d.resolve()), "<model folder>") for d in model_dirs() if d.is_absolute()]
    places += [(str(cache_dir().resolve()), "<cache>"), (os.getcwd(), "<server folder>"), (str(Path.home()), "~")]
    for path, name in sorted(places, key=lambda p: -len(p[0])):  # the longest first: a cache inside the home
        if len(path) > 1:
            text = text.replace(path, name)
    return text
