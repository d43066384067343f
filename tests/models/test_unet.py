"""UNet parity with diffusers `UNet2DConditionModel` on tiny SD1 / SD2 / SDXL / inpaint layouts."""
import dataclasses

import pytest
import torch

from easel.models.configs import UNetConfig
from easel.models.unet import UNetModel, sdxl_size_embedding, sdxl_vector
from easel.weights.keys_unet import diffusers_config, from_diffusers, to_diffusers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""

SD1_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_heads=4,
                      context_dim=32, norm_groups=8)
SD2_TINY = dataclasses.replace(SD1_TINY, num_head_channels=8, use_linear_in_transformer=True, context_dim=24)
SDXL_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
                       num_head_channels=8, context_dim=32, use_linear_in_transformer=True,
                       adm_in_channels=16 + 6 * 256, norm_groups=16)
INPAINT_TINY = dataclasses.replace(SD1_TINY, in_channels=9)


def _pair(cfg: UNetConfig, seed: int = 0):
    """A diffusers UNet with perturbed random weights and an easel UNet loaded from it (strict)."""
    torch.manual_seed(seed)
    theirs = diffusers.UNet2DConditionModel.from_config(diffusers_config(cfg)).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # perturb norms (all ones/zeros at init) so a swapped key would show
            p.add_(torch.randn_like(p) * 0.05)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True)
    return ours, theirs


def _inputs(cfg: UNetConfig, h: int = 16, w: int = 16, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([10.0, 537.5, 999.0][:batch])
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY, INPAINT_TINY], ids=["sd1", "sd2", "inpaint"])
def test_parity_with_diffusers(cfg):
    ours, theirs = _pair(cfg)
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == (2, cfg.out_channels, 16, 16)
    assert b.abs().mean() > 0.1  # outputs are not trivially zero
    assert (a - b).abs().max() < 1e-4


def test_parity_sdxl_with_size_conditioning():
    cfg = SDXL_TINY
    ours, theirs = _pair(cfg)
    x, t, ctx = _inputs(cfg)
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    sizes = dict(original_size=(768, 1024), crops=(16, 32), target_size=(1024, 896))
    time_ids = torch.tensor([[768, 1024, 16, 32, 1024, 896]] * 2, dtype=torch.float32)
    with torch.no_grad():
        a = ours(x, t, ctx, y=sdxl_vector(pooled, **sizes))
        b = theirs(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        c = ours(x, t, ctx, y=sdxl_vector(pooled))  # different sizes must change the output
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3


def test_sdxl_vector_matches_diffusers_add_time_proj():
    theirs = diffusers.UNet2DConditionModel.from_config(diffusers_config(SDXL_TINY))
    pooled = torch.randn(3, 1280)
    time_ids = torch.tensor([[1024, 768, 0, 8, 1024, 1024]] * 3, dtype=torch.float32)
    want = torch.cat([pooled, theirs.add_time_proj(time_ids.flatten()).reshape(3, -1)], dim=-1)
    got = sdxl_vector(pooled, (1024, 768), (0, 8), (1024, 1024))
    assert got.shape == (3, 2816)
    assert (got - want).abs().max() < 1e-6
    assert sdxl_size_embedding((1024, 768), (0, 8), (1024, 1024), 3).shape == (3, 1536)


@pytest.mark.parametrize("h,w", [(12, 20), (13, 17)])
def test_parity_non_power_of_two_sizes(h, w):
    ours, theirs = _pair(SD2_TINY)
    x, t, ctx = _inputs(SD2_TINY, h, w)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == (2, 4, h, w)
    assert (a - b).abs().max() < 1e-4


def test_gradients_match_diffusers():
    """In-place ops in the forward must leave training gradients intact."""
    cfg = SD2_TINY
    ours, theirs = _pair(cfg)
    x, t, ctx = _inputs(cfg, 8, 8)
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xa, t, ctx) * w).sum().backward()
    (theirs(xb, t, encoder_hidden_states=ctx).sample * w).sum().backward()
    assert (xa.grad - xb.grad).abs().max() < 1e-4 * xb.grad.abs().max()
    grads = to_diffusers({k: p.grad for k, p in ours.named_parameters()}, cfg)
    for k, p in theirs.named_parameters():
        assert (grads[k] - p.grad).abs().max() <= 1e-4 * (1 + p.grad.abs().max()), k


def test_bf16_weights_take_fp32_inputs():
    ours, _ = _pair(SD1_TINY)
    x, t, ctx = _inputs(SD1_TINY)
    with torch.no_grad():
        ref = ours(x, t, ctx)
        out = ours.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_middle_without_attention_and_zero_init():
    cfg = dataclasses.replace(SD1_TINY, transformer_depth_middle=0)
    model = UNetModel(cfg)
    assert not any(k.startswith("middle_block.2") for k in model.state_dict())
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape and out.abs().max() == 0  # CompVis zero-inits the output conv


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="sdxl_vector"):
        UNetModel(SDXL_TINY)(*_inputs(SDXL_TINY))
    with pytest.raises(ValueError, match="y=None"):
        UNetModel(SD1_TINY)(*_inputs(SD1_TINY), y=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="inpainting"):
        UNetModel(INPAINT_TINY)(*_inputs(SD1_TINY))
    with pytest.raises(ValueError, match="heads"):
        UNetModel(dataclasses.replace(SD1_TINY, num_heads=5))
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(dataclasses.replace(SD1_TINY, transformer_depth=(1, 1)))


def test_cross_attention_runs_the_flash_kernel():
    """Heads split as views whose last dimension has unit stride: CPU SDPA's flash kernel accepts them, so no
    (T, S) score matrix is built (a strided view would fall back to the math kernel: 34 GiB at 1024 px on SD).
    Allowing only the flash kernel proves it runs, for self- and cross-attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from easel.models.layers import CrossAttention
    torch.manual_seed(20)
    self_attn, cross = CrossAttention(32, None, 4, 8).eval(), CrossAttention(32, 24, 4, 8).eval()
    x, ctx = torch.randn(2, 1024, 32), torch.randn(2, 77, 24)
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fast = self_attn(x), cross(x, ctx)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = self_attn(x), cross(x, ctx)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, atol=1e-5)
