"""`easel merge A B [C]`: A1111's checkpoint merger.

Modes (M = --alpha), per floating-point tensor, computed in float32 and stored in A's dtype (or --dtype):
- weighted sum:    A * (1 - M) + B * M
- add difference:  A + (B - C) * M   (e.g. A = an inpainting model, B = a fine-tune, C = B's base)

Tensors only A has, and integer tensors, are A's. As A1111, an inpainting A (9 UNet input channels) merged with
a plain B merges the first 4 channels and keeps A's mask channels. Per-block weights (`--block-weights`, the
"Merge Block Weighted" extension's convention): one M per UNet block, IN00..IN(n-1), M00, OUT00..OUT(n-1) (25 for
SD 1.x/2.x, 19 for SDXL), the rest of the UNet (time embedding, output layer) and the other components at
--alpha. Optional: a VAE put in (`--vae`), LoRAs baked
in at a weight (`--lora NAME:W`). The result is one `.safetensors` or a diffusers folder; its metadata names the
sources and their hashes in A1111's `sd_merge_recipe` / `sd_merge_models` keys.

Torch loads when a merge runs, not at import: `easel --help` builds this command's flags without it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

MODES = ("weighted-sum", "add-difference")


class MergeError(ValueError):
    """The models cannot be merged as asked; the message names the problem and the fix."""


def merge_tensor(a, b, c, alpha: float, mode: str):
    """One tensor of the merge in float32, stored in A's dtype; B/C may cover only A's first input channels."""
    n = b.shape[1] if a.shape != b.shape else None  # inpainting A: its mask channels stay A's
    head = (a[:, :n] if n else a).float()
    if mode == "add-difference":
        new = head + (b.float() - c.float()) * alpha
    else:
        new = head * (1 - alpha) + b.float() * alpha
    if n is None:
        return new.to(a.dtype)
    out = a.clone()
    out[:, :n] = new.to(a.dtype)
    return out


def _fits(key: str, a, b) -> bool:
    """Same shape, or A1111's inpainting case: A has more input channels than B, every other dimension equal."""
    if a.shape == b.shape:
        return True
    return a.ndim == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:] and a.shape[1] > b.shape[1]


def block_names(n_in: int, n_out: int) -> list[str]:
    """The block labels per-block weights are given for, in order: IN00.., M00, OUT00.."""
    return [f"IN{i:02d}" for i in range(n_in)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


def unet_block_counts(unet: dict) -> tuple[int, int]:
    """(input blocks, output blocks) of a UNet state dict in easel's (ldm) key names."""
    def count(prefix: str) -> int:
        found = {int(k.split(".")[1]) for k in unet if k.startswith(prefix)}
        return max(found) + 1 if found else 0
    return count("input_blocks."), count("output_blocks.")


class BlockAlpha:
    """M per tensor: per UNet block from a list of weights (IN.., M00, OUT..), `base` everywhere else."""

    def __init__(self, base: float, weights: list[float] | None = None, counts: tuple[int, int] = (0, 0)):
        self.base, self.weights, (self.n_in, self.n_out) = base, weights, counts
        if weights is not None and len(weights) != self.n_in + 1 + self.n_out:
            names = block_names(self.n_in, self.n_out)
            raise MergeError(f"--block-weights has {len(weights)} values; this UNet has {len(names)} blocks "
                             f"({names[0]}..{names[self.n_in - 1]}, M00, OUT00..{names[-1]}): give one M for each")

    def __call__(self, part: str, key: str) -> float:
        """M for one tensor of one component."""
        if self.weights is None or part != "unet":
            return self.base
        head, _, rest = key.partition(".")
        if head == "input_blocks":
            return self.weights[int(rest.split(".")[0])]
        if head == "middle_block":
            return self.weights[self.n_in]
        if head == "output_blocks":
            return self.weights[self.n_in + 1 + int(rest.split(".")[0])]
        return self.base


def merge_parts(a: dict, b: dict, c: dict | None, alpha, mode: str) -> dict:
    """Merge component state dicts {'unet': {...}, 'vae': ..., 'text_encoder.N': ...} (A's dicts are reused).
    `alpha`: one M, or a function (part, key) -> M (per-block weights)."""
    alpha_of = alpha if callable(alpha) else (lambda part, key: alpha)
    if mode not in MODES:
        raise MergeError(f"unknown merge mode {mode!r}: choose {' or '.join(MODES)}")
    if (mode == "add-difference") != (c is not None):
        raise MergeError("add-difference needs three models (A B C); weighted-sum takes two (A B)")
    out = {}
    for part, sd in a.items():
        merged = {}
        for key, ta in sd.items():
            tb = b.get(part, {}).get(key)
            tc = c.get(part, {}).get(key) if c is not None else None
            if tb is None or not ta.is_floating_point() or (c is not None and tc is None):
                merged[key] = ta
                continue
            for name, t in (("B", tb), ("C", tc)):
                if t is not None and not _fits(key, ta, t):
                    raise MergeError(f"{part} tensor {key}: A is {tuple(ta.shape)}, {name} is {tuple(t.shape)}. "
                                     "Merge models of one family (SD1 / SD2 / SDXL); an inpainting model must be A")
            merged[key] = merge_tensor(ta, tb, tc, alpha_of(part, key), mode)
        out[part] = merged
    return out


def check_family(configs: list, names: list[str]) -> None:
    """MergeError when the models are of different architectures (inpainting input channels aside)."""
    import dataclasses

    def shape(cfg):
        return (dataclasses.replace(cfg.unet, in_channels=4), cfg.text_encoders, cfg.vae.ch_mult)

    first = shape(configs[0])
    for cfg, name in zip(configs[1:], names[1:]):
        if shape(cfg) != first:
            raise MergeError(f"{name} ({cfg.name}) is another kind of model than {names[0]} ({configs[0].name}): "
                             "merge models of one family (SD1 / SD2 / SDXL)")


def source_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sha256, A1111's 10-digit short hash) of a model file (a folder: of its UNet weights)."""
    from easel.weights.load import file_sha256
    p = Path(path)
    if p.is_dir():
        files = sorted((p / "unet").glob("*.safetensors")) or sorted((p / "unet").glob("*.bin"))
        if not files:
            return "", ""
        p = files[0]
    sha = file_sha256(p)
    return sha, sha[:10]


def recipe(sources: list[Path], mode: str, alpha: float, vae: str | None, loras: list[tuple[str, float]],
           inpainting: bool = False, block_weights: list[float] | None = None) -> dict:
    """A1111's merge metadata: `sd_merge_recipe` (how) and `sd_merge_models` (which files, by sha256)."""
    hashes = [source_hashes(s) for s in sources]
    rec = {"type": "webui", "primary_model_hash": hashes[0][0], "secondary_model_hash": hashes[1][0],
           "tertiary_model_hash": hashes[2][0] if len(hashes) > 2 else None,
           "interp_method": {"weighted-sum": "Weighted sum", "add-difference": "Add difference"}[mode],
           "multiplier": alpha, "bake_in_vae": vae or "None", "easel_loras": [f"{n}:{w:g}" for n, w in loras],
           "is_inpainting": inpainting, **({"block_weights": block_weights} if block_weights else {})}
    models = {sha: {"name": Path(s).name, "legacy_hash": short} for s, (sha, short) in zip(sources, hashes)}
    return {"sd_merge_recipe": json.dumps(rec), "sd_merge_models": json.dumps(models)}


def merge_models(sources: list[str | os.PathLike], out: str | os.PathLike, alpha: float = 0.5,
                 mode: str = "weighted-sum", to: str = "single-file", vae: str | None = None,
                 loras: list[tuple[str, float]] | None = None, dtype: str | None = None,
                 block_weights: list[float] | None = None) -> Path:
    """Merge 2 or 3 models (files or diffusers folders, by path or name) and write the result; `block_weights`:
    one M per UNet block (IN.., M00, OUT..) instead of `alpha` there."""
    from easel.weights.model_io import read_model
    from easel.weights.registry import resolve_model
    for m in [alpha, *(block_weights or [])]:
        if not 0 <= m <= 1 and mode == "weighted-sum":
            raise MergeError(f"M = {m} is outside 0..1: weighted sum uses A * (1 - M) + B * M")
    paths = [Path(resolve_model(s)) for s in sources]
    read = [read_model(p) for p in paths]
    check_family([cfg for cfg, _, _ in read], [p.name for p in paths])
    per_tensor = BlockAlpha(alpha, block_weights, unet_block_counts(read[0][1]["unet"]))
    parts = merge_parts(read[0][1], read[1][1], read[2][1] if len(read) > 2 else None, per_tensor, mode)
    meta = recipe(paths, mode, alpha, vae, loras or [], read[0][0].is_inpaint, block_weights)
    return _write(read[0][0], parts, paths[0], Path(out), to, vae, loras or [], dtype, meta)


def _write(cfg, parts: dict, first: Path, out: Path, to: str, vae: str | None, loras: list, dtype: str | None,
           meta: dict) -> Path:
    """Build the merged model (a VAE and LoRAs put in), then save it as A's kind of model."""
    import torch

    from easel.models.sd import StableDiffusion
    from easel.text.tokenizer import TokenizerNotFound
    from easel.weights.lora import apply_loras
    from easel.weights.model_io import LoadedModel, load_tokenizers, parse_dtype, read_vae, save_model
    if vae:
        parts["vae"] = read_vae(vae)
    model = StableDiffusion.empty(cfg)
    model.load_components(parts, dtype=parse_dtype(dtype) if dtype else None,
                          vae_dtype=parse_dtype(dtype) if dtype else None)
    if loras:
        with torch.no_grad():
            apply_loras(model, loras)  # merged into the weights for good: no unload
    try:
        tokenizers = load_tokenizers(str(first), cfg)
    except TokenizerNotFound:
        if to == "diffusers":
            raise
        tokenizers = []  # a single file needs none; the user's tokenizer setup finds one as for A
    return save_model(LoadedModel(model, tokenizers, str(first), ""), out, to=to, extra_metadata=meta)


def parse_lora(spec: str) -> tuple[str, float]:
    """'name:0.7' -> ('name', 0.7); a bare name has weight 1."""
    name, sep, weight = spec.rpartition(":")
    if not sep or not name:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        return spec, 1.0  # a path with a colon and no weight


def add_merge_parser(sub) -> argparse.ArgumentParser:
    """Register `easel merge` on the top-level sub-parsers."""
    p = sub.add_parser("merge", help="merge checkpoints (A1111's checkpoint merger): weighted sum or add difference")
    p.add_argument("models", nargs="+", metavar="MODEL", help="A B (weighted sum) or A B C (add difference): paths "
                                                               "or names from `easel models`")
    p.add_argument("--alpha", "-M", type=float, default=0.5, help="M: A*(1-M)+B*M, or A+(B-C)*M (default 0.5)")
    p.add_argument("--mode", choices=MODES, help="default: weighted-sum for 2 models, add-difference for 3")
    p.add_argument("--out", required=True, help="output .safetensors file, or a folder with --to diffusers")
    p.add_argument("--to", default="single-file", choices=["single-file", "diffusers"], help="output format")
    p.add_argument("--vae", help="put this VAE into the result")
    p.add_argument("--lora", action="append", default=[], help="bake a LoRA in: NAME or NAME:WEIGHT (repeatable)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="dtype of the result (default: A's)")
    p.add_argument("--block-weights", metavar="M0,M1,...", help="one M per UNet block, IN00..,M00,OUT00.. (25 for "
                   "SD 1.x/2.x, 19 for SDXL); --alpha for everything else")
    p.set_defaults(func=cmd_merge)
    return p


def cmd_merge(args: argparse.Namespace) -> int:
    """Run `easel merge`."""
    if len(args.models) not in (2, 3):
        raise MergeError(f"give 2 models (A B) or 3 (A B C), not {len(args.models)}")
    mode = args.mode or ("add-difference" if len(args.models) == 3 else "weighted-sum")
    out = merge_models(args.models, args.out, args.alpha, mode, args.to, args.vae,
                       [parse_lora(s) for s in args.lora], args.dtype, parse_block_weights(args.block_weights))
    print(out)
    return 0


def parse_block_weights(text: str | None) -> list[float] | None:
    """'0,0.5,1,...' -> floats (None when not given), with an error naming a value that is not a number."""
    if not text:
        return None
    values = []
    for i, v in enumerate(text.split(",")):
        try:
            values.append(float(v))
        except ValueError:
            raise MergeError(f"--block-weights value {i + 1} ({v.strip()!r}) is not a number") from None
    return values
