"""Samplers on an analytic problem: data ~ N(mu, s^2) per dimension, where the exact denoiser is known.

For Gaussian data the posterior mean is E[x0 | x_sigma] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and
the probability-flow ODE has the closed form x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""
import math

import pytest
import torch

from easel.samplers import (
    SAMPLER_LABELS,
    SAMPLERS,
    SCHEDULE_LABELS,
    CFGDenoiser,
    DiscreteSchedule,
    EpsDenoiser,
    NoiseSource,
    VDenoiser,
    append_dims,
    get_sigmas,
    make_alphas_cumprod,
    resolve_sampler,
    sample,
)

DIM = 8
MU = torch.linspace(-1.0, 1.5, DIM)
S = torch.linspace(0.5, 1.5, DIM)
SCHEDULE = DiscreteSchedule(make_alphas_cumprod())


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(MU, S^2) and x = x0 + sigma * noise."""
    s2 = append_dims(sigma, x.ndim) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def consistency_function(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact probability-flow ODE map from (x, sigma) to sigma = 0: what an ideal LCM predicts."""
    sg = append_dims(sigma, x.ndim)
    return MU + (x - MU) * S / torch.sqrt(S**2 + sg**2)


def ode_solution(x_t: torch.Tensor, sigma_t: float) -> torch.Tensor:
    return MU + (x_t - MU) * S / torch.sqrt(S**2 + sigma_t**2)


DETERMINISTIC = {  # name -> order of accuracy
    "euler": 1, "ddim": 1, "heun": 2, "dpm_2": 2, "lms": 2, "dpmpp_2m": 2, "plms": 2, "uni_pc": 2, "uni_pc_bh2": 2,
}
STOCHASTIC = {  # name -> (options, denoiser, order)
    "euler_a": ({}, gaussian_denoiser, 1),
    "ddpm": ({}, gaussian_denoiser, 1),
    "ddim_eta": ({"eta": 1.0}, gaussian_denoiser, 1),
    "euler_churn": ({"s_churn": 5.0}, gaussian_denoiser, 1),
    "heun_churn": ({"s_churn": 5.0}, gaussian_denoiser, 2),
    "dpm_2_a": ({}, gaussian_denoiser, 2),
    "dpmpp_2m_sde": ({}, gaussian_denoiser, 2),
    "dpmpp_sde": ({}, gaussian_denoiser, 2),
    "dpmpp_2s_a": ({}, gaussian_denoiser, 2),
    "lcm": ({}, consistency_function, 2),
}


def test_every_sampler_is_tested():
    stochastic_names = {k.split("_eta")[0].split("_churn")[0] for k in STOCHASTIC}
    assert set(SAMPLERS) == set(DETERMINISTIC) | stochastic_names


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_follow_the_ode(name, schedule):
    z = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (10, 40):
        sigmas = get_sigmas(SCHEDULE, steps, schedule)
        x_t = z * sigmas[0]
        # UniPC defaults to order 3 (A1111, ComfyUI), which is at this toy's float floor by 40 steps; the
        # convergence rate is checked at order 2 and order 3's extra accuracy below
        options = {"order": 2} if name.startswith("uni_pc") else {}
        out = SAMPLERS[name](gaussian_denoiser, x_t, sigmas, **options)
        errors[steps] = float((out - ode_solution(x_t, float(sigmas[0]))).abs().max())
    order = DETERMINISTIC[name]
    # 4x the steps must cut the error by at least half the factor the method's order promises
    assert errors[40] < errors[10] * 2 / 4**order, errors
    assert errors[40] < (0.25 if order == 1 else 0.03), errors


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_unipc_default_order_3_beats_order_2_at_few_steps(name):
    z = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0))
    sigmas = get_sigmas(SCHEDULE, 10, "karras")
    err = {o: float((SAMPLERS[name](gaussian_denoiser, z * sigmas[0], sigmas, **({} if o == 3 else {"order": o}))
                     - ode_solution(z * sigmas[0], float(sigmas[0]))).abs().max()) for o in (2, 3)}
    assert err[3] < err[2] * 0.75, err


def _moments(name: str, schedule: str, steps: int, n: int = 10000) -> tuple[float, float]:
    options, denoiser, _ = STOCHASTIC[name]
    sigmas = get_sigmas(SCHEDULE, steps, schedule)
    z = torch.randn(n, DIM, generator=torch.Generator().manual_seed(1))
    # start from the exact marginal at sigma_max, so the ideal result is exactly N(MU, S^2)
    x_t = MU + z * torch.sqrt(S**2 + sigmas[0] ** 2)
    gen = torch.Generator().manual_seed(2)
    batched_noise = lambda like: torch.randn(like.shape, generator=gen)  # noqa: E731  (fast for 10k rows)
    out = SAMPLERS[name.split("_eta")[0].split("_churn")[0]](denoiser, x_t, sigmas, noise=batched_noise, **options)
    return float((out.mean(0) - MU).abs().max()), float((out.std(0) / S - 1).abs().max())


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_sample_the_data_distribution(name, schedule):
    mean_err, std_err = _moments(name, schedule, 40)
    _, coarse_std_err = _moments(name, schedule, 10)
    order = STOCHASTIC[name][2]
    assert mean_err < 0.06  # 4 standard errors of a 10k-sample mean at s = 1.5
    assert std_err < (0.12 if order == 1 else 0.03), (mean_err, std_err)
    assert std_err < coarse_std_err or std_err < 0.02  # more steps, less bias (LCM is exact at any count)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_reports_every_step(name):
    sigmas = get_sigmas(SCHEDULE, 6, "karras")
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    seen = []
    SAMPLERS[name](gaussian_denoiser, x, sigmas, callback=seen.append, noise=NoiseSource.from_seed([1, 2]))
    assert [info["i"] for info in seen] == list(range(6))
    for info in seen:
        assert {"i", "x", "sigma", "sigma_next", "denoised"} <= set(info)
        assert info["x"].shape == x.shape and info["denoised"].shape == x.shape
    assert [info["sigma"] for info in seen] == pytest.approx(sigmas[:-1].tolist())
    assert [info["sigma_next"] for info in seen] == pytest.approx(sigmas[1:].tolist())


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_raising_callback_cancels(name):
    calls = []

    def counting_denoiser(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    def cancel(info):
        if info["i"] == 2:
            raise Cancelled

    sigmas = get_sigmas(SCHEDULE, 20, "karras")
    with pytest.raises(Cancelled):
        SAMPLERS[name](counting_denoiser, torch.randn(1, DIM) * sigmas[0], sigmas, callback=cancel,
                       noise=NoiseSource.from_seed([0]))
    assert len(calls) <= 6  # at most two evaluations per step for steps 0..2: nothing ran after the cancel


def test_noise_source_is_per_seed_and_device_independent():
    like = torch.empty(3, 4, 8, 8, dtype=torch.float16)
    batch = NoiseSource.from_seed([5, 7, 9])(like)
    alone = NoiseSource.from_seed([7])(like[:1])
    assert batch.dtype == torch.float16 and batch.shape == like.shape
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(9)).half()
    assert torch.equal(batch[2], expected)
    with pytest.raises(ValueError, match="one seed per image"):
        NoiseSource.from_seed([1, 2])(like)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(name):
    sigmas = get_sigmas(SCHEDULE, 8, "karras")
    start = torch.randn(3, DIM, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    batch = SAMPLERS[name](gaussian_denoiser, start, sigmas, noise=NoiseSource.from_seed([10, 11, 12]))
    alone = SAMPLERS[name](gaussian_denoiser, start[1:2], sigmas, noise=NoiseSource.from_seed([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
    again = SAMPLERS[name](gaussian_denoiser, start, sigmas, noise=NoiseSource.from_seed([10, 11, 13]))
    assert not torch.allclose(batch[2], again[2])  # the noise really comes from the source


def test_stochastic_sampler_without_noise_source_follows_global_seed():
    sigmas = get_sigmas(SCHEDULE, 5, "karras")
    x = torch.ones(2, DIM) * sigmas[0]
    torch.manual_seed(3)
    a = SAMPLERS["euler_a"](gaussian_denoiser, x, sigmas)
    torch.manual_seed(3)
    b = SAMPLERS["euler_a"](gaussian_denoiser, x, sigmas)
    torch.manual_seed(4)
    c = SAMPLERS["euler_a"](gaussian_denoiser, x, sigmas)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- denoiser wrappers -------------------------------------------------------------------------


def test_eps_and_v_denoisers_recover_x0_from_a_perfect_network():
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t_index = torch.tensor([0, 10, 500, 999])
    sigma = SCHEDULE.sigmas[t_index]
    s = append_dims(sigma, 4)
    seen_t = []

    def eps_net(x_in, t):
        seen_t.append(t)
        torch.testing.assert_close(x_in, (x0 + s * noise) / torch.sqrt(s**2 + 1))  # the VP-scaled input
        return noise

    def v_net(x_in, t):
        return (noise - s * x0) / torch.sqrt(s**2 + 1)  # v = sqrt(a) eps - sqrt(1-a) x0

    torch.testing.assert_close(EpsDenoiser(eps_net, SCHEDULE)(x0 + s * noise, sigma), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(VDenoiser(v_net, SCHEDULE)(x0 + s * noise, sigma), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen_t[0], t_index.float(), rtol=0, atol=1e-3)
    assert float(EpsDenoiser(eps_net, SCHEDULE).loss(x0, noise, sigma)) == pytest.approx(0, abs=1e-10)
    assert float(VDenoiser(v_net, SCHEDULE).loss(x0, noise, sigma)) == pytest.approx(0, abs=1e-10)


def test_losses_and_min_snr_weights():
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    zero_net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    per_item = EpsDenoiser(zero_net, SCHEDULE).loss(x0, noise, sigma, reduce=False)
    torch.testing.assert_close(per_item, noise.pow(2).flatten(1).mean(1))
    weighted = EpsDenoiser(zero_net, SCHEDULE).loss(x0, noise, sigma, reduce=False, min_snr_gamma=5.0)
    snr = sigma**-2
    torch.testing.assert_close(weighted, per_item * snr.clamp(max=5) / snr)
    v_weighted = VDenoiser(zero_net, SCHEDULE).loss(x0, noise, sigma, reduce=False, min_snr_gamma=5.0)
    v_target = (noise - append_dims(sigma, 4) * x0) / torch.sqrt(append_dims(sigma, 4) ** 2 + 1)
    torch.testing.assert_close(v_weighted, v_target.pow(2).flatten(1).mean(1) * snr.clamp(max=5) / (snr + 1))


def test_cfg_is_one_batched_call_and_skips_uncond_at_scale_one():
    calls = []

    def inner(x, sigma, context, y=None):
        calls.append((x.shape[0], context.shape[0]))
        return x * 0.5 + context.mean(dim=(1, 2))[:, None]

    x, sigma = torch.randn(2, 3), torch.full((2,), 2.0)
    cond, uncond = {"context": torch.randn(2, 4, 5), "y": None}, {"context": torch.randn(1, 4, 5), "y": None}
    guided = CFGDenoiser(inner, cond, uncond, scale=7.5)(x, sigma)
    assert calls == [(4, 4)]
    c, u = inner(x, sigma, cond["context"]), inner(x, sigma, uncond["context"].expand(2, 4, 5))
    torch.testing.assert_close(guided, u + 7.5 * (c - u))
    calls.clear()
    torch.testing.assert_close(CFGDenoiser(inner, cond, uncond, scale=1.0)(x, sigma), c)
    assert calls == [(2, 2)]
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(inner, cond, {"context": uncond["context"]}, scale=3.0)(x, sigma)


def test_sigma_t_round_trip():
    t = torch.tensor([0.0, 0.25, 10.5, 500.0, 998.75, 999.0])
    torch.testing.assert_close(SCHEDULE.sigma_to_t(SCHEDULE.t_to_sigma(t)), t, rtol=0, atol=2e-3)
    assert SCHEDULE.sigma_to_t(torch.tensor([SCHEDULE.sigmas[37]]), quantize=True).item() == 37
    assert SCHEDULE.sigma_max == pytest.approx(14.6146, abs=1e-3)  # the value SD users see in A1111 logs
    assert SCHEDULE.sigma_min == pytest.approx(0.0292, abs=1e-4)


# ---- names ---------------------------------------------------------------------------------------


def test_labels_cover_registries():
    assert set(SAMPLER_LABELS) == set(SAMPLERS)
    from easel.samplers import SCHEDULES

    assert set(SCHEDULE_LABELS) == set(SCHEDULES)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("euler_a", ("euler_a", None)),
        ("Euler a", ("euler_a", None)),
        ("DPM++ 2M", ("dpmpp_2m", None)),
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("dpm++ 2m sde exponential", ("dpmpp_2m_sde", "exponential")),
        ("DPM++ SDE Karras", ("dpmpp_sde", "karras")),
        ("k_dpmpp_2m_ka", ("dpmpp_2m", "karras")),
        ("UniPC", ("uni_pc", None)),
        ("uni_pc_bh2", ("uni_pc_bh2", None)),
        ("UniPC BH2", ("uni_pc_bh2", None)),
        ("DDIM", ("ddim", None)),
        ("Euler SGM Uniform", ("euler", "sgm_uniform")),
        ("LCM", ("lcm", None)),
    ],
)
def test_resolve_sampler(name, expected):
    assert resolve_sampler(name) == expected


def test_resolve_sampler_rejects_unknown_names_with_choices():
    with pytest.raises(ValueError, match="dpmpp_2m"):
        resolve_sampler("DPM fast")


def test_sample_convenience_runs_labels_and_refuses_embedded_schedules():
    sigmas = get_sigmas(SCHEDULE, 10, "karras")
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    expected = SAMPLERS["heun"](gaussian_denoiser, x, sigmas)
    torch.testing.assert_close(sample(gaussian_denoiser, x, sigmas, "Heun"), expected)
    with pytest.raises(ValueError, match="get_sigmas"):
        sample(gaussian_denoiser, x, sigmas, "DPM++ 2M Karras")
