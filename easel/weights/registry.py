"""Finding models: a path, a Hugging Face hub id, a name from the model folders, or the built-in model.

Model folders searched, in order: every folder in $EASEL_MODELS (separated by ':'), ./models,
~/.cache/easel/models, and the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME/hub).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from easel.weights.folders import not_checkpoint_folders
from easel.weights.load import cache_dir, file_sha256

log = logging.getLogger("easel")

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapeworld"
BUILTIN_FILE = BUILTIN_DIR / "shapeworld.safetensors"


class ModelNotFound(FileNotFoundError):
    """No model matched; the message says where easel looked and how to provide one."""


@dataclass(frozen=True)
class ModelEntry:
    """One model easel can load."""

    name: str
    path: Path
    kind: str  # "single-file" | "diffusers" | "built-in"


def model_dirs() -> list[Path]:
    """Folders searched for models, in order."""
    dirs = [Path(p) for p in os.environ.get("EASEL_MODELS", "").split(":") if p]
    dirs += [Path("models"), cache_dir() / "models"]
    hf = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return dirs + [hf]


def builtin_model() -> Path | None:
    """The shipped ShapeWorld model, if this install has it."""
    return BUILTIN_FILE if BUILTIN_FILE.is_file() else None


def list_models() -> list[ModelEntry]:
    """Every model found in the model folders (and the built-in one first)."""
    found = []
    if builtin_model():
        found.append(ModelEntry("shapeworld", BUILTIN_FILE, "built-in"))
    seen = set()
    for d in model_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            entry = _entry(p)
            if entry and entry.path.resolve() not in seen:
                seen.add(entry.path.resolve())
                found.append(entry)
    return found


def _entry(p: Path) -> ModelEntry | None:
    """A ModelEntry if `p` is a checkpoint file or a diffusers folder."""
    if p.is_file() and p.suffix in WEIGHT_SUFFIXES and _not_component(p):
        return ModelEntry(p.stem, p, "single-file")
    if p.is_dir() and (p / "model_index.json").is_file():
        name = p.name
        if p.parent.name == "snapshots":  # HF cache: models--org--name/snapshots/<hash>
            name = p.parent.parent.name.removeprefix("models--").replace("--", "/")
        return ModelEntry(name, p, "diffusers")
    return None


def _not_component(p: Path) -> bool:
    """Skip weights that belong to a diffusers folder (unet/, vae/ ...) and VAE/LoRA/embedding/ControlNet/upscaler
    folders."""
    skip = not_checkpoint_folders()
    return not (p.parent / "config.json").is_file() and not any(part.lower() in skip for part in p.parts)


def find_model(name: str | None, model_hash: str | None = None) -> ModelEntry | None:
    """The known model an image names (A1111's `Model` and `Model hash`): by name, checked against the hash, else
    by hash among all models (hashes are cached on disk); None when neither finds one. Never a path or a hub id."""
    entries = list_models()
    named = [e for e in entries if name and name in (e.name, e.path.name, e.path.stem)]
    if not model_hash or len(model_hash) < 10:  # no hash, or A1111's legacy 8-digit one that we do not compute
        return named[0] if named else None
    model_hash = model_hash.lower()
    for entry in named + [e for e in entries if e not in named]:
        if (_entry_sha256(entry) or "").startswith(model_hash):
            return entry
    if named:
        log.warning("model %r found, but its hash differs from the image's %s: using it anyway", name, model_hash)
        return named[0]
    return None


def _entry_sha256(entry: ModelEntry) -> str | None:
    """The full sha256 that A1111's model hash is the start of: the file's, or for a diffusers folder its UNet's
    weights (as easel records for folders)."""
    path = entry.path
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        path = files[0] if files else None
    try:
        return file_sha256(path) if path else None
    except OSError:
        return None


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A loadable path for a model spec; None means the built-in model."""
    if spec is None or str(spec) in ("", "shapeworld", "builtin", "built-in"):
        if builtin_model():
            return BUILTIN_FILE
        raise ModelNotFound("no model given and this install has no built-in model yet: "
                            "pass --model PATH (a .safetensors/.ckpt file or a diffusers folder)")
    path = Path(spec).expanduser()
    if path.exists():
        return path
    for entry in list_models():
        if entry.name == str(spec) or entry.path.name == str(spec):
            return entry.path
    if "/" in str(spec) and not str(spec).startswith((".", "/")):
        return _from_hub(str(spec))
    raise ModelNotFound(f"model {spec!r} not found: it is not a path, and no model of that name is in "
                        f"{', '.join(str(d) for d in model_dirs())}. Run `easel models` to see what easel finds.")


def _from_hub(repo_id: str) -> Path:
    """A diffusers-format snapshot of a hub repo (cached, or downloaded when online)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed "
                            "(pip install 'easel[hub]'), and no local model has that name") from None
    patterns = ["model_index.json", "*/config.json", "*.json", "*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ModelNotFound(f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}). Download it elsewhere and pass "
                            "--model PATH") from None
