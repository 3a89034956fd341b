"""Trainer data pieces: the dataset plan (engine.dataset), buckets, epoch order over ranks, lr schedule,
latent cache."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DatasetConfig, DirectoryConfig
from engine.families import get_family
from engine.families.wan_random import build_random_wan
from engine.trainer import cache as cache_mod
from engine.dataset import Bucket, DatasetError, bucket_sizes, plan_dataset, settings_for
from engine.trainer.data import load_pixels
from engine.trainer.order import Sample, epoch_microbatches, lr_factor, microbatch_for, steps_per_epoch
from tests.trainer_support import make_dataset, write_video


def dataset_cfg(path: Path, **kw) -> DatasetConfig:
    return DatasetConfig(directory=[DirectoryConfig(path=str(path))], **kw)


def items_of(cfg: DatasetConfig) -> dict:
    return {e.name: e.item for e in plan_dataset(cfg).entries if not e.skipped}


def test_scan_lists_corrupt_files_and_missing_captions(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d")
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    plan = plan_dataset(dataset_cfg(data, frame_buckets=[1, 5]))
    by_name = items_of(dataset_cfg(data, frame_buckets=[1, 5]))
    assert sorted(by_name) == ["clip.mp4", "nocaption.png", "square0.png", "square1.png", "square2.png", "square3.png"]
    assert sorted(e.name for e in plan.skipped) == ["bad.png", "broken.mp4"]
    assert any(w.startswith("1 files have no caption") and "nocaption.png" in w for w in plan.warnings)
    assert by_name["nocaption.png"].caption == "" and by_name["nocaption.png"].caption_source is None
    assert by_name["square1.png"].caption == "a purple square"
    clip = by_name["clip.mp4"]
    assert clip.is_video and clip.frames == 9 and (clip.width, clip.height) == (32, 32)


def test_empty_dataset_and_links_outside_the_root_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    from engine.dataset import require_trainable

    with pytest.raises(DatasetError, match="no trainable item, 0 media files"):
        require_trainable(plan_dataset(dataset_cfg(empty)), str(empty))
    with pytest.raises(DatasetError, match="folder not found"):
        plan_dataset(dataset_cfg(tmp_path / "missing"))
    outside = make_dataset(tmp_path / "outside", images=1, video=False, corrupt_video=False, uncaptioned=False)
    inside = tmp_path / "inside"
    inside.mkdir()
    os.symlink(outside / "square0.png", inside / "linked.png")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        plan_dataset(dataset_cfg(inside))


def test_buckets_respect_area_multiples_and_frames(tmp_path: Path) -> None:
    cfg = DatasetConfig(resolutions=[256], min_ar=0.5, max_ar=2.0, num_ar_buckets=5, frame_buckets=[1, 9, 33])
    sizes = bucket_sizes(256, settings_for(DirectoryConfig(path="x"), cfg).ratios, 16)
    assert len(sizes) == 5 and (256, 256) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0 and 0.85 < w * h / 256**2 < 1.15
    assert [w / h > 1 for w, h in sizes] == [False, False, False, True, True]
    data = make_dataset(tmp_path / "d", images=2, corrupt_video=False, uncaptioned=False)

    def buckets(**kw) -> dict:
        plan = plan_dataset(dataset_cfg(data, **kw))
        return {e.name: (e.buckets[0] if e.buckets else e.skipped) for e in plan.entries}

    planned = buckets(resolutions=[256], min_ar=0.5, max_ar=2.0, num_ar_buckets=5, frame_buckets=[1, 9, 33])
    wide = planned["square1.png"]  # 48x32 -> ratio 1.5
    assert wide.frames == 1 and wide.width > wide.height
    assert planned["clip.mp4"].frames == 9  # 9 frames: largest fitting bucket
    assert "9 frames, shorter than every video frame bucket (33)" in buckets(frame_buckets=[33])["clip.mp4"]
    square = buckets(resolutions=[256], enable_ar_bucket=False)["square0.png"]
    assert (square.width, square.height) == (256, 256)
    pixels = load_pixels(items_of(dataset_cfg(data, frame_buckets=[1, 5]))["clip.mp4"], Bucket(64, 48, 5), "single_middle")
    assert pixels.shape == (3, 5, 48, 64) and pixels.min() >= -1 and pixels.max() <= 1


def samples_for(buckets: list[Bucket], repeats: list[int]) -> list[Sample]:
    return [Sample(Path(f"l{i}"), Path(f"t{i}"), b, r, Path(f"s{i}")) for i, (b, r) in enumerate(zip(buckets, repeats))]


def test_epoch_order_covers_every_sample_once_per_rank_split_and_is_deterministic() -> None:
    a, b = Bucket(32, 32, 1), Bucket(48, 32, 5)
    samples = samples_for([a, a, a, b, b, a, b], [1, 2, 1, 1, 1, 3, 1])
    batches = epoch_microbatches(samples, micro_batch_size=2, seed=3, epoch=0)
    assert batches == epoch_microbatches(samples, micro_batch_size=2, seed=3, epoch=0)
    assert batches != epoch_microbatches(samples, micro_batch_size=2, seed=3, epoch=1)
    flat = Counter(i for batch in batches for i in batch)
    assert flat == Counter({i: s.num_repeats for i, s in enumerate(samples)})
    for batch in batches:
        assert len({samples[i].bucket for i in batch}) == 1  # one bucket per micro-batch

    # Ranks take interleaved micro-batches; together they cover all, overlapping only in the padding.
    seven = [[i] for i in range(7)]
    world, ga = 2, 2
    spe = steps_per_epoch(len(seven), world, ga)
    assert spe == 2
    taken = {r: [microbatch_for(seven, s, a, r, world, ga)[0] for s in range(spe) for a in range(ga)]
             for r in range(world)}
    assert taken[0] == [0, 2, 4, 6] and taken[1] == [1, 3, 5, 0]  # 8 slots for 7 batches: one wraps
    assert set(taken[0]) | set(taken[1]) == set(range(7))


def test_lr_schedules() -> None:
    kw = dict(warmup_steps=4, total_steps=14)
    assert [lr_factor(s, schedule="constant", **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(13, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(4, schedule="cosine", **kw) == 1.0
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(14, schedule="cosine", **kw) == pytest.approx(0.0)


def test_cache_is_reused_and_invalidated_by_content_and_settings(tmp_path: Path) -> None:
    model = build_random_wan(tmp_path / "model", preset="tiny")
    family = get_family("wan")
    data = make_dataset(tmp_path / "d", images=2, video=False, corrupt_video=False, uncaptioned=False)
    write_video(data / "short.mp4", frames=9)
    cfg = dataset_cfg(data, resolutions=[32], frame_buckets=[1, 5])
    fingerprint = cache_mod.model_fingerprint(model)

    def plan(config: DatasetConfig) -> list[cache_mod.CachePlan]:
        samples = plan_dataset(config).samples
        return cache_mod.plan_cache(tmp_path / "cache", "wan", fingerprint, samples, config.video_clip_mode)

    def fill(plans: list[cache_mod.CachePlan]) -> int:
        return cache_mod.fill_cache(plans, family, model, rank=0, world_size=1, device=torch.device("cpu"),
                                    dtype=torch.float32, progress=lambda *a: progress.append(a))

    progress: list[tuple] = []
    first = plan(cfg)
    stopped = cache_mod.fill_cache(first, family, model, rank=0, world_size=1, device=torch.device("cpu"),
                                   dtype=torch.float32, should_stop=lambda: True)
    assert stopped == 0 and not any(p.latent_path.exists() for p in first)  # a stop request ends caching
    assert fill(first) == 3
    assert progress[0] == (0, 3, "start")
    image_plan = next(p for p in first if p.item.path.name == "square0.png")
    assert cache_mod.load_latents(image_plan.latent_path).shape == (16, 1, 4, 4)  # 32x32 image -> 1x4x4
    video_plan = next(p for p in first if p.item.is_video)
    assert cache_mod.load_latents(video_plan.latent_path).shape == (16, 2, 4, 4)  # 5 frames -> 2 latent frames
    assert cache_mod.load_text(image_plan.text_path).shape[-1] == 32

    assert fill(plan(cfg)) == 0  # unchanged: reused
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 99, np.uint8)).save(data / "square0.png")  # content changes
    assert fill(plan(cfg)) == 1
    (data / "square1.txt").write_text("a new caption")  # caption changes: only the text is re-encoded
    again = plan(cfg)
    changed = next(p for p in again if p.item.path.name == "square1.png")
    assert not changed.text_path.is_file() and changed.latent_path.is_file()
    assert fill(again) == 1
    assert fill(plan(dataset_cfg(data, resolutions=[48], frame_buckets=[1, 5]))) == 3  # setting changes
    middle = dataset_cfg(data, resolutions=[32], frame_buckets=[1, 5], video_clip_mode="single_middle")
    assert fill(plan(middle)) == 1  # only the video depends on the clip mode

    # A video whose decode falls short of its bucket is recorded as failed, once, and skipped.
    write_video(data / "two.mp4", frames=2)
    from engine.dataset import PlannedSample

    item = items_of(dataset_cfg(data, resolutions=[32], frame_buckets=[1, 5], short_videos="still"))["two.mp4"]
    item.frames = 9  # as if the container had lied about its length
    (bad,) = cache_mod.plan_cache(tmp_path / "cache", "wan", fingerprint, [PlannedSample(item, Bucket(32, 32, 5), "")],
                                  "single_beginning")
    assert fill([bad]) == 1
    assert "decoded 2 frames, expected 5" in cache_mod.failure_reason(bad)
    assert not bad.latent_path.exists()
    assert fill([bad]) == 0  # the failure is remembered, not retried every run


def test_extra_captions_are_encoded_once_on_rank_0(tmp_path: Path) -> None:
    model = build_random_wan(tmp_path / "model", preset="tiny")
    family = get_family("wan")
    empty = cache_mod.text_path(tmp_path / "cache", "wan", cache_mod.model_fingerprint(model), "")

    def fill(rank: int) -> None:
        cache_mod.fill_cache([], family, model, rank=rank, world_size=2, device=torch.device("cpu"),
                             dtype=torch.float32, captions={"": empty})

    fill(1)
    assert not empty.exists()  # rank 0 writes it (the ranks share the cache)
    fill(0)
    first = empty.stat().st_mtime_ns
    assert cache_mod.load_text(empty).shape[-1] == 32
    fill(0)
    assert empty.stat().st_mtime_ns == first  # cached: not encoded again


def test_caption_dropout_replaces_captions_at_its_rate_and_draws_nothing_when_off() -> None:
    from engine.trainer.loop import dropped_captions

    samples = samples_for([Bucket(32, 32, 1)] * 8, [1] * 8)
    empty = Path("empty.safetensors")
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    assert dropped_captions(samples, list(range(8)), None, 0.5, generator) is None
    assert dropped_captions(samples, list(range(8)), empty, 0.0, generator) is None
    assert torch.equal(generator.get_state(), before)  # runs without dropout keep their noise

    drawn = [dropped_captions(samples, list(range(8)), empty, 0.25, torch.Generator().manual_seed(seed))
             for seed in range(200)]
    share = sum(path == empty for paths in drawn for path in paths) / (200 * 8)
    assert 0.2 < share < 0.3
    kept = [path for paths in drawn for path in paths if path != empty]
    assert set(kept) <= {s.text_path for s in samples}
    again = dropped_captions(samples, list(range(8)), empty, 0.25, torch.Generator().manual_seed(0))
    assert again == drawn[0]  # the same seed (micro-batch position) drops the same captions
