"""engine.media: the one place videos are probed, read and written."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.media import MediaError, probe_video, read_video, write_video


def gradient_clip(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth colours that shift each frame: H.264 at low CRF keeps them within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        clip[t, ..., 0] = (x * 4 + t * 10) % 256
        clip[t, ..., 1] = y * 5
        clip[t, ..., 2] = 128 + t * 8
    return clip


def test_round_trip_probe_and_window(tmp_path: Path) -> None:
    clip = gradient_clip()
    path = write_video(clip, tmp_path / "clip.mp4", fps=8, crf=12)
    assert path == tmp_path / "clip.mp4" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp left
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (9, 64, 48)
    assert (info.codec, info.pix_fmt, info.fps) == ("h264", "yuv420p", 8.0)
    assert probe_video(path, exact_frames=False).frames == 9
    frames = read_video(path)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clip).mean() < 4
    window = read_video(path, start=3, count=4)
    assert np.array_equal(window, frames[3:7])  # decoded in order: the same pixels as a full read
    with pytest.raises(MediaError, match="decoded 2 frames, expected 4 from frame 7"):
        read_video(path, start=7, count=4)


def test_faststart_puts_the_index_first_and_odd_sizes_are_refused(tmp_path: Path) -> None:
    clip = gradient_clip(frames=3)
    fast = write_video(clip, tmp_path / "fast.mp4", fps=8, crf=17).read_bytes()
    slow = write_video(clip, tmp_path / "slow.mp4", fps=8, crf=17, threads=1, faststart=False).read_bytes()
    assert fast.index(b"moov") < fast.index(b"mdat") and slow.index(b"mdat") < slow.index(b"moov")
    with pytest.raises(ValueError, match="even H and W"):
        write_video(gradient_clip(frames=2, width=63), tmp_path / "odd.mp4", fps=8, crf=17)
    assert not (tmp_path / "odd.mp4").exists()


def test_a_file_that_is_not_a_video_is_one_clear_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("hello, not a video\n")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    for path in (text, broken):
        for read in (probe_video, read_video):
            with pytest.raises(MediaError) as caught:
                read(path)
            message = str(caught.value)
            assert "\n" not in message and len(message) < 250 and "ffmpeg version" not in message
            assert message.startswith(f"{path.name}: cannot read video: ") and "moov atom not found" in message
            assert caught.value.reason == message.split(": ", 1)[1]


def test_gif_frames_come_from_pil(tmp_path: Path) -> None:
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    images = [Image.new("RGB", (20, 10), c) for c in colours]
    # GIF delays are in 1/100 s: 100 ms is exactly 10 fps.
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100)
    info = probe_video(tmp_path / "a.gif")
    assert (info.frames, info.width, info.height, info.codec, info.fps) == (3, 20, 10, "gif", 10.0)
    frames = read_video(tmp_path / "a.gif", start=1, count=2)
    assert frames.shape == (2, 10, 20, 3) and tuple(frames[1, 0, 0]) == colours[2]
