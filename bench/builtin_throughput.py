"""Images per second of the built-in model's default command (`easel generate "three red stars"`) at batch 4 and 16,
in one process, per dtype, with easel's fast paths and (`--exact`) without.

    python bench/builtin_throughput.py --batch 4,16 --dtype fp32,bf16 --rounds 2 --threads 1 --exact
    python bench/builtin_throughput.py --batch 4 --dtype fp32 --model old.safetensors --model shapeworld  # two models

Each configuration: one warm-up call, then `--rounds` timed calls of `pipe.txt2img(PROMPT, batch_size=N)` with the
model's defaults (size, steps, sampler), alternating configurations. Prints medians of wall and process CPU time and
images per CPU second (the steadier figure on a shared machine), and the peak RSS. Model load is not counted
(`bench/compile_start.py` times whole processes).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cpu_line, rss_gib, timed  # noqa: E402  (bench/ on sys.path)

PROMPT = "three red stars"


def main() -> None:
    """Time each (dtype, batch, path) configuration and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="4,16", help="comma list of batch sizes")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16, auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exact", action="store_true", help="also time easel's exact (NCHW) path")
    p.add_argument("--model", action="append", default=[],
                   help="a model to time instead of the built-in one (repeat to compare models in one run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import easel
    from easel.models.layers import exact_paths
    models = args.model or [None]
    pipes = {(m, d): easel.load(m, dtype=d) for m in models for d in args.dtype.split(",")}
    for (m, _), pipe in pipes.items():
        cfg = pipe.loaded.model.config
        print(f"model {m or 'built-in'}: {cfg.name}, {cfg.default_size} px", flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s); CPU: {cpu_line()}", flush=True)
    paths = ["fast", "exact"] if args.exact else ["fast"]
    configs = [(key, int(b), path) for key in pipes for b in args.batch.split(",") for path in paths]

    def call(key: tuple, n: int, path: str):
        def run():
            if path == "exact":
                with exact_paths():
                    return pipes[key].txt2img(PROMPT, batch_size=n, seed=1)
            return pipes[key].txt2img(PROMPT, batch_size=n, seed=1)
        return run

    times = {c: [] for c in configs}
    for c in configs:
        call(*c)()  # warm-up
    for _ in range(args.rounds):
        for c in configs:
            times[c].append(timed(call(*c)))
    print("| model | dtype | batch | path | median wall s | median CPU s | images/s (wall) | images per CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for ((m, d), n, path), ts in times.items():
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        print(f"| {m or 'built-in'} | {d} | {n} | {path} | {wall:.2f} | {cpu:.2f} | {n / wall:.2f} | {n / cpu:.2f} |")
    print(f"peak RSS {rss_gib()[1]:.2f} GiB")


if __name__ == "__main__":
    main()
