"""ControlNet architecture and loading on tiny random weights: parity with diffusers' ControlNetModel, every file
layout people have (ControlNet 1.1 single files with and without `control_model.`, .pth, diffusers folders and
diffusers-key single files), strict key checks and clear errors."""
import dataclasses

import pytest
import torch

from tests.conftest import tiny_config
from easel.models.controlnet import (ControlNet, ControlNetConfig, check_fits,
                                     encoder_skip_channels)
from easel.models.unet import UNetModel, sdxl_vector
from easel.weights import controlnet_keys as keys
from easel.weights.controlnet_load import ControlNetNotFound, load_controlnet, resolve_controlnet
from easel.weights.load import CheckpointError, UnsafeCheckpointError, write_safetensors


def random_controlnet(family: str = "sd1", seed: int = 0) -> tuple[ControlNet, ControlNetConfig]:
    """A tiny ControlNet of a family's layout with every weight random (the zero convs too, to see a signal)."""
    cfg = ControlNetConfig.for_model(tiny_config(family, 300))
    torch.manual_seed(seed)
    net = ControlNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net, cfg


def inputs(cfg: ControlNetConfig, batch: int = 2):
    torch.manual_seed(1)
    x, hint = torch.randn(batch, 4, 16, 16), torch.rand(batch, 3, 32, 32)
    ctx, t = torch.randn(batch, 7, cfg.unet.context_dim), torch.tensor([10.0, 500.0][:batch])
    return x, hint, t, ctx


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_residuals_equal_diffusers_controlnet_model(family):
    diffusers = pytest.importorskip("diffusers")
    net, cfg = random_controlnet(family)
    ref = diffusers.ControlNetModel.from_config(keys.diffusers_config(cfg)).eval()
    ref.load_state_dict(keys.to_diffusers(net.state_dict(), cfg), strict=True)
    x, hint, t, ctx = inputs(cfg)
    kw, y = {}, None
    if cfg.unet.adm_in_channels:
        pooled = torch.randn(2, 32)
        y = sdxl_vector(pooled, (32, 32), (0, 0), (32, 32))
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        ours = net(x, hint, t, ctx, y)
        down, mid = ref(x, t, ctx, hint, return_dict=False, **kw)
    assert len(ours) == len(down) + 1 == len(encoder_skip_channels(cfg.unet))
    assert min(float(o.abs().max()) for o in ours) > 0.01
    for a, b in zip(ours, [*down, mid]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fresh_controlnet_changes_nothing_and_residuals_reach_the_unet():
    """Zero convs start at zero (training starts from the plain UNet); residuals then move the output."""
    model = tiny_config("sd1", 300)
    torch.manual_seed(0)
    unet = UNetModel(model.unet).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    cfg = ControlNetConfig.for_model(model)
    x, hint, t, ctx = inputs(cfg)
    with torch.no_grad():
        fresh = ControlNet(cfg)(x, hint, t, ctx)
        assert all(float(r.abs().max()) == 0 for r in fresh)
        plain = unet(x, t, ctx)
        torch.testing.assert_close(unet(x, t, ctx, None, control=fresh), plain, rtol=0, atol=1e-6)
        moved = unet(x, t, ctx, None, control=random_controlnet()[0](x, hint, t, ctx))
    assert float((moved - plain).abs().max()) > 1e-3


def test_inpainting_model_gets_a_four_channel_controlnet():
    cfg = ControlNetConfig.for_model(tiny_config("sd1-inpaint", 300))
    assert cfg.unet.in_channels == 4 and cfg.downsample == 2


def compvis_file(tmp_path, net, name="control_v11p_sd15_canny.safetensors", prefix="control_model."):
    path = tmp_path / name
    write_safetensors({prefix + k: v for k, v in net.state_dict().items()}, path)
    return path


def assert_same_weights(loaded, net):
    theirs = net.state_dict()
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, theirs[k]), k


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_loads_controlnet_11_single_files(tmp_path, prefix):
    net, _ = random_controlnet()
    loaded = load_controlnet(compvis_file(tmp_path, net, prefix=prefix), tiny_config("sd1", 300))
    assert_same_weights(loaded, net)
    assert loaded.name == "control_v11p_sd15_canny" and len(loaded.hash) == 10


def test_loads_pth_through_the_safe_unpickler_and_skips_a_full_10_checkpoint(tmp_path):
    """ControlNet 1.0 .pth files carry the whole SD model beside `control_model.`: only the ControlNet is taken."""
    net, _ = random_controlnet()
    sd = {"control_model." + k: v for k, v in net.state_dict().items()}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "control_sd15_scribble.pth")
    assert_same_weights(load_controlnet(tmp_path / "control_sd15_scribble.pth", tiny_config("sd1", 300)), net)


def test_pth_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"control_model.x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_controlnet(tmp_path / "evil.pth", tiny_config("sd1", 300))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loads_diffusers_folders_and_diffusers_key_files(tmp_path, family):
    diffusers = pytest.importorskip("diffusers")
    net, cfg = random_controlnet(family)
    ref = diffusers.ControlNetModel.from_config(keys.diffusers_config(cfg))
    ref.load_state_dict(keys.to_diffusers(net.state_dict(), cfg), strict=True)
    ref.save_pretrained(tmp_path / "controlnet-canny")
    model = tiny_config(family, 300)
    assert_same_weights(load_controlnet(tmp_path / "controlnet-canny", model), net)
    write_safetensors(ref.state_dict(), tmp_path / "canny-diffusers.safetensors")
    assert_same_weights(load_controlnet(tmp_path / "canny-diffusers.safetensors", model), net)


def test_config_is_detected_from_the_weights_not_assumed():
    """A ControlNet with less attention than its base model (like SDXL's "small" ones) is read as it is."""
    model = tiny_config("sdxl", 300)
    small = ControlNetConfig.for_model(dataclasses.replace(
        model, unet=dataclasses.replace(model.unet, transformer_depth=(0, 0), transformer_depth_middle=0)))
    detected = keys.config_from_compvis(ControlNet(small).state_dict(), model.unet)
    assert detected == small


def test_missing_and_misshapen_keys_are_named(tmp_path):
    net, _ = random_controlnet()
    sd = {"control_model." + k: v for k, v in net.state_dict().items() if not k.startswith("zero_convs.1.")}
    sd["control_model.middle_block_out.0.bias"] = torch.zeros(3)
    write_safetensors(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"2 missing keys \['zero_convs.1.0.bias'.*middle_block_out.0.bias"):
        load_controlnet(tmp_path / "broken.safetensors", tiny_config("sd1", 300))


def test_wrong_family_and_wrong_kind_of_file(tmp_path):
    net, _ = random_controlnet("sdxl")
    with pytest.raises(ValueError, match="does not fit the model.*ControlNet made for this model's family"):
        load_controlnet(compvis_file(tmp_path, net, "xl.safetensors"), tiny_config("sd1", 300))
    write_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint, not a ControlNet"):
        load_controlnet(tmp_path / "sd.safetensors", tiny_config("sd1", 300))
    write_safetensors({"lora_controlnet": torch.zeros(1)}, tmp_path / "control-lora.safetensors")
    with pytest.raises(CheckpointError, match="Control-LoRA"):
        load_controlnet(tmp_path / "control-lora.safetensors", tiny_config("sd1", 300))


def test_check_fits_names_both_sides():
    xl, sd1 = ControlNetConfig.for_model(tiny_config("sdxl", 300)), tiny_config("sd1", 300)
    with pytest.raises(ValueError, match="text 64 wide.*text 32 wide"):
        check_fits(xl, sd1.unet)


def test_names_are_found_in_the_controlnet_folders(tmp_path, monkeypatch):
    net, _ = random_controlnet()
    folder = tmp_path / "cn"
    folder.mkdir()
    path = compvis_file(folder, net)
    monkeypatch.setenv("EASEL_CONTROLNETS", str(folder))
    assert resolve_controlnet("control_v11p_sd15_canny") == path
    with pytest.raises(ControlNetNotFound, match="not found.*EASEL_CONTROLNETS"):
        resolve_controlnet("control_v11p_sd15_depth")


def test_hint_block_follows_the_vae_factor():
    model = tiny_config("sd1", 300)
    for f, widths in ((2, (16, 32)), (4, (16, 32, 96)), (8, (16, 32, 96, 256))):
        vae = dataclasses.replace(model.vae, ch_mult=(1,) * (f.bit_length()))
        cfg = ControlNetConfig.for_model(dataclasses.replace(model, vae=vae))
        assert cfg.hint_block_channels == widths and cfg.downsample == f
    with pytest.raises(ValueError, match="downsamples by 16"):
        ControlNetConfig.for_model(dataclasses.replace(model, vae=dataclasses.replace(model.vae, ch_mult=(1,) * 5)))
