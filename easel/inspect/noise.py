"""Forward diffusion as the articles draw it: an image's latent noised at a row of timesteps (how training examples
are made), and the model's noise schedule (betas, alphas_cumprod, SNR, sigmas) as plots."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from easel.inspect import draw
from easel.inspect.steps import SERIES_COLOURS, StepPictures, _labelled_grid


@dataclass
class Noised:
    """One training example at timestep t: x_t = latent + sigma * eps; the UNet learns to predict eps from x_t."""
    t: int
    sigma: float
    x: torch.Tensor    # (C, h, w) the noisy latent
    eps: torch.Tensor  # (C, h, w) the unit noise, the eps-prediction target


def schedule_series(schedule) -> dict[str, np.ndarray]:
    """The schedule per training timestep: betas, alphas_cumprod, SNR = a / (1 - a) and sigma = sqrt((1 - a) / a)."""
    a = schedule.alphas_cumprod.numpy()
    betas = 1 - a / np.concatenate([[1.0], a[:-1]])  # alphas_cumprod is the running product of (1 - beta)
    return {"betas": betas, "alphas_cumprod": a, "SNR": a / (1 - a), "sigmas": schedule.sigmas.double().numpy()}


def row_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps spread evenly from 0 to the last one."""
    if count < 2:
        raise ValueError(f"--count must be at least 2 (got {count})")
    return sorted({round(k * (num_timesteps - 1) / (count - 1)) for k in range(count)})


def noise_row(latent: torch.Tensor, schedule, timesteps: list[int], seed: int = 0) -> list[Noised]:
    """The latent (C, h, w) noised at each timestep, with one fresh unit noise per timestep from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        if not 0 <= t < schedule.num_timesteps:
            raise ValueError(f"timestep {t} is outside the model's 0..{schedule.num_timesteps - 1}")
        eps = torch.randn(latent.shape, generator=gen)
        sigma = float(schedule.sigmas[t])
        out.append(Noised(t, sigma, latent.float().cpu() + sigma * eps, eps))
    return out


def default_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A ShapeWorld render (the built-in model's world) at `size` (w, h): square, its centre cut out if not."""
    from easel.world.render import render
    from easel.world.scenes import sample_scene
    side, (w, h) = max(size), size
    return render(sample_scene(seed), size=side).crop(((side - w) // 2, (side - h) // 2, (side + w) // 2,
                                                      (side + h) // 2))


def open_image(path: str, size: tuple[int, int]) -> Image.Image:
    """An image file as RGB at `size` (w, h); a missing or unreadable file is a clear error."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize(size, Image.LANCZOS)
    except FileNotFoundError:
        raise ValueError(f"image {path!r} not found: give the path of a PNG/JPEG/WebP file") from None
    except OSError as e:
        raise ValueError(f"cannot read image {path!r} ({e}): give a PNG/JPEG/WebP file") from None


ROWS = ("noisy latent x_t (channels)", "x_t / sqrt(1 + sigma^2), decoded", "noise eps (the training target)")


def noise_figure(pics: StepPictures, latent: torch.Tensor, row: list[Noised], on_column=None) -> Image.Image:
    """Columns: the clean latent, then each timestep; rows: latent channels, the decoded noisy latent, the noise.
    `on_column()` is called as each timestep's column is drawn (a progress bar)."""
    # Decoding x_t / sqrt(1 + sigma^2) shows the image at the unit scale the VAE expects (as the UNet sees it);
    # the raw x_t at large sigma decodes to saturated noise.
    blank = Image.new("RGB", (pics.side, pics.side), draw.BACKGROUND)
    columns = [[pics.mosaic(latent), pics.decode(latent), blank]]
    heads = ["clean latent (t = 0)"]
    for n in row:
        columns.append([pics.mosaic(n.x), pics.decode(n.x / (1 + n.sigma ** 2) ** 0.5), pics.mosaic(n.eps)])
        heads.append(f"t={n.t} sigma={n.sigma:.3g}")
        if on_column is not None:
            on_column()
    return draw.titled(_labelled_grid(columns, heads, ROWS), "forward diffusion: x_t = latent + sigma_t * eps")


def line_plot(values: np.ndarray, title: str, log: bool, size: tuple[int, int] = (420, 260),
              colour: tuple[int, int, int] = SERIES_COLOURS[0]) -> Image.Image:
    """One series against the timestep index, linear or log10 y axis, with its range on the axis."""
    w, h = size
    left, right, top, bottom = 64, 12, 26, 30
    img, d, f = draw.plot_canvas(size, title, (left, right, top, bottom))
    v = np.asarray(values, dtype=np.float64)
    y = np.log10(v) if log else v
    lo, hi = float(y.min()), float(y.max())
    span = hi - lo or 1.0
    xs = left + np.arange(len(v)) / max(len(v) - 1, 1) * (w - left - right)
    ys = h - bottom - (y - lo) / span * (h - top - bottom)
    d.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
    for val, yy in ((hi, top), (lo, h - bottom - 12)):
        d.text((4, yy), f"{10 ** val if log else val:.3g}", fill=draw.INK, font=f)
    d.text((left, h - bottom + 4), "t = 0", fill=draw.INK, font=f)
    d.text((w - right - 50, h - bottom + 4), f"t = {len(v) - 1}", fill=draw.INK, font=f)
    return img


PLOTS = (("betas", False), ("alphas_cumprod", False), ("SNR", True), ("sigmas", True))


def schedule_figure(series: dict[str, np.ndarray], label: str) -> Image.Image:
    """The four schedule plots in a 2x2 grid, titled with the model's schedule."""
    plots = [line_plot(series[name], f"{name}{' (log scale)' if log else ''} per timestep", log,
                     colour=SERIES_COLOURS[k]) for k, (name, log) in enumerate(PLOTS)]
    return draw.titled(draw.grid(plots, 2), f"noise schedule: {label}")
