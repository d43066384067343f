"""Regenerate the README pictures of the generation modes (docs/modes/*.png) from a model, in one run.

    python scripts/docs_pictures.py [--model M] [--out docs/modes] [--steps 20] [--only NAME ...]

Everything goes through the public Python API (`easel.load()`, `Pipeline.txt2img/img2img/inpaint/outpaint`,
`Pipeline.generate(GenerationRequest(...))`) with fixed seeds, so that the same model gives the same pictures.
Each picture is a labelled strip (input | mask | output ...), every image scaled up with nearest-neighbour
to the same display height, because the built-in model paints 64 x 64 pixels.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

import easel
from easel.pipelines.request import GenerationRequest
from easel.world.grid import load_font, wrap
from easel.world.render import render
from easel.world.scenes import Obj, Scene

SEED = 7  # one seed for every picture: a change of the model shows up everywhere alike
DISPLAY = 128  # display height of a 64 px image (x2, nearest)
CAPTION_LINES, LINE_H, PAD = 3, 13, 4
CIRCLE = (0.3, 0.5, 0.19)  # the red circle of the edit scene: (cx, cy, radius) as fractions of the side


# --- composing strips ----------------------------------------------------------------------------------
def strip(items: list[tuple[Image.Image, str]], height: int = DISPLAY, title: str = "") -> Image.Image:
    """Images side by side, each scaled (nearest) to `height` px (so sizes stay comparable), a caption under each
    and an optional title line above."""
    font = load_font(11)
    cells = [im.convert("RGB").resize((round(im.width * height / im.height), height), Image.NEAREST)
             for im, _ in items]
    # A cell's caption wraps to at least 128 px, so short cells get room for their words.
    widths = [max(c.width, 128) for c in cells]
    top = LINE_H + PAD if title else 0
    text_h = CAPTION_LINES * LINE_H + 2 * PAD
    sheet = Image.new("RGB", (sum(widths) + PAD * (len(cells) + 1), top + PAD + height + text_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD // 2), title, fill="black", font=font)
    x = PAD
    for cell, width, (_, caption) in zip(cells, widths, items):
        sheet.paste(cell, (x + (width - cell.width) // 2, top + PAD))
        for j, line in enumerate(wrap(draw, caption, font, width)[:CAPTION_LINES]):
            draw.text((x, top + PAD + height + PAD + j * LINE_H), line, fill="black", font=font)
        x += width + PAD
    return sheet


def stack(sheets: list[Image.Image]) -> Image.Image:
    """Strips one under the other on a white page."""
    page = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), "white")
    y = 0
    for s in sheets:
        page.paste(s, (0, y))
        y += s.height
    return page


# --- inputs ---------------------------------------------------------------------------------------------
def edit_scene(size: int = 64) -> Image.Image:
    """The ShapeWorld render every edit starts from: a red circle on the left of a yellow square."""
    objects = (Obj("circle", "red", "large", *CIRCLE), Obj("square", "yellow", "large", 0.72, 0.5, 0.19, 4.0))
    return render(Scene(background=120, objects=objects, kind="relation", seed=SEED), size)


def circle_mask(size: int = 64, grow: float = 1.25) -> Image.Image:
    """White (repaint) over the red circle, a little larger than it so its anti-aliased rim is repainted too."""
    cx, cy, r = (v * size for v in CIRCLE)
    r *= grow
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return mask


# --- one function per picture: (pipe, steps) -> image ---------------------------------------------------
def txt2img(pipe, steps: int) -> Image.Image:
    """A few ShapeWorld prompts, one image each."""
    prompts = ["three red stars", "a red circle on the left of a yellow square", "a big blue square",
               "two green triangles", "a pink cross above a cyan diamond"]
    items = [(pipe.txt2img(p, steps=steps, seed=SEED, batch_size=1)[0], p) for p in prompts]
    return strip(items, title=f"txt2img: {steps} steps, seed {SEED}")


def img2img(pipe, steps: int) -> Image.Image:
    """The edit scene repainted towards another prompt at rising denoising strengths."""
    prompt = "a green circle on the left of a yellow square"
    init = edit_scene()
    items = [(init, "input (ShapeWorld render)")]
    for strength in (0.3, 0.6, 0.9):
        out = pipe.img2img(init, prompt, steps=steps, seed=SEED, batch_size=1, denoising_strength=strength)[0]
        items.append((out, f"denoising_strength {strength}"))
    return strip(items, title=f'img2img: "{prompt}"')


def inpaint(pipe, steps: int) -> Image.Image:
    """Recolour the red circle through its mask, with the fills and "only masked"."""
    init, mask = edit_scene(), circle_mask()
    prompt = "a blue circle"
    runs = [("fill original, strength 0.85", dict(inpainting_fill="original", denoising_strength=0.85)),
            ("fill latent_noise, strength 1.0", dict(inpainting_fill="latent_noise", denoising_strength=1.0)),
            ("only masked (full res), strength 0.85",
             dict(inpaint_full_res=True, inpaint_full_res_padding=8, denoising_strength=0.85))]
    items = [(init, "input"), (mask, "mask (white = repaint)")]
    for label, options in runs:
        items.append((pipe.inpaint(init, mask, prompt, steps=steps, seed=SEED, batch_size=1, **options)[0], label))
    return strip(items, title=f'inpaint: "{prompt}"')


def outpaint(pipe, steps: int) -> Image.Image:
    """Extend the edit scene by 32 px to the right, then 32 px upwards."""
    init = edit_scene()
    prompt = "a red circle on the left of a yellow square"
    right = pipe.outpaint(init, prompt, right=32, steps=steps, seed=SEED, batch_size=1)[0]
    up = pipe.outpaint(init, prompt, up=32, steps=steps, seed=SEED, batch_size=1)[0]
    items = [(init, "input 64x64"), (right, "right=32 -> 96x64"), (up, "up=32 -> 64x96")]
    return strip(items, height=2 * DISPLAY, title=f'outpaint: "{prompt}", denoising_strength 0.75')


def hires(pipe, steps: int) -> Image.Image:
    """Hires fix 64 -> 128 with the latent and the Lanczos upscalers, beside the plain 64 px image."""
    prompt = "a red circle on the left of a yellow square"
    base = pipe.txt2img(prompt, steps=steps, seed=SEED, batch_size=1)[0]
    items = [(base, "txt2img 64x64")]
    for upscaler in ("latent", "lanczos"):
        req = GenerationRequest(prompt, steps=steps, seed=SEED, batch_size=1, enable_hr=True, hr_scale=2.0,
                                hr_upscaler=upscaler, hr_denoising_strength=0.5)
        items.append((pipe.generate(req)[0].image, f"hires 128x128, {upscaler} upscaler, strength 0.5"))
    return strip(items, height=2 * DISPLAY, title=f'hires fix: "{prompt}"')


def variations(pipe, steps: int) -> Image.Image:
    """One seed with a variation seed mixed in at rising strengths."""
    prompt = "a red circle on the left of a yellow square"
    items = []
    for strength in (0.0, 0.1, 0.3, 0.6, 1.0):
        req = GenerationRequest(prompt, steps=steps, seed=SEED, batch_size=1, subseed=SEED + 100,
                                subseed_strength=strength)
        label = "seed alone" if strength == 0 else "subseed alone" if strength == 1 else ""
        items.append((pipe.generate(req)[0].image, f"subseed_strength {strength} {label}".strip()))
    return strip(items, title=f"variation seeds: seed {SEED}, subseed {SEED + 100}")


PROMPT_SYNTAX = ["a red star and a blue circle", "a (red star:1.4) and a blue circle",
                 "a [red:blue:0.5] star", "a red star AND a blue circle"]


def prompts(pipe, steps: int) -> Image.Image:
    """The same seed under plain text, emphasis, prompt editing and AND composition."""
    items = [(pipe.txt2img(p, steps=steps, seed=SEED, batch_size=1)[0], p) for p in PROMPT_SYNTAX]
    return strip(items, title=f"prompt syntax: seed {SEED}")


PREVIEW_STEPS = 12  # 6 frames a row: the strip stays narrow enough for a README


def previews(pipe, steps: int) -> Image.Image:
    """Live previews every 2 steps of a 12-step run: the fast latent->RGB map (approx) and the VAE decode (full);
    `steps` is not used."""
    prompt = "a red circle on the left of a yellow square"
    rows = []
    for mode in ("approx", "full"):
        frames: list[tuple[Image.Image, str]] = []
        sink = lambda step, images, n=PREVIEW_STEPS: frames.append((images[0], f"step {step}/{n}"))  # noqa: E731
        req = GenerationRequest(prompt, steps=PREVIEW_STEPS, seed=SEED, batch_size=1, preview_every=2,
                                preview_mode=mode)
        final = pipe.generate(req, preview_sink=sink)[0].image
        rows.append(strip(frames + [(final, "final image")], height=96, title=f"preview_every=2, preview_mode={mode}"))
    return stack(rows)


def samples(pipe, steps: int) -> Image.Image:
    """The README's sample grid of the built-in model: prompts of each benchmark kind, two seeds each."""
    from easel.world.grid import captioned_grid
    prompts = ["three red stars", "a blue circle", "a green square", "a yellow triangle to the left of a pink cross",
               "two cyan diamonds", "a large orange circle"]
    images, captions = [], []
    for p in prompts:
        images += pipe.txt2img(p, steps=steps, seed=1, batch_size=2)
        captions += [p, p]
    grid = captioned_grid(images, captions, lines=2)
    return grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST) if grid.width < 600 else grid


def lcm(pipe, steps: int) -> Image.Image:
    """The built-in model at 25 steps (DPM++ 2M, CFG 7) beside 4 LCM steps without and with its LCM-LoRA."""
    prompts = ["three red stars", "a blue circle above a yellow square", "two green triangles"]
    fast = dict(steps=4, sampler="lcm", scheduler="sgm_uniform", cfg_scale=1.0, seed=SEED, batch_size=1)
    rows = []
    for p in prompts:
        rows.append(strip([(pipe.txt2img(p, steps=25, seed=SEED, batch_size=1)[0], "25 steps, DPM++ 2M, CFG 7"),
                           (pipe.txt2img(p, **fast)[0], "4 LCM steps, CFG 1, no LoRA"),
                           (pipe.txt2img(p + " <lora:shapeworld-lcm:1>", **fast)[0], "4 LCM steps + LCM-LoRA")],
                          title=p))
    return stack(rows)


PICTURES: dict[str, Callable] = {"samples": samples, "lcm": lcm, "txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "outpaint": outpaint,
                                 "hires": hires, "variations": variations, "prompts": prompts, "previews": previews}


def main(argv: list[str] | None = None) -> int:
    """Write every picture (or those named by --only) into --out, with timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to draw with (default: the built-in model)")
    ap.add_argument("--out", default="docs/modes", help="output folder (default: docs/modes)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of every run (default: 20)")
    ap.add_argument("--only", nargs="+", choices=list(PICTURES), help="draw only these pictures")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The raw inputs, so that the README's commands run as written.
    edit_scene().save(out / "scene.png")
    circle_mask().save(out / "mask.png")
    pipe = easel.load(args.model)
    print(f"loaded {pipe.loaded.name} in {time.perf_counter() - start:.1f} s")
    for name in args.only or PICTURES:
        t = time.perf_counter()
        path = out / f"{name}.png"
        PICTURES[name](pipe, args.steps).save(path, optimize=True)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB  {time.perf_counter() - t:.1f} s")
    total = sum(p.stat().st_size for p in out.glob("*.png"))
    print(f"done in {time.perf_counter() - start:.1f} s; {out}: {total / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
