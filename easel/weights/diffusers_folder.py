"""Diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...): read and write."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from easel.files import atomic_folder
from easel.models.configs import PRESETS, ModelConfig
from easel.weights import keys_clip, keys_unet, keys_vae
from easel.weights.detect import is_refiner
from easel.weights.load import CheckpointError, read_state_dict, write_safetensors

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a diffusers pipeline."""
    return (Path(path) / "model_index.json").is_file()


def read_folder(folder: str | os.PathLike, prediction: str | None = None) -> tuple[ModelConfig, dict[str, dict]]:
    """ModelConfig and component state dicts (our layout) of a diffusers folder."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    easel_cfg = folder / "easel_config.json"
    texts = [n for n in ("text_encoder", "text_encoder_2") if index.get(n) and index[n][0] is not None]
    parts = {"unet": keys_unet.from_diffusers(_weights(folder / "unet"), _unet_cfg(folder)),
             "vae": keys_vae.from_diffusers(_weights(folder / "vae"), _vae_cfg(folder))}
    for i, name in enumerate(texts):
        parts[f"text_encoder.{i}"] = keys_clip.from_hf(_weights(folder / name))
    if easel_cfg.is_file():
        cfg = ModelConfig.from_json(easel_cfg.read_text())
    else:
        cfg = _config_from_folder(folder, index, texts)
    if prediction:
        cfg = dataclasses.replace(cfg, prediction=prediction)
    return cfg, parts


def _config_from_folder(folder: Path, index: dict, texts: list[str]) -> ModelConfig:
    """ModelConfig from the component config.json files and the scheduler's prediction type."""
    unet = _unet_cfg(folder)
    vae = _vae_cfg(folder)
    encoders = tuple(keys_clip.config_from_diffusers(_json(folder / n / "config.json")) for n in texts)
    encoders = tuple(_with_tokenizer_ids(folder / n.replace("text_encoder", "tokenizer"), e)
                     for n, e in zip(texts, encoders))
    sched = _json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    xl = len(encoders) == 2
    refiner = _is_refiner_folder(index, encoders, unet)
    base = PRESETS["sdxl" if xl else "sdxl-refiner" if refiner else
                   "sd21" if encoders[0].hidden_act == "gelu" else "sd15"]
    return dataclasses.replace(
        base, name=f"{base.name}-diffusers", unet=unet, vae=vae, text_encoders=encoders,
        clip_skip=2 if xl or refiner else 1,  # diffusers' SD2 text encoder already ends at the penultimate layer
        prediction="v" if sched.get("prediction_type") == "v_prediction" else "eps",
        num_train_timesteps=sched.get("num_train_timesteps", 1000), beta_start=sched.get("beta_start", 0.00085),
        beta_end=sched.get("beta_end", 0.012), beta_schedule=sched.get("beta_schedule", "scaled_linear"),
        default_size=_unet_json(folder).get("sample_size", 64) * vae.downsample,
    )


def _is_refiner_folder(index: dict, encoders: tuple, unet) -> bool:
    """An SDXL refiner folder: text_encoder_2 alone feeding a UNet with `y` (diffusers' `requires_aesthetics_score`)."""
    return len(encoders) == 1 and bool(index.get("requires_aesthetics_score") or unet.adm_in_channels)


def _with_tokenizer_ids(tok_dir: Path, enc):
    """The pad token is a tokenizer setting in diffusers folders; copy it into the encoder config."""
    special = tok_dir / "special_tokens_map.json"
    vocab = tok_dir / "vocab.json"
    if not (special.is_file() and vocab.is_file()):
        return enc
    pad = _json(special).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    ids = _json(vocab)
    return dataclasses.replace(enc, pad_token_id=ids.get(pad, enc.pad_token_id))


def _unet_json(folder: Path) -> dict:
    return _json(folder / "unet" / "config.json")


def _unet_cfg(folder: Path):
    return keys_unet.config_from_diffusers(_unet_json(folder))


def _vae_cfg(folder: Path):
    return keys_vae.config_from_diffusers(_json(folder / "vae" / "config.json"))


def _json(path: Path) -> dict:
    """Read a JSON file with an error that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is incomplete: {path} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _weights(sub: Path) -> dict[str, torch.Tensor]:
    """A component's weights, from a single file or a sharded index."""
    for name in WEIGHT_FILES:
        if (sub / name).is_file():
            return read_state_dict(sub / name)[0]
    for index in sorted(sub.glob("*.index.json")):
        sd = {}
        for shard in sorted(set(_json(index)["weight_map"].values())):
            sd.update(read_state_dict(sub / shard)[0])
        return sd
    raise CheckpointError(f"no weights in {sub} (looked for {', '.join(WEIGHT_FILES)} and sharded *.index.json)")


def write_folder(folder: str | os.PathLike, cfg: ModelConfig, parts: dict[str, dict], tokenizers: list) -> None:
    """Write a diffusers folder that diffusers' own `from_pretrained` reads; built in a temp dir, then renamed."""
    folder = Path(folder)
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; choose a new destination folder")
    with atomic_folder(folder) as tmp:
        _write_components(tmp, cfg, parts, tokenizers)


def _write_components(root: Path, cfg: ModelConfig, parts: dict[str, dict], tokenizers: list) -> None:
    """Every component folder plus model_index.json and the scheduler config."""
    parts, cfg = _diffusers_text_encoders(parts, cfg)
    _component(root / "unet", keys_unet.diffusers_config(cfg.unet), keys_unet.to_diffusers(parts["unet"], cfg.unet),
               "diffusion_pytorch_model.safetensors")
    _component(root / "vae", keys_vae.diffusers_config(cfg.vae), keys_vae.to_diffusers(parts["vae"], cfg.vae),
               "diffusion_pytorch_model.safetensors")
    xl, refiner = len(cfg.text_encoders) == 2, is_refiner(cfg)
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline" if xl else
             "StableDiffusionInpaintPipeline" if cfg.is_inpaint else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for i, (enc_cfg, suffix) in enumerate(zip(cfg.text_encoders, _text_suffixes(cfg))):
        te = keys_clip.diffusers_config(enc_cfg)
        _component(root / f"text_encoder{suffix}", te, keys_clip.to_hf(parts[f"text_encoder.{i}"]), "model.safetensors")
        tokenizers[i].save(root / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", te["architectures"][0]]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if refiner:
        # As stabilityai/stable-diffusion-xl-refiner-1.0 publishes it: no CLIP-L, aesthetic-score conditioning,
        # and an empty negative prompt is encoded rather than zeroed.
        index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True,
                     force_zeros_for_empty_prompt=False)
    elif xl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg), indent=2))
    (root / "easel_config.json").write_text(cfg.to_json())


def _text_suffixes(cfg: ModelConfig) -> list[str]:
    """Folder suffix of each text encoder ('' -> text_encoder/, '_2' -> text_encoder_2/).

    The refiner's only encoder is OpenCLIP bigG, which diffusers keeps in text_encoder_2/ as in the SDXL base."""
    if is_refiner(cfg):
        return ["_2"]
    return [f"_{i + 1}" if i else "" for i in range(len(cfg.text_encoders))]


def _diffusers_text_encoders(parts: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """SD2's encoder is stored in diffusers without the layers it never uses (as diffusers' converter does)."""
    if len(cfg.text_encoders) != 1 or cfg.clip_skip == 1 or not cfg.text_final_norm:
        return parts, cfg
    sd, enc = keys_clip.drop_last_layers(parts["text_encoder.0"], cfg.text_encoders[0], cfg.clip_skip - 1)
    sd = {k: v for k, v in sd.items() if not k.startswith("text_projection")}
    enc = dataclasses.replace(enc, projection_dim=0)
    return {**parts, "text_encoder.0": sd}, dataclasses.replace(cfg, text_encoders=(enc,), clip_skip=1)


def _component(sub: Path, config: dict, sd: dict[str, torch.Tensor], filename: str) -> None:
    """One component folder: config.json + safetensors weights."""
    sub.mkdir(parents=True)
    (sub / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(sd, sub / filename, metadata={"format": "pt"})


def scheduler_config(cfg: ModelConfig) -> dict:
    """An EulerDiscreteScheduler config carrying the model's noise schedule and prediction type."""
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
            "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
            "timestep_spacing": "leading", "steps_offset": 1, "interpolation_type": "linear",
            "use_karras_sigmas": False}
