"""`[sample]`: videos drawn with the LoRA being trained at its saves (tiny random Wan, one CPU process),
their files and events, time kept out of the step times, and a failure that only warns."""
from __future__ import annotations

import shutil
from pathlib import Path


from engine.media import probe_video
from engine.scoring import best_save
from tests.trainer_support import of_kind, read_events, run_trainer, trainer_cmd, write_config

SAMPLE = {"sample.prompts": ["a red square", "a blue circle"], "sample.seeds": [3], "sample.steps": 2,
          "sample.width": 32, "sample.num_frames": 5, "sample.at_start": True}


def test_saves_get_sample_videos_with_the_current_lora(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    config = write_config(tmp_path, tiny_model, dataset, epochs=1, max_steps=4, save_every_n_steps=2, **SAMPLE)
    run_dir = tmp_path / "run"
    result = run_trainer(trainer_cmd(config, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run_dir)
    samples = of_kind(events, "sample")
    assert [s["label"] for s in samples] == ["start", "step2", "step4"]
    for s in samples:
        assert len(s["videos"]) == 2 and s["seconds"] > 0 and s["scores"] == {}  # no scorer for this model
        for k, video in enumerate(s["videos"]):
            folder = run_dir / "samples" / s["label"]
            assert video["file"] == str(folder / f"{k}.mp4") and (folder / f"{k}.png").is_file()
            info = probe_video(video["file"])
            assert (info.width, info.height, info.frames) == (32, 32, 5)
    # The LoRA changes between saves, so the same prompt and seed give different pixels.
    assert (run_dir / "samples/start/0.mp4").read_bytes() != (run_dir / "samples/step4/0.mp4").read_bytes()
    # Sampling time is not step time (speed and ETA come from step times): step 3, right after the
    # sampled save at step 2, took less than that sampling did (one sample per step: 1 / samples_per_s).
    step3 = of_kind(events, "step")[2]
    assert step3["step"] == 3 and 1 / step3["samples_per_s"] < samples[1]["seconds"], (step3, samples[1]["seconds"])
    assert events[-1]["event"] == "done"


def test_a_failure_to_sample_warns_and_training_goes_on(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "scheduler")  # training does not need it; sampling does
    config = write_config(tmp_path, broken, dataset, epochs=1, max_steps=2, save_every_n_steps=2, **SAMPLE)
    result = run_trainer(trainer_cmd(config, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run")
    warnings = [e["message"] for e in of_kind(events, "warning") if "sampling" in e["message"]]
    assert len(warnings) == 1 and "scheduler" in warnings[0], warnings
    assert not of_kind(events, "sample") and events[-1]["event"] == "done"


def test_the_best_save_is_the_best_scored_else_the_lowest_eval_loss() -> None:
    scored = [{"event": "sample", "label": "start", "step": 0, "scores": {"all": 1.0}},  # the base model: not a save
              {"event": "sample", "label": "epoch1", "step": 10, "scores": {"all": 0.5, "color": 1.0}},
              {"event": "sample", "label": "epoch2", "step": 20, "scores": {"all": 0.5, "color": 0.5}},
              {"event": "sample", "label": "epoch3", "step": 30, "scores": {"all": 0.25, "color": 1.0}}]
    best = best_save(scored)
    assert best["label"] == "epoch1" and "all 0.50" in best["why"]
    by_loss = [{"event": "save", "label": "epoch1", "step": 10}, {"event": "save", "label": "epoch2", "step": 20},
               {"event": "eval", "step": 10, "loss": 0.3}, {"event": "eval", "step": 20, "loss": 0.4}]
    assert best_save(by_loss) == {"label": "epoch1", "step": 10, "why": "lowest eval loss (0.3 at step 10)"}
    assert best_save([{"event": "save", "label": "epoch1", "step": 10}]) is None


def test_the_demo_world_scorer_passes_a_true_clip_and_fails_a_wrong_prompt() -> None:
    import numpy as np

    from engine.demo import world
    from engine.scoring import scorer_for

    scorer = scorer_for("demo")
    assert scorer is not None and scorer_for("/models/wan") is None
    caption = world.parse_caption("a purple star moving right on a white background")
    frames = world.render_clip(world.make_spec(caption, np.random.default_rng(0)))
    frames = frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).astype(np.uint8)
    assert scorer.score(frames, caption.text()) == {"color": 1.0, "shape": 1.0, "motion": 1.0, "present": 1.0,
                                                    "all": 1.0}
    faded = scorer.score(np.concatenate([frames[:3], np.full_like(frames[3:], 255)]), caption.text())
    assert faded["present"] == 0.0 and faded["all"] == 0.0  # a clip that fades to white after 3 frames
    wrong = scorer.score(frames, "a red star moving right on a white background")
    assert wrong["color"] == 0.0 and wrong["all"] == 0.0
