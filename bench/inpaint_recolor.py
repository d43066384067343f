"""Inpainting benchmark on the built-in model: recolour / reshape one object and check nothing else moved.

For each of N scenes (a red circle and one other object, on ShapeWorld's grey background), the circle is
masked (its circumscribed disc, dilated), inpainted with a prompt naming the new object ("a blue circle
and a green square"), and the result is parsed by the ShapeWorld judge (easel.world.judge): does an object
of the new colour (and shape) now sit inside the mask, is any red left there, and is the other object still
found. It also measures the largest pixel change outside the blurred mask (must be 0) and, for reference,
how often the judge accepts the true edit rendered by ShapeWorld itself. Prints JSON.

    python bench/inpaint_recolor.py --n 16 --steps 20
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image, ImageDraw

from easel.pipelines import images
from easel.pipelines.inpaint import changed_outside
from easel.world.captions import Mention, describe
from easel.world.judge import parse
from easel.world.render import render
from easel.world.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES, Obj, Scene, make_objects

SEED_BASE = 5 * 2**40  # scenes disjoint from training, evaluation and judge-fitting seeds
PAIRS = (("blue", "circle"), ("green", "circle"), ("yellow", "circle"), ("purple", "square"), ("blue", "triangle"))
SIZE = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="scenes per target pair")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--configs", default="original:0.75,original:1.0,latent_noise:1.0,fill:1.0",
                   help="comma list of inpainting_fill:denoising_strength")
    p.add_argument("--pairs", default=",".join(f"{c} {s}" for c, s in PAIRS), help="comma list of 'colour shape'")
    p.add_argument("--dilate", type=int, default=3, help="pixels added around the object's disc")
    p.add_argument("--blur", type=int, default=4, help="mask_blur")
    p.add_argument("--full-res", action="store_true", help="inpaint only the masked region at full resolution")
    p.add_argument("--model", default=None, help="model path (default: the built-in model)")
    return p.parse_args(argv)


def make_scene(i: int) -> Scene:
    """Scene i: a red circle and one other object (another colour and shape, not a held-out pair)."""
    rng = np.random.default_rng([SEED_BASE, i])
    while True:
        colour = str(rng.choice([c for c in COLOURS if c != "red"]))
        shape = str(rng.choice([s for s in SHAPES if s != "circle"]))
        if (colour, shape) in HELD_OUT_PAIRS:
            continue
        specs = [("red", "circle", str(rng.choice(["small", "large"]))), (colour, shape, "large")]
        objects = make_objects(rng, specs)
        if objects is not None:
            return Scene(int(rng.integers(60, 191)), objects, kind="list", seed=int(SEED_BASE + i))


def object_mask(obj: Obj, dilate: int) -> Image.Image:
    """White disc over the object's circumscribed circle plus `dilate` pixels."""
    m = Image.new("L", (SIZE, SIZE), 0)
    cx, cy, r = obj.cx * SIZE, obj.cy * SIZE, obj.radius * SIZE + dilate
    ImageDraw.Draw(m).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return m


def judge_edit(image: Image.Image, mask: Image.Image, colour: str, shape: str, other: Obj) -> dict[str, bool]:
    """What the judge sees inside the mask (new colour, new shape, red left) and whether the other object stayed."""
    found = parse(image)
    m = np.asarray(mask) > 0
    inside = [d for d in found if m[min(int(d.cy * SIZE), SIZE - 1), min(int(d.cx * SIZE), SIZE - 1)]]
    return {"colour": any(d.colour == colour for d in inside),
            "both": any(d.colour == colour and d.shape == shape for d in inside),
            "red_left": any(d.colour == "red" for d in inside),
            "other_kept": any(d.colour == other.colour and d.shape == other.shape for d in found if d not in inside)}


def true_edit(scene: Scene, colour: str, shape: str) -> Image.Image:
    """The edit done right: the same scene rendered with the circle replaced."""
    target = scene.objects[0]
    new = Obj(shape, colour, target.size, target.cx, target.cy, target.radius, target.rotation)
    return render(Scene(scene.background, (new,) + scene.objects[1:], scene.kind, scene.seed), SIZE)


def run_config(pipe, scenes: list[Scene], pairs: list[tuple[str, str]], fill: str, strength: float,
               args: argparse.Namespace) -> dict:
    """Rates of one (fill, strength) setting over every scene and target pair."""
    rows, max_change, seconds = {}, 0, 0.0
    for colour, shape in pairs:
        counts = {"colour": 0, "both": 0, "red_left": 0, "other_kept": 0}
        for i, sc in enumerate(scenes):
            red, other = sc.objects
            img, mask = render(sc, SIZE), object_mask(red, args.dilate)
            prompt = describe([Mention(colour, shape), Mention(other.colour, other.shape)])
            t = time.perf_counter()
            out = pipe.inpaint(img, mask, prompt, steps=args.steps, cfg_scale=args.cfg, seed=1000 + i, batch_size=1,
                               width=SIZE, height=SIZE, mask_blur=args.blur, inpainting_fill=fill,
                               denoising_strength=strength, inpaint_full_res=args.full_res)[0]
            seconds += time.perf_counter() - t
            max_change = max(max_change, changed_outside(img, out, images.prepare_mask(mask, blur=args.blur)))
            for k, v in judge_edit(out, mask, colour, shape, other).items():
                counts[k] += int(v)
        rows[f"{colour} {shape}"] = {k: round(v / len(scenes), 3) for k, v in counts.items()}
    overall = {k: round(float(np.mean([r[k] for r in rows.values()])), 3) for k in next(iter(rows.values()))}
    return {"fill": fill, "denoising_strength": strength, "overall": overall, "by_target": rows,
            "max_pixel_change_outside_blurred_mask": max_change,
            "seconds_per_image": round(seconds / (len(scenes) * len(pairs)), 3)}


def judge_reference(scenes: list[Scene], pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """How often the judge accepts the true edit (its ceiling) and wrongly accepts the unedited input."""
    truth, unedited = [], []
    for colour, shape in pairs:
        for sc in scenes:
            red, other = sc.objects
            mask = object_mask(red, args.dilate)
            truth.append(judge_edit(true_edit(sc, colour, shape), mask, colour, shape, other)["both"])
            unedited.append(judge_edit(render(sc, SIZE), mask, colour, shape, other)["colour"])
    return {"true_edit_accepted": round(float(np.mean(truth)), 3),
            "unedited_input_accepted": round(float(np.mean(unedited)), 3)}


def main(argv: list[str] | None = None) -> None:
    """Run every configuration and print one JSON report."""
    import easel
    args = parse_args(argv)
    pipe = easel.load(args.model)
    scenes = [make_scene(i) for i in range(args.n)]
    pairs = [tuple(p.split()) for p in args.pairs.split(",")]
    report = {"model": pipe.loaded.name, "n_scenes": args.n, "steps": args.steps, "cfg_scale": args.cfg,
              "dilate": args.dilate, "mask_blur": args.blur, "full_res": args.full_res,
              "judge": judge_reference(scenes, pairs, args), "runs": []}
    for spec in args.configs.split(","):
        fill, strength = spec.split(":")
        report["runs"].append(run_config(pipe, scenes, pairs, fill, float(strength), args))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
