"""CLIP text encoder: parity with transformers, key maps (HF 4/5, OpenCLIP), diffusers configs."""
import dataclasses
import math

import pytest
import torch
import transformers
from torch import nn

from easel.models.clip import CLIPTextModel
from easel.models.configs import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, CLIPTextConfig
from easel.weights import keys_clip

TINY = CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=998, eos_token_id=999,
                      pad_token_id=999)


def hf_model(cfg: CLIPTextConfig, seed: int = 0) -> nn.Module:
    """A transformers encoder with random weights (LayerNorms perturbed too), eager attention."""
    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPTextConfig(**keys_clip.diffusers_config(cfg), attn_implementation="eager")
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(model: nn.Module, cfg: CLIPTextConfig) -> CLIPTextModel:
    """Our encoder loaded strictly with the transformers model's state dict."""
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(keys_clip.from_hf(model.state_dict()), strict=True)
    return ours


def sample_ids(cfg: CLIPTextConfig, pad: int, seed: int = 1) -> torch.Tensor:
    """Rows of BOS, random tokens, EOS at different positions, then padding: (4, T)."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.max_position_embeddings
    ids = torch.randint(0, cfg.vocab_size - 2, (4, T), generator=g)
    ids[:, 0] = cfg.bos_token_id
    for row, end in enumerate((3, 7, T - 1, 10)):
        ids[row, end] = cfg.eos_token_id
        ids[row, end + 1:] = pad
    return ids


def test_state_dict_keys_are_transformers4_layout():
    ours = CLIPTextModel(dataclasses.replace(TINY, projection_dim=32)).state_dict()
    theirs = hf_model(dataclasses.replace(TINY, projection_dim=32)).state_dict()
    assert set(ours) == set(theirs) - {"text_model.embeddings.position_ids"}
    assert not any("position_ids" in k for k in ours)
    assert "text_projection" not in str(list(CLIPTextModel(TINY).state_dict()))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("projection_dim", [0, 32])
@pytest.mark.parametrize("pad", [999, 0])
def test_parity_with_transformers(act, projection_dim, pad):
    cfg = dataclasses.replace(TINY, hidden_act=act, projection_dim=projection_dim, pad_token_id=pad)
    theirs = hf_model(cfg)
    ours = ours_from(theirs, cfg)
    ids = sample_ids(cfg, pad)
    with torch.no_grad():
        out = theirs(input_ids=ids, output_hidden_states=True)
        final_ln = (theirs.text_model if projection_dim else theirs).final_layer_norm
        last, pooled = ours(ids, need_pooled=True)
        penult, _ = ours(ids, clip_skip=2)
        penult_raw, _ = ours(ids, clip_skip=2, final_norm=False)
        last_raw, none = ours(ids, final_norm=False)
    ref_pooled = out.text_embeds if projection_dim else out.pooler_output
    assert none is None
    assert pooled.shape == (4, projection_dim or cfg.hidden_size)
    for mine, ref in [(last, out.last_hidden_state), (pooled, ref_pooled), (penult_raw, out.hidden_states[-2]),
                      (penult, final_ln(out.hidden_states[-2])), (last_raw, out.hidden_states[-1])]:
        assert (mine - ref).abs().max() < 1e-4


def test_pooled_uses_first_eos_when_padding_repeats_it():
    cfg = TINY
    ours = CLIPTextModel(cfg).eval()
    ids = sample_ids(cfg, pad=cfg.eos_token_id)
    with torch.no_grad():
        last, pooled = ours(ids, need_pooled=True)
    assert torch.equal(pooled[0], last[0, 3]) and torch.equal(pooled[1], last[1, 7])


def test_layers_after_clip_skip_are_not_run():
    ours = CLIPTextModel(TINY).eval()
    calls = []
    for i, layer in enumerate(ours.text_model.encoder.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    ids = sample_ids(TINY, pad=0)
    ours(ids, clip_skip=2)
    assert calls == [0, 1]
    calls.clear()
    ours(ids, clip_skip=2, need_pooled=True)
    assert calls == [0, 1, 2]


def test_readable_input_errors():
    ours = CLIPTextModel(TINY)
    with pytest.raises(ValueError, match="exceed the encoder's 16 positions"):
        ours(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="clip_skip must be in 1..3"):
        ours(torch.zeros(1, 4, dtype=torch.long), clip_skip=4)
    with pytest.raises(ValueError, match="unknown CLIP hidden_act 'relu'"):
        CLIPTextModel(dataclasses.replace(TINY, hidden_act="relu"))


# --- transformers 4 / 5 keys, diffusers folders ----------------------------------------------------------
def test_from_hf_accepts_transformers4_and_5_keys():
    cfg = TINY
    t5 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**keys_clip.diffusers_config(cfg))).state_dict()
    assert not any(k.startswith("text_model.") for k in t5)  # transformers 5 drops the prefix
    t4 = {"text_model." + k: v for k, v in t5.items()}
    t4["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    expected = set(CLIPTextModel(cfg).state_dict())
    assert set(keys_clip.from_hf(t5)) == expected == set(keys_clip.from_hf(t4))
    with pytest.raises(ValueError, match="unexpected key 'vision_model.x'"):
        keys_clip.from_hf({"vision_model.x": torch.zeros(1)})


@pytest.mark.parametrize("projection_dim", [0, 32])
def test_diffusers_folder_written_by_us_loads_in_transformers(tmp_path, projection_dim):
    from safetensors.torch import save_file
    cfg = dataclasses.replace(TINY, hidden_act="gelu", projection_dim=projection_dim, pad_token_id=0)
    torch.manual_seed(0)
    ours = CLIPTextModel(cfg).eval()
    (tmp_path / "config.json").write_text(__import__("json").dumps(keys_clip.diffusers_config(cfg)))
    save_file(keys_clip.to_hf(ours.state_dict()), tmp_path / "model.safetensors")
    cls = transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel
    theirs = cls.from_pretrained(tmp_path).eval()
    ids = sample_ids(cfg, pad=0)
    with torch.no_grad():
        out = theirs(input_ids=ids)
        last, pooled = ours(ids, need_pooled=True)
    assert (last - out.last_hidden_state).abs().max() < 1e-4
    assert (pooled - (out.text_embeds if projection_dim else out.pooler_output)).abs().max() < 1e-4


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H, OPENCLIP_BIGG], ids=["clip-l", "openclip-h", "openclip-bigg"])
def test_full_size_keys_and_shapes_on_meta(cfg):
    with torch.device("meta"):
        ours = {k: v.shape for k, v in CLIPTextModel(cfg).state_dict().items()}
        hf_cfg = transformers.CLIPTextConfig(**keys_clip.diffusers_config(cfg))
        cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
        theirs = cls(hf_cfg).state_dict()
    mapped = keys_clip.from_hf(theirs)
    assert {k: v.shape for k, v in mapped.items()} == ours
    back = keys_clip.to_hf(mapped)
    expected = {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k
                for k in theirs if not k.endswith("position_ids")}
    assert set(back) == expected


def fake_openclip(cfg: CLIPTextConfig, device: str = "meta", seed: int = 0) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower state dict with the shapes SD2 / SDXL checkpoints hold."""
    g = torch.Generator().manual_seed(seed)
    C, F, P = cfg.hidden_size, cfg.intermediate_size, cfg.projection_dim
    shapes = {"token_embedding.weight": (cfg.vocab_size, C), "positional_embedding": (cfg.max_position_embeddings, C),
              "ln_final.weight": (C,), "ln_final.bias": (C,), "text_projection": (C, P), "logit_scale": ()}
    for i in range(cfg.num_hidden_layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "attn.in_proj_weight": (3 * C, C), b + "attn.in_proj_bias": (3 * C,),
                       b + "attn.out_proj.weight": (C, C), b + "attn.out_proj.bias": (C,),
                       b + "ln_1.weight": (C,), b + "ln_1.bias": (C,), b + "ln_2.weight": (C,), b + "ln_2.bias": (C,),
                       b + "mlp.c_fc.weight": (F, C), b + "mlp.c_fc.bias": (F,),
                       b + "mlp.c_proj.weight": (C, F), b + "mlp.c_proj.bias": (C,)})
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("cfg", [OPENCLIP_H, OPENCLIP_BIGG], ids=["openclip-h", "openclip-bigg"])
def test_from_openclip_covers_full_size_model_on_meta(cfg):
    sd = fake_openclip(cfg)
    mapped, dropped = keys_clip.from_openclip(sd, cfg)
    with torch.device("meta"):
        ours = {k: v.shape for k, v in CLIPTextModel(cfg).state_dict().items()}
    assert {k: v.shape for k, v in mapped.items()} == ours
    assert set(dropped) == {"logit_scale"}
    back = keys_clip.to_openclip(mapped, cfg)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items() if k != "logit_scale"}


def test_openclip_round_trip_is_bit_exact():
    cfg = dataclasses.replace(TINY, hidden_act="gelu", projection_dim=48)
    sd = fake_openclip(cfg, device="cpu")
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    mapped, dropped = keys_clip.from_openclip(sd, cfg)
    CLIPTextModel(cfg).load_state_dict(mapped, strict=True)
    back = keys_clip.to_openclip(mapped, cfg, extra=dropped)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(v.is_contiguous() for v in mapped.values())


def test_from_openclip_errors_name_the_problem():
    cfg = dataclasses.replace(TINY, hidden_act="gelu", projection_dim=48)
    sd = fake_openclip(cfg)
    with pytest.raises(ValueError, match="missing.*resblocks.3"):
        keys_clip.from_openclip(sd, dataclasses.replace(cfg, num_hidden_layers=4))
    with pytest.raises(ValueError, match="unexpected.*cond_stage_model"):
        keys_clip.from_openclip({**sd, "cond_stage_model.model.ln_final.bias": sd["ln_final.bias"]}, cfg)
    # A projection-free config (diffusers' SD2 encoder) keeps the projection aside instead of failing.
    mapped, dropped = keys_clip.from_openclip(sd, dataclasses.replace(cfg, projection_dim=0))
    assert set(dropped) == {"logit_scale", "text_projection"} and "text_projection.weight" not in mapped


def openclip_reference(sd: dict[str, torch.Tensor], cfg: CLIPTextConfig, ids: torch.Tensor):
    """OpenCLIP's text tower written with torch's fused-qkv nn.MultiheadAttention: (penultimate+ln, pooled)."""
    C, T = cfg.hidden_size, ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:T]
    mask = torch.full((T, T), float("-inf")).triu(1)
    ln = lambda x, p: nn.functional.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    outs = []
    for i in range(cfg.num_hidden_layers):
        b = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(C, cfg.num_attention_heads, batch_first=True)
        attn.load_state_dict({k[len(b + "attn."):]: v for k, v in sd.items() if k.startswith(b + "attn.")})
        h = ln(x, b + "ln_1")
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = nn.functional.linear(ln(x, b + "ln_2"), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + nn.functional.linear(nn.functional.gelu(h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        outs.append(x)
    final = ln(outs[-1], "ln_final")
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]  # EOS has the top id
    return ln(outs[-2], "ln_final"), pooled


def test_from_openclip_matches_an_openclip_style_forward():
    cfg = dataclasses.replace(TINY, hidden_act="gelu", projection_dim=48, pad_token_id=0)
    sd = fake_openclip(cfg, device="cpu")
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(keys_clip.from_openclip(sd, cfg)[0], strict=True)
    ids = sample_ids(cfg, pad=0)
    with torch.no_grad():
        ref_hidden, ref_pooled = openclip_reference(sd, cfg, ids)
        _, pooled = ours(ids, need_pooled=True)
        hidden, _ = ours(ids, clip_skip=2)
    assert (hidden - ref_hidden).abs().max() < 1e-4
    assert (pooled - ref_pooled).abs().max() < 1e-4


def test_drop_last_layers_equals_clip_skip_2():
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=24,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu", projection_dim=32,
                         bos_token_id=998, eos_token_id=999, pad_token_id=0)
    torch.manual_seed(0)
    full = CLIPTextModel(cfg).eval()
    sd, cfg23 = keys_clip.drop_last_layers(full.state_dict(), cfg, 1)
    assert cfg23.num_hidden_layers == 23 and cfg23.projection_dim == 0
    short = CLIPTextModel(cfg23).eval()
    short.load_state_dict(sd, strict=True)
    ids = sample_ids(cfg, pad=0)
    with torch.no_grad():
        for final_norm in (True, False):
            assert torch.equal(full(ids, clip_skip=2, final_norm=final_norm)[0],
                               short(ids, clip_skip=1, final_norm=final_norm)[0])
    with pytest.raises(ValueError, match="can drop 0..23"):
        keys_clip.drop_last_layers(sd, cfg, 24)


# --- diffusers config.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H, OPENCLIP_BIGG, TINY], ids=["l", "h", "bigg", "tiny"])
def test_diffusers_config_round_trip(cfg):
    d = keys_clip.diffusers_config(cfg, torch_dtype="float16")
    assert d["model_type"] == "clip_text_model" and d["torch_dtype"] == "float16"
    assert d["architectures"] == ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
    assert keys_clip.config_from_diffusers(d) == cfg
    assert keys_clip.config_from_diffusers(d, pad_token_id=5).pad_token_id == 5
    hf = transformers.CLIPTextConfig(**d)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.hidden_act) == (cfg.hidden_size, cfg.num_hidden_layers,
                                                                    cfg.hidden_act)


def test_config_from_real_diffusers_configs():
    # Abridged text_encoder/config.json of the SD1.5, SD2.1 and SDXL (text_encoder_2) hub folders.
    sd15 = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
            "layer_norm_eps": 1e-05, "model_type": "clip_text_model", "torch_dtype": "float32"}
    sd21 = {**sd15, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
    sdxl2 = {**sd21, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
             "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
    assert keys_clip.config_from_diffusers(sd15) == CLIP_L
    assert keys_clip.config_from_diffusers(sd21) == dataclasses.replace(OPENCLIP_H, num_hidden_layers=23,
                                                                         projection_dim=0)
    assert keys_clip.config_from_diffusers(sdxl2) == OPENCLIP_BIGG
    assert keys_clip.config_from_diffusers(sdxl2, pad_token_id=49407).pad_token_id == 49407
