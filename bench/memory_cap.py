"""Large images under a memory cap: each case runs txt2img in a child process whose address space is capped
(RLIMIT_AS), and prints its peak RSS next to easel's estimate (`easel.pipelines.memory`) and the cap.

    python bench/memory_cap.py                       # built-in model, 1024 and 2048, 1 step, batch 1
    python bench/memory_cap.py --models builtin,sd15 --sizes 1024 --steps 1

`sd15` is the full-size SD1.5 architecture (1.07 B parameters) with random weights and the built-in tokenizer:
the memory of a run depends on the shapes, not on the weights' values. Before the fix, the built-in model's
1024x1024 decode alone asked for a 16 GiB attention matrix.

Measured (torch 2.13 CPU, 1 step, batch 1, one niced core of a busy 2-core VM, so the seconds are slow):

    model         size  cap GiB estimate peak RSS  seconds
    builtin  1024x1024     2.47     1.47     0.94     42.8
    builtin  2048x2048     3.43     2.43     1.25    503.3
    sd15     1024x1024     7.48     6.48     5.34    592.4

SD1.5 at 2048x2048 was not run: on this machine one step and the tiled decode would take well over an hour.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ADDRESS_SLACK = 1 << 30  # mapped but never resident: shared libraries, thread stacks, malloc arenas


def load(model: str):
    """A Pipeline: the built-in model, or SD1.5's architecture with random weights."""
    import easel
    pipe = easel.load()
    if model == "builtin":
        return pipe
    import torch

    from easel.models.configs import PRESETS
    from easel.models.sd import StableDiffusion
    from easel.pipelines.pipeline import Pipeline
    from easel.weights.model_io import LoadedModel
    torch.manual_seed(0)
    sd = StableDiffusion(PRESETS[model]).eval().requires_grad_(False)
    tokenizers = pipe.loaded.tokenizers  # ids below 628: valid in CLIP's vocabulary too
    return Pipeline(LoadedModel(sd, tokenizers, "", ""))


def child(model: str, size: int, steps: int, batch: int) -> dict:
    """Run one case in this process; returns the measurements."""
    from easel.pipelines.memory import estimate_peak_bytes, peak_rss_bytes
    from easel.pipelines.request import GenerationRequest
    pipe = load(model)
    cfg = pipe.loaded.model.config
    req = GenerationRequest("a red star above a blue circle", seed=1, steps=steps, width=size, height=size,
                            batch_size=batch, sampler="euler")
    loaded_rss = peak_rss_bytes()
    start = time.perf_counter()
    images = pipe.generate(req)
    return {"seconds": time.perf_counter() - start, "images": len(images), "size": list(images[0].image.size),
            "loaded_rss": loaded_rss, "peak_rss": peak_rss_bytes(),
            "estimate": estimate_peak_bytes(cfg, req.resolved(cfg.default_size, cfg.default_batch))}


def estimate(model: str, size: int, batch: int) -> int:
    """The estimate for a case, without loading weights."""
    import easel
    from easel.models.configs import PRESETS
    from easel.pipelines.memory import estimate_peak_bytes
    from easel.pipelines.request import GenerationRequest
    cfg = easel.load().loaded.model.config if model == "builtin" else PRESETS[model]
    req = GenerationRequest(width=size, height=size, batch_size=batch, seed=1, subseed=1)
    return estimate_peak_bytes(cfg, req)


def run_case(model: str, size: int, steps: int, batch: int, cap: int) -> dict:
    """Run a case in a child capped at `cap` bytes of address space."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cmd = [sys.executable, __file__, "--child", model, str(size), str(steps), str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="builtin", help="comma-separated: builtin, sd15 (random weights)")
    p.add_argument("--sizes", default="1024,2048", help="comma-separated square sizes in pixels")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=0.0,
                   help="address-space cap per case; 0: the estimate plus %d GiB of address-only slack"
                        % (ADDRESS_SLACK >> 30))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        model, size, steps, batch = a.child[0], *map(int, a.child[1:])
        print(json.dumps(child(model, size, steps, batch)))
        return
    print(f"{'model':8} {'size':>9} {'cap GiB':>8} {'estimate':>8} {'peak RSS':>8} {'seconds':>8}  result")
    for model in a.models.split(","):
        for size in map(int, a.sizes.split(",")):
            est = estimate(model, size, a.batch)
            cap = int(a.cap_gib * 2**30) if a.cap_gib else est + ADDRESS_SLACK
            r = run_case(model, size, a.steps, a.batch, cap)
            if "error" in r:
                print(f"{model:8} {size:>4}x{size:<4} {gib(cap):>8} {gib(est):>8} {'-':>8} {'-':>8}  {r['error']}",
                      flush=True)
                continue
            ok = "ok" if r["peak_rss"] <= r["estimate"] else "OVER ESTIMATE"
            print(f"{model:8} {size:>4}x{size:<4} {gib(cap):>8} {gib(r['estimate']):>8} {gib(r['peak_rss']):>8} "
                  f"{r['seconds']:8.1f}  {ok}, {r['images']} image(s) {r['size'][0]}x{r['size'][1]}", flush=True)


if __name__ == "__main__":
    main()
