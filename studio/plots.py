"""Plotly figures from plain data: the training loss chart, the sample-score chart and the GPUs tab's
history charts (per GPU, or the host's CPU and RAM)."""
from __future__ import annotations

import bisect
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

LOSS_COLOR = "rgba(99, 110, 250, 0.35)"
SMOOTH_COLOR = "#4f5bd5"
LR_COLOR = "#e4572e"
EVAL_COLOR = "#17a589"
SAVE_COLOR = "#d97706"
GPU_COLORS = ("#4f46e5", "#0891b2", "#16a34a", "#ca8a04", "#dc2626", "#9333ea", "#db2777", "#475569")
OVERLAY_COLORS = ("#db2777", "#0891b2", "#65a30d")  # the other runs of an overlay (up to 3 beside this one)
SCORE_COLORS = {"all": "#111827", "color": "#9333ea", "shape": "#0891b2", "motion": "#16a34a", "present": "#ca8a04"}
MAX_OVERLAY = 4  # runs on one loss chart, the selected one included
MAX_EPOCH_LABELS = 8  # labelled epoch lines on the loss chart; the others are unlabelled lines
# Theme-neutral: transparent backgrounds, mid-grey text and grid read on the light and the dark theme
# (a white plot block glared in the dark one).
INK = "#8a8f98"
GRID = "rgba(138, 143, 152, 0.25)"
_AXIS = dict(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID, color=INK)
_LAYOUT = dict(
    template="none",
    paper_bgcolor="rgba(0,0,0,0)",
    plot_bgcolor="rgba(0,0,0,0)",
    font=dict(color=INK),
    margin=dict(l=50, r=50, t=36, b=40),
    height=320,
    legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    hovermode="x unified",
)


@dataclass(frozen=True)
class ChartOptions:
    """What the loss chart's controls choose. smoothing: None = by the number of points, 0 = off,
    else the EMA weight (0..0.99); x_axis: "step" or "time" (wall-clock time since the run started,
    as the trainer reports it: sampling and evaluation included)."""

    smoothing: float | None = None
    log_y: bool = False
    x_axis: str = "step"

    def __post_init__(self) -> None:
        if self.smoothing is not None and not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.x_axis not in ("step", "time"):
            raise ValueError(f"x axis must be 'step' or 'time', got {self.x_axis!r}")

    def weight(self, points: int) -> float:
        return smoothing_weight(points) if self.smoothing is None else self.smoothing


def ema_smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are carried over."""
    smoothed: list[float] = []
    last, count = 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            smoothed.append(float("nan"))
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight**count))
    return smoothed


def smoothing_weight(points: int) -> float:
    """More points, more smoothing: about a 1/20th of the run in the window, between 0.6 and 0.98."""
    if points <= 1:
        return 0.0
    return min(0.98, max(0.6, 1 - 20 / points))


def _empty(fig: go.Figure, text: str) -> go.Figure:
    """A note and no axes: an empty chart must not show a made-up range. Plotly does not wrap text: the
    note comes in short lines, so it reads whole on a phone (one line was clipped at both ends)."""
    fig.add_annotation(text="<br>".join(textwrap.wrap(text, 36)), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=14, color=INK))
    fig.update_layout(**{**_LAYOUT, "height": 160}, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


class _XAxis:
    """Step -> x position: the step itself, or the minutes since the run started (the series' `elapsed`)."""

    def __init__(self, series: Mapping[str, Any], x_axis: str) -> None:
        self.steps = list(series.get("step", []))
        elapsed = list(series.get("elapsed") or [])
        self.by_time = x_axis == "time" and len(elapsed) == len(self.steps) and any(e is not None for e in elapsed)
        self.minutes = [None if e is None else e / 60 for e in elapsed] if self.by_time else []
        self.title = "wall-clock time (min)" if self.by_time else "step"

    def points(self) -> list[float | None]:
        return self.minutes if self.by_time else self.steps

    def at(self, step: int) -> float | None:
        """x of any step (a save, an epoch end): the nearest recorded point at or after it."""
        if not self.by_time:
            return step
        if not self.steps:
            return None
        index = min(bisect.bisect_left(self.steps, step), len(self.steps) - 1)
        return self.minutes[index]


def loss_figure(series: Mapping[str, Any] | None, title: str = "", options: ChartOptions = ChartOptions(),
                others: Mapping[str, Mapping[str, Any]] | None = None) -> go.Figure:
    """Loss (raw + smoothed) against step or wall-clock time, lr on a second axis, labelled epoch lines,
    save markers (the best save starred), eval losses; `others` ({name: series}) overlays the smoothed
    loss of up to 3 more runs."""
    series = series or {}
    fig = go.Figure()
    if not series.get("step"):
        return _empty(fig, "no steps yet: the loss appears here once the run trains")
    x = _XAxis(series, options.x_axis)
    xs, losses = x.points(), list(series["loss"])
    fig.add_trace(go.Scatter(x=xs, y=losses, name="loss", mode="lines+markers" if len(xs) < 60 else "lines",
                             line=dict(color=LOSS_COLOR, width=1), marker=dict(size=4)))
    weight = options.weight(len(losses))
    if weight > 0:
        fig.add_trace(go.Scatter(x=xs, y=ema_smooth(losses, weight), name="smoothed", mode="lines",
                                 line=dict(color=SMOOTH_COLOR, width=2.5)))
    lrs = list(series.get("lr") or [])
    if any(v is not None for v in lrs):
        fig.add_trace(go.Scatter(x=xs, y=lrs, name="lr", yaxis="y2", mode="lines",
                                 line=dict(color=LR_COLOR, width=1.5, dash="dot")))
    for name, points in (series.get("eval") or {}).items():  # held-out loss: the curve that tells overfitting
        fig.add_trace(go.Scatter(x=[x.at(s) for s in points["step"]], y=points["loss"], name=f"eval loss ({name})",
                                 mode="lines+markers", line=dict(color=EVAL_COLOR, width=2), marker=dict(size=6)))
    for n, (name, other) in enumerate(list((others or {}).items())[:MAX_OVERLAY - 1]):
        if other.get("step"):
            ox = _XAxis(other, options.x_axis)
            fig.add_trace(go.Scatter(x=ox.points(), y=ema_smooth(other["loss"], options.weight(len(other["loss"]))),
                                     name=name, mode="lines", line=dict(color=OVERLAY_COLORS[n], width=2)))
    _epoch_lines(fig, series, x)
    _save_markers(fig, series, x, losses)
    fig.update_layout(
        **_LAYOUT,
        title=dict(text=title, font=dict(size=14)),
        xaxis=dict(title=x.title, rangemode="tozero", **_AXIS),
        yaxis=dict(title="loss (log)" if options.log_y else "loss", type="log" if options.log_y else "linear", **_AXIS),
        yaxis2=dict(title="lr", overlaying="y", side="right", showgrid=False, exponentformat="e", rangemode="tozero",
                    color=INK),
    )
    return fig


def _epoch_lines(fig: go.Figure, series: Mapping[str, Any], x: _XAxis) -> None:
    """A dashed line at each epoch end; "epoch N" labels on at most MAX_EPOCH_LABELS of them (more
    overlapped at the top of the chart). Set in one layout update: add_vline per epoch took seconds
    on a long run."""
    ends = list(series.get("epoch_steps") or [])
    labelled = epoch_label_indices(len(ends))
    shapes, labels = [], []
    for n, step in enumerate(ends, 1):
        where = x.at(step)
        if where is None:
            continue
        shapes.append(dict(type="line", xref="x", yref="paper", x0=where, x1=where, y0=0, y1=1,
                           line=dict(color=GRID, width=1, dash="dash")))
        if n in labelled:
            labels.append(dict(text=f"epoch {n}", xref="x", yref="paper", x=where, y=1, xanchor="right",
                               yanchor="top", showarrow=False, font=dict(size=10, color=INK)))
    fig.update_layout(shapes=shapes, annotations=labels)


def epoch_label_indices(count: int, limit: int = MAX_EPOCH_LABELS) -> set[int]:
    """Which epochs (1-based) of `count` get a label: all when they fit, else `limit` spread evenly
    with the last always among them."""
    if count <= limit:
        return set(range(1, count + 1))
    return {count - round(k * (count - 1) / (limit - 1)) for k in range(limit)}


def _save_markers(fig: go.Figure, series: Mapping[str, Any], x: _XAxis, losses: list[float]) -> None:
    """A diamond on the loss curve at each save, named; the best save a star."""
    saves = list(series.get("saves") or [])
    if not saves:
        return
    steps = list(series["step"])
    best = (series.get("best") or {}).get("label")
    at_save = [losses[min(bisect.bisect_left(steps, s["step"]), len(steps) - 1)] for s in saves]
    fig.add_trace(go.Scatter(
        x=[x.at(s["step"]) for s in saves], y=at_save, name="saves", mode="markers",
        marker=dict(symbol=["star" if s["label"] == best else "diamond" for s in saves],
                    size=[14 if s["label"] == best else 9 for s in saves], color=SAVE_COLOR,
                    line=dict(color="white", width=1)),
        text=[f"{s['label']}" + (" (best)" if s["label"] == best else "") for s in saves],
        hovertemplate="%{text}<extra></extra>"))


def quality_figure(series: Mapping[str, Any] | None, options: ChartOptions = ChartOptions()) -> go.Figure:
    """The samples' scores per sampled save (engine.scoring: "all" and each attribute), on the loss
    chart's x axis; the best save starred."""
    samples = [e for e in (series or {}).get("samples") or [] if e.get("scores")]
    fig = go.Figure()
    if not samples:
        return _empty(fig, "no sample scores yet: saves with [sample] videos of a scored model (the demo) draw here")
    x = _XAxis(series, options.x_axis)
    xs = [x.at(e.get("step") or 0) for e in samples]
    names = sorted({k for e in samples for k in e["scores"]}, key=lambda k: (k != "all", k))
    for name in names:
        fig.add_trace(go.Scatter(x=xs, y=[e["scores"].get(name) for e in samples], name=name, mode="lines+markers",
                                 line=dict(color=SCORE_COLORS.get(name, INK), width=3 if name == "all" else 1.5),
                                 text=[e["label"] for e in samples], hovertemplate="%{text}: %{y:.2f}"))
    best = (series.get("best") or {}).get("label")
    for e, where in zip(samples, xs):
        if e["label"] == best:
            fig.add_trace(go.Scatter(x=[where], y=[e["scores"].get("all", max(e["scores"].values()))], name="best save",
                                     mode="markers", marker=dict(symbol="star", size=16, color=SAVE_COLOR)))
    fig.update_layout(**{**_LAYOUT, "height": 220}, title=dict(text="sample scores per save", font=dict(size=13)),
                      xaxis=dict(title=x.title, rangemode="tozero", **_AXIS),
                      yaxis=dict(title="score", range=[-0.05, 1.05], **_AXIS))
    return fig


# The GPUs tab's panels: (sample key, axis title, fixed range or None).
GPU_PANELS = (("util", "utilization %", [0, 100]), ("mem", "memory %", [0, 100]), ("power", "power W", None))
HOST_PANELS = (("cpu", "CPU load %", [0, 100]), ("ram", "RAM used %", [0, 100]))


def gpu_history_figure(history: Mapping[int, Sequence[Mapping[str, float]]]) -> go.Figure:
    """Utilization, memory and power per GPU over the last minutes: one panel each, one line per GPU.

    `history` maps a GPU index to samples `{"time": unix_s, "util": pct, "mem": pct, "power": W}`.
    """
    series = {f"GPU {index}": samples for index, samples in sorted(history.items()) if samples}
    return _history_figure(series, GPU_PANELS, "no GPU samples")


def host_history_figure(samples: Sequence[Mapping[str, float]]) -> go.Figure:
    """CPU load and RAM use of this machine over the last minutes (what CPU-slot jobs run on)."""
    return _history_figure({"host": samples} if samples else {}, HOST_PANELS, "no samples yet")


def _history_figure(series: Mapping[str, Sequence[Mapping[str, float]]], panels: Sequence[tuple],
                    empty: str) -> go.Figure:
    from plotly.subplots import make_subplots

    if not series:
        return _empty(go.Figure(), empty)
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[title for _, title, _ in panels])
    t0 = max(samples[-1]["time"] for samples in series.values())
    for n, (name, samples) in enumerate(series.items()):
        xs = [round(s["time"] - t0, 1) for s in samples]
        color = GPU_COLORS[n % len(GPU_COLORS)]
        for row, (key, title, _) in enumerate(panels, 1):
            fig.add_trace(go.Scatter(x=xs, y=[s.get(key) for s in samples], name=name, mode="lines",
                                     legendgroup=name, showlegend=row == 1 and len(series) > 1,
                                     line=dict(color=color), hovertemplate=f"{title} %{{y:.0f}}"), row=row, col=1)
    fig.update_layout(**{**_LAYOUT, "height": 140 + 130 * len(panels), "margin": dict(l=50, r=20, t=40, b=40)})
    fig.update_annotations(font=dict(size=12, color=INK))
    for row, (_, _, y_range) in enumerate(panels, 1):
        fig.update_yaxes(range=y_range, row=row, col=1, **_AXIS)
        fig.update_xaxes(row=row, col=1, **_AXIS)
    fig.update_xaxes(title="seconds ago (0 = now)", row=len(panels), col=1)
    return fig
