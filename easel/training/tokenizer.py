"""Train a byte-level BPE vocabulary (Sennrich et al. 2016) in CLIP's format on the ShapeWorld captions.

The result is read by `easel.text.tokenizer.CLIPTokenizer.from_files` and by HF's CLIPTokenizer:
ids 0-255 are the byte symbols (GPT-2's byte-to-unicode map), 256-511 the same with `</w>` (end of
word), then one token per merge, then `<|startoftext|>` and `<|endoftext|>`. Merging runs until
every word of the corpus is a single token, so the vocabulary stays tiny (~600 entries) and each
caption word is one token: the text encoder then learns about words, not spellings.
"""
from __future__ import annotations

import os
import unicodedata
from collections import Counter

from easel.files import atomic_folder
from easel.text.tokenizer import (_WS_RUN, BOS, CLIP_PATTERN, EOS, GPT2_PATTERN, CLIPTokenizer, bytes_to_unicode,
                                  merge_pair, split_cjk)

Word = tuple[str, ...]


def word_counts(corpus: list[str], cjk: bool = True) -> Counter:
    """Pre-tokenize like the engine (NFC, [one word per Chinese character,] whitespace, lower case, CLIP's split)
    and count byte-symbol words."""
    enc = bytes_to_unicode()
    counts: Counter = Counter()
    for text in corpus:
        text = unicodedata.normalize("NFC", text)
        text = _WS_RUN.sub(" ", split_cjk(text) if cjk else text).lower()
        for piece in CLIP_PATTERN.findall(text):
            for word in GPT2_PATTERN.findall(piece):
                chars = [enc[b] for b in word.encode("utf-8")]
                counts[(*chars[:-1], chars[-1] + "</w>")] += 1
    return counts


def _pair_counts(words: Counter) -> Counter:
    pairs: Counter = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    return pairs


def _merge_word(word: Word, pair: tuple[str, str]) -> Word:
    """Apply one merge to a word, exactly as the tokenizer applies merges."""
    return tuple(merge_pair(word, pair))


def train_bpe(corpus: list[str], max_merges: int = 5000,
              min_count: int = 1) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn merges (most frequent pair first, ties by the pair's text) until no pair is left; -> (vocab, merges)."""
    words = word_counts(corpus)
    if not words:
        raise ValueError("the caption corpus is empty: nothing to train a tokenizer on")
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = _pair_counts(words)
        if not pairs:
            break  # every word is one symbol
        pair, n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))  # deterministic tie-break
        if n < min_count:
            break
        merges.append(pair)
        words = Counter({_merge_word(w, pair): c for w, c in words.items()})
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    # Two merge paths can spell the same string ("ab"+"c", "a"+"bc"): keep its first id only.
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def shapeworld_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """Training captions in both languages plus every grammar word on its own, so that rare words are single
    tokens too (Chinese: one token per character)."""
    from easel.world.captions import caption_corpus, vocabulary
    return caption_corpus(n, seed) + vocabulary() + caption_corpus(n // 4, seed, "zh") + vocabulary("zh")


def train_tokenizer(out_dir: str | os.PathLike, n_captions: int = 20000, seed: int = 0) -> CLIPTokenizer:
    """Train on the ShapeWorld corpus and save vocab.json + merges.txt (+ tokenizer_config.json) in `out_dir`."""
    vocab, merges = train_bpe(shapeworld_corpus(n_captions, seed))
    tok = CLIPTokenizer(vocab, merges, split_cjk=True)
    with atomic_folder(out_dir, replace=True) as tmp:  # a kill never leaves vocab.json without its merges.txt
        tok.save(tmp)
    return tok


def check_single_tokens(tok: CLIPTokenizer, words: list[str]) -> list[str]:
    """Words of the list that do not encode to exactly one token (should be none)."""
    return [w for w in words if len(tok.encode(w)) != 1]


def extend_tokenizer(tok: CLIPTokenizer, words: list[str]) -> tuple[CLIPTokenizer, dict[int, int]]:
    """`tok` taught the characters of new words (one token per Chinese character), keeping every old token's id.

    New merges go after the old ones (an old word never meets them: they join bytes only the new characters
    have), new tokens take ids from the old <|startoftext|>'s, and the two specials move to the end, where the
    text config expects them (vocab_size - 2 and - 1). -> (tokenizer, {old id: new id} of the moved specials).
    """
    _, new_merges = train_bpe(words)
    have = set(tok.merges)
    merges = list(tok.merges) + [m for m in new_merges if m not in have]
    plain = [t for t, _ in sorted(tok.vocab.items(), key=lambda kv: kv[1]) if t not in (BOS, EOS)]
    added = [t for t in dict.fromkeys("".join(m) for m in merges[len(tok.merges):]) if t not in tok.vocab]
    if [tok.vocab[t] for t in plain] != list(range(len(plain))):
        raise ValueError("the tokenizer's ordinary tokens do not fill ids 0..N-1: cannot extend it in place")
    tokens = plain + added + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    out = CLIPTokenizer(vocab, merges, pad_token=tok.pad_token, split_cjk=True)
    return out, {tok.vocab[BOS]: vocab[BOS], tok.vocab[EOS]: vocab[EOS]}
