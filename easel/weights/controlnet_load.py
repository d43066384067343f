"""Finding and loading ControlNets: single files (.safetensors, .pth/.ckpt through the safe unpickler) in the
ControlNet 1.1 / CompVis layout or with diffusers keys, and diffusers `ControlNetModel` folders.

Names are looked up in the ControlNet folders: $EASEL_CONTROLNETS (':'-separated), then `ControlNet/` and
`controlnet/` inside every model folder (`easel models`: ./models, ~/.cache/easel/models, ...), as A1111 keeps
them in `models/ControlNet`, and last the built-in model's own (`shapeworld-layout`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from easel.models.configs import ModelConfig, UNetConfig
from easel.models.controlnet import ControlNet, ControlNetConfig
from easel.weights import controlnet_keys as keys
from easel.weights.folders import CONTROLNET_FOLDERS
from easel.weights.load import CheckpointError, PICKLE_SUFFIXES, file_hash, read_state_dict
from easel.weights.model_io import parse_dtype
from easel.weights.registry import BUILTIN_DIR, model_dirs

SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
BUILTIN_CONTROLNETS = BUILTIN_DIR / "controlnet"  # ControlNets shipped for the built-in model (shapeworld-layout)
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "model.safetensors", "diffusion_pytorch_model.bin")


class ControlNetNotFound(FileNotFoundError):
    """No ControlNet matched a name; the message says where easel looked."""


@dataclass
class LoadedControlNet:
    """A ControlNet ready to run, and what the PNG parameters record about it."""

    net: ControlNet
    name: str  # file or folder stem, as A1111 writes "Model: ..."
    hash: str  # A1111's short hash of the file ('' for folders)
    path: Path


def controlnet_dirs() -> list[Path]:
    """Folders searched for ControlNets by name, in order (the built-in model's own ControlNets last)."""
    dirs = [Path(p) for p in os.environ.get("EASEL_CONTROLNETS", "").split(":") if p]
    return dirs + [d / sub for d in model_dirs() for sub in CONTROLNET_FOLDERS] + [BUILTIN_CONTROLNETS]


def list_controlnets() -> list[Path]:
    """Every ControlNet file and diffusers ControlNet folder in the ControlNet folders (first of each name)."""
    found: dict[str, Path] = {}
    for d in controlnet_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix in SUFFIXES or (p / "config.json").is_file():
                found.setdefault(p.stem if p.is_file() else p.name, p)
    return list(found.values())


def resolve_controlnet(spec: str | os.PathLike) -> Path:
    """The path of a ControlNet given as a path, a file name or a stem ("control_v11p_sd15_canny"), also as A1111
    writes it with its hash ("control_v11p_sd15_canny [d14c016b]")."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(spec))
    for p in list_controlnets():
        if name in (p.name, p.stem):
            return p
    raise ControlNetNotFound(f"ControlNet {name!r} not found: it is not a path, and no file or diffusers folder of "
                             f"that name is in {', '.join(str(d) for d in controlnet_dirs())}. Put the .safetensors "
                             "/ .pth file there (or set EASEL_CONTROLNETS) or pass its path")


def read_controlnet(path: str | os.PathLike, base: UNetConfig) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """(config, CompVis-layout state dict) of a ControlNet file or diffusers folder, for a model whose UNet is
    `base` (head counts are not in the weights)."""
    path = Path(path)
    pooling = "shuffle" in path.name.lower()  # ControlNet 1.1 shuffle: its yaml sets global_average_pooling
    if path.is_dir():
        sd, pooling = _read_folder(path, pooling)
    else:
        sd = read_state_dict(path)[0]
    sd = keys.strip_prefix(sd)
    if keys.file_layout(sd, path.name) == "diffusers":
        cfg = keys.config_from_diffusers_keys(sd, base, pooling)
        return cfg, keys.from_diffusers(sd, cfg)
    return keys.config_from_compvis(sd, base, pooling), sd


def _read_folder(folder: Path, pooling: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights of a diffusers ControlNet folder, and whether its config asks for global pooling."""
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} is a folder without config.json: give a ControlNet file, or a diffusers "
                              "ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)")
    try:
        d = json.loads(config.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e})") from None
    if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{folder} holds a {d['_class_name']}, not a ControlNetModel")
    if d.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"{folder}: conditioning channel order {d['controlnet_conditioning_channel_order']!r} "
                              "is not supported (easel feeds RGB)")
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0], pooling or bool(d.get("global_pool_conditions"))
    raise CheckpointError(f"no weights in {folder} (looked for {', '.join(FOLDER_WEIGHTS)})")


def build_controlnet(cfg: ControlNetConfig, sd: dict[str, torch.Tensor], name: str = "the ControlNet") -> ControlNet:
    """A ControlNet with exactly these weights: every key and shape must match, or the error lists what differs."""
    with torch.device("meta"):
        net = ControlNet(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or shapes:
        show = lambda ks: f"{ks[:6]}{' ...' if len(ks) > 6 else ''}"  # noqa: E731
        raise CheckpointError(
            f"{name} does not fit the ControlNet layout detected from it: {len(missing)} missing keys "
            f"{show(missing)}, {len(unexpected)} unexpected keys {show(unexpected)}, {len(shapes)} with other shapes "
            f"{show([f'{k} {tuple(sd[k].shape)} != {expected[k]}' for k in shapes])}. The file is damaged or a kind "
            "of control model easel does not run")
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def load_controlnet(spec: str | os.PathLike, model: ModelConfig, dtype: str | torch.dtype = "fp32",
                    device: str | torch.device = "cpu") -> LoadedControlNet:
    """Load a ControlNet (path or name) for `model`, checked to fit its UNet, in `dtype` on `device`."""
    from easel.models.controlnet import check_fits
    path = resolve_controlnet(spec)
    cfg, sd = read_controlnet(path, model.unet)
    check_fits(cfg, model.unet, f"ControlNet {path.name}")
    net = build_controlnet(cfg, sd, path.name).to(device=device, dtype=parse_dtype(dtype))
    stem = path.name if path.is_dir() else path.stem
    return LoadedControlNet(net, stem, file_hash(path) if path.is_file() else "", path)
