"""The run view's charts and samples grid: figures from a series (labels, markers, controls, overlay,
empty state) and the handlers on a real studio context with a run's metrics and sample files."""
from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import gradio as gr
import pytest

from engine.metrics import loss_series
from studio.api import StudioApi
from studio.auth import User
from studio.presets import DEMO_PRESET
from studio.plots import MAX_EPOCH_LABELS, ChartOptions, loss_figure, quality_figure
from tabs import run_charts, train
from tests.ui_support import write_dataset

ALICE, BOB = User("alice"), User("bob")


def series_with_saves() -> dict:
    steps = list(range(1, 9))
    return {"step": steps, "loss": [1 / s for s in steps], "lr": [1e-4] * 8, "elapsed": [s * 30.0 for s in steps],
            "epoch_steps": [4, 8], "saves": [{"label": "epoch1", "step": 4}, {"label": "epoch2", "step": 8}],
            "best": {"label": "epoch1"},
            "samples": [{"label": "epoch1", "step": 4, "scores": {"all": 1.0, "color": 1.0}},
                        {"label": "epoch2", "step": 8, "scores": {"all": 0.0, "color": 0.5}}]}


def test_loss_chart_labels_epochs_marks_saves_and_follows_its_controls() -> None:
    series = series_with_saves()
    fig = loss_figure(series)
    assert [a.text for a in fig.layout.annotations] == ["epoch 1", "epoch 2"]
    saves = next(t for t in fig.data if t.name == "saves")
    assert list(saves.x) == [4, 8] and list(saves.text) == ["epoch1 (best)", "epoch2"]
    assert list(saves.marker.symbol) == ["star", "diamond"] and list(saves.y) == [0.25, 0.125]
    assert fig.layout.paper_bgcolor == "rgba(0,0,0,0)"  # no white block in the dark theme
    # Log scale, wall-clock axis (minutes), smoothing off, another run overlaid.
    other = {**series, "loss": [2 / s for s in series["step"]]}
    fig = loss_figure(series, options=ChartOptions(smoothing=0.0, log_y=True, x_axis="time"), others={"#9 b": other})
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "wall-clock time (min)"
    names = [t.name for t in fig.data]
    assert "smoothed" not in names and "#9 b" in names
    assert list(fig.data[0].x) == [s / 2 for s in series["step"]]  # 30 s per step
    assert fig.layout.shapes[0].x0 == 2.0  # the epoch line moves with the axis
    # A trainer that reports no times keeps the step axis.
    no_times = loss_figure({**series, "elapsed": [None] * 8}, options=ChartOptions(x_axis="time"))
    assert no_times.layout.xaxis.title.text == "step"
    with pytest.raises(ValueError):
        ChartOptions(smoothing=1.5)


def test_long_runs_label_a_few_epoch_lines_and_keep_every_line() -> None:
    steps = list(range(1, 1001))
    fig = loss_figure({"step": steps, "loss": [1.0] * 1000, "epoch_steps": list(range(10, 1001, 10))})
    labels = [a.text for a in fig.layout.annotations]
    assert len(fig.layout.shapes) == 100 and len(labels) <= MAX_EPOCH_LABELS  # labels overlapped at the top
    assert labels[0] == "epoch 1" and labels[-1] == "epoch 100"
    gaps = [int(b.split()[1]) - int(a.split()[1]) for a, b in zip(labels, labels[1:])]
    assert max(gaps) - min(gaps) <= 1  # spread evenly


def test_empty_charts_show_a_note_and_no_axis() -> None:
    for fig in (loss_figure(None), quality_figure(None), quality_figure({"step": [1], "loss": [1.0]})):
        assert not fig.data and fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False
        assert "yet" in fig.layout.annotations[0].text


def test_quality_curve_draws_each_score_per_save_and_stars_the_best() -> None:
    fig = quality_figure(series_with_saves())
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["all"].y) == [1.0, 0.0] and list(by_name["color"].y) == [1.0, 0.5]
    assert list(by_name["all"].x) == [4, 8] and list(by_name["best save"].x) == [4]
    assert list(quality_figure(series_with_saves(), ChartOptions(x_axis="time")).data[0].x) == [2.0, 4.0]


def test_series_carries_training_time_and_saves(tmp_path: Path) -> None:
    with (tmp_path / "metrics.jsonl").open("w") as out:
        for n in range(1, 5):
            out.write(json.dumps({"event": "step", "step": n, "loss": 1.0, "lr": 1e-4, "elapsed_s": 10.0 * n}) + "\n")
        out.write(json.dumps({"event": "save", "step": 4, "label": "epoch1", "path": "/srv/x"}) + "\n")
    series = loss_series(tmp_path)
    assert series["elapsed"] == [10.0, 20.0, 30.0, 40.0] and series["saves"] == [{"label": "epoch1", "step": 4}]


def run_with_samples(api: StudioApi, labels: list[str]) -> tuple[int, Path]:
    from tests.test_train_tab import write_sample_event
    from studio.presets import DEMO_PRESET

    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(write_dataset(api.ctx.layout.home))
    job = train.start_run(api, ALICE, cfg, [], 1, "charts")
    run_dir = Path(api.ctx.scheduler.get(job["id"]).run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # queued, not started: the trainer has not made it yet
    with (run_dir / "metrics.jsonl").open("a") as out:
        for n in range(1, 9):
            out.write(json.dumps({"event": "step", "step": n, "loss": 1 / n, "lr": 1e-4, "elapsed_s": n}) + "\n")
    for n, label in enumerate(labels, 1):
        write_sample_event(run_dir, label, step=4 * n, scores={"all": float(n == 1), "color": 1.0})
    return job["id"], run_dir


def test_samples_grid_is_prompt_by_save_newest_first_with_playable_links(api: StudioApi) -> None:
    job_id, run_dir = run_with_samples(api, ["epoch1", "epoch2"])
    grid = run_charts.sample_grid(api, ALICE, job_id, api.job_metrics(ALICE, job_id))
    rows = re.findall(r"<th class='sample-save'>([^<]+)", grid)
    assert rows == ["epoch2", "epoch1 ★ best"]  # newest first; the best save starred
    assert "a purple star" in grid and "seed 0" in grid and "all 1.00 color 1.00" in grid
    sources = re.findall(r"<video src='([^']+)' poster='([^']+)'", grid)
    assert len(sources) == 2
    for video, poster in sources:
        served = Path(urllib.parse.unquote(video.removeprefix("gradio_api/file=")))
        assert served.parent.parent == api.ctx.layout.served_dir  # an expiring link, not the run folder
        assert served.read_bytes() == (run_dir / "samples" / "epoch2" / "0.mp4").read_bytes() or \
            served.read_bytes() == (run_dir / "samples" / "epoch1" / "0.mp4").read_bytes()
        assert str(run_dir) not in video + poster
    with pytest.raises(Exception, match="not found"):  # per-user: bob cannot draw alice's grid
        run_charts.sample_grid(api, BOB, job_id, api.job_metrics(ALICE, job_id))
    assert "No samples yet" in run_charts.sample_grid(api, ALICE, job_id, {"samples": []})


def test_charts_tick_redraws_only_what_changed(api: StudioApi) -> None:
    job_id, run_dir = run_with_samples(api, ["epoch1"])
    options = run_charts.chart_options(-1, False, False)
    first = run_charts.charts_tick(api, ALICE, job_id, options, [], "", "")
    assert first.loss is not None and first.quality is not None and "epoch1" in first.grid
    same = run_charts.charts_tick(api, ALICE, job_id, options, [], first.chart_sig, first.grid_sig)
    assert same.loss is None and same.quality is None and same.grid is None
    logged = run_charts.charts_tick(api, ALICE, job_id, run_charts.chart_options(0.9, True, True), [],
                                    first.chart_sig, first.grid_sig)
    assert logged.loss.layout.yaxis.type == "log" and logged.grid is None  # an option redraws the chart only
    from tests.test_train_tab import write_sample_event

    write_sample_event(run_dir, "epoch2", step=8, scores={"all": 0.0})
    newer = run_charts.charts_tick(api, ALICE, job_id, options, [], first.chart_sig, first.grid_sig)
    assert newer.loss is not None and "epoch2" in newer.grid
    # Overlay: another run of the user's, listed once it has steps, drawn under its name.
    other_id, _ = run_with_samples(api, [])
    assert other_id not in [c[1] for c in run_charts.overlay_choices(api, ALICE, job_id)]  # no steps recorded yet
    api.ctx.scheduler.store.update(other_id, step=8)
    assert run_charts.overlay_choices(api, ALICE, job_id) == [(f"#{other_id} charts", other_id)]
    assert run_charts.overlay_choices(api, BOB, job_id) == []
    overlaid = run_charts.charts_tick(api, ALICE, job_id, options, [other_id], "", "")
    assert f"#{other_id} charts" in [t.name for t in overlaid.loss.data]
    assert run_charts.charts_tick(api, ALICE, job_id, options, [999], "", "").loss is not None  # gone: skipped


def test_selecting_a_run_without_steps_shows_the_empty_chart_not_the_previous_one(api: StudioApi) -> None:
    options = run_charts.chart_options(-1, False, False)
    trained, _ = run_with_samples(api, [])
    loss, _, _, chart_sig, grid_sig = run_charts.select_run(api, ALICE, trained, options, [])
    assert len(loss.data[0].x) == 8
    cfg = train.preset_config(api, DEMO_PRESET)
    cfg.dataset.directory[0].path = str(write_dataset(api.ctx.layout.home))
    queued = train.start_run(api, ALICE, cfg, [], 1, "queued")["id"]
    loss, quality, grid, new_sig, _ = run_charts.select_run(api, ALICE, queued, options, [])
    assert not loss.data and "no steps yet" in loss.layout.annotations[0].text  # no stale curve
    assert not quality.data and "No samples yet" in grid and new_sig != chart_sig
    # The polls after it keep the empty chart (nothing changed), and the next selection redraws again.
    assert run_charts.charts_outputs(api, ALICE, queued, options, [], new_sig, "")[0] == gr.skip()
    assert len(run_charts.select_run(api, ALICE, trained, options, [])[0].data[0].x) == 8


def test_grids_are_rebuilt_before_their_links_expire() -> None:
    from studio.files import DEFAULT_TTL_S, link_epoch

    start = 1_000_000 * DEFAULT_TTL_S
    assert link_epoch(now=start) == link_epoch(now=start + DEFAULT_TTL_S / 2 - 1)
    assert link_epoch(now=start + DEFAULT_TTL_S / 2) == link_epoch(now=start) + 1
