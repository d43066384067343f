"""The tokenizer's and the text encoder's view of a prompt: 77-token slots, BPE pieces, weights, embeddings.

The slots are built exactly as the prompt encoder builds them (`easel.pipelines.conditioning`): the prompt is
parsed for A1111 emphasis and BREAK (`parse_attention`), cut into chunks of 75 tokens (`tokenize_chunks`), and
each chunk is framed as start + 75 tokens + end, padded; chunk c's slot j sits at position 77 c + j of the
context the UNet attends to.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from easel.inspect import draw

START, END, PAD = "<start>", "<end>", "<pad>"


@dataclass
class Slot:
    """One position of the encoded prompt."""

    position: int  # in the whole context: chunk * 77 + index
    chunk: int
    id: int
    piece: str  # readable text of the token (<start>, <end>, <pad> for the special ones)
    kind: str  # start | token | embedding | end | pad
    weight: float  # A1111 emphasis weight (1 outside the prompt's tokens)
    word: int | None = None  # index of the word this piece belongs to (content tokens only)
    word_text: str = ""  # the whole word (BPE pieces joined)

    @property
    def key(self) -> str:
        """'<position>:<token>', the key of this slot's map in attention.npz."""
        return f"{self.position}:{self.piece}"


def prompt_slots(loaded, text: str, library=None) -> list[Slot]:
    """Every slot of every chunk of `text` as the first text encoder sees it (emphasis syntax and BREAK parsed;
    `library`: textual-inversion embeddings, whose vectors take slots named after them)."""
    from easel.pipelines.conditioning import EmbeddingMatcher, tokenize_chunks
    from easel.text.prompt import parse_attention
    tok, cfg = loaded.tokenizers[0], loaded.model.config.text_encoders[0]
    size = min(e.max_position_embeddings for e in loaded.model.config.text_encoders) - 2
    matcher = EmbeddingMatcher(tok, library) if library is not None else None
    chunks = tokenize_chunks(parse_attention(text), tok, size, matcher)
    slots: list[Slot] = []
    word = 0
    for c, chunk in enumerate(chunks):
        base = c * (size + 2)
        named = {off + j: emb.name for off, emb in chunk.fixes for j in range(emb.num_vectors)}
        slots.append(Slot(base, c, tok.bos_id, START, "start", 1.0))
        for j, (i, w) in enumerate(zip(chunk.ids, chunk.weights)):
            if j in named:
                slots.append(Slot(base + 1 + j, c, i, named[j], "embedding", w, word, named[j]))
                word += int(j + 1 not in named)
                continue
            raw = tok.tokens([i])[0]
            slots.append(Slot(base + 1 + j, c, i, tok.decode([i]) or raw, "token", w, word))
            word += int(raw.endswith("</w>"))  # a CLIP word's last piece carries </w>
        slots.append(Slot(base + 1 + len(chunk.ids), c, tok.eos_id, END, "end", 1.0))
        slots += [Slot(base + 2 + len(chunk.ids) + k, c, cfg.pad_token_id, PAD, "pad", 1.0)
                  for k in range(size - len(chunk.ids))]
    _name_words(slots)
    return slots


def _name_words(slots: list[Slot]) -> None:
    """Give each content slot the text of its whole word."""
    words: dict[int, list[str]] = {}
    for s in slots:
        if s.word is not None and s.kind == "token":
            words.setdefault(s.word, []).append(s.piece)
    for s in slots:
        if s.word is not None and s.kind == "token":
            s.word_text = "".join(words[s.word])


def content(slots: list[Slot]) -> list[Slot]:
    """The prompt's own tokens (no start, end or padding)."""
    return [s for s in slots if s.kind in ("token", "embedding")]


def words(slots: list[Slot]) -> list[tuple[str, list[Slot]]]:
    """(word, its BPE pieces' slots) in prompt order (a word split across chunks stays one word)."""
    out: dict[int, list[Slot]] = {}
    for s in content(slots):
        out.setdefault(s.word, []).append(s)
    return [(group[0].word_text, group) for group in out.values()]


@torch.no_grad()
def text_embeddings(loaded, text: str, clip_skip: int = 1, library=None) -> dict[str, np.ndarray]:
    """{'context': (positions, D) what the UNet attends to (emphasis applied), 'token': (positions, D) the input
    token embeddings of the first encoder} for the prompt text."""
    from easel.pipelines.conditioning import encode_weighted
    model = loaded.model
    ctx = encode_weighted(model, loaded.tokenizers, text, clip_skip, library)["context"][0].float().cpu()
    slots = prompt_slots(loaded, text, library)
    table = model.text_encoders[0].text_model.embeddings.token_embedding.weight.detach().float().cpu()
    ids = torch.tensor([s.id for s in slots])
    return {"context": ctx.numpy(), "token": table[ids].numpy()}


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Rows projected on their first two principal components (N, 2); the signs fixed so a rerun matches."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    out = x @ comps.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def token_table(loaded, text: str, clip_skip: int = 1, library=None) -> list[dict]:
    """One row per slot up to the first padding of each chunk: position, id, piece, kind, word, weight, the norm of
    the input token embedding and of the encoder's output (context) vector, and the cosine between the context
    vectors at this clip skip and one layer earlier (what --clip-skip changes)."""
    slots = prompt_slots(loaded, text, library)
    emb = text_embeddings(loaded, text, clip_skip, library)
    earlier = text_embeddings(loaded, text, clip_skip + 1, library)["context"]
    a, b = emb["context"], earlier
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    rows = []
    for s in slots:
        if s.kind == "pad" and rows and rows[-1]["kind"] == "pad" and rows[-1]["chunk"] == s.chunk:
            continue  # one padding row per chunk stands for all of them
        row = asdict(s)
        row.update(token_norm=float(np.linalg.norm(emb["token"][s.position])),
                   context_norm=float(np.linalg.norm(a[s.position])), cos_clip_skip=float(cos[s.position]))
        rows.append(row)
    return rows


def format_table(rows: list[dict], slots_per_chunk: int) -> str:
    """The token table as aligned text."""
    head = f"{'pos':>4} {'chunk':>5} {'id':>6}  {'piece':<14} {'word':<14} {'weight':>6} {'|tok|':>7} {'|ctx|':>7}" \
           f" {'cos skip+1':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        piece = r["piece"] + (f" ..x{_pads(rows, r, slots_per_chunk)}" if r["kind"] == "pad" else "")
        lines.append(f"{r['position']:>4} {r['chunk']:>5} {r['id']:>6}  {piece:<14.14} {r['word_text']:<14.14} "
                     f"{r['weight']:>6.2f} {r['token_norm']:>7.2f} {r['context_norm']:>7.2f} "
                     f"{r['cos_clip_skip']:>10.3f}")
    return "\n".join(lines)


def _pads(rows: list[dict], row: dict, per_chunk: int) -> int:
    """How many padding slots the one padding row of a chunk stands for."""
    used = sum(1 for r in rows if r["chunk"] == row["chunk"] and r["kind"] != "pad")
    return per_chunk - used


def tokens_figure(loaded, text: str, clip_skip: int = 1, library=None) -> Image.Image:
    """A picture of the prompt's slots (pieces coloured by word, weights, context norms as bars) beside a 2-D PCA
    map of the context vectors of the start, content and end tokens."""
    rows = token_table(loaded, text, clip_skip, library)
    emb = text_embeddings(loaded, text, clip_skip, library)["context"]
    shown = [r for r in rows if r["kind"] != "pad"]
    return draw.grid([_slots_panel(rows), _pca_panel(shown, emb)], cols=2, pad=10)


def _word_colour(word: int | None) -> tuple[int, int, int]:
    """A distinct, readable colour per word index (grey for start/end/padding)."""
    if word is None:
        return (120, 120, 120)
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
               (140, 86, 75), (227, 119, 194), (188, 189, 34)]
    return palette[word % len(palette)]


def _slots_panel(rows: list[dict]) -> Image.Image:
    """The slot table drawn: one row per slot, the context norm as a bar."""
    f, line = draw.font(13), 18
    width = 470
    img = Image.new("RGB", (width, line * (len(rows) + 2) + 8), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((4, 4), "pos  id     piece           weight  |context|", fill=draw.INK, font=f)
    top = max(r["context_norm"] for r in rows) or 1.0
    for n, r in enumerate(rows):
        y = 4 + line * (n + 1)
        colour = _word_colour(r["word"])
        d.text((4, y), f"{r['position']:>3}", fill=draw.INK, font=f)
        d.text((40, y), f"{r['id']}", fill=(90, 90, 90), font=f)
        d.text((96, y), draw.fit_text(d, r["piece"], f, 120), fill=colour, font=f)
        wt = r["weight"]
        d.text((224, y), f"{wt:.2f}", fill=(200, 30, 30) if wt > 1 else (30, 30, 200) if wt < 1 else draw.INK, font=f)
        bar = int(160 * r["context_norm"] / top)
        d.rectangle([290, y + 3, 290 + bar, y + line - 5], fill=colour)
    return draw.captioned(img, "the 77-token slots (one row for the padding)", 15)


def _pca_panel(rows: list[dict], emb: np.ndarray, size: int = 420) -> Image.Image:
    """The context vectors of the shown slots on their first two principal components, labelled."""
    xy = pca_2d(emb[[r["position"] for r in rows]])
    img = Image.new("RGB", (size, size), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
    f, margin = draw.font(13), 50
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo < 1e-9, 1.0, hi - lo)
    for r, (x, y) in zip(rows, xy):
        px = margin + (x - lo[0]) / span[0] * (size - 2 * margin)
        py = size - margin - (y - lo[1]) / span[1] * (size - 2 * margin)
        colour = _word_colour(r["word"])
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        d.text((px + 6, py - 8), r["piece"], fill=colour, font=f)
    return draw.captioned(img, "text-encoder outputs, 2-D PCA", 15)
