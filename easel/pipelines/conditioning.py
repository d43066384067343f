"""Prompt conditioning as A1111 users expect it: weights, BREAK, long prompts, editing, AND, embeddings.

1. Encoding (A1111's `sd_hijack_clip`): the prompt is parsed into (text, weight) pieces, tokenized, and cut
   into chunks of 75 tokens (a chunk is closed early at BREAK, and at a comma among its last 20 tokens so
   that a phrase is not torn apart). Each chunk becomes BOS + 75 tokens + EOS, padded with the encoder's pad
   id, and goes through the text encoder on its own; the chunks' hidden states are concatenated along the
   sequence: context (1, 77 * chunks, D). A word equal to a textual-inversion embedding's name takes n token
   slots, whose token embeddings are replaced by the learned vectors before the encoder.
2. Emphasis (A1111's "Original"): the hidden states of each token are multiplied by its weight, then the
   whole chunk is rescaled so that its mean is what it was before weighting.
3. Steps and composition: `[from:to:when]` and `[a|b]` make the text depend on the step (prompt_schedule),
   `a :1.2 AND b :0.8` makes several texts whose guidance directions add up (Liu et al. 2022, "Compositional
   Visual Generation with Composable Diffusion Models"): x0 = u + scale * sum_i w_i (c_i - u).

A prompt without any syntax and of at most 75 tokens encodes exactly as `common.encode_prompts`.
The request-level denoiser stack that uses these is built in `easel.pipelines.plan`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import regex
import torch
from torch import Tensor, nn

from easel.models.layers import timestep_embedding
from easel.models.sd import StableDiffusion
from easel.samplers.denoisers import _batch_sigma
from easel.text.prompt import extract_extra_networks, parse_attention, prompt_schedule, split_and
from easel.text.tokenizer import CLIPTokenizer
from easel.weights.detect import SDXL_EMBED_DIM, is_refiner
from easel.weights.embeddings import Embedding, EmbeddingError

# diffusers' `aesthetic_score` / `negative_aesthetic_score` defaults, A1111's sdxl_refiner_high/low_aesthetic_score.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
SIGMA_RTOL = 1e-4  # samplers that go sigma -> t -> sigma come back an ulp or two off the schedule's value


# --- tokens -> chunks -------------------------------------------------------------------------------
@dataclass
class Chunk:
    """Up to 75 content tokens of one chunk, their weights, and where embeddings' vectors go."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (offset in ids, embedding)


class EmbeddingMatcher:
    """Finds embedding names in token streams, as A1111: by token ids, the longest name first."""

    def __init__(self, tokenizer: CLIPTokenizer, library):
        self.tokenizer, self.library = tokenizer, library
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in library.names() if library is not None else []:
            ids = tuple(tokenizer.encode(name))
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for entries in self._by_first.values():
            entries.sort(key=lambda e: -len(e[0]))

    def match(self, ids: list[int], pos: int) -> tuple[Embedding | None, int]:
        """(embedding, number of prompt tokens its name spans) at `pos`, or (None, 0)."""
        for name_ids, name in self._by_first.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(name_ids)]) == name_ids and self._word_start(ids, pos):
                return self.library.get(name), len(name_ids)
        return None, 0

    def _word_start(self, ids: list[int], pos: int) -> bool:
        # Every CLIP word ends in a "</w>" token: a name must not match the tail of a longer word.
        return pos == 0 or self.tokenizer.tokens([ids[pos - 1]])[0].endswith("</w>")


class _Chunker:
    """A1111's `tokenize_line` loop: fills chunks of `size` tokens, with BREAK and comma backtracking."""

    def __init__(self, size: int, comma_id: int | None):
        self.size, self.comma_id = size, comma_id
        self.chunks: list[Chunk] = []
        self.cur = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        """End the current chunk and start an empty one."""
        self.chunks.append(self.cur)
        self.cur, self.last_comma = Chunk(), -1

    def before_token(self, token: int) -> None:
        """Make room for the next token: track commas, move the words after a late comma on, close a full chunk."""
        cur = self.cur
        if token == self.comma_id:
            self.last_comma = len(cur.ids)
        elif len(cur.ids) == self.size and self.last_comma != -1 and self.size - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            moved = Chunk(cur.ids[cut:], cur.weights[cut:], [(o - cut, e) for o, e in cur.fixes if o >= cut])
            cur.ids, cur.weights = cur.ids[:cut], cur.weights[:cut]
            cur.fixes = [(o, e) for o, e in cur.fixes if o < cut]
            self.close()
            self.cur = moved
        if len(self.cur.ids) == self.size:
            self.close()

    def add_token(self, token: int, weight: float) -> None:
        """Append one prompt token."""
        self.cur.ids.append(token)
        self.cur.weights.append(weight)

    def add_embedding(self, emb: Embedding, weight: float) -> None:
        """Append an embedding's n vector slots, all in one chunk (placeholder id 0, replaced later)."""
        n = emb.num_vectors
        if n > self.size:
            raise EmbeddingError(f"embedding {emb.name!r} has {n} vectors, more than the {self.size} tokens of a chunk")
        if len(self.cur.ids) + n > self.size:
            self.close()
        self.cur.fixes.append((len(self.cur.ids), emb))
        self.cur.ids += [0] * n
        self.cur.weights += [weight] * n

    def finish(self) -> list[Chunk]:
        """All chunks; an empty prompt still has one."""
        if self.cur.ids or not self.chunks:
            self.close()
        return self.chunks


def tokenize_chunks(pieces: list[tuple[str, float]], tokenizer: CLIPTokenizer, size: int = 75,
                    matcher: EmbeddingMatcher | None = None) -> list[Chunk]:
    """Weighted prompt pieces (from parse_attention) -> chunks of at most `size` weighted tokens."""
    chunker = _Chunker(size, tokenizer.vocab.get(",</w>"))
    for text, weight in pieces:
        if text == "BREAK" and weight == -1:
            chunker.close()
            continue
        ids = tokenizer.encode(text)
        pos = 0
        while pos < len(ids):
            chunker.before_token(ids[pos])
            emb, span = matcher.match(ids, pos) if matcher is not None else (None, 0)
            if emb is None:
                chunker.add_token(ids[pos], weight)
                pos += 1
            else:
                chunker.add_embedding(emb, weight)
                pos += span
    return chunker.finish()


# --- chunks -> hidden states ------------------------------------------------------------------------
def apply_emphasis(z: Tensor, weights: Tensor) -> Tensor:
    """A1111 "Original" emphasis: scale each token's hidden state by its weight, then restore each row's mean.

    z (N, T, D), weights (N, T). The mean is taken over each chunk row (A1111 takes it over the batch of
    texts encoded together, which for one text is the same).
    """
    zf = z.float()
    before = zf.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    weighted = zf * weights.to(zf)[..., None]  # (N, T, D)
    return (weighted * (before / weighted.mean(dim=(1, 2), keepdim=True))).to(z.dtype)


def _frame(chunk: Chunk, tok: CLIPTokenizer, pad_id: int, size: int) -> tuple[list[int], list[float]]:
    """BOS + content + EOS + padding, and weights 1 on everything that is not content."""
    ids = [tok.bos_id, *chunk.ids, tok.eos_id] + [pad_id] * (size - len(chunk.ids))
    return ids, [1.0, *chunk.weights] + [1.0] * (size + 1 - len(chunk.weights))


def _inputs_embeds(enc: nn.Module, ids: Tensor, chunks: list[Chunk], index: int, count: int) -> Tensor | None:
    """Token embeddings (N, T, D) with the embeddings' vectors in place, or None when no chunk has any."""
    if not any(c.fixes for c in chunks):
        return None
    table = enc.text_model.embeddings.token_embedding
    embeds = table(ids.to(table.weight.device)).clone()  # (N, T, D)
    for row, chunk in enumerate(chunks):
        for offset, emb in chunk.fixes:
            vec = emb.for_encoder(index, count, table.weight.shape[1])  # (n, D)
            start = 1 + offset  # after BOS
            embeds[row, start:start + vec.shape[0]] = vec.to(embeds)
    return embeds


def encode_weighted(model: StableDiffusion, tokenizers: list[CLIPTokenizer], text: str, clip_skip: int = 1,
                    library=None) -> dict[str, Tensor | None]:
    """One prompt text -> {'context': (1, 77 * chunks, D), 'pooled': (1, P) or None}, A1111 style.

    `library` (an EmbeddingLibrary or a {name: Embedding} dict) supplies textual-inversion embeddings.
    """
    return _encode(model, tokenizers, text, clip_skip, _matchers(tokenizers, _as_library(library)))


def _matchers(tokenizers: list[CLIPTokenizer], library) -> list[EmbeddingMatcher | None]:
    return [EmbeddingMatcher(tok, library) if library is not None else None for tok in tokenizers]


@torch.no_grad()
def _encode(model: StableDiffusion, tokenizers: list[CLIPTokenizer], text: str, clip_skip: int,
            matchers: list[EmbeddingMatcher | None]) -> dict[str, Tensor | None]:
    pieces = parse_attention(text)
    encoders = model.config.text_encoders
    size = min(e.max_position_embeddings for e in encoders) - 2
    per_encoder = [tokenize_chunks(pieces, tok, size, m) for tok, m in zip(tokenizers, matchers)]
    n = max(len(c) for c in per_encoder)
    ids, weights, embeds = [], [], []
    for i, (chunks, tok, cfg) in enumerate(zip(per_encoder, tokenizers, encoders)):
        chunks = chunks + [Chunk() for _ in range(n - len(chunks))]  # only if vocabularies differ
        rows = [_frame(c, tok, cfg.pad_token_id, size) for c in chunks]
        ids.append(torch.tensor([r[0] for r in rows], dtype=torch.long))  # (N, 77)
        weights.append(torch.tensor([r[1] for r in rows]))  # (N, 77)
        embeds.append(_inputs_embeds(model.text_encoders[i], ids[-1], chunks, i, len(encoders)))
    hidden, pooled = model.encode_text(ids, clip_skip=clip_skip, inputs_embeds=embeds)  # (N, 77, D), (N, P)
    parts = hidden.split([e.hidden_size for e in encoders], dim=-1)
    # Each encoder's own hidden states are renormalised, as A1111 wraps each encoder separately.
    parts = [apply_emphasis(h, w.to(h.device)) if bool((w != 1).any()) else h for h, w in zip(parts, weights)]
    hidden = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    context = hidden.reshape(1, -1, hidden.shape[-1])  # (1, N * 77, D)
    return {"context": context.to(model.dtype), "pooled": None if pooled is None else pooled[:1]}


# --- what a prompt names: embeddings, and words a closed-vocabulary model never saw ------------------
# A tokenizer this small was trained on a closed caption set (the built-in ShapeWorld model's has ~600
# tokens; CLIP's has 49,408): a word it cannot spell as one whole-word token never occurred in training.
CLOSED_VOCABULARY = 5000
_WORD = regex.compile(r"[\p{L}\p{N}']+")


def prompt_texts(prompt: str, steps: int) -> list[str]:
    """Every plain text a prompt gives the encoder at some step (LoRA tags, emphasis and schedules resolved)."""
    texts = []
    for part, _ in split_and(extract_extra_networks(prompt)[0]):
        for _, text in prompt_schedule(part, steps):
            texts.append(" ".join(piece for piece, w in parse_attention(text) if not (piece == "BREAK" and w == -1)))
    return texts


def embeddings_used(tokenizer: CLIPTokenizer, library, texts: list[str]) -> list[str]:
    """Names of the textual-inversion embeddings that the texts use, as the encoder will match them."""
    if library is None:
        return []
    matcher, found = EmbeddingMatcher(tokenizer, _as_library(library)), set()
    for text in texts:
        ids = tokenizer.encode(text)
        for pos in range(len(ids)):
            emb, _ = matcher.match(ids, pos)
            if emb is not None:
                found.add(emb.name)
    return sorted(found)


def unknown_words(tokenizer: CLIPTokenizer, texts: list[str], known: set[str] = frozenset(),
                  vocabulary: dict[str, list[str]] | None = None) -> list[str]:
    """Words of the texts that a model never saw in training. With the model's `vocabulary` (its metadata's
    {"en": words, "zh": words}): every word outside it, Chinese cut into words by longest match over the Chinese
    list ("一只猫" -> 一 known, 只猫 unknown). Without one, a closed-vocabulary tokenizer's guess: words it cannot
    spell as one token (none for open vocabularies such as CLIP's)."""
    if vocabulary is not None:
        return _outside_vocabulary(texts, vocabulary, {k.lower() for k in known})
    if len(tokenizer.vocab) >= CLOSED_VOCABULARY:
        return []
    words = {w.lower() for text in texts for w in _WORD.findall(text)} - {k.lower() for k in known}
    return sorted(w for w in words if len(tokenizer.encode(w)) != 1)


def _outside_vocabulary(texts: list[str], vocabulary: dict[str, list[str]], known: set[str]) -> list[str]:
    """Words of the texts in neither language's list (nor in `known`), sorted."""
    from easel.world.captions import segment_zh
    english = {w.lower() for w in vocabulary.get("en", [])} | known
    chinese = set(vocabulary.get("zh", [])) | known
    out: set[str] = set()
    for text in texts:
        for word in _WORD.findall(text.lower()):
            if _HAN.search(word):
                out.update(piece for piece, _ in segment_zh(_NOT_HAN.sub(" ", word), chinese) if piece not in chinese)
                out.update(w for w in _NOT_HAN.findall(word) if w not in english)
            elif word not in english:
                out.add(word)
    return sorted(out)


_HAN = regex.compile(r"\p{Han}")
_NOT_HAN = regex.compile(r"[^\p{Han}]+")  # the non-Chinese runs of a mixed word ("red星星")


def model_vocabulary(source: str) -> dict[str, list[str]] | None:
    """The training vocabulary a model file lists in its metadata (`easel.vocabulary`), or None."""
    import os
    if not source or not source.endswith(".safetensors") or not os.path.isfile(source):
        return None
    return _read_vocabulary(source, os.path.getmtime(source))


@functools.lru_cache(maxsize=8)
def _read_vocabulary(path: str, mtime: float) -> dict[str, list[str]] | None:
    import json

    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        text = (f.metadata() or {}).get(VOCABULARY_KEY)
    return json.loads(text) if text else None


VOCABULARY_KEY = "easel.vocabulary"  # model metadata written by `easel train all`: {"en": [...], "zh": [...]}


# --- the UNet's extra vector (SDXL base and refiner) -------------------------------------------------
def refiner_vector(pooled: Tensor, original_size: tuple[int, int] = (1024, 1024),
                   crops: tuple[int, int] = (0, 0), aesthetic_score: float = AESTHETIC_SCORE) -> Tensor:
    """The SDXL refiner's `y` (B, P + 5 * 256): pooled text, then (orig h, w, crop top, left, aesthetic score)
    embedded (SGM's ConcatTimestepEmbedderND; Podell et al. 2023, sec. 2.5)."""
    ids = torch.tensor([*original_size, *crops, aesthetic_score], dtype=torch.float32)  # (5,)
    emb = timestep_embedding(ids, SDXL_EMBED_DIM).reshape(1, -1)  # (1, 5 * 256)
    return torch.cat([pooled, emb.expand(pooled.shape[0], -1).to(pooled)], dim=-1)  # (B, P + 1280)


def unet_conditioning(model: StableDiffusion, text: dict[str, Tensor], width: int, height: int,
                      aesthetic_score: float | None = None) -> dict:
    """Add the `y` vector of models that take one to the text conditioning: SDXL's pooled text + size/crop
    embeddings, or the SDXL refiner's pooled text + size/crop/aesthetic-score embeddings (score default 6.0)."""
    cond = {"context": text["context"]}
    if not model.config.unet.adm_in_channels:
        return cond
    if is_refiner(model.config):
        score = AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score
        cond["y"] = refiner_vector(text["pooled"], original_size=(height, width), aesthetic_score=score).to(model.dtype)
    else:
        from easel.models.unet import sdxl_vector
        cond["y"] = sdxl_vector(text["pooled"], original_size=(height, width), crops=(0, 0),
                                target_size=(height, width)).to(model.dtype)
    return cond


def rescored(pc: "PromptConditioning", score: float, width: int, height: int) -> "PromptConditioning":
    """A refiner's prompt conditioning with the aesthetic score in every text's `y` set to `score`."""
    def rescore(y: Tensor) -> Tensor:
        pooled = y[:, :y.shape[1] - 5 * SDXL_EMBED_DIM]  # y = pooled text, then 5 embeddings (see refiner_vector)
        return refiner_vector(pooled, original_size=(height, width), aesthetic_score=score)
    # new dicts: the prompt and the negative prompt may share an encoded text (and its dict)
    return dataclasses.replace(pc, encoded=[{**e, "y": rescore(e["y"])} for e in pc.encoded])


# --- per-step conditioning ------------------------------------------------------------------------
@dataclass
class PromptConditioning:
    """One prompt's conditioning at every step: AND parts, each a schedule over distinct encoded texts."""

    parts: list[tuple[list[tuple[int, int]], float]]  # per AND part: ([(end_step, text index)], weight)
    texts: list[str]  # the distinct texts, each encoded once
    encoded: list[dict[str, Tensor]]  # per text: {'context': (1, T, D)} (+ 'y': (1, adm) for SDXL)
    empty: dict[str, Tensor]  # the empty prompt, whose chunk pads a shorter context (A1111)
    batch: int

    def at_step(self, step: int) -> list[tuple[dict[str, Tensor], float]]:
        """(UNet conditioning with batch 1, weight) of each AND part at sampling step `step` (0-based)."""
        return [(self.encoded[_pick(schedule, step)], w) for schedule, w in self.parts]

    def texts_at(self, step: int) -> list[tuple[str, float]]:
        """(text, weight) of each AND part at step `step`: what the model is told then."""
        return [(self.texts[_pick(schedule, step)], w) for schedule, w in self.parts]


def _pick(schedule: list[tuple[int, int]], step: int) -> int:
    """A1111's rule: the first entry whose end step is at or after `step` (the last one past the end)."""
    for end, index in schedule:
        if step <= end:
            return index
    return schedule[-1][1]


def build_conditioning(loaded, prompt: str, negative_prompt: str, steps: int, batch: int, width: int, height: int,
                       clip_skip: int = 1, embeddings=None, *,
                       hires_steps: int | None = None) -> tuple[PromptConditioning, PromptConditioning]:
    """(cond, uncond) for a prompt and a negative prompt over `steps` sampling steps.

    The prompt may use AND; both may use weights, BREAK, editing and alternation. `<lora:...>` tags are
    removed here (applying them is the caller's job). `embeddings` is an EmbeddingLibrary or a
    {name: Embedding} dict; None disables textual inversion. `hires_steps`: the schedule of a hires-fix
    second pass (see `easel.text.prompt.prompt_schedule`).
    """
    model, tokenizers = loaded.model, loaded.tokenizers
    # built once: the folders are scanned and the names tokenized once per request, not per text
    matchers = _matchers(tokenizers, _as_library(embeddings))
    cache: dict[str, dict[str, Tensor]] = {}

    def encode(text: str) -> dict[str, Tensor]:
        if text not in cache:
            enc = _encode(model, tokenizers, text, clip_skip, matchers)
            cache[text] = unet_conditioning(model, enc, width, height)
        return cache[text]

    empty = encode("")
    prompt = extract_extra_networks(prompt)[0]
    negative = extract_extra_networks(negative_prompt)[0]
    cond = _scheduled(split_and(prompt), steps, hires_steps, batch, encode, empty)
    # A1111 reads no AND in the negative prompt: it stays one text (with schedules)
    uncond = _scheduled([(negative, 1.0)], steps, hires_steps, batch, encode, empty)
    return cond, uncond


def _scheduled(parts: list[tuple[str, float]], steps: int, hires_steps: int | None, batch: int, encode,
               empty) -> PromptConditioning:
    texts: list[str] = []
    out = []
    for text, weight in parts:
        schedule = []
        for end, t in prompt_schedule(text, steps, hires_steps=hires_steps):
            if t not in texts:
                texts.append(t)
            schedule.append((end, texts.index(t)))
        out.append((schedule, weight))
    return PromptConditioning(out, texts, [encode(t) for t in texts], empty, batch)


class _Library:
    """A {name: Embedding} dict seen as a library."""

    def __init__(self, items: dict[str, Embedding]):
        self.items = items

    def names(self) -> list[str]:
        return list(self.items)

    def get(self, name: str) -> Embedding | None:
        return self.items.get(name)


def _as_library(embeddings):
    if embeddings is None or hasattr(embeddings, "names"):
        return embeddings
    if isinstance(embeddings, dict):
        return _Library(embeddings)
    raise TypeError(f"embeddings must be an EmbeddingLibrary or a {{name: Embedding}} dict, got {type(embeddings)}")


# --- the guided denoiser ----------------------------------------------------------------------------
def _pad_repeat_last(ctx: Tensor, length: int) -> Tensor:
    """A1111's stack_conds: lengthen (1, T, D) to `length` by repeating its last vector."""
    extra = length - ctx.shape[1]
    return ctx if extra == 0 else torch.cat([ctx, ctx[:, -1:].expand(1, extra, ctx.shape[2])], dim=1)


def _pad_empty(ctx: Tensor, length: int, empty: Tensor) -> Tensor:
    """A1111's pad_cond_uncond: lengthen (1, T, D) with whole chunks of the empty prompt."""
    repeats = (length - ctx.shape[1]) // empty.shape[1]
    return ctx if repeats <= 0 else torch.cat([ctx, empty.to(ctx).repeat(1, repeats, 1)], dim=1)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance with per-step prompts and AND parts, in one batched model call per evaluation."""

    def __init__(self, denoiser, cond: PromptConditioning, uncond: PromptConditioning, scale: float,
                 sigmas: Tensor):
        super().__init__()
        self.inner, self.cond, self.uncond, self.scale = denoiser, cond, uncond, float(scale)
        self.sigmas = torch.as_tensor(sigmas).detach().float().cpu()
        if len(self.sigmas) < 2:
            raise ValueError("sigmas must hold at least two values (one step)")

    def step_of(self, sigma: float) -> int:
        """The sampling step whose interval (sigmas[i+1], sigmas[i]] holds sigma (any number of calls per step)."""
        inner = self.sigmas[1:-1] * (1 + SIGMA_RTOL)  # sigmas[1] .. sigmas[n-1]
        return int((inner >= sigma).sum())

    def forward(self, x: Tensor, sigma: Tensor | float, **extra) -> Tensor:
        """Guided x0 for x (B, ...) at noise level sigma: u + scale * sum_i w_i (c_i - u)."""
        xs, sigmas, cond, finish = self.model_call(x, _batch_sigma(sigma, x))
        return finish(self.inner(xs, sigmas, **cond, **extra))

    def model_call(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], Callable]:
        """(x, sigma, conditioning) of the one batched model call for x at sigma (B,), and `finish(output)` that
        applies the guidance to its output (easel batch stacks several prompts' calls into one)."""
        step = self.step_of(float(sigma.reshape(-1)[0]))
        parts = self.cond.at_step(step)
        if len(parts) == 1 and parts[0][1] == 1 and math.isclose(self.scale, 1.0):
            # at scale 1 a single prompt's guided output is its own prediction: skip the uncond half
            return x, sigma, self._batched([parts[0][0]], x.shape[0], with_uncond=False), lambda out: out
        conds = [self.uncond.at_step(step)[0][0]] + [c for c, _ in parts]
        k = len(conds)

        def finish(out: Tensor) -> Tensor:
            outs = out.chunk(k)  # uncond first (as CFGDenoiser), then each AND part
            denoised = outs[0]
            for (_, w), c in zip(parts, outs[1:]):
                denoised = denoised + (self.scale * w) * (c - outs[0])
            return denoised
        both = self._batched(conds, x.shape[0], with_uncond=True)
        return torch.cat([x] * k), torch.cat([sigma] * k), both, finish  # (k B, ...)

    def _batched(self, conds: list[dict[str, Tensor]], batch: int, with_uncond: bool) -> dict[str, Tensor]:
        """Stack [uncond,] AND parts into one UNet batch, their contexts padded to one length as A1111 does."""
        contexts = [c["context"] for c in conds]
        parts = contexts[1:] if with_uncond else contexts
        longest = max(c.shape[1] for c in parts)
        contexts = [_pad_repeat_last(c, longest) for c in parts]  # AND parts among themselves
        if with_uncond:  # then cond against uncond, with empty-prompt chunks
            length = max(longest, conds[0]["context"].shape[1])
            empty = self.cond.empty["context"]
            contexts = [_pad_empty(c, length, empty) for c in [conds[0]["context"], *contexts]]
        out = {"context": torch.cat([c.expand(batch, *c.shape[1:]) for c in contexts])}  # (k B, T, D)
        if "y" in conds[0]:
            out["y"] = torch.cat([c["y"].expand(batch, -1) for c in conds])  # (k B, adm)
        return out
