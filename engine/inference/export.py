"""Video, poster and sidecar files of one generated video.

The mp4 (written by engine.media) keeps the generated pixels. A video smaller than
`engine.media.DISPLAY_MIN_SIDE` also gets `display.mp4`, enlarged with nearest-neighbour (browsers scale
small videos smoothly, which blurs a 64x64 clip's shapes), and its poster is enlarged the same way.
Every mp4 is H.264 in yuv420p with the moov atom first (`+faststart`): every
browser plays it and Gradio's `gr.Video` serves it without transcoding. Files are written under a
temporary name and renamed, so a crash never leaves a half-written file behind a gallery record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.media import display_scale, upscale_nearest, write_video

__all__ = ["VIDEO_FILE", "DISPLAY_FILE", "POSTER_FILE", "META_FILE", "START_IMAGE_STEM", "to_uint8", "frames_digest", "write_mp4",
           "write_display_mp4", "write_poster", "write_json"]

VIDEO_FILE = "video.mp4"
DISPLAY_FILE = "display.mp4"  # only for small videos: the same frames, enlarged for the browser
POSTER_FILE = "poster.png"
META_FILE = "meta.json"
START_IMAGE_STEM = "start_image"  # + the image's own suffix: the start image of an image-to-video generation
CRF = 17  # visually lossless for these clips, a few MB per 81-frame 480p video


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (F, H, W, 3) -> contiguous uint8 frames."""
    return np.ascontiguousarray(np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8))


def frames_digest(frames: np.ndarray) -> str:
    """sha256 of the raw uint8 frames: equal digests mean identical pixels before encoding."""
    digest = hashlib.sha256()
    digest.update(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Encode uint8 frames (F, H, W, 3) as the gallery's H.264/yuv420p mp4; width and height must be even."""
    return write_video(frames, path, fps, crf=CRF, preset="medium", faststart=True)


def write_display_mp4(frames: np.ndarray, folder: str | Path, fps: int) -> Path | None:
    """`display.mp4` beside a small video (nearest-neighbour enlarged); None when the video is big enough."""
    factor = display_scale(frames.shape[2], frames.shape[1])
    if factor == 1:
        return None
    return write_mp4(upscale_nearest(frames, factor), Path(folder) / DISPLAY_FILE, fps)


def write_poster(frame: np.ndarray, path: str | Path) -> Path:
    """A PNG of one frame for display: small frames enlarged with nearest-neighbour, like display.mp4."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(upscale_nearest(frame, display_scale(frame.shape[1], frame.shape[0]))).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path
