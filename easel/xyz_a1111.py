"""A1111's API form of the X/Y/Z plot: `"script_name": "x/y/z plot"` with positional `script_args`, read into easel's
axes (see easel.xyz).

script_args as A1111's script takes them: [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown,
z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, ...]. A type
is an index into the axis menu of the txt2img or img2img tab (the menus differ: some axes are one tab's only), or the
menu label itself. Values come from the dropdown list when it is not empty, else from the text.
"""
from __future__ import annotations

from easel.xyz import Axis, make_axis, split_values

SCRIPT_NAME = "x/y/z plot"
# A1111's axis menu (scripts/xyz_grid.py, v1.7-1.9), in order: (label, easel axis or None: not supported, tab or "").
MENU = [
    ("Nothing", "", ""), ("Seed", "seed", ""), ("Var. seed", "subseed", ""), ("Var. strength", "subseed_strength", ""),
    ("Steps", "steps", ""), ("Hires steps", "hr_second_pass_steps", "txt2img"), ("CFG Scale", "cfg_scale", ""),
    ("Image CFG Scale", None, "img2img"), ("Prompt S/R", "prompt_sr", ""), ("Prompt order", None, ""),
    ("Sampler", "sampler", "txt2img"), ("Hires sampler", "hr_sampler", "txt2img"), ("Sampler", "sampler", "img2img"),
    ("Checkpoint name", "model", ""), ("Negative Guidance minimum sigma", None, ""), ("Sigma Churn", None, ""),
    ("Sigma min", None, ""), ("Sigma max", None, ""), ("Sigma noise", None, ""), ("Schedule type", "scheduler", ""),
    ("Schedule min sigma", None, ""), ("Schedule max sigma", None, ""), ("Schedule rho", None, ""),
    ("Eta", "eta", ""), ("Clip skip", "clip_skip", ""), ("Denoising", "denoising_strength", ""),
    ("Initial noise multiplier", None, ""), ("Extra noise", None, ""), ("Hires upscaler", "hr_upscaler", "txt2img"),
    ("Cond. Image Mask Weight", None, "img2img"), ("VAE", None, ""), ("Styles", "styles", ""),
    ("UniPC Order", None, ""), ("Face restore", None, ""), ("Token merging ratio", None, ""),
    ("Token merging ratio high-res", None, ""), ("Always discard next-to-last sigma", None, ""),
    ("SGM noise multiplier", None, ""), ("Refiner checkpoint", "refiner_checkpoint", ""),
    ("Refiner switch at", "refiner_switch_at", ""), ("RNG source", None, ""),
]


def menu(img2img: bool = False) -> list[tuple[str, str | None]]:
    """The (label, easel axis) entries of one tab's menu, in A1111's order (what a type index counts)."""
    tab = "img2img" if img2img else "txt2img"
    return [(label, axis) for label, axis, only in MENU if only in ("", tab)]


def axes_from_script_args(script_args: list, img2img: bool = False) -> list[Axis]:
    """easel axes from A1111's X/Y/Z script_args; ValueError names the axis and what is wrong."""
    if not isinstance(script_args, (list, tuple)) or len(script_args) < 3:
        raise ValueError("script_args for the X/Y/Z plot must be a list starting [x_type, x_values, "
                         "x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown]")
    axes = []
    for i, name in enumerate(("x", "y", "z")):
        kind, text, dropdown = (list(script_args[3 * i:3 * i + 3]) + [None, "", None])[:3]
        if kind is None and i > 0:
            continue
        field = _field(name, kind, img2img)
        if not field:
            continue  # "Nothing"
        values = list(dropdown) if isinstance(dropdown, (list, tuple)) and dropdown else text
        if not isinstance(values, (str, list)):
            raise ValueError(f"script_args: {name.upper()} values must be text such as '10,20' (got "
                             f"{type(values).__name__})")
        axes.append(make_axis(name, field, values if isinstance(values, list) else split_values(values)))
    if not axes:
        raise ValueError("script_args: every axis is 'Nothing'; set at least the X type and values")
    return axes


def _field(name: str, kind, img2img: bool) -> str:
    """The easel axis of an A1111 type (menu index or label)."""
    entries = menu(img2img)
    if isinstance(kind, bool) or not isinstance(kind, (int, str)):
        raise ValueError(f"script_args: {name.upper()} type must be a menu index or label (got {kind!r})")
    if isinstance(kind, int):
        if not 0 <= kind < len(entries):
            raise ValueError(f"script_args: {name.upper()} type {kind} is not in the {len(entries)}-entry axis menu")
        label, field = entries[kind]
    else:
        found = [e for e in entries if e[0].lower() == kind.strip().lower()]
        if not found:
            raise ValueError(f"script_args: unknown {name.upper()} type {kind!r}; the types are: "
                             f"{', '.join(label for label, f in entries if f is not None)}")
        label, field = found[0]
    if field is None:
        supported = ", ".join(lbl for lbl, f in entries if f)
        raise ValueError(f"script_args: the X/Y/Z axis {label!r} is not supported by easel; use one of {supported}")
    return field


def _split(text: str) -> list[str]:
    from easel.xyz import _split_values
    return _split_values(text)
