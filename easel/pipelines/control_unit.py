"""One ControlNet of a request (A1111's "ControlNet unit"): which model, which image, how strongly and when.

Field names follow sd-webui-controlnet's API units where they exist (`weight`, `guidance_start`, `guidance_end`,
`control_mode`, `resize_mode`, `threshold_a`, `threshold_b`); its labels and indices ("My prompt is more important",
1; "Crop and Resize", 1) are accepted and stored as easel's names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from PIL import Image

from easel.pipelines.control_pre import canonical

CONTROL_MODES = ("balanced", "prompt", "control")
CONTROL_MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
                       "control": "ControlNet is more important"}
# The same names as the request's img2img resize modes (easel.pipelines.request.RESIZE_MODES).
CONTROL_RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
RESIZE_MODE_LABELS = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                      "resize_and_fill": "Resize and Fill"}
MAX_WEIGHT = 2.0  # A1111's slider range; larger residuals only break the image


@dataclass
class ControlUnit:
    """A ControlNet, its condition image and how it is applied."""

    model: str  # a path, or a name from the ControlNet folders
    image: Image.Image | None = None  # None: the request's init image (img2img / inpaint), as A1111
    weight: float = 1.0
    guidance_start: float = 0.0  # fraction of the steps before which the ControlNet is off
    guidance_end: float = 1.0  # fraction of the steps after which it is off
    control_mode: str = "balanced"  # balanced | prompt ("My prompt is more important") | control
    resize_mode: str = "crop_and_resize"  # how the image is fitted to the generation size (A1111's default)
    preprocessor: str = "none"  # easel.pipelines.control_pre.PREPROCESSORS (or sd-webui-controlnet's module name)
    threshold_a: float | None = None  # the preprocessor's parameters (None: its defaults; canny: 100, 200)
    threshold_b: float | None = None
    mask: Image.Image | None = None  # for the inpaint preprocessor outside inpainting (white = repaint)

    def __post_init__(self):
        self.control_mode = _choice(self.control_mode, CONTROL_MODES, CONTROL_MODE_LABELS)
        self.resize_mode = _choice(self.resize_mode, CONTROL_RESIZE_MODES, RESIZE_MODE_LABELS)

    def check(self, index: int = 0, has_init_image: bool = False) -> None:
        """Validate; errors name `controlnets[index].field` and what is allowed."""
        name = f"controlnets[{index}]"
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"{name}.model must name a ControlNet (a path or a name from the ControlNet folders)")
        if self.image is None and not has_init_image:
            raise ValueError(f"{name} has no image: give the condition image (CLI: --control-image IMG)")
        for field in ("image", "mask"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Image.Image):
                raise ValueError(f"{name}.{field} must be a PIL image (got {type(value).__name__}); decode base64 "
                                 "first (GenerationRequest.from_dict does)")
        for field, lo, hi in (("weight", 0.0, MAX_WEIGHT), ("guidance_start", 0.0, 1.0), ("guidance_end", 0.0, 1.0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"{name}.{field} must be a number between {lo:g} and {hi:g} (got {value!r})")
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"{name}: guidance_start {self.guidance_start} is after guidance_end "
                             f"{self.guidance_end}; the ControlNet would never run")
        for field, choices in (("control_mode", CONTROL_MODES), ("resize_mode", CONTROL_RESIZE_MODES)):
            if getattr(self, field) not in choices:
                raise ValueError(f"unknown {name}.{field} {getattr(self, field)!r}; choose one of {', '.join(choices)}")
        try:
            canonical(self.preprocessor)
        except ValueError as e:
            raise ValueError(f"{name}.preprocessor: {e}") from None
        for field in ("threshold_a", "threshold_b"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name}.{field} must be a number or null (got {value!r})")

    def infotext(self, model_hash: str = "") -> str:
        """sd-webui-controlnet's "ControlNet N" value: 'Module: canny, Model: name [hash], Weight: 1, ...'."""
        model = f"{self.model} [{model_hash}]" if model_hash else self.model
        parts = [("Module", canonical(self.preprocessor)), ("Model", model), ("Weight", self.weight),
                 ("Resize Mode", RESIZE_MODE_LABELS[self.resize_mode]), ("Threshold A", self.threshold_a),
                 ("Threshold B", self.threshold_b), ("Guidance Start", self.guidance_start),
                 ("Guidance End", self.guidance_end), ("Control Mode", CONTROL_MODE_LABELS[self.control_mode])]
        return ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in parts if v is not None)

    def to_dict(self, encode=None) -> dict:
        """Plain dict; images through `encode(image)` (None: left out)."""
        d = dataclasses.asdict(dataclasses.replace(self, image=None, mask=None))
        for field in ("image", "mask"):
            value = getattr(self, field)
            d[field] = None if value is None or encode is None else encode(value)
        return d

    @staticmethod
    def from_dict(d: dict, index: int = 0, decode=None) -> "ControlUnit":
        """A unit from a dict (sd-webui-controlnet's `module` and `input_image` accepted for `preprocessor` and
        `image`); images through `decode(value, name)`; unknown keys are named."""
        if isinstance(d, ControlUnit):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"controlnets[{index}] must be an object with at least 'model' and 'image' "
                             f"(got {type(d).__name__})")
        d = dict(d)
        for theirs, ours in (("module", "preprocessor"), ("input_image", "image")):
            if theirs in d and ours not in d:
                d[ours] = d.pop(theirs)
        names = {f.name for f in dataclasses.fields(ControlUnit)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown field(s) in controlnets[{index}]: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        if "model" not in d:
            raise ValueError(f"controlnets[{index}] needs 'model' (a ControlNet path or name)")
        for field in ("image", "mask"):
            if d.get(field) is not None and decode is not None:
                d[field] = decode(d[field], f"controlnets[{index}].{field}")
        return ControlUnit(**d)


# sd-webui-controlnet unit fields easel has no use for: preprocessing already runs at the generation size (its
# "pixel perfect"), and models stay where the base model is.
A1111_IGNORED = ("enabled", "lowvram", "low_vram", "processor_res", "pixel_perfect", "guessmode", "is_ui",
                 "input_mode", "batch_images", "output_dir", "loopback", "hr_option", "save_detected_map",
                 "advanced_weighting", "inpaint_crop_input_image", "effective_region_mask", "ipadapter_input",
                 "union_control_type", "mask_image")


def from_a1111(args: list, decode=None) -> list[ControlUnit]:
    """The units of an A1111 request's `alwayson_scripts.controlnet.args` (sd-webui-controlnet's API): disabled
    units and model "None" are skipped, `image` may be base64 or {"image", "mask"}, the model may carry its
    " [hash]", the legacy `guessmode` means "ControlNet is more important"; the other UI-only fields are ignored."""
    if not isinstance(args, list):
        raise ValueError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for i, arg in enumerate(args):
        if not isinstance(arg, dict):
            raise ValueError(f"alwayson_scripts.controlnet.args[{i}] must be an object (a ControlNet unit)")
        if arg.get("enabled", True) is False or str(arg.get("model", "None")) in ("None", "none", ""):
            continue
        d = {k: v for k, v in arg.items() if k not in A1111_IGNORED and v is not None}
        image = d.get("image", d.get("input_image"))
        if isinstance(image, dict):  # {"image": b64, "mask": b64}: the unit's own mask (the inpaint preprocessor)
            d.pop("input_image", None)
            d["image"], mask = image.get("image"), image.get("mask")
            if mask is not None:
                d["mask"] = mask
        if arg.get("guessmode") and "control_mode" not in d:
            d["control_mode"] = "control"
        units.append(ControlUnit.from_dict(d, len(units), decode))
    return units


def _choice(value, choices: tuple[str, ...], labels: dict[str, str]):
    """An index, a label ("Crop and Resize") or a spelling with hyphens/spaces -> the canonical name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        key = value.strip().lower()
        for name, label in labels.items():
            if key == label.lower():
                return name
        key = key.replace("-", "_").replace(" ", "_")
        return key if key in choices else value
    return value
