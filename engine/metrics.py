"""Reading a run's metrics.jsonl: incrementally (byte offsets) and as a downsampled loss series.

The trainer appends one JSON object per line. Readers remember how far they got and only parse
new complete lines, so polling a 100,000-step run every second costs only what was added.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.rundir import METRICS_FILE
from engine.scoring import best_save

log = logging.getLogger(__name__)



class MetricsReader:
    """Returns the events appended since the last call. A half-written last line waits."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0

    def skip_to_end(self) -> None:
        """Only events appended from now on count (a relaunch in a run dir with old events)."""
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0

    def seek_tail(self, nbytes: int) -> None:
        """Start at the first whole line within the last `nbytes` (re-attaching to a long run)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
            return
        if size <= nbytes:
            self.offset = 0
            return
        with open(self.path, "rb") as handle:
            handle.seek(size - nbytes)
            chunk = handle.read(nbytes)
        newline = chunk.find(b"\n")
        self.offset = size - nbytes + newline + 1 if newline >= 0 else size

    def read_new(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < self.offset:  # replaced or truncated: start over
                    log.info("%s shrank; reading it from the start", self.path)
                    self.offset = 0
                handle.seek(self.offset)
                data = handle.read(max_bytes if max_bytes is not None else size - self.offset)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return self._parse(data[: end + 1])

    def _parse(self, data: bytes) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
        return events


# ---- loss series for plots ---------------------------------------------------------------------
@dataclass
class _Bucket:
    """Min and max loss of a step range, with their steps and learning rates."""

    min_step: int
    min_loss: float
    min_lr: float | None
    max_step: int
    max_loss: float
    max_lr: float | None

    def merge(self, other: "_Bucket") -> "_Bucket":
        low = self if self.min_loss <= other.min_loss else other
        high = self if self.max_loss >= other.max_loss else other  # new object: no aliasing
        return _Bucket(low.min_step, low.min_loss, low.min_lr, high.max_step, high.max_loss, high.max_lr)


@dataclass
class LossSeries:
    """Incrementally built, min/max-preserving downsampled loss curve of one run.

    Points fall into buckets of `width` steps; when there are more than max_points/2 buckets,
    neighbours merge and the width doubles, so the work per update is proportional to new lines.
    Steps that go backwards (a resume replaying steps) drop the later points and rebuild once.
    """

    run_dir: Path
    max_points: int = 2000
    reader: MetricsReader = field(init=False)
    steps: array = field(default_factory=lambda: array("q"))
    losses: array = field(default_factory=lambda: array("d"))
    lrs: array = field(default_factory=lambda: array("d"))
    elapsed: array = field(default_factory=lambda: array("d"))  # seconds since the run started (wall-clock axis)
    epoch_steps: list[int] = field(default_factory=list)
    epoch_mean_loss: list[float] = field(default_factory=list)
    eval_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # eval set -> (step, loss)
    samples: list[dict[str, Any]] = field(default_factory=list)  # `sample` events: videos and scores per save
    saves: list[dict[str, Any]] = field(default_factory=list)
    total_steps: int | None = None
    epochs: int | None = None
    pace: dict[str, Any] = field(default_factory=dict)  # the latest step's epoch, speed, elapsed and ETA
    width: int = 1
    buckets: "OrderedDict[int, _Bucket]" = field(default_factory=OrderedDict)
    _result: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.reader = MetricsReader(Path(self.run_dir) / METRICS_FILE)

    def update(self) -> dict[str, Any]:
        with self._lock:
            events = self.reader.read_new()
            for event in events:
                self._add(event)
            if events or self._result is None:
                self._result = self._render()
            return self._result

    def _add(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start" and event.get("total_steps") is not None:
            self.total_steps = int(event["total_steps"])
            self.epochs = event.get("epochs")
        elif kind == "epoch" and event.get("step") is not None:
            self.epoch_steps.append(int(event["step"]))
            self.epoch_mean_loss.append(float(event.get("mean_loss") or 0.0))
        elif kind in ("sample", "save") and event.get("step") is not None:
            kept = self.samples if kind == "sample" else self.saves
            while kept and kept[-1]["step"] >= int(event["step"]) and kept[-1].get("label") != "start":
                kept.pop()  # a resume replays steps
            kept.append({k: v for k, v in event.items() if k not in ("event", "time", "path")} | {"event": kind})
        elif kind == "eval" and event.get("loss") is not None and event.get("step") is not None:
            points = self.eval_losses.setdefault(str(event.get("name") or "eval"), [])
            while points and points[-1][0] >= int(event["step"]):  # a resume replays steps
                points.pop()
            points.append((int(event["step"]), float(event["loss"])))
        elif kind == "step" and event.get("loss") is not None and event.get("step") is not None:
            step, loss = int(event["step"]), float(event["loss"])
            self.pace = {k: event[k] for k in ("step", "epoch", "samples_per_s", "elapsed_s", "eta_s") if k in event}
            lr = float(event["lr"]) if event.get("lr") is not None else float("nan")
            if self.steps and step <= self.steps[-1]:
                self._truncate(step)
            self.steps.append(step)
            self.losses.append(loss)
            self.lrs.append(lr)
            self.elapsed.append(float(event["elapsed_s"]) if event.get("elapsed_s") is not None else float("nan"))
            self._bucket(step, loss, lr)

    def _bucket(self, step: int, loss: float, lr: float) -> None:
        key = step // self.width
        existing = self.buckets.get(key)
        if existing is None:
            self.buckets[key] = _Bucket(step, loss, lr, step, loss, lr)
        else:  # buckets are owned by this series: update in place, no allocation per step
            if loss < existing.min_loss:
                existing.min_step, existing.min_loss, existing.min_lr = step, loss, lr
            if loss > existing.max_loss:
                existing.max_step, existing.max_loss, existing.max_lr = step, loss, lr
        while len(self.buckets) > max(1, (self.max_points - 1) // 2):  # room for the last point
            self._coarsen()

    def _coarsen(self) -> None:
        self.width *= 2
        merged: OrderedDict[int, _Bucket] = OrderedDict()
        for key, bucket in self.buckets.items():
            new_key = key // 2
            merged[new_key] = merged[new_key].merge(bucket) if new_key in merged else bucket
        self.buckets = merged

    def _truncate(self, step: int) -> None:
        keep = bisect.bisect_left(self.steps, step)
        del self.steps[keep:], self.losses[keep:], self.lrs[keep:], self.elapsed[keep:]
        cut = bisect.bisect_left(self.epoch_steps, step)
        del self.epoch_steps[cut:], self.epoch_mean_loss[cut:]
        self.width, self.buckets = 1, OrderedDict()
        for s, loss, lr in zip(self.steps, self.losses, self.lrs):
            self._bucket(s, loss, lr)

    def _render(self) -> dict[str, Any]:
        points: list[tuple[int, float, float | None]] = []
        for bucket in self.buckets.values():
            pair = [(bucket.min_step, bucket.min_loss, bucket.min_lr),
                    (bucket.max_step, bucket.max_loss, bucket.max_lr)]
            pair.sort()
            points.append(pair[0])
            if pair[1][0] != pair[0][0]:
                points.append(pair[1])
        if self.steps and (not points or points[-1][0] != self.steps[-1]):
            points.append((self.steps[-1], self.losses[-1], self.lrs[-1]))  # the latest value
        return {
            "step": [p[0] for p in points],
            "loss": [p[1] for p in points],
            "lr": [None if p[2] is None or p[2] != p[2] else p[2] for p in points],
            "elapsed": [self._elapsed_at(p[0]) for p in points],
            "saves": [{"label": e.get("label"), "step": e["step"]} for e in self.saves],
            "epoch_steps": list(self.epoch_steps),
            "epoch_mean_loss": list(self.epoch_mean_loss),
            "eval": {name: {"step": [s for s, _ in points], "loss": [v for _, v in points]}
                     for name, points in self.eval_losses.items()},
            "samples": [_without_server_paths(e) for e in self.samples],
            "best": best_save([*self.samples, *self.saves,
                               *({"event": "eval", "step": s, "loss": v} for pts in self.eval_losses.values()
                                 for s, v in pts)]),
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "pace": dict(self.pace),
            "points_total": len(self.steps),
        }

    def _elapsed_at(self, step: int) -> float | None:
        value = self.elapsed[bisect.bisect_left(self.steps, step)]
        return None if value != value else value  # NaN: a trainer that did not say


class LossSeriesCache:
    """Keeps the series of the most recently asked-for runs (bounded, thread-safe)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._series: OrderedDict[tuple[str, int], LossSeries] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_dir: str | os.PathLike, max_points: int = 2000) -> dict[str, Any]:
        key = (str(Path(run_dir).resolve()), int(max_points))
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = LossSeries(Path(key[0]), max_points=key[1])
            self._series.move_to_end(key)
            while len(self._series) > self.capacity:
                self._series.popitem(last=False)
        return series.update()


def loss_series(run_dir: str | os.PathLike, max_points: int = 2000,
                cache: LossSeriesCache | None = None) -> dict[str, Any]:
    """Downsampled loss curve: lists `step`, `loss`, `lr` (<= max_points), `epoch_steps`,
    `epoch_mean_loss`, `eval` ({eval set: {step, loss}}, every eval point), `samples` (the `sample`
    events: label, step, scores, videos as run-relative files), `best` (engine.scoring.best_save),
    plus `total_steps`. With a `cache` (the studio keeps one), only bytes added
    since the last call are parsed; without one the whole file is read once."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if cache is None:
        return LossSeries(Path(run_dir), max_points=int(max_points)).update()
    return cache.get(run_dir, max_points)


def _without_server_paths(event: dict[str, Any]) -> dict[str, Any]:
    """Sample videos named relative to their run (samples/<label>/<k>.mp4): users never see server paths."""
    videos = [{**v, "file": "/".join(Path(v["file"]).parts[-3:])} for v in event.get("videos", [])]
    return {**event, "videos": videos}
