"""The lossless fast paths (channels_last activations, flash attention in the VAE, `--dtype auto`) give the same
results as the exact NCHW path up to float rounding, on tiny random SD1 and SDXL models.

Tolerances are stated, not bit-exactness: the two layouts run different oneDNN kernels, which round differently
on different CPUs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from easel.models import layers
from easel.models.layers import exact_paths, fast_layout, use_fast_layout
from easel.models.vae import AutoencoderKL
from easel.pipelines.pipeline import Pipeline
from tests.conftest import make_tiny, random_model, tiny_config

# fp32: relative to the output's largest magnitude. The layouts only reorder the same sums.
FP32_RTOL = 1e-4
# Images: 8-bit pixels may flip by one level where a value sits on a rounding boundary.
MAX_PIXEL_LEVELS = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _conv_layouts(module: torch.nn.Module) -> list[bool]:
    """Records, for each 3x3 Conv2d call in `module` (the convolutions that carry the cost), whether its input
    was channels_last."""
    return _record(module, [])


def _record(module: torch.nn.Module, seen: list[bool]) -> list[bool]:
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            m.register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                              and args[0].shape[1] > 1))
    return seen


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vae_fast_matches_exact(family):
    cfg = tiny_config(family, 64).vae
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    seen = _record(vae.decoder, _conv_layouts(vae.encoder))
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    z = torch.randn(2, cfg.embed_dim, 6, 5)
    with torch.no_grad():
        fast_img, fast_lat = vae.decode_latents(z), vae.encode_latents(x)
        assert all(seen) and seen, "the fast path ran the VAE convolutions on channels_last inputs"
        seen.clear()
        with exact_paths():
            img, lat = vae.decode_latents(z), vae.encode_latents(x)
        assert not any(seen), "exact_paths() ran NCHW"
    assert fast_img.is_contiguous() and fast_lat.is_contiguous()  # callers may .view the results
    assert _rel(fast_img, img) < FP32_RTOL and _rel(fast_lat, lat) < FP32_RTOL


def test_vae_fast_attention_matches_math_kernel():
    """On channels_last maps the VAE's attention always runs SDPA's flash kernel (q/k/v have unit stride), also
    below MATH_ATTENTION_BYTES where the exact path keeps the math kernel."""
    from easel.models.vae import AttnBlock
    torch.manual_seed(1)
    block = AttnBlock(16, 4).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        fast = block(fast_layout(x))
        with exact_paths():
            exact = block(x)
    assert _rel(fast, exact) < FP32_RTOL


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_fast_layout_matches_exact(family):
    model = random_model(tiny_config(family, 64), seed=2)
    unet = use_fast_layout(model.unet)
    seen = _conv_layouts(unet)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    y = torch.randn(2, model.config.unet.adm_in_channels, generator=g) if model.config.unet.adm_in_channels else None
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        fast = unet(x, t, ctx, y=y)
        assert seen and all(seen)
        seen.clear()
        with exact_paths():
            exact = unet(x, t, ctx, y=y)
        assert not any(seen)
    assert fast.is_contiguous()
    assert _rel(fast, exact) < FP32_RTOL


def test_use_fast_layout_installs_once():
    model = random_model(tiny_config("sd1", 64))
    use_fast_layout(model.unet)
    use_fast_layout(model.unet)
    assert len(model.unet._forward_pre_hooks) == 1 and len(model.unet._forward_hooks) == 1


@pytest.mark.parametrize("opt_in", [False, True])
def test_load_model_runs_the_unet_channels_last_only_when_asked(monkeypatch, tiny_sd1_file, opt_in):
    """EASEL_UNET_CHANNELS_LAST=1 (read at import into UNET_CHANNELS_LAST) makes load_model install the layout
    hook; by default the UNet runs NCHW (channels_last measured slower for it on AVX-512 without AMX)."""
    from easel.weights import model_io
    monkeypatch.setattr(model_io, "UNET_CHANNELS_LAST", opt_in)
    loaded = model_io.load_model(tiny_sd1_file)
    seen = _conv_layouts(loaded.model.unet)
    cfg = loaded.model.config.unet
    with torch.no_grad():
        loaded.model.unet(torch.randn(1, 4, 8, 8), torch.tensor([5.0]), torch.randn(1, 77, cfg.context_dim))
    assert seen and all(seen) == opt_in and any(seen) == opt_in


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_txt2img_fast_matches_exact(tmp_path, family):
    pipe = Pipeline(make_tiny(tmp_path, family))
    use_fast_layout(pipe.loaded.model.unet)
    kw = dict(width=48, height=32, steps=3, seed=4, batch_size=2)
    fast = pipe.txt2img("a red star", **kw)
    with exact_paths():
        exact = pipe.txt2img("a red star", **kw)
    for a, b in zip(fast, exact):
        d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert int(d.max()) <= MAX_PIXEL_LEVELS


def test_bf16_fast_matches_exact_within_bf16_rounding():
    model = random_model(tiny_config("sd1", 64), seed=5).to(torch.bfloat16)
    unet = use_fast_layout(model.unet)
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, model.config.unet.context_dim, generator=g)
    with torch.no_grad():
        fast = unet(x, torch.tensor([400.0]), ctx)
        with exact_paths():
            exact = unet(x, torch.tensor([400.0]), ctx)
    assert _rel(fast, exact) < 0.05  # bf16 keeps 8 bits of mantissa: a few roundings of 2^-8 each


def test_exact_paths_restores_the_switch():
    before = layers.FAST_PATHS
    with pytest.raises(RuntimeError):
        with exact_paths():
            assert layers.FAST_PATHS is False
            raise RuntimeError
    assert layers.FAST_PATHS is before


def test_fast_layout_leaves_other_tensors_alone():
    assert fast_layout(torch.zeros(2, 3)).is_contiguous()
    x = torch.zeros(1, 4, 3, 3)
    with exact_paths():
        assert fast_layout(x) is x
    assert fast_layout(x).is_contiguous(memory_format=torch.channels_last) == layers.FAST_PATHS


@pytest.mark.parametrize("probe, expected", [((True, False), "bf16"), ((False, True), "bf16"),
                                             ((False, False), "fp32")])
def test_auto_dtype_follows_the_cpu(monkeypatch, probe, expected):
    from easel.weights import model_io
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probe[0], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probe[1], raising=False)
    assert model_io.auto_dtype("cpu") == expected
    assert model_io.parse_dtype("auto") == model_io.DTYPES[expected]


def test_unknown_dtype_names_auto():
    from easel.weights.model_io import parse_dtype
    with pytest.raises(ValueError, match="auto"):
        parse_dtype("int4")


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_keeps_the_vae_in_fp32_without_amx(monkeypatch, amx, expected):
    """bf16 convolutions are slower than fp32 on AVX512-BF16 without AMX, and the VAE is nearly all convolutions."""
    from easel.pipelines.memory import _vae_itemsize
    from easel.weights import model_io
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert model_io.vae_dtype_for("auto") == expected
    assert _vae_itemsize("auto") == expected.itemsize
    assert model_io.vae_dtype_for("fp16") == torch.float32 and model_io.vae_dtype_for("bf16") == torch.bfloat16


def test_load_model_auto(monkeypatch, tiny_sd1_file):
    from easel.weights import model_io
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    loaded = model_io.load_model(tiny_sd1_file, dtype="auto")
    model = loaded.model
    assert model.dtype == torch.bfloat16 and next(model.vae.parameters()).dtype == torch.float32
    images = Pipeline(loaded, dtype="auto").txt2img("a red star", width=32, height=32, steps=2, seed=1)
    assert images[0].size == (32, 32)


def test_cli_takes_dtype_auto():
    from easel.cli import build_parser
    assert build_parser().parse_args(["generate", "three red stars", "--dtype", "auto"]).dtype == "auto"
