"""Time to the first image from a fresh process with `--compile`: cold (empty compile cache) vs warm (the cache the
cold run left), next to plain eager. Each run is its own process: `easel generate` on the built-in model (or
--model), two images in a row so the per-image time after compiling shows too.

    python bench/compile_start.py --steps 8

Prints, per configuration, the process's wall time and the seconds to each image (from the images' file times).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model (default: the built-in model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def run(args, out: Path, cache: Path, compile_: bool) -> tuple[float, list[float]]:
    """(wall seconds of one `easel generate -n 1 --n-iter 2` process, seconds from start to each image)."""
    cmd = [sys.executable, "-m", "easel.cli", "generate", "a red star above a blue circle", "--steps",
           str(args.steps), "--n-iter", "2", "-n", "1", "--seed", "1", "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if compile_:
        cmd.append("--compile")
    env = {**os.environ, "EASEL_COMPILE_CACHE": str(cache), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    return wall, sorted(p.stat().st_mtime - t0 for p in out.glob("*.png"))


def main() -> None:
    """Eager, compile cold, compile warm: one process each."""
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        print(f"model: {args.model or 'built-in'}, {args.steps} steps, {args.threads} thread(s)")
        print("| run | process wall s | first image at s | second image at s |\n|---|---|---|---|")
        for name, compile_ in (("eager", False), ("--compile, cold cache", True), ("--compile, warm cache", True)):
            wall, marks = run(args, Path(tmp) / name.replace(" ", "_").replace(",", ""), cache, compile_)
            print(f"| {name} | {wall:.1f} | {marks[0]:.1f} | {marks[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
