"""Benchmark one classifier-free-guidance step of the full-size SD1.5 UNet: easel against diffusers, on CPU.

Both models carry the same random weights (diffusers' init, copied into easel through the key map).
bf16 means weights AND inputs in bfloat16 on both sides (no autocast). Rounds alternate easel/diffusers so
that background load hits both alike; the median is reported. The step's FLOPs are counted once with
`FlopCounterMode` and set against the CPU's peak (best big matmul or 3x3 conv) measured in the same run.

    python bench/unet_step.py --dtype fp32,bf16 --rounds 3 --size 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from easel.models.configs import SD15
from easel.models.unet import UNetModel
from easel.weights.keys_unet import diffusers_config, from_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side and dtype (after 1 warmup)")
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    return p.parse_args()


def _best_rate(fn, flops: float, reps: int) -> float:
    fn()  # warm up the BLAS / oneDNN kernels
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def compute_peak(dtype: torch.dtype, reps: int = 8) -> dict[str, float]:
    """Best FLOP/s of a big matmul (MKL) and a big 3x3 conv (oneDNN) in `dtype`: the CPU's practical limit.

    Both are measured because on some CPUs (e.g. AMD with MKL) the conv kernels run faster than the matmul.
    """
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x, w = torch.randn(2, 640, 32, 32, dtype=dtype), torch.randn(640, 640, 3, 3, dtype=dtype)
    with torch.inference_mode():
        mm = _best_rate(lambda: a @ b, 2 * n**3, reps)
        conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 640 * 640 * 9 * 32 * 32, reps)
    return {"matmul": mm, "conv": conv, "peak": max(mm, conv)}


def step_flops(model: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of one forward, counting convs, matmuls and (CPU) fused attention."""
    sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=sdpa) as counter, torch.inference_mode():
        model(*inputs)
    return counter.get_total_flops()


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Full-size SD1.5 UNets: diffusers with its own random init, easel loaded with the same weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # silence the "cast with to()" advice: we cast both sides alike on purpose

    cfg = SD15.unet
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(diffusers_config(cfg)).eval()
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True)
    return ours, theirs


def timed(fn) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_dtype(ours, theirs, dtype: torch.dtype, rounds: int, size: int) -> dict:
    """Warm up both, then alternate timed rounds; returns medians, output agreement and FLOPs."""
    ours.to(dtype), theirs.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g).to(dtype)  # CFG: uncond + cond in one batch
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    run_ours = lambda: ours(x, t, ctx)  # noqa: E731
    run_theirs = lambda: theirs(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
    with torch.inference_mode():
        err = (run_ours().float() - run_theirs().float()).abs().max().item()  # warmup + agreement
        times = {"easel": [], "diffusers": []}
        for _ in range(rounds):
            times["easel"].append(timed(run_ours))
            times["diffusers"].append(timed(run_theirs))
    return {"easel": statistics.median(times["easel"]), "diffusers": statistics.median(times["diffusers"]),
            "all": times, "max_abs_diff": err, "flops": step_flops(ours, (x, t, ctx))}


def main() -> None:
    """Run the benchmark and print one line per dtype."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"latent {args.size}x{args.size}, batch 2 (CFG)")
    ours, theirs = build()
    for name in args.dtype.split(","):
        dtype = DTYPES[name]
        peak = compute_peak(dtype)
        r = bench_dtype(ours, theirs, dtype, args.rounds, args.size)
        e, d, p = r["easel"], r["diffusers"], peak["peak"]
        print(f"{name}: easel {e:.2f}s  diffusers {d:.2f}s  ratio easel/diffusers {e / d:.3f}  "
              f"(max |easel - diffusers| {r['max_abs_diff']:.1e})")
        print(f"   step {r['flops'] / 1e12:.3f} TFLOP; CPU peak {p / 1e9:.0f} GFLOP/s (matmul "
              f"{peak['matmul'] / 1e9:.0f}, conv3x3 {peak['conv'] / 1e9:.0f}); easel {r['flops'] / e / 1e9:.0f} "
              f"GFLOP/s = {r['flops'] / e / p:.0%} of peak, diffusers {r['flops'] / d / p:.0%}")
        print(f"   rounds: easel {[round(s, 2) for s in r['all']['easel']]}  "
              f"diffusers {[round(s, 2) for s in r['all']['diffusers']]}", flush=True)


if __name__ == "__main__":
    main()
