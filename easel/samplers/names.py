"""One resolver for sampler and schedule names: easel's, A1111's labels and API aliases, ComfyUI's.

Every way in (CLI flags, HTTP bodies, the web UI, infotext read back from a PNG) goes through these two
functions, so a name accepted in one place is accepted, and means the same, everywhere.
"""
from __future__ import annotations

from .sampling import SAMPLER_LABELS, SAMPLERS
from .schedules import SCHEDULE_LABELS, SCHEDULES

# Other spellings people type: ComfyUI names and A1111 API aliases (after dropping a "k_" prefix).
# A1111's "UniPC" and ComfyUI's `uni_pc` are the bh1 variant; ComfyUI's `uni_pc_bh2` is bh2.
_SAMPLER_ALIASES = {
    "euler ancestral": "euler_a", "dpm 2 ancestral": "dpm_2_a", "dpm2 ancestral": "dpm_2_a",
    "dpmpp 2s ancestral": "dpmpp_2s_a", "unipc": "uni_pc", "unipc bh2": "uni_pc_bh2", "uni pc bh1": "uni_pc",
    "unipc bh1": "uni_pc",
}
# A1111's "Uniform" is the model's own get_sigmas(n), our `normal` (its "Simple" is a different schedule).
# "Automatic" without a sampler to ask is the model's own too; with one, see AUTOMATIC_SCHEDULE.
_SCHEDULE_ALIASES = {"ka": "karras", "ddim": "ddim_uniform", "automatic": "normal", "default": "normal",
                     "uniform": "normal"}
# A1111 1.9+'s "Automatic" schedule: the sampler's own preference (its sampler table's `scheduler` option);
# samplers with none use the model's own sigmas ("normal").
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_a": "karras",
                      "dpmpp_2m_sde": "exponential"}


def is_automatic(name: str | None) -> bool:
    """Whether a scheduler name asks for the sampler's preferred schedule (A1111's "Automatic")."""
    return name is not None and _norm(name) == "automatic"


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _samplers() -> dict[str, str]:
    table = {_norm(k): k for k in SAMPLERS}
    table.update({_norm(v): k for k, v in SAMPLER_LABELS.items()})
    table.update(_SAMPLER_ALIASES)
    return table


def _schedules() -> dict[str, str]:
    table = {_norm(k): k for k in SCHEDULES}
    table.update({_norm(v): k for k, v in SCHEDULE_LABELS.items()})
    table.update(_SCHEDULE_ALIASES)
    return table


def resolve_sampler(name: str, field: str = "sampler") -> tuple[str, str | None]:
    """(sampler, schedule or None) for our names, A1111 labels, and combined labels like "DPM++ 2M Karras"."""
    samplers, schedules = _samplers(), _schedules()
    key = _norm(name)
    key = key[2:] if key.startswith("k ") else key  # A1111 API aliases: k_euler_a, k_dpmpp_2m_ka
    if key in samplers:
        return samplers[key], None
    for suffix in sorted(schedules, key=len, reverse=True):  # longest first: "sgm uniform" before "uniform"
        head = key[: -len(suffix) - 1]
        if key.endswith(" " + suffix) and head in samplers:
            return samplers[head], schedules[suffix]
    raise ValueError(
        f"unknown {field} {name!r}: use one of {', '.join(SAMPLERS)} or an A1111 label such as "
        f"{', '.join(repr(v) for v in SAMPLER_LABELS.values())}, optionally followed by a schedule "
        f"({', '.join(SCHEDULE_LABELS.values())})"
    )


def resolve_scheduler(name: str, field: str = "scheduler") -> str:
    """The SCHEDULES key for our names, A1111 "Schedule type" labels and ComfyUI names ("Karras" -> karras)."""
    key = _norm(name)
    schedules = _schedules()
    if key in schedules:
        return schedules[key]
    raise ValueError(f"unknown {field} {name!r}: use one of {', '.join(SCHEDULES)} "
                     f"(or an A1111 label: {', '.join(SCHEDULE_LABELS.values())})")
