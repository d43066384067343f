"""One request schema for every way in: CLI flags, Python keyword arguments, HTTP bodies, the web UI."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random
from dataclasses import dataclass, field

from PIL import Image

from easel.pipelines.control_unit import ControlUnit

# Allowed values of the choice fields; A1111's API sends these as integers (index into the tuple).
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
# In A1111's numbering (its API sends inpainting_fill as 0..3): 0 fill, 1 original, 2 latent noise, 3 latent nothing.
INPAINTING_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
HR_UPSCALERS = ("latent", "latent-nearest", "latent-bicubic", "latent-antialiased", "lanczos", "nearest")
PREVIEW_MODES = ("approx", "full")
IMAGE_FIELDS = ("init_images", "mask")


@dataclass
class GenerationRequest:
    """Everything that decides a generated image (given the model)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None  # None: the model's default size (img2img: the init image's size)
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "dpmpp_2m"  # easel name, A1111 label ("DPM++ 2M Karras") or ComfyUI name
    scheduler: str | None = None  # None: the schedule the sampler label names, else karras
    seed: int = -1  # -1: a random seed, reported back in the image's parameters
    batch_size: int | None = None  # None: the model's default batch
    n_iter: int = 1  # number of batches
    clip_skip: int = 1
    eta: float | None = None  # noise multiplier of ancestral / SDE samplers (None: sampler default)
    dtype: str = "fp32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # free-form options a mode may read
    # img2img / inpaint / outpaint
    init_images: list = field(default_factory=list)  # PIL images; empty: txt2img
    mask: Image.Image | None = None  # white = repaint
    denoising_strength: float = 0.75
    resize_mode: str = "just_resize"
    mask_blur: int = 4
    inpainting_fill: str = "original"  # A1111's UI default; its API's default 0 is "fill"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0
    # hires fix
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "latent"
    hr_second_pass_steps: int = 0  # 0: same as steps
    hr_denoising_strength: float = 0.5
    hr_sampler: str | None = None  # None: the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_resize_x: int = 0  # 0: use hr_scale
    hr_resize_y: int = 0
    hr_cfg_scale: float | None = None
    # variation seeds
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    # LoRA, refiner, previews
    loras: list = field(default_factory=list)  # "name_or_path:weight"
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = 0.8
    preview_every: int = 0  # 0: no previews
    preview_mode: str = "approx"
    tiled_vae: bool | None = None  # None: tile the VAE when the image is large enough to need it
    # ControlNets, applied together (ControlUnit, or dicts of its fields with images as base64)
    controlnets: list = field(default_factory=list)
    # prompt tooling: A1111 styles by name (styles.csv), applied before wildcards and {a|b} choices are drawn
    styles: list[str] = field(default_factory=list)
    # opt-in lossy accelerations (easel.pipelines.accel; the defaults are off): feature caching every N UNet calls,
    # the negative-prompt pass dropped after this fraction of the steps, the fraction of tokens merged (ToMe)
    deepcache: int = 1
    cfg_cutoff: float = 1.0
    tome: float = 0.0

    def __post_init__(self):
        # A1111's API sends choice fields as indices, the CLI with hyphens: store the canonical names.
        self.resize_mode = _choice_name(self.resize_mode, RESIZE_MODES)
        self.inpainting_fill = _choice_name(self.inpainting_fill, INPAINTING_FILLS)
        if not isinstance(self.controlnets, list):
            raise ValueError(f"controlnets must be a list of ControlNet units (got {type(self.controlnets).__name__})")
        self.controlnets = [ControlUnit.from_dict(c, i, decode_image) for i, c in enumerate(self.controlnets)]

    @property
    def mode(self) -> str:
        """'outpaint' | 'inpaint' | 'img2img' | 'txt2img', from which inputs are present."""
        if any(getattr(self, f"outpaint_{side}") > 0 for side in ("left", "right", "up", "down")):
            return "outpaint"
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_images else "txt2img"

    def resolved(self, default_size: int, default_batch: int) -> "GenerationRequest":
        """A copy with every default filled in and every value checked (raises ValueError naming the field)."""
        pick = lambda v, d: d if v is None else v  # noqa: E731  (0 is a value to reject, not "unset")
        r = dataclasses.replace(self, width=pick(self.width, default_size), height=pick(self.height, default_size),
                                batch_size=pick(self.batch_size, default_batch))
        r.resolve_names()
        r.fix_seeds()
        r.expand_prompts()
        r.check()
        return r

    def fix_seeds(self) -> None:
        """Draw the seed and variation seed when they are -1 (random), in place."""
        if self.seed is None or self.seed < 0:
            self.seed = random.randrange(2**32)
        if self.subseed is None or self.subseed < 0:
            # Drawn even when unused so that parameters always reproduce; only recorded when strength > 0.
            self.subseed = random.randrange(2**32)

    def expanded(self) -> "GenerationRequest":
        """A copy with the seeds fixed and the styles, wildcards and `{a|b}` choices applied: the prompt the images are
        made from, for whatever reads the prompt before a mode resolves the request (LoRA tags, word warnings)."""
        r = dataclasses.replace(self)
        r.fix_seeds()
        r.expand_prompts()
        return r

    def expand_prompts(self) -> None:
        """Apply the styles, then draw the wildcards and `{a|b}` choices from the seed, in place (needs a fixed
        seed); what was written goes to extra (applied_styles, prompt_template, negative_prompt_template) for the
        image's parameters, and styles is emptied, so that expanding again changes nothing."""
        from easel.text.styles import apply_styles
        from easel.text.wildcards import expand
        written = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        styled = dict(zip(written, apply_styles(self.prompt, self.negative_prompt, self.styles))) if self.styles \
            else dict(written)
        notes = {"applied_styles": list(self.styles)} if self.styles else {}
        for name, text in styled.items():
            setattr(self, name, expand(text, self.seed))
            if getattr(self, name) != text:
                notes[f"{name}_template"] = written[name]
        if self.hr_prompt or self.hr_negative_prompt:  # A1111 styles the hires prompts too
            hr = (self.hr_prompt or "", self.hr_negative_prompt or "")
            hr = apply_styles(*hr, self.styles) if self.styles else hr
            self.hr_prompt = expand(hr[0], self.seed) if self.hr_prompt else self.hr_prompt
            self.hr_negative_prompt = expand(hr[1], self.seed) if self.hr_negative_prompt else self.hr_negative_prompt
        if notes:
            self.extra = {**self.extra, **notes}
        self.styles = []

    @property
    def draws_per_image(self) -> bool:
        """Whether the request makes several images whose prompts may differ (wildcards or `{a|b}` choices, drawn
        from each image's own seed): run `per_image()` then."""
        from easel.text.wildcards import has_dynamic_syntax
        texts = (*self._templates().values(), self.hr_prompt or "", self.hr_negative_prompt or "")
        return (self.batch_size or 1) * self.n_iter > 1 and any(has_dynamic_syntax(t) for t in texts)

    def _templates(self) -> dict[str, str]:
        """The prompts as written: an already expanded request (resolved()) keeps them in extra."""
        return {name: (self.extra or {}).get(f"{name}_template", getattr(self, name))
                for name in ("prompt", "negative_prompt")}

    def per_image(self, default_batch: int = 1) -> list["GenerationRequest"]:
        """One request per image (batch 1, its own seed and variation seed, as the batch would have given it), so
        that each image's wildcards are drawn from its own seed; needs a fixed seed (`fix_seeds()` first)."""
        if self.seed is None or self.seed < 0:
            raise ValueError("per_image needs a fixed seed: call fix_seeds() first")
        count = (self.batch_size or default_batch) * self.n_iter
        written = self._templates()  # an expanded request is drawn again per image, from the prompts as written
        styles = self.styles or list((self.extra or {}).get("applied_styles", []))
        extra = {k: v for k, v in (self.extra or {}).items()
                 if k not in ("prompt_template", "negative_prompt_template", "applied_styles")}
        return [dataclasses.replace(self, **written, styles=list(styles), extra=dict(extra), seed=self.seed + i,
                                    batch_size=1, n_iter=1,
                                    subseed=self.subseed + i if self.subseed >= 0 else self.subseed)
                for i in range(count)]

    def resolve_names(self) -> None:
        """Replace sampler, scheduler and upscaler names (A1111 labels, ComfyUI names) by easel's, in place."""
        from easel.pipelines import names
        sampler, schedule = names.sampler_and_schedule(self.sampler, self.scheduler)
        self.sampler, self.scheduler = sampler, schedule or names.DEFAULT_SCHEDULER
        if self.hr_sampler is not None or self.hr_scheduler is not None:
            hr_sampler, hr_schedule = names.sampler_and_schedule(self.hr_sampler or self.sampler, self.hr_scheduler,
                                                                 "hr_sampler", "hr_scheduler")
            self.hr_sampler, self.hr_scheduler = hr_sampler, hr_schedule
        self.hr_upscaler = names.resolve_upscaler(self.hr_upscaler)

    def check(self) -> None:
        """Validate ranges; errors say which field and what is allowed."""
        self._check_basic()
        self._check_edit()
        self._check_hires()
        self._check_extras()
        self._check_prompt_tools()
        from easel.pipelines.accel import check as check_accel
        check_accel(self.deepcache, self.cfg_cutoff, self.tome)

    def _check_basic(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (got {v}); try {max(8, round(v / 8) * 8)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.n_iter < 1:
            raise ValueError(f"number of batches must be at least 1 (got {self.n_iter})")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be 1 or more (got {self.clip_skip})")
        if self.seed is not None and self.seed >= 2**63:
            raise ValueError("seed must be below 2**63")
        from easel.pipelines.names import sampler_and_schedule
        sampler_and_schedule(self.sampler, self.scheduler)  # raises, naming the field and the choices

    def _check_edit(self) -> None:
        _in_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
        _one_of("resize_mode", self.resize_mode, RESIZE_MODES)
        _one_of("inpainting_fill", self.inpainting_fill, INPAINTING_FILLS)
        for name in ("mask_blur", "inpaint_full_res_padding", "outpaint_left", "outpaint_right", "outpaint_up",
                     "outpaint_down"):
            _at_least(name, getattr(self, name), 0)
        for i, im in enumerate(self.init_images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"init_images[{i}] must be a PIL image (got {type(im).__name__}); "
                                 "decode paths or base64 first (GenerationRequest.from_dict decodes base64)")
        if self.mask is not None and not isinstance(self.mask, Image.Image):
            raise ValueError(f"mask must be a PIL image or None (got {type(self.mask).__name__})")
        if self.mode in ("inpaint", "outpaint") and not self.init_images:
            raise ValueError(f"{self.mode} needs an image to edit: set init_images")

    def _check_hires(self) -> None:
        if self.hr_scale <= 0:
            raise ValueError(f"hr_scale must be positive (got {self.hr_scale})")
        from easel.pipelines.names import resolve_upscaler, sampler_and_schedule
        resolve_upscaler(self.hr_upscaler)
        _at_least("hr_second_pass_steps", self.hr_second_pass_steps, 0)
        _in_range("hr_denoising_strength", self.hr_denoising_strength, 0.0, 1.0)
        _at_least("hr_resize_x", self.hr_resize_x, 0)
        _at_least("hr_resize_y", self.hr_resize_y, 0)
        if self.hr_sampler is not None or self.hr_scheduler is not None:
            sampler_and_schedule(self.hr_sampler or self.sampler, self.hr_scheduler, "hr_sampler", "hr_scheduler")

    def _check_extras(self) -> None:
        _in_range("subseed_strength", self.subseed_strength, 0.0, 1.0)
        if self.subseed is not None and self.subseed >= 2**63:
            raise ValueError("subseed must be below 2**63")
        _at_least("seed_resize_from_w", self.seed_resize_from_w, 0)
        _at_least("seed_resize_from_h", self.seed_resize_from_h, 0)
        for i, spec in enumerate(self.loras):
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"loras[{i}] must be a string 'name_or_path:weight' (got {spec!r})")
        if not 0.0 < self.refiner_switch_at <= 1.0:
            raise ValueError(f"refiner_switch_at must be in (0, 1] (got {self.refiner_switch_at})")
        _at_least("preview_every", self.preview_every, 0)
        for i, unit in enumerate(self.controlnets):
            unit.check(i, bool(self.init_images))
        _one_of("preview_mode", self.preview_mode, PREVIEW_MODES)

    def _check_prompt_tools(self) -> None:
        if not isinstance(self.styles, list) or not all(isinstance(s, str) for s in self.styles):
            raise ValueError(f"styles must be a list of style names (got {self.styles!r})")
        from easel.text.styles import find_styles, load_styles
        from easel.text.wildcards import expand
        if self.styles:
            find_styles(self.styles, load_styles())  # an unknown name fails now, listing the styles there are
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                continue
            try:
                expand(text, 0)  # an unclosed brace or a missing wildcard fails before any model is loaded
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

    def to_dict(self, images: str = "marker") -> dict:
        """Plain JSON-able dict; images become a marker '<image WxH>' ('marker'), base64 PNG ('base64') or are
        left out ('drop')."""
        # asdict deep-copies: take the images out first, then put JSON-able stand-ins back.
        d = dataclasses.asdict(dataclasses.replace(self, init_images=[], mask=None, controlnets=[]))
        encode = {"marker": image_marker, "base64": image_to_base64}.get(images)
        if images == "drop":
            del d["init_images"], d["mask"]
        elif encode is None:
            raise ValueError(f"images must be 'marker', 'base64' or 'drop' (got {images!r})")
        else:
            d["init_images"] = [encode(im) for im in self.init_images]
            d["mask"] = None if self.mask is None else encode(self.mask)
        d["controlnets"] = [u.to_dict(encode) for u in self.controlnets]
        return d

    @staticmethod
    def from_dict(d: dict) -> "GenerationRequest":
        """Build from a dict, rejecting unknown fields by name; images may be PIL images or base64 strings."""
        names = {f.name for f in dataclasses.fields(GenerationRequest)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("init_images") is not None:
            d["init_images"] = [decode_image(im, f"init_images[{i}]") for i, im in enumerate(d["init_images"])]
        else:
            d.pop("init_images", None)
        if d.get("mask") is not None:
            d["mask"] = decode_image(d["mask"], "mask")
        return GenerationRequest(**d)


def image_marker(image: Image.Image) -> str:
    """A short JSON-able stand-in for an image: '<image WxH>'."""
    return f"<image {image.width}x{image.height}>"


def image_to_base64(image: Image.Image) -> str:
    """PNG bytes of an image, base64-encoded (what HTTP bodies carry)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(value, name: str = "image") -> Image.Image:
    """A PIL image from a PIL image, base64 text or a data: URL; errors name the field."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a PIL image or base64 text (got {type(value).__name__})")
    if value.startswith("<image ") and value.endswith(">"):
        raise ValueError(f"{name} is a placeholder {value!r} (images are left out of to_dict() by default): "
                         "pass the image itself or use to_dict(images='base64')")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        im = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        im.load()
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"{name} is not a base64-encoded image ({e})") from None
    return im


def _choice_name(value, choices: tuple[str, ...]):
    """An A1111 index or a hyphenated spelling -> the canonical name (anything else is left for check())."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        name = value.strip().lower().replace("-", "_").replace(" ", "_")
        return name if name in choices else value
    return value


def _one_of(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} (got {value})")


def _at_least(name: str, value: int, lo: int) -> None:
    if value < lo:
        raise ValueError(f"{name} must be at least {lo} (got {value})")
