"""Small videos (the demo's 64x64) are shown enlarged with repeated pixels; the generated file stays as made."""

import numpy as np
from PIL import Image

from engine.inference.export import DISPLAY_FILE, write_display_mp4, write_mp4, write_poster
from engine.media import display_scale, probe_video, read_video, upscale_nearest


def test_scale_brings_small_videos_to_a_readable_size_and_leaves_big_ones():
    assert display_scale(64, 64) == 4
    assert display_scale(100, 64) == 4
    assert display_scale(832, 480) == 1


def test_nearest_upscale_repeats_pixels_without_new_colors():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 4, 6, 3), dtype=np.uint8)
    big = upscale_nearest(frames, 4)
    assert big.shape == (3, 16, 24, 3)
    assert np.array_equal(big[:, ::4, ::4], frames) and np.array_equal(big[:, 3::4, 3::4], frames)
    assert upscale_nearest(frames, 1) is frames


def test_small_video_gets_an_enlarged_display_copy_and_keeps_its_original(tmp_path):
    frames = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    frames[:, 16:32, 16:32] = (225, 35, 35)
    write_mp4(frames, tmp_path / "video.mp4", fps=16)
    display = write_display_mp4(frames, tmp_path, fps=16)
    assert display == tmp_path / DISPLAY_FILE
    assert (probe_video(tmp_path / "video.mp4").width, probe_video(display).width) == (64, 256)
    shown = read_video(display)[2]
    # A crisp edge: one pixel inside the square is red, one outside is black (no smooth ramp).
    assert shown[64 + 8, 64 + 1, 0] > 200 and shown[64 + 8, 64 - 2, 0] < 30
    write_poster(frames[2], tmp_path / "poster.png")
    assert Image.open(tmp_path / "poster.png").size == (256, 256)
    assert write_display_mp4(np.zeros((5, 480, 832, 3), dtype=np.uint8), tmp_path / "big", fps=16) is None
