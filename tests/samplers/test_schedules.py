"""Noise schedules: shape, order and the formulas of k-diffusion / ComfyUI; Beta quantiles against scipy."""
import math

import numpy as np
import pytest
import torch

from easel.samplers import SCHEDULES, DiscreteSchedule, get_sigmas, make_alphas_cumprod
from easel.samplers.schedules import beta_ppf, regularized_incomplete_beta

scipy_stats = pytest.importorskip("scipy.stats")

SCHEDULE = DiscreteSchedule(make_alphas_cumprod())
STARTS_AT_SIGMA_MAX = {"normal", "karras", "exponential", "sgm_uniform", "simple", "beta"}


@pytest.mark.parametrize("steps", [1, 4, 20, 25])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_shape_and_order(name, steps):
    sigmas = SCHEDULES[name](SCHEDULE, steps)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1
    assert len(sigmas) == steps + 1  # these step counts divide 1000, and beta has no repeats at them
    assert sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all(), sigmas
    assert (sigmas[:-1] >= SCHEDULE.sigma_min * (1 - 1e-5)).all()
    if name in STARTS_AT_SIGMA_MAX:
        assert float(sigmas[0]) == pytest.approx(SCHEDULE.sigma_max, rel=1e-5)


def test_karras_formula():
    sigmas = get_sigmas(SCHEDULE, 12, "karras")[:-1].double()
    roots = sigmas ** (1 / 7)  # evenly spaced in sigma^(1/rho), rho = 7 (Karras et al. 2022, eq. 5)
    assert torch.allclose(roots.diff(), roots.diff().mean().expand(11), rtol=1e-4)
    assert float(sigmas[-1]) == pytest.approx(SCHEDULE.sigma_min, rel=1e-5)


def test_exponential_formula():
    sigmas = get_sigmas(SCHEDULE, 12, "exponential")[:-1].double()
    logs = sigmas.log()
    assert torch.allclose(logs.diff(), logs.diff().mean().expand(11), rtol=1e-4)
    assert float(sigmas[-1]) == pytest.approx(SCHEDULE.sigma_min, rel=1e-5)


def test_timestep_schedules_pick_the_expected_timesteps():
    table = SCHEDULE.sigmas
    # normal: t = linspace(T-1, 0, n) with log-sigma interpolation between integer timesteps
    t = torch.linspace(999, 0, 7)
    expected = torch.exp(torch.lerp(table[t.floor().long()].log(), table[t.ceil().long()].log(), t.frac()))
    torch.testing.assert_close(get_sigmas(SCHEDULE, 7, "normal")[:-1], expected)
    # sgm_uniform: n of n+1 evenly spaced timesteps, the t = 0 end dropped
    sgm_t = torch.tensor([999.0, 749.25, 499.5, 249.75])
    torch.testing.assert_close(get_sigmas(SCHEDULE, 4, "sgm_uniform")[:-1], SCHEDULE.t_to_sigma(sgm_t))
    # simple: every 1000/n-th trained sigma from the top
    simple_t = [999, 874, 749, 624, 499, 374, 249, 124]
    torch.testing.assert_close(get_sigmas(SCHEDULE, 8, "simple")[:-1], table[simple_t])
    # ddim_uniform: t = 1, 51, ..., 951 at 20 steps: the timesteps of SD's own DDIM config (steps_offset 1)
    torch.testing.assert_close(get_sigmas(SCHEDULE, 20, "ddim_uniform")[:-1], table[list(range(951, 0, -50))])


def test_ddim_uniform_keeps_comfyui_count_when_steps_do_not_divide():
    # 1000 // 7 = 142, and t = 1 + 142 k stays below 1000 for k = 0..7: eight sigmas, as ComfyUI gives
    assert len(get_sigmas(SCHEDULE, 7, "ddim_uniform")) == 9


def _comfy_beta_reference(steps: int, alpha: float = 0.6, beta: float = 0.6) -> list[float]:
    """ComfyUI's beta scheduler written with scipy, as the oracle."""
    ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * 999)
    out, last = [], None
    for t in ts:
        if t != last:
            out.append(float(SCHEDULE.sigmas[int(t)]))
        last = t
    return out + [0.0]


@pytest.mark.parametrize("steps", [1, 5, 20, 33, 150])
def test_beta_schedule_matches_scipy_reference(steps):
    assert get_sigmas(SCHEDULE, steps, "beta").tolist() == pytest.approx(_comfy_beta_reference(steps), rel=1e-6)


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (2.0, 5.0), (0.5, 3.0), (1.0, 1.0), (7.0, 0.8)])
def test_beta_ppf_and_cdf_match_scipy(a, b):
    for x in [1e-8, 1e-3, 0.2, 0.5, 0.77, 0.999]:
        assert regularized_incomplete_beta(x, a, b) == pytest.approx(scipy_stats.beta.cdf(x, a, b), abs=1e-12)
    for q in np.linspace(0, 1, 41):
        assert beta_ppf(float(q), a, b) == pytest.approx(scipy_stats.beta.ppf(q, a, b), abs=1e-11)


def test_get_sigmas_accepts_labels_and_explains_unknown_names():
    torch.testing.assert_close(get_sigmas(SCHEDULE, 5, "Karras"), get_sigmas(SCHEDULE, 5, "karras"))
    torch.testing.assert_close(get_sigmas(SCHEDULE, 5, "Automatic"), get_sigmas(SCHEDULE, 5, "normal"))
    torch.testing.assert_close(get_sigmas(SCHEDULE, 5, "SGM Uniform"), get_sigmas(SCHEDULE, 5, "sgm_uniform"))
    with pytest.raises(ValueError, match="karras"):
        get_sigmas(SCHEDULE, 5, "polyexponential")
    with pytest.raises(ValueError, match="at least 1"):
        get_sigmas(SCHEDULE, 0, "karras")


def test_alphas_cumprod_schedules():
    scaled = make_alphas_cumprod()
    assert math.sqrt((1 - scaled[-1]) / scaled[-1]) == pytest.approx(14.6146, abs=1e-3)
    linear = make_alphas_cumprod(1000, 0.0001, 0.02, "linear")
    expected = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(linear, expected)
    with pytest.raises(ValueError, match="scaled_linear"):
        make_alphas_cumprod(beta_schedule="cosine")
