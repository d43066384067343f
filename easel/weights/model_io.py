"""Load a whole model from what users have (single file or diffusers folder), save it either way."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch

from easel.files import atomic_folder, atomic_path
from easel.models.configs import ModelConfig
from easel.models.layers import UNET_CHANNELS_LAST, use_fast_layout
from easel.models.sd import StableDiffusion
from easel.text.tokenizer import CLIPTokenizer, find_tokenizer
from easel.weights import diffusers_folder, keys_vae, single_file
from easel.weights.detect import detect_config
from easel.weights.load import CheckpointError, file_hash, read_state_dict, write_safetensors

log = logging.getLogger("easel")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run, with its tokenizers and where it came from."""

    model: StableDiffusion
    tokenizers: list[CLIPTokenizer]
    source: str
    hash: str
    skipped_keys: list[str] = dataclasses.field(default_factory=list)
    # The textual-inversion EmbeddingLibrary prompts use (made on first use by pipelines.common.embedding_library).
    embeddings: object | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """What users call it: the file or folder name without suffix."""
        return Path(self.source).stem if self.source else self.model.config.name


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' | 'auto' (or a torch dtype) -> torch dtype, with an error listing the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16, auto")
    return DTYPES[dtype]


def auto_dtype(device: str | torch.device = "cpu") -> str:
    """What `--dtype auto` runs: 'bf16' on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX) and on CUDA
    GPUs that support it, else 'fp32' (emulated bf16 is slower than fp32)."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if torch.device(device).type != "cpu":
        return "fp32"
    return "bf16" if cpu_bf16() else "fp32"


def vae_dtype_for(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The VAE's dtype for a model loaded in `dtype`: fp32 under fp16 (SD VAEs overflow to NaN in fp16, A1111's
    --no-half-vae), and under `auto` on CPUs without AMX, where bf16 convolutions run slower than fp32 ones
    (measured in bench/README.md: the VAE is nearly all convolutions, the UNet mostly matmuls)."""
    if dtype == "auto" and torch.device(device).type == "cpu" and not cpu_amx():
        return torch.float32
    dtype = parse_dtype(dtype, device)
    return torch.float32 if dtype == torch.float16 else dtype


def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls and convolutions several times faster than AVX-512)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        return bool(probe())
    return "amx_bf16" in _cpu_flags()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(text.split())


def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        return bool(probe()) or cpu_amx()
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())  # older torch: read the flags ourselves


def read_model(source: str | os.PathLike, prediction: str | None = None) -> tuple[ModelConfig, dict[str, dict], list[str]]:
    """Config, component state dicts (our layout) and skipped keys of a single file or diffusers folder."""
    path = Path(source)
    if path.is_dir():
        if not diffusers_folder.is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers model. "
                                  "Pass a .safetensors file or a diffusers folder.")
        cfg, parts = diffusers_folder.read_folder(path, prediction)
        return cfg, parts, []
    sd, metadata = read_state_dict(path)
    cfg = detect_config(sd, metadata, prediction)
    parts, skipped = single_file.split(sd, cfg)
    return cfg, parts, skipped


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu",
               vae: str | os.PathLike | None = None, tokenizer: str | None = None,
               prediction: str | None = None) -> LoadedModel:
    """Load a checkpoint into easel's model classes (strict), with tokenizers and an optional VAE override."""
    vae_dtype = vae_dtype_for(dtype, device)
    dtype = parse_dtype(dtype, device)
    cfg, parts, skipped = read_model(source, prediction)
    if vae is not None:
        parts["vae"] = read_vae(vae)
    model = StableDiffusion.empty(cfg)
    model.load_components(parts, dtype=dtype, vae_dtype=vae_dtype)
    model.to(device).eval().requires_grad_(False)
    if UNET_CHANNELS_LAST:  # opt-in: measured slower on AVX-512 without AMX (easel.models.layers)
        use_fast_layout(model.unet)
    tokenizers = load_tokenizers(source, cfg, tokenizer)
    if skipped:
        log.info("skipped %d keys that are not network weights (e.g. %s)", len(skipped), skipped[0])
    src = str(source)
    return LoadedModel(model, tokenizers, src, _hash(Path(src)), skipped)


def _hash(path: Path) -> str:
    """A1111-style hash of a single file; for folders, of the UNet weights."""
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        return file_hash(files[0]) if files else ""
    return file_hash(path)


def load_tokenizers(source: str | os.PathLike, cfg: ModelConfig, explicit: str | None = None) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder, found in the documented order (see easel.text.tokenizer)."""
    kinds = ["clip-l", "openclip"] if len(cfg.text_encoders) == 2 else [
        "openclip" if cfg.text_encoders[0].hidden_act == "gelu" else "clip-l"]
    return [find_tokenizer(str(source), explicit if i == 0 else None, kind=k) for i, k in enumerate(kinds)]


def read_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A standalone VAE (CompVis or diffusers keys, file or diffusers `vae/` folder) in our layout."""
    path = Path(path)
    if path.is_dir():
        files = [f for f in diffusers_folder.WEIGHT_FILES if (path / f).is_file()]
        if not files:
            raise CheckpointError(f"no VAE weights found in folder {path}")
        path = path / files[0]
    sd, _ = read_state_dict(path)
    out = keys_vae.vae_state_from_any(sd)
    return out[0] if isinstance(out, tuple) else out


def _write_single_file(dst: Path, sd: dict, metadata: dict, tokenizers: list) -> None:
    """The checkpoint and its tokenizer folders, each built under a temp name; the checkpoint is renamed into
    place last, so a kill or a full disk never leaves a checkpoint beside a truncated tokenizer folder."""
    tok_dir = dst.with_suffix(".tokenizer")
    folders = [tok_dir if i == 0 else tok_dir.with_name(tok_dir.name + f"_{i + 1}") for i in range(len(tokenizers))]
    with contextlib.ExitStack() as stack:  # leaves in reverse order: tokenizer folders first, the checkpoint last
        tmp_file = stack.enter_context(atomic_path(dst))
        for folder, tok in zip(folders, tokenizers):
            tok.save(stack.enter_context(atomic_folder(folder, replace=True)))
        write_safetensors(sd, tmp_file, metadata)


def save_model(loaded: LoadedModel, dst: str | os.PathLike, to: str = "single-file",
               extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the model as one `.safetensors` (CompVis layout, config in metadata) or a diffusers folder.

    `extra_metadata` entries (e.g. the preview map, `easel.latent_rgb`) go into a single file's metadata.
    """
    model, dst = loaded.model, Path(dst)
    parts = {k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in model.component_state_dicts().items()}
    if to == "diffusers":
        diffusers_folder.write_folder(dst, model.config, parts, loaded.tokenizers)
    elif to == "single-file":
        if dst.suffix != ".safetensors":
            raise CheckpointError(f"single-file output must end in .safetensors (got {dst.name})")
        metadata = {**(extra_metadata or {}), "easel_config": model.config.to_json(), "format": "pt"}
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map text to text; not so for {bad[:3]}")
        _write_single_file(dst, single_file.join(parts, model.config), metadata, loaded.tokenizers)
    else:
        raise ValueError(f"unknown target format {to!r}; choose 'single-file' or 'diffusers'")
    return dst
