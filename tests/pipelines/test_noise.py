"""Variation seeds: subseed slerp and 'resize seed from' (A1111 semantics)."""
import pytest
import torch

from easel.pipelines.common import initial_noise
from easel.pipelines.noise import paste_centred, slerp, variation_noise

SHAPE = (4, 16, 24)


def test_strength_zero_is_plain_noise_and_same_generator_stream():
    plain, plain_src = initial_noise([3, 4], SHAPE)
    ours, src = variation_noise([3, 4], SHAPE, subseeds=[9, 10], subseed_strength=0.0)
    assert torch.equal(ours, plain)
    like = torch.empty(2, *SHAPE)
    assert torch.equal(src(like), plain_src(like))  # ancestral samplers see the same continuation


def test_strength_one_is_the_subseeds_noise():
    ours, _ = variation_noise([3, 4], SHAPE, subseeds=[9, 10], subseed_strength=1.0)
    theirs, _ = initial_noise([9, 10], SHAPE)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The seed's own generator still drives the sampler's later noise, as in A1111.
    _, src = variation_noise([3], SHAPE, subseeds=[9], subseed_strength=1.0)
    _, plain_src = initial_noise([3], SHAPE)
    assert torch.equal(src(torch.empty(1, *SHAPE)), plain_src(torch.empty(1, *SHAPE)))


def test_intermediate_strength_keeps_unit_variance_and_moves_gradually():
    a, _ = initial_noise([1], (4, 64, 64))
    b, _ = initial_noise([2], (4, 64, 64))
    dist = []
    for t in (0.1, 0.5, 0.9):
        x, _ = variation_noise([1], (4, 64, 64), subseeds=[2], subseed_strength=t)
        assert 0.95 < x.std().item() < 1.05  # a plain lerp at t=0.5 would give std ~0.71
        dist.append(((x - a).norm() / (b - a).norm()).item())
    assert dist[0] < dist[1] < dist[2] and 0.05 < dist[0] and dist[2] < 0.95


def test_missing_subseeds_count_as_zero():
    x, _ = variation_noise([3, 4], SHAPE, subseeds=[9], subseed_strength=0.4)
    y, _ = variation_noise([4], SHAPE, subseeds=[0], subseed_strength=0.4)
    assert torch.equal(x[1], y[0])


def test_slerp_parallel_inputs_fall_back_to_lerp():
    a = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(slerp(0.3, a, a), a * 0.7 + a * 0.3)
    assert torch.isfinite(slerp(0.3, a, a * 1.0000001)).all()


def test_resized_seed_keeps_composition_when_widening():
    # Found at 64x64 (8x8 latents), regenerated at 96x64: the centre of the new noise is the old noise.
    small, _ = variation_noise([5], (4, 8, 8))
    wide, src = variation_noise([5], (4, 8, 12), seed_resize_from=(64, 64))
    assert torch.equal(wide[0, :, :, 2:10], small[0])
    # Outside the pasted window it is the seed's own full-size draw, and that generator continues.
    canvas, canvas_src = initial_noise([5], (4, 8, 12))
    assert torch.equal(wide[0, :, :, :2], canvas[0, :, :, :2]) and torch.equal(wide[0, :, :, 10:], canvas[0, :, :, 10:])
    assert torch.equal(src(torch.empty(1, 4, 8, 12)), canvas_src(torch.empty(1, 4, 8, 12)))


def test_resized_seed_crops_the_centre_when_shrinking_and_mixes_at_the_old_size():
    big, _ = variation_noise([5], (4, 8, 12), subseeds=[6], subseed_strength=0.3)
    narrow, _ = variation_noise([5], (4, 8, 8), subseeds=[6], subseed_strength=0.3, seed_resize_from=(96, 64))
    assert torch.equal(narrow[0], big[0, :, :, 2:10])


def test_paste_centred_rounds_offsets_down_like_a1111():
    src = torch.arange(3.0).view(1, 1, 3)
    out = paste_centred(src, torch.full((1, 1, 6), -1.0))  # (6 - 3) // 2 = 1
    assert out.flatten().tolist() == [-1, 0, 1, 2, -1, -1]
    out = paste_centred(torch.arange(8.0).view(1, 1, 8), torch.full((1, 1, 5), -1.0))  # (5 - 8) // 2 = -2
    assert out.flatten().tolist() == [2, 3, 4, 5, -1]


@pytest.mark.parametrize("resize", [None, (0, 0), (64, 0)])
def test_resize_off_values(resize):
    assert torch.equal(variation_noise([1], SHAPE, seed_resize_from=resize)[0], initial_noise([1], SHAPE)[0])


def test_too_small_resize_names_the_fix():
    with pytest.raises(ValueError, match="smaller than one latent cell"):
        variation_noise([1], SHAPE, seed_resize_from=(4, 64))
