"""Draw the README's animations with the built-in model and print their smoothness:
`python docs/animate/make.py` (about two minutes on one CPU core)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

import easel
from easel.animate import AnimationSettings, animate
from easel.animation import save_animation
from easel.pipelines.request import GenerationRequest

HERE = Path(__file__).resolve().parent
RUNS = {
    "travel": AnimationSettings(["a red circle", "a blue square", "a yellow triangle"], frames=25, seeds=[7, 7, 7]),
    "motion": AnimationSettings(["a green circle above a purple square"], frames=25, seed=7,
                                zoom="0:(1.0), 24:(1.04)", angle="0:(0), 12:(3), 24:(0)", strength="0:(0.7)"),
}


def strip(frames: list[Image.Image], every: int = 3, scale: int = 2) -> Image.Image:
    """Every `every`-th frame side by side, enlarged (to look at the run as one picture)."""
    picked = frames[::every]
    w, h = frames[0].size
    out = Image.new("RGB", (w * scale * len(picked), h * scale), "white")
    for i, f in enumerate(picked):
        out.paste(f.resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, 0))
    return out


def main() -> None:
    pipe = easel.load()
    req = GenerationRequest(steps=20, seed=7)
    for name, settings in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:  # the frame PNGs are not kept here
            result = animate(pipe, settings, Path(tmp) / f"{name}.gif", req)
        big = [f.resize((128, 128), Image.NEAREST) for f in result.frames]  # 64 px is too small to see
        save_animation(big, HERE / f"{name}.gif", ms=settings.ms, hold_last=1)
        strip(result.frames).save(HERE / f"{name}-strip.png")
        s = result.smoothness
        print(f"{name}: largest step {s['largest_step']:.2f}, mean step {s['mean_step']:.2f}, first-to-last "
              f"{s['first_to_last']:.2f}, ratio {s['ratio']:.3f} ({len(result.frames)} frames)")


if __name__ == "__main__":
    main()
