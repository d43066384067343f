"""ShapeWorld scenes: coloured shapes on a grey background, sampled deterministically from a seed.

Coordinates are fractions of the image side (0..1), x to the right and y *down* (image convention),
so a scene renders identically at any resolution.

Relation rule (used by captions, scene sampling and the judge alike). With dx = B.cx - A.cx and
dy = B.cy - A.cy:
  - "A left of B"  iff  dx >= MIN_SEP and  dx > |dy|
  - "A right of B" iff -dx >= MIN_SEP and -dx > |dy|
  - "A above B"    iff  dy >= MIN_SEP and  dy > |dx|
  - "A below B"    iff -dy >= MIN_SEP and -dy > |dx|
i.e. the dominant axis of the displacement decides, and objects closer than MIN_SEP on that axis
stand in no relation. Relation scenes are placed so the rule is unambiguous: the dominant axis is at
least RELATION_DOMINANCE times the other one, and at least RELATION_MIN_DIST long.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

# Fully saturated hues spaced >= 30 degrees apart (0, 30, 60, 125, 185, 228, 275, 322). Blending with
# the grey background keeps the HSV hue exactly, so the judge can segment anti-aliased edges by hue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (245, 123, 0),
    "yellow": (225, 225, 20),
    "green": (30, 190, 45),
    "cyan": (20, 205, 225),
    "blue": (40, 90, 240),
    "purple": (150, 45, 220),
    "pink": (240, 60, 180),
}

# Circumscribed radius as a fraction of the image side (8 px and 12.2 px at 64x64).
SIZES: dict[str, float] = {"small": 0.125, "large": 0.19}

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
MIN_SEP = 0.15
RELATION_DOMINANCE = 2.0
RELATION_MIN_DIST = 0.25

MARGIN = 0.06  # free space between the circumscribed circles of two objects
BORDER = 0.02  # free space between an object and the image edge
ROTATION_JITTER = 12.0  # degrees
BACKGROUND_RANGE = (60, 190)  # grey level of the background, inclusive

# Never in training scenes, so that composition can be told from memorisation.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "star"), ("yellow", "cross"), ("cyan", "triangle"), ("orange", "diamond"),
)
# (shape A, relation, shape B): no training scene has an A standing in that relation to a B.
HELD_OUT_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("circle", "above", "square"), ("star", "left", "triangle"), ("cross", "below", "diamond"),
)

_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS)

KINDS: tuple[str, ...] = ("single", "list", "relation", "count")
KIND_WEIGHTS: tuple[float, ...] = (0.2, 0.3, 0.25, 0.25)
_KIND_CDF = np.cumsum(KIND_WEIGHTS)[:-1]


@dataclass(frozen=True)
class Obj:
    """One shape: centre and circumscribed radius in image fractions, rotation in degrees."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A grey background and non-overlapping objects; `seed` also drives the render noise."""

    background: int
    objects: tuple[Obj, ...]
    kind: str = "list"
    seed: int = 0


def relation(a: Obj, b: Obj) -> str | None:
    """The relation of `a` to `b` under the module's dominant-axis rule, or None if too close."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) > abs(dy) and abs(dx) >= MIN_SEP:
        return "left" if dx > 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) >= MIN_SEP:
        return "above" if dy > 0 else "below"
    return None


def strong_relation_mask(dx: np.ndarray, dy: np.ndarray, rel: str) -> np.ndarray:
    """Where displacements A->B put A in relation `rel` to B clearly (the relation-scene margin)."""
    main, other = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return (main >= RELATION_MIN_DIST) & (main >= RELATION_DOMINANCE * np.abs(other))


_AXES = {"left": ((1.0, 0.0), (0.0, 1.0)), "right": ((-1.0, 0.0), (0.0, 1.0)),
         "above": ((0.0, 1.0), (1.0, 0.0)), "below": ((0.0, -1.0), (1.0, 0.0))}


def _relation_candidates(rng: np.random.Generator, partner: np.ndarray, rel: str, sign: float,
                         tries: int) -> np.ndarray:
    """Candidate centres in the clear-relation cone around a placed partner: (tries, 2).

    sign=+1 draws B for a placed A (B = A + offset), sign=-1 draws A for a placed B."""
    main = rng.uniform(RELATION_MIN_DIST, 1.0, tries)
    other = rng.uniform(-1.0, 1.0, tries) * main / RELATION_DOMINANCE
    u, v = (np.array(a) for a in _AXES[rel])
    return partner + sign * (main[:, None] * u + other[:, None] * v)


def place(rng: np.random.Generator, radii: list[float],
          rel: tuple[str, int, int] | None = None, tries: int = 256) -> list[tuple[float, float]] | None:
    """Non-overlapping centres for circles of the given radii (optionally with a strong relation
    `(relation, i, j)` between objects i and j); None when rejection sampling gives up."""
    placed = np.zeros((0, 3))  # (K, 3): cx, cy, r of the circles placed so far
    for k, r in enumerate(radii):
        lo, hi = r + BORDER, 1.0 - r - BORDER
        if rel is not None and k == max(rel[1], rel[2]):
            is_b = rel[2] == k
            partner = placed[rel[1] if is_b else rel[2], :2]
            cand = _relation_candidates(rng, partner, rel[0], 1.0 if is_b else -1.0, tries)
            dxy = cand - partner if is_b else partner - cand  # displacement A -> B
            ok = strong_relation_mask(dxy[:, 0], dxy[:, 1], rel[0]) & ((cand >= lo) & (cand <= hi)).all(1)
        else:
            cand = rng.uniform(lo, hi, (tries, 2))  # (tries, 2) candidate centres, checked at once
            ok = np.ones(tries, dtype=bool)
        d2 = ((cand[:, None, :] - placed[None, :, :2]) ** 2).sum(-1)  # (tries, K)
        ok &= (d2 >= (r + placed[:, 2] + MARGIN) ** 2).all(axis=1)
        hits = np.flatnonzero(ok)
        if len(hits) == 0:
            return None
        placed = np.vstack([placed, [*cand[hits[0]], r]])
    return [(float(x), float(y)) for x, y, _ in placed]


def make_objects(rng: np.random.Generator, specs: list[tuple[str, str, str]],
                 rel: tuple[str, int, int] | None = None) -> tuple[Obj, ...] | None:
    """Place (colour, shape, size) specs as objects with random rotation jitter; None on failure."""
    radii = [SIZES[size] for _, _, size in specs]
    centres = place(rng, radii, rel)
    if centres is None:
        return None
    rotations = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER, len(specs))
    return tuple(Obj(shape, colour, size, cx, cy, SIZES[size], float(rot))
                 for (colour, shape, size), (cx, cy), rot in zip(specs, centres, rotations))


def _random_size(rng: np.random.Generator) -> str:
    return "small" if rng.random() < 0.5 else "large"


def _random_pairs(rng: np.random.Generator, n: int, pool: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs from the pool, so every object in a caption is unambiguous."""
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def _propose(rng: np.random.Generator, kind: str, pool: tuple[tuple[str, str], ...]) -> tuple[Obj, ...] | None:
    """One attempt at the objects of a scene of the given kind, colour/shape pairs from the pool."""
    if kind == "count":
        n = int(rng.integers(2, 6))
        (colour, shape), = _random_pairs(rng, 1, pool)
        size = "small" if n >= 4 else _random_size(rng)
        return make_objects(rng, [(colour, shape, size)] * n)
    n = {"single": 1, "relation": 2}.get(kind) or int(rng.integers(2, 5))
    specs = [(c, s, _random_size(rng)) for c, s in _random_pairs(rng, n, pool)]
    if kind == "relation":
        return make_objects(rng, specs, (RELATIONS[rng.integers(4)], 0, 1))
    return make_objects(rng, specs)


def is_held_out(objects: tuple[Obj, ...] | list[Obj]) -> bool:
    """True if the objects contain a held-out colour/shape pair or a held-out relation triple."""
    if any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objects):
        return True
    for a in objects:
        for b in objects:
            if a is not b and (a.shape, relation(a, b), b.shape) in HELD_OUT_RELATIONS:
                return True
    return False


def sample_scene(seed: int, kind: str | None = None, exclude_held_out: bool = True) -> Scene:
    """The scene for an integer seed (same seed, same scene); rejects held-out combinations."""
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = KINDS[int(np.searchsorted(_KIND_CDF, rng.random(), side="right"))]
    elif kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}: choose one of {KINDS}")
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    pool = _TRAIN_PAIRS if exclude_held_out else _ALL_PAIRS  # held-out pairs are never even drawn
    for _ in range(1000):
        objects = _propose(rng, kind, pool)
        if objects is not None and not (exclude_held_out and is_held_out(objects)):
            return Scene(background, objects, kind, seed)
    raise RuntimeError(f"could not sample a {kind} scene for seed {seed}")  # not reached in practice
