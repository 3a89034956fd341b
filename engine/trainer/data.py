"""Decoding a planned sample into the pixels its bucket asks for.

What the dataset holds and which bucket each file takes is `engine.dataset` (shared with the
studio's check); this module only turns a file into a [3, F, H, W] tensor for the latent cache.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.dataset import Bucket, MediaItem
from engine.media import read_video


# ---- decoding ------------------------------------------------------------------------------------


def load_pixels(item: MediaItem, bucket: Bucket, clip_mode: str) -> torch.Tensor:
    """Decode, cover-resize and centre-crop to the bucket: [3, F, H, W] float in [-1, 1]."""
    frames = _read_frames(item, bucket.frames, clip_mode)
    out = np.stack([_cover_crop(f, bucket.width, bucket.height) for f in frames])  # F, H, W, 3
    tensor = torch.from_numpy(out).float().div_(127.5).sub_(1.0)
    return tensor.permute(3, 0, 1, 2).contiguous()


def _read_frames(item: MediaItem, count: int, clip_mode: str) -> list[np.ndarray] | np.ndarray:
    from PIL import Image

    if not item.is_video:
        with Image.open(item.path) as img:
            return [np.asarray(img.convert("RGB"))]
    start = 0 if clip_mode == "single_beginning" else max(0, (item.frames - count) // 2)
    return read_video(item.path, start, count)


def _cover_crop(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(frame)
    scale = max(width / img.width, height / img.height)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))
