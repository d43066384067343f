"""Teach the built-in model a shape it never saw (hearts) with a LoRA, and show before / after.

    python3 scripts/teach_hearts.py --work runs/hearts [--steps 600]     # -> docs/train/hearts.png + numbers

1. Data: 48 hearts drawn with Pillow on ShapeWorld's backgrounds (8 colours x 2 sizes x 3 places), captioned
   "a (small|large) COLOUR heart", in `hearts/2_hearts`, and 96 ShapeWorld renders with their own captions in
   `hearts/1_world` (prior preservation by mixing: without them the model forgets the rest).
2. `easel train lora` on it (the README's settings), timed.
3. "a COLOUR heart" for 8 colours x 3 seeds without and with the LoRA: a grid, and the share of images whose
   largest object matches a heart template better than a circle, square, diamond or triangle (and is in the named
   colour).
4. `easel eval` overall without and with the LoRA (forgetting check).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TEMPLATE = 48  # side of the template masks


def heart(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    """A heart of two discs and a triangle, centred near (cx, cy), about 4r wide."""
    d.ellipse((cx - 2 * r, cy - r, cx, cy + r), fill=fill)
    d.ellipse((cx, cy - r, cx + 2 * r, cy + r), fill=fill)
    d.polygon([(cx - 2 * r + 1, cy + r / 3), (cx + 2 * r - 1, cy + r / 3), (cx, cy + 2 * r + 2)], fill=fill)


def write_data(root: Path, seed: int = 0) -> Path:
    """The hearts and the ShapeWorld renders, as kohya repeat folders with sidecar captions."""
    from easel.world.dataset import TRAIN_SEEDS
    from easel.world.render import render_array
    from easel.world.scenes import BACKGROUND_RANGE, COLOURS, sample_scene
    from easel.world.captions import caption
    rng = np.random.default_rng(seed)
    hearts, world = root / "2_hearts", root / "1_world"
    hearts.mkdir(parents=True, exist_ok=True)
    world.mkdir(parents=True, exist_ok=True)
    for colour, rgb in COLOURS.items():
        for size, r in (("small", 5), ("large", 8)):
            for k in range(3):
                grey = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
                im = Image.new("RGB", (64, 64), (grey, grey, grey))
                heart(ImageDraw.Draw(im), rng.uniform(20, 44), rng.uniform(18, 40), r, tuple(rgb))
                im.save(hearts / f"{colour}_{size}_{k}.png")
                (hearts / f"{colour}_{size}_{k}.txt").write_text(f"a {size} {colour} heart")
    for k in range(96):
        s = int(rng.integers(TRAIN_SEEDS))
        scene = sample_scene(s)
        Image.fromarray(render_array(scene, 64)).save(world / f"w{k:03d}.png")
        (world / f"w{k:03d}.txt").write_text(caption(scene, s))
    return root


def _template(kind: str) -> np.ndarray:
    """A filled shape mask TEMPLATE x TEMPLATE."""
    im = Image.new("L", (TEMPLATE, TEMPLATE), 0)
    d = ImageDraw.Draw(im)
    t = TEMPLATE - 1
    if kind == "heart":
        heart(d, t / 2, t * 0.3, t / 4, 255)
    elif kind == "circle":
        d.ellipse((0, 0, t, t), fill=255)
    elif kind == "square":
        d.rectangle((0, 0, t, t), fill=255)
    elif kind == "diamond":
        d.polygon([(t / 2, 0), (t, t / 2), (t / 2, t), (0, t / 2)], fill=255)
    elif kind == "triangle":
        d.polygon([(t / 2, 0), (t, t), (0, t)], fill=255)
    return np.asarray(im) > 127


def best_template(mask: np.ndarray) -> str:
    """Which template (fitted to the mask's bounding box) overlaps the mask best, by IoU."""
    ys, xs = np.nonzero(mask)
    crop = Image.fromarray((mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8))
    m = np.asarray(crop.resize((TEMPLATE, TEMPLATE), Image.NEAREST)) > 127
    scores = {k: float((m & _template(k)).sum() / max(1, (m | _template(k)).sum()))
              for k in ("heart", "circle", "square", "diamond", "triangle")}
    return max(scores, key=scores.get)


def judge_heart(image: Image.Image, colour: str) -> tuple[bool, bool]:
    """(largest object is heart-shaped, it has the named colour)."""
    from easel.world.segment import find_blobs
    blobs = find_blobs(image)
    if not blobs:
        return False, False
    big = max(blobs, key=lambda b: len(b.ys))
    mask = np.zeros((image.height, image.width), bool)
    mask[big.ys, big.xs] = True
    return best_template(mask) == "heart", big.colour == colour


def hearts_grid(pipe, lora: str | None, seeds: int = 3, weight: float = 1.0):
    """Images of 'a COLOUR heart' for every colour and seed, and their heart / colour verdicts."""
    from easel.pipelines.request import GenerationRequest
    from easel.world.scenes import COLOURS
    images, verdicts = [], []
    for colour in COLOURS:
        for s in range(seeds):
            prompt = f"a {colour} heart" + (f" <lora:{lora}:{weight:g}>" if lora else "")
            img = pipe.generate(GenerationRequest(prompt, seed=s, batch_size=1))[0].image
            images.append(img)
            verdicts.append(judge_heart(img, colour))
    return images, verdicts


def grid_figure(before: list, after: list, title: str, seeds: int = 3) -> Image.Image:
    """Before and after side by side: each 8 colours (columns) x `seeds` seeds (rows), enlarged, with a title."""
    from easel.inspect import draw
    w = 64 * 2

    def panel(images: list, caption: str) -> Image.Image:
        by_seed = [images[k::seeds] for k in range(seeds)]  # images are colour-major: colour c, seed k at c*seeds+k
        cells = [im.resize((w, w), Image.NEAREST) for row in by_seed for im in row]
        return draw.captioned(draw.grid(cells, cols=len(by_seed[0]), pad=2), caption, 14)
    sides = [panel(before, "before: the built-in model, 'a COLOUR heart'"),
             panel(after, "after: the same prompts and seeds with the heart LoRA")]
    return draw.titled(draw.grid(sides, cols=2, pad=16), title)


def eval_overall(lora: str | None, out: Path, per_category: int, weight: float = 1.0) -> float:
    """`easel eval` overall score (with the LoRA at `weight` when given); a finished report in `out` is reused."""
    from easel.cli import main
    args = ["eval", "--per-category", str(per_category), "--images-per-prompt", "2", "--out", str(out)]
    if lora:
        args += ["--lora", f"{lora}:{weight:g}"]
    if not (out / "report.json").exists() and main(args) != 0:
        raise SystemExit("easel eval failed")
    return float(json.loads((out / "report.json").read_text())["rows"]["generated"]["overall"])


def main(argv: list[str] | None = None) -> int:
    """Data, LoRA, grid, numbers."""
    import easel
    from easel.cli import main as cli
    from easel.files import save_image
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/hearts")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--out", default="docs/train/hearts.png")
    p.add_argument("--grid-only", action="store_true", help="draw the grid (after training) and stop")
    p.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight when generating (default 1)")
    args = p.parse_args(argv)
    work = Path(args.work)
    data = write_data(work / "hearts")
    lora = work / "heart.safetensors"
    started = time.time()
    if not lora.exists():
        code = cli(["train", "lora", str(data), "--out", str(lora), "--steps", str(args.steps), "--batch-size", "8",
                    "--lr", "1e-3", "--rank", "16", "--conv", "--text-encoder", "--no-progress"])
        if code:
            return code
    minutes = (time.time() - started) / 60
    pipe = easel.load(None)
    before, v_before = hearts_grid(pipe, None)
    after, v_after = hearts_grid(pipe, str(lora), weight=args.weight)
    share = lambda v: (sum(h for h, _ in v), sum(c for _, c in v), len(v))  # noqa: E731
    hb, cb, n = share(v_before)
    ha, ca, _ = share(v_after)
    title = (f"a heart LoRA (weight {args.weight:g}) of the built-in model: heart-shaped {hb}/{n} -> {ha}/{n}, "
             f"named colour {cb}/{n} -> {ca}/{n}")
    print(save_image(grid_figure(before, after, title), args.out))
    if args.grid_only:
        return 0
    overall = (eval_overall(None, work / "eval-before", args.per_category),
               eval_overall(str(lora), work / f"eval-after-{args.weight:g}", args.per_category, args.weight))
    numbers = {"train_minutes": round(minutes, 1), "steps": args.steps, "weight": args.weight,
               "heart_before": f"{hb}/{n}",
               "heart_after": f"{ha}/{n}", "colour_before": f"{cb}/{n}", "colour_after": f"{ca}/{n}",
               "eval_overall_before": overall[0], "eval_overall_after": overall[1]}
    print(json.dumps(numbers, indent=1))
    (work / f"numbers-{args.weight:g}.json").write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
