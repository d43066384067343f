"""Side by side in one process: easel vs diffusers eager (vs OpenVINO, vs diffusers or easel + torch.compile) on the
same random weights, with the CPU's matmul/conv peak measured in the same run and each side's fraction of it.

    python bench/speed.py --part unet --dtype bf16 --size 64 --rounds 3 --threads 1 --openvino
    python bench/speed.py --part unet --model sd21 --size 96 --rounds 1 --threads 1          # SD2.1 768 v
    python bench/speed.py --part unet --model sdxl --size 128 --rounds 1 --threads 1         # SDXL 1024
    python bench/speed.py --part vae-decode --dtype fp32 --size 64 --rounds 2 --threads 1    # 512 px
    python bench/speed.py --part vae-encode --dtype fp32 --size 64 --rounds 2 --threads 1
    python bench/speed.py --part text --rounds 5 --threads 1
    python bench/speed.py --part e2e --size 64 --steps 4 --batch 1 --rounds 1 --threads 1
    python bench/speed.py --part vae-decode --sides easel --exact    # one side: that side's peak RSS

Parts: `unet` (one classifier-free-guidance step: batch 2, 4 x size x size latent, the model's text context; SDXL
also its pooled/size vector), `vae-decode` / `vae-encode` (one image, latent side `size`; `vae` = `vae-decode`),
`text` (the prompt and negative prompt through CLIP ViT-L, 77 tokens each), `e2e` (txt2img through each library's
pipeline: text encoding, `--steps` Euler steps with CFG at batch `--batch`, VAE decode). unet/vae parts build
diffusers' random init and load the same weights into easel through easel's key maps; text/e2e save a random SD1.5
once as a diffusers folder (`--cache`, default ~/.cache/easel/bench) and load it on both sides from there.

Rounds alternate the sides so background load hits all alike. Each round records wall time and the process's CPU
time: on a machine shared with other jobs the CPU time is the steadier number (it leaves out the time the process
waited for the core) and the ratios use it. bf16 means weights and inputs in bfloat16 (no autocast). easel runs its
default fast paths (channels_last activations in the VAE); `--exact` adds easel on its reference NCHW path as a
side (for the UNet, whose default is NCHW, easel on channels_last instead: EASEL_UNET_CHANNELS_LAST=1). The
peak RSS of the process is printed at the end (run with `--sides X` for one side's), and each side's working
memory: the highest RSS sampled during its calls minus the RSS before each call.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import torch.nn.functional as F

from unet_step import DTYPES, step_flops  # bench/ is on sys.path when run as a script

PARTS = ["unet", "vae", "vae-decode", "vae-encode", "text", "e2e"]
PROMPT, NEGATIVE = "a red star above a blue circle", "a green cat"


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="unet", choices=PARTS)
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21", "sdxl"], help="unet part: which UNet")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side (after one warm-up call each)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenVINO threads (default 1)")
    p.add_argument("--sides", default="easel,diffusers", help="comma list of easel, diffusers")
    p.add_argument("--exact", action="store_true", help="add easel on its exact (NCHW) path as a side")
    p.add_argument("--steps", type=int, default=4, help="e2e: sampling steps")
    p.add_argument("--batch", type=int, default=1, help="e2e: images per prompt")
    p.add_argument("--openvino", action="store_true", help="add OpenVINO (pip install openvino) as a peer")
    p.add_argument("--compile", action="store_true", help="add easel + torch.compile (inductor); its compile time "
                   "is printed separately")
    p.add_argument("--diffusers-compile", action="store_true", help="add diffusers + torch.compile (inductor)")
    p.add_argument("--freezing", action="store_true", help="with --compile: inductor's freezing (weights as "
                   "prepacked constants)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up call (large models, 1 round)")
    p.add_argument("--cache", default=os.environ.get("EASEL_BENCH_CACHE", "~/.cache/easel/bench"),
                   help="text/e2e: folder for the random SD1.5 saved once")
    args = p.parse_args()
    args.part = "vae-decode" if args.part == "vae" else args.part
    return args


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


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30, peak
    except (OSError, ValueError):
        return float("nan"), peak


def _best_rate(fn, flops: float, reps: int) -> float:
    fn()  # warm up the BLAS / oneDNN kernels
    return max(flops / max(timed(fn)[1], 1e-9) for _ in range(reps))


def compute_peak(dtype: torch.dtype, reps: int = 3) -> dict[str, float]:
    """Best FLOP/s per CPU second of a 2048^3 matmul and a 640-channel 3x3 conv in `dtype`: the practical limit,
    timed like the sides (CPU time), so that a busy machine shifts both alike."""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x, w = torch.randn(2, 640, 32, 32, dtype=dtype), torch.randn(640, 640, 3, 3, dtype=dtype)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        mm = _best_rate(lambda: a @ b, 2 * n**3, reps)
        conv_flops = 2 * 2 * 640 * 640 * 9 * 32 * 32
        conv = max(_best_rate(lambda: F.conv2d(x, w, padding=1), conv_flops, reps),
                   _best_rate(lambda: F.conv2d(xl, w, padding=1), conv_flops, reps))
    return {"matmul": mm, "conv": conv, "peak": max(mm, conv)}


# ---- building the sides: {name: (module for .to(dtype) or None, call)} ----

def model_config(name: str):
    """easel's config of the named model family."""
    from easel.models import configs
    return {"sd15": configs.SD15, "sd21": configs.SD21, "sdxl": configs.SDXL}[name]


def unet_sides(args, dtype: torch.dtype) -> tuple[dict, tuple, torch.nn.Module]:
    """The UNet sides (easel's weights share diffusers' storage), the easel inputs and the diffusers module."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    from easel.models.unet import UNetModel
    from easel.weights.keys_unet import diffusers_config, from_diffusers
    logging.set_verbosity_error()
    cfg = model_config(args.model).unet
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the bench dtype: SDXL in fp32 would be 10 GB a copy
    try:
        theirs = UNet2DConditionModel.from_config(diffusers_config(cfg)).eval()
        with torch.device("meta"):
            ours = UNetModel(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True, assign=True)  # no second copy
    from easel.models.layers import UNET_CHANNELS_LAST, use_fast_layout
    if UNET_CHANNELS_LAST:  # as easel's loader does
        use_fast_layout(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size, args.size, generator=g).to(dtype)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    y = torch.randn(2, cfg.adm_in_channels, generator=g).to(dtype) if cfg.adm_in_channels else None
    extra = {}
    if y is not None:  # diffusers' SDXL takes the pooled text and the six size numbers separately
        extra = {"added_cond_kwargs": {"text_embeds": y[:, :1280], "time_ids": torch.tensor(
            [[1024.0, 1024, 0, 0, 1024, 1024]] * 2).to(dtype)}}
        from easel.models.unet import sdxl_vector
        y = sdxl_vector(y[:, :1280])
    sides = {"easel": (ours, lambda: ours(x, t, ctx, y=y)),
             "diffusers": (theirs, lambda: theirs(x, t, encoder_hidden_states=ctx, **extra).sample)}
    if args.exact and not UNET_CHANNELS_LAST:  # the UNet's default is NCHW: compare with the opt-in layout
        xl = x.contiguous(memory_format=torch.channels_last)
        sides["easel channels_last"] = (None, lambda: ours(xl, t, ctx, y=y))
    return sides, (x, t, ctx), UNetOut(theirs)


class UNetOut(torch.nn.Module):
    """The diffusers UNet returning a plain tensor (what OpenVINO's converter traces)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx).sample


class VAEOut(torch.nn.Module):
    """The diffusers VAE decoder (or encoder's mean) returning a plain tensor."""

    def __init__(self, vae, encode: bool):
        super().__init__()
        self.vae, self.encode = vae, encode

    def forward(self, z):
        return self.vae.encode(z).latent_dist.mean if self.encode else self.vae.decode(z).sample


def vae_sides(args, dtype: torch.dtype) -> tuple[dict, tuple, torch.nn.Module]:
    """The VAE sides on one latent (decode) or one image (encode), the inputs and the diffusers module."""
    from diffusers import AutoencoderKL as TheirVAE

    from easel.models.configs import SD15
    from easel.models.vae import AutoencoderKL
    from easel.weights import keys_vae
    torch.manual_seed(0)
    theirs = TheirVAE.from_config(keys_vae.diffusers_config(SD15.vae)).eval()
    ours = AutoencoderKL(SD15.vae).eval()
    ours.load_state_dict(keys_vae.from_diffusers(theirs.state_dict(), SD15.vae), strict=True)
    g = torch.Generator().manual_seed(0)
    if args.part == "vae-encode":
        x = torch.rand(1, 3, 8 * args.size, 8 * args.size, generator=g) * 2 - 1
        sides = {"easel": (ours, lambda: ours.encode(x.to(dtype))[0]),
                 "diffusers": (theirs, lambda: theirs.encode(x.to(dtype)).latent_dist.mean)}
        return sides, (x,), VAEOut(theirs, encode=True)
    z = torch.randn(1, 4, args.size, args.size, generator=g)
    sides = {"easel": (ours, lambda: ours.decode(z.to(dtype))),
             "diffusers": (theirs, lambda: theirs.decode(z.to(dtype)).sample)}
    return sides, (z,), VAEOut(theirs, encode=False)


def random_sd15_folder(cache: str) -> Path:
    """A random-weight SD1.5 saved as a diffusers folder (fp32, with a small BPE tokenizer), made once."""
    folder = Path(cache).expanduser() / "sd15-random"
    if (folder / "model_index.json").is_file():
        return folder
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests.conftest
    from easel.models.configs import SD15
    from easel.text.tokenizer import CLIPTokenizer
    from easel.weights.model_io import LoadedModel, save_model
    from tests.conftest import random_model, write_tiny_vocab
    print(f"saving a random SD1.5 to {folder} (once)", flush=True)
    vocab, merges = write_tiny_vocab(folder.parent / "sd15-random-tok")
    model = random_model(SD15)
    save_model(LoadedModel(model, [CLIPTokenizer.from_files(vocab, merges)], "", ""), folder, to="diffusers")
    return folder


def pipeline_sides(args, dtype: torch.dtype) -> tuple[dict, tuple, None]:
    """text / e2e: easel's Pipeline and diffusers' StableDiffusionPipeline on the same saved random SD1.5."""
    import diffusers

    import easel
    from easel.pipelines import common
    folder = random_sd15_folder(args.cache)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    ours = easel.load(str(folder), dtype=name)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    side = 8 * args.size
    if args.part == "text":
        model, toks = ours.loaded.model, ours.loaded.tokenizers
        sides = {"easel": (None, lambda: common.encode_prompts(model, toks, [PROMPT, NEGATIVE])["context"]),
                 "diffusers": (None, lambda: torch.cat(theirs.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)))}
        return sides, (), None
    n = args.batch
    sides = {"easel": (None, lambda: ours.txt2img(PROMPT, negative_prompt=NEGATIVE, width=side, height=side,
                                                   steps=args.steps, sampler="euler", seed=1, batch_size=n,
                                                   cfg_scale=7.0)),
             "diffusers": (None, lambda: theirs([PROMPT] * n, negative_prompt=[NEGATIVE] * n, width=side,
                                                height=side, num_inference_steps=args.steps, guidance_scale=7.0,
                                                generator=torch.Generator().manual_seed(1)).images)}
    return sides, (), None


# ---- peers ----

def openvino_call(module: torch.nn.Module, example: tuple, dtype: torch.dtype, threads: int):
    """The module converted to OpenVINO and compiled for the CPU in `dtype`; returns a call on `example`."""
    import openvino as ov
    with torch.no_grad():
        model = ov.convert_model(module.float(), example_input=tuple(t.float() for t in example))
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                      "INFERENCE_NUM_THREADS": threads})
    inputs = [t.float().numpy() for t in example]
    return lambda: torch.from_numpy(compiled(inputs)[0])


def compiled_call(ours: torch.nn.Module, call, part: str, freezing: bool) -> tuple[object, float]:
    """easel's module through easel.pipelines.compile (fresh in-memory, disk cache as configured) and the
    seconds its first call took (compilation included)."""
    from easel.pipelines.compile import compile_module
    target = {"unet": ours, "vae-decode": getattr(ours, "decoder", None),
              "vae-encode": getattr(ours, "encoder", None)}[part]
    compile_module(target, f"bench-{part}", freezing=freezing)
    t0 = time.perf_counter()
    with torch.inference_mode():
        call()
    return call, time.perf_counter() - t0


def diffusers_compiled(theirs: torch.nn.Module, part: str) -> None:
    """Compile diffusers' module in place (inductor), as its docs advise for the UNet / VAE decoder."""
    if part == "unet":
        theirs.forward = torch.compile(theirs.forward)
    else:
        target = theirs.decoder if part == "vae-decode" else theirs.encoder
        target.forward = torch.compile(target.forward)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_memory(fn) -> tuple[float, float, float]:
    """(wall s, CPU s, GiB) of one call; the last is the highest RSS seen during the call (sampled every 10 ms by
    a thread) minus the RSS before it: the call's working memory on top of the weights already resident."""
    import threading
    before, high, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.wait(0.01):
            high[0] = max(high[0], _rss_bytes())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        wall, cpu = timed(fn)
    finally:
        done.set()
        thread.join()
    return wall, cpu, max(0, max(high[0], _rss_bytes()) - before) / 2**30


def _as_tensor(out) -> torch.Tensor:
    """A side's output as one float tensor (PIL images of e2e as pixels)."""
    if isinstance(out, torch.Tensor):
        return out.float()
    import numpy as np
    return torch.from_numpy(np.stack([np.asarray(getattr(im, "image", im), dtype=np.float32) for im in out]))


def build_calls(args, dtype: torch.dtype) -> tuple[dict, object, float]:
    """{name: call} of every side asked for, easel's module (for --compile) and the FLOPs of one easel call."""
    builder = {"unet": unet_sides, "vae-decode": vae_sides, "vae-encode": vae_sides, "text": pipeline_sides,
               "e2e": pipeline_sides}[args.part]
    sides, example, fp32_module = builder(args, dtype)
    wanted = args.sides.split(",")
    calls = {}
    if args.openvino and fp32_module is not None:
        t0 = time.perf_counter()
        calls["openvino"] = openvino_call(fp32_module, example, dtype, args.threads)
        print(f"openvino: converted and compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    for name, (module, _) in sides.items():
        if module is not None:
            module.to(dtype)
    ours, easel_call = sides["easel"]
    calls = {name: call for name, (_, call) in sides.items() if name.split()[0] in wanted} | calls
    if args.exact and "easel" in wanted and args.part != "unet":
        from easel.models.layers import exact_paths

        def exact():
            with exact_paths():
                return easel_call()
        calls["easel exact"] = exact
    if args.diffusers_compile and sides["diffusers"][0] is not None:
        diffusers_compiled(sides["diffusers"][0], args.part)
        t0 = time.perf_counter()
        with torch.inference_mode():
            sides["diffusers"][1]()
        calls["diffusers+compile"] = sides["diffusers"][1]
        calls.pop("diffusers", None)  # the module is compiled in place: its eager side is gone
        print(f"diffusers+compile: first call (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
    flops = step_flops(lambda *a: easel_call(), ()) if args.part != "e2e" else 0
    return calls, (ours, easel_call), flops


def main() -> None:
    """Build the sides, warm each up (checking agreement with easel), alternate timed rounds, print a table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.part} ({args.model if args.part == 'unet' else 'sd15'}), "
          f"{args.dtype}, latent {args.size}; load average {load[0]:.1f}; CPU: {cpu_line()}", flush=True)
    t0 = time.perf_counter()
    calls, (ours, easel_call), flops = build_calls(args, dtype)
    now, peak_rss = rss_gib()
    print(f"built in {time.perf_counter() - t0:.0f} s; RSS {now:.2f} GiB (peak {peak_rss:.2f})", flush=True)
    peak = compute_peak(dtype, reps=3)
    with torch.inference_mode():
        if not args.no_warmup:
            reference = _as_tensor(calls[next(iter(calls))]())
            for name, call in list(calls.items())[1:]:
                diff = (_as_tensor(call()) - reference).abs().max().item()
                print(f"{name}: warm, max |{name} - {next(iter(calls))}| = {diff:.2e}", flush=True)
        if args.compile and ours is not None:
            calls["easel+compile"], first = compiled_call(ours, easel_call, args.part, args.freezing)
            print(f"easel+compile: first call (compiling) {first:.1f} s", flush=True)
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(timed_memory(call))
            # the peak again each round, best kept: on a shared machine one measurement may hit a busy moment
            peak = {k: max(v, new) for (k, v), new in zip(peak.items(), compute_peak(dtype, reps=3).values())}
    report(times, flops, peak, args)
    now, peak_rss = rss_gib()
    print(f"\npeak RSS of this process ({', '.join(calls)}): {peak_rss:.2f} GiB; now {now:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.1f}")


def report(times: dict, flops: float, peak: dict, args) -> None:
    """A markdown table: medians of wall and CPU time, each side's CPU time over easel's, fraction of the peak."""
    cpu = {name: statistics.median(c for _, c, _ in ts) for name, ts in times.items()}
    base = cpu.get("easel", next(iter(cpu.values())))
    what = f"{flops / 1e12:.3f} TFLOP a call; " if flops else ""
    print(f"\n{args.part} {args.dtype}, latent {args.size}: {what}peak in this run {peak['peak'] / 1e9:.0f} GFLOP/s "
          f"(matmul {peak['matmul'] / 1e9:.0f}, conv3x3 {peak['conv'] / 1e9:.0f})")
    print("| side | median wall s | median CPU s | CPU time / easel's | % of peak (best CPU round) | "
          "working memory GiB | rounds (wall/CPU) |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        best = min(c for _, c, _ in ts)
        frac = f"{flops / best / peak['peak']:.0%}" if flops else "-"
        print(f"| {name} | {statistics.median(w for w, _, _ in ts):.2f} | {cpu[name]:.2f} | {cpu[name] / base:.2f} | "
              f"{frac} | {max(m for _, _, m in ts):.2f} | {[f'{w:.1f}/{c:.1f}' for w, c, _ in ts]} |")


if __name__ == "__main__":
    main()
