"""ControlNet units a client sends: how many, and which ControlNet files they may name (trust.py's rule); and
the upscalers a client may name (Extras, hires fix), by the same rule.

Over HTTP a ControlNet is a name from the server's ControlNet folders (GET /controlnet/model_list), never a path:
a name that is not listed is refused with the same message whether or not a file of that name exists, and before
anything opens a file. The number of units is bounded, since every unit is one more network run at every step.
"""
from __future__ import annotations

import re

from easel.serve.schema import LimitError

MAX_CONTROLNETS = 4  # units per request (sd-webui-controlnet's default "Multi-ControlNet" count is 3)
_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111 writes "name [hash]"


def controlnet_entries() -> dict[str, str]:
    """{name a request may give: the listed name} for every ControlNet the server has: file stems, file names and
    folder names, each also as A1111's "name [hash]" is read (the hash is dropped)."""
    from easel.weights.controlnet_load import list_controlnets
    names = {}
    for p in list_controlnets():
        stem = p.stem if p.is_file() else p.name
        names.setdefault(stem, stem)
        names.setdefault(p.name, stem)
    return names


def listed_name(model, where: str) -> str:
    """The listed ControlNet name a unit's `model` means; ValueError (400) when it is not one of the server's."""
    name = _HASH.sub("", model.strip()) if isinstance(model, str) else ""
    found = controlnet_entries().get(name) if name else None
    if found is None:
        raise ValueError(f"{where}: ControlNet {model!r} is not one of this server's ControlNets; requests name one "
                         "from GET /controlnet/model_list (a name, never a path)")
    return found


def check_count(units: list, where: str) -> None:
    """LimitError when a request has more ControlNet units than MAX_CONTROLNETS."""
    if len(units) > MAX_CONTROLNETS:
        raise LimitError("max_controlnets", len(units), MAX_CONTROLNETS, f"the number of {where}")


def upscaler_name(name, where: str) -> str:
    """The listed name of an upscaler a request gives ("None", "Lanczos", "Nearest", a file's A1111 label or stem),
    never a path: ValueError (400) names GET /sdapi/v1/upscalers otherwise."""
    from easel.upscale.find import PIXEL_UPSCALERS, list_upscalers, norm
    key = norm(name) if isinstance(name, str) else ""
    if key == "none":
        return "None"
    if key in PIXEL_UPSCALERS:
        return key
    if key and "/" not in name and "\\" not in name:
        for entry in list_upscalers():
            if key in (norm(entry.name), norm(entry.path.stem), norm(entry.path.name)):
                return entry.name
    raise ValueError(f"{where}: upscaler {name!r} is not one of this server's upscalers; requests name one from "
                     "GET /sdapi/v1/upscalers (a name, never a path)")
