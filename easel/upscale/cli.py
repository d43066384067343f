"""`easel upscale IMAGE`: an upscaler model (tiled), Lanczos or nearest; with --sd-upscale, SD upscale."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_upscale_parser(sub, cli) -> None:
    """Register `easel upscale`. `cli` is the easel.cli module (its flag tables and helpers; no import back)."""
    p = sub.add_parser("upscale", help="upscale an image: ESRGAN / Real-ESRGAN / SwinIR / ... files, lanczos, "
                       "nearest; --sd-upscale repaints the upscaled image tile by tile")
    p.add_argument("image", nargs="?", help="the image to upscale")
    p.add_argument("--upscaler", "-u", default="lanczos", help="an upscaler file's name (A1111's 'R-ESRGAN 4x+', a "
                   "file stem such as '4x-UltraSharp'; see `easel upscale --list`), a path, lanczos or nearest "
                   "(default: lanczos)")
    p.add_argument("--scale", "-s", type=float, help="upscale factor (default: the model's own; 2 for lanczos, "
                   "nearest and --sd-upscale)")
    p.add_argument("--tile", type=int, default=256, help="tile size in input pixels for upscaler models; smaller "
                   "uses less memory, 0 runs the whole image at once (default 256)")
    p.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles, blended (default: 32, at "
                   "most a quarter of --tile)")
    p.add_argument("--list", action="store_true", help="list the upscaler files found and exit")
    p.add_argument("--sd-upscale", action="store_true", help="SD upscale: upscale, then img2img every tile of the "
                   "model's size with --prompt at --denoising-strength")
    p.add_argument("--prompt", "-p", default="", help="the prompt of --sd-upscale")
    p.add_argument("--sd-overlap", type=int, help="--sd-upscale: pixels shared by neighbouring tiles (default: half "
                   "a tile, at most 64)")
    sd_fields = ("negative_prompt", "steps", "cfg_scale", "sampler", "scheduler", "seed", "width", "height",
                 "clip_skip")  # --width/--height: the exact output size of a plain upscale
    p.add_argument("--no-color-match", dest="color_match", action="store_false", help="--sd-upscale: keep each "
                   "repainted tile's colours (default: matched to the tile's source, so no tile stands out)")
    cli.add_request_flags(p, {k: cli.REQUEST_FLAGS[k] for k in sd_fields})
    cli.add_request_flags(p, {"denoising_strength": cli.IMG2IMG_FLAGS["denoising_strength"]})
    cli.add_model_flags(p)
    p.add_argument("--out", "-o", help="output PNG (default: IMAGE's name + '-upscaled.png' in this folder)")
    p.set_defaults(func=cmd_upscale, cli=cli)


def cmd_upscale(args: argparse.Namespace) -> int:
    """easel upscale IMAGE ..."""
    from easel.upscale.find import list_upscalers
    if args.list:
        found = list_upscalers()
        print("\n".join(f"{e.name}\t{e.path}" for e in found) if found else "no upscaler files found", flush=True)
        return 0
    if args.image is None:
        raise ValueError("give the IMAGE to upscale (or --list to see the upscaler files)")
    image = args.cli.read_image(args.image, "image")
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}-upscaled.png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file (got {out}): it keeps the image's parameters")
    result, info = (run_sd_upscale if args.sd_upscale else run_upscale)(args, image)
    print(write_result(result, out, image, info), flush=True)
    return 0


def run_upscale(args: argparse.Namespace, image):
    """The plain upscale, with a bar over tiles."""
    import torch
    from easel.upscale.run import upscale_image
    size = (args.width, args.height) if args.width or args.height else None
    if size is not None and not (args.width and args.height):
        raise ValueError("give both --width and --height for an exact size, or --scale")
    overlap = args.tile_overlap if args.tile_overlap is not None else min(32, args.tile // 4)
    with tile_bar() as on_tile:
        result = upscale_image(image, args.upscaler, args.scale, size=size, tile=args.tile, overlap=overlap,
                               device=args.device, dtype=getattr(torch, DTYPES[args.dtype]), on_tile=on_tile)
    scale = args.scale or round(result.width / image.width, 3)
    return result, f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {args.upscaler}"


def run_sd_upscale(args: argparse.Namespace, image):
    """SD upscale with the loaded model, a bar over tiles."""
    import easel
    from easel.upscale.sd_upscale import sd_upscale
    req = args.cli.request_from_args(args)
    req.prompt = args.prompt
    if args.width or args.height:
        raise ValueError("--sd-upscale takes --scale, not --width/--height (tiles are the model's size)")
    req.check()
    pipe = easel.load(args.model, dtype=args.dtype, device=args.device, vae=args.vae, tokenizer=args.tokenizer,
                      prediction=args.prediction)
    with tile_bar() as on_tile:
        result, params = sd_upscale(pipe, image, req, args.upscaler, args.scale or 2.0, args.sd_overlap,
                                    on_tile=on_tile, color_match=args.color_match)
    return result, params


class tile_bar:
    """A tqdm bar over tiles (its total known from the first report)."""

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(unit="tile", file=sys.stderr, dynamic_ncols=True, leave=False)

        def on_tile(done: int, total: int) -> None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        return on_tile

    def __exit__(self, *exc):
        self.bar.close()


def write_result(result, out: Path, source, info) -> Path:
    """Save the upscaled PNG: with SD upscale's parameters, or the source's parameters and A1111's
    'postprocessing' text for a plain upscale."""
    from PIL import PngImagePlugin
    from easel.files import save_image
    from easel.pipelines.metadata import save_png
    if isinstance(info, dict):
        return save_png(result, out, info)
    meta = PngImagePlugin.PngInfo()
    for key, value in getattr(source, "text", {}).items():
        if key in ("parameters", "easel"):
            meta.add_text(key, value)
    meta.add_text("postprocessing", info)
    return save_image(result, out, pnginfo=meta)
