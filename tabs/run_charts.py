"""The run view's charts and samples: the loss chart with its controls (smoothing, log scale, step or
wall-clock axis, up to 3 other runs overlaid), the sample-score curve under it, and the samples
grid (prompt x save, newest save first, videos that play in place).

Handlers (api, user, inputs) -> outputs are unit-tested in tests/test_run_charts.py; `build_*` and
`wire` place and connect the widgets for tabs/train.py.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from studio.api import StudioApi
from studio.auth import User
from studio.files import link_epoch, served_url
from studio.http_api import request_user
from studio.plots import MAX_OVERLAY, ChartOptions, loss_figure, quality_figure

SMOOTHING_CHOICES = [("auto", -1.0), ("off", 0.0), ("0.6", 0.6), ("0.8", 0.8), ("0.9", 0.9), ("0.95", 0.95),
                     ("0.98", 0.98)]
GRID_SAVES = 8  # rows of the samples grid: the newest sampled saves


# ---- handlers ----------------------------------------------------------------------------------------
def chart_options(smoothing: float | None, log_y: bool, wall_clock: bool) -> ChartOptions:
    """The controls' values as chart options (-1 or None: smoothing chosen by the number of points)."""
    auto = smoothing is None or float(smoothing) < 0
    return ChartOptions(smoothing=None if auto else float(smoothing), log_y=bool(log_y),
                        x_axis="time" if wall_clock else "step")


def overlay_choices(api: StudioApi, user: User, job_id: int | None) -> list[tuple[str, int]]:
    """The user's other training runs that have steps, to overlay on the selected run's chart."""
    return [(f"#{j['id']} {j['name']}", j["id"]) for j in api.list_jobs(user, limit=50)
            if j["id"] != job_id and j.get("kind", "train") == "train" and j.get("step")]


@dataclass
class ChartsUpdate:
    loss: Any  # a figure, or None when unchanged since the last signature
    quality: Any
    grid: str | None  # the samples grid's HTML, None when unchanged
    chart_sig: str
    grid_sig: str


def charts_tick(api: StudioApi, user: User, job_id: int, options: ChartOptions, overlay: list[int] | None,
                last_chart: str, last_grid: str) -> ChartsUpdate:
    """What changed since the last poll: the figures when a point, a save, a sample, an option or an
    overlaid run's curve did; the grid when a save got samples or its links near their expiry (links
    are made only then)."""
    series = api.job_metrics(user, job_id)
    others = {}
    for other in [o for o in overlay or [] if o != job_id][:MAX_OVERLAY - 1]:
        try:
            others[f"#{other} {api.job_status(user, other)['name']}"] = api.job_metrics(user, other)
        except Exception:  # noqa: BLE001 - a deleted run or another user's: not overlaid
            continue
    samples = series.get("samples") or []
    chart_sig = "|".join([str(job_id), _curve_sig(series), str(len(series.get("saves") or [])), str(len(samples)),
                          repr(options), *(f"{name}:{_curve_sig(s)}" for name, s in others.items())])
    grid_sig = f"{job_id}:{link_epoch()}:" + ",".join(str(e.get("label")) for e in samples)
    changed = chart_sig != last_chart
    return ChartsUpdate(loss_figure(series, options=options, others=others) if changed else None,
                        quality_figure(series, options) if changed else None,
                        sample_grid(api, user, job_id, series) if grid_sig != last_grid else None,
                        chart_sig, grid_sig)


def _curve_sig(series: dict[str, Any]) -> str:
    steps = series.get("step") or []
    return f"{series.get('points_total', len(steps))}:{steps[-1] if steps else ''}"


def charts_outputs(api: StudioApi, user: User, job_id: int | None, options: ChartOptions,
                   overlay: list[int] | None, last_chart: str, last_grid: str) -> tuple[Any, ...]:
    """The run view's chart outputs (loss, quality, grid, chart_sig, grid_sig) for a poll or a control:
    gr.skip() where nothing changed; the empty charts when no run is selected or it is gone."""
    empty = (loss_figure(None), quality_figure(None), sample_grid_placeholder(), "", "")
    if job_id is None:
        return empty
    try:
        update = charts_tick(api, user, job_id, options, overlay, last_chart, last_grid)
    except Exception:  # noqa: BLE001 - deleted or not visible: clear the charts
        return empty
    keep = lambda value: gr.skip() if value is None else value  # noqa: E731
    return keep(update.loss), keep(update.quality), keep(update.grid), update.chart_sig, update.grid_sig


def select_run(api: StudioApi, user: User, job_id: int | None, options: ChartOptions,
               overlay: list[int] | None) -> tuple[Any, ...]:
    """A newly selected run's charts, drawn at once and whatever was drawn before: the chart follows
    the selection (an empty run shows the empty-chart note), not the previous run's until the next poll."""
    return charts_outputs(api, user, job_id, options, overlay, "", "")


def sample_grid(api: StudioApi, user: User, job_id: int, series: dict[str, Any], max_saves: int = GRID_SAVES) -> str:
    """Prompt x save: a column per prompt and seed, a row per sampled save (newest first, the best
    starred), each cell a video that plays in place with its scores. Files reach the browser through
    expiring links (studio.files), made for the user who owns the run."""
    events = [e for e in series.get("samples") or [] if e.get("videos")]
    if not events:
        return ("<div class='samples-empty muted'>No samples yet. Add a <code>[sample]</code> table to the config "
                "(the demo preset has one): each save then draws its videos here.</div>")
    best = (series.get("best") or {}).get("label")
    columns = [(v["prompt"], v["seed"]) for v in events[-1]["videos"]]
    head = "".join(f"<th title='{html.escape(p)}'>{html.escape(_short(p))}<br><span class='muted'>seed {s}</span></th>"
                   for p, s in columns)
    rows = []
    for event in reversed(events[-max_saves:]):
        by_cell = {(v["prompt"], v["seed"]): v for v in event["videos"]}
        star = " ★ best" if event["label"] == best else ""
        scores = _scores_text(event.get("scores"))
        label = (f"<th class='sample-save'>{html.escape(str(event['label']))}{star}<br>"
                 f"<span class='muted'>step {event.get('step')}{' · ' + scores if scores else ''}</span></th>")
        cells = "".join(_video_cell(api, user, job_id, by_cell.get(column)) for column in columns)
        rows.append(f"<tr>{label}{cells}</tr>")
    return (f"<div class='sample-grid-wrap'><table class='sample-grid'><thead><tr><th>save</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _video_cell(api: StudioApi, user: User, job_id: int, video: dict[str, Any] | None) -> str:
    if video is None:
        return "<td class='muted'>–</td>"
    try:
        clip = api.job_sample_file(user, job_id, video["file"])
        poster = api.job_sample_file(user, job_id, str(Path(video["file"]).with_suffix(".png")))
    except FileNotFoundError:
        return "<td class='muted'>file gone</td>"
    scores = _scores_text(video.get("scores"))
    return (f"<td><video src='{served_url(api.file_link(clip))}' poster='{served_url(api.file_link(poster))}' "
            "controls loop muted playsinline preload='metadata'></video>"
            f"<div class='muted'>{html.escape(scores)}</div></td>")


def _scores_text(scores: dict[str, float] | None) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in (scores or {}).items())


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---- widgets -----------------------------------------------------------------------------------------
@dataclass
class RunCharts:
    smoothing: gr.Dropdown
    log_y: gr.Checkbox
    wall_clock: gr.Checkbox
    overlay: gr.Dropdown
    loss: gr.Plot
    quality: gr.Plot
    grid: gr.HTML | None = None

    @property
    def controls(self) -> list[gr.components.Component]:
        return [self.smoothing, self.log_y, self.wall_clock, self.overlay]


def build_chart() -> RunCharts:
    """The chart controls, the loss chart and the score curve under it (placed where this is called)."""
    # One wrapping row (assets/studio.css): on a phone each control keeps its one-line width.
    with gr.Row(elem_id="train-chart-controls", equal_height=True):
        smoothing = gr.Dropdown(SMOOTHING_CHOICES, value=-1.0, label="smoothing", min_width=110, scale=1,
                                elem_id="chart-smoothing")
        log_y = gr.Checkbox(False, label="log scale", min_width=110, scale=1, elem_id="chart-log")
        wall_clock = gr.Checkbox(False, label="x: time", min_width=110, scale=1, elem_id="chart-time")
        overlay = gr.Dropdown([], value=[], multiselect=True, max_choices=MAX_OVERLAY - 1, label="overlay runs",
                              min_width=200, scale=3, elem_id="chart-overlay")
    loss = gr.Plot(loss_figure(None), label="Loss", elem_id="train-loss")
    quality = gr.Plot(quality_figure(None), label="Sample scores", elem_id="train-quality")
    return RunCharts(smoothing, log_y, wall_clock, overlay, loss, quality)


def build_samples(charts: RunCharts) -> None:
    with gr.Accordion("Samples: prompt x save, newest first", open=True, elem_id="train-samples-panel"):
        charts.grid = gr.HTML(sample_grid_placeholder(), elem_id="train-samples")


def sample_grid_placeholder() -> str:
    return "<div class='samples-empty muted'>Select a run to see its samples.</div>"


def wire(api: StudioApi, charts: RunCharts, timer: gr.Timer, job_pick: gr.Dropdown) -> None:
    chart_sig, grid_sig = gr.State(""), gr.State("")
    outputs = [charts.loss, charts.quality, charts.grid, chart_sig, grid_sig]

    def on_tick(job_id: int | None, smoothing: float, log_y: bool, wall_clock: bool, overlay: list[int] | None,
                last_chart: str, last_grid: str, request: gr.Request):
        return charts_outputs(api, request_user(api, request), job_id, chart_options(smoothing, log_y, wall_clock),
                              overlay, last_chart, last_grid)

    def on_select(job_id: int | None, smoothing: float, log_y: bool, wall_clock: bool, overlay: list[int] | None,
                  request: gr.Request):
        return select_run(api, request_user(api, request), job_id, chart_options(smoothing, log_y, wall_clock),
                          overlay)

    inputs = [job_pick, *charts.controls, chart_sig, grid_sig]
    timer.tick(on_tick, inputs, outputs, queue=False, show_progress="hidden", api_visibility="private")
    for control in charts.controls:  # redraw at once, not at the next poll
        control.change(on_tick, inputs, outputs, queue=False, show_progress="hidden", api_visibility="private")
    job_pick.change(on_select, [job_pick, *charts.controls], outputs, queue=False, show_progress="hidden",
                    api_visibility="private")

    def on_overlay_focus(job_id: int | None, current: list[int] | None, request: gr.Request):
        return gr.update(choices=overlay_choices(api, request_user(api, request), job_id), value=current or [])

    charts.overlay.focus(on_overlay_focus, [job_pick, charts.overlay], charts.overlay, queue=False,
                         api_visibility="private")
