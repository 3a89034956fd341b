"""The shapes world: deterministic clips, a held-out split, captions, dataset files (the evaluator: test_demo_evaluate.py)."""

from pathlib import Path

import numpy as np
import pytest

from engine.demo.evaluate import evaluate_clip
from engine.demo.world import (
    HELD_OUT_COLOR,
    HELD_OUT_PROMPT_SHAPE,
    SHAPES,
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
    assert not any(s.color == HELD_OUT_COLOR for s in specs)
    assert {s.shape for s in specs} == set(SHAPES)  # stars too, in the other colors
    held_out = sample_specs(12, seed=0, held_out=True)
    assert all(s.color == HELD_OUT_COLOR and s.shape == HELD_OUT_PROMPT_SHAPE for s in held_out)
    assert len({s.caption for s in held_out}) == 12  # every direction x background once


def test_captions_outside_the_template_or_vocabulary_are_refused():
    assert parse_caption("A red circle moving left on a black background.").color == "red"
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
