"""Samplers: plain functions that integrate from noise to data over a denoiser (k-diffusion style).

Every sampler has the signature
    sample_NAME(denoiser, x, sigmas, *, extra_args: dict | None = None,
                callback: Callback | None = None, noise=None, **options) -> x
where `x` is the starting point at noise level sigmas[0] (noise * sigmas[0] for txt2img), `sigmas`
descends to 0, `denoiser(x, sigma, **extra_args) -> x0` with sigma a (B,) tensor, and
`callback({"i", "x", "sigma", "sigma_next", "denoised"})` runs once per step (sigmas as floats, `x` the
point the denoiser saw); raise in it to cancel.
Stochastic samplers draw from `noise`, a NoiseSource; without one they seed from torch's global RNG.

Step sizes are computed on Python floats: they are scalars, and this keeps the GPU free of syncs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .denoisers import Denoiser
from .noise import NoiseSource, default_noise

__all__ = ["SAMPLERS", "SAMPLER_LABELS", "ancestral_step"]

Callback = Callable[[dict], None]


class _Run:
    """What every sampler step needs: the denoiser with its extra args, the sigmas, the callback."""

    def __init__(self, denoiser, sigmas, extra_args, callback, noise):
        self.denoiser, self.extra, self.callback, self.noise = denoiser, extra_args or {}, callback, noise
        self.sigmas = [float(s) for s in torch.as_tensor(sigmas).flatten()]
        if len(self.sigmas) < 2:
            raise ValueError("sigmas must hold at least two noise levels (the last one usually 0)")
        self.steps = range(len(self.sigmas) - 1)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)  # (B,)
        return self.denoiser(x, s, **self.extra)

    def report(self, i: int, x: torch.Tensor, denoised: torch.Tensor, **more) -> None:
        if self.callback is not None:
            info = {"i": i, "x": x, "sigma": self.sigmas[i], "sigma_next": self.sigmas[i + 1], "denoised": denoised}
            self.callback({**info, **more})

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        if self.noise is None:  # seeded at the first draw, so deterministic samplers leave the global RNG alone
            self.noise = default_noise(like.shape[0])
        return self.noise(like)


def _d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE: (x - x0) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from -> sigma_to into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _churn(run: _Run, x: torch.Tensor, i: int, s_churn, s_tmin, s_tmax, s_noise) -> tuple[float, torch.Tensor]:
    """Karras et al. 2022 Alg. 2 "churn": raise sigma by a factor (1 + gamma) with fresh noise; off by default."""
    sigma = run.sigmas[i]
    gamma = min(s_churn / len(run.steps), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return sigma, x
    sigma_hat = sigma * (gamma + 1)
    return sigma_hat, x + run.randn(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)


def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2)."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma_hat, x = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        run.report(i, x, denoised, sigma_hat=sigma_hat)
        x = x + _d(x, sigma_hat, denoised) * (run.sigmas[i + 1] - sigma_hat)
    return x


def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 2); the last step to 0 is Euler."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma_hat, x = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        run.report(i, x, denoised, sigma_hat=sigma_hat)
        sigma_next = run.sigmas[i + 1]
        d = _d(x, sigma_hat, denoised)
        x_euler = x + d * (sigma_next - sigma_hat)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = _d(x_euler, sigma_next, run.denoise(x_euler, sigma_next))
        x = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
    return x


def sample_dpm_2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 as in k-diffusion: the slope at the log-sigma midpoint (Karras et al. 2022, Alg. 2 variant)."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma_hat, x = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        run.report(i, x, denoised, sigma_hat=sigma_hat)
        x = _dpm_2_step(run, x, sigma_hat, run.sigmas[i + 1], denoised)
    return x


def _dpm_2_step(run: _Run, x, sigma: float, sigma_next: float, denoised) -> torch.Tensor:
    d = _d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = math.sqrt(sigma * sigma_next)  # midpoint in log-sigma
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = _d(x_mid, sigma_mid, run.denoise(x_mid, sigma_mid))
    return x + d_mid * (sigma_next - sigma)


def sample_euler_a(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        x = _ancestral_euler_step(run, x, i, denoised, eta, s_noise)
    return x


def _ancestral_euler_step(run: _Run, x, i: int, denoised, eta: float, s_noise: float) -> torch.Tensor:
    sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x = x + _d(x, sigma, denoised) * (sigma_down - sigma)
    if sigma_next > 0 and sigma_up > 0:
        x = x + run.randn(x) * s_noise * sigma_up
    return x


def sample_dpm_2_a(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver-2: a DPM-2 step down to sigma_down, then fresh noise up to sigma_next."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm_2_step(run, x, sigma, sigma_down, denoised)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.randn(x) * s_noise * sigma_up
    return x


def _lms_coefficient(sig: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange polynomial that is 1 at sig[i-j], 0 at the other nodes."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sig[i - k], 1.0]) / (sig[i - j] - sig[i - k])
    antiderivative = basis.integ()  # exact: the integrand is a polynomial (k-diffusion integrates numerically)
    return float(antiderivative(sig[i + 1]) - antiderivative(sig[i]))


def sample_lms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma over the past `order` slopes), as k-diffusion `sample_lms`."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    slopes: list[torch.Tensor] = []
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        slopes = (slopes + [_d(x, run.sigmas[i], denoised)])[-order:]
        cur = len(slopes)
        for j in range(cur):  # slopes[-1 - j] is the slope j steps back
            x = x + _lms_coefficient(run.sigmas, i, j, cur) * slopes[-1 - j]
    return x


def _t(sigma: float) -> float:
    """DPM-Solver's time variable: lambda = -log(sigma) in sigma space (log signal-to-noise ratio / 2)."""
    return -math.log(sigma)


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-sigma on the x0 predictions."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    old_denoised, h_last = None, None
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit at sigma = 0
            continue
        h = _t(sigma_next) - _t(sigma)
        guess = denoised
        if old_denoised is not None:
            r = h_last / h
            guess = denoised + (denoised - old_denoised) / (2 * r)
        x = (sigma_next / sigma) * x - math.expm1(-h) * guess
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022); steps cover disjoint sigma intervals, so plain per-step noise
    has the distribution of k-diffusion's Brownian-tree noise."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    old_denoised, h_last = None, None
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        decay = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + decay * denoised
        if old_denoised is not None:
            r = h_last / h
            coef = 0.5 * decay if solver_type == "midpoint" else decay / (-h - eta_h) + 1
            x = x + coef / r * (denoised - old_denoised)
        if eta:
            x = x + run.randn(x) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2s_a(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S): a single-step second-order update to sigma_down, then fresh noise."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + _d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = _t(sigma_down) - _t(sigma)
            sigma_mid = math.exp(-(_t(sigma) + h / 2))
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * run.denoise(x_mid, sigma_mid)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.randn(x) * s_noise * sigma_up
    return x


def _brownian_increments(run: _Run, x, sigma: float, sigma_mid: float, sigma_next: float):
    """Normalised increments of one Brownian path (time = sigma) over [sigma_mid, sigma] and [sigma_next, sigma]."""
    z_1, z_2 = run.randn(x), run.randn(x)
    w_next = math.sqrt(sigma - sigma_mid) * z_1 + math.sqrt(sigma_mid - sigma_next) * z_2
    return z_1, w_next / math.sqrt(sigma - sigma_next)


def sample_dpmpp_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ SDE, two stages per step (Lu et al. 2022), as k-diffusion `sample_dpmpp_sde`.

    Both stages must see one Brownian path: stage 2's noise over [sigma_next, sigma] contains stage 1's
    over [sigma_s, sigma]. k-diffusion gets this from a torchsde Brownian tree; here two independent
    draws per step from `noise` are combined into the same two increments (same distribution, other
    numbers). Drawing the stages independently instead would cost the solver its accuracy.
    """
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = x + _d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        sigma_s = math.exp(-(t + r * (t_next - t)))
        noise_s, noise_next = _brownian_increments(run, x, sigma, sigma_s, sigma_next) if eta else (0.0, 0.0)
        # stage 1: ancestral step to the intermediate level sigma_s
        s_down, s_up = ancestral_step(sigma, sigma_s, eta)
        x_s = (s_down / sigma) * x - math.expm1(t - _t(s_down)) * denoised + noise_s * s_noise * s_up
        denoised_s = run.denoise(x_s, sigma_s)
        # stage 2: ancestral step to sigma_next with the blended x0 estimate
        fac = 1 / (2 * r)
        n_down, n_up = ancestral_step(sigma, sigma_next, eta)
        blended = (1 - fac) * denoised + fac * denoised_s
        x = (n_down / sigma) * x - math.expm1(t - _t(n_down)) * blended + noise_next * s_noise * n_up
    return x


def sample_ddim(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2020) in sigma space: x_next = x0 + sigma_next * eps, with eta > 0 adding fresh noise.

    At eta = 0 this is exactly Euler's method on the probability-flow ODE; DDIM's eta-variance is
    exactly the ancestral split of `ancestral_step`, so eta = 1 equals euler_a.
    """
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        x = _ancestral_euler_step(run, x, i, denoised, eta, 1.0)
    return x


def sample_ddpm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020): draw x_next from the posterior q(x_next | x, x0), variance beta-tilde.

    Written in DDPM's own terms; in sigma space it is the same update as euler_a at eta = 1.
    """
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        # VP quantities of the two levels: a = alphas_cumprod, and the one-step alpha between them
        a, a_next = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = a / a_next
        x_vp = x * math.sqrt(a)
        # posterior mean (Ho et al. eq. 7) as a blend of x0 and x_t
        c_x0, c_xt = math.sqrt(a_next) * (1 - alpha) / (1 - a), math.sqrt(alpha) * (1 - a_next) / (1 - a)
        mean = c_x0 * denoised + c_xt * x_vp
        std = math.sqrt((1 - alpha) * (1 - a_next) / (1 - a))
        x = (mean + std * run.randn(x)) / math.sqrt(a_next)
    return x


_ADAMS_BASHFORTH = [[1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


def sample_plms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
) -> torch.Tensor:
    """PLMS / pseudo linear multistep (Liu et al. 2022, PNDM): Adams-Bashforth on eps, DDIM transfer.

    The first step has no history, so it is a pseudo improved Euler step (two evaluations).
    """
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    old_eps: list[torch.Tensor] = []  # most recent last
    for i in run.steps:
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        run.report(i, x, denoised)
        eps = (x - denoised) / sigma
        if not old_eps and sigma_next > 0:
            x_pred = x + eps * (sigma_next - sigma)
            eps_next = (x_pred - run.denoise(x_pred, sigma_next)) / sigma_next
            eps_prime = (eps + eps_next) / 2
        else:
            history = [eps] + old_eps[::-1]  # newest first
            eps_prime = sum(c * e for c, e in zip(_ADAMS_BASHFORTH[len(history) - 1], history))
        # the DDIM transfer x_next = x0(eps') + sigma_next * eps' is this line in sigma space
        x = x + eps_prime * (sigma_next - sigma)
        old_eps = (old_eps + [eps])[-3:]
    return x


def sample_lcm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to x0, re-noise to the next sigma."""
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    for i in run.steps:
        denoised = run.denoise(x, run.sigmas[i])
        run.report(i, x, denoised)
        x = denoised
        if run.sigmas[i + 1] > 0:
            x = x + run.randn(x) * run.sigmas[i + 1]
    return x


def _unipc_history(outputs: list, lam: list[float], base: int, h: float, order: int):
    """Ratios r_k of past log-sigma steps to h, and the scaled differences (m_{base-k} - m_base) / r_k."""
    rks, diffs = [], []
    for k in range(1, order):
        rk = (lam[base - k] - lam[base]) / h
        rks.append(rk)
        diffs.append((outputs[-1 - k] - outputs[-1]) / rk)
    return rks + [1.0], diffs


def _unipc_terms(h: float, rks: list[float], order: int, variant: str):
    """h*phi_1(h), B(h) and the order conditions R rho = b of UniPC with x0-prediction (Zhao et al. 2023)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)])
    return h_phi_1, b_h, R, np.array(b)


def _unipc_predict(x, outputs: list, lam, sig, i: int, order: int, variant: str) -> torch.Tensor:
    """UniP: the order-`order` multistep predictor from sig[i] to sig[i+1]."""
    h = lam[i + 1] - lam[i]
    rks, diffs = _unipc_history(outputs, lam, i, h, order)
    h_phi_1, b_h, R, b = _unipc_terms(h, rks, order, variant)
    x_next = (sig[i + 1] / sig[i]) * x - h_phi_1 * outputs[-1]
    if diffs:
        # order 2 uses rho = 1/2 rather than solving the 1x1 system, as the reference implementations do
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_next = x_next - b_h * sum(r * d for r, d in zip(rhos, diffs))
    return x_next


def _unipc_correct(x_last, m_new, outputs: list, lam, sig, i: int, order: int, variant: str) -> torch.Tensor:
    """UniC: redo the step sig[i-1] -> sig[i] using the new model output m_new at sig[i] (no extra evaluation)."""
    h = lam[i] - lam[i - 1]
    rks, diffs = _unipc_history(outputs, lam, i - 1, h, order)
    h_phi_1, b_h, R, b = _unipc_terms(h, rks, order, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    correction = sum(r * d for r, d in zip(rhos[:-1], diffs)) + rhos[-1] * (m_new - outputs[-1])
    return (sig[i] / sig[i - 1]) * x_last - h_phi_1 * outputs[-1] - b_h * correction


def sample_uni_pc(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, extra_args: dict | None = None,
    callback: Callback | None = None, noise: NoiseSource | None = None,
    order: int = 3, variant: str = "bh1", lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP + corrector UniC on x0; defaults as A1111's "UniPC" and
    ComfyUI's `uni_pc` (bh1, order 3; order falls to what the steps allow)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    run = _Run(denoiser, sigmas, extra_args, callback, noise)
    sig, n = run.sigmas, len(run.steps)
    lam = [_t(s) if s > 0 else math.inf for s in sig]
    outputs: list[torch.Tensor] = []  # recent x0 predictions, newest last
    x_last, last_order = None, 0
    for i in run.steps:
        denoised = run.denoise(x, sig[i])
        run.report(i, x, denoised)
        if x_last is not None:
            x = _unipc_correct(x_last, denoised, outputs, lam, sig, i, last_order, variant)
        outputs = (outputs + [denoised])[-order:]
        if sig[i + 1] == 0:
            x = denoised  # the first-order update's limit at sigma = 0
            continue
        # warm up from order 1; with lower_order_final also wind down over the last steps
        last_order = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        x_last = x
        x = _unipc_predict(x, outputs, lam, sig, i, last_order, variant)
    return x


def sample_uni_pc_bh2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **kw) -> torch.Tensor:
    """UniPC with the bh2 variant (ComfyUI's `uni_pc_bh2`; diffusers' default variant)."""
    return sample_uni_pc(denoiser, x, sigmas, **{"variant": "bh2", **kw})


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_a": sample_dpm_2_a,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2s_a": sample_dpmpp_2s_a,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "lcm": sample_lcm,
}

# The display names A1111 users see in the "Sampling method" menu.
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a",
    "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a", "ddim": "DDIM", "ddpm": "DDPM", "plms": "PLMS", "uni_pc": "UniPC",
    "uni_pc_bh2": "UniPC BH2", "lcm": "LCM",
}
