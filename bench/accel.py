"""The opt-in lossy accelerations (easel.pipelines.accel, README "Lossy accelerations"): speed-up and quality cost.

Two parts, run separately (each pinned to one core: `taskset -c 0 python bench/accel.py ...`):

  sd15   random SD1.5-architecture weights (seeded), a small latent: every setting's txt2img latents side by side
         with the exact path in one process, alternating rounds; median sampling time per image, the latent error
         (max and mean |setting - exact|) and the PSNR of the decoded image against the exact path's.
         `python bench/accel.py sd15 --dtype bf16 --size 32 --steps 6 --rounds 2`
  eval   the built-in model: `easel eval` (its Python entry point, run_eval) once per setting, one after the other;
         the overall score and its change against the exact path, and the eval's generation time.
         `python bench/accel.py eval --per-category 8 --images-per-prompt 2`

Settings: exact, --deepcache 3, --cfg-cutoff 0.6, --tome 0.5, int8 (torch.ao dynamic quantization of the UNet's
linear layers, fp32 activations; measured here only, no flag ships unless it pays) and, in `eval`, the LCM-LoRA
(4 `lcm` steps, CFG 1). Speed is a benchmark, never a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"exact": {}, "deepcache 3": {"deepcache": 3}, "cfg-cutoff 0.6": {"cfg_cutoff": 0.6},
            "tome 0.5": {"tome": 0.5}, "int8": {"int8": True}}
DEFAULT = list(SETTINGS)  # what runs without --only; the variants below only when named
SETTINGS.update({"deepcache 2": {"deepcache": 2}, "deepcache 4": {"deepcache": 4}, "cfg-cutoff 0.4": {"cfg_cutoff": 0.4},
                 "tome 0.3": {"tome": 0.3}, "deepcache 3 + cfg-cutoff 0.6": {"deepcache": 3, "cfg_cutoff": 0.6},
                 # DeepCache at the shallowest skip branch (Python only: AccelUNet(branch=0)); the flag uses branch 1
                 "deepcache 2 branch 0": {"deepcache": 2, "branch": 0}, "deepcache 3 branch 0": {"deepcache": 3, "branch": 0},
                 "deepcache 4 branch 0": {"deepcache": 4, "branch": 0},
                 "deepcache 3 branch 0 + cfg-cutoff 0.6": {"deepcache": 3, "branch": 0, "cfg_cutoff": 0.6}})
LCM = {"lora": "shapeworld-lcm:1", "sampler": "lcm", "scheduler": "sgm_uniform", "steps": 4, "cfg_scale": 1.0}
PROMPT, NEGATIVE = "a red star above a blue circle, photograph, detailed", "blurry, low quality"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("sd15", help="random SD1.5 weights: time and error against the exact path")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    s.add_argument("--size", type=int, default=32, help="latent side (pixels = 8x)")
    s.add_argument("--steps", type=int, default=6)
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--sampler", default="dpmpp_2m")
    s.add_argument("--batch", type=int, default=1, help="images per sampling run (the eval makes 2 per prompt)")
    s.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: the first five)")
    s.add_argument("--builtin", action="store_true", help="the built-in model (its size; --size ignored) instead of "
                   "random SD1.5 weights: same-run speed-ups of the eval's model")
    e = sub.add_parser("eval", help="the built-in model's easel eval per setting")
    e.add_argument("--per-category", type=int, default=8)
    e.add_argument("--images-per-prompt", type=int, default=2)
    e.add_argument("--only", nargs="*", choices=[*SETTINGS, "lcm-lora"],
                   help="settings to run (default: the first five, plus lcm-lora)")
    e.add_argument("--out", default="bench/out/accel_eval")
    for q in (s, e):
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--json", help="also write the results here")
    return p.parse_args()


def int8_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of the UNet with every nn.Linear dynamically quantized to int8 (torch.ao; convolutions and
    attention stay fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes (torchao is the successor; not installed)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(unet).float(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


@contextlib.contextmanager
def deepcache_branch(branch: int | None):
    """Within the block, requests with deepcache > 1 cache at skip branch `branch` (None: the default)."""
    from easel.pipelines import accel
    from easel.pipelines.accel.wrapper import AccelUNet
    if branch is None:
        yield
        return
    original = accel.unet_wrapper
    accel.unet_wrapper = lambda req: (lambda fn: AccelUNet(fn, deepcache=req.deepcache, tome=req.tome, branch=branch))
    try:
        yield
    finally:
        accel.unet_wrapper = original


def request_fields(name: str) -> dict:
    """The request fields of a setting (int8 and branch are applied around the request, not in it)."""
    return {k: v for k, v in SETTINGS.get(name, {}).items() if k not in ("int8", "branch")}


# --- part 1: random SD1.5 weights ---------------------------------------------------------------------------------
def random_sd15(dtype: torch.dtype):
    """A LoadedModel of SD1.5's architecture with seeded random weights (zero-initialised output layers get small
    random values, or every UNet output would be 0) and the built-in model's tokenizer (ids fit CLIP's vocabulary)."""
    from easel.models.configs import SD15
    from easel.models.sd import StableDiffusion
    from easel.text.tokenizer import CLIPTokenizer
    from easel.weights.model_io import LoadedModel
    torch.manual_seed(0)
    model = StableDiffusion(SD15).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    tok = CLIPTokenizer.from_dir(ROOT / "easel/assets/shapeworld/shapeworld.tokenizer")
    return LoadedModel(model.to(dtype), [tok], "", "random")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run_sd15(args) -> dict:
    from easel.pipelines import common
    from easel.pipelines.request import GenerationRequest
    from easel.pipelines.txt2img import sample_latents
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    if args.builtin:
        import easel
        loaded = easel.load(dtype=args.dtype).loaded
        args.size = loaded.model.config.default_size // loaded.model.config.vae.downsample
    else:
        loaded = random_sd15(dtype)
    exact_unet = loaded.model.unet
    names = args.only or DEFAULT
    quantized = int8_unet(exact_unet) if "int8" in names else None
    print(f"loaded {loaded.name} ({args.dtype}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    px = args.size * loaded.model.config.vae.downsample
    base = GenerationRequest(PROMPT, NEGATIVE, width=px, height=px, steps=args.steps, cfg_scale=7.0,
                             sampler=args.sampler, scheduler="karras", seed=1, batch_size=args.batch).resolved(px, 1)
    seeds = list(range(1, args.batch + 1))
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name in names:  # alternating: every round runs every setting once, in the same order
            req = dataclasses.replace(base, **request_fields(name))
            if name == "int8":
                loaded.model.unet = quantized
            try:
                start = time.perf_counter()
                with torch.no_grad(), deepcache_branch(SETTINGS[name].get("branch")):
                    lat = sample_latents(loaded, req, seeds)
                times[name].append(time.perf_counter() - start)
            finally:
                loaded.model.unet = exact_unet
            outs.setdefault(name, lat)
            print(f"round {r} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    images = {n: np.stack([np.asarray(im) for im in common.decode(loaded.model, outs[n])]) for n in names}  # untimed
    ref = outs.get("exact")
    rows = {}
    for name in names:
        row = {"median_s": statistics.median(times[name]), "rounds_s": times[name]}
        if ref is not None:
            diff = (outs[name].float() - ref.float()).abs()
            row.update(latent_max=float(diff.max()), latent_mean=float(diff.mean()),
                       latent_scale=float(ref.float().abs().mean()), psnr_db=psnr(images[name], images["exact"]),
                       speedup=statistics.median(times["exact"]) / statistics.median(times[name]))
        rows[name] = row
    return {"part": "sd15", "batch": args.batch, "model": "built-in model" if args.builtin else "random SD1.5 weights", "dtype": args.dtype, "size": args.size, "steps": args.steps, "sampler": args.sampler,
            "threads": args.threads, "rows": rows}


def print_sd15(res: dict) -> None:
    print(f"\n{res['model']}, latent {res['size']}x{res['size']}, {res['steps']} steps {res['sampler']}, "
          f"batch {res['batch']}, {res['dtype']}, {res['threads']} thread(s); median of {len(next(iter(res['rows'].values()))['rounds_s'])}")
    print("| setting | time per sampling run | speed-up | latent max abs err | latent mean abs err | "
          "decoded PSNR vs exact |")
    print("|---|---|---|---|---|---|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['median_s']:.1f} s | {r.get('speedup', 1):.2f}x | {r.get('latent_max', 0):.3g} | "
              f"{r.get('latent_mean', 0):.3g} (of mean abs {r.get('latent_scale', 0):.3g}) | "
              f"{r.get('psnr_db', math.inf):.1f} dB |")


# --- part 2: the built-in model's easel eval ---------------------------------------------------------------------
class _Overridden:
    """A pipeline whose generate() applies request fields on top of what the eval asks for (so run_eval, unchanged,
    evaluates a setting); everything else is the wrapped pipeline's."""

    def __init__(self, pipe, fields: dict):
        self._pipe, self._fields = pipe, fields
        self.seconds = 0.0  # time inside generate() (sampling + VAE decode), what the settings change

    def generate(self, req, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._pipe.generate(dataclasses.replace(req, **self._fields), *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def run_eval_settings(args) -> dict:
    import easel
    from easel.world.evaluate import EvalSettings, run_eval
    names = args.only or [*DEFAULT, "lcm-lora"]
    pipe = easel.load()
    exact_unet = pipe.loaded.model.unet
    rows = {}
    for name in names:
        fields = request_fields(name)
        s = EvalSettings(per_category=args.per_category, images_per_prompt=args.images_per_prompt)
        if name == "lcm-lora":
            s = dataclasses.replace(s, steps=LCM["steps"], sampler=LCM["sampler"], scheduler=LCM["scheduler"],
                                    cfg_scale=LCM["cfg_scale"], loras=[LCM["lora"]])
        if name == "int8":
            pipe.loaded.model.unet = int8_unet(exact_unet)
        overridden = _Overridden(pipe, fields)
        try:
            with deepcache_branch(SETTINGS.get(name, {}).get("branch")):
                report = run_eval(overridden, s, Path(args.out) / name.replace(" ", "_"))
        finally:
            pipe.loaded.model.unet = exact_unet
        rows[name] = {"scores": report["rows"]["generated"], "seconds": overridden.seconds}
        print(f"{name}: overall {rows[name]['scores']['overall']:.3f}, generation {overridden.seconds:.0f} s",
              file=sys.stderr, flush=True)
    return {"part": "eval", "per_category": args.per_category, "images_per_prompt": args.images_per_prompt,
            "threads": args.threads, "rows": rows}


def print_eval(res: dict) -> None:
    rows = res["rows"]
    ref = rows.get("exact")
    print(f"\nbuilt-in model, easel eval --per-category {res['per_category']} --images-per-prompt "
          f"{res['images_per_prompt']}, {res['threads']} thread(s)")
    print("| setting | overall | change vs exact | generation time (sampling + decode) | speed-up |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        overall = r["scores"]["overall"]
        delta = f"{overall - ref['scores']['overall']:+.3f}" if ref else "-"
        ratio = f"{ref['seconds'] / r['seconds']:.2f}x" if ref else "-"
        print(f"| {name} | {overall:.3f} | {delta} | {r['seconds']:.0f} s | {ratio} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    res = run_sd15(args) if args.part == "sd15" else run_eval_settings(args)
    (print_sd15 if args.part == "sd15" else print_eval)(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
