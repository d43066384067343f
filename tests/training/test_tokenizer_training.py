"""The BPE trainer: CLIP's file format, one token per caption word, same ids as transformers' CLIPTokenizer."""
from __future__ import annotations

import json

import pytest

from easel.text.tokenizer import CLIPTokenizer
from easel.training.tokenizer import check_single_tokens, train_bpe, train_tokenizer
from easel.world.captions import caption_corpus, vocabulary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return folder, train_tokenizer(folder, n_captions=800)


def test_format_is_clips(trained):
    folder, tok = trained
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == len(tok.merges)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab))) and len(vocab) < 1000
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes with end-of-word


def test_every_caption_word_is_one_token_and_round_trips(trained):
    folder, _ = trained
    tok = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert check_single_tokens(tok, vocabulary()) == []
    for text in caption_corpus(50, seed=10**6):  # captions the trainer never saw
        ids = tok.encode(text)
        assert len(ids) == len(text.replace(",", " , ").split())
        assert tok.decode(ids).replace(" ,", ",") == text


def test_same_ids_as_transformers(trained):
    transformers = pytest.importorskip("transformers")
    folder, tok = trained
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))  # reads vocab.json + merges.txt
    texts = caption_corpus(30, seed=555) + ["A Red STAR, left of two circles!", "unknown words like zebra"]
    for text in texts:
        assert ref(text)["input_ids"] == [tok.bos_id, *tok.encode(text), tok.eos_id], text


def test_merges_are_deterministic_and_stop_when_words_are_whole():
    corpus = ["red star", "red stars", "a red star"]
    vocab_a, merges_a = train_bpe(corpus)
    vocab_b, merges_b = train_bpe(list(reversed(corpus)))
    assert merges_a == merges_b and vocab_a == vocab_b
    assert {"red</w>", "star</w>", "stars</w>", "a</w>"} <= set(vocab_a)
    # red: 2 merges; star: 3; stars: 2 more (it shares "sta"); "a</w>" is a byte symbol already
    assert merges_a == [("e", "d</w>"), ("r", "ed</w>"), ("s", "t"), ("st", "a"), ("sta", "r</w>"),
                        ("r", "s</w>"), ("sta", "rs</w>")]
