"""Layer names in LoRA files <-> module paths in easel's `StableDiffusion`.

One layer of the model goes by many names in the LoRA files people have:

- kohya / A1111: `lora_unet_` + the diffusers module name with `_` for `.` (SD1/SD2:
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), or + the CompVis name (kohya's
  SDXL trainer: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); text encoders `lora_te_`
  (SD1/SD2) or `lora_te1_` / `lora_te2_` (SDXL) + the HF module name.
- diffusers / PEFT: `unet.` + the diffusers module name, `text_encoder.` / `text_encoder_2.` + the HF name
  (with or without `text_model.`, which transformers 5 drops); older diffusers files spell attention layers
  `...attn1.processor.to_q` / `to_out` and may leave out `unet.`.

Rather than parsing names (underscores are ambiguous), `target_names` lists every alias of every layer the
model has, so a lookup either hits exactly one layer or misses. The diffusers <-> CompVis UNet names come from
`keys_unet.diffusers_map`, the text-encoder layout from `keys_clip`.
"""
from __future__ import annotations

import collections

from torch import nn

from easel.models.configs import UNetConfig
from easel.weights import keys_clip, keys_unet

UNET, TEXT = "unet.", "text_encoders."  # module path prefixes inside StableDiffusion
# File key suffix -> role, longest first where one suffix ends another.
SUFFIXES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),  # kohya / A1111
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT (diffusers >= 0.24)
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # old diffusers text
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # old diffusers LoRACompatibleLinear
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # old diffusers attention processors
    (".alpha", "alpha"),
]
# Text-encoder attention names in old diffusers files (`self_attn.to_q_lora`) -> HF module names.
_OLD_TEXT_ATTN = {".self_attn.to_q": ".self_attn.q_proj", ".self_attn.to_k": ".self_attn.k_proj",
                  ".self_attn.to_v": ".self_attn.v_proj", ".self_attn.to_out": ".self_attn.out_proj"}


def split_key(key: str) -> tuple[str, str]:
    """A file key -> (layer name, role in down/up/alpha), or (key, '') when it is no LoRA tensor we know."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, ""


def normalize(name: str) -> str:
    """Undo the spelling variants of old diffusers / raw PEFT files, so the alias table needs one form."""
    name = name.removeprefix("base_model.model.")
    if ".processor." in name:  # `attn1.processor.to_q` -> `attn1.to_q`, `processor.to_out` -> `to_out.0`
        name = name.replace(".processor.", ".")
        if name.endswith(".to_out"):
            name += ".0"
    if name.startswith("text_encoder"):
        for old, new in _OLD_TEXT_ATTN.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
    return name


def kohya_text_prefix(index: int, count: int) -> str:
    """`lora_te_` for a single text encoder (SD1/SD2); `lora_te1_`, `lora_te2_` for SDXL's two."""
    return "lora_te_" if count == 1 else f"lora_te{index + 1}_"


def peft_text_prefix(index: int) -> str:
    """diffusers' component name of text encoder `index`: `text_encoder`, `text_encoder_2`."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


def unet_module_names(cfg: UNetConfig) -> dict[str, str]:
    """Our (CompVis) UNet module name -> diffusers module name, for every module with a weight."""
    return {ours[: -len(".weight")]: theirs[: -len(".weight")]
            for ours, theirs in keys_unet.diffusers_map(cfg).items() if ours.endswith(".weight")}


def unet_aliases(ours: str, theirs: str | None) -> list[str]:
    """Names a LoRA file may give to UNet module `ours` (diffusers name `theirs`)."""
    names = ["lora_unet_" + ours.replace(".", "_")]
    if theirs:
        names += ["lora_unet_" + theirs.replace(".", "_"), "unet." + theirs, theirs]
    return names


def text_aliases(name: str, index: int, count: int) -> list[str]:
    """Names a LoRA file may give to module `name` (HF layout) of text encoder `index` of `count`."""
    peft = peft_text_prefix(index)
    names = [kohya_text_prefix(index, count) + name.replace(".", "_"), f"{peft}.{name}"]
    if name.startswith(keys_clip.PREFIX):  # transformers 5 saves CLIPTextModel without `text_model.`
        names.append(f"{peft}.{name.removeprefix(keys_clip.PREFIX)}")
    return names


def _lora_modules(module: nn.Module) -> list[str]:
    """Names of the layers a LoRA can patch (those with a weight matrix or conv kernel)."""
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def target_names(model: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for a layer of `model` (a StableDiffusion) -> the layer's module path."""
    pairs = []
    theirs = unet_module_names(model.unet.cfg)
    for name in _lora_modules(model.unet):
        pairs += [(alias, UNET + name) for alias in unet_aliases(name, theirs.get(name))]
    count = len(model.text_encoders)
    for i, enc in enumerate(model.text_encoders):
        for name in _lora_modules(enc):
            pairs += [(alias, f"{TEXT}{i}.{name}") for alias in text_aliases(name, i, count)]
    table = dict(pairs)
    if len(table) != len(set(pairs)):  # one name for two layers would apply a LoRA to the wrong one
        clash = collections.Counter(a for a, _ in set(pairs)).most_common(1)[0][0]
        raise RuntimeError(f"LoRA layer name {clash!r} fits two layers of this model")
    return table


def file_names(path: str, fmt: str, unet_names: str, text_count: int, theirs: dict[str, str]) -> str:
    """Our module path (`input_blocks.1.1...`, `unet.…` or `text_encoders.N.…`) -> its layer name in a file.

    `fmt` is "kohya" or "peft"; `unet_names` ("diffusers" or "compvis") picks the kohya UNet spelling;
    `theirs` is `unet_module_names(cfg)`.
    """
    if path.startswith(TEXT):
        index, _, name = path.removeprefix(TEXT).partition(".")
        if not index.isdigit() or int(index) >= text_count:
            raise KeyError(f"{path!r}: this family has {text_count} text encoder(s) (text_encoders.0"
                           f"{'' if text_count == 1 else ' and text_encoders.1'})")
        if fmt == "kohya":
            return kohya_text_prefix(int(index), text_count) + name.replace(".", "_")
        return f"{peft_text_prefix(int(index))}.{name}"
    name = path.removeprefix(UNET)
    if name not in theirs:
        raise KeyError(f"{path!r} is not a UNet layer of this config (expected names such as "
                       f"'input_blocks.1.1.transformer_blocks.0.attn1.to_q' or 'text_encoders.0.text_model.…')")
    if fmt == "kohya":
        return "lora_unet_" + (theirs[name] if unet_names == "diffusers" else name).replace(".", "_")
    return "unet." + theirs[name]
