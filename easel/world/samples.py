"""The built-in model's sample grids: the same prompts in English and in Chinese, side by side in the README.

    python3 -m easel.world.samples [--model M] [--out docs/modes] [--steps 20]   # samples_en.png, samples_zh.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from easel.files import save_image

from .captions import LANGS, Mention, describe
from .grid import captioned_grid

# (mentions, relation): every benchmark kind, each prompt worded canonically in each language.
SAMPLE_SCENES: tuple[tuple[tuple[Mention, ...], tuple[str, int, int] | None], ...] = (
    ((Mention("red", "star", count=3),), None),
    ((Mention("blue", "circle"),), None),
    ((Mention("yellow", "triangle"), Mention("pink", "circle")), ("left", 0, 1)),
    ((Mention("green", "square"), Mention("red", "circle")), ("above", 0, 1)),
    ((Mention("cyan", "diamond", count=2),), None),
    ((Mention("orange", "circle", "large"), Mention("purple", "cross", "small")), None),
)


def sample_prompts(lang: str) -> list[str]:
    """The sample prompts in one language."""
    return [describe(list(mentions), rel, lang=lang) for mentions, rel in SAMPLE_SCENES]


def sample_grid(pipe, lang: str, steps: int = 20, seed: int = 1, per_prompt: int = 2) -> Image.Image:
    """`per_prompt` images of every sample prompt in `lang` (same seeds in every language), captioned."""
    images, captions = [], []
    for text in sample_prompts(lang):
        images += pipe.txt2img(text, steps=steps, seed=seed, batch_size=per_prompt)
        captions += [text] * per_prompt
    return captioned_grid(images, captions, lines=2)


def main(argv: list[str] | None = None) -> int:
    """Write samples_<lang>.png for every language into --out."""
    import easel
    ap = argparse.ArgumentParser(prog="python3 -m easel.world.samples", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to draw with (default: the built-in model)")
    ap.add_argument("--out", default="docs/modes", help="output folder (default: docs/modes)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    pipe = easel.load(args.model)
    for lang in LANGS:
        print(save_image(sample_grid(pipe, lang, args.steps), Path(args.out) / f"samples_{lang}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
