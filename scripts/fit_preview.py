"""Fit (or read) a model's latent -> RGB preview map, measure it, and optionally store it in the checkpoint.

    python scripts/fit_preview.py                       # the built-in model: PSNR and timings
    python scripts/fit_preview.py model.safetensors --write   # also store it as metadata `easel.latent_rgb`

PSNR is measured against the full VAE decode on held-out ShapeWorld scenes (eval set 0), next to the best
single colour for the whole set (what a map without spatial information could reach).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from easel.pipelines import common
from easel.pipelines.preview import LATENT_RGB_KEY, LatentPreviewer, latent_rgb_metadata
from easel.weights.load import read_state_dict, write_safetensors


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] images after 8-bit rounding."""
    a, b = ((a.clamp(-1, 1) + 1) * 127.5).round(), ((b.clamp(-1, 1) + 1) * 127.5).round()
    return 10 * math.log10(255**2 / ((a - b) ** 2).mean().item())


def seconds(fn, repeat: int) -> float:
    """Mean wall time of `fn()` over `repeat` runs (after one warm-up run)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


@torch.no_grad()
def measure(loaded, n: int = 8) -> None:
    """Print the preview's PSNR against the full decode and the time of each kind of preview."""
    from easel.world.dataset import eval_seeds, render_batch
    vae = loaded.model.vae
    f = vae.config.downsample
    images, _ = render_batch(eval_seeds(n), 16 * f)
    latents = vae.encode_latents(images)
    decoded = vae.decode_latents(latents).clamp(-1, 1)
    previewer = LatentPreviewer.for_model(loaded)
    approx = previewer.to_rgb(latents)
    constant = decoded.mean((0, 2, 3), keepdim=True).expand_as(decoded)
    print(f"PSNR vs full decode: map {psnr(approx, decoded):.2f} dB, "
          f"best constant colour {psnr(constant, decoded):.2f} dB, map on another image's latents {psnr(approx, decoded.roll(1, 0)):.2f} dB")
    for b in (1, n):
        batch = latents[:b]
        t_map = seconds(lambda: previewer.to_images(batch), 20)  # noqa: B023 (called before the loop moves on)
        t_vae = seconds(lambda: common.decode(loaded.model, batch), 3)  # noqa: B023
        print(f"batch {b}: approx {t_map * 1e3:.2f} ms, full decode {t_vae * 1e3:.1f} ms ({t_vae / t_map:.0f}x)")


def write_metadata(loaded) -> None:
    """Rewrite the single-file checkpoint with the map in its metadata (tensors unchanged, file hash changes)."""
    sd, meta = read_state_dict(loaded.source)
    write_safetensors(sd, loaded.source, {**meta, **latent_rgb_metadata(loaded)})
    print(f"wrote {LATENT_RGB_KEY} into {loaded.source}")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="model path or name (default: the built-in model)")
    ap.add_argument("--write", action="store_true", help="store the map in the .safetensors metadata")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import easel
    loaded = easel.load(args.model).loaded
    measure(loaded)
    if args.write:
        write_metadata(loaded)


if __name__ == "__main__":
    main()
