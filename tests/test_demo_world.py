"""The shapes world: deterministic clips, a held-out split, and an evaluator that reads ground truth."""

from pathlib import Path

import numpy as np
import pytest

from engine.demo.evaluate import accuracy, evaluate_clip, read_clip
from engine.demo.world import (
    HELD_OUT_COLOR,
    HELD_OUT_SHAPE,
    CaptionError,
    parse_caption,
    render_clip,
    sample_specs,
    write_dataset,
)
from engine.media import read_video


def test_same_seed_renders_identical_clips_and_other_seeds_differ():
    first = [render_clip(s) for s in sample_specs(6, seed=7)]
    again = [render_clip(s) for s in sample_specs(6, seed=7)]
    other = [render_clip(s) for s in sample_specs(6, seed=8)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert first[0].shape == (17, 64, 64, 3) and first[0].dtype == np.uint8


def test_base_split_never_shows_the_held_out_concept():
    specs = sample_specs(400, seed=0)
    assert not any(s.color == HELD_OUT_COLOR or s.shape == HELD_OUT_SHAPE for s in specs)
    held_out = sample_specs(12, seed=0, held_out=True)
    assert all(s.color == HELD_OUT_COLOR and s.shape == HELD_OUT_SHAPE for s in held_out)
    assert len({s.caption for s in held_out}) == 12  # every direction x background once


def test_evaluator_reads_ground_truth_at_least_95_percent():
    specs = sample_specs(96, seed=3) + sample_specs(24, seed=4, held_out=True)
    scores = [evaluate_clip(render_clip(s), s.caption.text()) for s in specs]
    result = accuracy(scores)
    assert result["color"] >= 0.95 and result["shape"] >= 0.95 and result["motion"] >= 0.95, result


def test_evaluator_rejects_wrong_prompts_and_blank_clips():
    spec = sample_specs(1, seed=5)[0]
    frames = render_clip(spec)
    wrong_direction = {"left": "right", "right": "left", "up": "down", "down": "up"}[spec.direction]
    prompt = spec.caption.text().replace(f"moving {spec.direction}", f"moving {wrong_direction}")
    assert not evaluate_clip(frames, prompt).motion_ok
    blank = np.repeat(frames[:, :1, :1], 64, axis=1).repeat(64, axis=2)
    assert read_clip(blank).color is None
    with pytest.raises(CaptionError, match="unknown color 'pink'"):
        parse_caption("a pink circle moving left on a black background")
    with pytest.raises(CaptionError, match="does not follow"):
        parse_caption("a cat")


def test_dataset_folder_holds_playable_h264_and_captions(tmp_path: Path):
    specs = sample_specs(2, seed=9)
    paths = write_dataset(tmp_path / "ds", specs)
    assert [p.name for p in paths] == ["clip_0000.mp4", "clip_0001.mp4"]
    for path, spec in zip(paths, specs):
        assert path.with_suffix(".txt").read_text().strip() == spec.caption.text()
        frames = read_video(path)
        assert frames.shape == (17, 64, 64, 3)
        assert evaluate_clip(frames, spec.caption.text()).color_ok
