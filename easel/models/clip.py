"""CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"), the part of CLIP that Stable Diffusion conditions on.

Module names equal the keys of HF transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` as saved
by transformers 4 (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ..., `text_projection.weight`),
which is the layout SD1 single-file checkpoints and diffusers folders use; OpenCLIP checkpoints (SD2,
SDXL) are mapped onto it by `easel.weights.keys_clip`. Loading is therefore `load_state_dict(strict=True)`.

The transformer is pre-LayerNorm with a causal mask: token t only sees tokens <= t, so everything after
the end-of-text token (padding) never changes the embedding of the prompt itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easel.models.configs import CLIPTextConfig


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def _exact_gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # erf form, as OpenCLIP's nn.GELU()


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": _exact_gelu}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown CLIP hidden_act {name!r}: supported are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (HF key names)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        self.num_heads = cfg.num_attention_heads
        width = cfg.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Causal attention over the sequence: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: fc1 -> activation -> fc2."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = _activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor, inputs_embeds: Tensor | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, C); `inputs_embeds` (B, T, C) replaces the token-embedding lookup."""
        T = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        # Slicing the table instead of keeping a `position_ids` buffer keeps the state dict free of it.
        return tokens + self.position_embedding.weight[:T]


class CLIPEncoder(nn.Module):
    """The stack of transformer blocks (a container, so that keys read `encoder.layers.N`)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm: the `text_model.` part of the keys."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `projection_dim > 0` it also has CLIP's `text_projection` (SDXL's pooled)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim > 0:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        else:
            self.text_projection = None

    def forward(self, input_ids: Tensor, clip_skip: int = 1, final_norm: bool = True,
                need_pooled: bool = False, inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, T) -> (hidden states (B, T, C) of layer `clip_skip` from the end, pooled (B, P) or None).

        clip_skip=1 is the last layer's output, 2 the penultimate (SD2, SDXL); `final_norm` applies the
        final LayerNorm to it. The pooled output is the final-normed last layer at the first
        end-of-text token, projected by `text_projection` when the model has one. `inputs_embeds`
        (B, T, C), when given, are the token embeddings to use instead of looking `input_ids` up (textual
        inversion puts learned vectors there); `input_ids` still locate the end-of-text token.
        """
        cfg = self.config
        self._check_inputs(input_ids, clip_skip, inputs_embeds)
        tm = self.text_model
        x = tm.embeddings(input_ids, inputs_embeds)  # (B, T, C)
        want = cfg.num_hidden_layers - clip_skip  # index of the layer whose output is returned
        # Layers after `want` only matter for the pooled output: skip them when it is not needed.
        last = cfg.num_hidden_layers if need_pooled else want + 1
        hidden = x
        for i, layer in enumerate(tm.encoder.layers[:last]):
            x = layer(x)
            if i == want:
                hidden = x
        if final_norm:
            hidden = tm.final_layer_norm(hidden)
        pooled = self._pool(tm.final_layer_norm(x), input_ids) if need_pooled else None
        return hidden, pooled

    def _pool(self, last: Tensor, input_ids: Tensor) -> Tensor:
        """Features at the first end-of-text token of each row: (B, T, C) -> (B, C) or (B, P)."""
        # argmax over a 0/1 mask returns the first True; the padding may repeat the EOS id.
        eos_pos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_pos]  # (B, C)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, P)
        return pooled

    def _check_inputs(self, input_ids: Tensor, clip_skip: int, inputs_embeds: Tensor | None = None) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        want = (*input_ids.shape, cfg.hidden_size)
        if inputs_embeds is not None and tuple(inputs_embeds.shape) != want:
            raise ValueError(f"inputs_embeds must be (batch, tokens, width) = {want} to match input_ids, "
                             f"got {tuple(inputs_embeds.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the encoder's {cfg.max_position_embeddings} "
                             "positions: truncate, or split the prompt into chunks (easel.text.prompt)")
        if not 1 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must be in 1..{cfg.num_hidden_layers} "
                             f"(1 = last layer), got {clip_skip}")
