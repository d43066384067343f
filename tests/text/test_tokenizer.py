"""CLIP BPE tokenizer: ids equal transformers' CLIPTokenizer on the real vocabulary; finding a vocabulary."""
import gzip
import json
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pytest
import torch

from easel.text import tokenizer as tk
from easel.text.tokenizer import CLIPTokenizer, TokenizerNotFound, find_tokenizer, install_bpe_gz

TEST_DATA = Path.home() / ".cache" / "easel" / "test-data"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"

PROMPTS = [
    "a photo of a cat",
    "A Red STAR above a blue circle, trending on ArtStation!!!",
    "café, naïve résumé, e\u0301 (decomposed), Ångström",
    "中文提示词 and 日本語のテキスト, 한국어",
    "emoji 😀🎨🐈‍⬛ 👍🏽 and ♥ ★ ✓",
    "it's, we'll, they're, I'd, you've, I'm, don't, 'S 'LL",
    "numbers 1234567 3.14159 -42 1e10 $100 50% 2nd",
    "punctuation: (((masterpiece))), [best:1.2] {a|b} <lora:x:0.8> --no @#$%^&*~`",
    "multiple   spaces\n\nnew lines\tand\ttabs\r\n  leading and trailing  ",
    "ΟΔΟΣ Σ ς σ straße İstanbul",
    "control \x1c\x1d\x85\xa0\u2003\u3000 chars\x00here",
    "<|startoftext|>special<|endoftext|> and <|ENDOFTEXT|> <|endoftext",
    "pad ! !! !? end!",
    "",
    "   ",
    " ".join(f"word{i}" for i in range(120)),  # far past 77 tokens: truncated, EOS kept last
]


def _extract_gz(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(GZ_NAME))
        dest.write_bytes(z.read(name))


@pytest.fixture(scope="session")
def bpe_gz(tmp_path_factory) -> Path:
    """CLIP's real BPE vocabulary, taken from the open_clip_torch wheel on PyPI and cached."""
    path = TEST_DATA / GZ_NAME
    if not path.is_file():
        tmp = tmp_path_factory.mktemp("open_clip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:", "open_clip_torch",
               "-d", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(tmp.glob("open_clip_torch-*.whl"))
        if result.returncode or not wheels:
            pytest.skip(f"could not download open_clip_torch for CLIP's vocabulary: {result.stderr[-500:]}")
        TEST_DATA.mkdir(parents=True, exist_ok=True)
        _extract_gz(wheels[0], tmp / GZ_NAME)
        (tmp / GZ_NAME).replace(path)
    return path


def independent_files(gz: Path, folder: Path) -> Path:
    """vocab.json + merges.txt built here from the .gz without easel (OpenAI SimpleTokenizer's recipe)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    merges = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")[1:48895]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def ours(bpe_gz) -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_gz(bpe_gz)


@pytest.fixture(scope="session")
def hf_pair(bpe_gz, ours, tmp_path_factory):
    """transformers tokenizers from our saved files and from independently built files."""
    from transformers import CLIPTokenizer as HFTokenizer
    saved = ours.save(tmp_path_factory.mktemp("ours"))
    indep = independent_files(bpe_gz, tmp_path_factory.mktemp("indep"))
    return HFTokenizer.from_pretrained(saved), HFTokenizer.from_pretrained(indep)


def hf_batch(hf, texts, max_length=77):
    out = hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids


def test_vocab_equals_independent_construction(bpe_gz, ours, tmp_path):
    folder = independent_files(bpe_gz, tmp_path)
    assert ours.vocab == json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (49408, 49406, 49407, 49407)
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # well-known SD prompt ids


@pytest.mark.parametrize("which", ["from_our_save", "from_independent_files"])
def test_ids_equal_transformers(ours, hf_pair, which):
    hf = hf_pair[which == "from_independent_files"]
    expected = hf_batch(hf, PROMPTS)
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    for text, row, ref in zip(PROMPTS, got, expected):
        assert row.tolist() == ref.tolist(), text


def test_openclip_pad_token_equals_transformers(bpe_gz, hf_pair, tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer
    ours = CLIPTokenizer.from_bpe_gz(bpe_gz, pad_token="!")
    hf = HFTokenizer.from_pretrained(ours.save(tmp_path))
    assert hf.pad_token == "!" and ours.pad_id == 0
    # "!" becomes a special token: HF (and SDXL's tokenizer_2) encode it as id 0, not "!</w>".
    assert torch.equal(ours(PROMPTS), hf_batch(hf, PROMPTS))


def test_every_character_up_to_cjk_equals_transformers(ours, hf_pair):
    # Characters Python's Unicode database does not know yet (e.g. U+088F, new in Unicode 17) are left
    # out: NFC and lower-casing of those follow the Python version, not the tokenizer.
    texts = [f"x{chr(c)}Y{chr(c)}" for c in range(1, 0x3100)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    expected = hf_pair[1](texts).input_ids
    mismatched = [t for t, ref in zip(texts, expected) if ours.encode(t) != ref[1:-1]]
    assert mismatched == []


def test_truncation_keeps_eos_last(ours):
    ids = ours([PROMPTS[-1], "short"])
    assert ids[0, 0] == ours.bos_id and ids[0, 76] == ours.eos_id and ours.eos_id not in ids[0, 1:76]
    assert ids[1].tolist()[:3] == [ours.bos_id, ours.encode("short")[0], ours.eos_id]
    long = ours([PROMPTS[-1], "short"], truncation=False, pad_id=0)
    assert long.shape[1] == len(ours.encode(PROMPTS[-1])) + 2 and long[1, 3:].eq(0).all()
    assert ours("a", max_length=8, pad_id=5).tolist() == [[49406, 320, 49407, 5, 5, 5, 5, 5]]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(ours, hf_pair, skip):
    hf = hf_pair[1]
    for text in PROMPTS:
        ids = hf_batch(hf, [text])[0].tolist()
        assert ours.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(ours.encode("a Photo, of 2 cats!")) == "a photo , of 2 cats !"


def test_save_and_from_files_round_trip(ours, tmp_path):
    folder = ours.save(tmp_path / "tok")
    again = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert again.vocab == ours.vocab and again.merges == ours.merges
    assert torch.equal(again(PROMPTS), ours(PROMPTS))
    assert json.loads((folder / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"


def test_from_dir_reads_pad_token_from_config(ours, tmp_path):
    folder = ours.save(tmp_path / "tok")
    (folder / "tokenizer_config.json").unlink()
    assert CLIPTokenizer.from_dir(folder).pad_id == 49407
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    assert CLIPTokenizer.from_dir(folder).pad_id == 0
    assert CLIPTokenizer.from_dir(folder, pad_token="<|endoftext|>").pad_id == 49407
    with pytest.raises(TokenizerNotFound, match="no vocab.json"):
        CLIPTokenizer.from_dir(tmp_path / "missing")


# --- find_tokenizer --------------------------------------------------------------------------------------
def tiny_tokenizer(n_merges: int, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """A small vocabulary (bytes + n merges + specials) whose size tells where it was loaded from."""
    chars = list(tk.bytes_to_unicode().values())
    merges = [("a", chr(ord("b") + i)) for i in range(n_merges)]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """EASEL_CACHE in a temp folder and no hub, so that only the test's files can be found."""
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tk, "_from_hub", lambda kind: None)
    return tmp_path


def test_find_tokenizer_search_order(isolated, monkeypatch):
    root = isolated
    model = root / "model"  # diffusers folder
    tiny_tokenizer(1).save(model / "tokenizer")
    tiny_tokenizer(2, pad="!").save(model / "tokenizer_2")
    tiny_tokenizer(3).save(root / "explicit")
    tiny_tokenizer(4).save(tk.cache_dir("clip-l"))
    size = lambda tok: tok.vocab_size - 514  # noqa: E731 - the number of merges
    assert size(find_tokenizer(str(model), str(root / "explicit"))) == 3
    assert size(find_tokenizer(None, explicit=str(root / "explicit" / "vocab.json"))) == 3
    assert size(find_tokenizer(str(model))) == 1
    found = find_tokenizer(str(model), kind="openclip")
    assert size(found) == 2 and found.pad_token == "!"
    assert size(find_tokenizer(str(root / "elsewhere"))) == 4  # nothing beside the model: the cache
    openclip = find_tokenizer(None, kind="openclip")  # other kind's cache, this kind's pad
    assert size(openclip) == 4 and openclip.pad_token == "!"
    monkeypatch.setattr(tk, "_from_hub", lambda kind: tiny_tokenizer(5))
    tk.cache_dir("clip-l").joinpath("vocab.json").unlink()
    assert size(find_tokenizer(None)) == 5  # the hub is the last resort


def test_find_tokenizer_beside_a_single_file(isolated):
    ckpt = isolated / "models" / "sd_v1.5.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    tiny_tokenizer(6).save(ckpt.parent / "tokenizer")
    assert find_tokenizer(str(ckpt)).vocab_size == 514 + 6
    tiny_tokenizer(7).save(ckpt.parent / "sd_v1.5.tokenizer")
    assert find_tokenizer(str(ckpt)).vocab_size == 514 + 7


def test_find_tokenizer_explicit_gz_and_install(isolated, bpe_gz):
    tok = find_tokenizer(None, explicit=str(bpe_gz), kind="openclip")
    assert tok.vocab_size == 49408 and tok.pad_id == 0
    folder = install_bpe_gz(bpe_gz, kind="openclip")
    assert folder == tk.cache_dir("openclip") and (folder / "merges.txt").is_file()
    assert find_tokenizer(None, kind="openclip").pad_id == 0
    assert find_tokenizer(None, kind="clip-l").pad_id == 49407  # same files, CLIP-L's pad


def test_not_found_message_says_how_to_provide_one(isolated):
    with pytest.raises(TokenizerNotFound) as err:
        find_tokenizer(str(isolated / "model"), kind="openclip")
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    for needle in ("pip download --no-deps open_clip_torch", "bpe_simple_vocab_16e6.txt.gz", "easel tokenizer install",
                   "tokenizer_2", str(tk.cache_dir("openclip")), "huggingface_hub"):
        assert needle in msg
    with pytest.raises(TokenizerNotFound, match="is not a folder with vocab.json"):
        find_tokenizer(None, explicit=str(isolated / "nope"))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        find_tokenizer(None, kind="t5")


def test_install_into_the_cache_is_all_or_nothing(monkeypatch, tmp_path):
    """A failure half-way through writing (a full disk, a kill) leaves the old vocabulary, never half a new one."""
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path))
    old = tiny_tokenizer(5)
    tk.install(old)
    before = {p.name: p.read_bytes() for p in tk.cache_dir().iterdir()}

    def broken_save(self, folder):
        (Path(folder) / "vocab.json").write_text("{}")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tk.CLIPTokenizer, "save", broken_save)
    with pytest.raises(OSError):
        tk.install(tiny_tokenizer(9))
    assert {p.name: p.read_bytes() for p in tk.cache_dir().iterdir()} == before
    assert [p.name for p in tmp_path.joinpath("tokenizers").iterdir()] == ["clip-l"]  # no temp folder left
