"""`easel inspect noise`: forward diffusion and the schedule plots agree with the model's schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from easel.cli import main
from easel.inspect import noise as nz
from easel.samplers.denoisers import DiscreteSchedule, make_alphas_cumprod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_CACHE", str(tmp_path / "cache"))


def sd_schedule() -> DiscreteSchedule:
    return DiscreteSchedule(make_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear"))


def test_noised_latents_have_the_variance_the_schedule_says():
    schedule = sd_schedule()
    latent = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.3
    row = nz.noise_row(latent, schedule, [0, 250, 500, 750, 999], seed=3)
    for n in row:
        assert n.sigma == pytest.approx(float(schedule.sigmas[n.t]))
        added = (n.x - latent).double()
        # 16384 samples: the variance estimate's relative error is about sqrt(2 / N) = 1.1%
        assert float(added.var()) == pytest.approx(n.sigma ** 2, rel=0.06)
        assert float(added.mean()) == pytest.approx(0.0, abs=4 * n.sigma / 128)
        assert torch.allclose(n.x, latent + n.sigma * n.eps)  # x_t = latent + sigma_t * eps, eps the target


def test_schedule_plot_data_is_the_schedule():
    schedule = sd_schedule()
    s = nz.schedule_series(schedule)
    assert np.array_equal(s["sigmas"], schedule.sigmas.double().numpy())  # what the samplers' sigmas come from
    assert np.array_equal(s["alphas_cumprod"], schedule.alphas_cumprod.numpy())
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert np.allclose(s["betas"], betas, rtol=1e-9)
    assert np.allclose(s["SNR"], 1 / s["sigmas"] ** 2, rtol=1e-5)


def test_row_timesteps_spread_and_check():
    assert nz.row_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    with pytest.raises(ValueError, match="at least 2"):
        nz.row_timesteps(1000, 1)


def test_noise_command_writes_the_figures(tmp_path, capsys):
    out = tmp_path / "noise"
    assert main(["inspect", "noise", "--count", "2", "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / n) for n in ("image.png", "noise.png", "schedule.png")]
    assert Image.open(out / "image.png").size == (64, 64)  # a ShapeWorld render at the built-in model's size
    assert Image.open(out / "noise.png").width > 500
    assert main(["inspect", "noise", "--count", "2", "--width", "96", "--height", "64", "-o", str(out)]) == 0
    assert Image.open(out / "image.png").size == (96, 64)  # cut from a square render, not stretched
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "mine.png")
    assert main(["inspect", "noise", str(tmp_path / "mine.png"), "--count", "2", "-o", str(out)]) == 0


def test_noise_command_bad_input_is_one_line_errors(tmp_path, capsys):
    assert main(["inspect", "noise", "--count", "1", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "easel: error: --count must be at least 2 (got 1)"
    assert main(["inspect", "noise", str(tmp_path / "missing.png"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("easel: error:") and "missing.png" in err and "\n" not in err
