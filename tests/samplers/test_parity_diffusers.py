"""Parity of our samplers with the diffusers schedulers that implement the same algorithm.

Both loops see the same sigmas (taken from the diffusers scheduler), the same eps-network (a tiny
fixed random conv net of (x, t), called on the timestep each side derives), and the same noise
(diffusers draws per image from a list of CPU generators, as our NoiseSource does).

Not compared, because no diffusers scheduler runs the same algorithm:
- dpmpp_sde: diffusers' DPMSolverSDEScheduler draws from a torchsde Brownian tree; ours draws independent noise.
- dpmpp_2s_a: diffusers has no ancestral single-step DPM-Solver++(2S).
"""
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from easel.samplers import SAMPLERS, DiscreteSchedule, EpsDenoiser, NoiseSource, VDenoiser  # noqa: E402

# diffusers' schedulers trip numpy 2's __array__ deprecations on every step
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEEDS = [11, 12]
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


class TinyNet(nn.Module):
    """A fixed nonlinear function of (x, t): a residual two-layer conv net with a timestep embedding."""

    def __init__(self, channels: int = 4, hidden: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_proj = nn.Linear(4, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # (B,)
        feats = torch.stack([torch.sin(t / 150), torch.cos(t / 150), torch.sin(t / 400), t / 1000], dim=-1)
        h = torch.nn.functional.silu(self.conv_in(x) + self.t_proj(feats)[:, :, None, None])
        return x + 0.5 * torch.tanh(self.conv_out(h))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Every test here runs single-threaded (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def net():
    return TinyNet().eval()


@pytest.fixture(scope="module")
def start_noise():
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))


def _generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _vp_sigmas(sched) -> torch.Tensor:
    """Sigmas of a VP scheduler's timesteps (repeats dropped), ending in 0."""
    a = sched.alphas_cumprod.double()
    t = torch.unique_consecutive(sched.timesteps.long())
    return torch.cat([((1 - a[t]) / a[t]).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


def _run_diffusers(sched, net, x, stochastic: bool, step_kwargs: dict | None = None) -> torch.Tensor:
    kw = dict(step_kwargs or {}, **({"generator": _generators()} if stochastic else {}))
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(sched.scale_model_input(x, t), t)
            x = sched.step(out, t, x, **kw).prev_sample
    return x


def _run_ours(name, net, sched, sigmas, noise, options=None, v=False) -> torch.Tensor:
    denoiser = (VDenoiser if v else EpsDenoiser)(net, DiscreteSchedule(sched.alphas_cumprod))
    source = NoiseSource.from_seed(SEEDS)
    with torch.no_grad():
        return SAMPLERS[name](denoiser, noise * sigmas[0], sigmas, noise=source, **(options or {}))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 2e-5) -> None:
    """Max abs difference within rtol of the result's scale (measured: <= 3e-6 relative for every case)."""
    scale = max(1.0, float(theirs.abs().max()))
    err = float((ours - theirs).abs().max())
    assert torch.isfinite(ours).all()
    assert err <= rtol * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


def _case_id(value) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items())
    return value if isinstance(value, str) else ""


CASE_FIELDS = "name,cls,config,stochastic,steps,options"
TRAILING = dict(timestep_spacing="trailing")

# (our sampler, diffusers scheduler, its config, stochastic, steps, our options)
# "trailing" spacing gives integer timesteps, whose sigmas our log-sigma interpolation maps back exactly;
# diffusers' default "linspace" interpolates sigma linearly at fractional t, which no log-sigma map inverts.
# The Karras case checks fractional timesteps: there diffusers maps sigma -> t in log-sigma, as we do.
VE_CASES = [
    ("euler", "EulerDiscreteScheduler", TRAILING, False, 12, {}),
    ("euler", "EulerDiscreteScheduler", dict(use_karras_sigmas=True), False, 12, {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", TRAILING, True, 12, {}),
    ("heun", "HeunDiscreteScheduler", TRAILING, False, 8, {}),
    ("dpm_2", "KDPM2DiscreteScheduler", TRAILING, False, 8, {}),
    ("dpm_2_a", "KDPM2AncestralDiscreteScheduler", TRAILING, True, 8, {}),
    ("lms", "LMSDiscreteScheduler", TRAILING, False, 12, {}),
]


@pytest.mark.parametrize(CASE_FIELDS, VE_CASES, ids=_case_id)
def test_k_style_parity(name, cls, config, stochastic, steps, options, net, start_noise):
    sched = getattr(diffusers, cls)(**SD_BETAS, **config)
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas)  # Heun/KDPM2 list each sigma twice
    theirs = _run_diffusers(sched, net, start_noise * sigmas[0], stochastic)
    ours = _run_ours(name, net, sched, sigmas, start_noise, options)
    _assert_close(ours, theirs)


# Schedulers that keep the latent in the VP scale x_vp = x / sqrt(sigma^2 + 1). DDIM, PNDM and DDPM
# need set_alpha_to_one / clip_sample=False to end exactly at sigma = 0 without clipping x0.
DDIM = dict(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
VP_CASES = [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, False, 12, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(lower_order_final=False), False, 20, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), True, 12, {}),
    ("uni_pc_bh2", "UniPCMultistepScheduler", {}, False, 12, dict(order=2)),
    ("uni_pc_bh2", "UniPCMultistepScheduler", dict(solver_order=3), False, 12, {}),
    # diffusers' bh1 step to sigma = 0 computes inf * 0 = nan, so these cases stop at sigma_min
    ("uni_pc", "UniPCMultistepScheduler", dict(solver_type="bh1", final_sigmas_type="sigma_min"), False, 10,
     dict(order=2)),
    ("uni_pc", "UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
     False, 10, {}),
    ("ddim", "DDIMScheduler", DDIM, False, 10, {}),
    ("ddim", "DDIMScheduler", DDIM, True, 10, dict(eta=0.5)),
    ("ddpm", "DDPMScheduler", dict(timestep_spacing="trailing", clip_sample=False), True, 10, {}),
    ("plms", "PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="trailing", set_alpha_to_one=True), False, 10,
     {}),
    ("lcm", "LCMScheduler", {}, True, 4, {}),
]


@pytest.mark.parametrize(CASE_FIELDS, VP_CASES, ids=_case_id)
def test_vp_parity(name, cls, config, stochastic, steps, options, net, start_noise):
    sched = getattr(diffusers, cls)(**SD_BETAS, **config)
    sched.set_timesteps(steps)
    # DPM-Solver and UniPC publish their sigmas; the others only timesteps
    sigmas = sched.sigmas.float() if cls.startswith(("DPM", "UniPC")) else _vp_sigmas(sched)
    assert len(sigmas) == steps + 1
    to_vp = 1 / (sigmas[0] ** 2 + 1) ** 0.5
    step_kwargs = {"eta": options["eta"]} if "eta" in options else {}  # DDIM takes eta per step call
    theirs_vp = _run_diffusers(sched, net, start_noise * sigmas[0] * to_vp, stochastic, step_kwargs)
    theirs = theirs_vp * (sigmas[-1] ** 2 + 1) ** 0.5  # back to sigma scale (a no-op at sigma = 0)
    ours = _run_ours(name, net, sched, sigmas, start_noise, options)
    _assert_close(ours, theirs)


def test_v_prediction_parity(net, start_noise):
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing")
    sched.set_timesteps(12)
    theirs = _run_diffusers(sched, net, start_noise * sched.sigmas[0], False)
    ours = _run_ours("euler", net, sched, sched.sigmas, start_noise, v=True)
    _assert_close(ours, theirs)
