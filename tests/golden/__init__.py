"""Golden images of the built-in model: what `tests/test_builtin.py::test_golden_images` checks and
`python scripts/golden.py --update` writes.

The promise: bit-exact pixels on a platform whose hash is recorded (same torch version, same CPU kernels), and
close pixels elsewhere (float kernels differ by instruction set: AVX2, AVX-512, AVX-512 BF16, AMX ...).
So `manifest.json` holds a sha256 of the raw pixels per platform key, and the reference PNGs here are compared
within a tolerance on a platform without a recorded hash.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np

FOLDER = Path(__file__).resolve().parent
MANIFEST = FOLDER / "manifest.json"
PROMPT, SEED = "three red stars", 1
# CPU features that change which float kernels torch and oneDNN pick (and so the last bits of a result).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")
# Elsewhere: a little float noise is allowed, a changed picture is not. Measured on one Xeon by forcing other
# kernels (ATEN_CPU_CAPABILITY=avx2/default, ONEDNN_MAX_CPU_ISA=AVX2/SSE41): mean 1e-4 levels (of 255), 99.9th
# percentile 0; another seed differs by tens of levels. The limits leave room for larger ISA differences.
TOLERANCE = {"mean_abs": 0.5, "p99_9_abs": 8.0}


def platform_key() -> str:
    """'torch <version> | <CPU capability torch dispatches to> | <arch> <ISA flags>': where bits are expected to
    repeat exactly."""
    import torch
    return f"torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | {platform.machine()} " \
           f"{'+'.join(cpu_flags()) or '-'}"


def cpu_flags() -> list[str]:
    """The CPU's ISA_FLAGS (from /proc/cpuinfo; empty where that does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in ISA_FLAGS if f in have]


def render() -> list:
    """The golden images: PROMPT, SEED, the built-in model's defaults, on one thread."""
    return render_seed(SEED)


def render_seed(seed: int) -> list:
    """PROMPT at `seed` on the built-in model, on one thread (the golden images are defined at one thread)."""
    import torch

    import easel
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return easel.load().txt2img(PROMPT, seed=seed)
    finally:
        torch.set_num_threads(before)


def pixel_hash(images: list) -> str:
    """sha256 of the raw RGB bytes of the images, in order."""
    return hashlib.sha256(b"".join(im.convert("RGB").tobytes() for im in images)).hexdigest()


def manifest() -> dict:
    """{'prompt', 'seed', 'images': [file names], 'platforms': {platform key: pixel hash}}."""
    return json.loads(MANIFEST.read_text())


def reference_images() -> list:
    """The stored reference PNGs."""
    from PIL import Image
    return [Image.open(FOLDER / name).convert("RGB") for name in manifest()["images"]]


def difference(images: list, references: list) -> dict:
    """Mean and 99.9th-percentile absolute pixel difference (0..255) over all images."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in references])
    if a.shape != b.shape:
        return {"mean_abs": float("inf"), "p99_9_abs": float("inf")}
    d = np.abs(a - b)
    return {"mean_abs": float(d.mean()), "p99_9_abs": float(np.percentile(d, 99.9))}


def within_tolerance(diff: dict) -> bool:
    """Whether a difference is float noise rather than a changed picture."""
    return all(diff[k] <= limit for k, limit in TOLERANCE.items())


def update(add_platform_only: bool = False) -> dict:
    """Regenerate on this platform: new reference PNGs and this platform's hash, dropping the other platforms'
    (a change that alters the images invalidates them); with `add_platform_only`, keep the PNGs and the other
    hashes and add this platform's (after checking it is within tolerance of the references)."""
    from easel.files import save_image, write_text
    images = render()
    key, digest = platform_key(), pixel_hash(images)
    if add_platform_only:
        data = manifest()
        diff = difference(images, reference_images())
        if not within_tolerance(diff):
            raise SystemExit(f"this platform's images differ from the references beyond tolerance ({diff}): "
                             "run --update to replace the references if the change is intended")
        data["platforms"][key] = digest
    else:
        names = [f"{PROMPT.replace(' ', '-')}-{SEED}-{i}.png" for i in range(len(images))]
        for name, im in zip(names, images):
            save_image(im, FOLDER / name)
        data = {"prompt": PROMPT, "seed": SEED, "images": names, "platforms": {key: digest}}
    write_text(MANIFEST, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
