"""`easel inspect clip`: the text-text matrix of a CLIP text tower, and the image-text matrix with an image tower."""
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


# --- the image tower: the image-text matrix ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tower_file(builtin, tmp_path_factory):
    """An image tower fitted for two steps to the built-in model's text encoder."""
    from easel.training.clip_image_tower import fit, save_tower
    from easel.training.common import LoopConfig
    from easel.training.presets import VISION_PRESETS
    work = tmp_path_factory.mktemp("tower")
    loop = LoopConfig(steps=2, batch_size=8, warmup=1, ema_decay=None, progress=False)
    model, metrics = fit(builtin.loaded, VISION_PRESETS["shapeworld"], work, loop, eval_n=16)
    return save_tower(model, work / "tower.safetensors", builtin.loaded.hash, VISION_PRESETS["shapeworld"], metrics)


def test_fitting_leaves_the_text_encoder_bit_identical(builtin, tower_file):
    from safetensors.torch import load_file
    from easel.weights.registry import BUILTIN_FILE
    prefix = "cond_stage_model.transformer."
    shipped = {k[len(prefix):]: v for k, v in load_file(str(BUILTIN_FILE)).items() if k.startswith(prefix)}
    live = builtin.loaded.model.text_encoders[0].state_dict()
    assert set(shipped) == set(live)
    assert all(torch.equal(shipped[k].float(), live[k].float()) for k in live)
    assert not any(k.startswith("text.") for k in load_file(str(tower_file)))


def test_image_text_matrix_is_the_cosine_of_both_towers(builtin, tower_file):
    from easel.training.clip import tokenize_short
    model = cl.image_tower(str(tower_file), builtin.loaded)
    captions, columns = cl.caption_batch(3, seed=2, images=True)
    images = cl.renders(3, 2, 64)
    sims = cl.image_text_matrix(model, builtin.loaded.tokenizers[0], images, columns)
    assert [c.text for c in columns if c.kind == "same"] == captions  # the images' own captions, not paraphrases
    with torch.no_grad():
        img = F.normalize(model.vision(images), dim=-1)
        ids = tokenize_short(builtin.loaded.tokenizers[0], [c.text for c in columns])
        txt = F.normalize(model.text_projection(model.text(ids, clip_skip=1, need_pooled=True)[1]), dim=-1)
    assert np.allclose(sims, (img @ txt.T).numpy(), atol=1e-5)


def test_cli_with_an_image_tower_writes_the_matrix_and_nearest_captions(tmp_path, capsys, tower_file, monkeypatch):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "clip"
    assert main(["inspect", "clip", "--count", "4", "--image-tower", str(tower_file), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "each image's own caption" in printed and "image 4 (" in printed
    with np.load(out / "clip.npz") as npz:
        assert npz["similarity"].shape == (4, len(npz["columns"]))
    assert Image.open(out / "nearest.png").width > 400


def test_a_tower_of_another_model_or_no_tower_is_refused(builtin, tower_file, tmp_path):
    from easel.training.clip_image_tower import load_tower
    from easel.weights.load import write_safetensors
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file
    from easel.training.clip_image_tower import tower_metadata
    write_safetensors(load_file(str(tower_file)), other, metadata={**tower_metadata(tower_file),
                                                                   "text_model_hash": "0" * 64})
    with pytest.raises(ValueError, match="fitted to the text encoder of model 0000000000"):
        load_tower(other, builtin.loaded)
    plain = tmp_path / "plain.safetensors"
    write_safetensors({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="is not an easel CLIP image tower"):
        load_tower(plain, builtin.loaded)
    with pytest.raises(FileNotFoundError, match="no CLIP image tower"):
        load_tower(tmp_path / "missing.safetensors", builtin.loaded)


def test_the_builtin_model_ships_a_tower_fitted_to_it(builtin):
    """The shipped tower belongs to the shipped text encoder (a retrained model needs a refitted tower)."""
    from easel.training.clip_image_tower import builtin_tower_path, tower_metadata
    assert builtin_tower_path().is_file(), "fit it: python3 -m easel.training.clip_image_tower --minutes 8"
    assert tower_metadata(builtin_tower_path())["text_model_hash"] == builtin.loaded.hash
    assert cl.image_tower(None, builtin.loaded) is not None
