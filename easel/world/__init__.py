"""ShapeWorld: the captioned world easel renders to train its own Stable Diffusion, and the
analytic judge (scene parser + GenEval-style benchmark) that scores generated images.

Names are imported lazily (so `python -m easel.world.judge` runs cleanly and the judge does not
pull in torch). `easel.world.judge` is the parser module (`parse`, `--fit`); the judging function
is `easel.world.benchmark.judge(image, prompt)`, not re-exported so it cannot shadow the module.
"""
from __future__ import annotations

import importlib

_EXPORTS: dict[str, tuple[str, ...]] = {
    "scenes": ("COLOURS", "HELD_OUT_PAIRS", "HELD_OUT_RELATIONS", "RELATIONS", "SHAPES", "SIZES", "Obj", "Scene",
               "is_held_out", "relation", "sample_scene"),
    "render": ("render", "render_array"),
    "captions": ("Mention", "ParsedCaption", "caption", "caption_corpus", "describe", "parse_caption", "vocabulary"),
    "dataset": ("EVAL_SEED_BASE", "TRAIN_SEEDS", "ShapeWorldDataset", "ShapeWorldStream", "eval_scenes",
                "eval_seeds", "render_batch", "sample_grid", "to_tensor"),
    "judge": ("Detected", "parse"),
    "benchmark": ("CATEGORIES", "CORE_CATEGORIES", "Prompt", "Verdict", "evaluate", "ground_truth_image",
                  "ground_truth_results", "make_prompts", "report_markdown", "score", "shuffled"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import a public name from its submodule on first use."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
