"""AutoencoderKL: parity with diffusers on reduced configs, key conversion, efficient attention, tiled decode and
encode, bf16."""
from __future__ import annotations

import logging

import pytest
import torch

from easel.models.configs import SD15, SDXL, VAEConfig
from easel.models.vae import AutoencoderKL, tile_starts
from easel.weights import keys_vae as kv

diffusers = pytest.importorskip("diffusers")

SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
THREE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=32, scale_factor=0.5, shift_factor=0.1)

# Real `vae/config.json` files (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0,
# stabilityai/stable-diffusion-3-medium-diffusers), as published.
SD15_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.18.0.dev0", "_name_or_path": ".", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD3_JSON = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, GroupNorm affines included (defaults 1/0 would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.2))
    return model.eval()


def _pair(cfg: VAEConfig, seed: int = 0):
    """A random diffusers AutoencoderKL and ours loaded strictly from its converted weights."""
    ref = _randomise(diffusers.AutoencoderKL.from_config(kv.diffusers_config(cfg)), seed)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(kv.from_diffusers(ref.state_dict(), cfg), strict=True)
    return ref, ours


@pytest.mark.parametrize("cfg", [SMALL, THREE], ids=["2-levels", "3-levels"])
def test_parity_with_diffusers(cfg: VAEConfig):
    ref, ours = _pair(cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 32 // cfg.downsample, 32 // cfg.downsample, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert mean.shape == (2, 4, 32 // cfg.downsample, 32 // cfg.downsample)
        assert (mean - post.mean).abs().max() < 1e-4
        assert (logvar - post.logvar).abs().max() < 1e-4
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-4
        # Scaled latents follow diffusers' pipelines: (z - shift) * scale, and back.
        lat = ours.encode_latents(x)
        assert torch.allclose(lat, (post.mean - cfg.shift_factor) * cfg.scale_factor, atol=1e-5)
        back = ref.decode(lat / cfg.scale_factor + cfg.shift_factor).sample
        assert (ours.decode_latents(lat) - back).abs().max() < 1e-4


def test_sample_uses_cpu_generator():
    ours = _randomise(AutoencoderKL(SMALL), 3)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = ours.encode_latents(x, torch.Generator().manual_seed(7), sample=True)
        b = ours.encode_latents(x, torch.Generator().manual_seed(7), sample=True)
        mean, logvar = ours.encode(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.allclose(a, (mean + (0.5 * logvar).exp() * noise) * SMALL.scale_factor, atol=1e-6)
    assert not torch.allclose(a, mean * SMALL.scale_factor)


def test_encode_rejects_misaligned_size():
    with pytest.raises(ValueError, match="multiple of 2"):
        AutoencoderKL(SMALL).encode(torch.zeros(1, 3, 15, 16))


def test_round_trip_bit_exact():
    sd = _randomise(diffusers.AutoencoderKL.from_config(kv.diffusers_config(THREE)), 4).state_dict()
    back = kv.to_diffusers(kv.from_diffusers(sd, THREE), THREE)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)


def test_old_attention_names_and_errors():
    sd = _randomise(diffusers.AutoencoderKL.from_config(kv.diffusers_config(SMALL)), 5).state_dict()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new_name, old_name in renames.items():
            k = k.replace(f".{new_name}.", f".{old_name}.")
        old[k] = v
    assert any(".query." in k for k in old)
    new, legacy = kv.from_diffusers(sd, SMALL), kv.from_diffusers(old, SMALL)
    assert new.keys() == legacy.keys() and all(torch.equal(new[k], legacy[k]) for k in new)
    with pytest.raises(ValueError, match=r"(?s)missing \(\d+\): decoder\.up_blocks.*unexpected \(2\): "
                                         r"decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.bias"):
        kv.from_diffusers(sd, THREE)
    del new["quant_conv.bias"]
    with pytest.raises(ValueError, match=r"missing \(1\): quant_conv\.bias"):
        kv.to_diffusers(new, SMALL)


def test_full_size_sd_vae_maps_both_ways_on_meta():
    cfg = VAEConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg).state_dict()
        theirs = diffusers.AutoencoderKL.from_config(kv.diffusers_config(cfg)).state_dict()
    mapping = kv.diffusers_map(cfg)
    assert set(mapping) == set(ours) and set(mapping.values()) == set(theirs)
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    conv = kv.to_diffusers(ours, cfg)
    assert {k: v.shape for k, v in conv.items()} == {k: v.shape for k, v in theirs.items()}
    conv = kv.from_diffusers(theirs, cfg)
    assert {k: v.shape for k, v in conv.items()} == {k: v.shape for k, v in ours.items()}
    # The reversed decoder index: our highest-resolution level is diffusers' last up block.
    assert mapping["decoder.up.0.block.0.nin_shortcut.weight"] == "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"
    assert mapping["decoder.up.3.upsample.conv.bias"] == "decoder.up_blocks.0.upsamplers.0.conv.bias"


def test_configs_from_real_diffusers_json():
    assert kv.config_from_diffusers(SD15_JSON) == SD15.vae
    assert kv.config_from_diffusers(SDXL_JSON) == SDXL.vae
    with pytest.raises(ValueError, match="use_quant_conv=false"):
        kv.config_from_diffusers(SD3_JSON)
    for cfg in (SD15.vae, SDXL.vae, SMALL, THREE):
        assert kv.config_from_diffusers(kv.diffusers_config(cfg)) == cfg
    d = kv.diffusers_config(SDXL.vae, sample_size=1024)
    assert {k: d[k] for k in SDXL_JSON if k in d and not k.startswith("_n")} == \
        {k: v for k, v in SDXL_JSON.items() if k in d and not k.startswith("_n")}
    assert "shift_factor" not in d and kv.diffusers_config(THREE)["shift_factor"] == 0.1


def test_vae_state_from_any(caplog):
    ref, ours = _pair(SMALL, seed=6)
    native = ours.state_dict()
    extras = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    standalone = {**native, **extras}
    in_checkpoint = {**{"first_stage_model." + k: v for k, v in native.items()},
                     "model.diffusion_model.out.2.bias": torch.zeros(4), "first_stage_model.loss.w": torch.zeros(1)}
    with caplog.at_level(logging.INFO, logger=kv.__name__):
        got = kv.vae_state_from_any(standalone)
    assert "loss.logvar" in caplog.text
    for sd in (got, kv.vae_state_from_any(in_checkpoint), kv.vae_state_from_any(ref.state_dict())):
        assert sd.keys() == native.keys()
        assert all(torch.equal(sd[k], native[k]) for k in native)
    with pytest.raises(ValueError, match="not a VAE"):
        kv.vae_state_from_any({"model.diffusion_model.out.2.bias": torch.zeros(4)})


def test_tile_starts_cover_and_overlap():
    assert tile_starts(8, 16, 4) == [0]
    for size in (17, 24, 40, 97):
        s = tile_starts(size, 16, 4)
        assert s[0] == 0 and s[-1] == size - 16
        assert all(4 <= a + 16 - b for a, b in zip(s, s[1:]))


def test_tiled_decode_close_to_full():
    """Measured on this random 2-level VAE (24x40 latent, tile 12, overlap 3): mean |diff| 0.015, max 0.11
    (output std 0.27; over 6 seeds mean 0.009-0.015, max 0.06-0.12; tile 8 doubles both). Tiles see their
    own GroupNorm statistics and attention context, so it is not exact; a misplaced or unblended tile
    would be off by about the output's std."""
    ours = _randomise(AutoencoderKL(SMALL), 8)
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = ours.decode_latents(z)
        tiled = ours.decode_latents(z, tile=12)
        assert torch.equal(ours.decode_latents(z, tile=40), full)  # one tile: the full decode
    diff = (tiled - full).abs()
    assert tiled.shape == full.shape
    assert diff.mean() < 0.025 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_bf16_close_to_fp32():
    ours = _randomise(AutoencoderKL(THREE), 10)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.no_grad():
        lat32 = ours.encode_latents(x)
        img32 = ours.decode_latents(lat32)
        half = ours.to(torch.bfloat16)
        lat16 = half.encode_latents(x.bfloat16())
        img16 = half.decode_latents(lat32.bfloat16())
    assert lat16.dtype == img16.dtype == torch.bfloat16
    assert (lat16.float() - lat32).abs().max() < 0.05 * lat32.abs().max()
    assert (img16.float() - img32).abs().max() < 0.05 * img32.abs().max()


def test_large_attention_runs_the_flash_kernel():
    """A transposed (non-unit-stride) q/k/v sends CPU SDPA to its math kernel, which builds the whole (HW)^2
    score matrix (16 GiB for the built-in model's 1024 px decode). Allowing only the flash kernel proves it runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from easel.models.vae import MATH_ATTENTION_BYTES, AttnBlock
    block = _randomise(AttnBlock(8, 4), 12)
    side = 72
    assert side ** 4 * 4 > MATH_ATTENTION_BYTES  # large enough for the flash path
    x = torch.randn(1, 8, side, side, generator=torch.Generator().manual_seed(13))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = block(x)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = block(x)
    assert torch.allclose(out, ref, atol=1e-5)


def _count_calls():
    calls = []
    return calls, lambda: calls.append(1)


def test_decode_latents_tiles_only_large_latents(monkeypatch):
    """Automatic tiling (tiled=None) leaves small latents to the one-pass decode, bit for bit, and tiles once the
    working-set estimate passes the budget; True/False force it either way; on_tile runs after every tile."""
    from easel.models import vae as V
    ours = _randomise(AutoencoderKL(SMALL), 14)
    z = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        full = ours.decode(z / SMALL.scale_factor)
        calls, on_tile = _count_calls()
        assert torch.equal(ours.decode_latents(z, on_tile=on_tile), full)
        assert torch.equal(ours.decode_latents(z, tiled=False, on_tile=on_tile), full)
        assert len(calls) == 2 * len(SMALL.ch_mult)  # one pass each: on_tile after each decoder level
        monkeypatch.setattr(V, "TILE_BUDGET_BYTES", V.decode_elements(SMALL, 1, 24, 24) * 4)
        assert V.tile_size(SMALL, 4) == 24
        calls.clear()
        auto = ours.decode_latents(z, on_tile=on_tile)
        assert len(calls) == 2 * 2  # two images x two 24-cell tiles across 40 cells
        forced = ours.decode_latents(z, tiled=True)
    assert torch.equal(auto, forced)
    assert not torch.equal(auto, full) and (auto - full).abs().mean() < 0.03


def test_on_tile_can_cancel_a_decode():
    ours = _randomise(AutoencoderKL(SMALL), 16)
    z = torch.randn(1, 4, 32, 32)
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("cancelled")
    with torch.no_grad(), pytest.raises(KeyboardInterrupt, match="cancelled"):
        ours.decode_latents(z, tile=12, on_tile=stop)
    assert len(calls) == 2


def test_on_tile_runs_between_levels_of_an_untiled_pass():
    """A one-pass decode or encode can be cancelled too: on_tile runs after each level, and changes nothing."""
    ours = _randomise(AutoencoderKL(THREE), 21)
    z = torch.randn(1, 4, 8, 8)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain_img, plain_lat = ours.decode_latents(z), ours.encode_latents(x)
        calls, on_tile = _count_calls()
        assert torch.equal(ours.decode_latents(z, on_tile=on_tile), plain_img)
        assert len(calls) == len(THREE.ch_mult)
        assert torch.equal(ours.encode_latents(x, on_tile=on_tile), plain_lat)
        assert len(calls) == 2 * len(THREE.ch_mult)

        def stop():
            raise KeyboardInterrupt("cancelled")
        with pytest.raises(KeyboardInterrupt):
            ours.decode_latents(z, on_tile=stop)


def test_tiled_encode_close_to_full():
    """Encoding in blended tiles: same latent grid, close to the one-pass posterior (GroupNorm statistics and
    attention see one tile at a time); a misplaced tile would be off by about the latents' std (~0.3 here)."""
    ours = _randomise(AutoencoderKL(SMALL), 17)
    x = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(18)) * 2 - 1
    with torch.no_grad():
        full = ours.encode_latents(x)
        assert torch.equal(ours.encode_latents(x, tiled=None), full)  # small: one pass
        from easel.models.vae import run_tiled
        calls, on_tile = _count_calls()
        moments = run_tiled(ours._encode_full, x, 16, 4, SMALL.downsample, encode=True, on_tile=on_tile)
    assert len(calls) == 2 * 4 * 3  # a 48x32 latent in 16-cell tiles overlapping by >= 4: 4 x 3 per image
    tiled = (moments.chunk(2, dim=1)[0] - SMALL.shift_factor) * SMALL.scale_factor
    diff = (tiled - full).abs()
    assert tiled.shape == full.shape and diff.mean() < 0.1 * full.std(), (diff.mean(), full.std())


def test_tiled_decode_of_the_builtin_model_has_no_seams():
    """The trained built-in VAE: a decode in small forced tiles is close to the one-pass decode everywhere,
    also along the tile borders (a seam would show as a band of larger error there)."""
    from easel.weights.model_io import read_model
    from easel.weights.registry import builtin_model
    if builtin_model() is None:
        pytest.skip("this install has no built-in model")
    cfg, parts, _ = read_model(builtin_model())
    vae = AutoencoderKL(cfg.vae).eval()
    vae.load_state_dict(parts["vae"])
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        full = vae.decode_latents(z)
        tiled = vae.decode_latents(z, tile=24, overlap=8)
    diff = (tiled - full).abs().mean(dim=(0, 1))  # (H, W)
    # Measured (seeds 19, 20): mean |diff| 0.06-0.08 of the image's std, the same in the overlap band as
    # elsewhere: a tile's GroupNorm statistics shift its tone a little, the blend leaves no edge.
    assert diff.mean() < 0.15 * full.std(), (diff.mean(), full.std())
    f = cfg.vae.downsample
    band = slice(16 * f, 24 * f)  # tiles start at cells 0 and 16 (tile 24): they overlap over cells 16-24
    assert diff[band, :].mean() < 2 * diff.mean() and diff[:, band].mean() < 2 * diff.mean()


def test_fit_tile_keeps_the_tile_count_and_the_overlap():
    from easel.models.vae import fit_tile
    for size, tile, overlap in [(512, 362, 90), (128, 64, 16), (40, 12, 3), (97, 16, 4), (17, 16, 4), (8, 16, 4)]:
        fitted = fit_tile(size, tile, overlap)
        starts = tile_starts(size, fitted, overlap)
        assert fitted <= tile and len(starts) == len(tile_starts(size, tile, overlap))
        assert starts[-1] + fitted == size and all(a + fitted - b >= overlap for a, b in zip(starts, starts[1:]))
    assert fit_tile(512, 362, 90) == 301  # two tiles a side either way: 31% less decoding than with 362
