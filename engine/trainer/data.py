"""Dataset scanning, aspect-ratio/frame buckets and media decoding.

Scanning is cheap and runs on every rank before any model work: it finds media, pairs captions,
probes sizes and frame counts, and assigns each (file, resolution) a bucket. Unreadable files are
skipped and listed; an empty dataset or a file resolving outside its directory is a DatasetError.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import DatasetConfig
from engine.media import error_reason, probe_video, read_video

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}


class DatasetError(ValueError):
    """The dataset cannot be trained on (empty, outside its root, ...)."""


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass
class MediaItem:
    path: Path
    caption: str
    caption_missing: bool
    width: int
    height: int
    frames: int  # 1 for images
    is_video: bool
    num_repeats: int
    content_hash: str = ""


@dataclass
class ScanResult:
    items: list[MediaItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)


# ---- scanning ------------------------------------------------------------------------------------


def scan_dataset(cfg: DatasetConfig) -> ScanResult:
    """Find and probe every media file; raise DatasetError when nothing usable is left."""
    result = ScanResult(items=[])
    if not cfg.directory:
        raise DatasetError("dataset.directory: no [[directory]] given")
    for index, directory in enumerate(cfg.directory):
        root = Path(directory.path)
        if not root.is_dir():
            raise DatasetError(f"dataset.directory[{index}].path: folder not found: {root}")
        root_resolved = root.resolve()
        for path in sorted(root.iterdir()):
            ext = path.suffix.lower()
            if ext not in IMAGE_EXTS and ext not in VIDEO_EXTS:
                continue
            resolved = path.resolve()
            if not resolved.is_relative_to(root_resolved):
                raise DatasetError(
                    f"dataset.directory[{index}]: {path.name} points outside the dataset folder "
                    f"({resolved}); copy the file into {root} instead of linking it"
                )
            item = _probe(path, ext in VIDEO_EXTS, directory.num_repeats, result)
            if item is not None:
                result.items.append(item)
    if not result.items:
        detail = f" ({len(result.skipped)} unreadable files skipped)" if result.skipped else ""
        folders = ", ".join(d.path for d in cfg.directory)
        raise DatasetError(f"the dataset is empty: no usable images or videos in {folders}{detail}")
    return result


def _probe(path: Path, is_video: bool, num_repeats: int, result: ScanResult) -> MediaItem | None:
    try:
        if is_video:
            info = probe_video(path)
            width, height, frames = info.width, info.height, info.frames
        else:
            width, height, frames = probe_image(path)
    except Exception as exc:  # any decoder failure means: skip and report this file
        reason = error_reason(exc)
        result.skipped.append((path, reason))
        logger.warning("skipping unreadable %s: %s", path, reason)
        return None
    caption_file = path.with_suffix(".txt")
    missing = not caption_file.is_file()
    caption = "" if missing else caption_file.read_text(encoding="utf-8", errors="replace").strip()
    if missing:
        result.missing_captions.append(path)
    return MediaItem(path=path, caption=caption, caption_missing=missing, width=width, height=height,
                     frames=frames, is_video=is_video, num_repeats=num_repeats, content_hash=file_hash(path))


def probe_image(path: Path) -> tuple[int, int, int]:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # catches truncated/corrupt data without a full decode
    with Image.open(path) as img:
        return img.width, img.height, 1


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- buckets -------------------------------------------------------------------------------------


def ar_buckets(resolution: int, cfg: DatasetConfig, multiple: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution^2 pixels, log-spaced aspect ratios."""
    if not cfg.enable_ar_bucket or cfg.num_ar_buckets == 1:
        ratios = [1.0] if not cfg.enable_ar_bucket else [math.sqrt(cfg.min_ar * cfg.max_ar)]
    else:
        lo, hi = math.log(cfg.min_ar), math.log(cfg.max_ar)
        ratios = [math.exp(lo + (hi - lo) * i / (cfg.num_ar_buckets - 1)) for i in range(cfg.num_ar_buckets)]
    sizes = []
    for ratio in ratios:
        width = _round_to(math.sqrt(resolution * resolution * ratio), multiple)
        height = _round_to(resolution * resolution / width, multiple)
        if (width, height) not in sizes:
            sizes.append((width, height))
    return sizes


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def frame_bucket(item: MediaItem, frame_buckets: list[int]) -> int | None:
    """Largest frame bucket the item can fill (images: 1). None when a video is too short for
    every bucket > 1 and 1 is not a bucket either."""
    if not item.is_video or item.frames == 1:
        return 1
    fitting = [f for f in frame_buckets if f <= item.frames]
    return max(fitting) if fitting else None


def assign_bucket(item: MediaItem, resolution: int, cfg: DatasetConfig, multiple: int) -> Bucket | None:
    frames = frame_bucket(item, cfg.frame_buckets)
    if frames is None:
        return None
    sizes = ar_buckets(resolution, cfg, multiple)
    ratio = math.log(item.width / item.height)
    width, height = min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))
    return Bucket(width, height, frames)


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
