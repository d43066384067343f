"""The film strip of a denoising run: per step the noisy latent, its cheap preview, the decoded x0 prediction
and the predicted noise, with sigma; classifier-free guidance's parts side by side; the schedule."""
from __future__ import annotations


import numpy as np
import torch
from PIL import Image, ImageDraw

from easel.inspect import draw
from easel.inspect.capture import Run, StepRecord


def pick_steps(n: int, frames: int) -> list[int]:
    """Up to `frames` step indices spread evenly over n steps, always the first and the last."""
    if n <= frames:
        return list(range(n))
    return sorted({round(k * (n - 1) / (frames - 1)) for k in range(frames)})


def channel_mosaic(latent: torch.Tensor, side: int) -> Image.Image:
    """One latent (C, h, w) as its channels tiled in a near-square grid of grey images, each channel scaled by
    3 standard deviations of the whole latent (0 is mid-grey), `side` pixels across in all."""
    c, h, w = latent.shape
    cols = int(np.ceil(np.sqrt(c)))
    rows = -(-c // cols)
    spread = float(latent.float().std()) * 3 or 1.0
    tiles = ((latent.float() / spread).clamp(-1, 1) + 1) * 127.5
    gap = max(1, h // 16)  # a white line between channels
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), 255, dtype=np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        canvas[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = tiles[k].round().byte().numpy()
    img = Image.fromarray(canvas).convert("RGB")
    scale = side / img.width
    return img.resize((side, max(1, round(img.height * scale))), Image.NEAREST)


class StepPictures:
    """Turns captured steps into pictures with one model: VAE decodes and the latent -> RGB preview."""

    def __init__(self, loaded, side: int = 160):
        from easel.pipelines.preview import LatentPreviewer
        self.loaded, self.side = loaded, side
        self.previewer = LatentPreviewer.for_model(loaded)

    def decode(self, latent: torch.Tensor) -> Image.Image:
        """A latent (C, h, w) decoded by the VAE, at the figure's size."""
        from easel.pipelines import common
        return self._fit(common.decode(self.loaded.model, latent[None])[0])

    def preview(self, latent: torch.Tensor) -> Image.Image:
        """The cheap latent -> RGB preview (what live previews show) of a latent (C, h, w)."""
        return self._fit(self.previewer.to_images(latent[None])[0])

    def mosaic(self, latent: torch.Tensor) -> Image.Image:
        """A latent's channels as grey tiles."""
        return channel_mosaic(latent, self.side)

    def _fit(self, image: Image.Image) -> Image.Image:
        scale = self.side / image.width
        resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
        return image.resize((self.side, max(1, round(image.height * scale))), resample)


ROWS = ("noisy latent x (channels)", "x / sqrt(1 + sigma^2), preview", "x0 prediction, decoded",
        "predicted noise (channels)")


def step_column(pics: StepPictures, rec: StepRecord, image: int = 0) -> list[Image.Image]:
    """The four pictures of one step (ROWS order) for image `image` of the batch."""
    # The preview sees x at unit variance, as the UNet does (x / sqrt(1 + sigma^2)); raw x is mostly noise scale.
    return [pics.mosaic(rec.x[image]), pics.preview(rec.unit_x[image]), pics.decode(rec.x0[image]),
            pics.mosaic(rec.noise[image])]


def film_strip(pics: StepPictures, run: Run, frames: int = 8, image: int = 0) -> Image.Image:
    """The grid: one column per chosen step (headed by step and sigma), one row per ROWS entry, labelled."""
    chosen = [run.steps[k] for k in pick_steps(len(run.steps), frames)]
    columns = [step_column(pics, rec, image) for rec in chosen]
    heads = [f"step {rec.i + 1}/{len(run.steps)}  sigma {rec.sigma:.3g}" for rec in chosen]
    return _labelled_grid(columns, heads, ROWS)


def cfg_strip(pics: StepPictures, run: Run, frames: int = 8, image: int = 0) -> Image.Image | None:
    """Classifier-free guidance per chosen step: the negative prompt's, the prompt's and the guided x0 (decoded);
    None when the run had no uncond half (guidance scale 1)."""
    chosen = [run.steps[k] for k in pick_steps(len(run.steps), frames)]
    chosen = [r for r in chosen if r.uncond is not None and r.cond is not None and r.guided is not None]
    if not chosen:
        return None
    columns = [[pics.decode(r.uncond[image]), pics.decode(r.cond[image]), pics.decode(r.guided[image])]
               for r in chosen]
    heads = [f"step {r.i + 1}  sigma {r.sigma:.3g}" for r in chosen]
    return _labelled_grid(columns, heads, ("uncond x0 (negative prompt)", "cond x0 (prompt)", "guided x0"))


def _labelled_grid(columns: list[list[Image.Image]], heads: list[str], rows: tuple[str, ...]) -> Image.Image:
    """Columns of equal-size cells with a header per column and a label per row on the left."""
    cell_w = max(im.width for col in columns for im in col)
    cell_h = max(im.height for col in columns for im in col)
    f, label_w, head_h, pad = draw.font(13), 220, 22, 6
    out = Image.new("RGB", (label_w + len(columns) * (cell_w + pad) + pad, head_h + len(rows) * (cell_h + pad) + pad),
                    draw.BACKGROUND)
    d = ImageDraw.Draw(out)
    for r, name in enumerate(rows):
        y = head_h + r * (cell_h + pad) + cell_h // 2 - 8
        d.text((6, y), draw.fit_text(d, name, f, label_w - 10), fill=draw.INK, font=f)
    for c, (col, head) in enumerate(zip(columns, heads)):
        x = label_w + c * (cell_w + pad)
        d.text((x, 4), draw.fit_text(d, head, f, cell_w), fill=draw.INK, font=f)
        for r, im in enumerate(col):
            out.paste(im, (x, head_h + r * (cell_h + pad)))
    return out


def animation_frames(pics: StepPictures, run: Run, image: int = 0) -> list[Image.Image]:
    """One frame per step: preview of x, decoded x0 and predicted noise side by side, captioned with the step."""
    frames = []
    for rec in run.steps:
        cells = [pics.preview(rec.unit_x[image]), pics.decode(rec.x0[image]), pics.mosaic(rec.noise[image])]
        row = draw.grid(cells, cols=3)
        frames.append(draw.captioned(row, f"step {rec.i + 1}/{len(run.steps)}  sigma {rec.sigma:.3f}   x | x0 | noise"))
    return frames


SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def schedule_plot(series: dict[str, list[float]], title: str = "sigma per step (log scale)",
                  size: tuple[int, int] = (560, 320)) -> Image.Image:
    """Sigma per step of one or several schedules (log scale, one dot per step, the final 0 left out), with a
    legend: {name: sigmas}."""
    series = {k: [v for v in vals if v > 0] for k, vals in series.items()}
    values = [v for vals in series.values() for v in vals]
    w, h = size
    left, right, top, bottom = 60, 16, 28, 36
    img, d, f = draw.plot_canvas(size, title, (left, right, top, bottom))
    if not values:
        return img
    lo, hi = np.log10(min(values)), np.log10(max(values))
    span = hi - lo or 1.0
    n = max(max(len(v) for v in series.values()) - 1, 1)

    def y_of(v: float) -> float:
        return h - bottom - (np.log10(v) - lo) / span * (h - top - bottom)

    for k, (name, vals) in enumerate(series.items()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        pts = [(left + j / n * (w - left - right), y_of(v)) for j, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if len(series) > 1:  # legend, top right
            lx, ly = w - right - 150, top + 6 + 16 * k
            d.line([(lx, ly + 7), (lx + 18, ly + 7)], fill=colour, width=2)
            d.text((lx + 24, ly), name, fill=colour, font=f)
    for v in (max(values), min(values)):
        d.text((4, y_of(v) - 7), f"{v:.3g}", fill=draw.INK, font=f)
    d.text((left, h - bottom + 6), "step 1", fill=draw.INK, font=f)
    d.text((w - right - 60, h - bottom + 6), f"step {n + 1}", fill=draw.INK, font=f)
    return img


def cfg_scales_figure(pics: StepPictures, runs: list[tuple[float, Run, Image.Image]], frames: int = 6) -> Image.Image:
    """One row per guidance scale: the decoded x0 prediction at chosen steps, then the final image."""
    columns, heads = [], []
    steps = runs[0][1].steps
    for k in pick_steps(len(steps), frames):
        columns.append([pics.decode(run.steps[k].x0[0]) for _, run, _ in runs])
        heads.append(f"x0 at step {steps[k].i + 1}")
    columns.append([pics._fit(image) for _, _, image in runs])
    heads.append("image")
    return _labelled_grid(columns, heads, tuple(f"CFG scale {scale:g}" for scale, _, _ in runs))
