"""The whole Stable Diffusion model: text encoder(s) -> UNet -> VAE, wired by a ModelConfig."""
from __future__ import annotations

import torch
from torch import nn

from easel.models.clip import CLIPTextModel
from easel.models.configs import ModelConfig
from easel.models.unet import UNetModel
from easel.models.vae import AutoencoderKL

COMPONENTS = ("unet", "vae", "text_encoders")


class StableDiffusion(nn.Module):
    """The three networks of one checkpoint; tokenizers live with the pipeline, not here."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.text_encoders = nn.ModuleList(CLIPTextModel(c) for c in config.text_encoders)

    @classmethod
    def empty(cls, config: ModelConfig) -> "StableDiffusion":
        """Build without allocating or initialising weights (for loading: saves seconds on big models)."""
        with torch.device("meta"):
            return cls(config)

    def component_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{'unet': ..., 'vae': ..., 'text_encoder.0': ...} in our (checkpoint-native) key layout."""
        out = {"unet": self.unet.state_dict(), "vae": self.vae.state_dict()}
        for i, enc in enumerate(self.text_encoders):
            out[f"text_encoder.{i}"] = enc.state_dict()
        return out

    def load_components(self, parts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None = None,
                        vae_dtype: torch.dtype | None = None) -> None:
        """Load every component strictly, casting floating weights to `dtype` (VAE to `vae_dtype`)."""
        for name, module in self.named_components():
            if name not in parts:
                raise KeyError(f"missing component {name}")
            want = vae_dtype if name == "vae" else dtype
            sd = {k: (v.to(want) if want is not None and v.is_floating_point() else v) for k, v in parts[name].items()}
            load_strict(module, sd, name)

    def named_components(self) -> list[tuple[str, nn.Module]]:
        """(name, module) for the UNet, the VAE and each text encoder."""
        out = [("unet", self.unet), ("vae", self.vae)]
        out += [(f"text_encoder.{i}", m) for i, m in enumerate(self.text_encoders)]
        return out

    @torch.no_grad()
    def encode_text(self, token_ids: list[torch.Tensor], clip_skip: int = 1,
                    inputs_embeds: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids per encoder (B, 77) -> context (B, 77, sum of widths) and pooled (B, D) or None.

        `clip_skip` is A1111's: 1 keeps the preset's layer, 2 goes one layer further back, ...
        `inputs_embeds`, per encoder (B, 77, width) or None, replace the token-embedding lookup (textual inversion).
        """
        cfg = self.config
        layer = cfg.clip_skip + max(clip_skip, 1) - 1
        embeds = inputs_embeds if inputs_embeds is not None else [None] * len(self.text_encoders)
        hidden, pooled = [], None
        for i, (enc, ids, emb) in enumerate(zip(self.text_encoders, token_ids, embeds)):
            last = i == len(self.text_encoders) - 1
            emb = None if emb is None else emb.to(self.device, next(enc.parameters()).dtype)
            h, p = enc(ids.to(self.device), clip_skip=layer, final_norm=cfg.text_final_norm,
                       need_pooled=cfg.pooled_text and last, inputs_embeds=emb)
            hidden.append(h)
            if p is not None:
                pooled = p
        return torch.cat(hidden, dim=-1), pooled

    @property
    def device(self) -> torch.device:
        """Device of the UNet's weights."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the UNet."""
        return next(self.unet.parameters()).dtype


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsMismatch(what, missing, unexpected, shapes)
    module.load_state_dict(sd, strict=True, assign=True)
    _materialise_buffers(module)


def _materialise_buffers(module: nn.Module) -> None:
    """Non-persistent buffers of a meta-built module are recomputed by the module's own `reset_buffers`."""
    for m in module.modules():
        if any(b.is_meta for b in m.buffers(recurse=False)) and hasattr(m, "reset_buffers"):
            m.reset_buffers()
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left uninitialised after loading: {left[:5]}")


class WeightsMismatch(ValueError):
    """The file's weights do not fit the architecture; lists what differs."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], shapes: list[str]):
        def show(title: str, items: list[str]) -> str:
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more if items else ""

        super().__init__(
            f"the {what} weights do not match its architecture:"
            + show("missing", missing) + show("unexpected", unexpected) + show("wrong shape", shapes)
            + "\n  The file may be damaged, or of a model family easel does not detect; "
              "pass --config/--prediction if the detection was wrong.")
