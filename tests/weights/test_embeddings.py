"""Textual-inversion files: every layout people have, the safe unpickler, the library, the model's override."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tests.weights.test_load import RunsCode
from easel.weights.embeddings import Embedding, EmbeddingError, EmbeddingLibrary, load_embedding
from easel.weights.load import UnsafeCheckpointError


def vecs(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_a1111_pt(tmp_path):
    v = vecs(3)
    path = tmp_path / "mystyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v.clone())},
                "name": "other-name", "step": 500, "sd_checkpoint_name": "x"}, path)
    emb = load_embedding(path)
    assert emb.name == "mystyle" and emb.num_vectors == 3
    assert torch.equal(emb.vectors["*"], v) and not emb.vectors["*"].requires_grad


def test_a1111_bin_one_vector_1d(tmp_path):
    path = tmp_path / "one.bin"
    torch.save({"string_to_param": {"*": vecs(1)[0]}}, path)  # (D,) is one vector
    assert load_embedding(path).vectors["*"].shape == (1, 32)


def test_safetensors_emb_params(tmp_path):
    v = vecs(2)
    save_file({"emb_params": v}, str(tmp_path / "neg.safetensors"))
    emb = load_embedding(tmp_path / "neg.safetensors")
    assert emb.name == "neg" and torch.equal(emb.vectors["*"], v)


def test_sdxl_clip_l_clip_g(tmp_path):
    l, g = vecs(2, 32, 1), vecs(2, 48, 2)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xl.safetensors"))
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(emb.for_encoder(0, 2, 32), l) and torch.equal(emb.for_encoder(1, 2, 48), g)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("shape", [(32,), (4, 32)])
def test_diffusers_learned_embeds(tmp_path, suffix, shape):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".bin":
        torch.save({"<cat-toy>": v}, path)
    else:
        save_file({"<cat-toy>": v}, str(path))
    emb = load_embedding(path)
    assert emb.vectors["*"].shape == (1 if len(shape) == 1 else shape[0], 32)
    assert torch.equal(emb.vectors["*"].flatten(), v.flatten())


def test_unsafe_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": RunsCode(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt.*refused"):
        load_embedding(path)
    assert not marker.exists()


def test_not_an_embedding(tmp_path):
    save_file({"a": vecs(1), "b": vecs(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "lora.safetensors")
    with pytest.raises(EmbeddingError, match="unknown embedding format"):
        (tmp_path / "x.png").write_bytes(b"\x89PNG")
        load_embedding(tmp_path / "x.png")


def test_width_and_family_errors():
    sd1 = Embedding("style1", {"*": vecs(2, 768)})
    with pytest.raises(EmbeddingError, match=r"'style1'.*width 768.*1024 wide"):
        sd1.for_encoder(0, 1, 1024)
    with pytest.raises(EmbeddingError, match=r"'style1'.*clip_l \+ clip_g"):
        sd1.for_encoder(0, 2, 768)
    xl = Embedding("xl", {"clip_l": vecs(2, 768), "clip_g": vecs(2, 1280)})
    with pytest.raises(EmbeddingError, match=r"'xl' is an SDXL embedding"):
        xl.for_encoder(0, 1, 768)
    with pytest.raises(EmbeddingError, match=r"'xl' \(clip_g\).*width 1280.*1024 wide"):
        xl.for_encoder(1, 2, 1024)


def test_library_finds_by_stem_first_dir_wins(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b" / "sub"
    b.mkdir(parents=True)
    a.mkdir()
    save_file({"emb_params": vecs(1, seed=1)}, str(a / "style.safetensors"))
    save_file({"emb_params": vecs(2, seed=2)}, str(b / "style.safetensors"))
    save_file({"emb_params": vecs(3, seed=3)}, str(b / "other.safetensors"))
    (b / "notes.txt").write_text("not an embedding")
    lib = EmbeddingLibrary([a, tmp_path / "b", tmp_path / "missing"])
    assert lib.names() == ["other", "style"]
    assert lib.get("style").num_vectors == 1 and lib.get("other").num_vectors == 3
    assert lib.get("nope") is None and "other" in lib and "nope" not in lib
    save_file({"emb_params": vecs(4)}, str(a / "late.safetensors"))  # a new file is seen without a restart
    os.utime(a, (1, 1))  # a folder mtime can stay put within one clock tick: force a change
    assert lib.get("late").num_vectors == 4
    monkeypatch.setenv("EASEL_EMBEDDING_DIRS", f"{a}{os.pathsep}{tmp_path / 'b'}")
    env_lib = EmbeddingLibrary()
    assert env_lib.dirs[:2] == [a, tmp_path / "b"] and env_lib.get("other") is not None


def test_clip_inputs_embeds_override():
    from easel.models.clip import CLIPTextModel
    from easel.models.configs import CLIPTextConfig
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, bos_token_id=48, eos_token_id=49, pad_token_id=49, projection_dim=16)
    enc = CLIPTextModel(cfg).eval()
    ids = torch.tensor([[48, 5, 6, 7, 49, 49]])
    base = enc(ids, need_pooled=True)
    same = enc(ids, need_pooled=True, inputs_embeds=enc.text_model.embeddings.token_embedding(ids))
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    emb = enc.text_model.embeddings.token_embedding(ids).clone()
    emb[0, 2] = torch.randn(32)
    h, _ = enc(ids, inputs_embeds=emb)
    assert torch.equal(h[0, :2], base[0][0, :2])  # causal: tokens before the replaced one do not change
    assert not torch.allclose(h[0, 2:], base[0][0, 2:])
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        enc(ids, inputs_embeds=emb[:, :3])
