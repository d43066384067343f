"""What capture costs: a generation on an SD-size UNet with random weights, capture off and on.

    python3 -m easel.inspect.overhead --preset SD15 --size 512 --steps 20

Times are CPU seconds of this process (torch.set_num_threads(1) unless --threads), so that other work on a
shared machine does not blur them; the time spent inside the capture's own hooks is measured directly. Memory:
the bytes the capture keeps (attention sums and step tensors), and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from easel.inspect import capture as C

_INSIDE = [0.0]  # CPU seconds spent inside the capture's hooks
_DEPTH = [0]  # a timed function called by another is counted once


def _timed(f):
    """f, with its CPU time added to _INSIDE (outermost calls only)."""
    def timed(*args, **kwargs):
        _DEPTH[0] += 1
        start = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                _INSIDE[0] += time.process_time() - start
    return timed


def random_pipeline(preset: str):
    """A Pipeline of the named preset (SD15, SD21, SDXL, ...) with random weights and the built-in tokenizer (its
    ids are valid in any CLIP vocabulary size)."""
    import easel
    from easel.models import configs
    from easel.models.sd import StableDiffusion
    from easel.pipelines.pipeline import Pipeline
    from easel.weights.model_io import LoadedModel
    cfg = getattr(configs, preset, None)
    if cfg is None:
        raise ValueError(f"unknown preset {preset!r}: use one of SD15, SD21, SDXL")
    tokenizers = easel.load().loaded.tokenizers
    torch.manual_seed(0)
    model = StableDiffusion(cfg).eval()
    return Pipeline(LoadedModel(model, tokenizers * len(cfg.text_encoders), "", ""))


def measure(pipe, size: int, steps: int, repeats: int = 2) -> dict:
    """CPU seconds of plain and captured generations (the best of `repeats`), inside the hooks, bytes kept."""
    from easel.pipelines.request import GenerationRequest

    def request():
        return GenerationRequest("a red star above a blue circle", steps=steps, seed=1, batch_size=1, width=size,
                                 height=size, sampler="euler", cfg_scale=7.0)
    off, on, inside, cap = [], [], [], None
    for _ in range(repeats):
        start = time.process_time()
        pipe.generate(request())
        off.append(time.process_time() - start)
        _INSIDE[0] = 0.0
        start = time.process_time()
        with C.Capture() as cap:
            pipe.generate(request(), extend_plan=cap)
        on.append(time.process_time() - start)
        inside.append(_INSIDE[0])
    return {"off": min(off), "on": min(on), "inside": min(inside), **kept_bytes(cap)}


def kept_bytes(cap) -> dict:
    """Bytes a capture holds: attention sums and per-step maps, and the step tensors."""
    attention = sum(t.numel() * t.element_size() for r in cap.runs for a in r.attention.values()
                    for t in [*a.sums.values(), *a.by_step.values()])
    steps = sum(t.numel() * t.element_size() for r in cap.runs for s in r.steps
                for t in (s.x, s.x0, s.uncond, s.cond, s.guided) if t is not None)
    return {"attention_bytes": attention, "step_bytes": steps}


def main(argv: list[str] | None = None) -> int:
    """Print the cost of capture for one preset, size and step count."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="SD15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    C.Capture._on_attention = _timed(C.Capture._on_attention)
    C.Capture._observe = _timed(C.Capture._observe)
    C._keep = _timed(C._keep)  # the CFG parts' copies, made in the guided denoiser's hooks
    pipe = random_pipeline(args.preset)
    r = measure(pipe, args.size, args.steps, args.repeats)
    print(f"{args.preset} random weights, {args.size}x{args.size}, {args.steps} euler steps, CFG 7, batch 1, "
          f"{args.threads} thread(s), CPU seconds (best of {args.repeats}):")
    print(f"  capture off {r['off']:.1f} s, on {r['on']:.1f} s ({100 * (r['on'] / r['off'] - 1):+.1f}%); inside the "
          f"capture's hooks {r['inside']:.2f} s = {100 * r['inside'] / r['off']:.1f}% of a plain run")
    print(f"  kept: attention {r['attention_bytes'] / 2**20:.2f} MiB, step tensors {r['step_bytes'] / 2**20:.2f} MiB;"
          f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
