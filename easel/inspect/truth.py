"""Do the attention maps point at the right objects? DAAM's test, on ShapeWorld, with the judge's masks.

For two-object prompts ("a red star above a blue circle") the built-in model draws the scene; the ShapeWorld
judge's colour segmentation gives each object's mask (the image is skipped unless each named colour is exactly
one blob). Each colour and shape word's map (BPE pieces merged, upsampled to the image) is scored against its
own object: IoU of the map thresholded at 0.4 of its range (DAAM's tau; Tang et al. 2022 report mIoU ~0.6 on
generated COCO images) and the share of the map's mass that lies on its own object rather than on the other.

    python3 -m easel.inspect.truth --prompts 64 --steps 20
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image

TAU = 0.4  # DAAM's threshold on the normalised map


def two_object_prompts(n: int, seed: int = 0) -> list[dict]:
    """n prompts 'a C1 S1 <relation> a C2 S2' with two different colours (so the masks can be told apart)."""
    from easel.world.captions import RELATION_PHRASES
    from easel.world.scenes import COLOURS, SHAPES
    rng = np.random.default_rng(seed)
    colours, phrases = list(COLOURS), [p for ps in RELATION_PHRASES.values() for p in ps]
    out = []
    for _ in range(n):
        c1, c2 = rng.choice(colours, 2, replace=False)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        phrase = phrases[rng.integers(len(phrases))]
        out.append({"prompt": f"a {c1} {s1} {phrase} a {c2} {s2}", "objects": [(str(c1), str(s1)), (str(c2), str(s2))]})
    return out


def object_masks(image: Image.Image, colours: list[str]) -> list[np.ndarray] | None:
    """Each colour's blob mask (H, W) from the judge's segmentation, or None unless each colour is exactly one blob."""
    from easel.world.segment import find_blobs
    blobs = find_blobs(image)
    masks = []
    for colour in colours:
        mine = [b for b in blobs if b.colour == colour]
        if len(mine) != 1:
            return None
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[mine[0].ys, mine[0].xs] = True
        masks.append(mask)
    return masks


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map resized (bilinear) to size (w, h)."""
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BILINEAR))


def iou(heat: np.ndarray, mask: np.ndarray, tau: float = TAU) -> float:
    """IoU of the map thresholded at `tau` of its range with a mask (DAAM's metric)."""
    from easel.inspect.draw import normalise
    on = normalise(heat) >= tau
    union = (on | mask).sum()
    return float((on & mask).sum() / union) if union else 0.0


def own_share(heat: np.ndarray, own: np.ndarray, other: np.ndarray) -> float:
    """The map's mass on its own object over its mass on both objects."""
    a, b = float(heat[own].sum()), float(heat[other].sum())
    return a / (a + b) if a + b > 0 else 0.5


def score_image(image: Image.Image, maps: np.ndarray, slots, objects: list[tuple[str, str]]) -> list[dict] | None:
    """Rows {word, class, iou, share} for each object's colour and shape word; None if the masks are not clear."""
    from easel.inspect.attention import slot_labels, word_maps
    masks = object_masks(image, [c for c, _ in objects])
    if masks is None:
        return None
    by_word = word_maps(maps, slot_labels(slots, maps.shape[0]))
    # words: a, C1, S1, <relation words>, a, C2, S2
    picks = [(by_word[1], "colour", 0), (by_word[2], "shape", 0), (by_word[-2], "colour", 1), (by_word[-1], "shape", 1)]
    rows = []
    for (word, m, _), kind, k in picks:
        heat = upsample(m, image.size)
        rows.append({"word": word, "class": kind, "iou": iou(heat, masks[k]),
                     "share": own_share(heat, masks[k], masks[1 - k])})
    return rows


def finest_maps(cap, text: str) -> np.ndarray:
    """(S, h, w) maps of the finest query resolution only (the one nearest the image's own grid)."""
    attn = next(r for r in cap.runs if text in r.attention).attention[text]
    return attn.mean(max(attn.sums, key=lambda s: s[0] * s[1]))[0].numpy()


def run(pipe, n: int, steps: int, seed: int = 0, progress=None, levels: str = "all") -> dict:
    """Generate and score n two-object prompts (seed + i for prompt i); the summary by word class. `levels`:
    'all' (DAAM: every layer, each resolution upsampled) or 'finest' (the finest query resolution only)."""
    from easel.inspect.attention import capture_maps
    from easel.inspect.capture import Capture
    from easel.inspect.tokens import prompt_slots
    from easel.pipelines.request import GenerationRequest
    rows, skipped = [], 0
    for i, p in enumerate(two_object_prompts(n, seed)):
        with Capture(steps=False, cfg=False, per_step=False) as cap:
            result = pipe.generate(GenerationRequest(p["prompt"], seed=seed + i, steps=steps, batch_size=1),
                                   extend_plan=cap)[0]
        maps = capture_maps(cap, p["prompt"])[0].numpy() if levels == "all" else finest_maps(cap, p["prompt"])
        scored = score_image(result.image, maps, prompt_slots(pipe.loaded, p["prompt"]), p["objects"])
        if scored is None:
            skipped += 1
        else:
            rows += [{**r, "prompt": p["prompt"], "seed": seed + i} for r in scored]
        if progress is not None:
            progress(i + 1)
    return {"summary": summarise(rows), "prompts": n, "skipped": skipped, "rows": rows}


def summarise(rows: list[dict]) -> dict:
    """Per word class: mIoU, mean share on the own object, fraction with most mass on the own object, count."""
    out = {}
    for kind in sorted({r["class"] for r in rows}):
        mine = [r for r in rows if r["class"] == kind]
        out[kind] = {"miou": float(np.mean([r["iou"] for r in mine])),
                     "share": float(np.mean([r["share"] for r in mine])),
                     "most_on_own": float(np.mean([r["share"] > 0.5 for r in mine])), "n": len(mine)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Score the built-in model's (or --model's) attention maps against the judge's object masks."""
    import easel
    from tqdm import tqdm
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model (default: the built-in one; ShapeWorld prompts need a ShapeWorld model)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", choices=["all", "finest"], default="all",
                   help="all: every layer, each resolution upsampled (DAAM); finest: the finest resolution only")
    p.add_argument("--json", help="also write every row to this JSON file")
    args = p.parse_args(argv)
    pipe = easel.load(args.model)
    with tqdm(total=args.prompts, unit="prompt", file=sys.stderr, leave=False) as bar:
        report = run(pipe, args.prompts, args.steps, args.seed, progress=lambda k: bar.update(k - bar.n),
                     levels=args.levels)
    print(f"{args.prompts} two-object prompts, {args.steps} steps, seeds {args.seed}.., maps of {args.levels} levels; "
          f"{report['skipped']} images skipped (a named colour not exactly one blob)")
    print(f"{'class':<8} {'mIoU':>6} {'share on own':>13} {'most on own':>12} {'n':>4}")
    for kind, s in report["summary"].items():
        print(f"{kind:<8} {s['miou']:>6.3f} {s['share']:>13.3f} {s['most_on_own']:>12.1%} {s['n']:>4}")
    if args.json:
        from easel.files import write_text
        write_text(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
