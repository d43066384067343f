"""Key maps between our CLIP text encoder and the layouts checkpoints use.

Our keys are HF transformers 4's (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...,
`text_projection.weight`), see `easel.models.clip`. The other layouts:

- HF transformers 5 saves a `CLIPTextModel` without the `text_model.` prefix; `from_hf` accepts both,
  `to_hf` writes the transformers-4 form that diffusers folders on the hub contain (transformers 5 reads it).
- OpenCLIP (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`, prefix stripped by the
  caller): q/k/v fused in `in_proj_weight`, `positional_embedding` a bare parameter, `text_projection`
  a (width, proj) matrix applied as `x @ P` (the transpose of a Linear weight), plus `logit_scale`,
  which only CLIP's contrastive loss uses.

`from_openclip` returns `(state_dict, dropped)` where `dropped` maps each key it did not use (e.g.
`logit_scale`) to its tensor: log its keys, or hand it back to `to_openclip(..., extra=dropped)` for an
exact round trip. `to_openclip` writes no `logit_scale` of its own: SD loaders do not read it, and an
invented value would pretend to be a trained one.

Special token ids: legacy text-encoder configs (nearly every SD folder on the hub) say bos 0 / eos 2 /
pad 1, which transformers itself ignores (it pools at the largest id), so `config_from_diffusers` then
uses CLIP's ids (the last two of the vocabulary: 49406 / 49407, `CLIPTextConfig`'s defaults). Configs
written by `diffusers_config` carry the real ids. The pad id is the tokenizer's business: the caller
passes the one its tokenizer folder names (`easel.text.tokenizer`); without it the file's (non-legacy)
value is used, else 0 for OpenCLIP-style (gelu) encoders and <|endoftext|> for OpenAI's.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from easel.models.configs import CLIPTextConfig

PREFIX = "text_model."
_HF_TOP = ("embeddings.", "encoder.", "final_layer_norm.")  # transformers-5 CLIPTextModel roots
_HF_DROP = ("text_model.embeddings.position_ids", "embeddings.position_ids")  # old non-persistent buffer

# (ours, OpenCLIP) for whole tensors outside the blocks.
OPENCLIP_TOP = [
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
]
# (ours, OpenCLIP) module names inside block N; each has `.weight` and `.bias`.
OPENCLIP_BLOCK = [
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]
OURS_BLOCK = "text_model.encoder.layers.{}."
OPENCLIP_BLOCK_PREFIX = "transformer.resblocks.{}."
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # contrastive temperature; causal mask buffer
OPENCLIP_UNUSED_PREFIXES = ("visual.",)  # a whole CLIP model's image tower


def from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel(WithProjection) state dict, transformers 4 or 5 keys -> our keys."""
    out = {}
    for key, value in sd.items():
        if key in _HF_DROP:
            continue
        if key.startswith(PREFIX) or key == "text_projection.weight":
            out[key] = value
        elif key.startswith(_HF_TOP):
            out[PREFIX + key] = value
        else:
            raise ValueError(f"unexpected key {key!r} in a CLIP text encoder state dict: is this the "
                             "text_encoder of a diffusers folder? (expected text_model.*, embeddings.*, "
                             "encoder.*, final_layer_norm.*, text_projection.weight)")
    return out


def to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> HF transformers-4 keys (identical names: a checked copy)."""
    bad = [k for k in sd if not (k.startswith(PREFIX) or k == "text_projection.weight")]
    if bad:
        raise ValueError(f"not keys of easel's CLIPTextModel: {bad[:5]}")
    return dict(sd)


def _block_pairs(i: int) -> list[tuple[str, str]]:
    """(ours, OpenCLIP) full keys of the unfused tensors in block i."""
    ours, theirs = OURS_BLOCK.format(i), OPENCLIP_BLOCK_PREFIX.format(i)
    return [(ours + o + s, theirs + t + s) for o, t in OPENCLIP_BLOCK for s in (".weight", ".bias")]


def _is_unused_openclip(key: str) -> bool:
    return key in OPENCLIP_UNUSED or key.startswith(OPENCLIP_UNUSED_PREFIXES)


def from_openclip(sd: dict[str, Tensor], cfg: CLIPTextConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """OpenCLIP text tower (prefix stripped) -> (our state dict, {dropped key: tensor})."""
    _check_openclip_keys(sd, cfg)
    out = {ours: sd[theirs] for ours, theirs in OPENCLIP_TOP}
    for i in range(cfg.num_hidden_layers):
        out.update({ours: sd[theirs] for ours, theirs in _block_pairs(i)})
        ours, theirs = OURS_BLOCK.format(i) + "self_attn.", OPENCLIP_BLOCK_PREFIX.format(i) + "attn."
        for kind in ("weight", "bias"):
            # in_proj stacks q, k, v along dim 0: (3C, C) / (3C,). Clone so the three do not share
            # storage with the fused tensor (safetensors refuses to save shared tensors).
            q, k, v = (t.clone() for t in sd[theirs + f"in_proj_{kind}"].chunk(3, dim=0))
            out.update({ours + f"q_proj.{kind}": q, ours + f"k_proj.{kind}": k, ours + f"v_proj.{kind}": v})
    dropped = {k: v for k, v in sd.items() if _is_unused_openclip(k)}
    if "text_projection" in sd:
        if cfg.projection_dim > 0:
            out["text_projection.weight"] = sd["text_projection"].t().contiguous()  # (P, C) Linear weight
        else:
            dropped["text_projection"] = sd["text_projection"]  # e.g. SD2 -> diffusers' projection-free encoder
    return out, dropped


def _expected_openclip_keys(cfg: CLIPTextConfig) -> set[str]:
    keys = {theirs for _, theirs in OPENCLIP_TOP}
    for i in range(cfg.num_hidden_layers):
        keys.update(theirs for _, theirs in _block_pairs(i))
        keys.update(OPENCLIP_BLOCK_PREFIX.format(i) + f"attn.in_proj_{s}" for s in ("weight", "bias"))
    if cfg.projection_dim > 0:
        keys.add("text_projection")
    return keys


def _check_openclip_keys(sd: dict[str, Tensor], cfg: CLIPTextConfig) -> None:
    """Raise a readable error when the OpenCLIP state dict does not fit `cfg`."""
    expected = _expected_openclip_keys(cfg)
    missing = sorted(expected - sd.keys())
    extra = sorted(k for k in sd.keys() - expected if not _is_unused_openclip(k) and k != "text_projection")
    if missing or extra:
        raise ValueError(
            f"OpenCLIP text encoder does not match config ({cfg.num_hidden_layers} layers, "
            f"projection_dim={cfg.projection_dim}): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}. Strip the checkpoint prefix "
            "(cond_stage_model.model. / conditioner.embedders.1.model.) and pick the matching preset.")


def to_openclip(sd: dict[str, Tensor], cfg: CLIPTextConfig,
                extra: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Our state dict -> OpenCLIP text tower keys; `extra` (e.g. `dropped` from from_openclip) is copied in."""
    out = {theirs: sd[ours] for ours, theirs in OPENCLIP_TOP}
    for i in range(cfg.num_hidden_layers):
        out.update({theirs: sd[ours] for ours, theirs in _block_pairs(i)})
        ours, theirs = OURS_BLOCK.format(i) + "self_attn.", OPENCLIP_BLOCK_PREFIX.format(i) + "attn."
        for kind in ("weight", "bias"):
            qkv = [sd[ours + f"{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[theirs + f"in_proj_{kind}"] = torch.cat(qkv, dim=0)  # (3C, C) / (3C,)
    if cfg.projection_dim > 0:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()  # (C, P), used as x @ P
    for key, value in (extra or {}).items():
        out.setdefault(key, value)
    return out


def drop_last_layers(sd: dict[str, Tensor], cfg: CLIPTextConfig, n: int) -> tuple[dict[str, Tensor], CLIPTextConfig]:
    """Remove the last `n` blocks (and the projection): SD2's 24-layer encoder at clip_skip=2 -> diffusers' 23."""
    if not 0 <= n < cfg.num_hidden_layers:
        raise ValueError(f"can drop 0..{cfg.num_hidden_layers - 1} of {cfg.num_hidden_layers} layers, not {n}")
    keep = cfg.num_hidden_layers - n
    gone = tuple(OURS_BLOCK.format(i) for i in range(keep, cfg.num_hidden_layers))
    # The pooled output of a truncated encoder is not CLIP's any more, so its projection goes too.
    out = {k: v for k, v in sd.items() if not k.startswith(gone) and k != "text_projection.weight"}
    return out, dataclasses.replace(cfg, num_hidden_layers=keep, projection_dim=0)


def diffusers_config(cfg: CLIPTextConfig, torch_dtype: str = "float32") -> dict:
    """The `text_encoder/config.json` of a diffusers folder for this encoder (transformers CLIPTextConfig)."""
    arch = "CLIPTextModelWithProjection" if cfg.projection_dim > 0 else "CLIPTextModel"
    return {
        "architectures": [arch],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        # A projection-free CLIPTextModel ignores projection_dim; transformers still wants a positive one.
        "projection_dim": cfg.projection_dim or cfg.hidden_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": torch_dtype,
    }


def config_from_diffusers(d: dict, pad_token_id: int | None = None) -> CLIPTextConfig:
    """CLIPTextConfig from a diffusers `text_encoder/config.json`; pass the tokenizer's pad id when known."""
    default = CLIPTextConfig()
    vocab_size = d.get("vocab_size", default.vocab_size)
    act = d.get("hidden_act", default.hidden_act)
    if d.get("eos_token_id", default.eos_token_id) == 2:
        # Legacy transformers configs (nearly all hub SD folders) say bos 0 / eos 2 / pad 1, and
        # transformers then pools at the largest id: CLIP's <|endoftext|>, the last of the vocabulary.
        bos, eos, file_pad = vocab_size - 2, vocab_size - 1, None
    else:
        bos = d.get("bos_token_id", default.bos_token_id)
        eos = d.get("eos_token_id", default.eos_token_id)
        file_pad = d.get("pad_token_id")
    if pad_token_id is None:
        # OpenCLIP-trained encoders (gelu) pad with "!" (id 0), OpenAI's CLIP-L with <|endoftext|>.
        pad_token_id = file_pad if file_pad is not None else (0 if act == "gelu" else eos)
    with_projection = "CLIPTextModelWithProjection" in d.get("architectures", [])
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=d.get("hidden_size", default.hidden_size),
        intermediate_size=d.get("intermediate_size", default.intermediate_size),
        num_hidden_layers=d.get("num_hidden_layers", default.num_hidden_layers),
        num_attention_heads=d.get("num_attention_heads", default.num_attention_heads),
        max_position_embeddings=d.get("max_position_embeddings", default.max_position_embeddings),
        hidden_act=act,
        layer_norm_eps=d.get("layer_norm_eps", default.layer_norm_eps),
        projection_dim=d.get("projection_dim", 0) if with_projection else 0,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_token_id,
    )
