"""Animations as files: GIF and WebP always, MP4 with PyAV; frames, durations, atomic writes, clear errors."""
from __future__ import annotations

import pytest
from PIL import Image

from easel.animation import check_format, has_video_encoder, save_animation


def frames(n: int = 4, size=(33, 21)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)) for i in range(n)]


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_hold_every_frame_and_loop(tmp_path, fmt):
    path = save_animation(frames(), tmp_path / f"a.{fmt}", ms=120)
    with Image.open(path) as im:
        assert im.n_frames == 4 and im.is_animated and im.size == (33, 21)
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info.get("duration"))
        im.seek(0)
        assert im.convert("RGB").getpixel((5, 5)) == (0, 200, 90)  # WebP is written lossless
    if fmt == "gif":  # (Pillow's WebP reader does not report per-frame durations)
        assert durations == [120, 120, 120, 360]  # the last frame held three times as long
    assert [p.name for p in tmp_path.iterdir()] == [f"a.{fmt}"]  # no temp file left


@pytest.mark.skipif(not has_video_encoder(), reason="PyAV is not installed (pip install av)")
def test_mp4_has_every_frame_at_even_size(tmp_path):
    import av
    path = save_animation(frames(5), tmp_path / "a.mp4", ms=100, hold_last=2)
    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        decoded = list(box.decode(stream))
    assert len(decoded) == 6 and (stream.width, stream.height) == (34, 22)
    assert decoded[0].to_image().getpixel((5, 5))[1] > 150  # the first frame's green, through lossy YUV


def test_unknown_formats_and_empty_animations_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="choose one of gif, webp, mp4"):
        check_format("avi")
    with pytest.raises(ValueError, match="no frames"):
        save_animation([], tmp_path / "a.gif")
    monkeypatch.setattr("easel.animation.has_video_encoder", lambda: False)
    with pytest.raises(ValueError, match="pip install av"):
        save_animation(frames(), tmp_path / "a.mp4")
    assert not list(tmp_path.iterdir())
