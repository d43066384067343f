"""model.png: the UNet drawn as a U from the loaded weights: every block a box at the resolution it works at (down the left,
the middle at the bottom, up the right), its height by channels, orange where it holds cross-attention (where
the prompt enters), the skip connections, and bars of parameters and FLOPs per block."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from easel.inspect import draw

XATTN = (245, 140, 40)
PLAIN = (150, 165, 185)
BOX_W, GAP, ROW_H, LEFT = 46, 10, 120, 20


def _res(block: dict) -> int:
    """The resolution the block works at (its input's longer side: a down- or upsampling block is drawn where it
    starts), or 0 for the embeddings."""
    shape = block.get("input") or []
    return max(shape[-2:]) if len(shape) == 4 else 0


def _level_rows(blocks: list[dict]) -> dict[int, int]:
    """Resolution -> row (0 for the finest)."""
    return {r: i for i, r in enumerate(sorted({_res(b) for b in blocks if _res(b)}, reverse=True))}


def _label(d: ImageDraw.ImageDraw, x: int, y: int, text: str, size: int = 10, fill=draw.INK) -> None:
    d.text((x, y), text, fill=fill, font=draw.font(size))


def model_figure(info: dict) -> Image.Image:
    """The U-shaped block diagram of `describe()`'s data, with per-block parameter and FLOP bars below."""
    blocks = [b for b in info["unet_blocks"] if _res(b)]
    rows = _level_rows(blocks)
    top_ch = max(int(b["output"][1]) for b in blocks)
    width = LEFT * 2 + len(blocks) * (BOX_W + GAP)
    u_h = 60 + len(rows) * ROW_H
    bars_h = 170
    img = Image.new("RGB", (max(width, 760), u_h + bars_h + 40), draw.BACKGROUND)
    d = ImageDraw.Draw(img)
    size = "x".join(str(s) for s in info["size"])
    _label(d, 10, 8, f"{info['model']}: UNet at {size} px, {draw_num(info['unet_flops'])}FLOPs per call; "
           f"cross-attention (orange) at {', '.join(info['cross_attention_at']) or 'no level'}", 15)
    centres = []
    for i, b in enumerate(blocks):
        x = LEFT + i * (BOX_W + GAP)
        row = rows[_res(b)]
        h = 24 + 70 * math.log2(1 + int(b["output"][1])) / math.log2(1 + top_ch)
        y = 50 + row * ROW_H + (ROW_H - h) / 2
        d.rectangle([x, y, x + BOX_W, y + h], fill=XATTN if b["cross_attention"] else PLAIN, outline=draw.INK)
        _label(d, x + 3, y + 3, b["block"].replace("input_blocks.", "in ").replace("output_blocks.", "out ")
               .replace("middle_block", "mid"))
        _label(d, x + 3, y + h - 14, f"{b['output'][1]} ch")
        centres.append((x + BOX_W / 2, y, y + h))
    for row_res, row in rows.items():
        _label(d, 2, 50 + row * ROW_H + ROW_H // 2 - 6, f"{row_res}x{row_res}", 10, (90, 90, 90))
    _skips(d, blocks, centres)
    _bars(d, blocks, u_h + 20, bars_h)
    return img


def _skips(d: ImageDraw.ImageDraw, blocks: list[dict], centres: list[tuple[float, float, float]]) -> None:
    """Grey arcs from each down block to the up block that concatenates its output (SD's skip connections)."""
    downs = [i for i, b in enumerate(blocks) if b["kind"] == "down"]
    ups = [i for i, b in enumerate(blocks) if b["kind"] == "up"]
    for k, (a, b) in enumerate(zip(downs, reversed(ups))):
        (xa, ya, _), (xb, yb, _) = centres[a], centres[b]
        top = min(ya, yb) - 6 - 5 * (k % 3)  # nested arcs at different heights stay apart
        d.line([(xa, ya), (xa, top), (xb, top), (xb, yb)], fill=(185, 185, 185), width=1)


def _bars(d: ImageDraw.ImageDraw, blocks: list[dict], y0: int, h: int) -> None:
    """Two bar rows: parameters and FLOPs per block, each scaled to its largest block."""
    for k, (key, name) in enumerate((("params", "parameters"), ("flops", "FLOPs per call"))):
        top = y0 + k * (h // 2)
        peak = max(b[key] for b in blocks) or 1
        _label(d, LEFT, top, f"{name} per block (largest {draw_num(peak)})", 11)
        for i, b in enumerate(blocks):
            x = LEFT + i * (BOX_W + GAP)
            bar = (h // 2 - 28) * b[key] / peak
            base = top + h // 2 - 8
            d.rectangle([x + 8, base - bar, x + BOX_W - 8, base], fill=XATTN if b["cross_attention"] else PLAIN)


def draw_num(n: float) -> str:
    """A count with a unit (1.23 G, 45.6 M)."""
    from easel.inspect.model import _num
    return _num(n)
