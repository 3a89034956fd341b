"""Incremental metrics reading and the downsampled loss series."""
from __future__ import annotations

import json
from pathlib import Path

from engine.metrics import LossSeries, LossSeriesCache, MetricsReader, loss_series
from engine.rundir import RunDir


def append(path: Path, *events: dict) -> None:
    with open(path, "a") as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")


def step(n: int, loss: float | None = None) -> dict:
    return {"event": "step", "time": 0, "step": n, "loss": 1.0 / n if loss is None else loss, "lr": 1e-4}


def test_reader_returns_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.read_new() == []  # no file yet
    append(path, step(1), step(2))
    assert [e["step"] for e in reader.read_new()] == [1, 2]
    assert reader.read_new() == []
    with open(path, "a") as handle:
        handle.write('{"event": "step", "step": 3, "lo')  # the trainer is mid-write
    assert reader.read_new() == []
    with open(path, "a") as handle:
        handle.write('ss": 0.3}\nnot json\n')
    assert [e["step"] for e in reader.read_new()] == [3]
    assert reader.bad_lines == 1
    path.write_text(json.dumps(step(1)) + "\n")  # replaced by a shorter file
    assert [e["step"] for e in reader.read_new()] == [1]


def test_reader_skip_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, *(step(n) for n in range(1, 1001)))
    reader = MetricsReader(path)
    reader.seek_tail(500)
    events = reader.read_new()
    assert 0 < len(events) < 20 and events[-1]["step"] == 1000
    reader.skip_to_end()
    append(path, step(1001))
    assert [e["step"] for e in reader.read_new()] == [1001]


def test_last_final_event_ignores_an_older_launch(tmp_path: Path) -> None:
    append(tmp_path / "metrics.jsonl", step(1), {"event": "stopped", "step": 1})
    assert RunDir(tmp_path).final_event()["event"] == "stopped"
    append(tmp_path / "metrics.jsonl", {"event": "start", "total_steps": 5}, step(2))
    assert RunDir(tmp_path).final_event() is None
    append(tmp_path / "metrics.jsonl", {"event": "done", "step": 5})
    assert RunDir(tmp_path).final_event()["event"] == "done"


def test_loss_series_is_bounded_and_keeps_extremes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, {"event": "start", "total_steps": 20000})
    losses = {n: 0.5 for n in range(1, 20001)}
    losses[7777], losses[12345] = 9.0, 0.001  # a spike and a dip must survive downsampling
    append(path, *(step(n, losses[n]) for n in range(1, 10001)))
    cache = LossSeriesCache()
    first = loss_series(tmp_path, max_points=400, cache=cache)
    assert len(first["step"]) <= 400 and first["step"] == sorted(first["step"])
    assert 9.0 in first["loss"] and first["step"][first["loss"].index(9.0)] == 7777
    append(path, *(step(n, losses[n]) for n in range(10001, 20001)),
           {"event": "epoch", "epoch": 1, "step": 20000, "mean_loss": 0.5})
    second = loss_series(tmp_path, max_points=400, cache=cache)
    assert len(second["step"]) <= 400 and second["step"][-1] == 20000
    assert 0.001 in second["loss"] and 9.0 in second["loss"]
    assert second["epoch_steps"] == [20000] and second["total_steps"] == 20000
    assert len(second["lr"]) == len(second["loss"])


def test_loss_series_parses_only_new_bytes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, *(step(n) for n in range(1, 101)))
    series = LossSeries(tmp_path, max_points=2000)
    assert series.update()["step"] == list(range(1, 101))
    offset = series.reader.offset
    append(path, step(101))
    assert series.update()["step"][-1] == 101
    assert series.reader.offset == offset + len(json.dumps(step(101))) + 1


def test_loss_series_drops_replayed_steps_after_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, *(step(n, 1.0) for n in range(1, 11)))
    cache = LossSeriesCache()
    assert loss_series(tmp_path, cache=cache)["step"] == list(range(1, 11))
    append(path, {"event": "start"}, *(step(n, 2.0) for n in range(6, 9)))  # resumed from step 5
    result = loss_series(tmp_path, cache=cache)
    assert result == loss_series(tmp_path)  # a fresh read of the whole file agrees
    assert result["step"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert result["loss"] == [1.0] * 5 + [2.0] * 3


def test_eval_loss_is_a_second_series_per_eval_set(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    evaluation = [{"event": "eval", "step": s, "name": "held_out", "loss": 1.0 / (s + 1)} for s in (0, 4, 8)]
    append(path, *(step(n) for n in range(1, 9)), *evaluation)
    cache = LossSeriesCache()
    assert loss_series(tmp_path, cache=cache)["eval"] == {"held_out": {"step": [0, 4, 8], "loss": [1.0, 0.2, 1 / 9]}}
    append(path, {"event": "start"}, {"event": "eval", "step": 4, "name": "held_out", "loss": 0.5})  # resumed
    assert loss_series(tmp_path, cache=cache)["eval"]["held_out"] == {"step": [0, 4], "loss": [1.0, 0.5]}


def test_sample_events_and_the_best_save_come_with_the_series(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    video = {"prompt": "p", "seed": 0, "file": str(tmp_path / "samples" / "epoch1" / "0.mp4"), "scores": {"all": 1.0}}
    append(path, *(step(n) for n in range(1, 5)),
           {"event": "save", "step": 2, "epoch": 1, "label": "epoch1", "path": "/srv/x"},
           {"event": "sample", "step": 2, "label": "epoch1", "scores": {"all": 1.0}, "videos": [video]},
           {"event": "save", "step": 4, "epoch": 2, "label": "epoch2", "path": "/srv/y"},
           {"event": "sample", "step": 4, "label": "epoch2", "scores": {"all": 0.0}, "videos": [video]})
    series = loss_series(tmp_path)
    assert [s["label"] for s in series["samples"]] == ["epoch1", "epoch2"]
    assert series["samples"][0]["videos"][0]["file"] == "samples/epoch1/0.mp4"  # no server path
    assert series["best"]["label"] == "epoch1" and "highest sample scores" in series["best"]["why"]
