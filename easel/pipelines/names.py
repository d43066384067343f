"""One resolver for every name a request carries: samplers, schedules and hires upscalers.

easel names, A1111 labels ("DPM++ 2M Karras", "Latent (bicubic)") and ComfyUI names (`uni_pc_bh2`) are accepted,
case-insensitively, everywhere: `GenerationRequest.resolved()` applies these, so the CLI, the three HTTP APIs,
the web UI and infotext read back from a PNG all get the same answer.
"""
from __future__ import annotations

from easel.samplers.names import resolve_sampler, resolve_scheduler

__all__ = ["resolve_sampler", "resolve_scheduler", "resolve_upscaler", "sampler_and_schedule", "upscaler_label",
           "UPSCALER_LABELS", "DEFAULT_SCHEDULER"]

DEFAULT_SCHEDULER = "karras"  # when neither the scheduler field nor the sampler's label names one

# Our hires upscaler name -> A1111's label (the "Hires upscaler" of infotext).
UPSCALER_LABELS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "latent-bicubic": "Latent (bicubic)",
                   "latent-antialiased": "Latent (antialiased)", "lanczos": "Lanczos", "nearest": "Nearest"}


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").replace("(", " ").replace(")", " ").split())


def resolve_upscaler(name: str) -> str:
    """The hires upscaler for our names and A1111 labels ("Latent (bicubic)" -> latent-bicubic), or an upscaler
    model file's name (A1111's label "R-ESRGAN 4x+", a file stem "4x-UltraSharp", or a path: see easel.upscale)."""
    table = {_norm(k): k for k in UPSCALER_LABELS} | {_norm(v): k for k, v in UPSCALER_LABELS.items()}
    key = _norm(name)
    if key in table:
        return table[key]
    from easel.upscale.find import UpscalerNotFound, find_upscaler
    try:
        found = find_upscaler(name)
    except UpscalerNotFound as e:
        raise ValueError(f"unknown hr_upscaler {name!r}; choose one of {', '.join(UPSCALER_LABELS)} "
                         f"(or an A1111 label: {', '.join(UPSCALER_LABELS.values())}), or an upscaler model: "
                         f"{e}") from None
    return str(name) if _is_path(name) else found.name  # a path stays a path: it may be outside the folders


def _is_path(name: str) -> bool:
    """Whether an upscaler spec is a file path rather than a name."""
    return "/" in str(name) or "\\" in str(name)


def upscaler_label(name: str) -> str:
    """A1111's label of a resolved upscaler name ('Hires upscaler' in infotext): a model file's name or stem."""
    from pathlib import Path
    return UPSCALER_LABELS.get(name) or (Path(name).stem if _is_path(name) else name)


def sampler_and_schedule(sampler: str, scheduler: str | None, field: str = "sampler",
                         scheduler_field: str = "scheduler") -> tuple[str, str | None]:
    """(sampler, schedule) of a sampler name or label and an optional scheduler: a schedule named by the label
    ("DPM++ 2M Karras") is used when no scheduler is given; both given and different is an error, never a
    silent override. The schedule is None when neither names one. "Automatic" (A1111's) is the label's schedule,
    else the sampler's preferred one, else the model's own ("normal")."""
    from easel.samplers.names import AUTOMATIC_SCHEDULE, is_automatic
    name, from_label = resolve_sampler(sampler, field)
    if is_automatic(scheduler):
        return name, from_label or AUTOMATIC_SCHEDULE.get(name, "normal")
    chosen = None if scheduler is None else resolve_scheduler(scheduler, scheduler_field)
    if from_label and chosen and from_label != chosen:
        raise ValueError(f"{field} {sampler!r} names the {from_label} schedule but {scheduler_field} is {scheduler!r}: "
                         f"give the plain sampler name ({name!r}) with {scheduler_field}, "
                         f"or leave {scheduler_field} unset")
    return name, chosen or from_label
