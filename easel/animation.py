"""Animations as files: GIF and WebP always (Pillow), MP4 where PyAV is installed (`pip install av`).

One writer for every animated output (the inspect film strips and attention maps; prompt travel and motion
later), picked by the file's suffix and written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from easel.files import atomic_path

FORMATS = ("gif", "webp", "mp4")


def check_format(name: str) -> str:
    """A format name from FORMATS (case-insensitive), with an error listing the choices."""
    fmt = name.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown animation format {name!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "mp4" and not has_video_encoder():
        raise ValueError("MP4 needs PyAV: `pip install av` (or choose gif or webp, which need nothing)")
    return fmt


def has_video_encoder() -> bool:
    """Whether PyAV (FFmpeg's encoders) can be imported."""
    import importlib.util
    return importlib.util.find_spec("av") is not None


def save_animation(frames: list[Image.Image], path: str | os.PathLike, ms: int = 250, hold_last: int = 3) -> Path:
    """Write frames as an endlessly looping animation (the last frame held `hold_last` times as long); the format
    comes from the suffix (.gif, .webp, .mp4)."""
    path = Path(path)
    fmt = check_format(path.suffix or "gif")
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    frames = [f.convert("RGB") for f in frames]
    with atomic_path(path) as tmp:
        if fmt == "mp4":
            _write_mp4(frames, tmp, ms, hold_last)
        else:
            durations = [ms] * (len(frames) - 1) + [ms * hold_last]
            extra = {"lossless": True} if fmt == "webp" else {}
            frames[0].save(tmp, format=fmt.upper(), save_all=True, append_images=frames[1:], duration=durations,
                           loop=0, **extra)
    return path


def _write_mp4(frames: list[Image.Image], path: Path, ms: int, hold_last: int) -> None:
    """H.264 (MPEG-4 part 2 where libx264 is missing) at 1000/ms frames per second, sizes padded to even."""
    import av
    w, h = frames[0].size
    even = (w + w % 2, h + h % 2)  # yuv420p needs even sides
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w", format="mp4") as box:
        stream = box.add_stream(codec, rate=max(1, round(1000 / ms)))
        stream.width, stream.height, stream.pix_fmt = even[0], even[1], "yuv420p"
        for frame in frames + [frames[-1]] * (hold_last - 1):
            canvas = Image.new("RGB", even, (255, 255, 255))
            canvas.paste(frame.resize((w, h)) if frame.size != (w, h) else frame, (0, 0))
            box.mux(stream.encode(av.VideoFrame.from_image(canvas)))
        box.mux(stream.encode(None))  # flush the encoder
