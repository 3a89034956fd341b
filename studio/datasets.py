"""Dataset helpers for the Train tab, the API and the CLI: confined folders, safe uploads and zips,
and the dataset preview (`engine.dataset`'s plan, the one the trainer follows, as rows and JSON).

A dataset is a folder of images/videos with captions (engine.dataset says where captions come from).
Every path a user types is resolved and must lie under one of the allowed roots; uploads land in the
user's own folder under `uploads/<user>/datasets/<name>`; zip entries that would escape it are refused.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import stat
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from engine.config import ConfigError, DatasetConfig, DirectoryConfig, TrainConfig
from engine.dataset import (CAPTIONS_JSON, IMAGE_EXTS, MEDIA_EXTS, METADATA_JSONL, CaptionReader, DatasetError,
                            DatasetPlan, plan_dataset)
from engine.media import read_video
from engine.paths import safe_name

log = logging.getLogger(__name__)

__all__ = ["DatasetError", "MEDIA_EXTS", "confine", "dataset_target", "preview", "save_caption", "thumbnail"]
MAX_ZIP_ENTRIES = 20_000
CAPTION_FILES = {CAPTIONS_JSON, METADATA_JSONL}


def confine(path: str | Path, roots: tuple[Path, ...]) -> Path:
    """The resolved folder, if it lies under one of `roots`; DatasetError otherwise."""
    text = str(path).strip()
    if not text:
        raise DatasetError("no dataset folder given")
    resolved = Path(text).expanduser().resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            if not resolved.is_dir():
                raise DatasetError(f"{text}: not an existing folder")
            return resolved
    # The roots are not named: they include the data directory, which users are not shown.
    raise DatasetError(f"{text}: outside the allowed dataset folders (your uploads, the studio's datasets "
                       "and the shared folders set by --allowed-roots)")


def list_dataset_folders(roots: tuple[Path, ...], max_depth: int = 2, limit: int = 200) -> list[str]:
    """Folders under the roots that hold at least one media file (for the folder picker)."""
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        stack = [(root, 0)]
        while stack and len(found) < limit:
            folder, depth = stack.pop()
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            if any(c.suffix.lower() in MEDIA_EXTS and c.is_file() for c in children):
                found.append(str(folder))
            if depth < max_depth:
                stack.extend((c, depth + 1) for c in reversed(children) if c.is_dir() and not c.name.startswith("."))
    return found


def safe_extract_zip(archive: Path, dest: Path, max_bytes: int) -> list[Path]:
    """Extract a zip into dest, refusing absolute paths, `..`, links and archives over max_bytes."""
    dest = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError(f"{archive.name}: not a valid zip file") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_ENTRIES:
            raise DatasetError(f"{archive.name}: {len(infos)} entries, more than {MAX_ZIP_ENTRIES}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise DatasetError(f"{archive.name}: {total / 2**20:.0f} MB uncompressed, over the "
                               f"{max_bytes / 2**20:.0f} MB limit")
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
                raise DatasetError(f"{archive.name}: refused unsafe entry {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive.name}: refused symbolic link {info.filename!r}")
        written: list[Path] = []
        for info in infos:
            target = (dest / info.filename.replace("\\", "/")).resolve()
            if not target.is_relative_to(dest):  # belt and braces after the checks above
                raise DatasetError(f"{archive.name}: refused unsafe entry {info.filename!r}")
            if not _is_dataset_file(target) or "__MACOSX" in target.parts:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def import_uploads(files: list[str | Path], dest: Path, max_bytes: int) -> list[Path]:
    """Copy uploaded media/.txt files into dest and extract zips; other file types are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in files:
        src = Path(item)
        ext = src.suffix.lower()
        if ext == ".zip":
            written += safe_extract_zip(src, dest, max_bytes)
        elif _is_dataset_file(src):
            target = dest / safe_name(src.stem, "file")
            target = target.with_suffix(ext)
            shutil.copyfile(src, target)
            written.append(target)
        else:
            raise DatasetError(f"{src.name}: not an image, video, caption or zip file")
    if not any(p.suffix.lower() in MEDIA_EXTS for p in written):
        raise DatasetError("the upload holds no image or video files")
    return written


def _is_dataset_file(path: Path) -> bool:
    return path.suffix.lower() in MEDIA_EXTS | {".txt"} or path.name in CAPTION_FILES


def dataset_target(target: str, frame_buckets: list[int] | None = None) -> tuple[DatasetConfig, TrainConfig | None]:
    """What `dataset check` looks at: a training/dataset TOML, or a folder with the default buckets."""
    path = Path(target)
    if path.is_file():
        try:
            is_dataset_file = "directory" in tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"{path}: invalid TOML: {exc}") from None
        cfg = (TrainConfig.from_dict({"output_dir": ".", "dataset": str(path.resolve())}) if is_dataset_file
               else TrainConfig.from_toml_file(path))
        return cfg.dataset, cfg
    dataset = DatasetConfig(directory=[DirectoryConfig(path=str(path))])
    if frame_buckets:
        dataset.frame_buckets = frame_buckets
    return dataset, None


def preview(plan: DatasetPlan, micro_batch_size: int = 1, grad_accum: int = 1) -> dict[str, Any]:
    """The plan as JSON: every file with its buckets or "skipped: <reason>", counts per bucket and the
    steps per epoch on one GPU (what the Train tab, `/check_dataset` and `dataset check` show)."""
    files = []
    for e in plan.entries:
        item = e.item
        files.append({
            "file": e.name,
            "kind": ("video" if item.is_video else "image") if item else "?",
            "size": f"{item.width}x{item.height}" if item else "?",
            "frames": item.frames if item else None,
            "buckets": [str(b) for b in e.buckets],
            "skipped": e.skipped,
            "caption": item.caption if item else "",
            "caption_source": item.caption_source if item else None,
        })
    counts = plan.bucket_counts()
    return {"files": files, "bucket_counts": {str(b): n for b, n in sorted(counts.items(), key=lambda kv: str(kv[0]))},
            "samples": sum(counts.values()), "steps_per_epoch": plan.steps_per_epoch(micro_batch_size, grad_accum),
            "trainable": bool(counts), "warnings": plan.warnings}


def check(dataset: DatasetConfig, micro_batch_size: int = 1, grad_accum: int = 1) -> dict[str, Any]:
    return preview(plan_dataset(dataset), micro_batch_size, grad_accum)


def save_caption(folder: Path, name: str, caption: str) -> Path:
    """Write the .txt next to one media file of the folder (the name must stay inside it)."""
    media = (folder / name).resolve()
    if not media.is_relative_to(folder.resolve()) or media.suffix.lower() not in MEDIA_EXTS or not media.is_file():
        raise DatasetError(f"{name}: not a media file of this dataset")
    _, source = CaptionReader().find(media, folder.resolve())
    if source in CAPTION_FILES:  # a .txt would not win over it (engine.dataset's precedence)
        raise DatasetError(f"{name}: its caption comes from {source}; edit that file")
    target = media.with_suffix(".txt")
    target.write_text(caption.strip() + "\n", encoding="utf-8")
    return target


def thumbnail(path: Path, thumbs_dir: Path, size: int = 160) -> Path | None:
    """A small PNG of the first frame, cached by path + mtime; None when it cannot be decoded."""
    try:
        key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:20]
    except OSError:
        return None
    target = thumbs_dir / f"{key}.png"
    if target.is_file():
        return target
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    try:
        if path.suffix.lower() in IMAGE_EXTS | {".gif"}:
            with Image.open(path) as img:
                frame = img.convert("RGB")
        else:
            frame = Image.fromarray(read_video(path, 0, 1)[0])
        frame.thumbnail((size, size))
        frame.save(target)
        return target
    except Exception as exc:  # a thumbnail is cosmetic; the check lists unreadable files
        log.debug("no thumbnail for %s: %s", path, exc)
        return None
