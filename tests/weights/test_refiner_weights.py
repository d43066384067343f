"""SDXL refiner weights: preset vs SGM/diffusers facts (full size, meta device), detection, single file and
diffusers folder round trips on a tiny random-weight refiner."""
import dataclasses
import json

import pytest
import torch

from tests.conftest import make_tiny
from easel.models.configs import PRESETS, SD15, SD21, SDXL, SDXL_REFINER
from easel.models.sd import StableDiffusion
from easel.models.unet import UNetModel
from easel.weights import keys_clip, single_file
from easel.weights.detect import detect_config, family, is_refiner
from easel.weights.keys_unet import config_from_diffusers, diffusers_config, diffusers_map
from easel.weights.load import read_state_dict, write_safetensors
from easel.weights.model_io import load_model, save_model

# network_config.params of Stability-AI/generative-models configs/inference/sd_xl_refiner.yaml (+ its VAE ddconfig).
SGM_REFINER_YAML = {"model": {"params": {
    "network_config": {"params": {
        "adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": 4,
        "context_dim": [1280, 1280, 1280, 1280]}},
    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""


def _same_weights(a: StableDiffusion, b: StableDiffusion):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- full size, on the meta device -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size_file() -> dict[str, torch.Tensor]:
    """The full-size refiner as a single-file state dict of meta tensors (shapes only)."""
    return single_file.join(StableDiffusion.empty(SDXL_REFINER).component_state_dicts(), SDXL_REFINER)


def test_is_refiner_only_for_the_refiner():
    assert is_refiner(SDXL_REFINER) and PRESETS["sdxl-refiner"] is SDXL_REFINER
    assert not any(is_refiner(c) for c in (SD15, SD21, SDXL))


def test_full_size_refiner_file_layout_and_detection(full_size_file):
    sd = full_size_file
    assert "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight" in sd
    assert sd["conditioner.embedders.0.model.text_projection"].shape == (1280, 1280)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in sd)
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)
    assert family(sd) == "sdxl-refiner"
    assert detect_config(sd, metadata={}) == SDXL_REFINER


def test_diffusers_recognises_our_refiner_layout(full_size_file):
    """diffusers' own single-file sniffing reads our joined file as an SDXL refiner, and its LDM->diffusers
    UNet config of the SGM yaml is our preset."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, infer_diffusers_model_type
    sd = full_size_file
    assert infer_diffusers_model_type(sd) == "xl_refiner"
    theirs = create_unet_diffusers_config_from_ldm(SGM_REFINER_YAML, sd)
    assert theirs["transformer_layers_per_block"] == 4 and theirs["attention_head_dim"] == [6, 12, 24, 24]
    assert config_from_diffusers(theirs) == SDXL_REFINER.unet
    assert config_from_diffusers(diffusers_config(SDXL_REFINER.unet)) == SDXL_REFINER.unet


def test_full_size_refiner_unet_keys_and_shapes_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cfg = SDXL_REFINER.unet
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        theirs = diffusers.UNet2DConditionModel.from_config(diffusers_config(cfg)).state_dict()
    table = diffusers_map(cfg)
    assert set(table) == set(ours) and set(table.values()) == set(theirs)
    assert all(ours[k].shape == theirs[v].shape for k, v in table.items())
    assert "middle_block.1.transformer_blocks.3.attn2.to_k.weight" in ours  # depth 4 in the middle too
    assert not any(k.startswith(("input_blocks.1.1.", "input_blocks.10.1.")) for k in ours)  # no outer attention


def test_full_size_refiner_text_encoder_matches_transformers():
    transformers = pytest.importorskip("transformers")
    enc = SDXL_REFINER.text_encoders[0]
    with torch.device("meta"):
        hf = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**keys_clip.diffusers_config(enc))).state_dict()
        ours = StableDiffusion.empty(SDXL_REFINER).text_encoders[0].state_dict()
    hf = keys_clip.from_hf({k: v for k, v in hf.items() if not k.endswith("position_ids")})
    assert set(hf) == set(ours) and all(hf[k].shape == ours[k].shape for k in ours)


# --- tiny refiner: files ------------------------------------------------------------------------------------

def test_single_file_roundtrip(tmp_path):
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    path = save_model(loaded, tmp_path / "refiner.safetensors")
    sd, _ = read_state_dict(path)
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in sd)
    again = load_model(path)  # the tokenizer is found beside the file (refiner.tokenizer/)
    assert again.model.config == loaded.model.config and is_refiner(again.model.config)
    _same_weights(loaded.model, again.model)
    assert again.tokenizers[0].pad_id == 0


def test_single_file_without_metadata_is_detected_from_shapes(tmp_path):
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    sd, _ = read_state_dict(save_model(loaded, tmp_path / "refiner.safetensors"))
    cfg = detect_config(sd, metadata={})
    want = loaded.model.config
    # Head width is not visible in shapes; the SDXL family's 64 is assumed.
    assert cfg.unet == dataclasses.replace(want.unet, num_head_channels=64)
    shape_fields = lambda c: (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.projection_dim)  # noqa: E731
    assert [shape_fields(c) for c in cfg.text_encoders] == [shape_fields(want.text_encoders[0])] and is_refiner(cfg)
    assert (cfg.clip_skip, cfg.text_final_norm, cfg.pooled_text) == (2, False, True)


def test_diffusers_folder_roundtrip(tmp_path):
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    folder = save_model(loaded, tmp_path / "refiner", to="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert not (folder / "text_encoder").exists() and (folder / "tokenizer_2" / "vocab.json").is_file()
    back = load_model(folder)
    assert back.model.config == loaded.model.config
    _same_weights(loaded.model, back.model)
    single = save_model(back, tmp_path / "back.safetensors")
    _same_weights(back.model, load_model(single).model)


def test_diffusers_folder_without_easel_config(tmp_path):
    """A refiner folder as diffusers writes it (no easel_config.json) is read from its component configs."""
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    folder = save_model(loaded, tmp_path / "refiner", to="diffusers")
    (folder / "easel_config.json").unlink()
    back = load_model(folder)
    cfg = back.model.config
    assert cfg.name == "sdxl-refiner-diffusers" and is_refiner(cfg)
    assert (cfg.clip_skip, cfg.text_final_norm, cfg.pooled_text) == (2, False, True)
    assert cfg.unet == loaded.model.config.unet and cfg.text_encoders == loaded.model.config.text_encoders
    ids = [loaded.tokenizers[0](["a red cat"], pad_id=0)]
    a, pa = loaded.model.encode_text(ids, clip_skip=1)
    b, pb = back.model.encode_text(ids, clip_skip=1)
    assert torch.equal(a, b) and torch.equal(pa, pb) and pa.shape == (1, 32)


def test_diffusers_reads_our_refiner_single_file(tmp_path):
    """diffusers' own single-file loader (given our folder's configs) reads the SGM refiner layout we write."""
    diffusers = pytest.importorskip("diffusers")
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    path = save_model(loaded, tmp_path / "refiner.safetensors")
    folder = save_model(loaded, tmp_path / "cfg", to="diffusers")
    cls = diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    ref = cls.from_pretrained(folder)
    assert pipe.text_encoder is None
    for name in ("unet", "vae", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b), name


def test_refiner_single_file_with_wrong_tower_is_named(tmp_path):
    loaded = make_tiny(tmp_path, "sdxl-refiner")
    sd, meta = read_state_dict(save_model(loaded, tmp_path / "refiner.safetensors"))
    sd = {k: v for k, v in sd.items() if "resblocks.2." not in k}
    write_safetensors(sd, tmp_path / "broken.safetensors", meta)
    with pytest.raises(ValueError, match="OpenCLIP text encoder does not match"):
        load_model(tmp_path / "broken.safetensors", tokenizer=str(tmp_path / "refiner.tokenizer"))
