"""Token grounding while the UNet trains (TokenCompose, Wang et al. 2024): ShapeWorld knows where every object is.

Each colour or shape word of a training caption names objects of the scene ("red" every red object, "stars" every
star). While the UNet denoises, the cross-attention each such token gets at the 16x16 and 8x8 query levels is
pulled onto those objects' masks and made to cover them: per grounded token and layer, (1 - mass on its objects /
its total mass)^2 (TokenCompose's token loss) + (1 - soft Dice of the map, scaled to its peak, with the objects'
coverage) (in place of TokenCompose's pixel loss: without it the maps shrink to the objects' cores), added to the
denoising loss with a small weight. Why: learnt from the denoising loss alone, the
16x16 cross-attention stayed spread over every token (the 8x8 level already carries the words), so its per-word
maps said nothing; and a word that attends to its own object is what binding a colour to a shape needs.

The caches (`grounding.pt` beside the latent cache): per scene the objects' coverage on a 16x16 grid, and per
caption token a bitmask of the objects it names (0: none, e.g. "a", "left", padding).
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from easel.models.layers import BasicTransformerBlock, attention_probs
from easel.text.tokenizer import CLIPTokenizer

GRID = 16  # the masks' grid: the ShapeWorld latent's side
LEVELS = (16, 8)  # query grids whose cross-attention is grounded (the 4x4 middle block is too coarse to say)
MAX_OBJECTS = 8


def word_objects(words: list[str], objects, lang: str) -> list[int]:
    """Per word, the bitmask of the scene's objects it names (colour or shape words; 0 otherwise)."""
    from easel.world.captions import _WORD_TO_SHAPE, _ZH_COLOUR, _ZH_SHAPE
    from easel.world.scenes import COLOURS
    colour_of = _ZH_COLOUR if lang == "zh" else {c: c for c in COLOURS}
    shape_of = _ZH_SHAPE if lang == "zh" else _WORD_TO_SHAPE
    out = []
    for w in words:
        key = w.strip(",.;").lower()
        if key in colour_of:
            hit = [o.colour == colour_of[key] for o in objects]
        elif key in shape_of:
            hit = [o.shape == shape_of[key] for o in objects]
        else:
            hit = []
        out.append(sum(1 << i for i, h in enumerate(hit) if h))
    return out


def caption_words(text: str, lang: str) -> list[str]:
    """The caption cut into the pieces the tokenizer encodes one after another (words; Chinese by the lexicon)."""
    if lang != "zh":
        return text.split()
    from easel.world.captions import segment_zh
    return [w for w, _ in segment_zh(text)]


def token_objects(tok: CLIPTokenizer, text: str, lang: str, objects, length: int = 77) -> Tensor:
    """(length,) int16: for each token position of `tok([text])`, the bitmask of the objects its word names; all 0
    when the words do not tokenize to the caption's tokens one after another (nothing is grounded then)."""
    words = caption_words(text, lang)
    bits, pieces = word_objects(words, objects, lang), [tok.encode(w) for w in words]
    out = torch.zeros(length, dtype=torch.int16)
    if [i for p in pieces for i in p] != tok.encode(text):
        return out
    pos = 1  # after BOS
    for b, p in zip(bits, pieces):
        end = min(pos + len(p), length - 1)
        out[pos:end] = b
        pos = end
    return out


def build_grounding(seeds: list[int], captions: list[list[str]], langs: tuple[str, ...], relation_share: float,
                    tok: CLIPTokenizer, progress: bool = True) -> dict:
    """{"masks": (N, MAX_OBJECTS, GRID, GRID) uint8 coverage x255, "tokens": (N, R, 77) int16} for the scenes
    of `seeds` (drawn as the latent cache drew them) and their cached captions (paraphrase r in langs[r % len])."""
    from tqdm import tqdm

    from easel.world.dataset import mixed_scene
    from easel.world.render import object_coverage
    n, r = len(seeds), len(captions[0])
    masks = np.zeros((n, MAX_OBJECTS, GRID, GRID), dtype=np.uint8)
    tokens = torch.zeros(n, r, 77, dtype=torch.int16)
    for i in tqdm(range(n), desc="ground words", disable=not progress, file=sys.stderr, mininterval=5):
        scene = mixed_scene(seeds[i], relation_share)
        objects = scene.objects[:MAX_OBJECTS]
        masks[i, :len(objects)] = np.rint(object_coverage(scene, GRID)[:MAX_OBJECTS] * 255)
        for k in range(r):
            tokens[i, k] = token_objects(tok, captions[i][k], langs[k % len(langs)], objects)
    return {"masks": torch.from_numpy(masks), "tokens": tokens}


class AttentionTap(contextlib.AbstractContextManager):
    """Keeps each cross-attention layer's probabilities (B, T, S), with their gradients, for one forward pass at
    the grounded query levels."""

    def __init__(self, unet: torch.nn.Module, levels: tuple[int, ...] = LEVELS):
        self.levels, self.maps = {s * s: s for s in levels}, []
        self._handles = [m.attn2.register_forward_hook(self._hook) for m in unet.modules()
                         if isinstance(m, BasicTransformerBlock)]

    def _hook(self, module, args, out) -> None:
        x, context = args[0], args[1]
        if x.shape[1] in self.levels:
            self.maps.append((self.levels[x.shape[1]], attention_probs(module, x, context)))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def token_masks(bits: Tensor, masks: Tensor) -> Tensor:
    """(B, S, GRID, GRID) float: each token's objects' union coverage, from bitmasks (B, S) and masks (B, O, G, G)."""
    o = torch.arange(masks.shape[1], device=bits.device)
    sel = ((bits.long().unsqueeze(-1) >> o) & 1).float()  # (B, S, O)
    return torch.einsum("bso,bohw->bshw", sel, masks.float() / 255).clamp(max=1.0)


def grounding_loss(maps: list[tuple[int, Tensor]], bits: Tensor, masks: Tensor) -> Tensor:
    """Mean over grounded tokens and layers of (1 - own mass / total mass)^2 (TokenCompose's token loss: the mass
    on its objects) + (1 - soft Dice of the map scaled to its peak with the objects' coverage) (the map covers
    them, as TokenCompose's pixel loss asks); 0 when nothing is grounded."""
    grounded = bits != 0  # (B, S)
    if not maps or not bool(grounded.any()):
        return masks.new_zeros((), dtype=torch.float32)
    full = token_masks(bits, masks)  # (B, S, G, G)
    losses = []
    for side, probs in maps:  # probs (B, side*side, S)
        m = F.adaptive_avg_pool2d(full, side).flatten(2)  # (B, S, side*side)
        a = probs.transpose(1, 2)  # (B, S, side*side)
        own = (a * m).sum(-1) / a.sum(-1).clamp(min=1e-8)  # (B, S)
        peak = a / a.amax(-1, keepdim=True).clamp(min=1e-8)  # (B, S, side*side) in [0, 1]
        dice = 2 * (peak * m).sum(-1) / (peak.sum(-1) + m.sum(-1)).clamp(min=1e-8)
        losses.append(((1 - own) ** 2 + (1 - dice))[grounded])
    return torch.cat(losses).mean()



def load_or_build_grounding(path, data: dict, tok: CLIPTokenizer, progress: bool = True) -> dict:
    """The grounding cache of a latent cache's training scenes (drawn with the languages and relation share its key
    records), rebuilt when the latent cache changed."""
    from easel.training.common import load_checkpoint, save_atomic
    key = data["key"]
    if path.exists():
        cache = load_checkpoint(path)
        if cache.get("key") == key:
            return cache
    n = len(data["train"]["latents"])
    cache = {"key": key, **build_grounding(list(range(n)), data["train"]["captions"], tuple(key["langs"]),
                                           key["relation_share"], tok, progress)}
    save_atomic(cache, path)
    return cache
