"""LoRA files: every format loads and applies exactly, unload is bit-exact, problems are reported; diffusers parity."""
import logging
import os

import pytest
import torch

from tests.conftest import make_tiny
from easel.models.unet import sdxl_vector
from easel.weights import keys_unet, lora_keys
from easel.weights.load import read_state_dict, write_safetensors
from easel.weights.lora import (BUILTIN_LORA_DIR, LoraError, LoraNotFound, apply_loras, find_lora, list_loras,
                                lora_dirs, read_lora, save_lora)

SD1_LAYERS = [  # one of each kind: attention linear, LoCon 3x3 conv, 1x1 convs, time embedding, text encoder
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj",
    "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.1.0.in_layers.2",  # resnet conv1, 3x3 (LoCon)
    "output_blocks.0.0.skip_connection",  # 1x1 conv
    "input_blocks.1.1.proj_in",  # SD1's 1x1-conv projection
    "output_blocks.1.0.emb_layers.1",
    "text_encoders.0.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoders.0.text_model.encoder.layers.2.mlp.fc2",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _path(name: str) -> str:
    """Our module path inside StableDiffusion for a save_lora key."""
    return name if name.startswith(("unet.", "text_encoders.")) else "unet." + name


def random_lora(model, names, rank=2, seed=0, alphas=(1.0, 3.0, 2.0), linear_on_conv=()) -> dict:
    """{name: (down, up, alpha)} of the right shapes for `model`; `linear_on_conv` layers get 2-d factors."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for i, name in enumerate(names):
        w = modules[_path(name)].weight
        conv = w.ndim == 4 and name not in linear_on_conv
        down = torch.randn((rank, w.shape[1], *(w.shape[2:] if conv else ())), generator=g) * 0.1
        down = down.reshape(rank, -1) if not conv else down  # (r, in) or (r, in, kh, kw)
        up = torch.randn((w.shape[0], rank, *((1, 1) if conv else ())), generator=g) * 0.1  # (out, r[, 1, 1])
        out[name] = (down, up, alphas[i % len(alphas)])
    return out


def expected_weights(model, layers, weight) -> dict[str, torch.Tensor]:
    """W + w * alpha/rank * (up @ down), in fp32, for every layer of a LoRA (the formula, written out again)."""
    modules = dict(model.named_modules())
    out = {}
    for name, (down, up, alpha) in layers.items():
        path = _path(name)
        w = modules[path].weight
        f = weight * (alpha / down.shape[0])
        delta = (up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()).reshape(w.shape)
        out[path] = (w.float() + f * delta).to(w.dtype)
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model, before, changed: dict[str, torch.Tensor]):
    """Layers in `changed` hold exactly those tensors; every other tensor is untouched."""
    for key, value in model.state_dict().items():
        want = changed.get(key.removesuffix(".weight"), before[key]) if key.endswith(".weight") else before[key]
        assert torch.equal(value, want), key


@pytest.mark.parametrize("fmt,unet_names", [("kohya", "diffusers"), ("kohya", "compvis"), ("peft", None)])
def test_apply_is_exact_and_unload_bit_exact(tmp_path, fmt, unet_names):
    """Every format gives exactly W + w * alpha/rank * up @ down, LoCon convs included; unload restores all."""
    model = make_tiny(tmp_path, "sd1").model
    layers = random_lora(model, SD1_LAYERS, linear_on_conv=("input_blocks.1.1.proj_in",))
    path = save_lora(tmp_path / "l.safetensors", layers, fmt, "sd1", config=model.config, unet_names=unet_names)
    lora = read_lora(path)
    assert (lora.format, len(lora.layers), lora.unsupported) == (fmt, len(layers), [])
    before, want = snapshot(model), expected_weights(model, layers, 0.6)
    patch = apply_loras(model, [(path, 0.6)])
    assert (patch.applied, patch.unmatched) == (len(layers), [])
    assert_state(model, before, want)
    patch.unload()
    assert_state(model, before, {})


def test_kohya_key_names_for_real_presets(tmp_path):
    """kohya spelling: diffusers module names for SD1, CompVis ones and te1/te2 for SDXL (as kohya's trainers)."""
    down, up = torch.zeros(1, 4), torch.zeros(4, 1)
    sd1 = read_lora(save_lora(tmp_path / "a.safetensors", {"input_blocks.1.1.transformer_blocks.0.attn1.to_q":
                                                          (down, up, 1.0), "output_blocks.2.1.conv": (down, up, 1.0)},
                              metadata={"ss_network_dim": "1"}))
    assert sd1.metadata == {"format": "pt", "easel_family": "sd1", "ss_network_dim": "1"}
    assert set(sd1.layers) == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                               "lora_unet_up_blocks_0_upsamplers_0_conv"}
    xl = read_lora(save_lora(tmp_path / "b.safetensors", {
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (down, up, 1.0),
        "text_encoders.1.text_model.encoder.layers.0.mlp.fc1": (down, up, 1.0)}, family="sdxl"))
    assert set(xl.layers) == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                              "lora_te2_text_model_encoder_layers_0_mlp_fc1"}
    peft = read_lora(save_lora(tmp_path / "c.safetensors", {"middle_block.1.proj_in": (down, up, 2.0),
                                                           "text_encoders.1.text_model.encoder.layers.0.mlp.fc1":
                                                               (down, up, 1.0)}, fmt="peft", family="sdxl"))
    assert set(peft.layers) == {"unet.mid_block.attentions.0.proj_in",
                                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"}
    assert [peft.layers[k].alpha for k in sorted(peft.layers)] == [1.0, 2.0]  # alphas from the PEFT metadata
    with pytest.raises(KeyError, match="text encoder"):
        save_lora(tmp_path / "d.safetensors", {"text_encoders.1.text_model.encoder.layers.0.mlp.fc1": (down, up, 1.0)})
    with pytest.raises(KeyError, match="not a UNet layer"):
        save_lora(tmp_path / "d.safetensors", {"input_blocks.1.1.nothing": (down, up, 1.0)})


def test_several_loras_te_weights_and_half_precision(tmp_path):
    """Two LoRAs on overlapping layers add up (in fp32, rounded once to fp16); te_weights scale only the text."""
    model = make_tiny(tmp_path, "sd1").model.half()
    a = random_lora(model, SD1_LAYERS[:6] + SD1_LAYERS[8:], seed=1)
    b = random_lora(model, SD1_LAYERS[4:], seed=2, rank=3)
    pa = save_lora(tmp_path / "a.safetensors", a, "kohya", "sd1", config=model.config)
    pb = save_lora(tmp_path / "b.safetensors", b, "peft", "sd1", config=model.config)
    before = snapshot(model)
    want = {}
    for name in set(a) | set(b):
        path = _path(name)
        w = before[path + ".weight"]
        total = w.float()
        for layers, weight, te in ((a, 0.5, 0.25), (b, -1.5, 0.0)):
            if name in layers:
                down, up, alpha = layers[name]
                f = (te if path.startswith("text_encoders.") else weight) * alpha / down.shape[0]
                total = total + f * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        want[path] = total
    patch = apply_loras(model, [(pa, 0.5), (read_lora(pb), -1.5)], te_weights=[0.25, 0.0])
    assert patch.applied == len(a) + len(b) - 2  # LoRA b's two text layers have weight 0
    modules = dict(model.named_modules())
    for path, total in want.items():
        got = modules[path].weight
        assert got.dtype == torch.float16
        # Summed in fp32 and rounded once: at most half an fp16 step from the exact sum (fp32 order aside).
        assert ((got.float() - total).abs() <= total.abs() * 2 ** -11 + 1e-6).all(), path
    patch.unload()
    assert_state(model, before, {})
    with pytest.raises(ValueError, match="one per LoRA"):
        apply_loras(model, [(pa, 1.0)], te_weights=[1.0, 1.0])


def test_unknown_and_unsupported_keys_are_reported(tmp_path, caplog):
    """Keys that fit no layer, half pairs and DoRA layers are listed in `unmatched` and logged; the rest applies."""
    model = make_tiny(tmp_path, "sd1").model
    layers = random_lora(model, SD1_LAYERS[:2])
    path = save_lora(tmp_path / "l.safetensors", layers, "kohya", "sd1", config=model.config)
    extra = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(2, 4),
             "lora_unet_no_such_block_to_q.lora_up.weight": torch.ones(4, 2),
             "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.ones(2, 32),  # no up
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(64, 2),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale": torch.ones(1, 32),  # DoRA: not applied
             "some_other_tensor": torch.ones(3)}
    write_safetensors({**read_state_dict(path)[0], **extra}, tmp_path / "mixed.safetensors")
    before, want = snapshot(model), expected_weights(model, layers, 1.0)
    with caplog.at_level(logging.WARNING, logger="easel"):
        patch = apply_loras(model, [(tmp_path / "mixed.safetensors", 1.0)])
    assert patch.applied == 2
    assert sorted(patch.unmatched) == sorted(extra)
    assert "match no layer" in caplog.text and "no_such_block" in caplog.text and "DoRA" in caplog.text
    assert_state(model, before, want)


def test_other_spellings_map_to_the_same_layers(tmp_path):
    """Old diffusers processor names, PEFT `.alpha` keys, `base_model.model.`, transformers-5 text names."""
    model = make_tiny(tmp_path, "sd1").model
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    sd = {f"unet.{attn}.processor.to_q_lora.down.weight": r(2, 32),
          f"unet.{attn}.processor.to_q_lora.up.weight": r(32, 2),
          f"{attn}.processor.to_out_lora.down.weight": r(2, 32), f"{attn}.processor.to_out_lora.up.weight": r(32, 2),
          "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": r(2, 32),
          "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight": r(32, 2),
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": r(2, 32),
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": r(64, 2)}
    peft = {"unet.mid_block.attentions.0.proj_out.lora_A.weight": r(2, 64, 1, 1),
            "unet.mid_block.attentions.0.proj_out.lora_B.weight": r(64, 2, 1, 1),
            "unet.mid_block.attentions.0.proj_out.alpha": torch.tensor(4.0),
            "text_encoder.encoder.layers.2.self_attn.v_proj.lora_A.weight": r(2, 32),
            "text_encoder.encoder.layers.2.self_attn.v_proj.lora_B.weight": r(32, 2),
            "base_model.model.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.lora_A.weight": r(2, 32),
            "base_model.model.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.lora_B.weight": r(32, 2)}
    targets = {"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
               "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
               "text_encoders.0.text_model.encoder.layers.1.self_attn.k_proj",
               "text_encoders.0.text_model.encoder.layers.0.mlp.fc1"}
    for tensors, fmt, want in ((sd, "diffusers-old", targets), (peft, "peft", {
            "unet.middle_block.1.proj_out", "text_encoders.0.text_model.encoder.layers.2.self_attn.v_proj",
            "unet.output_blocks.3.1.transformer_blocks.0.attn2.to_v"})):
        write_safetensors(tensors, tmp_path / f"{fmt}.safetensors")
        lora = read_lora(tmp_path / f"{fmt}.safetensors")
        assert lora.format == fmt
        before = snapshot(model)
        with apply_loras(model, [(lora, 1.0)]) as patch:
            assert patch.unmatched == [] and patch.applied == len(want)
            changed = {k.removesuffix(".weight") for k, v in model.state_dict().items()
                       if not torch.equal(v, before[k])}
            assert changed == want
            if fmt == "peft":  # alpha 4 over rank 2: twice the plain product
                layer = lora.layers["unet.mid_block.attentions.0.proj_out"]
                delta = model.unet.middle_block[1].proj_out.weight - before["unet.middle_block.1.proj_out.weight"]
                product = (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(delta.shape)  # (64, 64, 1, 1)
                assert torch.allclose(delta, 2 * product, rtol=1e-5, atol=1e-6)
        assert_state(model, before, {})


def test_sd2_and_sdxl_layouts(tmp_path):
    """SD2 (linear proj_in, one OpenCLIP-shaped encoder) and SDXL (te1/te2, CompVis kohya names) apply and unload."""
    for family, names in (("sd2", ["input_blocks.1.1.proj_in", "output_blocks.3.1.transformer_blocks.0.attn2.to_v",
                                   "text_encoders.0.text_model.encoder.layers.1.self_attn.out_proj"]),
                          ("sdxl", ["input_blocks.3.1.transformer_blocks.0.attn1.to_q", "label_emb.0.0",
                                    "output_blocks.1.0.in_layers.2",
                                    "text_encoders.0.text_model.encoder.layers.0.mlp.fc1",
                                    "text_encoders.1.text_model.encoder.layers.2.self_attn.q_proj",
                                    "text_encoders.1.text_projection"])):
        loaded = make_tiny(tmp_path / family, family)
        model = loaded.model
        layers = random_lora(model, names)
        before = snapshot(model)
        want = expected_weights(model, layers, 0.8)
        for fmt in ("kohya", "peft"):
            path = save_lora(tmp_path / f"{family}-{fmt}.safetensors", layers, fmt, family, config=model.config)
            patch = apply_loras(loaded if fmt == "peft" else model, [(path, 0.8)])  # a LoadedModel is accepted too
            assert (patch.applied, patch.unmatched) == (len(names), [])
            assert_state(model, before, want)
            patch.unload()
            assert_state(model, before, {})


def test_wrong_family_and_non_lora_files_fail_clearly(tmp_path):
    """A LoRA made for another family raises before touching the model; non-LoRA files say what they are."""
    xl = make_tiny(tmp_path / "xl", "sdxl").model
    sd1 = make_tiny(tmp_path / "sd1", "sd1").model
    layers = random_lora(xl, ["output_blocks.0.1.transformer_blocks.0.attn2.to_k"])
    path = save_lora(tmp_path / "xl.safetensors", layers, family="sdxl", config=xl.config, unet_names="diffusers")
    before = snapshot(sd1)
    with pytest.raises(LoraError, match="another model family"):
        apply_loras(sd1, [(path, 1.0)])
    assert_state(sd1, before, {})
    write_safetensors({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(LoraError, match="whole Stable Diffusion model"):
        read_lora(tmp_path / "ckpt.safetensors")
    write_safetensors({"emb_params": torch.zeros(2, 768)}, tmp_path / "ti.safetensors")
    with pytest.raises(LoraError, match="textual-inversion"):
        read_lora(tmp_path / "ti.safetensors")
    write_safetensors({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(LoraError, match="LoHa"):
        read_lora(tmp_path / "loha.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="cannot read LoRA"):
        read_lora(tmp_path / "junk.safetensors")


def test_find_and_list_loras(tmp_path, monkeypatch):
    """Names are file stems in $EASEL_LORA_DIRS, ./models/Lora and the cache; a miss lists what exists."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    for p in (a / "sub" / "style.safetensors", b / "detail.pt", b / "notes.txt"):
        p.write_bytes(b"x" * 7)
    monkeypatch.setenv("EASEL_LORA_DIRS", f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))  # not the user's own ~/.cache/easel/loras
    monkeypatch.chdir(tmp_path)
    dirs = lora_dirs()
    assert dirs[:2] == [a, b] and dirs[2].as_posix().endswith("models/Lora") and dirs[3].name == "loras"
    assert find_lora("style") == a / "sub" / "style.safetensors"
    assert find_lora("detail.pt") == b / "detail.pt"
    assert find_lora(str(b / "detail.pt")) == b / "detail.pt"
    (tmp_path / "models" / "Lora" / "saved").mkdir(parents=True)  # a folder from diffusers' save_lora_weights
    (tmp_path / "models" / "Lora" / "saved" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert find_lora("models/Lora/saved").name == "pytorch_lora_weights.safetensors"
    assert find_lora("saved").parent.name == "saved"
    found = [(e["name"], e["size"]) for e in list_loras() if BUILTIN_LORA_DIR not in e["path"].parents]
    assert found == [("style", 7), ("detail", 7), ("saved", 1)]
    assert dirs[-1] == BUILTIN_LORA_DIR  # the LoRAs shipped with easel come last
    assert [e["name"] for e in list_loras([b])] == ["detail"]
    with pytest.raises(LoraNotFound, match="detail, saved, (shapeworld-lcm, )?style"):
        find_lora("nope")
    with pytest.raises(FileNotFoundError, match="no LoRA files there"):
        find_lora("style", dirs=[tmp_path / "empty"])


# ---------------------------------------------------------------- parity with diffusers


def _diffusers_pipe(loaded, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers' LoRA loading needs the PEFT backend
    from easel.weights.model_io import save_model
    folder = save_model(loaded, tmp_path / "pipe", to="diffusers")
    xl = len(loaded.model.text_encoders) == 2
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    return cls.from_pretrained(folder, **({} if xl else {"safety_checker": None}))


def _compare_outputs(model, pipe, xl: bool):
    """UNet noise predictions and text-encoder hidden states of easel and diffusers agree."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ctx = torch.randn(2, 7, model.unet.cfg.context_dim, generator=g)
    extra, y = {}, None
    if xl:  # SDXL's vector: pooled text + six size/crop numbers, which diffusers embeds itself
        pooled = torch.randn(2, model.text_encoders[1].config.projection_dim, generator=g)
        y = sdxl_vector(pooled, (32, 32), (0, 0), (32, 32))
        sizes = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}
    with torch.no_grad():
        ours = model.unet(x, t, ctx, y)
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx, **extra).sample
        assert ours.abs().max() > 0.01
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ids = torch.randint(0, 50, (2, 6), generator=g)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
        for enc, ref in zip(model.text_encoders, encoders):
            torch.testing.assert_close(enc(ids)[0], ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _all_layers(model) -> list[str]:
    return sorted(set(lora_keys.target_names(model).values()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_matches_diffusers_load_lora_weights(tmp_path, family):
    """A LoRA/LoCon on every layer kind, as kohya and as PEFT, fused by diffusers == applied by easel.

    The kohya file uses one alpha for all layers: diffusers 0.42 attaches per-layer kohya alphas to the wrong
    module names for attention and text layers (its conversion keys them by the old processor names), so with
    mixed alphas diffusers, not easel, is off. The PEFT file has mixed alphas (diffusers' metadata patterns)."""
    loaded = make_tiny(tmp_path, family)
    model = loaded.model
    layers = random_lora(model, _all_layers(model), alphas=(1.0,))
    mixed = random_lora(model, _all_layers(model), seed=1, alphas=(1.0, 3.0, 2.0))
    for fmt, lora in (("kohya", layers), ("peft", mixed)):
        path = save_lora(tmp_path / f"{fmt}.safetensors", lora, fmt, family, config=model.config)
        pipe = _diffusers_pipe(loaded, tmp_path / fmt)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.7)
        pipe.unload_lora_weights()
        with apply_loras(model, [(path, 0.7)]) as patch:
            assert (patch.applied, patch.unmatched) == (len(lora), [])
            _compare_weights(model, pipe)
            _compare_outputs(model, pipe, family == "sdxl")


def _compare_weights(model, pipe):
    """Every fused weight of diffusers' UNet and text encoders equals easel's patched one (to fp32 rounding)."""
    theirs = pipe.unet.state_dict()
    for key, value in keys_unet.to_diffusers(model.unet.state_dict(), model.unet.cfg).items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-6, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(model.text_encoders) == 2 else [])
    for ours, ref in zip(model.text_encoders, encoders):
        theirs = ref.state_dict()
        for key, value in ours.state_dict().items():
            other = theirs[key] if key in theirs else theirs[key.removeprefix("text_model.")]
            torch.testing.assert_close(value, other, rtol=1e-6, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_a_listed_name_wins_over_a_file_of_that_name_in_the_working_directory(tmp_path, monkeypatch):
    from easel.weights.lora import find_lora
    (tmp_path / "loras").mkdir()
    listed = tmp_path / "loras" / "style.safetensors"
    listed.write_bytes(b"x")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "style.safetensors").write_bytes(b"y")
    monkeypatch.chdir(tmp_path / "cwd")
    assert find_lora("style.safetensors", [tmp_path / "loras"]) == listed
    assert find_lora(str(tmp_path / "cwd" / "style.safetensors"), [tmp_path / "loras"]).read_bytes() == b"y"
