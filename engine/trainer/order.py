"""Deterministic data order and the learning-rate schedule.

The order of an epoch depends only on (seed, epoch, dataset), so a resumed run replays exactly the
micro-batches an uninterrupted one would see. Micro-batches hold one bucket each. Ranks take
interleaved micro-batches; when the count does not divide evenly the list wraps around (as torch's
DistributedSampler pads), so every sample is seen at least once per epoch and every rank takes the
same number of steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from engine.dataset import Bucket


@dataclass(frozen=True)
class Sample:
    latent_path: Path
    text_path: Path
    bucket: Bucket
    num_repeats: int
    source: Path


def epoch_microbatches(samples: list[Sample], micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices into `samples`, grouped into same-bucket micro-batches, shuffled for this epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[Bucket, list[int]] = {}
    for index, sample in enumerate(samples):
        by_bucket.setdefault(sample.bucket, []).extend([index] * sample.num_repeats)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket, key=str):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size))
    rng.shuffle(batches)
    return batches


def steps_per_epoch(num_microbatches: int, world_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(num_microbatches / (world_size * grad_accum)))


def microbatch_position(step: int, accum_index: int, rank: int, world_size: int, grad_accum: int) -> int:
    """Where a rank's micro-batch stands in the global order. The same for 1 rank accumulating
    2 micro-batches and 2 ranks with 1 each, so both runs see the same data (and noise)."""
    return (step * grad_accum + accum_index) * world_size + rank


def microbatch_for(batches: list[list[int]], step_in_epoch: int, accum_index: int, rank: int,
                   world_size: int, grad_accum: int) -> list[int]:
    position = microbatch_position(step_in_epoch, accum_index, rank, world_size, grad_accum)
    return batches[position % len(batches)]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {schedule!r}")
