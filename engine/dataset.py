"""The one dataset model: what the Train tab's check, `/check_dataset`, `python -m studio dataset
check` and the trainer all use, so they agree on every file.

`plan_dataset(cfg)` scans each `[[directory]]` recursively (one extension list), reads captions
(precedence below), counts frames by decoding, and gives each file one bucket per resolution, or
a reason it is skipped. Captions, first match wins, so a diffusion-pipe folder trains the captions
diffusion-pipe would: `captions.json` in the file's folder (`{"name.png": ["caption", ...]}`; every
caption of the list is a sample), then `metadata.jsonl` in any folder above it (Hugging Face
imagefolder: `{"file_name": "sub/name.png", "text": "..."}`), then `name.txt` next to the file.
Frame buckets follow diffusion-pipe: a video gets the longest frame bucket it can fill, never the
image bucket 1; a shorter video is skipped with a warning naming it (`short_videos = "still"`
trains its first frame as an image instead).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.config_dataset import DatasetConfig, DirectoryConfig
from engine.media import error_reason, probe_video

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"})
MEDIA_EXTS = IMAGE_EXTS | VIDEO_EXTS
CAPTIONS_JSON, METADATA_JSONL = "captions.json", "metadata.jsonl"
# Wan: VAE stride 8 x patch 2. A check without a model uses it; the trainer asks the model family.
DEFAULT_SPATIAL_MULTIPLE = 16


class DatasetError(ValueError):
    """The dataset cannot be trained on (a folder missing, a link outside it, nothing trainable)."""


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class BucketSettings:
    """The bucket settings of one directory: its own overrides, else the dataset's."""
    resolutions: tuple[int, ...]
    ratios: tuple[float, ...]
    frame_buckets: tuple[int, ...]
    short_videos: str
    skip_empty_caption: bool


@dataclass
class MediaItem:
    path: Path
    name: str  # relative to its [[directory]] (what the check lists)
    captions: list[str]  # [""] when none was found
    caption_source: str | None  # "captions.json" | "metadata.jsonl" | ".txt" | None
    width: int
    height: int
    frames: int  # 1 for images
    is_video: bool
    num_repeats: int

    @property
    def caption(self) -> str:
        return self.captions[0]


@dataclass
class Entry:
    """One file of the preview: its buckets (one per resolution), or why it is skipped."""
    path: Path
    name: str
    item: MediaItem | None
    buckets: list[Bucket] = field(default_factory=list)
    skipped: str | None = None


@dataclass(frozen=True)
class PlannedSample:
    item: MediaItem
    bucket: Bucket
    caption: str


@dataclass
class DatasetPlan:
    entries: list[Entry]
    warnings: list[str]

    @property
    def samples(self) -> list[PlannedSample]:
        return [PlannedSample(e.item, b, c) for e in self.entries if e.item for b in e.buckets for c in e.item.captions]

    @property
    def skipped(self) -> list[Entry]:
        return [e for e in self.entries if e.skipped]

    def bucket_counts(self) -> Counter[Bucket]:
        """Samples per bucket in one epoch (repeats and every caption counted)."""
        return _count(self.samples)

    def steps_per_epoch(self, micro_batch_size: int, grad_accum: int = 1, world_size: int = 1) -> int:
        batches = sum(math.ceil(n / micro_batch_size) for n in self.bucket_counts().values())
        return max(1, math.ceil(batches / (world_size * grad_accum))) if batches else 0


def _count(samples: list[PlannedSample]) -> Counter[Bucket]:
    counts: Counter[Bucket] = Counter()
    for s in samples:
        counts[s.bucket] += s.item.num_repeats
    return counts


# ---- planning ------------------------------------------------------------------------------------


def plan_dataset(cfg: DatasetConfig, spatial_multiple: int = DEFAULT_SPATIAL_MULTIPLE) -> DatasetPlan:
    """Every media file of every [[directory]] with its buckets or the reason it is skipped."""
    if not cfg.directory:
        raise DatasetError("dataset.directory: no [[directory]] given")
    entries: list[Entry] = []
    captions = CaptionReader()
    for index, directory in enumerate(cfg.directory):
        settings = settings_for(directory, cfg)
        for path in find_media(Path(directory.path), f"dataset.directory[{index}]"):
            entries.append(_plan_file(path, Path(directory.path), directory.num_repeats, settings, spatial_multiple,
                                      captions))
    return DatasetPlan(entries, _warnings(entries))


def require_trainable(plan: DatasetPlan, where: str, micro_batch_size: int = 1) -> None:
    """Refuse a dataset without one trainable sample, or whose every bucket is smaller than one micro
    batch (each batch would hold fewer samples than asked), saying why, before anything is queued."""
    if plan.samples:
        largest = max(plan.bucket_counts().values())
        if micro_batch_size > largest:
            raise DatasetError(f"micro_batch_size_per_gpu = {micro_batch_size}, but the largest bucket of {where} "
                               f"holds {largest} sample(s) per epoch: lower it to at most {largest}")
        return
    reasons = Counter(e.skipped for e in plan.skipped)
    detail = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
    raise DatasetError(f"the dataset is empty: no trainable item, {len(plan.entries)} media files in {where}"
                       + (f" ({detail})" if detail else ""))


def settings_for(directory: DirectoryConfig, cfg: DatasetConfig) -> BucketSettings:
    def pick(name: str):  # noqa: ANN202 - the field's own type
        own = getattr(directory, name)
        return own if own is not None else getattr(cfg, name)

    if not pick("enable_ar_bucket"):
        ratios = [1.0]
    elif pick("ar_buckets"):
        ratios = list(pick("ar_buckets"))
    elif pick("num_ar_buckets") == 1:
        ratios = [math.sqrt(pick("min_ar") * pick("max_ar"))]
    else:
        lo, hi, n = math.log(pick("min_ar")), math.log(pick("max_ar")), pick("num_ar_buckets")
        ratios = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    return BucketSettings(tuple(pick("resolutions")), tuple(ratios), tuple(sorted(set(pick("frame_buckets")))),
                          pick("short_videos") or "skip", bool(pick("skip_empty_caption")))


def find_media(root: Path, key: str = "dataset.directory") -> list[Path]:
    """Media files under `root`, recursively, sorted; hidden files and folders (and macOS zip
    leftovers) skipped. A file that resolves outside `root` is refused."""
    if not root.is_dir():
        raise DatasetError(f"{key}.path: folder not found: {root}")
    top = root.resolve()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in MEDIA_EXTS:
                continue
            if not path.resolve().is_relative_to(top):
                raise DatasetError(f"{key}: {path.name} points outside the dataset folder ({path.resolve()}); "
                                   f"copy the file into {root} instead of linking it")
            found.append(path)
    return found


def _plan_file(path: Path, root: Path, repeats: int, settings: BucketSettings, multiple: int,
               caption_reader: "CaptionReader") -> Entry:
    name = path.relative_to(root).as_posix()
    try:
        width, height, frames, is_video = probe_media(path)
    except Exception as exc:  # any decoder failure: skip and name the file
        return Entry(path, name, None, skipped=f"unreadable: {error_reason(exc)}")
    captions, source = caption_reader.find(path, root)
    item = MediaItem(path, name, captions or [""], source, width, height, frames, is_video, repeats)
    if captions is None and settings.skip_empty_caption:
        return Entry(path, name, item, skipped="no caption (skip_empty_caption = true)")
    frames_to, reason = frame_bucket(frames, is_video, settings)
    if frames_to is None:
        return Entry(path, name, item, skipped=reason)
    ratio = math.log(width / height)
    buckets = []
    for resolution in settings.resolutions:
        sizes = bucket_sizes(resolution, settings.ratios, multiple)
        w, h = min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))
        buckets.append(Bucket(w, h, frames_to))
    return Entry(path, name, item, buckets)


def _warnings(entries: list[Entry]) -> list[str]:
    warnings = [f"skipped {e.path}: {e.skipped}" for e in entries if e.skipped]
    uncaptioned = [e.name for e in entries if e.item and not e.skipped and e.item.caption_source is None]
    if uncaptioned:
        more = f" and {len(uncaptioned) - 10} more" if len(uncaptioned) > 10 else ""
        warnings.append(f"{len(uncaptioned)} files have no caption (trained with an empty caption): "
                        f"{', '.join(uncaptioned[:10])}{more}")
    return warnings


# ---- one file: size, frames, captions, buckets ---------------------------------------------------


def probe_media(path: Path) -> tuple[int, int, int, bool]:
    """(width, height, frames, is_video). Frames are decoded and counted: a clip is cut from them."""
    if path.suffix.lower() in VIDEO_EXTS:
        info = probe_video(path)
        return info.width, info.height, info.frames, info.frames > 1
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # catches truncated/corrupt data without a full decode
    with Image.open(path) as img:
        return img.width, img.height, 1, False


def frame_bucket(frames: int, is_video: bool, settings: BucketSettings) -> tuple[int | None, str]:
    """(frame bucket, "") or (None, why it is skipped). Images (and 1-frame videos) take 1."""
    if not is_video:
        return 1, ""
    video_buckets = [b for b in settings.frame_buckets if b > 1]
    fitting = [b for b in video_buckets if b <= frames]
    if fitting:
        return max(fitting), ""
    if settings.short_videos == "still":
        return 1, ""
    listed = ", ".join(map(str, video_buckets)) or "none; frame_buckets has only 1"
    return None, (f"{frames} frames, shorter than every video frame bucket ({listed}); "
                  "set short_videos = \"still\" to train its first frame")


def bucket_sizes(resolution: int, ratios: tuple[float, ...], multiple: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution^2 pixels, one per aspect ratio."""
    sizes = []
    for ratio in ratios:
        width = _round_to(math.sqrt(resolution * resolution * ratio), multiple)
        height = _round_to(resolution * resolution / width, multiple)
        if (width, height) not in sizes:
            sizes.append((width, height))
    return sizes


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


class CaptionReader:
    """Finds a file's captions; reads each captions.json / metadata.jsonl once per scan."""

    def __init__(self) -> None:
        self._json: dict[Path, dict] = {}
        self._jsonl: dict[Path, dict[str, str]] = {}

    def find(self, path: Path, root: Path) -> tuple[list[str] | None, str | None]:
        """(captions, source) in the module's precedence; (None, None) when there is none."""
        listed = self._captions_json(path.parent / CAPTIONS_JSON).get(path.name)
        if listed is not None:
            captions = [listed.strip()] if isinstance(listed, str) else [str(c).strip() for c in listed]
            return (captions or None), CAPTIONS_JSON
        folder = path.parent
        while True:
            text = self._metadata(folder / METADATA_JSONL).get(path.relative_to(folder).as_posix())
            if text is not None:
                return [text], METADATA_JSONL
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
        txt = path.with_suffix(".txt")
        if txt.is_file():
            return [txt.read_text(encoding="utf-8", errors="replace").strip()], ".txt"
        return None, None

    def _captions_json(self, path: Path) -> dict:
        if path not in self._json:
            self._json[path] = _read_json(path)
        return self._json[path]

    def _metadata(self, path: Path) -> dict[str, str]:
        if path not in self._jsonl:
            self._jsonl[path] = _metadata_captions(path)
        return self._jsonl[path]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object of file name -> caption list")
    return data


def _metadata_captions(path: Path) -> dict[str, str]:
    """file_name -> caption of a Hugging Face imagefolder metadata.jsonl ("text" or "caption" column)."""
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DatasetError(f"{path}:{number}: not a JSON line") from None
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if isinstance(row, dict) and "file_name" in row and text is not None:
            captions[str(row["file_name"]).replace("\\", "/")] = str(text).strip()
    return captions
