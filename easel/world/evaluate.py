"""`easel eval`: score a model on the ShapeWorld benchmark, beside the judge's floor and ceilings.

Rows of every report: the model's images; ground-truth renders (must score >= 0.99, or the judge is wrong);
the model's images judged against shuffled prompts (the floor); ground truth through the model's VAE
(the ceiling the VAE allows).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from easel.files import save_image, write_text
from easel.world.benchmark import (Prompt, evaluate, ground_truth_image, make_prompts, report_markdown, score,
                                   shuffled)
from easel.world.grid import captioned_grid


@dataclasses.dataclass
class EvalSettings:
    """What an evaluation run generates."""

    per_category: int = 32
    images_per_prompt: int = 4
    steps: int | None = None  # None: the request default
    sampler: str | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = 0  # image seeds: seed + prompt index * images_per_prompt + k
    prompt_seed: int = 0
    loras: list[str] = dataclasses.field(default_factory=list)  # "name_or_path:weight" (e.g. an LCM-LoRA)
    lang: str = "en"  # the prompts' language: "en" or "zh" (the same prompts, translated)


def generate_images(pipe, prompts: list[Prompt], s: EvalSettings,
                    progress: Callable[[int], None] | None = None) -> list[list[Image.Image]]:
    """images_per_prompt images for every prompt, one batch per prompt."""
    from easel.pipelines.request import GenerationRequest
    overrides = {k: v for k in ("steps", "sampler", "scheduler", "cfg_scale") if (v := getattr(s, k)) is not None}
    out = []
    for i, p in enumerate(prompts):
        req = GenerationRequest(p.text, seed=s.seed + i * s.images_per_prompt, batch_size=s.images_per_prompt,
                                loras=list(s.loras), **overrides)
        out.append([g.image for g in pipe.generate(req)])
        if progress:
            progress(i + 1)
    return out


@torch.no_grad()
def vae_roundtrip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """Images through the model's VAE (encode mean -> decode): the most a generated image can keep."""
    from easel.pipelines.common import from_pil, to_pil
    vae = pipe.loaded.model.vae
    x = from_pil(images).to(next(vae.parameters()))
    return to_pil(vae.decode_latents(vae.encode_latents(x)).float())


def run_eval(pipe, s: EvalSettings, out_dir: str | Path | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """Score every row; write report.json, report.md and passes/failures grids when out_dir is given."""
    prompts = make_prompts(s.prompt_seed, s.per_category, lang=s.lang)
    size = pipe.config.default_size
    generated = generate_images(pipe, prompts, s, progress)
    flat_prompts = [p for p in prompts for _ in range(s.images_per_prompt)]
    flat_images = [im for batch in generated for im in batch]
    results = evaluate(flat_images, flat_prompts)
    truth = [ground_truth_image(p, k, size) for p in prompts for k in range(s.images_per_prompt)]
    rows = {
        "generated": score(results),
        "ground truth": score(evaluate(truth, flat_prompts)),
        "shuffled prompts (floor)": score(evaluate(flat_images, flat_prompts, _shuffled_flat(prompts, s))),
        "VAE reconstruction (ceiling)": score(evaluate(vae_roundtrip(pipe, truth), flat_prompts)),
    }
    report = {"settings": dataclasses.asdict(s), "model": pipe.loaded.name, "rows": rows, "lang": s.lang,
              "images": [{"prompt": p.text, "category": p.category, "passed": v.passed, "reason": v.reason}
                         for p, v in results]}
    if out_dir is not None:
        write_report(Path(out_dir), report, flat_images, results)
    return report


def _shuffled_flat(prompts: list[Prompt], s: EvalSettings) -> list[Prompt]:
    """Each prompt's images judged against another prompt of the same category."""
    other = shuffled(prompts, s.seed)
    return [q for q in other for _ in range(s.images_per_prompt)]


def write_report(out: Path, report: dict, images: list[Image.Image], results: list) -> None:
    """report.json, report.md (the table) and two grids of example passes and failures."""
    write_text(out / "report.json", json.dumps(report, indent=2))
    write_text(out / "report.md", report_markdown(report["rows"]) + "\n")
    for name, want in (("passes", True), ("failures", False)):
        picked = [(im, f"{p.category}: {p.text}" + ("" if want else f" — {v.reason}"))
                  for im, (p, v) in zip(images, results) if v.passed == want][:36]
        if picked:
            save_image(captioned_grid([im for im, _ in picked], [c for _, c in picked], lines=5), out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    """python3 -m easel.world.evaluate [--model M] [--lang en|zh] ...: `easel eval` with the prompts' language."""
    import argparse
    import sys

    import easel
    from easel.world.benchmark import CATEGORIES
    from easel.world.captions import LANGS
    p = argparse.ArgumentParser(prog="python3 -m easel.world.evaluate", description="easel eval, in a language")
    p.add_argument("--model", "-m")
    p.add_argument("--lang", default="en", choices=LANGS, help="the prompts' language (default en)")
    p.add_argument("--per-category", type=int, default=32)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--lora", action="append", default=[])
    p.add_argument("--out", default="eval")
    args = p.parse_args(argv)
    if args.per_category < 1 or args.images_per_prompt < 1:
        p.error("--per-category and --images-per-prompt must be at least 1")
    s = EvalSettings(per_category=args.per_category, images_per_prompt=args.images_per_prompt, steps=args.steps,
                     sampler=args.sampler, cfg_scale=args.cfg_scale, loras=args.lora, lang=args.lang)
    from tqdm import tqdm
    pipe = easel.load(args.model)
    with tqdm(total=len(CATEGORIES) * s.per_category, unit="prompt", file=sys.stderr, leave=False) as bar:
        report = run_eval(pipe, s, args.out, progress=lambda i: bar.update(i - bar.n))
    print(report_markdown(report["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
