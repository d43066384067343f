"""Training the bilingual model: the tokenizer extended without moving English ids, Chinese characters as tokens,
text-encoder rows remapped, bilingual CLIP batches and losses, per-prefix learning rates, and the warm start of
`easel train all --init-from` (VAE copied, vocabulary in the metadata, the image tower beside the model)."""
from __future__ import annotations

import json

import numpy as np
import torch

from easel.text.tokenizer import CLIPTokenizer
from easel.training.tokenizer import extend_tokenizer, train_bpe
from easel.world.captions import caption_corpus, parse_caption, vocabulary


def english_tokenizer() -> CLIPTokenizer:
    vocab, merges = train_bpe(caption_corpus(300) + vocabulary())
    return CLIPTokenizer(vocab, merges)


def test_extending_the_tokenizer_keeps_every_english_id_and_adds_chinese_characters(tmp_path):
    old = english_tokenizer()
    new, moved = extend_tokenizer(old, vocabulary("zh"))
    assert all(new.vocab[t] == i for t, i in old.vocab.items() if i < old.vocab_size - 2)  # ordinary tokens stay
    assert (new.bos_id, new.eos_id) == (new.vocab_size - 2, new.vocab_size - 1)  # the specials move to the end
    assert moved == {old.bos_id: new.bos_id, old.eos_id: new.eos_id}
    for text in caption_corpus(200, seed=5):
        assert new.encode(text) == old.encode(text)
    chars = sorted(set("".join(vocabulary("zh"))))
    assert all(len(new.encode(c)) == 1 for c in chars)
    assert len(new.encode("三个红色的星星")) == 7  # one token per character
    new.save(tmp_path / "tok")
    again = CLIPTokenizer.from_dir(tmp_path / "tok")
    assert again.split_cjk and again.encode("三个红色的星星") == new.encode("三个红色的星星")


def test_without_the_chinese_split_a_sentence_is_one_word():
    tok = english_tokenizer()
    assert not tok.split_cjk  # CLIP's own behaviour stays the default (HF parity)
    assert len(tok.tokenize("三个 红色")) > 2 and tok.tokenize("红色") != tok.tokenize("红 色")


def test_token_rows_follow_their_tokens():
    from easel.training.all import remap_token_rows
    old = english_tokenizer()
    new, _ = extend_tokenizer(old, vocabulary("zh"))
    rows = torch.randn(old.vocab_size, 8)
    out = remap_token_rows({"emb.token_embedding.weight": rows, "other": torch.ones(2)}, old, new)
    table = out["emb.token_embedding.weight"]
    assert table.shape == (new.vocab_size, 8) and torch.equal(out["other"], torch.ones(2))
    for token, i in old.vocab.items():
        assert torch.equal(table[new.vocab[token]], rows[i])
    fresh = table[old.vocab_size - 2:new.vocab_size - 2]
    assert abs(float(fresh.mean()) - float(rows.mean())) < 0.5 and not torch.isnan(fresh).any()


def test_bilingual_clip_batches_and_losses():
    from easel.training.clip import BILINGUAL_MIX, ContrastiveCLIP, clip_step, make_batch
    from easel.training.common import DistInfo
    from easel.training.presets import TINY_TEXT, TINY_VISION, text_config_for
    from easel.training.tokenizer import shapeworld_corpus
    vocab, merges = train_bpe(shapeworld_corpus(300))
    tok = CLIPTokenizer(vocab, merges, split_cjk=True)
    batch = make_batch(0, 32, 32, 0, DistInfo(), BILINGUAL_MIX)
    zh = [c for c in batch.captions if any("\u4e00" <= ch <= "\u9fff" for ch in c)]
    assert 5 < len(zh) < 27 and len(batch.twins) == 32
    assert all(parse_caption(c) == parse_caption(t) for c, t in zip(batch.captions, batch.twins))
    assert sum(parse_caption(c).relation is not None for c in batch.captions) >= 8  # relations drawn more often
    assert [k >= 0 for k in batch.flip_slot] == [parse_caption(c).relation is not None for c in batch.captions]
    torch.manual_seed(0)
    model = ContrastiveCLIP(text_config_for(TINY_TEXT, tok.vocab_size), TINY_VISION)
    loss, metrics = clip_step(model, tok, batch, torch.device("cpu"), BILINGUAL_MIX)
    assert torch.isfinite(loss) and metrics["align_mse"] > 0 and metrics["flip_loss"] > 0
    loss.backward()
    assert model.text.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0  # the text tower learns from both
    with torch.no_grad():
        plain, _ = clip_step(model, tok, batch, torch.device("cpu"))
    assert float(plain) < float(loss.detach())  # the flip and alignment terms add to the contrastive loss


def test_learning_rate_scale_per_parameter_prefix(tmp_path):
    from easel.training.common import LoopConfig, Trainer
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    trainer = Trainer("t", tmp_path, model, LoopConfig(steps=1, lr=1.0, warmup=1, progress=False),
                      lr_scale={"0.": 0.25})
    trainer.run(lambda step: (model(torch.ones(1, 2)).sum(), {}))
    lrs = {round(g["lr"], 4) for g in trainer.opt.param_groups}
    assert lrs == {1.0, 0.25}
    assert {id(p) for g in trainer.opt.param_groups if g["lr_scale"] == 0.25 for p in g["params"]} == \
        {id(p) for p in model[0].parameters()}


def test_train_all_warm_starts_from_a_model(tmp_path):
    from safetensors import safe_open

    from easel.pipelines.conditioning import model_vocabulary
    from easel.training.cli import main
    from easel.weights.model_io import load_model
    common = ["--preset", "tiny", "--clip-steps", "2", "--vae-steps", "2", "--unet-steps", "2", "--latents", "64",
              "--captions", "300", "--no-judge", "--no-progress", "--threads", "1"]
    assert main(["all", "--out", str(tmp_path / "v1"), *common]) == 0
    v1 = tmp_path / "v1" / "shapeworld.safetensors"
    assert main(["all", "--out", str(tmp_path / "v2"), "--init-from", str(v1), *common]) == 0
    old, new = load_model(v1), load_model(tmp_path / "v2" / "shapeworld.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(old.model.vae.state_dict().values(),
                                                  new.model.vae.state_dict().values()))  # the VAE is copied
    t_old, t_new = old.tokenizers[0], new.tokenizers[0]
    assert t_new.split_cjk and all(t_new.vocab[t] == i for t, i in t_old.vocab.items() if i < t_old.vocab_size - 2)
    assert model_vocabulary(str(tmp_path / "v2" / "shapeworld.safetensors"))["zh"] == vocabulary("zh")
    from easel.pipelines.preview import LATENT_RGB_KEY
    with safe_open(str(tmp_path / "v2" / "shapeworld.safetensors"), "pt") as f:
        assert LATENT_RGB_KEY in f.metadata()  # the preview map ships inside the model
    done = json.loads((tmp_path / "v2" / "vae" / "done.json").read_text())
    assert done["metrics"]["copied_from"] == str(v1) and "init" in done["inputs"]
    with safe_open(str(tmp_path / "v2" / "clip_vision.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("text.")] and "text_projection.weight" in f.keys()
        assert f.metadata()["kind"] == "easel-clip-image-tower"
    metrics = json.loads((tmp_path / "v2" / "clip" / "metrics.json").read_text())
    assert "raw_zh_hardneg_relation" in metrics and np.isfinite(metrics["raw_hardneg_relation"])


def test_language_distillation_trains_the_text_encoder_and_reassembles(tmp_path):
    from safetensors.torch import load_file

    from easel.training import bilingual
    from easel.training.cli import main
    from easel.weights.model_io import load_model
    common = ["--preset", "tiny", "--clip-steps", "2", "--vae-steps", "2", "--unet-steps", "2", "--latents", "64",
              "--captions", "300", "--no-judge", "--no-progress", "--threads", "1"]
    assert main(["all", "--out", str(tmp_path), *common]) == 0
    before = load_model(tmp_path / "shapeworld.safetensors").model.text_encoders[0].state_dict()
    assert bilingual.main(["--out", str(tmp_path), "--steps", "3", "--preset", "tiny", "--lr", "1e-2"]) == 0
    distilled = load_file(str(tmp_path / "bilingual" / "text_encoder.safetensors"))
    after = load_model(tmp_path / "shapeworld.safetensors").model.text_encoders[0].state_dict()
    assert all(torch.equal(after[k].float(), v) for k, v in distilled.items())  # the model now has it
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and it learnt
    log = [json.loads(line) for line in (tmp_path / "bilingual" / "log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["match"]) and np.isfinite(r["keep"]) for r in log)
