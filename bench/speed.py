"""Side by side in one process: easel vs diffusers eager (vs OpenVINO, vs easel + torch.compile) on the same random
SD1.5 weights, with the CPU's matmul/conv peak measured in the same run and each side's fraction of it.

    python bench/speed.py --part unet --dtype bf16 --size 64 --rounds 3 --threads 1 --openvino
    python bench/speed.py --part vae --dtype bf16 --size 64 --rounds 3 --threads 1

Parts: `unet` (one classifier-free-guidance step: batch 2, 4 x size x size latent, 77 x 768 context) and `vae`
(decoding one 4 x size x size latent to 8*size pixels). The diffusers modules get diffusers' random init and easel's
are loaded with the same weights through easel's key maps. Rounds alternate the sides so background load hits all
alike; medians are printed, and ratios (peer time / easel time: above 1 means easel is faster) matter more than
absolute times. bf16 means weights and inputs in bfloat16 (no autocast); OpenVINO converts the fp32 diffusers module
(`ov.convert_model`) and compiles it with INFERENCE_PRECISION_HINT bf16 or f32.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from unet_step import DTYPES, build, compute_peak, step_flops  # bench/ is on sys.path when run as a script


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="unet", choices=["unet", "vae"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side (after one warm-up call each)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenVINO threads (default 1)")
    p.add_argument("--openvino", action="store_true", help="add OpenVINO (pip install openvino) as a peer")
    p.add_argument("--compile", action="store_true", help="add easel + torch.compile (inductor); its compile time "
                   "is printed separately")
    p.add_argument("--freezing", action="store_true", help="with --compile: inductor's freezing (weights as "
                   "prepacked constants)")
    return p.parse_args()


def cpu_line() -> str:
    """The CPU model and the instruction-set flags that decide the fast paths."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def unet_sides(dtype: torch.dtype, size: int) -> tuple[dict, tuple, object]:
    """{name: (module, call)} of the UNet sides, the easel inputs and the fp32 diffusers module (for OpenVINO)."""
    ours, theirs = build()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 768, generator=g)
    example = (x, t, ctx)
    sides = {"easel": (ours, lambda: ours(x.to(dtype), t, ctx.to(dtype))),
             "diffusers": (theirs, lambda: theirs(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample)}
    return sides, example, UNetOut(theirs)


class UNetOut(torch.nn.Module):
    """The diffusers UNet returning a plain tensor (what OpenVINO's converter traces)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx).sample


class VAEOut(torch.nn.Module):
    """The diffusers VAE decoder returning a plain tensor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def vae_sides(dtype: torch.dtype, size: int) -> tuple[dict, tuple, object]:
    """{name: (module, call)} of the VAE decoders on one latent, the inputs and the fp32 diffusers decoder."""
    from diffusers import AutoencoderKL as TheirVAE
    from easel.models.configs import SD15
    from easel.models.vae import AutoencoderKL
    from easel.weights import keys_vae
    torch.manual_seed(0)
    theirs = TheirVAE.from_config(keys_vae.diffusers_config(SD15.vae)).eval()
    ours = AutoencoderKL(SD15.vae).eval()
    ours.load_state_dict(keys_vae.from_diffusers(theirs.state_dict(), SD15.vae), strict=True)
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    sides = {"easel": (ours, lambda: ours.decode(z.to(dtype))),
             "diffusers": (theirs, lambda: theirs.decode(z.to(dtype)).sample)}
    return sides, (z,), VAEOut(theirs)


def openvino_call(module: torch.nn.Module, example: tuple, dtype: torch.dtype, threads: int):
    """The module converted to OpenVINO and compiled for the CPU in `dtype`; returns a call on `example`."""
    import openvino as ov
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                      "INFERENCE_NUM_THREADS": threads})
    inputs = [t.numpy() for t in example]
    return lambda: torch.from_numpy(compiled(inputs)[0])


def compiled_call(ours: torch.nn.Module, call, part: str, freezing: bool) -> tuple[object, float]:
    """easel's module through easel.pipelines.compile (fresh in-memory, disk cache as configured) and the
    seconds its first call took (compilation included)."""
    from easel.pipelines.compile import compile_module
    target = ours if part == "unet" else ours.decoder
    compile_module(target, f"bench-{part}", freezing=freezing)
    t0 = time.perf_counter()
    with torch.inference_mode():
        call()
    return call, time.perf_counter() - t0


def timed(fn) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    """Build the sides, warm each up (checking agreement with easel), alternate timed rounds, print a table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.part}, {args.dtype}, latent {args.size}; "
          f"CPU: {cpu_line()}", flush=True)
    sides, example, fp32_module = (unet_sides if args.part == "unet" else vae_sides)(dtype, args.size)
    calls = {}
    if args.openvino:
        t0 = time.perf_counter()
        calls["openvino"] = openvino_call(fp32_module, example, dtype, args.threads)
        print(f"openvino: converted and compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    for module, _ in sides.values():
        module.to(dtype)
    calls = {name: call for name, (_, call) in sides.items()} | calls
    ours, easel_call = sides["easel"]
    flops = step_flops(lambda *a: easel_call(), ())
    peak = compute_peak(dtype, reps=3)
    with torch.inference_mode():
        reference = easel_call().float()
        for name, call in calls.items():
            if name != "easel":
                diff = (call().float() - reference).abs().max().item()
                print(f"{name}: warm, max |{name} - easel| = {diff:.2e}", flush=True)
        if args.compile:
            calls["easel+compile"], first = compiled_call(ours, easel_call, args.part, args.freezing)
            print(f"easel+compile: first call (compiling) {first:.1f} s, max |compiled - eager| = "
                  f"{(calls['easel+compile']().float() - reference).abs().max().item():.2e}", flush=True)
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(timed(call))
            # the peak again each round, best kept: on a shared machine one measurement may hit a busy moment
            peak = {k: max(v, new) for (k, v), new in zip(peak.items(), compute_peak(dtype, reps=3).values())}
    report(times, flops, peak, args)


def report(times: dict, flops: float, peak: dict, args) -> None:
    """A markdown table: median seconds, easel's speed-up over each side, fraction of the measured peak."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{args.part} {args.dtype}, latent {args.size}: {flops / 1e12:.3f} TFLOP a call; peak in this run "
          f"{peak['peak'] / 1e9:.0f} GFLOP/s (matmul {peak['matmul'] / 1e9:.0f}, conv3x3 {peak['conv'] / 1e9:.0f})")
    print("| side | median s | best s | median / easel's | % of peak (best round) | rounds |")
    print("|---|---|---|---|---|---|")
    for name, m in medians.items():
        best = min(times[name])
        print(f"| {name} | {m:.2f} | {best:.2f} | {m / medians['easel']:.2f} | {flops / best / peak['peak']:.0%} | "
              f"{[round(t, 2) for t in times[name]]} |")


if __name__ == "__main__":
    main()
