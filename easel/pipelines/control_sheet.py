"""A contact sheet of the ControlNet preprocessors on one image, and optionally what a model draws with a ControlNet.

    python -m easel.pipelines.control_sheet IMAGE [--mask MASK] --out sheet.png
        [--prompt TEXT --controlnet PATH_OR_NAME [--model M] [--seed 7] [--steps 20]]

Row 1: the image and every preprocessor's hint (what a ControlNet would see). Row 2 (with --prompt): the model's
image without ControlNet, then with the ControlNet on the canny hint at weights 0, 0.5 and 1. `--controlnet random`
makes a ControlNet of random weights for the model (it shows the hook-up runs; it has learned nothing).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from easel.pipelines.control_pre import PREPROCESSORS, hint_image, preprocess
from easel.pipelines.control_unit import ControlUnit

CELL = 128  # display side of each picture (nearest-neighbour scaling keeps small images' pixels visible)


def preprocessor_row(image: Image.Image, mask: Image.Image | None) -> list[tuple[Image.Image, str]]:
    """(picture, caption) of the image and of each preprocessor's hint; inpaint only when there is a mask."""
    row = [(image, "control image")]
    for name in PREPROCESSORS:
        if name == "none" or (PREPROCESSORS[name].needs_mask and mask is None):
            continue
        row.append((hint_image(preprocess(name, image, mask=mask)), name))
    return row


def model_row(pipe, prompt: str, image: Image.Image, controlnet: str, seed: int, steps: int
              ) -> list[tuple[Image.Image, str]]:
    """(picture, caption) of the model's image without ControlNet and with it (canny hint) at weights 0, 0.5, 1."""
    from easel.pipelines.request import GenerationRequest
    opts = dict(seed=seed, steps=steps, width=image.width, height=image.height)
    row = [(pipe.generate(GenerationRequest(prompt, **opts))[0].image, "no ControlNet")]
    for w in (0.0, 0.5, 1.0):
        unit = ControlUnit(controlnet, image, weight=w, preprocessor="canny", resize_mode="just_resize")
        row.append((pipe.generate(GenerationRequest(prompt, controlnets=[unit], **opts))[0].image, f"canny, {w:g}"))
    return row


def random_controlnet_file(model_config, path: Path, std: float = 0.02, seed: int = 0) -> Path:
    """Save a ControlNet of random weights for a model (CompVis layout): a stand-in to see the hook-up run."""
    from easel.models.controlnet import ControlNet, ControlNetConfig
    from easel.weights.load import write_safetensors
    torch.manual_seed(seed)
    net = ControlNet(ControlNetConfig.for_model(model_config))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    write_safetensors({"control_model." + k: v for k, v in net.state_dict().items()}, path)
    return path


def sheet(rows: list[list[tuple[Image.Image, str]]]) -> Image.Image:
    """Rows of captioned pictures, each scaled to CELL x CELL."""
    font, caption = ImageFont.load_default(), 16
    width = max(len(r) for r in rows) * CELL
    out = Image.new("RGB", (width, len(rows) * (CELL + caption)), "white")
    draw = ImageDraw.Draw(out)
    for y, row in enumerate(rows):
        for x, (im, text) in enumerate(row):
            out.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x * CELL, y * (CELL + caption)))
            draw.text((x * CELL + 4, y * (CELL + caption) + CELL + 2), text, fill="black", font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    """Draw the sheet."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--mask")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt")
    ap.add_argument("--controlnet", default="random")
    ap.add_argument("--model")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    image = Image.open(args.image).convert("RGB")
    mask = Image.open(args.mask).convert("L") if args.mask else None
    rows = [preprocessor_row(image, mask)]
    if args.prompt:
        import easel
        pipe = easel.load(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            cn = args.controlnet
            if cn == "random":
                cn = str(random_controlnet_file(pipe.config, Path(tmp) / "random-controlnet.safetensors"))
            rows.append(model_row(pipe, args.prompt, image, cn, args.seed, args.steps))
    sheet(rows).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
