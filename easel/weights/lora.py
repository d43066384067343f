"""LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): read, find, apply, save.

A LoRA stores, for some layers of the model, two thin matrices `down` (rank, in) and `up` (out, rank) and a
number `alpha`; the layer's weight becomes W + weight * (alpha / rank) * (up @ down). LoCon stores the same
for convolutions: `down` a k x k conv (rank, in, k, k), `up` a 1x1 conv (out, rank, 1, 1).

Formats read: kohya / A1111 (`lora_unet_*`, `lora_te*_`, `.lora_down/.lora_up/.alpha`), diffusers / PEFT
(`unet.*.lora_A/lora_B`, alphas in `.alpha` keys or in the `lora_adapter_metadata` diffusers writes), and the
older diffusers attention-processor form. Names are matched by `easel.weights.lora_keys`.

`apply_loras` merges into the weights in place (no slowdown while sampling) and returns a `LoraPatch` whose
`unload()` puts the original tensors back bit for bit.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from easel.models.configs import PRESETS, ModelConfig, UNetConfig
from easel.models.sd import StableDiffusion
from easel.weights import lora_keys
from easel.weights.load import CheckpointError, cache_dir, read_state_dict, write_safetensors

log = logging.getLogger("easel")

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"  # the file name diffusers saves a LoRA under
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the PEFT LoraConfig(s)
FAMILIES = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # family -> preset whose layout a file uses


class LoraError(ValueError):
    """A LoRA file cannot be used; the message names the problem and the fix."""


class LoraNotFound(LoraError, FileNotFoundError):
    """No LoRA of that name in the LoRA folders; the message lists what exists."""


@dataclass
class LoraLayer:
    """One layer's low-rank update: W += weight * scale * (up @ down)."""

    down: Tensor  # (rank, in) or (rank, in, kh, kw)
    up: Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: scale 1 (alpha = rank), the PEFT convention without an alpha
    keys: list[str]  # the file keys this layer came from

    @property
    def rank(self) -> int:
        """Inner dimension of the product."""
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (1 when the file gives no alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    """The LoRA layers of one file, under the file's own layer names."""

    name: str
    format: str  # "kohya" | "peft" | "diffusers-old"
    layers: dict[str, LoraLayer]
    unsupported: list[str] = field(default_factory=list)  # keys of kinds easel does not apply (DoRA, LoHa, ...)
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


@dataclass
class LoraPatch:
    """What `apply_loras` changed; `unload()` restores the original weights exactly."""

    model: StableDiffusion
    originals: dict[str, Tensor]  # module path -> copy (on the CPU) of the weight before patching
    unmatched: list[str]  # file keys that matched no layer of the model, or that easel cannot apply
    applied: int  # number of (file layer -> model layer) updates merged

    def unload(self) -> None:
        """Put back the original weights (bit-exact); unload patches in the reverse order of applying them."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for path, original in self.originals.items():
                modules[path].weight.copy_(original)
        self.originals = {}

    def __enter__(self) -> LoraPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.unload()


# ---------------------------------------------------------------- reading


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (kohya/A1111, LoCon, diffusers/PEFT); raises LoraError for anything else."""
    path = Path(path)
    try:
        sd, metadata = read_state_dict(path)
    except CheckpointError as e:
        raise LoraError(f"cannot read LoRA {path}: {e}") from None
    lora = parse_lora(sd, metadata, path.stem)
    lora.path = path
    return lora


def parse_lora(sd: dict[str, Tensor], metadata: dict[str, str] | None = None, name: str = "lora") -> LoraFile:
    """Group a LoRA state dict into layers (the file's names), resolving each layer's alpha."""
    metadata = metadata or {}
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)  # layer -> role -> key
    others = []
    for key in sd:
        stem, role = lora_keys.split_key(key)
        if role:
            groups[stem][role] = key
        else:
            others.append(key)
    unsupported = []
    for key in others:  # an extra part of a layer (DoRA scale, Tucker mid, bias) makes the whole layer unusable
        owner = next((s for n in (1, 2, 3) if (s := key.rsplit(".", n)[0]) in groups), None)
        if owner is None:
            unsupported.append(key)
        else:
            groups[owner][key] = key
    layers = {}
    for stem, roles in groups.items():
        if set(roles) - {"alpha"} != {"down", "up"}:
            unsupported += roles.values()  # half a pair, or a layer with parts easel does not apply
            continue
        alpha = float(sd[roles["alpha"]]) if "alpha" in roles else None
        layers[stem] = LoraLayer(sd[roles["down"]], sd[roles["up"]], alpha, sorted(roles.values()))
    if not layers:
        raise LoraError(f"{name} is not a LoRA file: {_what_is_it(sd)}")
    fmt = _format(layers)
    if fmt == "peft":
        _peft_alphas(layers, metadata)
    return LoraFile(name, fmt, layers, sorted(unsupported), dict(metadata))


def _format(layers: dict[str, LoraLayer]) -> str:
    first = next(iter(layers.values())).keys
    if any(k.startswith("lora_") for k in first):
        return "kohya"
    return "peft" if any(".lora_A." in k or ".lora_B." in k for k in first) else "diffusers-old"


def _what_is_it(sd: dict[str, Tensor]) -> str:
    """Name what a non-LoRA file looks like, so the user knows where it goes instead."""
    keys = list(sd)
    has = lambda *parts: any(p in k for k in keys for p in parts)  # noqa: E731
    if not keys:
        return "it holds no tensors"
    if has("hada_w1_a", "lokr_w1", "oft_blocks", ".oft_R"):
        return ("it is a LyCORIS LoHa/LoKr/OFT network (keys like "
                f"{keys[0]!r}); easel applies LoRA and LoCon only")
    if has("model.diffusion_model.", "down_blocks.0.resnets.0.conv1.weight"):
        return "it is a whole Stable Diffusion model or UNet: load it as the model (--model), not as a LoRA"
    if has("first_stage_model.", "decoder.up.0.", "decoder.up_blocks."):
        return "it is a VAE: pass it as --vae"
    if has("string_to_param", "emb_params", "clip_l", "clip_g") and len(keys) <= 4:
        return "it is a textual-inversion embedding: put it in the embeddings folder"
    return (f"none of its {len(keys)} keys ends in .lora_down/.lora_up.weight or .lora_A/.lora_B.weight "
            f"(first keys: {keys[:4]})")


def _peft_alphas(layers: dict[str, LoraLayer], metadata: dict[str, str]) -> None:
    """Fill alphas of a diffusers/PEFT file from its `lora_adapter_metadata` (per component LoraConfig)."""
    try:
        configs = json.loads(metadata.get(PEFT_METADATA) or "{}")
    except ValueError:
        log.warning("LoRA metadata %s is not valid JSON; using alpha = rank", PEFT_METADATA)
        return
    for stem, layer in layers.items():
        if layer.alpha is not None:
            continue  # an explicit `.alpha` key wins
        component, _, module = stem.partition(".")
        cfg = {k.removeprefix(component + "."): v for k, v in configs.items() if k.startswith(component + ".")}
        if "lora_alpha" not in cfg:
            continue
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        # rsLoRA scales by alpha / sqrt(rank): store the alpha that gives that scale as alpha / rank.
        layer.alpha = alpha * math.sqrt(layer.rank) if cfg.get("use_rslora") else alpha


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank/alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in pattern.items():
        key = key.removeprefix("^")
        if module == key or module.endswith("." + key):
            return value
    return default


# ---------------------------------------------------------------- applying


def apply_loras(model: StableDiffusion, loras: list[tuple[str | Path | LoraFile, float]],
                te_weights: list[float] | None = None) -> LoraPatch:
    """Merge LoRAs into `model` in place: W += weight * alpha/rank * (up @ down), computed in fp32.

    `loras` are (path, name in the LoRA folders, or LoraFile; weight). `te_weights` gives each LoRA its own
    weight for the text encoders (default: the same as for the UNet); a 0 weight skips that part. A layer
    touched by several LoRAs gets their sum, rounded once to the weight's dtype. Call `unload()` to undo.
    """
    if not hasattr(model, "unet") and hasattr(model, "model"):
        model = model.model  # a LoadedModel: patch the networks it holds
    if te_weights is not None and len(te_weights) != len(loras):
        raise ValueError(f"te_weights has {len(te_weights)} entries for {len(loras)} LoRAs: give one per LoRA")
    files = [(spec if isinstance(spec, LoraFile) else read_lora(find_lora(str(spec))), float(w))
             for spec, w in loras]
    plan, unmatched, applied = _plan(model, files, te_weights)
    originals = _merge(model, plan)
    return LoraPatch(model, originals, unmatched, applied)


def _plan(model, files: list[tuple[LoraFile, float]], te_weights: list[float] | None):
    """Module path -> [(factor, layer)], the unmatched keys, and the update count; raises on shape mismatches."""
    targets = lora_keys.target_names(model)
    paths = set(targets.values())
    weights = {n: m.weight for n, m in model.named_modules() if n in paths}
    plan: dict[str, list[tuple[float, LoraLayer]]] = collections.defaultdict(list)
    unmatched, bad, applied = [], [], 0
    for i, (lora, weight) in enumerate(files):
        te_weight = weight if te_weights is None else float(te_weights[i])
        missing = []
        for stem, layer in lora.layers.items():
            path = targets.get(lora_keys.normalize(stem))
            if path is None:
                missing += layer.keys
                continue
            problem = _shape_problem(layer, weights[path].shape)
            if problem:
                bad.append(f"{stem} -> {path}: {problem}")
                continue
            factor = te_weight if path.startswith(lora_keys.TEXT) else weight
            if factor == 0:
                continue  # switched off for this component (e.g. te_weights 0): nothing to add
            plan[path].append((factor * layer.scale, layer))
            applied += 1
        _warn(lora, missing)
        unmatched += lora.unsupported + missing
    if bad:
        raise LoraError(f"{len(bad)} LoRA layer(s) do not fit this model, e.g. {bad[:3]}. The LoRA was made for "
                        f"another model family (SD1 / SD2 / SDXL) than the loaded one; pick a matching LoRA.")
    return plan, unmatched, applied


def _warn(lora: LoraFile, missing: list[str]) -> None:
    """Log the keys of one file that are not applied, so that nothing is dropped silently."""
    if missing:
        log.warning("LoRA %s: %d key(s) match no layer of this model, e.g. %s", lora.name, len(missing), missing[:3])
    if lora.unsupported:
        log.warning("LoRA %s: %d key(s) not applied (incomplete pairs, or DoRA/Tucker/bias parts easel does not "
                    "apply), e.g. %s", lora.name, len(lora.unsupported), lora.unsupported[:3])


def _shape_problem(layer: LoraLayer, shape: torch.Size) -> str:
    """Why up @ down cannot update a weight of `shape` ('' when it can)."""
    down, up = layer.down, layer.up
    if up.shape[1] != down.shape[0] or up[0, 0].numel() != 1:
        return f"up {tuple(up.shape)} and down {tuple(down.shape)} do not form a low-rank pair"
    # A linear LoRA on a 1x1 conv (SD1's proj_in) or the reverse has the right size in another shape.
    if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]):
        return f"update is {up.shape[0]}x{tuple(down.shape[1:])}, weight is {tuple(shape)}"
    return ""


def lora_delta(layer: LoraLayer, shape: torch.Size, device: torch.device | None = None) -> Tensor:
    """up @ down in fp32, reshaped to the weight's `shape` (without alpha or weight)."""
    up = layer.up.to(device, torch.float32).reshape(layer.up.shape[0], layer.rank)  # (out, r)
    down = layer.down.to(device, torch.float32).reshape(layer.rank, -1)  # (r, in * kh * kw)
    return (up @ down).reshape(shape)  # (out, in[, kh, kw])


def _merge(model, plan: dict[str, list[tuple[float, LoraLayer]]]) -> dict[str, Tensor]:
    """Add every planned update to its weight, one layer at a time; return copies of the originals."""
    modules = dict(model.named_modules())
    originals = {}
    with torch.no_grad():
        for path, updates in plan.items():
            weight = modules[path].weight
            originals[path] = weight.detach().to("cpu", copy=True)  # CPU: spare GPU memory on big models
            total = weight.to(torch.float32, copy=True)  # (out, in[, kh, kw]), fp32 whatever the weight's dtype
            for factor, layer in updates:
                total += factor * lora_delta(layer, weight.shape, weight.device)
            weight.copy_(total.to(weight.dtype))
    return originals


# ---------------------------------------------------------------- finding


BUILTIN_LORA_DIR = Path(__file__).resolve().parent.parent / "assets" / "loras"  # LoRAs shipped with easel


def lora_dirs() -> list[Path]:
    """Folders searched for LoRAs, in order: $EASEL_LORA_DIRS (os.pathsep-separated), ./models/Lora, cache,
    then the LoRAs shipped with easel (the built-in model's LCM-LoRA)."""
    dirs = [Path(p).expanduser() for p in os.environ.get("EASEL_LORA_DIRS", "").split(os.pathsep) if p]
    return dirs + [Path("models") / "Lora", cache_dir() / "loras", BUILTIN_LORA_DIR]


def list_loras(dirs: list[Path] | None = None) -> list[dict]:
    """Every LoRA file in the LoRA folders: [{name, path, size}], name = file stem (folder name for diffusers')."""
    found, seen = [], set()
    for d in lora_dirs() if dirs is None else dirs:
        if not Path(d).is_dir():
            continue
        for p in sorted(Path(d).rglob("*")):
            if p.is_file() and p.suffix in LORA_SUFFIXES and p.resolve() not in seen:
                seen.add(p.resolve())
                name = p.parent.name if p.name == DIFFUSERS_LORA else p.stem  # diffusers: one folder per LoRA
                found.append({"name": name, "path": p, "size": p.stat().st_size})
    return found


def find_lora(name_or_path: str, dirs: list[Path] | None = None) -> Path:
    """A LoRA by name (file stem, or file name) in the LoRA folders, else by path. The folders come first, so that
    a file of the same name in the working directory never stands in for a listed LoRA (the server's names)."""
    entries = list_loras(dirs)
    for e in entries:
        if name_or_path in (e["name"], e["path"].name):
            return e["path"]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if (path / DIFFUSERS_LORA).is_file():  # a folder written by diffusers' save_lora_weights
        return path / DIFFUSERS_LORA
    searched = ", ".join(str(d) for d in (lora_dirs() if dirs is None else dirs))
    names = sorted({e["name"] for e in entries})
    have = (f"LoRAs found: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" if names
            else "no LoRA files there")
    raise LoraNotFound(f"LoRA {name_or_path!r} not found: not a file, and not a name in {searched} ({have}). "
                       f"Put the file in one of those folders or set EASEL_LORA_DIRS.")


# ---------------------------------------------------------------- saving


def save_lora(path: str | os.PathLike, layers: dict[str, tuple[Tensor, Tensor, float]], fmt: str = "kohya",
              family: str = "sd1", config: ModelConfig | UNetConfig | None = None,
              unet_names: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write LoRA layers {our module path: (down, up, alpha)} as a kohya or diffusers/PEFT .safetensors, atomically.

    Paths are easel's: `input_blocks.1.1.transformer_blocks.0.attn1.to_q` (or with `unet.`), and
    `text_encoders.0.text_model.encoder.layers.0.self_attn.q_proj`. `config` gives the UNet layout when it is not
    the family's standard one (tiny test models); `unet_names` ("diffusers" | "compvis") overrides kohya's
    UNet spelling, which is diffusers' for SD1/SD2 and CompVis' for SDXL (as kohya's trainers write them).
    `metadata` adds string entries to the file's header (a trainer's settings, `ss_*` keys).
    """
    if fmt not in ("kohya", "peft"):
        raise ValueError(f"unknown LoRA format {fmt!r}: choose 'kohya' or 'peft'")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {sorted(FAMILIES)}")
    unet_names = unet_names or ("compvis" if family == "sdxl" else "diffusers")
    if unet_names not in ("diffusers", "compvis"):
        raise ValueError(f"unet_names must be 'diffusers' or 'compvis', not {unet_names!r}")
    ucfg = config.unet if isinstance(config, ModelConfig) else config or PRESETS[FAMILIES[family]].unet
    theirs = lora_keys.unet_module_names(ucfg)
    text_count = len(config.text_encoders) if isinstance(config, ModelConfig) else 2 if family == "sdxl" else 1
    sd, named = {}, {}
    for ours, (down, up, alpha) in layers.items():
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{ours}: up {tuple(up.shape)} and down {tuple(down.shape)} do not share a rank")
        name = lora_keys.file_names(ours, fmt, unet_names, text_count, theirs)
        named[name] = (down, up, float(alpha))
    for name, (down, up, alpha) in named.items():
        if fmt == "kohya":
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(alpha)})
        else:
            sd.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    seen = set()
    for key, t in sd.items():  # safetensors refuses tensors that share memory (one factor given for two layers)
        if t.data_ptr() in seen:
            sd[key] = t.clone()
        seen.add(t.data_ptr())
    header = {"format": "pt", "easel_family": family, **(metadata or {})}
    if fmt == "peft":
        header[PEFT_METADATA] = json.dumps(_peft_configs(named), sort_keys=True)
    write_safetensors(sd, path, header)
    return Path(path)


def _peft_configs(named: dict[str, tuple[Tensor, Tensor, float]]) -> dict:
    """diffusers' `lora_adapter_metadata`: one PEFT LoraConfig per component, `component.field` keys."""
    by_component = collections.defaultdict(dict)
    for name, (down, _, alpha) in named.items():
        component, _, module = name.partition(".")
        # transformers 5 drops `text_model.`: a suffix without it matches the module either way.
        by_component[component][module.removeprefix("text_model.")] = (down.shape[0], alpha)
    out = {}
    for component, modules in by_component.items():
        r = collections.Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
        a = collections.Counter(alpha for _, alpha in modules.values()).most_common(1)[0][0]
        fields = {"r": r, "lora_alpha": a, "target_modules": sorted(modules), "use_dora": False,
                  "lora_bias": False, "use_rslora": False,
                  "rank_pattern": {m: rank for m, (rank, _) in modules.items() if rank != r},
                  "alpha_pattern": {m: alpha for m, (_, alpha) in modules.items() if alpha != a}}
        out.update({f"{component}.{k}": v for k, v in fields.items()})
    return out
