"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; BPE: Sennrich et al. 2016), our own implementation.

It gives the same ids as `transformers.CLIPTokenizer` (transformers 5, the `tokenizers`-backed one that
diffusers pipelines use) on CLIP's vocabulary:

1. special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token) are cut out of the raw text first;
2. the rest is normalized: Unicode NFC, whitespace runs -> one space, lower-cased character by character
   (no ftfy, no html unescaping: transformers 5 does neither);
3. split by CLIP's pattern (words, single digits, punctuation runs, English contractions);
4. each piece's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), `</w>` marks the
   end of the word, and BPE merges are applied by rank.

CLIP-L (SD1, SDXL's first encoder) and OpenCLIP (SD2, SDXL's second) share this vocabulary; they differ
only in the pad token: `<|endoftext|>` for "clip-l", `!` (id 0) for "openclip".

`find_tokenizer(model_path, explicit, kind)` looks, in this order, in:

1. `explicit`: a folder with vocab.json + merges.txt, a vocab.json (merges.txt beside it), or CLIP's
   `bpe_simple_vocab_16e6.txt.gz`;
2. beside the model: a diffusers folder's `tokenizer/` (for "openclip" first `tokenizer_2/`, SDXL); for a
   single file `<stem>.tokenizer/` or `tokenizer/` next to it (for "openclip" first the `_2` variants);
3. the cache `$EASEL_CACHE/tokenizers/<kind>/` (default `~/.cache/easel/tokenizers/<kind>/`), filled by
   `install_bpe_gz`; the other kind's folder is used too (same vocabulary, this kind's pad token);
4. the Hugging Face hub (`openai/clip-vit-large-patch14`, vocab.json + merges.txt): its local cache, then
   the network unless `HF_HUB_OFFLINE` is set; only when `huggingface_hub` is installed.

The pad token comes from the folder's `tokenizer_config.json` / `special_tokens_map.json` when it names
one (steps 1-2), otherwise from `kind`. easel's own extension, `"easel_split_cjk": true` in
`tokenizer_config.json` (the built-in bilingual model's tokenizer), makes every Chinese character its own word
before step 3, as BERT does: Chinese has no spaces, so without it a whole sentence would be one BPE word. Nothing found raises `TokenizerNotFound` saying how to supply one.
"""
from __future__ import annotations

import gzip
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

import regex
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_BY_KIND = {"clip-l": EOS, "openclip": "!"}
HUB_REPO = "openai/clip-vit-large-patch14"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's SimpleTokenizer keeps lines 1..48894 of the .gz

# `\s` as the Oniguruma engine of `tokenizers` defines it (Unicode White_Space), not Python's `\s`,
# which also counts \x1c-\x1f: HF turns those into tokens, so we must too.
_WS = r"\t\n\x0b\x0c\r\x85\p{Zs}\p{Zl}\p{Zp}"
_WS_RUN = regex.compile(f"[{_WS}]+")
CLIP_PATTERN = regex.compile(
    rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^{_WS}\p{{L}}\p{{N}}]+")
# HF's ByteLevel step splits every piece again with GPT-2's pattern. On CLIP's pieces this only changes
# a special-token literal that was not cut out as a special token (e.g. "<|ENDOFTEXT|>", lower-cased
# later): it becomes "<|", "endoftext", "|>".
GPT2_PATTERN = regex.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|\p{{L}}+|\p{{N}}+|[^{_WS}\p{{L}}\p{{N}}]+")
_CJK_CHAR = regex.compile(r"[\p{Han}\u3000-\u303f\uff00-\uffef]")  # Han characters and CJK punctuation (、，)
SPLIT_CJK_KEY = "easel_split_cjk"


class TokenizerNotFound(FileNotFoundError):
    """No CLIP vocabulary was found; the message lists the ways to provide one."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # Bytes that are whitespace/control characters get unused code points from 256 up, so that BPE
    # never sees a space or an invisible character.
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table  # insertion order (printable first) is the order of the first 256 vocabulary ids


def _read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


def _split_cjk_from_config(folder: Path) -> bool:
    """True when the folder's tokenizer_config.json asks for easel's one-word-per-Chinese-character split."""
    path = folder / "tokenizer_config.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get(SPLIT_CJK_KEY) is True


def split_cjk(text: str) -> str:
    """Spaces around every Chinese character and CJK punctuation mark (one BPE word each)."""
    return _CJK_CHAR.sub(lambda m: f" {m.group()} ", text)


def _pad_from_config(folder: Path) -> str | None:
    """The pad token named by a HF tokenizer folder's config files, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


def merge_pair(symbols: list[str] | tuple[str, ...], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `symbols` by its merge, left to right (one BPE merge step)."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer: text -> ids, ids -> text, and padded (B, 77) batches."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 bos_token: str = BOS, eos_token: str = EOS, unk_token: str = EOS, split_cjk: bool = False):
        for token in (bos_token, eos_token, pad_token, unk_token):
            if token not in vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.split_cjk = split_cjk
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
        self._special_re = regex.compile("|".join(regex.escape(s) for s in self._specials))
        self._cache: dict[str, list[str]] = {}

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                   pad_token: str = EOS, split_cjk: bool = False) -> "CLIPTokenizer":
        """Read a HF-format vocab.json + merges.txt pair."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        return cls(vocab, _read_merges(merges_txt), pad_token=pad_token, split_cjk=split_cjk)

    @classmethod
    def from_bpe_gz(cls, path: str | os.PathLike, pad_token: str = EOS) -> "CLIPTokenizer":
        """Build vocab and merges from OpenAI/OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` as SimpleTokenizer does."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
        # ids: 256 byte characters, the same with </w>, one token per merge, then the two specials.
        base = list(bytes_to_unicode().values())
        tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, pad_token: str | None = None) -> "CLIPTokenizer":
        """Read a HF tokenizer folder (vocab.json, merges.txt, optional config naming the pad token)."""
        folder = Path(path)
        if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
            raise TokenizerNotFound(f"{folder} has no vocab.json + merges.txt")
        pad = pad_token or _pad_from_config(folder) or EOS
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=pad,
                              split_cjk=_split_cjk_from_config(folder))

    def save(self, path: str | os.PathLike) -> Path:
        """Write vocab.json, merges.txt and tokenizer_config.json in the format HF reads."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "unk_token": self.unk_token, "model_max_length": 77}
        if self.split_cjk:
            config[SPLIT_CJK_KEY] = True
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder

    # --- ids ----------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        """Id of <|startoftext|>."""
        return self.vocab[self.bos_token]

    @property
    def eos_id(self) -> int:
        """Id of <|endoftext|>."""
        return self.vocab[self.eos_token]

    @property
    def pad_id(self) -> int:
        """Id of the pad token (49407 for CLIP-L, 0 for OpenCLIP's "!")."""
        return self.vocab[self.pad_token]

    @property
    def vocab_size(self) -> int:
        """Number of tokens (49408 for CLIP)."""
        return len(self.vocab)

    # --- encoding -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Text -> BPE token strings, without BOS/EOS."""
        out: list[str] = []
        start = 0
        for m in self._special_re.finditer(text):  # specials are matched on the raw text, as HF does
            out += self._tokenize_plain(text[start:m.start()])
            out.append(m.group())
            start = m.end()
        return out + self._tokenize_plain(text[start:])

    def _tokenize_plain(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFC", text)
        text = _WS_RUN.sub(" ", split_cjk(text) if self.split_cjk else text)
        # Character by character, like `tokenizers`: str.lower() would turn a final sigma into "ς".
        text = "".join(c.lower() for c in text)
        tokens = []
        for piece in CLIP_PATTERN.findall(text):
            for word in GPT2_PATTERN.findall(piece):
                tokens += self._bpe("".join(self._byte_encoder[b] for b in word.encode("utf-8")))
        return tokens

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one word (byte-encoded), lowest merge rank first."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, float("inf")))
            if pair not in self._ranks:
                break
            symbols = merge_pair(symbols, pair)
        if len(self._cache) > 100_000:  # bound the memory of a long-running server
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without BOS/EOS."""
        unk = self.vocab[self.unk_token]
        return [self.vocab.get(t, unk) for t in self.tokenize(text)]

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Token ids -> text (words separated by spaces, as HF decodes); special tokens skipped by default."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        specials = {self.vocab[s] for s in self._specials}
        parts, run = [], []
        for i in ids:
            if i in specials:
                parts.append(self._bytes_to_text(run))
                run = []
                if not skip_special:
                    parts.append(self._id_to_token[i])
            else:
                run.append(self._id_to_token[i])
        parts.append(self._bytes_to_text(run))
        return "".join(parts).replace("</w>", " ").strip()

    def _bytes_to_text(self, tokens: list[str]) -> str:
        # "</w>" is made of printable ASCII, which maps to itself: it survives and becomes a space later.
        chars = "".join(tokens)
        data = b"".join(bytes([self._byte_decoder[c]]) if c in self._byte_decoder else c.encode() for c in chars)
        return data.decode("utf-8", errors="replace")

    def tokens(self, ids: list[int] | torch.Tensor) -> list[str]:
        """Token ids -> token strings (for labels, e.g. per-token attention maps)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self._id_to_token[i] for i in ids]

    def __call__(self, texts: str | list[str], max_length: int = 77, pad_id: int | None = None,
                 truncation: bool = True) -> torch.Tensor:
        """Texts -> LongTensor (B, max_length): BOS, ids, EOS, then padding (truncated to fit).

        With truncation=False a prompt longer than max_length is kept whole and every row is padded
        to the longest one instead.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        pad = self.pad_id if pad_id is None else pad_id
        rows = []
        for text in texts:
            ids = self.encode(text)
            if truncation:
                ids = ids[:max_length - 2]  # room for BOS and EOS, the EOS stays last
            rows.append([self.bos_id, *ids, self.eos_id])
        length = max([max_length, *(len(r) for r in rows)])
        return torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)  # (B, L)


# --- finding a vocabulary ---------------------------------------------------------------------
def cache_dir(kind: str = "clip-l") -> Path:
    """`$EASEL_CACHE/tokenizers/<kind>/`, by default `~/.cache/easel/tokenizers/<kind>/`."""
    root = os.environ.get("EASEL_CACHE") or Path.home() / ".cache" / "easel"
    return Path(root) / "tokenizers" / kind


def _check_kind(kind: str) -> None:
    if kind not in PAD_BY_KIND:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use one of {sorted(PAD_BY_KIND)}")


def install(tokenizer: CLIPTokenizer, kind: str = "clip-l") -> Path:
    """Write a tokenizer into the cache folder of its kind, atomically (never half a vocabulary there)."""
    from easel.files import atomic_folder
    _check_kind(kind)
    with atomic_folder(cache_dir(kind), replace=True) as tmp:
        tokenizer.save(tmp)
    return cache_dir(kind)


def install_bpe_gz(gz_path: str | os.PathLike, kind: str = "clip-l") -> Path:
    """Convert CLIP's `bpe_simple_vocab_16e6.txt.gz` into the cache as vocab.json + merges.txt."""
    _check_kind(kind)
    return install(CLIPTokenizer.from_bpe_gz(gz_path, pad_token=PAD_BY_KIND[kind]), kind)


def load_path(path: str | os.PathLike, kind: str = "clip-l") -> CLIPTokenizer:
    """Load a tokenizer folder, a vocab.json (merges.txt beside it) or a `.gz` BPE file."""
    p = Path(path).expanduser()
    if p.is_dir() and _has_vocab(p):
        return _load_folder(p, kind)
    if p.is_file() and p.name.endswith(".gz"):
        return CLIPTokenizer.from_bpe_gz(p, pad_token=PAD_BY_KIND[kind])
    if p.is_file() and p.suffix == ".json" and (p.parent / "merges.txt").is_file():
        pad = _pad_from_config(p.parent) or PAD_BY_KIND[kind]
        return CLIPTokenizer.from_files(p, p.parent / "merges.txt", pad_token=pad)
    raise TokenizerNotFound(f"tokenizer path {p} is not a folder with vocab.json + merges.txt, "
                            "a vocab.json with merges.txt beside it, or a bpe_simple_vocab_16e6.txt.gz")


def _load_folder(folder: Path, kind: str) -> CLIPTokenizer:
    """A tokenizer folder; its config's pad token wins over the kind's default."""
    return CLIPTokenizer.from_dir(folder, pad_token=_pad_from_config(folder) or PAD_BY_KIND[kind])


def _model_candidates(model_path: str, kind: str) -> list[Path]:
    """Tokenizer folders that may sit beside a model (diffusers folder or single file)."""
    model = Path(model_path).expanduser()
    names = ["tokenizer_2", "tokenizer"] if kind == "openclip" else ["tokenizer"]
    if model.is_dir():
        return [model / n for n in names] + [model]  # the folder itself may be a tokenizer folder
    return [model.parent / f"{model.stem}.{n}" for n in names] + [model.parent / n for n in names]


def _has_vocab(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, because huggingface_hub retries with back-off for half a minute when offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(kind: str) -> CLIPTokenizer | None:
    """vocab.json + merges.txt of openai/clip-vit-large-patch14 from the HF cache or hub, or None."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for local_only in (True, False):
        if not local_only and (offline or not _hub_reachable()):
            break
        try:
            files = [hf_hub_download(HUB_REPO, name, local_files_only=local_only, etag_timeout=5)
                     for name in ("vocab.json", "merges.txt")]
            return CLIPTokenizer.from_files(*files, pad_token=PAD_BY_KIND[kind])
        except Exception:  # noqa: BLE001 - any failure (offline, timeout, missing) means "not here"
            continue
    return None


def find_tokenizer(model_path: str | None, explicit: str | None = None, kind: str = "clip-l") -> CLIPTokenizer:
    """Find a CLIP vocabulary for `kind` ("clip-l" or "openclip") in the order of the module docstring."""
    _check_kind(kind)
    if explicit:
        return load_path(explicit, kind)
    searched = []
    if model_path:
        for folder in _model_candidates(model_path, kind):
            searched.append(folder)
            if _has_vocab(folder):
                return _load_folder(folder, kind)
    for k in [kind, *(k for k in PAD_BY_KIND if k != kind)]:  # same vocabulary: any kind's cache will do
        folder = cache_dir(k)
        searched.append(folder)
        if _has_vocab(folder):
            return CLIPTokenizer.from_dir(folder, pad_token=PAD_BY_KIND[kind])
    tok = _from_hub(kind)
    if tok is not None:
        return tok
    raise TokenizerNotFound(_not_found_message(kind, searched))


def _not_found_message(kind: str, searched: list[Path]) -> str:
    where = "\n".join(f"  - {p}" for p in searched)
    return (f"no CLIP tokenizer ({kind}) found. Looked in:\n{where}\n"
            "  - the Hugging Face hub (openai/clip-vit-large-patch14): not installed, offline or unreachable\n"
            "Provide one of:\n"
            "  1. an explicit path (--tokenizer PATH): a folder with vocab.json + merges.txt (e.g. a diffusers "
            "model's tokenizer/ folder), a vocab.json, or CLIP's bpe_simple_vocab_16e6.txt.gz;\n"
            "  2. a tokenizer/ folder (tokenizer_2/ for OpenCLIP) inside the diffusers folder, or "
            "<checkpoint>.tokenizer/ or tokenizer/ beside a single-file checkpoint;\n"
            f"  3. the cache, once for all models: `easel tokenizer install bpe_simple_vocab_16e6.txt.gz` "
            f"(writes {cache_dir(kind)}). "
            "The .gz ships inside OpenCLIP: `pip download --no-deps open_clip_torch`, then unzip the wheel "
            "and take open_clip/bpe_simple_vocab_16e6.txt.gz;\n"
            "  4. pip install huggingface_hub and go online once (HF_HUB_OFFLINE unset).")
