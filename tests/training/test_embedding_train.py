"""`easel train embedding`: only the new word's vectors change (one encoder, and SDXL's two), they start from the
init word, the A1111 file (.safetensors / .pt) loads by name, and a prompt naming it is encoded exactly as training
encoded its captions."""
from __future__ import annotations

import pytest
import torch

from easel.pipelines.conditioning import encode_weighted
from easel.training.common import LoopConfig, TrainingError
from easel.training.dataset_folder import DataOptions, UserDataset
from easel.training.embedding_train import (EmbeddingRun, EmbeddingVectors, encode_text, inputs_embeds, name_caption,
                                            slot_ids, train_embedding)
from easel.weights.embeddings import EmbeddingLibrary, load_embedding
from tests.conftest import make_tiny
from tests.training.user_data import make_folder


def tiny_run(tmp_path, base, out="zq.safetensors", steps=3, **kw) -> EmbeddingRun:
    ds = UserDataset(make_folder(tmp_path / "data", 4), DataOptions(resolution=32))
    loop = LoopConfig(steps=steps, batch_size=2, lr=5e-2, warmup=0, weight_decay=0.0, ema_decay=None,
                      ckpt_every=100, log_every=1, progress=False)
    return EmbeddingRun(ds, base, tmp_path / "emb" / out, tmp_path / "run", loop, kw.pop("name", "zq"),
                        kw.pop("init_word", "red"), **kw)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_the_new_vectors_change(tmp_path, family):
    base = make_tiny(tmp_path, family)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    run = tiny_run(tmp_path, base, num_vectors=2)
    train_embedding(run)
    assert all(torch.equal(base.model.state_dict()[k], v) for k, v in before.items())
    emb = load_embedding(run.out)
    assert emb.name == "zq" and emb.num_vectors == 2
    init = EmbeddingVectors(base, "red", 2).embedding("zq")
    assert emb.vectors.keys() == init.vectors.keys() == ({"*"} if family == "sd1" else {"clip_l", "clip_g"})
    red = base.tokenizers[0].encode("red")[0]
    table = base.model.text_encoders[0].text_model.embeddings.token_embedding.weight
    assert torch.equal(next(iter(init.vectors.values()))[0], table[red])  # started from the init word
    for key, v in emb.vectors.items():
        assert not torch.equal(v, init.vectors[key]) and torch.isfinite(v).all()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompts_use_the_saved_embedding_as_training_did(tmp_path, family):
    base = make_tiny(tmp_path, family)
    run = tiny_run(tmp_path, base, steps=1, num_vectors=3)
    train_embedding(run)
    library = EmbeddingLibrary([run.out.parent])
    emb = library.get("zq")
    caption = "a photo of zq, big"
    ids, slots = slot_ids(base, [caption], emb)
    assert [int((s >= 0).sum()) for s in slots] == [3] * len(slots)
    vectors = EmbeddingVectors(base, "red", 3)
    with torch.no_grad():
        for p, v in zip(vectors.vectors, emb.vectors.values()):
            p.copy_(v)
        context, pooled = encode_text(base, ids, inputs_embeds(base, vectors, ids, slots))
    ours = encode_weighted(base.model, base.tokenizers, caption, library=library)
    torch.testing.assert_close(ours["context"], context, rtol=0, atol=0)
    if pooled is not None:
        torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)


def test_pt_format_and_captions_without_the_name(tmp_path):
    base = make_tiny(tmp_path, "sd1")
    run = tiny_run(tmp_path, base, out="zq.pt", steps=1)
    train_embedding(run)
    data = torch.load(run.out, weights_only=True)
    assert data["name"] == "zq" and data["string_to_param"]["*"].shape == (1, 32) and data["step"] == 1
    assert load_embedding(run.out).num_vectors == 1
    assert name_caption("a red circle", "zq") == "zq, a red circle"
    assert name_caption("a ZQ circle", "zq") == "a ZQ circle" and name_caption("", "zq") == "zq"
    assert name_caption("zqx", "zq") == "zq, zqx"


def test_bad_settings_are_one_line(tmp_path):
    base = make_tiny(tmp_path, "sd1")
    with pytest.raises(TrainingError, match="--init-word ' ' has no tokens"):
        train_embedding(tiny_run(tmp_path, base, init_word=" "))
    with pytest.raises(TrainingError, match="--name 'two words'"):
        train_embedding(tiny_run(tmp_path, base, name="two words"))
    with pytest.raises(TrainingError, match="--vectors must be in 1..75"):
        train_embedding(tiny_run(tmp_path, base, num_vectors=0))


def test_cli(tmp_path, capsys):
    from easel.cli import main
    from easel.weights.model_io import save_model
    model = save_model(make_tiny(tmp_path / "m", "sd1"), tmp_path / "tiny.safetensors")
    data = make_folder(tmp_path / "data", 4)
    out = tmp_path / "zq.safetensors"
    assert main(["train", "embedding", str(data), "--model", str(model), "--name", "zq", "--init-word", "red",
                 "--vectors", "2", "--steps", "2", "--batch-size", "2", "--no-progress", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and load_embedding(out).num_vectors == 2
    assert (tmp_path / "zq_run" / "loss.png").exists()
    assert main(["train", "embedding", str(data), "--model", str(model), "--name", "zq", "--init-word", "red",
                 "--out", str(tmp_path / "zq.bin")]) == 2
    assert "must end in .safetensors or .pt" in capsys.readouterr().err
