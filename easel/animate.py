"""Animation: prompt travel and Deforum-style 2D motion, written as GIF / WebP / MP4 with every frame as a PNG.

Prompt travel: between keyframes, each frame's text conditioning is the linear mix of the two keyframes' prompts
and its starting noise the spherical interpolation (slerp, Shoemake 1985) of their seeds' noise, so consecutive
frames change a little. It reaches the sampler as a sampling-plan extension (`travel_extension`), the sampling
code untouched: at a keyframe a frame is exactly `easel generate PROMPT --seed SEED`.

2D motion (Deforum): frame 0 is drawn from text; every later frame is the previous one zoomed, turned and shifted
by the schedules' values at that frame, its colours matched to frame 0's (LAB mean and spread), and repainted by
img2img keeping `strength` of it (Deforum's strength: 0.65 keeps 65 %, a denoising strength of 0.35).

Schedules use A1111 / Deforum's syntax: "0:(1.0), 30:(1.05)", values linearly interpolated between keyframes
and held outside them; a value may be an expression of the frame number t ("0:(1 + 0.01*sin(t/4))").

    from easel.animate import animate
    result = animate(easel.load(), ["a red circle", "a blue square"], frames=16, out="travel.gif", seed=7)
    print(result.smoothness)
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from easel.animation import check_format, save_animation

if TYPE_CHECKING:  # torch loads when an animation runs, not when `easel --help` builds the parser
    import torch

MAX_FRAMES = 10000


# --- schedules -------------------------------------------------------------------------------------------------
_FUNCTIONS = {"sin": math.sin, "cos": math.cos, "tan": math.tan, "abs": abs, "sqrt": math.sqrt, "exp": math.exp,
              "log": math.log, "min": min, "max": max, "floor": math.floor, "ceil": math.ceil, "round": round}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@dataclass(frozen=True)
class Schedule:
    """A value per frame from keyframes [(frame, expression)], linearly interpolated, held before and after."""

    keys: tuple[tuple[int, ast.Expression], ...]
    text: str
    what: str = "schedule"  # the flag or setting, named in errors

    def at(self, frame: int) -> float:
        """The value at `frame`."""
        keys = self.keys
        if frame <= keys[0][0]:
            return _evaluate(keys[0][1], frame, self)
        for (f0, e0), (f1, e1) in zip(keys, keys[1:]):
            if frame <= f1:
                a, b = _evaluate(e0, frame, self), _evaluate(e1, frame, self)
                return a + (b - a) * (frame - f0) / (f1 - f0)
        return _evaluate(keys[-1][1], frame, self)

    @property
    def constant(self) -> float | None:
        """The value when every keyframe holds the same number, else None."""
        values = {ast.dump(e) for _, e in self.keys}
        return self.at(0) if len(values) == 1 and "Name(" not in next(iter(values)) else None


def parse_schedule(text: str | float, what: str = "schedule") -> Schedule:
    """'0:(1.0), 30:(1.05)' (or a bare number) -> Schedule; errors name `what` and show the syntax."""
    text = str(text).strip()
    usage = f'{what} takes keyframes like "0:(1.0), 30:(1.05)" (frame:(value), values may use t), got {text!r}'
    if not text:
        raise ValueError(usage)
    try:
        if ":" not in text:
            keys = [(0, _compile(text))]
        else:
            keys = [_keyframe(part) for part in _split_top(text)]
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{usage}: {e}") from None
    except (RecursionError, MemoryError):  # thousands of nested operators: refused, not a crash
        raise ValueError(f"{usage}: the expression is nested too deeply") from None
    keys.sort(key=lambda k: k[0])
    if len({f for f, _ in keys}) != len(keys):
        raise ValueError(f"{usage}: a frame appears twice")
    schedule = Schedule(tuple(keys), text, what)
    schedule.at(keys[0][0])  # unknown names or functions fail here, not at frame 17
    return schedule


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses ('0:(max(1, t)), 5:(2)' has two parts)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _keyframe(part: str) -> tuple[int, ast.Expression]:
    """'30:(1.05)' -> (30, compiled 1.05)."""
    frame, _, value = part.partition(":")
    if not frame.strip().isdigit():
        raise ValueError(f"keyframe {part!r} does not start with a frame number")
    value = value.strip()
    if value.startswith("(") and value.endswith(")"):
        value = value[1:-1]
    return int(frame), _compile(value)


def _compile(expr: str) -> ast.Expression:
    """Parse an arithmetic expression; anything but numbers, t, pi, e, + - * / ** % and a few functions is refused."""
    tree = ast.parse(expr.strip(), mode="eval")
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load,
                               *_BINARY, *_UNARY))
        if not ok or (isinstance(node, ast.Constant) and not isinstance(node.value, (int, float))):
            raise ValueError(f"{expr!r}: only numbers, t, arithmetic and {', '.join(_FUNCTIONS)} are allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
            raise ValueError(f"{expr!r}: unknown function; allowed: {', '.join(_FUNCTIONS)}")
    return tree


def _evaluate(tree: ast.Expression, t: int, schedule: Schedule) -> float:
    """The expression's value at frame t."""
    text = f"{schedule.what} {schedule.text!r}"
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            # As a float: 9**9**9 then overflows at once instead of building an integer of millions of digits
            # (a schedule may come from an HTTP request).
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id == "t":
                return float(t)
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ValueError(f"unknown name {node.id!r} in {text} (use t, pi, e)")
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](ev(node.operand))
        return _FUNCTIONS[node.func.id](*(ev(a) for a in node.args))
    try:
        value = float(ev(tree))
    except (ArithmeticError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"{text} fails at frame {t}: {e}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text} is not finite at frame {t}")
    return value


# --- prompt travel ---------------------------------------------------------------------------------------------
def even_keyframes(count: int, frames: int) -> list[int]:
    """`count` keyframes spread evenly over frames 0 .. frames - 1."""
    if count == 1:
        return [0]
    return [round(i * (frames - 1) / (count - 1)) for i in range(count)]


def travel_position(keyframes: list[int], frame: int) -> tuple[int, float]:
    """(keyframe index i, fraction t): the frame lies t of the way from keyframe i to keyframe i + 1."""
    for i in range(len(keyframes) - 1):
        if frame <= keyframes[i + 1]:
            span = keyframes[i + 1] - keyframes[i]
            return i, max(0.0, (frame - keyframes[i]) / span)
    return len(keyframes) - 1, 0.0


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (keeps the norm Gaussian noise has; lerp would shrink it)."""
    import torch
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = float(torch.dot(fa, fb) / (fa.norm() * fb.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-4:
        return a + (b - a) * t
    out = (math.sin((1 - t) * theta) * fa + math.sin(t * theta) * fb) / math.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


class TravelConditioning:
    """A prompt conditioning t of the way from `a` to `b` (both PromptConditioning): one-part prompts mix their
    text encodings linearly; prompts with AND parts mix as composable guidance, a's parts weighted 1 - t, b's t."""

    def __init__(self, a, b, t: float):
        self.a, self.b, self.t = a, b, float(t)
        self.empty, self.batch = a.empty, a.batch

    def at_step(self, step: int) -> list[tuple[dict, float]]:
        """(UNet conditioning, weight) of each part at sampling step `step`."""
        pa, pb = self.a.at_step(step), self.b.at_step(step)
        if len(pa) == len(pb) == 1:
            return [(mix_conditioning(pa[0][0], pb[0][0], self.t, self.empty["context"]),
                     pa[0][1] + (pb[0][1] - pa[0][1]) * self.t)]
        return [(c, w * (1 - self.t)) for c, w in pa] + [(c, w * self.t) for c, w in pb]

    def texts_at(self, step: int) -> list[tuple[str, float]]:
        """The texts told at `step`, weighted by how much of each is in the mix."""
        return ([(s, w * (1 - self.t)) for s, w in self.a.texts_at(step)]
                + [(s, w * self.t) for s, w in self.b.texts_at(step)])


def mix_conditioning(a: dict, b: dict, t: float, empty: torch.Tensor) -> dict:
    """(1 - t) a + t b of two UNet conditionings; contexts of different lengths (long prompts) are first padded
    with empty-prompt chunks, as A1111 pads a prompt against its negative prompt."""
    import torch
    from easel.pipelines.conditioning import _pad_empty
    ca, cb = a["context"], b["context"]
    length = max(ca.shape[1], cb.shape[1])
    ca, cb = _pad_empty(ca, length, empty), _pad_empty(cb, length, empty)
    out = {"context": torch.lerp(ca, cb.to(ca), t)}
    if "y" in a:
        out["y"] = torch.lerp(a["y"], b["y"].to(a["y"]), t)
    return out


def travel_extension(req, target_prompt: str, t: float, noise: torch.Tensor | None, encoded: dict):
    """A plan extension (see `easel.pipelines.plan.extending`) that moves the plan of a frame's request `req`
    t of the way to `target_prompt` and starts it from `noise` (unit noise, 1 x C x h x w; None keeps the
    plan's). `encoded` caches the target prompt's conditioning between frames."""
    def extend(p, loaded):
        if noise is not None:
            p = dataclasses.replace(p, noise=noise.to(p.noise))
        if t <= 0 or p.denoiser is None:
            return p
        key = (id(loaded), target_prompt)
        if key not in encoded:
            from easel.pipelines.common import embedding_library
            from easel.pipelines.conditioning import build_conditioning
            encoded[key] = build_conditioning(loaded, target_prompt, req.negative_prompt, req.steps, 1, req.width,
                                              req.height, req.clip_skip, embedding_library(loaded))[0]
        return p.wrap(lambda d: retarget(d, encoded[key], t))
    return extend


def retarget(denoiser, target, t: float):
    """A copy of the denoiser stack whose guided (CFG) denoiser's prompt is moved t of the way to `target`
    (a PromptConditioning); the original stack is left as it was."""
    import torch
    from easel.pipelines.conditioning import GuidedDenoiser
    moved = copy.copy(denoiser)
    if isinstance(moved, torch.nn.Module):
        moved._modules = dict(moved._modules)  # a shallow copy shares this dict: setting .inner would leak back
    if isinstance(denoiser, GuidedDenoiser):
        moved.cond = TravelConditioning(denoiser.cond, target, t)
        return moved
    if getattr(denoiser, "inner", None) is None:
        raise ValueError("prompt travel found no guided denoiser in the sampling plan (a wrapper that does not "
                         "keep the one it wraps as `.inner` is in the way)")
    moved.inner = retarget(denoiser.inner, target, t)
    return moved


# --- 2D motion and colour coherence --------------------------------------------------------------------------------
def warp(image: Image.Image, zoom: float = 1.0, angle: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> Image.Image:
    """`image` zoomed about its centre (> 1 moves in), turned `angle` degrees counter-clockwise and shifted by
    (tx, ty) pixels (right, down); the border is filled by reflection (Deforum's 2D camera)."""
    import torch
    import torch.nn.functional as F
    if zoom <= 0:
        raise ValueError(f"zoom must be positive (got {zoom})")
    if zoom == 1 and angle == 0 and tx == 0 and ty == 0:
        return image
    w, h = image.size
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # output pixel -> input pixel, about the centre: in = R(-a) (out - shift) / zoom (y points down)
    inv = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) / zoom
    to_norm = torch.diag(torch.tensor([2 / w, 2 / h], dtype=torch.float64))
    m = to_norm @ inv @ torch.linalg.inv(to_norm)
    shift = -(m @ (to_norm @ torch.tensor([tx, ty], dtype=torch.float64)))
    theta = torch.cat([m, shift[:, None]], dim=1)[None].float()
    x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)[None]
    grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return Image.fromarray(y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                 [0.0193339, 0.1191920, 0.9503041]])  # linear sRGB -> XYZ (D65)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> (..., 3) sRGB, clipped to [0, 1]."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.clip(xyz @ np.linalg.inv(_XYZ).T, 0, 1)
    return np.clip(np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055), 0, 1)


def match_colors(image: Image.Image, reference: Image.Image) -> Image.Image:
    """`image` with each LAB channel's mean and standard deviation set to `reference`'s (Deforum's colour
    coherence: without it, img2img feedback drifts in colour and contrast frame after frame)."""
    lab = rgb_to_lab(np.asarray(image.convert("RGB"), np.float64) / 255)
    ref = rgb_to_lab(np.asarray(reference.convert("RGB"), np.float64) / 255)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
    rmean, rstd = ref.reshape(-1, 3).mean(0), ref.reshape(-1, 3).std(0)
    out = (lab - mean) / np.maximum(std, 1e-6) * rstd + rmean
    return Image.fromarray(np.round(lab_to_rgb(out) * 255).astype(np.uint8))


# --- smoothness ----------------------------------------------------------------------------------------------------
def smoothness(frames: list[Image.Image]) -> dict:
    """Frame-to-frame change: the largest and mean mean-absolute pixel change (0..255) between consecutive frames,
    the first-to-last change, and their ratio (largest step / whole change; 1/(frames-1) is perfectly even)."""
    arrays = [np.asarray(f.convert("RGB"), np.float64) for f in frames]
    steps = [float(np.abs(b - a).mean()) for a, b in zip(arrays, arrays[1:])]
    total = float(np.abs(arrays[-1] - arrays[0]).mean()) if len(arrays) > 1 else 0.0
    largest = max(steps, default=0.0)
    return {"largest_step": largest, "mean_step": float(np.mean(steps)) if steps else 0.0, "first_to_last": total,
            "ratio": largest / total if total > 0 else float("inf") if largest > 0 else 0.0}


# --- the animation -------------------------------------------------------------------------------------------------
@dataclass
class AnimationSettings:
    """What `animate` draws. Motion (img2img feedback) is on when any of zoom, angle, translation or strength is
    given (or `motion=True`); otherwise every frame is drawn from its own (travelled) noise and prompt."""

    prompts: list[str]
    frames: int = 16
    keyframes: list[int] | None = None  # frame of each prompt; None: evenly spaced
    seeds: list[int] | None = None  # seed of each keyframe; None: seed, seed + 1, ...
    seed: int = 0
    zoom: str | None = None  # "0:(1.0), 30:(1.05)"
    angle: str | None = None  # degrees per frame, counter-clockwise
    translation_x: str | None = None  # pixels per frame, right
    translation_y: str | None = None  # pixels per frame, down
    strength: str | None = None  # Deforum's: how much of the previous frame each frame keeps (default 0.65)
    color_coherence: bool = True
    motion: bool | None = None
    ms: int = 125  # per frame in the written file

    def check(self) -> None:
        """Errors name the setting and what is allowed."""
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("animate needs at least one prompt")
        if not 1 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames must be between 1 and {MAX_FRAMES} (got {self.frames})")
        keys = self.keyframe_list()
        if len(keys) != len(self.prompts):
            raise ValueError(f"got {len(keys)} keyframes for {len(self.prompts)} prompts: give one keyframe per prompt")
        if keys[0] != 0 or any(b <= a for a, b in zip(keys, keys[1:])) or keys[-1] >= self.frames:
            raise ValueError(f"keyframes must start at 0, increase, and stay below frames={self.frames} (got {keys})")
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise ValueError(f"got {len(self.seeds)} seeds for {len(self.prompts)} prompts: give one per prompt")
        if self.ms < 1:
            raise ValueError(f"ms per frame must be at least 1 (got {self.ms})")
        for name, sched in self.schedules().items():
            values = [sched.at(f) for f in range(self.frames)]  # every frame: a failure now, not at frame 17
            if name == "strength" and not all(0 <= v <= 1 for v in values):
                raise ValueError(f"strength must stay within 0..1 (got {sched.text!r})")
            if name == "zoom" and not all(v > 0 for v in values):
                raise ValueError(f"zoom must stay positive (got {sched.text!r})")

    def keyframe_list(self) -> list[int]:
        """The prompts' keyframes."""
        return list(self.keyframes) if self.keyframes is not None else even_keyframes(len(self.prompts), self.frames)

    def seed_list(self) -> list[int]:
        """The keyframes' seeds."""
        return list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(len(self.prompts))]

    def schedules(self) -> dict[str, Schedule]:
        """The motion schedules, defaults filled in."""
        defaults = {"zoom": "0:(1.0)", "angle": "0:(0)", "translation_x": "0:(0)", "translation_y": "0:(0)",
                    "strength": "0:(0.65)"}
        return {k: parse_schedule(getattr(self, k) or v, k.replace("_", "-")) for k, v in defaults.items()}

    def uses_motion(self) -> bool:
        """Whether frames come from the previous frame by img2img (2D mode)."""
        if self.motion is not None:
            return self.motion
        return any(getattr(self, k) is not None for k in ("zoom", "angle", "translation_x", "translation_y",
                                                            "strength"))


@dataclass
class AnimationResult:
    """The frames, their parameters, where they were written, and the measured smoothness."""

    frames: list[Image.Image]
    params: list[dict]
    path: Path | None = None
    frames_dir: Path | None = None
    smoothness: dict = field(default_factory=dict)


def frames_folder(out: Path) -> Path:
    """Where the frames of `out` go: a folder beside it, 'travel.gif' -> 'travel-frames/'."""
    return out.with_name(f"{out.stem}-frames")


def animate(pipe, settings: AnimationSettings | list[str], out: str | Path | None = None, request=None, *,
            on_frame: Callable[[int, int], None] | None = None, callback=None,
            should_stop: Callable[[], bool] | None = None,
            on_image: Callable[[int, Image.Image, dict], None] | None = None, **options) -> AnimationResult:
    """Draw the animation with `pipe` (easel.load()); `request` (GenerationRequest) gives steps, CFG, sampler,
    size, negative prompt; `options` are AnimationSettings fields when `settings` is a list of prompts. With
    `out`, writes the animation (format from the suffix) and every frame as a PNG with its parameters into
    `frames_folder(out)`; `on_frame(done, total)` after each frame (and `on_image(n, image, params)` before it, so
    that a server keeps the frames made so far), `callback` at every step. When
    `should_stop()` turns true (a job cancelled), no further frame starts, and the frames done so far are
    written (an interrupted frame itself comes out from its last step, as A1111's interrupt)."""
    from easel.pipelines.request import GenerationRequest
    if not isinstance(settings, AnimationSettings):
        settings = AnimationSettings(list(settings), **options)
    settings.check()
    out = Path(out) if out is not None else None
    if out is not None:
        check_format(out.suffix or "gif")
    base = request or GenerationRequest()
    base = dataclasses.replace(base, batch_size=1, n_iter=1, init_images=[], mask=None, enable_hr=False)
    folder = frames_folder(out) if out is not None else None
    frames, params = [], []
    for n, (image, p) in enumerate(_frames(pipe, settings, base, callback, should_stop)):
        frames.append(image)
        params.append(p)
        if folder is not None:
            from easel.pipelines.metadata import save_png
            folder.mkdir(parents=True, exist_ok=True)
            save_png(image, folder / f"{n:05d}.png", p)
        if on_image is not None:
            on_image(n, image, p)
        if on_frame is not None:
            on_frame(n + 1, settings.frames)
    result = AnimationResult(frames, params, frames_dir=folder, smoothness=smoothness(frames))
    if out is not None and frames:
        result.path = save_animation(frames, out, ms=settings.ms, hold_last=1)
    return result


def _frames(pipe, settings: AnimationSettings, base, callback, should_stop=None):
    """(image, parameters) of each frame in turn, until `should_stop()`."""
    from easel.pipelines.common import initial_noise
    keys, seeds, prompts = settings.keyframe_list(), settings.seed_list(), settings.prompts
    sched = settings.schedules()
    motion = settings.uses_motion()
    cfg = pipe.config
    width, height = base.width or cfg.default_size, base.height or cfg.default_size
    f = cfg.vae.downsample
    shape = (cfg.vae.embed_dim, height // f, width // f)
    noises = [initial_noise([s], shape)[0] for s in seeds]
    encoded: dict = {}
    first = previous = None
    for frame in range(settings.frames):
        if should_stop is not None and should_stop():
            return
        i, t = travel_position(keys, frame)
        j = min(i + 1, len(prompts) - 1)
        noise = slerp(noises[i], noises[j], t) if t > 0 else noises[i]
        req = dataclasses.replace(base, prompt=prompts[i], seed=seeds[i], width=width, height=height)
        info = {"frame": frame, "frames": settings.frames, "prompt_from": prompts[i], "prompt_to": prompts[j],
                "travel": round(t, 4), "seed_from": seeds[i], "seed_to": seeds[j]}
        if motion and previous is not None:
            values = {k: s.at(frame) for k, s in sched.items()}
            moved = warp(previous, values["zoom"], values["angle"], values["translation_x"], values["translation_y"])
            if settings.color_coherence:
                moved = match_colors(moved, first)
            req = dataclasses.replace(req, init_images=[moved], denoising_strength=1 - values["strength"])
            info.update({k: round(v, 6) for k, v in values.items()})
        extend = travel_extension(req, prompts[j], t, noise, encoded)
        made = pipe.generate(req, callback, extend_plan=extend, should_stop=should_stop)
        if not made:  # cancelled while this frame was drawn: the pipeline drops an unfinished image
            return
        result = made[0]
        previous = result.image
        first = first or result.image
        yield result.image, {**result.params, "animation": info}


# --- command line --------------------------------------------------------------------------------------------------
_REQUEST_FIELDS = ("negative_prompt", "steps", "cfg_scale", "sampler", "scheduler", "seed", "width", "height",
                   "clip_skip", "eta")


def add_animate_parser(sub, cli) -> None:
    """Register `easel animate`. `cli` is the easel.cli module (flag tables and helpers; no import back)."""
    p = sub.add_parser("animate", help="prompt travel and Deforum-style 2D motion as GIF / WebP / MP4")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one prompt per keyframe")
    p.add_argument("--frames", type=int, default=16, help="number of frames (default 16)")
    p.add_argument("--out", "-o", default="animation.gif", help="the animation: .gif, .webp or .mp4 (MP4 needs "
                   "PyAV); the frames go to a folder beside it (default animation.gif, frames in animation-frames/)")
    p.add_argument("--keyframes", help="frame of each prompt, e.g. 0,12,24 (default: evenly spaced)")
    p.add_argument("--seeds", help="seed of each keyframe, e.g. 1,2,3 (default: --seed, --seed + 1, ...)")
    p.add_argument("--zoom", help='zoom per frame, e.g. "0:(1.0), 30:(1.05)" (> 1 moves in); any motion flag turns '
                   "on img2img feedback")
    p.add_argument("--angle", help='turn per frame in degrees, counter-clockwise, e.g. "0:(0), 20:(2)"')
    p.add_argument("--translation-x", help='shift per frame in pixels to the right, e.g. "0:(1)"')
    p.add_argument("--translation-y", help='shift per frame in pixels down, e.g. "0:(-1)"')
    p.add_argument("--strength", help='Deforum\'s strength schedule: how much of the previous frame each frame keeps '
                   '(default "0:(0.65)", i.e. img2img at denoising strength 0.35)')
    p.add_argument("--no-color-coherence", dest="color_coherence", action="store_false",
                   help="do not match each frame's colours to the first frame's")
    p.add_argument("--ms", type=int, default=125, help="milliseconds per frame (default 125)")
    cli.add_request_flags(p, {k: cli.REQUEST_FLAGS[k] for k in _REQUEST_FIELDS})
    cli.add_model_flags(p)
    p.set_defaults(func=cmd_animate, cli=cli)


def _int_list(text: str | None, flag: str) -> list[int] | None:
    """'0,12,24' -> [0, 12, 24]; errors name the flag."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} takes whole numbers separated by commas, e.g. 0,12,24 (got {text!r})") from None


def cmd_animate(args: argparse.Namespace) -> int:
    """easel animate PROMPT [PROMPT ...] --frames N --out FILE ..."""
    import easel
    req = args.cli.request_from_args(args)
    if req.seed == -1:
        import random
        req.seed = random.randrange(2**32)
    settings = AnimationSettings(args.prompts, args.frames, _int_list(args.keyframes, "--keyframes"),
                                 _int_list(args.seeds, "--seeds"), req.seed, args.zoom, args.angle,
                                 args.translation_x, args.translation_y, args.strength, args.color_coherence,
                                 ms=args.ms)
    settings.check()  # before the (slow) model load
    check_format(Path(args.out).suffix or "gif")
    req.check()
    pipe = easel.load(args.model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                      prediction=args.prediction)
    from tqdm import tqdm
    with tqdm(total=settings.frames, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        result = animate(pipe, settings, args.out, req, on_frame=lambda done, total: bar.update(1))
    s = result.smoothness
    print(f"{result.frames_dir}/ ({len(result.frames)} frames)\n{result.path}", flush=True)
    print(f"smoothness: largest frame-to-frame change {s['largest_step']:.2f}, mean {s['mean_step']:.2f}, "
          f"first-to-last {s['first_to_last']:.2f} (mean abs pixel change, 0..255); ratio {s['ratio']:.3f}",
          file=sys.stderr, flush=True)
    return 0
