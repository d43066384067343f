"""Images per second of `easel batch` on the built-in model: one model batch per line vs joined lines, and one vs
N processes (`torchrun --nproc-per-node N`, each process one thread), each configuration a fresh output folder.

    python bench/batch_throughput.py --prompts 32 --procs 1,2 --max-batch 1,4

Wall time includes each process's start and model load (what a user waits for). Every run is checked to have
written one PNG per line.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32, help="lines in the batch file (default 32)")
    p.add_argument("--procs", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--max-batch", default="1,4", help="comma list of --max-batch values (default 1,4)")
    p.add_argument("--steps", type=int, default=20)
    return p.parse_args()


def prompt_file(folder: Path, n: int) -> Path:
    """n ShapeWorld-style prompts, one a line."""
    rng = random.Random(0)
    colours, shapes = ["red", "blue", "green", "yellow"], ["star", "circle", "square", "triangle"]
    lines = [f"a {rng.choice(colours)} {rng.choice(shapes)} above a {rng.choice(colours)} {rng.choice(shapes)}"
             for _ in range(n)]
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(prompts: Path, out: Path, procs: int, max_batch: int, steps: int) -> float:
    """Wall seconds of one `easel batch` run over `procs` processes."""
    cmd = ["-m", "easel.cli", "batch", str(prompts), "--out", str(out), "--max-batch", str(max_batch),
           "--steps", str(steps)]
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    """Run each configuration once and print a table row per configuration."""
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = prompt_file(folder, args.prompts)
        print(f"{args.prompts} prompts, {args.steps} steps, built-in model, 1 thread per process")
        print("| processes | --max-batch | wall s | images/s |\n|---|---|---|---|")
        for procs in (int(v) for v in args.procs.split(",")):
            for max_batch in (int(v) for v in args.max_batch.split(",")):
                out = folder / f"out-{procs}-{max_batch}"
                wall = run(prompts, out, procs, max_batch, args.steps)
                assert len(list(out.glob("*.png"))) == args.prompts, "an image is missing"
                print(f"| {procs} | {max_batch} | {wall:.1f} | {args.prompts / wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
