"""Where upscaler files are and what they are called: a path, a file stem, or A1111's label for it.

Searched: the folders `upscalers`, `upscale_models` (ComfyUI), `ESRGAN`, `RealESRGAN`, `SwinIR`, `DAT`, `HAT` and
`ScuNET` (A1111) inside every model folder (`easel.weights.registry.model_dirs`: $EASEL_MODELS, ./models, the
cache). A1111 names its Real-ESRGAN, SwinIR and DAT upscalers by label ("R-ESRGAN 4x+") and every other file by
its stem ("4x-UltraSharp"); both work here, case-insensitively.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from easel.weights.folders import UPSCALER_FOLDERS  # one list: `easel models` skips these folders
UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
PIXEL_UPSCALERS = ("lanczos", "nearest")  # need no file

# A1111's label -> the stem of the file it downloads for it.
A1111_LABELS = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "ESRGAN_4x": "ESRGAN_4x",
    "SwinIR 4x": "SwinIR_4x",
    "ScuNET": "ScuNET",
    "ScuNET PSNR": "ScuNET_PSNR",
    "DAT x2": "DAT_x2",
    "DAT x3": "DAT_x3",
    "DAT x4": "DAT_x4",
}
UNSUPPORTED = {"ldsr": "LDSR is a latent-diffusion upscaler (a whole diffusion model), not a network spandrel "
                       "loads; use an ESRGAN-family file instead"}


class UpscalerNotFound(ValueError):
    """No upscaler of that name; the message lists the ones there are and where files go."""


@dataclass(frozen=True)
class UpscalerFile:
    """An upscaler model file and the name it goes by (A1111's label where it has one, else its stem)."""

    name: str
    path: Path


def norm(name: str) -> str:
    """Case, '-', '_', '(' and ')' ignored: 'R-ESRGAN 4x+' == 'r_esrgan 4x+'."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").replace("(", " ").replace(")", " ").split())


def upscaler_dirs() -> list[Path]:
    """The folders searched for upscaler files, in order."""
    from easel.weights.registry import model_dirs
    return [d / sub for d in model_dirs() for sub in UPSCALER_FOLDERS]


def list_upscalers() -> list[UpscalerFile]:
    """Every upscaler file in the upscaler folders (the first of a name wins)."""
    labels = {norm(stem): label for label, stem in A1111_LABELS.items()}
    found, seen = [], set()
    for d in upscaler_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES:
                name = labels.get(norm(p.stem), p.stem)
                if norm(name) not in seen:
                    seen.add(norm(name))
                    found.append(UpscalerFile(name, p))
    return found


def find_upscaler(spec: str | os.PathLike) -> UpscalerFile:
    """The upscaler file a path, file stem or A1111 label names; UpscalerNotFound lists what there is."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in UPSCALER_SUFFIXES and path.is_file():
        return UpscalerFile(path.stem, path)
    key = norm(spec)
    if key in UNSUPPORTED:
        raise UpscalerNotFound(UNSUPPORTED[key])
    stems = {norm(label): norm(stem) for label, stem in A1111_LABELS.items()}
    for entry in list_upscalers():
        if key in (norm(entry.name), norm(entry.path.stem), norm(entry.path.name)) or stems.get(key) == norm(
                entry.path.stem):
            return entry
    raise UpscalerNotFound(not_found_message(spec))


def not_found_message(spec) -> str:
    """What a user reads when an upscaler name matches nothing."""
    names = [e.name for e in list_upscalers()]
    have = f"upscaler files found: {', '.join(names)}" if names else "no upscaler files were found"
    hint = ""
    stem = A1111_LABELS.get(next((k for k in A1111_LABELS if norm(k) == norm(spec)), ""), "")
    if stem:
        hint = f" (A1111's {spec!r} is the file {stem}.pth)"
    return (f"unknown upscaler {spec!r}{hint}: {have}; put .pth/.safetensors files in a folder "
            f"{' or '.join(UPSCALER_FOLDERS[:3])} under a model folder ({', '.join(str(d) for d in _roots())}), "
            f"give a path, or use one of {', '.join(PIXEL_UPSCALERS)}")


def _roots() -> list[Path]:
    from easel.weights.registry import model_dirs
    return model_dirs()[:3]
