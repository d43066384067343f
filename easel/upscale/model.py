"""Loading upscaler files with spandrel (the loader ComfyUI and A1111 use), never running code from a pickle.

The weights are read by easel (`.safetensors`, or `.pth`/`.pt`/`.ckpt` through torch.load(weights_only=True));
spandrel only recognises the architecture from the state dict's keys and shapes and builds the network.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import os
import sys
import types
from pathlib import Path

import torch

from easel.weights.load import CheckpointError, read_state_dict, safe_torch_load

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt")
NESTED_KEYS = ("params_ema", "params", "state_dict", "model", "net", "generator")  # BasicSR, Lightning, ...


class NotAnUpscaler(CheckpointError):
    """The file holds weights, but not of an image-to-image network spandrel knows."""


def spandrel():
    """The spandrel module, or an error saying how to install it."""
    try:
        with _torchvision_stand_in():
            import spandrel as module
    except ModuleNotFoundError as e:
        if e.name != "spandrel":
            raise
        raise CheckpointError("model upscalers need spandrel: `pip install 'easel[upscale]'` (or, with a CPU-only "
                              "torch whose torchvision will not import: `pip install --no-deps spandrel einops`); "
                              "lanczos and nearest need nothing") from None
    return module


@contextlib.contextmanager
def _torchvision_stand_in():
    """spandrel imports torchvision for two non-upscaling architectures (LaMa inpainting, RestoreFormer faces).
    Where torchvision is missing or will not import (PyPI's wheel beside torch's CPU build), a stand-in whose
    functions raise is visible while spandrel imports, and removed after: upscalers never call it, and nothing
    else in the process sees a fake torchvision."""
    if "spandrel" in sys.modules or _torchvision_imports():
        yield
        return
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stand_in = _stand_in_modules(names)
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is stand_in[name]:
                del sys.modules[name]


def _torchvision_imports() -> bool:
    """Whether a working torchvision is importable."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a build for another torch ("operator torchvision::nms does not exist")
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported one must not stay behind
        return False
    return True


def _stand_in_modules(names: tuple[str, ...]) -> dict[str, types.ModuleType]:
    """Modules named `names` with what spandrel imports from torchvision.transforms.functional."""
    def missing(*args, **kwargs):
        raise CheckpointError("this model needs torchvision, which is not installed (or does not fit this torch)")
    mods = {n: types.ModuleType(n) for n in names}
    fn = mods["torchvision.transforms.functional"]
    fn.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS")
    fn.rotate = fn.normalize = missing
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = fn
    return mods


def read_upscaler_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an upscaler file, unwrapped from BasicSR's {'params_ema': ...} and similar."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"no such upscaler file: {path}")
        obj = safe_torch_load(path, what="upscaler file")
    else:
        obj = read_state_dict(path)[0]
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NotAnUpscaler(f"{path.name} holds no weights ({type(obj).__name__}); an upscaler file is a state dict "
                            "of an ESRGAN / Real-ESRGAN / SwinIR / DAT / ... network")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_upscaler(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """spandrel's ImageModelDescriptor of an upscaler file (`.model`, `.scale`, `.architecture`, ...), in eval mode,
    cached per file, device and dtype."""
    path = Path(path).resolve()
    stat = path.stat() if path.exists() else None
    return _load(str(path), stat.st_mtime_ns if stat else 0, device, dtype)


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime: int, device: str, dtype: torch.dtype):
    """The cached body of `load_upscaler` (the mtime makes a replaced file load again)."""
    sd = read_upscaler_weights(path)
    sp = spandrel()
    try:
        desc = sp.ModelLoader(device="cpu").load_from_state_dict(sd)
    except sp.UnsupportedModelError:
        raise NotAnUpscaler(_not_upscaler_message(Path(path), sd)) from None
    except (KeyError, RuntimeError, ValueError) as e:  # a known architecture's keys with shapes that do not fit
        raise NotAnUpscaler(f"{Path(path).name} looks like a {type(e).__name__}-broken upscaler file ({e}); "
                            "re-download it") from None
    if not isinstance(desc, sp.ImageModelDescriptor) or desc.purpose not in ("SR", "Restoration"):
        raise NotAnUpscaler(f"{Path(path).name} is a {desc.architecture.name} {getattr(desc, 'purpose', '')} model, "
                            "not an upscaler (inpainting and face-restoration networks are not used here)")
    return desc.to(device).to(dtype).eval()


def _not_upscaler_message(path: Path, sd: dict) -> str:
    """Why spandrel found no architecture: a Stable Diffusion checkpoint, a LoRA, a VAE, or something else."""
    keys = list(sd)
    guess = ""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        guess = " (it is a Stable Diffusion checkpoint: use it as --model)"
    elif any("lora" in k for k in keys):
        guess = " (it is a LoRA: use it with --lora)"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        guess = " (it looks like a VAE: use it with --vae)"
    return (f"{path.name} is not an upscaler spandrel recognises{guess}; its first keys: {', '.join(keys[:4])}. "
            "Upscalers are ESRGAN / Real-ESRGAN (RRDBNet, SRVGGNet compact) / SwinIR / DAT / HAT / ... files")
