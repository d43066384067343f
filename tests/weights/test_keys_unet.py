"""UNet key map and config against diffusers, on full-size SD1.5 / SD2.1 / SDXL built on the meta device."""
import dataclasses

import pytest
import torch

from easel.models.configs import SD15, SD15_INPAINT, SD21, SDXL, UNetConfig
from easel.models.unet import UNetModel
from easel.weights.keys_unet import (config_from_diffusers, diffusers_config, diffusers_map, from_diffusers,
                                     to_diffusers)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# The unet/config.json files as published on the Hugging Face hub (keys that matter for the architecture).
SD15_JSON = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": _DOWN, "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "sample_size": 64, "up_block_types": _UP}
SD15_INPAINT_JSON = {**SD15_JSON, "in_channels": 9}
SD21_JSON = {**SD15_JSON, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
             "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
             "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
             "use_linear_projection": True}
SD2_INPAINT_JSON = {**SD21_JSON, "in_channels": 9, "sample_size": 64, "upcast_attention": False}
SDXL_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}
SDXL_INPAINT_JSON = {**SDXL_JSON, "in_channels": 9}


def _meta_state_dicts(cfg: UNetConfig):
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        theirs = diffusers.UNet2DConditionModel.from_config(diffusers_config(cfg)).state_dict()
    return ours, theirs


@pytest.mark.parametrize("preset", [SD15, SD21, SDXL], ids=lambda p: p.name)
def test_full_size_keys_and_shapes_match_diffusers(preset):
    ours, theirs = _meta_state_dicts(preset.unet)
    table = diffusers_map(preset.unet)
    assert set(table) == set(ours)
    assert set(table.values()) == set(theirs)
    for k, v in table.items():
        assert ours[k].shape == theirs[v].shape, (k, v)
    assert set(to_diffusers(ours, preset.unet)) == set(theirs)
    assert set(from_diffusers(theirs, preset.unet)) == set(ours)


def test_upsampler_position_follows_attention():
    table = diffusers_map(SD15.unet)
    assert table["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"  # no attention
    assert table["output_blocks.5.2.conv.weight"] == "up_blocks.1.upsamplers.0.conv.weight"
    assert table["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert table["middle_block.2.out_layers.3.bias"] == "mid_block.resnets.1.conv2.bias"


@pytest.mark.parametrize("published,unet", [(SD15_JSON, SD15.unet), (SD15_INPAINT_JSON, SD15_INPAINT.unet),
                                            (SD21_JSON, SD21.unet), (SDXL_JSON, SDXL.unet),
                                            (SD2_INPAINT_JSON, dataclasses.replace(SD21.unet, in_channels=9)),
                                            (SDXL_INPAINT_JSON, dataclasses.replace(SDXL.unet, in_channels=9))],
                         ids=["sd15", "sd15-inpaint", "sd21", "sdxl", "sd2-inpaint", "sdxl-inpaint"])
def test_config_from_published_diffusers_json(published, unet):
    assert config_from_diffusers(published) == unet
    assert config_from_diffusers(diffusers_config(unet)) == unet  # round trip


def test_diffusers_config_head_semantics():
    assert diffusers_config(SD15.unet)["attention_head_dim"] == 8  # a head COUNT, despite the name
    assert diffusers_config(SD21.unet)["attention_head_dim"] == [5, 10, 20, 20]
    d = diffusers_config(SDXL.unet, sample_size=128)
    assert d["attention_head_dim"] == [5, 10, 20] and d["sample_size"] == 128
    assert d["addition_embed_type"] == "text_time" and d["projection_class_embeddings_input_dim"] == 2816
    assert d["transformer_layers_per_block"] == [1, 2, 10]


def test_mismatch_errors_list_keys():
    ours, _ = _meta_state_dicts(SD15.unet)
    with pytest.raises(KeyError, match="missing keys"):
        to_diffusers(ours, SDXL.unet)
    del ours["out.2.bias"]
    with pytest.raises(KeyError, match=r"1 missing keys \['out.2.bias'\]"):
        to_diffusers(ours, SD15.unet)
    ours["bogus.weight"] = ours["out.0.weight"]
    with pytest.raises(KeyError, match="unexpected keys.*bogus.weight"):
        to_diffusers(ours, SD15.unet)


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        config_from_diffusers({**SDXL_JSON, "time_cond_proj_dim": 256})
    with pytest.raises(ValueError, match="transformer_depth_middle"):
        diffusers_config(dataclasses.replace(SD15.unet, transformer_depth_middle=0))
