"""Do the attention maps point at the right objects? DAAM's test, on ShapeWorld, with the judge's masks.

Two kinds of prompt alternate: two objects in a relation ("a red star above a blue circle") and a counted group
beside one object ("three red stars and a blue circle"). The built-in model draws the scene; the ShapeWorld
judge's colour segmentation gives each named group's mask (the image is skipped unless each named colour is
exactly as many blobs as the prompt says). Each word's map (BPE pieces merged, upsampled to the image) is scored
against its own group: IoU of the map thresholded at 0.4 of its range (DAAM's tau; Tang et al. 2022 report mIoU
~0.6 on generated COCO images) and the share of the map's mass that lies on its own group rather than on the
other. Colour and shape words are scored against their object, count words against their counted group; a
relation word ("left", "above", ...) names no object of its own, so it is scored against both objects together
(IoU), and its share is the mass on the first object (the one the relation is about) against the second.

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
    """n prompts, alternately 'a C1 S1 <relation> a C2 S2' and 'N C1 S1s and a C2 S2' (N 2..3), two different
    colours (so the masks can be told apart). `groups`: (colour, shape, count) per named group."""
    from easel.world.captions import NUMBERS, PLURALS, RELATION_PHRASES
    from easel.world.scenes import COLOURS, SHAPES
    rng = np.random.default_rng(seed)
    colours, phrases = list(COLOURS), [p for ps in RELATION_PHRASES.values() for p in ps]
    out = []
    for i in range(n):
        c1, c2 = (str(c) for c in rng.choice(colours, 2, replace=False))
        s1, s2 = str(rng.choice(SHAPES)), str(rng.choice(SHAPES))
        a1, a2 = ("an" if c[0] in "aeiou" else "a" for c in (c1, c2))
        if i % 2 == 0:
            phrase = phrases[rng.integers(len(phrases))]
            out.append({"prompt": f"{a1} {c1} {s1} {phrase} {a2} {c2} {s2}", "groups": [(c1, s1, 1), (c2, s2, 1)]})
        else:
            k = int(rng.integers(2, 4))
            out.append({"prompt": f"{NUMBERS[k]} {c1} {PLURALS[s1]} and {a2} {c2} {s2}", "groups": [(c1, s1, k),
                                                                                               (c2, s2, 1)]})
    return out


def object_masks(image: Image.Image, colours: list[str], counts: list[int] | None = None) -> list[np.ndarray] | None:
    """Each colour's mask (H, W): the union of its blobs from the judge's segmentation, or None unless each colour
    is exactly `counts[i]` blobs (default one each)."""
    from easel.world.segment import find_blobs
    blobs = find_blobs(image)
    masks = []
    for colour, count in zip(colours, counts or [1] * len(colours)):
        mine = [b for b in blobs if b.colour == colour]
        if len(mine) != count:
            return None
        mask = np.zeros((image.height, image.width), dtype=bool)
        for b in mine:
            mask[b.ys, b.xs] = True
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


def scored_words(words: list[str]) -> list[tuple[int, str, int]]:
    """(word index, class, own group) of the words scored in a prompt of `two_object_prompts`; group -1 for a
    relation word (both objects)."""
    from easel.inspect.judged import RELATION_WORDS
    picks = [(0, "count", 0)] if words[0] not in ("a", "an") else []
    picks += [(1, "colour", 0), (2, "shape", 0), (len(words) - 2, "colour", 1), (len(words) - 1, "shape", 1)]
    picks += [(i, "relation", -1) for i, w in enumerate(words) if w in RELATION_WORDS]
    return sorted(picks)


def score_image(image: Image.Image, maps: np.ndarray, slots, groups: list[tuple]) -> list[dict] | None:
    """Rows {word, class, iou, share} for each scored word; None if the masks are not clear. `groups`:
    (colour, shape[, count]) per named group, in the prompt's order."""
    from easel.inspect.attention import slot_labels, word_maps
    masks = object_masks(image, [g[0] for g in groups], [g[2] if len(g) > 2 else 1 for g in groups])
    if masks is None:
        return None
    by_word = word_maps(maps, slot_labels(slots, maps.shape[0]))
    rows = []
    for i, kind, k in scored_words([w for w, _, _ in by_word]):
        word, m, _ = by_word[i]
        heat = upsample(m, image.size)
        own, other = (masks[0] | masks[1], None) if k < 0 else (masks[k], masks[1 - k])
        share = own_share(heat, masks[0], masks[1]) if k < 0 else own_share(heat, own, other)
        rows.append({"word": word, "class": kind, "iou": iou(heat, own), "share": share})
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
        scored = score_image(result.image, maps, prompt_slots(pipe.loaded, p["prompt"]), p["groups"])
        if scored is None:
            skipped += 1
        else:
            rows += [{**r, "prompt": p["prompt"], "seed": seed + i} for r in scored]
        if progress is not None:
            progress(i + 1)
    return {"summary": summarise(rows), "prompts": n, "skipped": skipped, "rows": rows}


def summarise(rows: list[dict]) -> dict:
    """Per word class: mIoU, mean share on the own object (relation words: on the first object), fraction with most
    mass there, count."""
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
    print(f"{args.prompts} prompts (relations and counts alternating), {args.steps} steps, seeds {args.seed}.., maps of "
          f"{args.levels} levels; {report['skipped']} images skipped (a named colour not as many blobs as named)")
    print(f"{'class':<8} {'mIoU':>6} {'share on own':>13} {'most on own':>12} {'n':>4}")
    for kind, s in report["summary"].items():
        print(f"{kind:<8} {s['miou']:>6.3f} {s['share']:>13.3f} {s['most_on_own']:>12.1%} {s['n']:>4}")
    if args.json:
        from easel.files import write_text
        write_text(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
