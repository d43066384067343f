"""A user's training images and captions: a folder, `metadata.jsonl` or a CSV -> bucketed, reproducible batches.

Conventions read (the ones kohya-ss sd-scripts, A1111 and the diffusers examples use):
- sidecar captions: `cat.png` + `cat.txt` (or `cat.caption`) in the folder or its sub-folders;
- kohya repeat folders: `DATA/10_mydog/*.png` shows every image of that folder 10 times per epoch;
- `metadata.jsonl` (HF imagefolder): one `{"file_name": ..., "text": ...}` object per line;
- a CSV (DATA itself, or `metadata.csv` in DATA) with a `file_name`/`image` and a `text`/`caption` column.

Aspect-ratio bucketing (NovelAI's, as kohya): buckets of about the model's native area with sides in multiples of
64; each image goes to the bucket nearest its aspect ratio, is scaled to cover it and cropped (centre, or random
with `random_crop`), never stretched. A batch holds images of one bucket. A model whose native side is under 128
(the built-in 64-px model) has one bucket, its native square.

Every random choice of a step (batch order, crop, flip, caption dropout, tag order) comes from generators seeded
by (seed, step), so a resumed run sees the same batches (easel.training.common's rule).
"""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from easel.training.settings import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: `10_mydog` = 10 repeats
FILE_COLUMNS = ("file_name", "image", "file", "path")
TEXT_COLUMNS = ("text", "caption", "prompt")


class DatasetError(TrainingError):
    """The data cannot be used as given; the message names the file and the fix."""


@dataclass(frozen=True)
class DataOptions:
    """How images become training samples (the `--...` data flags)."""

    resolution: int  # the model's native side in pixels
    bucket_step: int = 64
    max_ratio: float = 2.0  # longest / shortest bucket side
    min_size: int | None = None  # shortest image side accepted (default: half the resolution)
    random_crop: bool = False
    flip: bool = False  # off by default: captions may say left and right
    caption_dropout: float = 0.0  # probability of training a sample with the empty caption
    shuffle_tags: bool = False  # shuffle comma-separated tags ...
    keep_tags: int = 0  # ... except the first N
    on_bad: str = "skip"  # "skip" | "error" for unreadable images, missing captions, too-small images

    def check(self) -> None:
        """DatasetError naming the flag when an option is out of range."""
        if self.on_bad not in ("skip", "error"):
            raise DatasetError(f"--on-bad must be 'skip' or 'error' (got {self.on_bad!r})")
        if not 0 <= self.caption_dropout < 1:
            raise DatasetError(f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})")
        if self.keep_tags < 0 or self.resolution < 8:
            raise DatasetError(f"--keep-tags must be >= 0 and the resolution >= 8 "
                               f"(got {self.keep_tags}, {self.resolution})")


@dataclass(frozen=True)
class Item:
    """One usable image: where it is, its caption, how often an epoch shows it, its size and bucket."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (w, h) of the file
    bucket: tuple[int, int]  # (w, h) it is trained at
    group: str  # the folder (or listing) it came from


# --- finding the images ---------------------------------------------------------------------------------------

def list_entries(data: Path) -> list[tuple[Path, str | None, int, str]]:
    """(image path, caption or None for 'read the sidecar', repeats, group) for everything DATA names."""
    if not data.exists():
        raise DatasetError(f"training data {data} does not exist: pass a folder of images with .txt captions, "
                           "a folder with metadata.jsonl, or a CSV file")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DatasetError(f"{data} is a file but not a CSV: pass a folder of images, or a CSV listing them")
        return _from_csv(data)
    if (data / "metadata.jsonl").is_file():
        return _from_jsonl(data / "metadata.jsonl")
    if (data / "metadata.csv").is_file():
        return _from_csv(data / "metadata.csv")
    return _from_folders(data)


def _from_folders(root: Path) -> list[tuple[Path, None, int, str]]:
    out = [(p, None, 1, root.name) for p in sorted(root.iterdir()) if _is_image(p)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = REPEAT_FOLDER.match(sub.name)
        repeats = int(m.group(1)) if m else 1
        out += [(p, None, repeats, sub.name) for p in sorted(sub.rglob("*")) if _is_image(p)]
    return out


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _from_jsonl(path: Path) -> list[tuple[Path, str, int, str]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DatasetError(f"{path}:{n} is not a JSON object: write one "
                               '{"file_name": ..., "text": ...} per line') from None
        out.append(_row(row, path, n))
    return out


def _from_csv(path: Path) -> list[tuple[Path, str, int, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [_row(row, path, n) for n, row in enumerate(rows, 2)]


def _row(row: dict, listing: Path, line: int) -> tuple[Path, str, int, str]:
    """One listing row -> (path relative to the listing's folder, caption, 1, listing name)."""
    name = next((row[k] for k in FILE_COLUMNS if isinstance(row, dict) and row.get(k)), None)
    text = next((row[k] for k in TEXT_COLUMNS if isinstance(row, dict) and k in row), None)
    if name is None or text is None:
        raise DatasetError(f"{listing}:{line} needs a file column ({'/'.join(FILE_COLUMNS)}) and a caption column "
                           f"({'/'.join(TEXT_COLUMNS)}); found {sorted(row) if isinstance(row, dict) else row!r}")
    return listing.parent / str(name), str(text), 1, listing.name


def read_caption(image: Path) -> str | None:
    """The sidecar caption of an image (`stem.txt`, else `stem.caption`), or None."""
    for suffix in CAPTION_SUFFIXES:
        p = image.with_suffix(suffix)
        if p.is_file():
            return " ".join(p.read_text(encoding="utf-8", errors="replace").split())
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(w, h) after EXIF rotation; decodes the whole file so that a truncated one fails here, not mid-training."""
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --- buckets --------------------------------------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets of at most resolution^2 pixels, sides multiples of `step`, ratio within `max_ratio`."""
    if resolution < 2 * step:
        return [(resolution, resolution)]  # a small model (the built-in 64 px): its native square only
    area, out = resolution * resolution, set()
    longest = int(resolution * math.sqrt(max_ratio)) // step * step
    for w in range(step, longest + 1, step):
        h = min(area // w // step * step, longest)
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            out |= {(w, h), (h, w)}
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio; ties: the larger area)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of an image of `size` scaled, aspect ratio kept, to just cover the bucket."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def centre_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop of the bucket from an image of `size` (SDXL's crop conditioning)."""
    w, h = cover_size(size, bucket)
    return (h - bucket[1]) // 2, (w - bucket[0]) // 2


def fit_to_bucket(im: Image.Image, bucket: tuple[int, int], gen: torch.Generator | None,
                  random_crop: bool) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover the bucket keeping the aspect ratio, then crop to it: (image, (top, left) of the crop)."""
    bw, bh = bucket
    w, h = cover_size(im.size, bucket)
    im = im.resize((w, h), Image.Resampling.LANCZOS) if (w, h) != im.size else im
    if random_crop and gen is not None:
        left = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
    else:
        top, left = centre_crop(im.size, bucket)
    return im.crop((left, top, left + bw, top + bh)), (top, left)


# --- captions -------------------------------------------------------------------------------------------------

def process_caption(caption: str, gen: torch.Generator, opts: DataOptions) -> str:
    """Caption dropout (-> ''), then tag shuffling with the first `keep_tags` tags kept in place."""
    if opts.caption_dropout and float(torch.rand((), generator=gen)) < opts.caption_dropout:
        return ""
    if not opts.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep, rest = tags[:opts.keep_tags], tags[opts.keep_tags:]
    order = torch.randperm(len(rest), generator=gen).tolist()
    return ", ".join(keep + [rest[i] for i in order])


# --- the dataset ----------------------------------------------------------------------------------------------

class UserDataset:
    """The usable items of DATA, their buckets, and the batch of any step."""

    def __init__(self, data: str | Path, opts: DataOptions, log=None):
        opts.check()
        self.root, self.opts = Path(data), opts
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.buckets = make_buckets(opts.resolution, opts.bucket_step, opts.max_ratio)
        self.problems: list[str] = []
        self.items = self._scan()
        if not self.items:
            raise DatasetError(f"no usable images in {self.root}" + (f" ({len(self.problems)} skipped)"
                               if self.problems else "") + ": add .png/.jpg/.webp images with .txt captions")
        self._epochs: dict[int, list[list[int]]] = {}

    def _scan(self) -> list[Item]:
        min_side = self.opts.min_size or max(1, self.opts.resolution // 2)
        items = []
        for path, caption, repeats, group in list_entries(self.root):
            problem = ""
            if caption is None:
                caption = read_caption(path)
                if caption is None:
                    problem = (f"missing caption: {path} has no {path.stem}.txt beside it "
                               "(write one, or remove the image)")
            if not problem:
                try:
                    size = image_size(path)
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                    problem = f"unreadable image: {path} ({str(e).strip()[:120]}); replace or remove it"
                else:
                    if min(size) < min_side:
                        problem = (f"too small: {path} is {size[0]}x{size[1]}, shorter side under {min_side} px "
                                   "(use a larger image, or lower --min-size)")
            if problem:
                self._bad(problem)
                continue
            items.append(Item(path, caption, repeats, size, nearest_bucket(size, self.buckets), group))
        return items

    def _bad(self, line: str) -> None:
        if self.opts.on_bad == "error":
            raise DatasetError(line + " [--on-bad skip would skip it]")
        self.problems.append(line)
        self.log(f"skipping {line}")

    # batches
    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The epoch's batches (item indices, one bucket each, repeats expanded) in a seeded random order."""
        key = (epoch, batch_size, seed)
        if key not in self._epochs:
            gen = torch.Generator().manual_seed(seed * 7919 + epoch)
            shown = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
            by_bucket: dict[tuple, list[int]] = defaultdict(list)
            for k in torch.randperm(len(shown), generator=gen).tolist():
                by_bucket[self.items[shown[k]].bucket].append(shown[k])
            batches = [idx[j:j + batch_size] for b in sorted(by_bucket) for idx in [by_bucket[b]]
                       for j in range(0, len(idx), batch_size)]
            order = torch.randperm(len(batches), generator=gen).tolist()
            self._epochs = {key: [batches[k] for k in order]}  # one epoch kept: memory stays flat
        return self._epochs[key]

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch (the same every epoch: it depends on the bucket counts only)."""
        counts = Counter()
        for it in self.items:
            counts[it.bucket] += it.repeats
        return sum(math.ceil(n / batch_size) for n in counts.values())

    def batch_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Item indices of the batch of `step`."""
        per = self.batches_per_epoch(batch_size)
        return self.epoch_batches(step // per, batch_size, seed)[step % per]

    def pixels(self, index: int, gen: torch.Generator | None, flip: bool = False) -> tuple[torch.Tensor, tuple]:
        """Item `index` as (3, h, w) in [-1, 1] at its bucket, and SDXL's (orig h, w, crop top, left)."""
        it = self.items[index]
        with Image.open(it.path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        im, (top, left) = fit_to_bucket(im, it.bucket, gen, self.opts.random_crop)
        if flip:
            im = ImageOps.mirror(im)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
        return x.permute(2, 0, 1).float() / 127.5 - 1, (it.size[1], it.size[0], top, left)

    def describe(self, tokenizer=None) -> list[str]:
        """The `--dry-run` report: counts, repeats, buckets, caption lengths and tokens past 75."""
        shown = sum(it.repeats for it in self.items)
        lines = [f"{len(self.items)} images ({shown} samples per epoch with repeats), {len(self.problems)} skipped"]
        groups = Counter()
        for it in self.items:
            groups[(it.group, it.repeats)] += 1
        lines += [f"  {g}: {n} images x {r} repeats" for (g, r), n in sorted(groups.items())]
        buckets = Counter(it.bucket for it in self.items)
        lines.append("buckets (w x h: images): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())))
        words = sorted(len(it.caption.split()) for it in self.items)
        lines.append(f"caption words: min {words[0]}, median {words[len(words) // 2]}, max {words[-1]}; "
                     f"{sum(1 for it in self.items if not it.caption)} empty")
        if tokenizer is not None:
            counts = [(len(tokenizer.encode(it.caption)), it) for it in self.items]
            long = [(n, it) for n, it in counts if n > 75]
            lines.append(f"caption tokens: max {max(n for n, _ in counts)}; {len(long)} past 75 (the rest is cut)")
            lines += [f"  {n} tokens: {it.path.name}: ...{tokenizer.decode(tokenizer.encode(it.caption)[75:])!r}"
                      for n, it in long[:5]]
        return lines

    def contact_sheet(self, path: Path, cell: int = 160, limit: int = 64) -> Path:
        """A grid of the first `limit` training crops (scaled to the cell) with bucket and caption under each."""
        import textwrap

        from easel.files import save_image
        count = min(limit, len(self.items))
        cols, text_h = min(8, count), 40
        sheet = Image.new("RGB", (cols * cell, math.ceil(count / cols) * (cell + text_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for k in range(count):
            x = ((self.pixels(k, None)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
            thumb = Image.fromarray(x)
            scale = (cell - 4) / max(thumb.size)
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS  # small images: sharp
            thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))), resample)
            ox, oy = (k % cols) * cell, (k // cols) * (cell + text_h)
            sheet.paste(thumb, (ox + (cell - thumb.width) // 2, oy + (cell - thumb.height) // 2))
            it = self.items[k]
            lines = [f"{it.bucket[0]}x{it.bucket[1]}"] + textwrap.wrap(it.caption or "(empty caption)", cell // 6)[:2]
            for n, line in enumerate(lines):
                draw.text((ox + 2, oy + cell + 12 * n), line, fill="black" if n else (90, 90, 90))
        return save_image(sheet, path)
