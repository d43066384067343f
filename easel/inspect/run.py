"""One inspected generation, shared by the `easel inspect` commands and the report: the request of the flags as
one image, the model, the run with a Capture on, and the files every command writes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def one_image_request(args: argparse.Namespace):
    """The request of the flags, as one image (the first of `easel generate ... -n 1`), checked."""
    req = args.cli.request_from_args(args)
    if (req.batch_size or 1) > 1 or req.n_iter > 1:
        print("easel inspect looks inside one image: using -n 1 --n-iter 1", file=sys.stderr)
    req.batch_size, req.n_iter = 1, 1
    req.check()
    return req


def load_pipeline(args: argparse.Namespace, req):
    """The model the flags name (the built-in one by default), after checking the LoRAs the request names."""
    import easel
    from easel.pipelines.networks import requested_networks
    requested_networks(req)
    return easel.load(args.model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                      prediction=args.prediction)


def captured_run(args: argparse.Namespace, self_point: tuple[float, float] | None = None, **what):
    """Generate one image with a Capture on and a progress bar: (pipeline, request, image result, capture).
    `self_point` (x, y): a pixel of the output image whose self-attention is captured too."""
    from easel.inspect.capture import Capture
    from easel.pipelines.sizes import final_size
    req = one_image_request(args)
    pipe = load_pipeline(args, req)
    if self_point is not None:  # the output's size is known once the model (its default size) is
        what["self_query"] = query_fractions(self_point, final_size(req, pipe.config.default_size))
    with Capture(**what) as cap, args.cli.progress_bar(req) as cb:
        results = pipe.generate(req, callback=cb, extend_plan=cap)
    if not results or not cap.runs:
        raise ValueError("the generation produced no image to inspect (interrupted, or img2img strength 0)")
    return pipe, req, results[0], cap


def save_result(out: Path, result) -> Path:
    """image.png with the parameters that reproduce it."""
    from easel.pipelines.metadata import save_png
    out.mkdir(parents=True, exist_ok=True)
    return save_png(result.image, out / "image.png", result.params)


def query_fractions(point: tuple[float, float], size: tuple[int, int]) -> tuple[float, float]:
    """A pixel (x, y) of an image of `size` (w, h) -> (y, x) as fractions of its height and width."""
    (x, y), (w, h) = point, size
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"--self-query {x:g},{y:g} lies outside the {w}x{h} image")
    return y / h, x / w


def texts_by_weight(cap) -> list[str]:
    """The prompt texts attention was captured for, the most steps first."""
    steps: dict[str, int] = {}
    for run in cap.runs:
        for text, attn in run.attention.items():
            steps[text] = steps.get(text, 0) + len(attn.steps)
    return sorted(steps, key=lambda t: -steps[t])


def first_text(prompt: str, steps: int) -> str:
    """The text the encoder parses at the first step (LoRA tags removed, first AND part, schedules resolved;
    emphasis syntax kept, as the encoder reads it)."""
    from easel.text.prompt import extract_extra_networks, prompt_schedule, split_and
    parts = split_and(extract_extra_networks(prompt)[0])
    return prompt_schedule(parts[0][0], steps)[0][1] if parts else ""
