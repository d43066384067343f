"""A1111 `/sdapi/v1` request bodies, and their mapping onto easel's one request schema (GenerationRequest).

Field names and defaults follow A1111's StableDiffusionProcessingTxt2Img / Img2Img as its API exposes them, with one
deliberate difference: a missing width/height means the model's own size (A1111 assumes 512, which is wrong for the
built-in 64 px model and for SDXL). Every field easel cannot honour is reported back (`unsupported`), never dropped
in silence; fields that change nothing in A1111 either are listed as `ignored`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, Field, create_model

from easel.pipelines.request import GenerationRequest, decode_image
from easel.samplers.names import AUTOMATIC_SCHEDULE  # A1111's "Automatic" schedule per sampler (the A1111 routes)

# (type, A1111's default). Every field may also be null, as in A1111 (null means "the default").
COMMON_FIELDS: dict[str, tuple[Any, Any]] = {
    "prompt": (str, ""), "negative_prompt": (str, ""), "styles": (list[str], None), "seed": (int, -1),
    "subseed": (int, -1), "subseed_strength": (float, 0.0), "seed_resize_from_h": (int, -1),
    "seed_resize_from_w": (int, -1), "seed_enable_extras": (bool, True), "sampler_name": (str, None),
    "scheduler": (str, None), "batch_size": (int, 1), "n_iter": (int, 1), "steps": (int, 50),
    "cfg_scale": (float, 7.0), "width": (int, None), "height": (int, None), "restore_faces": (bool, None),
    "tiling": (bool, None), "do_not_save_samples": (bool, False), "do_not_save_grid": (bool, False),
    "eta": (float, None), "s_min_uncond": (float, None), "s_churn": (float, None), "s_tmax": (float, None),
    "s_tmin": (float, None), "s_noise": (float, None), "override_settings": (dict[str, Any], None),
    "override_settings_restore_afterwards": (bool, True), "refiner_checkpoint": (str, None),
    "refiner_switch_at": (float, None), "disable_extra_networks": (bool, False), "firstpass_image": (str, None),
    "comments": (dict, None), "sampler_index": (str, "Euler"), "script_name": (str, None),
    "script_args": (list, []), "send_images": (bool, True), "save_images": (bool, False),
    "alwayson_scripts": (dict, {}), "force_task_id": (str, None), "infotext": (str, None),
    "loras": (list[str], []),  # easel extension: "name:weight", like <lora:name:weight> in the prompt
}
TXT2IMG_FIELDS: dict[str, tuple[Any, Any]] = {
    "enable_hr": (bool, False), "denoising_strength": (float, 0.75), "firstphase_width": (int, 0),
    "firstphase_height": (int, 0), "hr_scale": (float, 2.0), "hr_upscaler": (str, None),
    "hr_second_pass_steps": (int, 0), "hr_resize_x": (int, 0), "hr_resize_y": (int, 0),
    "hr_checkpoint_name": (str, None), "hr_sampler_name": (str, None), "hr_scheduler": (str, None),
    "hr_prompt": (str, ""), "hr_negative_prompt": (str, ""),
}
IMG2IMG_FIELDS: dict[str, tuple[Any, Any]] = {
    "init_images": (list[str], None), "resize_mode": (int | str, 0), "denoising_strength": (float, 0.75),
    "image_cfg_scale": (float, None), "mask": (str, None), "mask_blur_x": (int, 4), "mask_blur_y": (int, 4),
    "mask_blur": (int, None), "mask_round": (bool, True), "inpainting_fill": (int | str, 0),
    "inpaint_full_res": (bool, True), "inpaint_full_res_padding": (int, 0), "inpainting_mask_invert": (int, 0),
    "initial_noise_multiplier": (float, None), "latent_mask": (str, None), "include_init_images": (bool, False),
    # easel extensions: pixels to add on each side (outpainting)
    "outpaint_left": (int, 0), "outpaint_right": (int, 0), "outpaint_up": (int, 0), "outpaint_down": (int, 0),
}

# Fields easel has no equivalent for; reported as unsupported unless sent at a value that changes nothing.
UNSUPPORTED = ("restore_faces", "tiling", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
               "override_settings_restore_afterwards", "disable_extra_networks", "firstpass_image", "comments",
               "infotext", "firstphase_width", "firstphase_height",
               "hr_checkpoint_name", "image_cfg_scale", "mask_round", "initial_noise_multiplier", "latent_mask")
NEUTRAL = {"mask_round": True, "override_settings_restore_afterwards": True, "s_noise": 1.0,
           "initial_noise_multiplier": 1.0, "hr_checkpoint_name": "Use same checkpoint"}
IGNORED = ("do_not_save_samples", "do_not_save_grid", "force_task_id")  # no effect on the images in A1111 either

# A1111 hires upscaler labels -> easel's; other upscalers (ESRGAN, ...) fall back to lanczos, reported in `notes`.
UPSCALERS = {"Latent": "latent", "Latent (antialiased)": "latent-antialiased", "Latent (bicubic)": "latent-bicubic",
             "Latent (bicubic antialiased)": "latent-antialiased", "Latent (nearest)": "latent-nearest",
             "Latent (nearest-exact)": "latent-nearest", "Lanczos": "lanczos", "None": "lanczos"}
INEXACT_UPSCALERS = ("Latent (bicubic antialiased)", "Latent (nearest-exact)")  # close, not the same


def _body_model(name: str, fields: dict[str, tuple[Any, Any]], doc: str):
    spec = {k: (t | None, Field(default_factory=lambda d=d: _copy(d)) if isinstance(d, (list, dict)) else d)
            for k, (t, d) in fields.items()}
    model = create_model(name, __config__=ConfigDict(extra="allow", allow_inf_nan=False), **spec)
    model.__doc__ = doc
    return model


def _copy(value):
    return type(value)(value)


Txt2ImgBody = _body_model("A1111Txt2Img", COMMON_FIELDS | TXT2IMG_FIELDS,
                          "A1111 txt2img body (StableDiffusionProcessingTxt2Img fields); unknown fields are reported.")
Img2ImgBody = _body_model("A1111Img2Img", COMMON_FIELDS | IMG2IMG_FIELDS,
                          "A1111 img2img body (StableDiffusionProcessingImg2Img fields); unknown fields are reported.")


@dataclass
class Mapped:
    """An A1111 body turned into an easel request, with what could not be honoured."""

    request: GenerationRequest
    model: str | None  # a registry name from override_settings, None: the server's current model
    unsupported: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    send_images: bool = True
    save_images: bool = False


class _Body:
    """Read access to a body dict: null or missing means A1111's default."""

    def __init__(self, body: dict, defaults: dict[str, tuple[Any, Any]]):
        self.body, self.defaults = body, defaults

    def __call__(self, name: str):
        v = self.body.get(name)
        return self.defaults[name][1] if v is None else v


def to_request(body: dict, sent: set[str], img2img: bool, options: dict, resolve_checkpoint,
               decode=decode_image) -> Mapped:
    """Map an A1111 body (dict with defaults filled) onto a GenerationRequest; ValueError names a bad field.

    `sent` are the keys the client gave; `options` the server's A1111 options (CLIP skip, preview type);
    `resolve_checkpoint(title) -> registry name` maps A1111 checkpoint titles; `decode(text, field)` turns base64
    text into an image (the server's checks the size from the header before decoding)."""
    defaults = COMMON_FIELDS | (IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS)
    get = _Body(body, defaults)
    sampler, scheduler = resolve_a1111_sampler(get("sampler_name") or get("sampler_index"), get("scheduler"))
    fields = {name: get(name) for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height",
                                           "seed", "batch_size", "n_iter", "eta")}
    fields.update(sampler=sampler, scheduler=scheduler, loras=list(get("loras")), styles=list(get("styles") or []),
                  clip_skip=int(options.get("CLIP_stop_at_last_layers", 1)),
                  preview_mode="full" if options.get("show_progress_type") == "Full" else "approx")
    fields.update(_seed_fields(get))
    mapped = Mapped(GenerationRequest(), None, send_images=bool(get("send_images")),
                    save_images=bool(get("save_images")))
    mapped.model = _override_settings(get("override_settings") or {}, fields, mapped, resolve_checkpoint, options)
    _refiner(get, fields, resolve_checkpoint)
    if img2img:
        _img2img_fields(get, fields, mapped, decode)
    else:
        _hires_fields(get, fields, mapped)
    fields["controlnets"] = _alwayson_scripts(get("alwayson_scripts"), mapped, decode)
    _report(body, sent, defaults, mapped)
    mapped.request = GenerationRequest(**fields)
    mapped.request.check()
    return mapped


def _seed_fields(get: _Body) -> dict:
    """Variation seed fields; A1111's -1 "unset" sizes become easel's 0, and seed_enable_extras=false clears them."""
    if not get("seed_enable_extras"):
        return {"subseed": -1, "subseed_strength": 0.0, "seed_resize_from_w": 0, "seed_resize_from_h": 0}
    return {"subseed": get("subseed"), "subseed_strength": get("subseed_strength"),
            "seed_resize_from_w": max(0, get("seed_resize_from_w")),
            "seed_resize_from_h": max(0, get("seed_resize_from_h"))}


# easel's own override_settings keys (A1111 has no such settings): the request fields of easel.pipelines.accel.
ACCEL_OVERRIDES = ("deepcache", "cfg_cutoff", "tome")


def _override_settings(overrides: dict, fields: dict, mapped: Mapped, resolve_checkpoint, options: dict
                       ) -> str | None:
    """sd_model_checkpoint picks the model and CLIP_stop_at_last_layers the CLIP skip (for this request only);
    deepcache, cfg_cutoff and tome turn on easel's lossy accelerations; other settings are ignored when they equal
    the server's, else reported unsupported."""
    model = None
    for key, value in overrides.items():
        if key == "sd_model_checkpoint" and value:
            model = resolve_checkpoint(str(value))
        elif key == "CLIP_stop_at_last_layers" and value is not None:
            fields["clip_skip"] = int(value)
        elif key in ACCEL_OVERRIDES:  # easel's opt-in lossy accelerations; GenerationRequest.check() rejects bad values
            fields[key] = value
        elif key in options and options[key] == value:
            mapped.ignored.append(f"override_settings.{key}")
        else:
            mapped.unsupported.append(f"override_settings.{key}")
    return model


def _refiner(get: _Body, fields: dict, resolve_checkpoint) -> None:
    name = get("refiner_checkpoint")
    if name and name not in ("None", "none"):
        fields["refiner_checkpoint"] = resolve_checkpoint(name)
        fields["refiner_switch_at"] = get("refiner_switch_at") if get("refiner_switch_at") is not None else 0.8


def _hires_fields(get: _Body, fields: dict, mapped: Mapped) -> None:
    """txt2img's hires fix: A1111's denoising_strength is the second pass's strength."""
    if not get("enable_hr"):
        return
    hr_sampler = hr_scheduler = None
    if get("hr_sampler_name") or get("hr_scheduler"):
        hr_sampler, hr_scheduler = resolve_a1111_sampler(get("hr_sampler_name") or fields["sampler"],
                                                         get("hr_scheduler"), fallback=fields["scheduler"])
    fields.update(enable_hr=True, hr_scale=get("hr_scale"), hr_second_pass_steps=get("hr_second_pass_steps"),
                  hr_denoising_strength=get("denoising_strength"), hr_resize_x=get("hr_resize_x"),
                  hr_resize_y=get("hr_resize_y"), hr_sampler=hr_sampler, hr_scheduler=hr_scheduler,
                  hr_prompt=get("hr_prompt") or None, hr_negative_prompt=get("hr_negative_prompt") or None,
                  hr_upscaler=_upscaler(get("hr_upscaler"), mapped))


def _upscaler(label: str | None, mapped: Mapped) -> str:
    """easel's hr_upscaler for an A1111 label or an easel name (the one resolver's answer); A1111 upscalers easel
    does not have (ESRGAN ...) run as Lanczos and the two it approximates as their closest match, said in `notes`."""
    from easel.pipelines.names import resolve_upscaler
    if label is None:
        return "latent"  # A1111's default latent upscale mode
    from easel.serve.schema import check_upscaler_not_path
    check_upscaler_not_path(label, "hr_upscaler")
    try:
        return resolve_upscaler(label)
    except ValueError:
        pass
    known = {k.lower(): k for k in UPSCALERS}.get(label.strip().lower())
    name = UPSCALERS[known] if known else "lanczos"
    if known is None:
        mapped.notes.append(f"hr_upscaler {label!r} is not available in easel; used Lanczos instead")
    elif known in INEXACT_UPSCALERS:
        mapped.notes.append(f"hr_upscaler {label!r} ran as easel's {name!r}, its closest match")
    return name


def _img2img_fields(get: _Body, fields: dict, mapped: Mapped, decode=decode_image) -> None:
    """init_images / mask (base64) and the inpainting options."""
    images = [decode(im, f"init_images[{i}]") for i, im in enumerate(get("init_images") or [])]
    if not images:
        raise ValueError("init_images: img2img needs at least one image (base64 PNG/JPEG text)")
    if 1 < len(images) <= fields["batch_size"]:
        fields["batch_size"] = len(images)  # A1111: one init image per batch item
    blur_x, blur_y = get("mask_blur_x"), get("mask_blur_y")
    blur = get("mask_blur") if get("mask_blur") is not None else blur_x
    if get("mask_blur") is None and blur_x != blur_y:
        mapped.notes.append(f"mask_blur_x ({blur_x}) and mask_blur_y ({blur_y}) differ; easel blurs both by {blur_x}")
    fields.update(init_images=images, denoising_strength=get("denoising_strength"), resize_mode=get("resize_mode"),
                  mask_blur=int(blur), inpainting_fill=get("inpainting_fill"),
                  inpaint_full_res=bool(get("inpaint_full_res")),
                  inpaint_full_res_padding=get("inpaint_full_res_padding"),
                  inpainting_mask_invert=bool(get("inpainting_mask_invert")),
                  **{f"outpaint_{side}": get(f"outpaint_{side}") for side in ("left", "right", "up", "down")})
    if get("mask"):
        fields["mask"] = decode(get("mask"), "mask")


def _alwayson_scripts(scripts: dict, mapped: Mapped, decode) -> list:
    """The ControlNet units of `alwayson_scripts.controlnet.args` (sd-webui-controlnet's API shape), each naming a
    listed ControlNet and counted before any image is decoded; other always-on scripts are reported unsupported."""
    from easel.pipelines.control_unit import from_a1111
    from easel.serve.control_trust import check_count, listed_name
    units = []
    for key, value in scripts.items():
        if key.strip().lower() != "controlnet":
            if value not in (None, {}, []):
                mapped.unsupported.append(f"alwayson_scripts.{key}")
            continue
        args = value.get("args", []) if isinstance(value, dict) else value
        if not isinstance(args, list):
            raise ValueError("alwayson_scripts.controlnet.args must be a list of units: {\"args\": [unit, ...]} "
                             "(sd-webui-controlnet's API)")
        enabled = [(i, a) for i, a in enumerate(args) if isinstance(a, dict) and a.get("enabled", True) is not False
                   and str(a.get("model", "None")) not in ("None", "none", "")]
        check_count(enabled, "ControlNet units in alwayson_scripts.controlnet.args")
        args = list(args)
        for i, arg in enabled:
            args[i] = {**arg, "model": listed_name(arg["model"], f"alwayson_scripts.controlnet.args[{i}].model")}
        units = from_a1111(args, decode)
    return units


def _report(body: dict, sent: set[str], defaults: dict, mapped: Mapped) -> None:
    """Sort the sent fields that had no effect into unsupported (they would change A1111's result) and ignored."""
    for name in sorted(sent):
        if name not in defaults:
            mapped.unsupported.append(name)  # not an A1111 field we know
        elif name in UNSUPPORTED:
            (mapped.ignored if _neutral(name, body.get(name)) else mapped.unsupported).append(name)
        elif name in IGNORED:
            mapped.ignored.append(name)
    if "sampler_index" in sent and body.get("sampler_name"):
        mapped.ignored.append("sampler_index")  # sampler_name wins, as in A1111


def _neutral(name: str, value) -> bool:
    if name in NEUTRAL and value == NEUTRAL[name]:
        return True
    return value in (None, False, 0, "", "None") or value == [] or value == {}


def resolve_a1111_sampler(name: str | None, scheduler: str | None, fallback: str | None = None) -> tuple[str, str]:
    """(easel sampler, easel schedule) from A1111's sampler label ("DPM++ 2M", "DPM++ 2M Karras", "k_euler_a")
    and scheduler label ("Karras", "Automatic", None), through easel's one name resolver; ValueError lists the
    choices. "Automatic" is A1111's: the label's schedule, else the sampler's preferred one, else the model's."""
    from easel.pipelines.names import resolve_sampler, resolve_scheduler
    sampler, from_name = resolve_sampler(name or "Euler", "sampler_name")
    if scheduler is None or scheduler.strip().lower() in ("", "automatic"):
        return sampler, from_name or fallback or AUTOMATIC_SCHEDULE.get(sampler, "normal")
    return sampler, resolve_scheduler(scheduler)


def resolve_schedule(label: str) -> str:
    """easel's schedule name for an A1111 scheduler name or label (the one resolver's answer)."""
    from easel.pipelines.names import resolve_scheduler
    return resolve_scheduler(label)


def echo(body: dict, img2img: bool) -> dict:
    """The `parameters` of the response: the request with defaults filled (A1111 drops the init images and mask
    unless include_init_images is set)."""
    out = dict(body)
    if img2img and not body.get("include_init_images"):
        out["init_images"], out["mask"] = None, None
    return out
