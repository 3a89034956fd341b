"""From a dataset table to cached training samples: plan (engine.dataset, the same plan the studio's
check shows), warn about what is skipped, fill the latent/text cache on every rank, and list the
samples whose latents exist. Used for the training set and for each eval set."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from engine.config import DatasetConfig
from engine.dataset import DatasetError, plan_dataset, require_trainable
from engine.families import ModelFamily
from engine.trainer import cache as cache_mod
from engine.trainer.distributed import DistInfo, any_rank, barrier
from engine.trainer.order import Sample
from engine.trainer.runfiles import MetricsWriter


class StopRequested(Exception):
    """A stop arrived while the cache was being filled."""


@dataclass
class CacheContext:
    family: ModelFamily
    model_dir: Path
    cache_root: Path
    dist: DistInfo
    events: MetricsWriter
    dtype: torch.dtype
    should_stop: Callable[[], bool]
    image_mode: str = "none"  # image-to-video conditioning the cache stores with each clip (family.image_mode)

    @cached_property
    def fingerprint(self) -> str:
        """The encoders' hash naming this model's cache folder (read once for the training and eval sets)."""
        return cache_mod.model_fingerprint(self.model_dir, self.image_mode)


def caption_path(ctx: CacheContext, caption: str) -> Path:
    """The cached embedding of a caption of no dataset file (the empty one of caption dropout)."""
    return cache_mod.text_path(ctx.cache_root, ctx.family.name, ctx.fingerprint, caption)


def prepare_samples(dataset: DatasetConfig, ctx: CacheContext, label: str = "dataset",
                    captions: tuple[str, ...] = ()) -> list[Sample]:
    """Cached samples of one dataset table (and `captions` encoded alongside); DatasetError when nothing
    is trainable."""
    dist = ctx.dist
    plan = plan_dataset(dataset, ctx.family.describe(ctx.model_dir).spatial_multiple)
    if dist.is_main:
        for message in plan.warnings:
            ctx.events.emit("warning", message=f"{label}: {message}" if label != "dataset" else message)
    require_trainable(plan, ", ".join(d.path for d in dataset.directory))
    plans = cache_mod.plan_cache(ctx.cache_root, ctx.family.name, ctx.fingerprint, plan.samples,
                                 dataset.video_clip_mode)
    progress = _progress(ctx.events) if dist.is_main else None
    encoded = cache_mod.fill_cache(plans, ctx.family, ctx.model_dir, rank=dist.rank, world_size=dist.world_size,
                                   device=dist.device, dtype=ctx.dtype, progress=progress,
                                   should_stop=ctx.should_stop, image_mode=ctx.image_mode,
                                   captions={c: caption_path(ctx, c) for c in captions})
    if encoded and dist.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the encoders' memory back before the transformer loads
    barrier(dist)
    if any_rank([ctx.should_stop()], dist)[0]:
        raise StopRequested()
    samples = []
    for entry in plans:
        reason = cache_mod.failure_reason(entry)
        if reason:
            if dist.is_main:
                ctx.events.emit("warning", message=f"skipped undecodable file {reason}")
            continue
        samples.append(Sample(entry.latent_path, entry.text_path, entry.bucket, entry.item.num_repeats,
                              entry.item.path))
    if dist.is_main:
        ctx.events.emit("cache", done=len(plans), total=len(plans), stage="done")
    if not samples:
        raise DatasetError(f"the {label} is empty: every file failed to decode")
    return samples


def _progress(events: MetricsWriter) -> Callable[[int, int, str], None]:
    def report(done: int, total: int, stage: str) -> None:
        events.emit("cache", done=done, total=total, stage=stage)

    return report
