"""The README's pictures of the layout ControlNet: hand-placed blobs, and what the built-in model draws with and
without them (same prompts, same seeds).

    python3 scripts/layout_pictures.py --out docs/control/layout_sketches.png [--controlnet shapeworld-layout]
"""
from __future__ import annotations

import argparse

import easel
from easel.files import save_image
from easel.pipelines.control_unit import ControlUnit
from easel.pipelines.request import GenerationRequest
from easel.world.grid import captioned_grid
from easel.world.sketch import sketch_at

# (prompt, blobs as (cx, cy, r) fractions): where a person would want the objects.
EXAMPLES = (
    ("a red star left of a blue circle", [(0.25, 0.5, 0.17), (0.75, 0.5, 0.17)]),
    ("a green square above a yellow triangle", [(0.5, 0.24, 0.16), (0.5, 0.76, 0.16)]),
    ("a purple cross in the corner", [(0.8, 0.8, 0.15)]),
    ("three orange circles", [(0.2, 0.2, 0.12), (0.5, 0.5, 0.12), (0.8, 0.8, 0.12)]),
)
PROMPT_TEXT = {"a purple cross in the corner": "a purple cross"}  # the model's words; the caption says the intent


def main() -> None:
    """Draw the sheet: per example, the sketch, then SEEDS images with the ControlNet and SEEDS without."""
    p = argparse.ArgumentParser()
    p.add_argument("--controlnet", default="shapeworld-layout")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="docs/control/layout_sketches.png")
    args = p.parse_args()
    pipe = easel.load(None)
    tiles, captions = [], []
    for text, blobs in EXAMPLES:
        sketch = sketch_at(blobs)
        prompt = PROMPT_TEXT.get(text, text)
        tiles.append(sketch)
        captions.append(f"sketch: {text}")
        for units, label in (([ControlUnit(args.controlnet, sketch)], "with sketch"), ([], "without")):
            req = GenerationRequest(prompt, seed=100, batch_size=args.seeds, controlnets=units)
            for k, g in enumerate(pipe.generate(req)):
                tiles.append(g.image)
                captions.append(f"{label}, seed {100 + k}")
    save_image(captioned_grid(tiles, captions, cols=1 + 2 * args.seeds, lines=2), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
