"""Draw the README's upscaling picture with the built-in model: `python docs/upscale/make.py` (under a minute on one
CPU core). A 64 px image, then 2x by nearest, Lanczos and SD upscale (Lanczos, then img2img over 64 px tiles)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

import easel
from easel.pipelines.request import GenerationRequest
from easel.upscale import upscale_image
from easel.upscale.sd_upscale import sd_upscale

HERE = Path(__file__).resolve().parent
PROMPT = "a red circle on the left of a yellow square"


def main() -> None:
    pipe = easel.load()
    source = pipe.generate(GenerationRequest(PROMPT, seed=7, batch_size=1))[0].image
    sd, _ = sd_upscale(pipe, source, GenerationRequest(PROMPT, seed=7, denoising_strength=0.3), "lanczos", 2,
                       overlap=32)
    panels = [("64 px", source), ("nearest 2x", upscale_image(source, "nearest", 2)),
              ("lanczos 2x", upscale_image(source, "lanczos", 2)), ("SD upscale 2x", sd)]
    side = 256
    sheet = Image.new("RGB", (side * len(panels), side + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, im) in enumerate(panels):
        sheet.paste(im.resize((side, side), Image.NEAREST), (i * side, 20))  # NEAREST: show the pixels there are
        draw.text((i * side + 6, 4), label, fill="black")
    sheet.save(HERE / "upscale.png")
    print(HERE / "upscale.png")


if __name__ == "__main__":
    main()
