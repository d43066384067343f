"""Analytic ShapeWorld scene parser: colour segmentation + a small fitted shape classifier.

`parse(image)` lists the objects it sees (colour, shape, size, centre, area). The shape classifier
is a multinomial logistic regression over hand-made shape descriptors (segment.blob_features),
fitted with numpy on renderer ground truth: clean renders *and* degraded ones (Gaussian blur,
down-up sampling, JPEG), so that blurry model outputs are not under-read. Refit with
`python -m easel.world.judge --fit`, which rewrites `_judge_params.py`.
"""
from __future__ import annotations

import argparse
import io
import pprint
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .render import render
from .scenes import SHAPES, SIZES, sample_scene
from .segment import FEATURE_NAMES, blob_centre, blob_features, find_blobs

FIT_SEED_BASE = 3 * 2**40  # scenes used to fit the judge: disjoint from training and eval seeds
DEGRADATIONS: tuple[str, ...] = ("clean", "blur", "downup", "jpeg")


@dataclass(frozen=True)
class Detected:
    """An object found in an image: centre and area as image fractions, shape probability."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    area: float
    shape_prob: float = 1.0


_PARAMS = None


def _params():
    """The fitted constants; a clear error when they were never generated."""
    global _PARAMS
    if _PARAMS is None:
        try:
            from . import _judge_params as p
        except ImportError as e:  # pragma: no cover - the file ships with the package
            raise RuntimeError("judge parameters missing: run `python -m easel.world.judge --fit`") from e
        _PARAMS = {
            "mean": np.array(p.FEATURE_MEAN), "std": np.array(p.FEATURE_STD),
            "w": np.array(p.WEIGHTS), "b": np.array(p.BIAS), "shapes": tuple(p.SHAPE_ORDER),
            "size_thr": dict(p.SIZE_LOG_AREA_THRESHOLD),
        }
    return _PARAMS


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def classify_shapes(features: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Shape names and class probabilities (N, 6) for a (N, F) feature matrix."""
    p = _params()
    probs = _softmax(((features - p["mean"]) / p["std"]) @ p["w"] + p["b"])
    return [p["shapes"][i] for i in probs.argmax(1)], probs


def size_of(shape: str, area: float) -> str:
    """'small' or 'large' from a blob's area (image fraction), with a per-shape threshold."""
    return "large" if np.log(area) >= _params()["size_thr"][shape] else "small"


def parse(image) -> list[Detected]:
    """Objects in an image (PIL, (H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1])."""
    blobs = find_blobs(image)
    if not blobs:
        return []
    shapes, probs = classify_shapes(np.stack([blob_features(b) for b in blobs]))
    found = []
    for blob, shape, prob in zip(blobs, shapes, probs):
        cx, cy, area = blob_centre(blob)
        found.append(Detected(blob.colour, shape, size_of(shape, area), cx, cy, area, float(prob.max())))
    return found


# ----------------------------------------------------------------------------- fitting


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A render made to look like a model output: blurred, down-up sampled or JPEG-compressed."""
    side = image.width
    if kind == "clean":
        return image
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.4)) * side / 64))
    if kind == "downup":
        f = int(rng.choice([2, 4]))
        return image.resize((side // f, side // f), Image.BILINEAR).resize((side, side), Image.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        image.filter(ImageFilter.GaussianBlur(0.5 * side / 64)).save(buf, "JPEG", quality=int(rng.integers(50, 85)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown degradation {kind!r}: choose one of {DEGRADATIONS}")


def labelled_blobs(n_scenes: int, seed: int, sizes=(64, 128), kinds=DEGRADATIONS):
    """Features, shape index, size name, log area and degradation of blobs matched to ground truth."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_scenes):
        scene = sample_scene(FIT_SEED_BASE + seed * 2**20 + k, exclude_held_out=False)
        for side in sizes:
            clean = render(scene, side)
            for kind in kinds:
                for blob in find_blobs(degrade(clean, kind, rng)):
                    cx, cy, area = blob_centre(blob)
                    near = [o for o in scene.objects if o.colour == blob.colour
                            and (o.cx - cx) ** 2 + (o.cy - cy) ** 2 < (0.5 * o.radius) ** 2]
                    if len(near) == 1:
                        rows.append((blob_features(blob), SHAPES.index(near[0].shape), near[0].size,
                                     float(np.log(area)), kind))
    feats = np.stack([r[0] for r in rows])
    return feats, np.array([r[1] for r in rows]), [r[2] for r in rows], np.array([r[3] for r in rows]), [r[4] for r in rows]


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 3000,
                 lr: float = 0.05, l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch Adam on standardised features: (W, b)."""
    n, f = x.shape
    w, b = np.zeros((f, classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, steps + 1):
        err = (_softmax(x @ w + b) - onehot) / n  # (N, C) gradient of mean cross-entropy wrt logits
        grads = [x.T @ err + l2 * w, err.sum(0)]
        for k, (param, g) in enumerate(zip((w, b), grads)):
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            param -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
    return w, b


def _size_thresholds(shape_idx: np.ndarray, sizes: list[str], log_area: np.ndarray) -> dict[str, float]:
    """Per shape, the log-area midway between the median small and the median large object."""
    sizes_arr = np.array(sizes)
    out = {}
    for i, shape in enumerate(SHAPES):
        small = log_area[(shape_idx == i) & (sizes_arr == "small")]
        large = log_area[(shape_idx == i) & (sizes_arr == "large")]
        out[shape] = float((np.median(small) + np.median(large)) / 2)
    return out


def fit(n_scenes: int = 1200, seed: int = 0) -> dict:
    """Fit the shape classifier and size thresholds on renderer ground truth; returns constants."""
    x, y, sizes, log_area, _ = labelled_blobs(n_scenes, seed)
    mean, std = x.mean(0), x.std(0) + 1e-8
    w, b = fit_logistic((x - mean) / std, y, len(SHAPES))
    return {"FEATURE_NAMES": list(FEATURE_NAMES), "FEATURE_MEAN": mean.tolist(), "FEATURE_STD": std.tolist(),
            "WEIGHTS": w.tolist(), "BIAS": b.tolist(), "SHAPE_ORDER": list(SHAPES),
            "SIZE_LOG_AREA_THRESHOLD": _size_thresholds(y, sizes, log_area),
            "FIT_SCENES": n_scenes, "FIT_SAMPLES": int(len(y))}


def check(n_scenes: int = 300, seed: int = 1) -> dict[str, tuple[float, float]]:
    """Shape and size accuracy of the current parameters per degradation, on unseen fit scenes."""
    x, y, sizes, log_area, kinds = labelled_blobs(n_scenes, seed)
    pred, _ = classify_shapes(x)
    out = {}
    for kind in DEGRADATIONS:
        sel = [i for i, k in enumerate(kinds) if k == kind]
        shape_ok = np.mean([pred[i] == SHAPES[y[i]] for i in sel])
        size_ok = np.mean([size_of(SHAPES[y[i]], float(np.exp(log_area[i]))) == sizes[i] for i in sel])
        out[kind] = (float(shape_ok), float(size_ok))
    return out


def _rounded(value):
    """Floats to 7 significant digits (nested lists and dicts too), for a readable params file."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_params(params: dict, path: Path) -> None:
    """Write the fitted constants as a small Python module (ships with the package)."""
    lines = ['"""Judge constants generated by `python -m easel.world.judge --fit`; do not edit by hand."""']
    for key, value in params.items():
        lines.append(f"{key} = {pprint.pformat(_rounded(value), width=110, compact=True)}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m easel.world.judge --fit` refits the constants; `--check` reports accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="refit and rewrite _judge_params.py")
    ap.add_argument("--check", action="store_true", help="report shape/size accuracy per degradation")
    ap.add_argument("--scenes", type=int, default=1200)
    args = ap.parse_args(argv)
    global _PARAMS
    if args.fit:
        params = fit(args.scenes)
        write_params(params, Path(__file__).with_name("_judge_params.py"))
        _PARAMS = None
        print(f"fitted on {params['FIT_SAMPLES']} blobs from {args.scenes} scenes")
    if args.check or args.fit:
        for kind, (shape_acc, size_acc) in check().items():
            print(f"{kind:7s} shape accuracy {shape_acc:.3f}  size accuracy {size_acc:.3f}")


if __name__ == "__main__":
    main()
