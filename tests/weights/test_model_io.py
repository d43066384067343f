"""Whole-model files: single-file and diffusers folders, both ways, detection, VAE override, dtypes."""
import dataclasses
import json

import pytest
import torch

from tests.conftest import make_tiny
from easel.models.configs import PRESETS
from easel.models.sd import StableDiffusion, WeightsMismatch
from easel.weights import single_file
from easel.weights.detect import detect_config
from easel.weights.load import read_state_dict, write_safetensors
from easel.weights.model_io import load_model, save_model


def _same_weights(a: StableDiffusion, b: StableDiffusion, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    assert set(keys) <= set(sb)
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_roundtrip(tmp_path, family):
    loaded = make_tiny(tmp_path, family)
    path = save_model(loaded, tmp_path / "m.safetensors")
    sd, meta = read_state_dict(path)
    prefix = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.transformer.resblocks.",
              "sdxl": "conditioner.embedders.1.model.transformer.resblocks."}[family]
    assert any(k.startswith(prefix) for k in sd), "original CompVis/SGM layout expected"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    again = load_model(path)
    assert again.model.config == loaded.model.config
    _same_weights(loaded.model, again.model)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_roundtrip(tmp_path, family):
    loaded = make_tiny(tmp_path, family)
    folder = save_model(loaded, tmp_path / "pipe", to="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    back = load_model(folder)
    # SD2's diffusers text encoder ends at the penultimate layer, without the unused projection (as diffusers does).
    skip = ("text_encoders.0.text_model.encoder.layers.2.", "text_encoders.0.text_projection") if family == "sd2" else ()
    _same_weights(loaded.model, back.model, skip)
    single = save_model(back, tmp_path / "back.safetensors")
    _same_weights(back.model, load_model(single).model)


def test_sd2_diffusers_text_encoder_gives_same_context(tmp_path):
    loaded = make_tiny(tmp_path, "sd2")
    back = load_model(save_model(loaded, tmp_path / "pipe", to="diffusers"))
    ids = [loaded.tokenizers[0](["a red cat"], pad_id=0)]
    a, _ = loaded.model.encode_text(ids)
    b, _ = back.model.encode_text(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21", "sdxl"])
def test_detect_full_size_presets_from_shapes(name):
    cfg = PRESETS[name]
    model = StableDiffusion.empty(cfg)
    sd = single_file.join(model.component_state_dicts(), cfg)
    found = detect_config(sd, metadata={})
    # Meta tensors carry no statistics for SD2's v/eps heuristic, so SD2 is read as 512-base there.
    assert found.name == ("sd21-base" if name == "sd21" else name)
    assert found == PRESETS[found.name]


def test_v_prediction_marker_and_override(tmp_path):
    cfg = PRESETS["sd21"]
    sd = single_file.join(StableDiffusion.empty(cfg).component_state_dicts(), cfg)
    assert detect_config({**sd, "v_pred": torch.tensor([])}, {}).prediction == "v"
    assert detect_config(sd, {}, prediction="v").prediction == "v"
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        detect_config(sd, {}, prediction="x0")


def test_vae_override_both_layouts(tmp_path):
    from easel.weights import keys_vae
    loaded = make_tiny(tmp_path, "sd1")
    path = save_model(loaded, tmp_path / "m.safetensors")
    other = make_tiny(tmp_path / "o", "sd1", seed=1).model.vae.state_dict()
    write_safetensors(other, tmp_path / "vae.safetensors")
    write_safetensors(keys_vae.to_diffusers(other, loaded.model.config.vae), tmp_path / "vae_diffusers.safetensors")
    for f in ("vae.safetensors", "vae_diffusers.safetensors"):
        got = load_model(path, vae=tmp_path / f).model.vae.state_dict()
        assert all(torch.equal(got[k], other[k]) for k in other)


def test_half_precision_files_load_into_any_dtype(tmp_path):
    loaded = make_tiny(tmp_path, "sd1")
    sd, meta = read_state_dict(save_model(loaded, tmp_path / "m.safetensors"))
    write_safetensors({k: v.half() for k, v in sd.items()}, tmp_path / "h.safetensors", meta)
    tok = str(tmp_path / "m.tokenizer")
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = load_model(tmp_path / "h.safetensors", dtype=dtype, tokenizer=tok).model
        assert m.dtype == want and next(m.vae.parameters()).dtype == want
    half = load_model(tmp_path / "h.safetensors", dtype="fp16", tokenizer=tok).model
    assert half.dtype == torch.float16 and next(half.vae.parameters()).dtype == torch.float32


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    loaded = make_tiny(tmp_path, "sd1")
    sd, meta = read_state_dict(save_model(loaded, tmp_path / "m.safetensors"))
    sd.pop("model.diffusion_model.out.2.weight")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    write_safetensors(sd, tmp_path / "broken.safetensors", meta)
    with pytest.raises(WeightsMismatch) as e:
        load_model(tmp_path / "broken.safetensors", tokenizer=str(tmp_path / "m.tokenizer"))
    assert "out.2.weight" in str(e.value) and "extra.weight" in str(e.value) and "missing (1)" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    from easel.weights.load import CheckpointError
    write_safetensors({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "vae.safetensors")
