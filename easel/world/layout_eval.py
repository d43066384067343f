"""`easel eval --controlnet NAME`: does a layout ControlNet put each object of the prompt on its blob?

For every benchmark prompt and image k, the ground-truth scene of the prompt (`benchmark.ground_truth_scene`, the
relation placed clearly) is drawn as a rough layout sketch (`world.sketch`, jitter seeded by k), and the model draws
the prompt with that sketch as the ControlNet's condition. The judge then finds the objects: an object of the
prompt "lands on its blob" when an object of its colour and shape has its centre within the blob's radius of the
blob's centre (a blob of a count prompt needs one of the counted objects; only a relation says which of two blobs
is whose, so for "a red star and a blue circle" either way round counts). The same images are judged by the
benchmark as usual (does the image still follow the prompt?), and the same prompts and seeds drawn without the
ControlNet give the chance rate of an object on a blob.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np
from PIL import Image

from easel.world.benchmark import CORE_CATEGORIES, Prompt, evaluate, ground_truth_scene, make_prompts, score
from easel.world.judge import Detected, parse
from easel.world.scenes import Obj, Scene
from easel.world.sketch import sketch_of

BLOB_SLACK = 1.0  # a centre within this many object radii of the blob's centre is on the blob


@dataclasses.dataclass
class LayoutCase:
    """One image to make: the prompt, its scene (where the blobs are) and the sketch drawn from it."""

    prompt: Prompt
    scene: Scene
    sketch: Image.Image
    seed: int


def cases(prompts: list[Prompt], images_per_prompt: int, size: int, seed: int = 0) -> list[LayoutCase]:
    """A sketch per (prompt, k): a ground-truth scene of the prompt (placed anew for every image) drawn roughly."""
    out = []
    for i, p in enumerate(prompts):
        for k in range(images_per_prompt):
            n = seed + i * images_per_prompt + k  # one number per image: its scene, sketch jitter and noise
            scene = ground_truth_scene(p, n)
            out.append(LayoutCase(p, scene, sketch_of(scene.objects, size, n), n))
    return out


def blob_owners(prompt: Prompt, scene: Scene) -> list[tuple[Obj, dict]]:
    """Each object of the scene with the judge spec of the mention it was made for (count dropped)."""
    owners, k = [], 0
    for m, spec in zip(prompt.mentions, prompt.requirements["objects"]):
        want = {key: v for key, v in {"colour": m.colour, "shape": m.shape}.items() if v is not None}
        for _ in range(m.count):
            owners.append((scene.objects[k], want))
            k += 1
    return owners


def on_blob(found: list[Detected], obj: Obj, want: dict) -> bool:
    """Is an object of the wanted colour and shape centred on the blob drawn for `obj`?"""
    return any(all(getattr(d, key) == v for key, v in want.items())
               and np.hypot(d.cx - obj.cx, d.cy - obj.cy) <= BLOB_SLACK * obj.radius for d in found)


def blobs_taken(found: list[Detected], prompt: Prompt, scene: Scene) -> list[int]:
    """1 per blob with its object on it, else 0. Only a relation says which blob is whose: without one ("a red star
    and a blue circle" on two blobs), any one-to-one assignment of the prompt's objects to the blobs counts, and the
    best is scored."""
    owners = blob_owners(prompt, scene)
    if prompt.relation is not None:
        return [int(on_blob(found, obj, want)) for obj, want in owners]
    best: list[int] = []
    for order in itertools.permutations(range(len(owners))):  # at most 5 blobs: 120 orders
        hits = [int(on_blob(found, owners[b][0], owners[k][1])) for k, b in enumerate(order)]
        if sum(hits) > sum(best) or not best:
            best = hits
        if sum(best) == len(owners):
            break
    return best


def placement(images: list[Image.Image], chosen: list[LayoutCase]) -> dict[str, float]:
    """Share of blobs with their object on them, per category and overall (over every blob of every image)."""
    tally: dict[str, list[int]] = {}
    for image, case in zip(images, chosen):
        tally.setdefault(case.prompt.category, []).extend(blobs_taken(parse(image), case.prompt, case.scene))
    out = {c: round(float(np.mean(v)), 3) for c, v in tally.items()}
    out["overall"] = round(float(np.mean([x for v in tally.values() for x in v])), 3) if tally else 0.0
    return out


def generate(pipe, chosen: list[LayoutCase], controlnet: str | None, weight: float, overrides: dict,
             progress: Callable[[int], None] | None = None) -> list[Image.Image]:
    """One image per case, with the case's sketch as the ControlNet's condition (or without any ControlNet)."""
    from easel.pipelines.control_unit import ControlUnit
    from easel.pipelines.request import GenerationRequest
    images = []
    for n, case in enumerate(chosen):
        units = [ControlUnit(controlnet, case.sketch, weight=weight)] if controlnet else []
        req = GenerationRequest(case.prompt.text, seed=case.seed, batch_size=1, controlnets=units, **overrides)
        images.append(pipe.generate(req)[0].image)
        if progress:
            progress(n + 1)
    return images


def run_layout_eval(pipe, controlnet: str, per_category: int = 16, images_per_prompt: int = 2, weight: float = 1.0,
                    seed: int = 0, overrides: dict | None = None, categories: tuple[str, ...] = CORE_CATEGORIES,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Placement and benchmark scores with the ControlNet, and the same prompts and seeds without it."""
    prompts = make_prompts(seed, per_category, categories)
    chosen = cases(prompts, images_per_prompt, pipe.config.default_size, seed)
    flat = [c.prompt for c in chosen]
    report: dict = {"controlnet": controlnet, "weight": weight, "per_category": per_category,
                    "images_per_prompt": images_per_prompt, "rows": {}, "images": {}, "cases": chosen}
    done = 0
    for row, net in (("with sketch", controlnet), ("without ControlNet", None)):
        step = lambda n, base=done: progress(base + n) if progress else None  # noqa: E731
        images = generate(pipe, chosen, net, weight, overrides or {}, step)
        done += len(chosen)
        report["rows"][row] = {"on its blob": placement(images, chosen), "benchmark": score(evaluate(images, flat))}
        report["images"][row] = images
    return report


def layout_markdown(report: dict) -> str:
    """The two rows as a table: per category, objects on their blobs and the benchmark's pass rate."""
    rows = report["rows"]
    cats = [c for c in (*CORE_CATEGORIES, "overall") if c in next(iter(rows.values()))["benchmark"]]
    lines = ["| | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for name, r in rows.items():
        for what in ("on its blob", "benchmark"):
            cells = [f"{r[what].get(c, float('nan')):.2f}" for c in cats]
            lines.append(f"| {name}: {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layout_sheet(report: dict, n: int = 12) -> Image.Image:
    """Sketch, image with the ControlNet, image without, for n cases spread over the categories: a captioned grid."""
    from easel.world.grid import captioned_grid
    chosen, images = report["cases"], report["images"]
    tiles, captions = [], []
    for i in list(range(0, len(chosen), max(1, len(chosen) // n)))[:n]:
        tiles += [chosen[i].sketch, images["with sketch"][i], images["without ControlNet"][i]]
        captions += [chosen[i].prompt.text, "with sketch", "without"]
    return captioned_grid(tiles, captions, cols=6, lines=3)
