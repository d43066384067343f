"""`easel inspect tokens`: the slots are the ones the prompt encoder fills."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from easel.inspect.tokens import content, pca_2d, prompt_slots, text_embeddings, token_table, tokens_figure, words
from easel.pipelines.conditioning import encode_weighted
from tests.conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    return make_tiny(tmp_path, "sd1")


def test_slots_frame_start_tokens_end_and_padding(tiny):
    slots = prompt_slots(tiny, "a red cat")
    tok = tiny.tokenizers[0]
    assert len(slots) == 77
    assert [s.kind for s in slots[:5]] == ["start", "token", "token", "token", "end"]
    assert [s.piece for s in slots[1:4]] == ["a", "red", "cat"]
    assert [s.id for s in slots[:5]] == [tok.bos_id, *tok.encode("a red cat"), tok.eos_id]
    assert {s.kind for s in slots[5:]} == {"pad"} and slots[-1].position == 76
    assert slots[2].key == "2:red"


def test_weights_break_and_long_prompts_make_chunks(tiny):
    slots = prompt_slots(tiny, "a (red:1.5) [cat] BREAK the dog")
    by_piece = {s.piece: s for s in content(slots)}
    assert by_piece["red"].weight == pytest.approx(1.5)
    assert by_piece["cat"].weight == pytest.approx(1 / 1.1)
    assert by_piece["the"].chunk == 1 and by_piece["the"].position == 78  # second chunk: 77 + start
    long = prompt_slots(tiny, " ".join(["cat"] * 80))
    assert len(long) == 154 and sum(s.kind == "token" for s in long) == 80


def test_words_merge_bpe_pieces(tiny):
    # "redcat" is no word of the tiny vocabulary: BPE splits it into pieces, which form one word
    slots = prompt_slots(tiny, "a redcat dog")
    ws = words(slots)
    assert [w for w, _ in ws] == ["a", "redcat", "dog"]
    assert len(ws[1][1]) > 1 and "".join(s.piece for s in ws[1][1]) == "redcat"


def test_context_rows_are_the_encoders_output(tiny):
    emb = text_embeddings(tiny, "a (red:1.3) cat")
    want = encode_weighted(tiny.model, tiny.tokenizers, "a (red:1.3) cat")["context"][0]
    assert np.allclose(emb["context"], want.numpy())
    table = tiny.model.text_encoders[0].text_model.embeddings.token_embedding.weight
    assert np.allclose(emb["token"][2], table[tiny.tokenizers[0].encode("red")[0]].detach().numpy())


def test_table_has_one_padding_row_per_chunk_and_clip_skip_cosines(tiny):
    rows = token_table(tiny, "a cat BREAK dog")
    assert [r["kind"] for r in rows] == ["start", "token", "token", "end", "pad", "start", "token", "end", "pad"]
    assert all(-1.0001 <= r["cos_clip_skip"] <= 1.0001 for r in rows)
    assert all(r["context_norm"] > 0 for r in rows)


def test_pca_finds_the_spread_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g).numpy() * 0.01
    x[:, 3] += np.linspace(-5, 5, 30)
    xy = pca_2d(x)
    assert xy.shape == (30, 2)
    assert abs(np.corrcoef(xy[:, 0], np.linspace(-5, 5, 30))[0, 1]) > 0.99


def test_figure_draws(tiny):
    img = tokens_figure(tiny, "a red cat")
    assert img.width > 400 and img.height > 200


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_layouts_give_the_same_slots_and_their_context_rows(tmp_path, family):
    loaded = make_tiny(tmp_path, family)
    slots = prompt_slots(loaded, "a red cat")
    assert [s.kind for s in slots[:5]] == ["start", "token", "token", "token", "end"] and len(slots) == 77
    assert slots[5].id == loaded.model.config.text_encoders[0].pad_token_id
    emb = text_embeddings(loaded, "a red cat")
    width = sum(e.hidden_size for e in loaded.model.config.text_encoders)  # SDXL: both encoders side by side
    assert emb["context"].shape == (77, width)
    assert len(token_table(loaded, "a red cat")) == 6
