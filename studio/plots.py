"""Plotly figures from plain data: the training loss chart and the GPU history chart."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

LOSS_COLOR = "rgba(99, 110, 250, 0.35)"
SMOOTH_COLOR = "#3b4cca"
LR_COLOR = "#e4572e"
EVAL_COLOR = "#17a589"
GPU_COLORS = ("#4f46e5", "#0891b2", "#16a34a", "#ca8a04", "#dc2626", "#9333ea", "#db2777", "#475569")
_LAYOUT = dict(
    template="plotly_white",
    margin=dict(l=50, r=50, t=36, b=40),
    height=320,
    legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    hovermode="x unified",
)


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


def loss_figure(series: Mapping[str, Sequence] | None, title: str = "") -> go.Figure:
    """Loss (raw + smoothed) against step, lr on a second axis, dotted lines at epoch ends."""
    series = series or {}
    steps = list(series.get("step", []))
    losses = list(series.get("loss", []))
    lrs = list(series.get("lr", []))
    fig = go.Figure()
    if steps:
        fig.add_trace(go.Scatter(x=steps, y=losses, name="loss", mode="lines+markers" if len(steps) < 60 else "lines",
                                 line=dict(color=LOSS_COLOR, width=1), marker=dict(size=4)))
        fig.add_trace(go.Scatter(x=steps, y=ema_smooth(losses, smoothing_weight(len(losses))),
                                 name="smoothed", mode="lines", line=dict(color=SMOOTH_COLOR, width=2.5)))
        if lrs and any(v is not None for v in lrs):
            fig.add_trace(go.Scatter(x=steps, y=lrs, name="lr", yaxis="y2", mode="lines",
                                     line=dict(color=LR_COLOR, width=1.5, dash="dot")))
        for name, points in (series.get("eval") or {}).items():  # held-out loss: the curve that tells overfitting
            fig.add_trace(go.Scatter(x=points["step"], y=points["loss"], name=f"eval loss ({name})",
                                     mode="lines+markers", line=dict(color=EVAL_COLOR, width=2), marker=dict(size=6)))
        for epoch_step in series.get("epoch_steps", []) or []:
            fig.add_vline(x=epoch_step, line=dict(color="rgba(0,0,0,0.25)", width=1, dash="dash"))
    else:
        fig.add_annotation(text="no steps yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=14, color="#888"))
    fig.update_layout(
        **_LAYOUT,
        title=dict(text=title, font=dict(size=14)),
        xaxis=dict(title="step", rangemode="tozero"),
        yaxis=dict(title="loss"),
        yaxis2=dict(title="lr", overlaying="y", side="right", showgrid=False, exponentformat="e", rangemode="tozero"),
    )
    return fig


def gpu_history_figure(history: Mapping[int, Sequence[Mapping[str, float]]]) -> go.Figure:
    """Utilization (solid) and memory use (dashed) in percent per GPU over time.

    `history` maps a GPU index to samples `{"time": unix_s, "util": pct, "mem": pct}`.
    """
    fig = go.Figure()
    for n, (index, samples) in enumerate(sorted(history.items())):
        if not samples:
            continue
        t0 = samples[-1]["time"]
        xs = [round(s["time"] - t0, 1) for s in samples]
        color = GPU_COLORS[n % len(GPU_COLORS)]
        # One legend entry per GPU; its memory line (dashed, same color) toggles with it.
        fig.add_trace(go.Scatter(x=xs, y=[s["util"] for s in samples], name=f"GPU {index}", mode="lines",
                                 legendgroup=str(index), line=dict(color=color),
                                 hovertemplate="util %{y:.0f}%"))
        fig.add_trace(go.Scatter(x=xs, y=[s["mem"] for s in samples], name=f"GPU {index} memory", mode="lines",
                                 legendgroup=str(index), showlegend=False, line=dict(color=color, dash="dash"),
                                 hovertemplate="memory %{y:.0f}%"))
    if not fig.data:
        fig.add_annotation(text="no GPU samples", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=14, color="#888"))
    fig.update_layout(**_LAYOUT, xaxis=dict(title="seconds ago (0 = now)"),
                      yaxis=dict(title="% (solid: utilization, dashed: memory)", range=[0, 100]))
    return fig
