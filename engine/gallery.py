"""The gallery: every generated video with exactly the settings that made it.

Media live in `<STUDIO_HOME>/gallery/<owner's folder>/<id>/` (video.mp4, poster.png, meta.json, and
start_image.<png|jpg|...>, a copy of the start image of an image-to-video generation, so the item can be
made again after the upload is gone), outside any web cache; items made before the per-user folders stay in `gallery/<id>/` and are found
there. The record lives in SQLite. `add()` moves the finished files into place, writes the sidecar,
then commits the record; on start, folders whose record is missing (a crash between the two) are
re-registered from their sidecar, so no finished video is ever lost.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.inference.export import DISPLAY_FILE, META_FILE, POSTER_FILE, START_IMAGE_STEM, VIDEO_FILE, write_json
from engine.paths import DataLayout, user_folder
from engine.store.db import Database
from engine.store.gallery import GalleryFilter, GalleryStore

log = logging.getLogger(__name__)

__all__ = ["Gallery", "GalleryItem", "GalleryError", "lora_display_name"]

_STAGING = ".staging"


class GalleryError(LookupError):
    """Unknown gallery item or unusable selection; the message names the id."""


@dataclass
class GalleryItem:
    id: str
    owner: str
    created_at: float
    model: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    loras: list[dict[str, Any]]  # [{"path", "name", "weight"}] in stack order
    params: dict[str, Any]  # the whole request as submitted (seed filled in)
    timings: dict[str, float]  # load_s, lora_s, text_encode_s, denoise_s, decode_s, encode_s
    favorite: bool = False
    digest: str = ""  # sha256 of the raw frames
    request_id: str | None = None
    dir: Path = field(default=Path("."))

    @property
    def video_path(self) -> Path:
        return self.dir / VIDEO_FILE

    @property
    def display_path(self) -> Path:
        """The file to show in the browser: the enlarged copy of a small video, else the video itself."""
        display = self.dir / DISPLAY_FILE
        return display if display.is_file() else self.video_path

    @property
    def poster_path(self) -> Path:
        return self.dir / POSTER_FILE

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

    @property
    def start_image(self) -> Path | None:
        """The start image this video was made from: the item's own copy, else (an item made before
        copies were kept) the file the request named while it is still there; None for text-to-video."""
        if not self.params.get("image"):
            return None
        kept = sorted(self.dir.glob(f"{START_IMAGE_STEM}.*"))
        if kept:
            return kept[0]
        named = Path(self.params["image"])
        return named if named.is_file() else None

    def to_meta(self) -> dict[str, Any]:
        """The JSON sidecar: everything needed to regenerate this video."""
        return {"id": self.id, "owner": self.owner, "created_at": self.created_at, "model": self.model,
                "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "width": self.width, "height": self.height, "num_frames": self.num_frames, "fps": self.fps,
                "loras": self.loras, "params": self.params, "timings": self.timings, "digest": self.digest,
                "request_id": self.request_id}


def lora_display_name(path: str) -> str:
    """'runs/7-cats/epoch3/adapter_model.safetensors' -> '7-cats/epoch3'; 'x/style.safetensors' -> 'style'."""
    p = Path(path)
    if p.suffix == ".safetensors" and p.stem != "adapter_model":
        return p.stem
    folder = p.parent if p.suffix == ".safetensors" else p
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name


class Gallery:
    def __init__(self, store: Database, layout: DataLayout) -> None:
        self.layout = layout
        self.root = layout.gallery_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.records = GalleryStore(store)
        self.recover()

    # ---- writing -------------------------------------------------------------------------------
    def staging_dir(self, name: str) -> Path:
        """A scratch folder on the gallery's filesystem (so `add` can move files with a rename)."""
        path = self.root / _STAGING / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, *, owner: str, params: dict[str, Any], seed: int, media_dir: str | Path,
            timings: dict[str, float] | None = None, digest: str = "", request_id: str | None = None) -> GalleryItem:
        """Register a finished video. `media_dir` holds video.mp4 (+ poster.png) and is moved into place.

        `params` is the request (`InferRequest.to_dict()`): model, prompt, loras, sizes, steps...
        """
        media_dir = Path(media_dir)
        if not (media_dir / VIDEO_FILE).is_file():
            raise GalleryError(f"{media_dir}: no {VIDEO_FILE} to add")
        _keep_start_image(params.get("image"), media_dir)
        item_id = f"{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:10]}"
        loras = [{"path": str(l["path"]), "name": lora_display_name(str(l["path"])), "weight": float(l["weight"])}
                 for l in params.get("loras", [])]
        item = GalleryItem(
            id=item_id, owner=owner, created_at=time.time(), model=str(params.get("model", "")),
            prompt=str(params.get("prompt", "")), negative_prompt=str(params.get("negative_prompt", "")),
            seed=int(seed), width=int(params["width"]), height=int(params["height"]),
            num_frames=int(params["num_frames"]), fps=int(params["fps"]), loras=loras,
            params={**params, "seed": int(seed)}, timings=dict(timings or {}), digest=digest,
            request_id=request_id, dir=self.root / user_folder(owner) / item_id,
        )
        item.dir.parent.mkdir(parents=True, exist_ok=True)
        media_dir.replace(item.dir)
        write_json(item.to_meta(), item.meta_path)
        try:
            self._insert(item)
        except Exception:
            shutil.rmtree(item.dir, ignore_errors=True)
            raise
        log.info("gallery item %s added for %s", item.id, owner)
        return item

    def _insert(self, item: GalleryItem) -> None:
        row = {"id": item.id, "owner": item.owner, "created_at": item.created_at, "request_id": item.request_id,
               "model": item.model, "prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
               "width": item.width, "height": item.height, "num_frames": item.num_frames, "fps": item.fps,
               "params_json": item.params, "timings_json": item.timings, "digest": item.digest, "favorite": 0}
        self.records.insert(row, item.loras)

    def recover(self) -> int:
        """Re-register media folders whose record is missing; drop stale staging folders. Returns the count."""
        import json

        self._drop_stale_staging()
        restored = 0
        for folder in self._media_folders():
            meta_path = folder / META_FILE
            if self.records.exists(folder.name) or not meta_path.is_file() or not (folder / VIDEO_FILE).is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                item = GalleryItem(**{k: meta[k] for k in GalleryItem.__dataclass_fields__ if k in meta},
                                   dir=folder)
                self._insert(item)
                restored += 1
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("gallery folder %s has an unreadable %s (%s); left alone", folder, META_FILE, exc)
        if restored:
            log.info("re-registered %d gallery item(s) from their sidecars", restored)
        return restored

    def _media_folders(self) -> list[Path]:
        """Item folders of both layouts: gallery/<id> (made before per-user folders) and gallery/<user>/<id>."""
        found = []
        for child in _visible_dirs(self.root):
            found.extend([child] if (child / META_FILE).is_file() else _visible_dirs(child))
        return found

    def _item_dir(self, item_id: str, owner: str) -> Path:
        # Looked up rather than recorded: old records need no migration, and a user's folder never
        # holds a meta.json itself, so the two layouts cannot be confused.
        old = self.root / item_id
        return old if (old / META_FILE).is_file() else self.root / user_folder(owner) / item_id

    def _drop_stale_staging(self, max_age_s: float = 86400.0) -> None:
        # Another process (the CLI beside the app) may be writing into a fresh staging folder.
        staging = self.root / _STAGING
        if not staging.is_dir():
            return
        for folder in staging.iterdir():
            if time.time() - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------------
    def list(self, owner: str | None = None, query: str | None = None, model: str | None = None,
             lora: str | None = None, favorite: bool | None = None, page: int = 1,
             page_size: int = 24) -> tuple[list[GalleryItem], int]:
        """One page of items (newest first) and the total number matching the filters."""
        if page < 1 or page_size < 1:
            raise ValueError(f"page and page_size must be >= 1, got page={page}, page_size={page_size}")
        rows, total = self.records.list(GalleryFilter(owner, query, model, lora, favorite),
                                        limit=page_size, offset=(page - 1) * page_size)
        return [self._item(row) for row in rows], total

    def get(self, item_id: str) -> GalleryItem:
        row = self.records.get(item_id)
        if row is None:
            raise GalleryError(f"gallery item {item_id!r} not found")
        return self._item(row)

    def _item(self, row: dict[str, Any]) -> GalleryItem:
        names = GalleryItem.__dataclass_fields__
        return GalleryItem(**{k: v for k, v in row.items() if k in names and k != "dir"},
                           dir=self._item_dir(row["id"], row["owner"]))

    # ---- changing ------------------------------------------------------------------------------
    def set_favorite(self, item_id: str, value: bool) -> GalleryItem:
        if not self.records.set_favorite(item_id, value):
            raise GalleryError(f"gallery item {item_id!r} not found")
        return self.get(item_id)

    def delete(self, item_id: str) -> None:
        """Remove the record and the media folder (also a folder left without its record)."""
        row = self.records.get(item_id)
        folder = self._item_dir(item_id, row["owner"]) if row else self.root / item_id
        parents = {self.root.resolve(), *([(self.root / user_folder(row["owner"])).resolve()] if row else [])}
        # Never follow an id outside the gallery, nor take a user's whole folder for an orphan item's.
        is_item = folder.is_dir() and folder.resolve().parent in parents and (row or (folder / META_FILE).is_file())
        if not self.records.delete(item_id) and not is_item:
            raise GalleryError(f"gallery item {item_id!r} not found")
        if is_item:
            shutil.rmtree(folder, ignore_errors=True)

    def export_zip(self, ids: list[str]) -> Path:
        """A zip of the selected items (`<id>/video.mp4`, `poster.png`, `meta.json`, the start image if any)
        under exports/."""
        if not ids:
            raise GalleryError("nothing selected to export")
        items = [self.get(item_id) for item_id in dict.fromkeys(ids)]
        self.layout.exports_dir.mkdir(parents=True, exist_ok=True)
        target = self.layout.exports_dir / f"gallery-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.zip"
        tmp = target.with_name(target.name + ".tmp")
        with zipfile.ZipFile(tmp, "w") as archive:
            for item in items:
                files = [(item.dir / name, name) for name in (VIDEO_FILE, POSTER_FILE, META_FILE)]
                image = item.start_image
                if image is not None:
                    files.append((image, START_IMAGE_STEM + image.suffix.lower()))
                for path, name in files:
                    if path.is_file():  # mp4/png/jpg are already compressed: store them as they are
                        method = zipfile.ZIP_DEFLATED if name == META_FILE else zipfile.ZIP_STORED
                        archive.write(path, f"{item.id}/{name}", compress_type=method)
        tmp.replace(target)
        return target


def _keep_start_image(image: str | None, media_dir: Path) -> None:
    """Copy a request's start image beside its video: the item keeps it when the upload is deleted."""
    if not image:
        return
    source = Path(image)
    try:
        shutil.copyfile(source, media_dir / f"{START_IMAGE_STEM}{source.suffix.lower() or '.png'}")
    except OSError as exc:  # the video is what matters; reuse falls back to the request's own file
        log.warning("could not keep the start image %s with the video: %s", source.name, exc)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
