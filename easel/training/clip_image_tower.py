"""Fit a CLIP image tower to a model's frozen text encoder (LiT, Zhai et al. 2022, with the roles swapped).

Stable Diffusion keeps only CLIP's text tower, so a shipped model cannot show the image-text half of CLIP (the
contrastive-training figure of `easel inspect clip`). This trains the ViT image tower, the text projection and
the temperature against the model's own text encoder, which stays frozen: the text embeddings the UNet was
trained on do not change, and the image tower learns to land next to them. The loss and the batches are
`easel train clip`'s (symmetric InfoNCE plus the caption's hard negatives, fresh ShapeWorld renders every step).

    python3 -m easel.training.clip_image_tower --minutes 5      # -> easel/assets/shapeworld/clip_vision.safetensors

The file holds the ContrastiveCLIP state dict without its `text.*` keys, and in its metadata the hash of the
model whose text encoder it was fitted to, so that it is never paired with another model's text tower.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from easel.models.clip_vision import CLIPVisionConfig
from easel.training.clip import ContrastiveCLIP, clip_step, evaluate_clip, make_batch
from easel.training.common import DistInfo, LoopConfig, Trainer, write_json

TOWER_FILE = "clip_vision.safetensors"
KIND = "easel-clip-image-tower"


def tower_state(model: ContrastiveCLIP) -> dict[str, torch.Tensor]:
    """Everything but the text encoder: vision.*, text_projection.weight, logit_scale (float32, contiguous)."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("text.")}


def save_tower(model: ContrastiveCLIP, path: Path, model_hash: str, vision: CLIPVisionConfig, metrics: dict) -> Path:
    """Write the tower atomically with the text model's hash, the ViT config and the retrieval scores."""
    import dataclasses
    import json

    from easel.weights.load import write_safetensors
    meta = {"kind": KIND, "text_model_hash": model_hash, "vision_config": json.dumps(dataclasses.asdict(vision)),
            "metrics": json.dumps(metrics)}
    write_safetensors(tower_state(model), path, metadata=meta)
    return path


def tower_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a tower file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tower(path: str | Path, loaded) -> ContrastiveCLIP:
    """The contrastive model: `loaded`'s own text encoder with the tower from `path`, checked to belong to it."""
    import json
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP image tower at {path}; fit one with `python3 -m easel.training.clip_image_tower`")
    meta = tower_metadata(path)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is not an easel CLIP image tower (fit one with `python3 -m "
                         "easel.training.clip_image_tower --model ...`)")
    if meta.get("text_model_hash") != loaded.hash:
        raise ValueError(f"{path} was fitted to the text encoder of model {meta.get('text_model_hash', '?')[:10]}, "
                         f"not to this model ({loaded.hash[:10]}); fit one for it with "
                         "`python3 -m easel.training.clip_image_tower --model ...`")
    vision = CLIPVisionConfig(**json.loads(meta["vision_config"]))
    text = loaded.model.text_encoders[0]
    model = ContrastiveCLIP(text.config, vision)
    model.text = text
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or any(not k.startswith("text.") for k in missing):
        raise ValueError(f"{path} does not fit a ViT of its own config: unexpected {unexpected[:3]}, missing "
                         f"{[k for k in missing if not k.startswith('text.')][:3]}")
    return model.eval()


def builtin_tower_path() -> Path:
    """Where the built-in model's image tower ships."""
    from easel.weights.registry import BUILTIN_DIR
    return BUILTIN_DIR / TOWER_FILE


def fit(loaded, vision: CLIPVisionConfig, out_dir: Path, loop: LoopConfig, eval_n: int = 500) -> tuple[ContrastiveCLIP, dict]:
    """Train the tower against `loaded`'s frozen text encoder; -> (model with the better of raw/EMA, metrics)."""
    text = loaded.model.text_encoders[0].float()
    torch.manual_seed(loop.seed)
    model = ContrastiveCLIP(text.config, vision)
    model.text = text.requires_grad_(False)
    tok = loaded.tokenizers[0]
    info = DistInfo()
    trainer = Trainer("clip-image-tower", out_dir, model, loop, info)
    trainer.run(lambda step: clip_step(model, tok, make_batch(step, loop.batch_size, vision.image_size, loop.seed, info),
                                       info.device))
    results = {}
    for name in ("raw", "ema") if trainer.ema else ("raw",):
        model.load_state_dict({**model.state_dict(), **trainer.final_weights(name == "ema")})
        results[name] = evaluate_clip(model, tok, eval_n, vision.image_size)
    best = max(results, key=lambda k: (results[k]["hardneg_all"], results[k][f"top1_of_{eval_n}"]))
    model.load_state_dict({**model.state_dict(), **trainer.final_weights(best == "ema")})
    metrics = {"chosen": best, "steps": trainer.step, **results[best]}
    write_json(out_dir / "metrics.json", metrics)
    return model.eval(), metrics


def main(argv: list[str] | None = None) -> int:
    """python3 -m easel.training.clip_image_tower [--model M] [--minutes N | --steps N] [--out FILE]"""
    p = argparse.ArgumentParser(prog="python3 -m easel.training.clip_image_tower", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="the model whose text encoder the tower is fitted to (default: built-in)")
    p.add_argument("--out", default=None, help=f"the tower file (default: the built-in model's {TOWER_FILE})")
    p.add_argument("--work", default="runs/clip-image-tower", help="checkpoints and log (resumable)")
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import easel
    from easel.training.presets import VISION_PRESETS
    loaded = easel.load(args.model).loaded
    size = loaded.model.config.default_size
    vision = VISION_PRESETS["shapeworld"] if size == 64 else CLIPVisionConfig(image_size=size, patch_size=size // 8)
    minutes = None if args.steps else (args.minutes or 5.0)  # `easel train clip`'s settings, for a budget
    loop = LoopConfig(steps=args.steps or 1, minutes=minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      ema_decay=0.99, warmup=100, ckpt_every=100)
    model, metrics = fit(loaded, vision, Path(args.work), loop)
    out = Path(args.out) if args.out else builtin_tower_path()
    print(save_tower(model, out, loaded.hash, vision, metrics))
    print(metrics, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
