"""Resident memory of loading a model, against the size of its weight files: is there a second copy of the weights?

    python bench/load_memory.py ~/.cache/easel/bench/sd15-random.safetensors
    python bench/load_memory.py ~/.cache/easel/bench/sd15-random --dtype bf16

Run in a fresh process (it is one): prints the weight files' size, this process's RSS before loading (torch and
easel imported), after `easel.load`, the peak RSS during the load (ru_maxrss), and the peak minus the baseline over
the file size. safetensors files are memory-mapped and each tensor is handed to the model as it is read (no second
copy, pages read from disk only when first used), so at fp32 the growth after every weight has been read once should
be about 1x the file size; a loader that kept the whole state dict beside the model would show about 2x.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import rss_gib  # noqa: E402  (bench/ on sys.path)


def weight_bytes(path: Path) -> int:
    """Size of the weight files of a single file or a diffusers folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    """Load once and print the memory figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a .safetensors checkpoint or a diffusers folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    import torch  # counted in the baseline

    import easel
    path = Path(args.path).expanduser()
    size = weight_bytes(path)
    base_now, base_peak = rss_gib()
    t0 = time.perf_counter()
    pipe = easel.load(str(path), dtype=args.dtype)
    took = time.perf_counter() - t0
    gc.collect()
    now, peak = rss_gib()
    params = sum(t.numel() * t.element_size() for t in pipe.loaded.model.state_dict().values()) / 2**30
    print(f"{path.name}: weight files {size / 2**30:.2f} GiB; model in memory ({args.dtype}) {params:.2f} GiB; "
          f"loaded in {took:.0f} s")
    print(f"RSS: before {base_now:.2f} GiB, after load {now:.2f} GiB (+{now - base_now:.2f}), peak during load "
          f"{peak:.2f} GiB (+{peak - base_peak:.2f} = {(peak - base_peak) / (size / 2**30):.2f}x the files)")
    with torch.no_grad():  # read every page of every weight once, as a first generation would
        for t in pipe.loaded.model.state_dict().values():
            t.reshape(-1)[::1024].float().sum()
    touched, peak = rss_gib()
    print(f"RSS after reading every weight once: {touched:.2f} GiB (+{touched - base_now:.2f} = "
          f"{(touched - base_now) / (size / 2**30):.2f}x the files; file-backed pages of the mapping count here), "
          f"peak {peak:.2f} GiB")
    print(f"pid {os.getpid()}, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
