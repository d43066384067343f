"""ControlNet preprocessors that need no downloaded weights, written with numpy and Pillow.

Each turns the control image (already fitted to the generation size) into the hint a ControlNet was trained
on: an (H, W, 3) float array in [0, 1] (white features on black), or, for "inpaint", the image with its masked
pixels at -1 (the ControlNet 1.1 inpaint protocol). Names follow sd-webui-controlnet's modules; their names are
accepted too (`binary`, `scribble_xdog`, `lineart_standard`, `inpaint_global_harmonious`, ...). Preprocessors
that need a network (depth, openpose, ...) fail with the weights file they would need named.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor: its function (image (H, W, 3) float 0..255, a, b, mask) -> hint, and its parameters."""

    run: Callable[..., np.ndarray]
    threshold_a: float | None = None  # default of the first parameter (None: takes none), A1111's "Threshold A"
    threshold_b: float | None = None
    needs_mask: bool = False


def _none(x: np.ndarray, a, b, mask) -> np.ndarray:
    return x / 255.0


def _invert(x: np.ndarray, a, b, mask) -> np.ndarray:
    """A black-on-white drawing -> white on black (what scribble and lineart ControlNets take)."""
    return 1.0 - x / 255.0


def _threshold(x: np.ndarray, a, b, mask) -> np.ndarray:
    """Binary map (A1111 "binary"): white where the grey level is above `a` (0..255)."""
    return np.repeat((_grey(x) > a)[..., None], 3, axis=2).astype(np.float32)


def _scribble(x: np.ndarray, a, b, mask) -> np.ndarray:
    """Scribble from an image (A1111 "scribble_xdog"): a difference of Gaussians (sigma 0.5 and 5) thresholded at
    `a`, which keeps the strong dark-side edges as white strokes."""
    dog = np.min(_gauss(x, 5.0) - _gauss(x, 0.5), axis=2)  # (H, W): positive where a pixel is darker than around it
    strokes = 2 * (255 - (255 - dog).clip(0, 255)) > a
    return np.repeat(strokes[..., None], 3, axis=2).astype(np.float32)


def _lineart(x: np.ndarray, a, b, mask) -> np.ndarray:
    """Soft line drawing from the edges (A1111 "lineart_standard"): how much darker each pixel is than its blurred
    surroundings (sigma 6), normalised by the median line strength."""
    intensity = np.min(_gauss(x, 6.0) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    lines = (intensity / scale * 127).clip(0, 255) / 255.0
    return np.repeat(lines[..., None], 3, axis=2).astype(np.float32)


def _canny(x: np.ndarray, a, b, mask) -> np.ndarray:
    """Canny edges (Canny 1986) as OpenCV computes them on a colour image: Sobel gradients per channel (the channel
    with the largest L1 magnitude wins at each pixel), non-maximum suppression along the gradient, hysteresis between
    the low (`a`) and high (`b`) thresholds. No smoothing first, as A1111 calls cv2.Canny on the image itself."""
    grads = [_sobel(x[..., c]) for c in range(3)]
    mags = np.stack([np.abs(gx) + np.abs(gy) for gx, gy in grads])  # (3, H, W)
    best = np.argmax(mags, axis=0)[None]  # (1, H, W)
    pick = lambda v: np.take_along_axis(np.stack(v), best, axis=0)[0]  # noqa: E731
    gx, gy, mag = pick([g[0] for g in grads]), pick([g[1] for g in grads]), pick(list(mags))
    edges = _hysteresis(_non_max(mag, gx, gy), min(a, b), max(a, b))
    return np.repeat(edges[..., None], 3, axis=2).astype(np.float32)


def _segmentation(x: np.ndarray, a, b, mask) -> np.ndarray:
    """Colour segmentation map: the image's colours clustered into at most `a` flat regions (k-means on a blurred
    copy from a deterministic start; clusters whose colours lie within `b` of each other, such as the two halves of
    a noisy background, are merged), each painted a distinct palette colour, as a segmentation ControlNet's map."""
    k = int(max(2, min(a, len(PALETTE))))
    pixels = _gauss(x, 1.0).reshape(-1, 3)
    step = max(1, len(pixels) // 20000)  # the centres from a sample: the same regions, far faster on big images
    centres = _merge_close(_kmeans(pixels[::step], k), b)
    chunks = np.array_split(pixels, max(1, len(pixels) // 65536))
    labels = np.concatenate([_nearest(c, centres) for c in chunks])
    return (PALETTE[labels].reshape(x.shape) / 255.0).astype(np.float32)


def _merge_close(centres: np.ndarray, distance: float) -> np.ndarray:
    """The centres with each one closer than `distance` to an earlier kept one dropped."""
    kept: list[np.ndarray] = []
    for c in centres:
        if all(np.linalg.norm(c - k) >= distance for k in kept):
            kept.append(c)
    return np.stack(kept)


def _inpaint(x: np.ndarray, a, b, mask) -> np.ndarray:
    """The image with the part to repaint at -1 (mask > 0.5), as ControlNet 1.1 inpaint models take it."""
    m = (mask > 127)[..., None]
    return np.where(m, -1.0, x / 255.0).astype(np.float32)


# Distinct colours of the segmentation map (the first classes of the ADE20K palette the seg ControlNets learned).
PALETTE = np.array([[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
                    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
                    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82]], dtype=np.float32)

PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(_none),
    "canny": Preprocessor(_canny, 100, 200),
    "threshold": Preprocessor(_threshold, 127),
    "scribble": Preprocessor(_scribble, 32),
    "lineart": Preprocessor(_lineart),
    "invert": Preprocessor(_invert),
    "segmentation": Preprocessor(_segmentation, 6, 40),
    "inpaint": Preprocessor(_inpaint, needs_mask=True),
}
# sd-webui-controlnet's module names for the same operations.
ALIASES = {"binary": "threshold", "scribble_xdog": "scribble", "lineart_standard": "lineart",
           "lineart_standard (from white bg & black line)": "lineart", "invert (from white bg & black line)": "invert",
           "inpaint_global_harmonious": "inpaint", "inpaint_only": "inpaint", "seg": "segmentation", "": "none"}
# Preprocessors that run a network: the weights file each would need (sd-webui-controlnet's annotator downloads).
NEEDS_WEIGHTS = {
    "depth": "dpt_hybrid-midas-501f0c75.pt (MiDaS, from lllyasviel/Annotators)",
    "depth_midas": "dpt_hybrid-midas-501f0c75.pt (MiDaS, from lllyasviel/Annotators)",
    "depth_leres": "res101.pth (LeReS, from lllyasviel/Annotators)",
    "depth_zoe": "ZoeD_M12_N.pt (ZoeDepth, from lllyasviel/Annotators)",
    "openpose": "body_pose_model.pth (OpenPose body, from lllyasviel/Annotators)",
    "openpose_full": "body_pose_model.pth, hand_pose_model.pth and facenet.pth (from lllyasviel/Annotators)",
    "openpose_hand": "body_pose_model.pth and hand_pose_model.pth (from lllyasviel/Annotators)",
    "openpose_face": "body_pose_model.pth and facenet.pth (from lllyasviel/Annotators)",
    "normal_bae": "scannet.pt (NormalBAE, from lllyasviel/Annotators)",
    "mlsd": "mlsd_large_512_fp32.pth (M-LSD, from lllyasviel/Annotators)",
    "softedge_hed": "ControlNetHED.pth (HED, from lllyasviel/Annotators)",
    "softedge_pidinet": "table5_pidinet.pth (PiDiNet, from lllyasviel/Annotators)",
    "lineart_realistic": "sk_model.pth (from lllyasviel/Annotators)",
    "lineart_anime": "netG.pth (from lllyasviel/Annotators)",
    "seg_ofade20k": "250_16_swin_l_oneformer_ade20k_160k.pth (OneFormer, from lllyasviel/Annotators)",
}


def canonical(name: str) -> str:
    """A preprocessor's easel name from easel's or sd-webui-controlnet's spelling; a clear error otherwise."""
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key)
    if key in PREPROCESSORS:
        return key
    if key in NEEDS_WEIGHTS:
        raise ValueError(
            f"the {key!r} preprocessor runs a network whose weights easel does not ship or run: it needs "
            f"{NEEDS_WEIGHTS[key]}. Make the {key.split('_')[0]} map with another tool and pass it as the control "
            f"image with preprocessor 'none', or use one of: {', '.join(PREPROCESSORS)}")
    raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)} (or an "
                     f"sd-webui-controlnet name: {', '.join(a for a in ALIASES if a)})")


def preprocess(name: str, image: Image.Image, threshold_a: float | None = None, threshold_b: float | None = None,
               mask: Image.Image | None = None) -> np.ndarray:
    """The hint (H, W, 3) float32 of `image` through the preprocessor `name` (thresholds None: its defaults)."""
    pre = PREPROCESSORS[canonical(name)]
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = None
    if pre.needs_mask:
        if mask is None:
            raise ValueError(f"the {name!r} preprocessor needs a mask (white = repaint): use it with inpainting, or "
                             "give the ControlNet unit its own mask")
        m = np.asarray(mask.convert("L").resize(image.size, Image.Resampling.NEAREST), dtype=np.float32)
    a = pre.threshold_a if threshold_a is None else threshold_a
    b = pre.threshold_b if threshold_b is None else threshold_b
    return pre.run(x, a, b, m)


def hint_image(hint: np.ndarray) -> Image.Image:
    """A hint as a picture (previews, the README): [0, 1] to 0..255; inpaint's -1 (masked) shows black."""
    return Image.fromarray((hint.clip(0, 1) * 255).round().astype(np.uint8), "RGB")


# --- numpy image operations ---------------------------------------------------------------------------------------
def _grey(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (H, W) of an (H, W, 3) image, as OpenCV's and Pillow's grey conversion."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, kernel cut at 4 sigma, mirrored borders."""
    radius = max(1, int(4 * sigma + 0.5))
    d = np.arange(-radius, radius + 1)
    w = np.exp(-(d ** 2) / (2 * sigma * sigma))
    w /= w.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="reflect" if x.shape[axis] > radius else "edge")
        x = sum(wi * np.take(p, np.arange(i, i + x.shape[axis]), axis=axis) for i, wi in enumerate(w))
    return x


def _sobel(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (d/dx, d/dy) of an (H, W) image, replicated borders."""
    p = np.pad(g, 1, mode="edge")
    s = lambda dy, dx: p[1 + dy:1 + dy + g.shape[0], 1 + dx:1 + dx + g.shape[1]]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def _non_max(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a magnitude only where it is a maximum along the gradient direction (quantised to 4 directions)."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    p = np.pad(mag, 1)
    h, w = mag.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    out = np.zeros_like(mag)
    for lo, hi, (dy, dx) in ((0, 22.5, (0, 1)), (157.5, 180.1, (0, 1)), (22.5, 67.5, (1, 1)),
                             (67.5, 112.5, (1, 0)), (112.5, 157.5, (1, -1))):
        sel = (angle >= lo) & (angle < hi)
        keep = sel & (mag > s(dy, dx)) & (mag >= s(-dy, -dx))
        out[keep] = mag[keep]
    return out


def _hysteresis(mag: np.ndarray, low: float, high: float) -> np.ndarray:
    """Strong pixels (> high) plus the weak ones (> low) 8-connected to them, grown until nothing changes."""
    weak, edges = mag > low, mag > high
    while True:
        p = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= p[1 + dy:1 + dy + edges.shape[0], 1 + dx:1 + dx + edges.shape[1]]
        grown &= weak
        if (grown == edges).all():
            return edges
        edges = grown | edges


def _nearest(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each (N, 3) pixel."""
    return np.argmin(((pixels[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def _kmeans(pixels: np.ndarray, k: int, iterations: int = 10) -> np.ndarray:
    """k colour centres of (N, 3) pixels by Lloyd's iterations from evenly spaced pixels of the sorted luma."""
    order = np.argsort(pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32), kind="stable")
    centres = pixels[order[np.linspace(0, len(order) - 1, k).astype(int)]].copy()
    for _ in range(iterations):
        labels = _nearest(pixels, centres)
        for j in range(k):
            if (labels == j).any():
                centres[j] = pixels[labels == j].mean(axis=0)
    return centres

