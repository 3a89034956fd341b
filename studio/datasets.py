"""Dataset helpers for the Train tab: confined folders, safe uploads and zips, scanning and checks.

A dataset is a folder of images/videos with same-name `.txt` captions. Every path a user types is
resolved and must lie under one of the allowed roots; uploads land in the user's own folder under
`uploads/<user>/datasets/<name>`; zip entries that would escape it are refused.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from engine.media import error_reason, probe_video, read_video

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".gif"}
MEDIA_EXTS = IMAGE_EXTS | VIDEO_EXTS
MAX_ZIP_ENTRIES = 20_000
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class DatasetError(ValueError):
    """A dataset path, upload or archive the studio refuses; the message says why."""


@dataclass(frozen=True)
class DatasetFile:
    name: str
    kind: str  # "image" | "video"
    caption: str | None  # None: no .txt next to it
    frames: int | None  # 1 for images; None when unreadable
    width: int | None
    height: int | None
    error: str | None = None


def safe_name(text: str, fallback: str = "dataset") -> str:
    cleaned = _SAFE_NAME.sub("-", text.strip()).strip("-.")
    return cleaned[:80] or fallback


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
    allowed = ", ".join(str(r) for r in roots) or "(none)"
    raise DatasetError(f"{text}: outside the allowed dataset folders ({allowed})")


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
            if target.suffix.lower() not in MEDIA_EXTS | {".txt"} or "__MACOSX" in target.parts:
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
        elif ext in MEDIA_EXTS | {".txt"}:
            target = dest / safe_name(src.stem, "file")
            target = target.with_suffix(ext)
            shutil.copyfile(src, target)
            written.append(target)
        else:
            raise DatasetError(f"{src.name}: not an image, video, caption or zip file")
    if not any(p.suffix.lower() in MEDIA_EXTS for p in written):
        raise DatasetError("the upload holds no image or video files")
    return written


def scan_dataset(folder: Path) -> list[DatasetFile]:
    """Every media file of the folder (recursively) with caption, frame count and size."""
    files: list[DatasetFile] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in MEDIA_EXTS and p.is_file()):
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip() if caption_path.is_file() else None
        kind = "image" if path.suffix.lower() in IMAGE_EXTS else "video"
        name = str(path.relative_to(folder))
        try:
            if kind == "image":
                with Image.open(path) as img:
                    img.verify()
                with Image.open(path) as img:
                    frames, width, height = 1, img.width, img.height
            else:
                # The container's duration x fps, not a decode: the check lists big folders quickly.
                info = probe_video(path, exact_frames=False)
                frames, width, height = info.frames, info.width, info.height
            files.append(DatasetFile(name, kind, caption, frames, width, height))
        except Exception as exc:  # any decoder failure means "unreadable"; keep scanning
            files.append(DatasetFile(name, kind, caption, None, None, None, error=f"unreadable: {error_reason(exc)}"))
    return files


def bucket_for(frames: int, frame_buckets: list[int]) -> int | None:
    """The largest frame bucket that fits the clip (as the trainer cuts clips), or None."""
    fitting = [b for b in frame_buckets if b <= frames]
    return max(fitting) if fitting else None


def check_dataset(files: list[DatasetFile], frame_buckets: list[int]) -> list[str]:
    """Human-readable problems: no media, missing captions, unreadable files, clips under every bucket."""
    if not files:
        return ["no image or video files found"]
    problems: list[str] = []
    video_buckets = [b for b in frame_buckets if b > 1]
    for f in files:
        if f.error:
            problems.append(f"{f.name}: {f.error}")
            continue
        if f.caption is None:
            problems.append(f"{f.name}: missing caption (.txt); trains with an empty caption")
        elif not f.caption:
            problems.append(f"{f.name}: empty caption")
        if f.kind == "video" and f.frames is not None and video_buckets and f.frames < min(video_buckets):
            problems.append(f"{f.name}: {f.frames} frames, shorter than every video frame bucket "
                            f"({', '.join(map(str, video_buckets))})")
    return problems


def save_caption(folder: Path, name: str, caption: str) -> Path:
    """Write the .txt next to one media file of the folder (the name must stay inside it)."""
    media = (folder / name).resolve()
    if not media.is_relative_to(folder.resolve()) or media.suffix.lower() not in MEDIA_EXTS or not media.is_file():
        raise DatasetError(f"{name}: not a media file of this dataset")
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
