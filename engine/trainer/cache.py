"""On-disk cache of VAE latents and text embeddings.

Layout: `<cache_dir>/<family>-<model fingerprint>/latents/<key>.safetensors` and `.../text/<key>...`.
A latent key hashes the file content + bucket + clip mode, a text key hashes the caption, and the
folder name hashes the model's encoder files: editing a file, a setting or the model picks a new
key; nothing stale is ever read. A file that fails to decode leaves a `<key>.failed` note so every
rank (and a resumed run) skips it the same way. Writes are atomic (temp file + rename).
Image-to-video models that concatenate first-frame latents ("concat") store them, and the image
encoder's embedding, in the same file (`image_latents`, `image_embeds`), under a folder of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from engine.families import ModelFamily
from engine.media import error_reason
from engine.dataset import Bucket, MediaItem, PlannedSample
from engine.trainer.data import load_pixels

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


@dataclass
class CachePlan:
    item: MediaItem
    bucket: Bucket
    latent_path: Path
    text_path: Path
    caption: str
    clip_mode: str = "single_beginning"

    @property
    def failed_path(self) -> Path:
        return self.latent_path.with_suffix(".failed")


def model_fingerprint(model_dir: Path, image_mode: str = "none") -> str:
    """Hash of the encoders' configs and weight files (size, mtime and head bytes); an image-to-video
    mode that caches first-frame conditioning hashes it and the image encoder too (a text-to-video run of
    the same VAE keeps its own entries)."""
    digest = hashlib.sha256()
    subs = ("vae", "text_encoder", "tokenizer")
    if image_mode == "concat":
        digest.update(b"image_mode:concat")
        subs += ("image_encoder", "image_processor")
    for sub in subs:
        folder = model_dir / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            stat = path.stat()
            digest.update(f"{sub}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            with path.open("rb") as fh:
                digest.update(fh.read(1 << 16))
    return digest.hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def text_path(cache_root: Path, family: str, fingerprint: str, caption: str) -> Path:
    """Where a caption's embedding is cached."""
    return cache_root / f"{family}-{fingerprint}" / "text" / f"{_key(caption)}.safetensors"


def plan_cache(cache_root: Path, family: str, fingerprint: str, samples: list[PlannedSample],
               clip_mode: str) -> list[CachePlan]:
    base = cache_root / f"{family}-{fingerprint}"
    hashes: dict[Path, str] = {}  # a file with several buckets or captions is read once
    plans = []
    for sample in samples:
        item = sample.item
        content = hashes.get(item.path) or hashes.setdefault(item.path, file_hash(item.path))
        latent = base / "latents" / f"{_key(content, sample.bucket, clip_mode if item.is_video else '')}.safetensors"
        text = text_path(cache_root, family, fingerprint, sample.caption)
        plans.append(CachePlan(item, sample.bucket, latent, text, sample.caption, clip_mode))
    return plans


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_done(plan: CachePlan) -> bool:
    return (plan.latent_path.is_file() or plan.failed_path.is_file()) and plan.text_path.is_file()


def fill_cache(
    plans: list[CachePlan],
    family: ModelFamily,
    model_dir: Path,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    image_mode: str = "none",
    captions: dict[str, Path] | None = None,
) -> int:
    """Encode this rank's share of missing entries (until `should_stop()` says so), and on rank 0 the
    `captions` not yet cached (caption -> text path; e.g. the empty one of caption dropout).
    Returns the number of entries encoded by this rank."""
    todo = [p for i, p in enumerate(plans) if i % world_size == rank and not _is_done(p)]
    texts = {c: path for c, path in (captions or {}).items() if rank == 0 and not path.is_file()}
    total = len(plans)
    if progress:
        progress(sum(_is_done(p) for p in plans), total, "start")
    if not (todo or texts) or (should_stop is not None and should_stop()):
        return 0
    encoders = family.load_encoders(model_dir, device, dtype)
    for caption, path in texts.items():
        (embed,) = family.encode_text(encoders, [caption])
        _atomic_save({"text": embed.contiguous()}, path)
    last_report = 0.0
    encoded = 0
    for plan in todo:
        if should_stop is not None and should_stop():
            break
        encoded += 1
        if not plan.text_path.is_file():
            (embed,) = family.encode_text(encoders, [plan.caption])
            _atomic_save({"text": embed.contiguous()}, plan.text_path)
        if not plan.latent_path.is_file() and not plan.failed_path.is_file():
            try:
                pixels = load_pixels(plan.item, plan.bucket, plan.clip_mode).unsqueeze(0)
            except Exception as exc:  # an undecodable file is skipped and listed, not fatal
                reason = error_reason(exc)
                _atomic_write_text(plan.failed_path, f"{plan.item.path}: {reason}\n")
                logger.warning("cannot decode %s: %s", plan.item.path, reason)
            else:
                latents = family.encode_media(encoders, pixels)[0]
                extra = family.encode_conditioning(encoders, pixels, image_mode)
                _atomic_save({"latents": latents.contiguous(), **{k: v.contiguous() for k, v in extra.items()}},
                             plan.latent_path)
        if progress and time.monotonic() - last_report > 0.5:
            last_report = time.monotonic()
            progress(sum(_is_done(p) for p in plans), total, "latents")
    del encoders
    return encoded


def load_latents(path: Path) -> torch.Tensor:
    return load_file(str(path))["latents"]


def load_text(path: Path) -> torch.Tensor:
    return load_file(str(path))["text"]


def load_batch(family: ModelFamily, samples: list, indices: list[int], image_mode: str = "none",
               text_paths: list[Path] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """A micro-batch from the cache: (latents, padded text, image conditioning or None); `text_paths`
    replaces the samples' own captions (caption dropout)."""
    cached = [load_file(str(samples[i].latent_path)) for i in indices]
    latents = torch.stack([c["latents"] for c in cached])
    text = family.pad_text([load_text(path) for path in text_paths or [samples[i].text_path for i in indices]])
    return latents, text, family.condition_batch(image_mode, latents, cached)


def to_device(condition: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    """A micro-batch's image conditioning on the device (None stays None)."""
    return None if condition is None else {k: v.to(device) for k, v in condition.items()}


def failure_reason(plan: CachePlan) -> str | None:
    if plan.failed_path.is_file():
        return plan.failed_path.read_text(encoding="utf-8").strip()
    return None


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
