"""The run directory: metrics.jsonl events, control files, LoRA folders and checkpoint discovery."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run.toml"
COMPLETE_MARKER = "complete.json"
SAVE_FILE = "save"
STOP_FILES = ("stop", "save_quit")
_STEP_DIR = re.compile(r"^global_step(\d+)$")


class ResumeError(RuntimeError):
    """--resume found nothing to resume from."""


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


def new_run_dir(output_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d_%H-%M-%S")
    candidate = output_dir / stamp
    suffix = 1
    while candidate.exists():
        candidate = output_dir / f"{stamp}_{suffix}"
        suffix += 1
    return candidate


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def latest_complete_checkpoint(run_dir: Path) -> tuple[str, int] | None:
    """(tag, step) of the newest global_stepN that has the completion marker; partial ones are ignored."""
    best: tuple[str, int] | None = None
    if not run_dir.is_dir():
        return None
    for child in run_dir.iterdir():
        step = checkpoint_step(child)
        if step is None or not (child / COMPLETE_MARKER).is_file():
            continue
        if best is None or step > best[1]:
            best = (child.name, step)
    return best


def find_resumable_run(output_dir: Path) -> Path | None:
    """The newest run directory under output_dir with a complete checkpoint."""
    if not output_dir.is_dir():
        return None
    runs = [d for d in output_dir.iterdir() if d.is_dir() and latest_complete_checkpoint(d)]
    return max(runs, key=lambda d: d.stat().st_mtime) if runs else None


def mark_checkpoint_complete(run_dir: Path, tag: str, step: int, epoch: int) -> None:
    marker = run_dir / tag / COMPLETE_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "epoch": epoch, "time": time.time()}), encoding="utf-8")
    tmp.replace(marker)


def take_control_request(run_dir: Path) -> tuple[bool, bool]:
    """(save_now, stop) from control files; the files are consumed so a resume does not re-trigger."""
    save = _consume(run_dir / SAVE_FILE)
    stop = any([_consume(run_dir / name) for name in STOP_FILES])
    return save, stop


def discard_stale_control_files(run_dir: Path, older_than: float) -> None:
    """Remove save/stop files left by an earlier process (made before `older_than`, unix time),
    so a resumed run does not stop at once; newer ones are requests for this process."""
    for name in (SAVE_FILE, *STOP_FILES):
        path = run_dir / name
        try:
            if path.stat().st_mtime < older_than:
                path.unlink()
                logger.info("removed stale control file %s", path)
        except OSError:
            pass


def _consume(path: Path) -> bool:
    if path.exists():
        try:
            path.unlink()
        except OSError:
            pass
        return True
    return False
