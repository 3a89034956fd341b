"""Video, poster and sidecar files of one generated video.

The mp4 is H.264 in yuv420p with the moov atom first (`+faststart`): every browser plays it and
Gradio's `gr.Video` serves it without transcoding. Files are written under a temporary name and
renamed, so a crash never leaves a half-written video behind a gallery record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VIDEO_FILE", "POSTER_FILE", "META_FILE", "to_uint8", "frames_digest", "write_mp4", "write_poster",
           "write_json", "read_mp4_frames", "probe_mp4"]

VIDEO_FILE = "video.mp4"
POSTER_FILE = "poster.png"
META_FILE = "meta.json"
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
    """Encode uint8 frames (F, H, W, 3) as H.264/yuv420p mp4; width and height must be even."""
    import imageio_ffmpeg

    path = Path(path)
    num_frames, height, width, channels = frames.shape
    if channels != 3 or height % 2 or width % 2:
        raise ValueError(f"frames must be (F, H, W, 3) with even H and W for yuv420p, got {frames.shape}")
    tmp = path.with_name(path.name + ".tmp.mp4")
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (width, height), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps, codec="libx264",
        quality=None, macro_block_size=2, ffmpeg_log_level="error",
        output_params=["-crf", str(CRF), "-preset", "medium", "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    tmp.replace(path)
    return path


def write_poster(frame: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(frame).save(tmp, format="PNG")
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


def read_mp4_frames(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an mp4 into uint8 frames (F, H, W, 3) plus ffmpeg's metadata (codec, fps, size)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta


def probe_mp4(path: str | Path) -> dict[str, Any]:
    """Codec, pixel format, size, fps and frame count of an mp4 (decodes it: for tests and checks)."""
    frames, meta = read_mp4_frames(path)
    codec = str(meta.get("codec", ""))
    return {"codec": codec, "pix_fmt": str(meta.get("pix_fmt", "")), "width": frames.shape[2],
            "height": frames.shape[1], "num_frames": frames.shape[0], "fps": meta.get("fps")}
