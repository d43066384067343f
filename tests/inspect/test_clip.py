"""`easel inspect clip`: the text-text similarity matrix of the built-in model's CLIP text tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import easel
from easel.cli import main
from easel.inspect import clip as cl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def builtin():
    return easel.load(None)


def test_matrix_is_the_cosine_of_the_towers_outputs(builtin):
    """Each cell equals the cosine of two pooled outputs, each text encoded alone in its full 77-token frame."""
    captions, columns = cl.caption_batch(3, seed=1)
    encoder, tok = builtin.loaded.model.text_encoders[0], builtin.loaded.tokenizers[0]
    sims = cl.similarity_matrix(encoder, tok, captions, columns)
    cfg = builtin.loaded.model.config.text_encoders[0]

    def pooled(text):
        ids = tok([text], max_length=cfg.max_position_embeddings, pad_id=cfg.pad_token_id)
        with torch.no_grad():
            return encoder(ids, clip_skip=1, need_pooled=True)[1][0].float()

    direct = np.array([[float(F.cosine_similarity(pooled(r), pooled(c.text), dim=0)) for c in columns]
                       for r in captions])
    assert sims.shape == (3, len(columns)) and len(columns) > 6
    assert np.allclose(sims, direct, atol=1e-4)


def test_gallery_holds_a_paraphrase_and_hard_negatives_of_every_kind():
    captions, columns = cl.caption_batch(4, seed=0)
    kinds = {c.kind for c in columns}
    assert kinds == {"same", "colour", "shape", "relation", "count"}
    assert [c.owner for c in columns if c.kind == "same"] == [0, 1, 2, 3]
    assert all(c.text != captions[c.owner] for c in columns if c.kind != "same")


def test_retrieval_counts_hard_negatives_only_when_asked():
    cols = [cl.Column("a", 0, "same"), cl.Column("a'", 0, "colour"), cl.Column("b", 1, "same")]
    sims = np.array([[0.9, 0.95, 0.1], [0.2, 0.1, 0.8]])
    scores = cl.retrieval(sims, cols)
    assert scores["top1"] == 1.0 and scores["top1_with_negatives"] == 0.5 and scores["beats_colour"] == 0.0


def test_cli_writes_the_matrix_and_prints_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "clip"
    assert main(["inspect", "clip", "--count", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 retrieval" in printed and "hard negatives" in printed
    with np.load(out / "clip.npz") as npz:
        assert npz["similarity"].shape == (4, len(npz["columns"]))
    assert Image.open(out / "clip.png").width > 400


def test_count_below_two_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "clip", "--count", "1", "-o", str(tmp_path / "c")]) != 0
    assert "--count must be at least 2" in capsys.readouterr().err
