"""The demo evaluator agrees with a person: ground-truth clips pass, clips broken the ways generated
clips break (tests/demo_broken_clips.py) fail."""

import numpy as np
import pytest

from demo_broken_clips import BROKEN, lumpy_blob, rough_star
from engine.demo.evaluate import accuracy, evaluate_clip, read_clip
from engine.demo.world import render_clip, sample_specs

GROUND_TRUTH = sample_specs(36, seed=3) + sample_specs(12, seed=4, held_out=True)


def test_ground_truth_clips_pass_every_attribute_in_every_frame():
    scores = [evaluate_clip(render_clip(s), s.caption.text()) for s in GROUND_TRUTH]
    result = accuracy(scores)
    assert result == {"color": 1.0, "shape": 1.0, "motion": 1.0, "background": 1.0, "present": 1.0, "all": 1.0,
                      "presence_rate": 1.0}, result
    frames = [frame for score in scores for frame in score.frames]
    assert all(f.present and f.color_error < 1.0 and f.shape_fit >= 0.9 for f in frames)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_clips_fail_what_they_break_and_never_pass_as_a_whole(name: str):
    make, broken_attribute, shapes = BROKEN[name]
    specs = [s for s in GROUND_TRUTH[::2] if s.shape in shapes]  # every color, shape and direction appears
    scores = [evaluate_clip(make(s), s.caption.text()) for s in specs]
    result = accuracy(scores)
    assert result[broken_attribute] == 0.0, (name, result)
    assert result["all"] == 0.0, (name, result)


def test_a_rough_star_reads_as_a_star_and_no_potato_does():
    """Generated stars come tilted, with uneven points and shallow notches; overlap with the world's star
    (soft IoU) misses them, their five points do not. Potatoes and blurred stars have no five points."""
    stars = [s for s in GROUND_TRUTH if s.shape == "star"]
    for seed, spec in enumerate(stars):
        score = evaluate_clip(rough_star(spec, seed), spec.caption.text())
        assert score.shape_ok and all(f.shape == "star" for f in score.frames), seed
        assert min(f.shape_fit for f in score.frames) < 0.8  # read by its points, not by the overlap
    potatoes = [f for seed in range(20) for spec in GROUND_TRUTH[::8]
                for f in evaluate_clip(lumpy_blob(spec, seed), spec.caption.text()).frames]
    assert not any(f.shape == "star" for f in potatoes)
    blurred = evaluate_clip(BROKEN["blurred_blob"][0](stars[0]), stars[0].caption.text())
    assert max(f.five_fold for f in blurred.frames) < 1.2


def test_each_frame_is_read_on_its_own():
    spec = next(s for s in GROUND_TRUTH if s.shape == "square")
    scores = evaluate_clip(BROKEN["empty_frames"][0](spec), spec.caption.text())
    assert [f.present for f in scores.frames].count(False) == 3
    assert scores.observed.presence == pytest.approx(14 / 17)
    faded = evaluate_clip(BROKEN["fading"][0](spec), spec.caption.text())
    assert faded.frames[0].color == spec.color and faded.frames[-1].color is None  # gone pale, then gone


def test_wrong_prompts_fail_and_a_blank_clip_reads_nothing():
    spec = next(s for s in GROUND_TRUTH if s.shape == "circle" and s.color != "red")
    frames = render_clip(spec)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[spec.direction]
    text = spec.caption.text()
    assert not evaluate_clip(frames, text.replace(f"moving {spec.direction}", f"moving {opposite}")).motion_ok
    assert not evaluate_clip(frames, text.replace("circle", "square")).shape_ok
    assert not evaluate_clip(frames, text.replace(spec.color, "red")).color_ok
    blank = np.repeat(frames[:, :1, :1], 64, axis=1).repeat(64, axis=2)
    reading = read_clip(blank)
    assert (reading.color, reading.shape, reading.direction, reading.presence) == (None, None, None, 0.0)
