"""The trainer's event writer (metrics.jsonl); every other file of a run belongs to engine.rundir."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes. Every line has `event` and `time`."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in fields.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if event in ("warning", "error"):
            logger.warning("%s: %s", event, fields.get("message"))
        elif event in ("save", "checkpoint", "done", "stopped", "start", "epoch"):
            logger.info("%s %s", event, fields)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers treat null as "no value"
    if isinstance(value, Path):
        return str(value)
    return value
