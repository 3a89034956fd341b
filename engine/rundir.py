"""The run directory of a training job: the one owner of every file name in it and of how each is
read and written, for the trainer, the scheduler, the launcher, the API and the gallery.

    run.toml               the config as the trainer read it (the studio writes it before a launch)
    metrics.jsonl          the trainer's events (start, cache, step, save, done, stopped, error, ...)
    train.log              everything the processes printed (node K > 0 of a multi-node run:
                           train.nodeK.log: several machines appending to one shared file interleave)
    save | stop | save_quit    control requests, consumed by the trainer. The studio writes
                           {"id": ..., "time": ...}; an empty file (`touch stop`) counts from its mtime
    epochN/ stepN/         LoRA saves: adapter_model.safetensors (+ adapter_config.json); a two-expert
                           run: high_noise_model.safetensors + low_noise_model.safetensors
    samples/<label>/       videos drawn with the LoRA at that save (k.mp4 + k.png; label start|epochN|stepN)
    global_stepN/          DeepSpeed checkpoints; complete.json is written last

Stdlib only besides engine.paths (the scheduler imports it); reading a save's step imports the LoRA module lazily.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.paths import user_folder

logger = logging.getLogger(__name__)

CONFIG_FILE = "run.toml"
METRICS_FILE = "metrics.jsonl"
LORA_FILE = "adapter_model.safetensors"
# A two-expert save (Wan2.2 A14B): one file per expert, named as Wan2.2's own expert folders and the
# LoRAs ComfyUI users load in pairs (high_noise_model / low_noise_model).
EXPERT_LORA_FILES = {"high_noise": "high_noise_model.safetensors", "low_noise": "low_noise_model.safetensors"}
COMPLETE_MARKER = "complete.json"
SAVE_FILE = "save"
STOP_FILE = "stop"
SAMPLES_DIR = "samples"
STOP_FILES = (STOP_FILE, "save_quit")
FINAL_EVENTS = ("done", "stopped", "error")
_CHECKPOINT_DIR = re.compile(r"^global_step(\d+)$")
_SAVE_DIR = re.compile(r"^(epoch|step)(\d+)$")


class ResumeError(RuntimeError):
    """--resume found nothing to resume from."""


@dataclass(frozen=True)
class SavedLora:
    label: str  # the folder: epochN or stepN
    file: Path
    step: int  # the optimizer step of the save, from the file's own metadata (-1: unknown)
    epoch: int | None


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- files ---------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def log(self, node_rank: int | None = None) -> Path:
        return self.path / (f"train.node{node_rank}.log" if node_rank else "train.log")

    def write_config(self, text: str) -> Path:
        """Atomically; the temporary name is this process's own (every node's studio writes it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{CONFIG_FILE}.{socket.gethostname()}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config)
        return self.config

    def final_event(self, tail_bytes: int = 64 << 10) -> dict[str, Any] | None:
        """The trainer's last done/stopped/error event, unless a later launch started after it;
        reads only the end of the file."""
        data = read_tail(self.metrics, tail_bytes)
        for line in reversed((data or b"").splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") in FINAL_EVENTS:
                return event
            if isinstance(event, dict) and event.get("event") == "start":
                return None
        return None

    # ---- control requests ----------------------------------------------------------------------
    def request_stop(self) -> str:
        """Ask the trainer to stop; returns the request's id (the trainer logs it when it obeys)."""
        return _write_request(self.path / STOP_FILE)

    def request_save(self) -> str:
        return _write_request(self.path / SAVE_FILE)

    def take_control_request(self) -> tuple[bool, bool]:
        """(save_now, stop); the files are consumed so a resume does not re-trigger them."""
        save = _consume(self.path / SAVE_FILE)
        stop = any([_consume(self.path / name) for name in STOP_FILES])
        return save, stop

    def discard_stale_control_files(self, older_than: float) -> None:
        """Remove save/stop requests made before `older_than` (unix time), i.e. for an earlier
        launch, so a resumed run does not stop at once; later ones are for this launch."""
        for name in (SAVE_FILE, *STOP_FILES):
            path = self.path / name
            made = _request_time(path)
            if made is not None and made < older_than:
                path.unlink(missing_ok=True)
                logger.info("removed stale control file %s", path)

    def sample_dir(self, label: str) -> Path:
        return self.path / SAMPLES_DIR / label

    # ---- LoRA saves ----------------------------------------------------------------------------
    def lora_dir(self, label: str) -> Path:
        return self.path / label

    def loras(self) -> list[SavedLora]:
        """Saved LoRAs, oldest first by the step each was saved at (epoch1 saved at step 100 comes
        after step50, whatever the folder names say)."""
        if not self.path.is_dir():
            return []
        found = []
        for folder in self.path.iterdir():
            match = _SAVE_DIR.match(folder.name)
            file = folder / LORA_FILE
            if not file.is_file():  # a two-expert save is named by its high-noise file
                file = folder / EXPERT_LORA_FILES["high_noise"]
            if match is None or not file.is_file():
                continue
            step, epoch = _saved_at(str(file), file.stat().st_mtime_ns)
            if step < 0 and match.group(1) == "step":
                step = int(match.group(2))
            found.append(SavedLora(folder.name, file, step, epoch))
        return sorted(found, key=lambda s: (s.step, s.label.startswith("epoch"), s.label))

    def newest_lora(self) -> SavedLora | None:
        saves = self.loras()
        return saves[-1] if saves else None

    # ---- DeepSpeed checkpoints -----------------------------------------------------------------
    def latest_complete_checkpoint(self) -> tuple[str, int] | None:
        """(tag, step) of the newest global_stepN with its completion marker; partial ones are ignored."""
        best: tuple[str, int] | None = None
        if not self.path.is_dir():
            return None
        for child in self.path.iterdir():
            match = _CHECKPOINT_DIR.match(child.name)
            if match is None or not (child / COMPLETE_MARKER).is_file():
                continue
            if best is None or int(match.group(1)) > best[1]:
                best = (child.name, int(match.group(1)))
        return best

    def mark_checkpoint_complete(self, tag: str, step: int, epoch: int) -> None:
        marker = self.path / tag / COMPLETE_MARKER
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "epoch": epoch, "time": time.time()}), encoding="utf-8")
        tmp.replace(marker)


def slugify(text: str, max_len: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].strip("-") or "job"


def run_dir_name(job_id: int, name: str, owner: str) -> Path:
    """A studio job's run directory under runs/: `<owner's folder>/<id>-<slug of its name>`. Jobs
    keep the run_dir recorded at submit, so runs made before the per-user folders stay where they are."""
    return Path(user_folder(owner)) / f"{job_id}-{slugify(name)}"


def new_run_dir(output_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d_%H-%M-%S")
    candidate = output_dir / stamp
    suffix = 1
    while candidate.exists():
        candidate = output_dir / f"{stamp}_{suffix}"
        suffix += 1
    return candidate


def find_resumable_run(output_dir: Path) -> Path | None:
    """The newest run directory under output_dir with a complete checkpoint."""
    if not output_dir.is_dir():
        return None
    runs = [d for d in output_dir.iterdir() if d.is_dir() and RunDir(d).latest_complete_checkpoint()]
    return max(runs, key=lambda d: d.stat().st_mtime) if runs else None


# ---- reading the ends of growing files ---------------------------------------------------------
def read_tail(path: str | os.PathLike, max_bytes: int) -> bytes | None:
    """The last `max_bytes` of a file (None when it does not exist): logs and metrics grow large."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - max_bytes))
            return handle.read()
    except FileNotFoundError:
        return None


def read_log_tail(path: str | os.PathLike | None, lines: int | None = 50, max_bytes: int = 256 << 10) -> str:
    """The last `lines` lines of a log (all that fit in `max_bytes` when None), never a cut line."""
    data = read_tail(path, max_bytes) if path else None
    if not data:
        return ""
    text = data.decode("utf-8", "replace")
    if len(data) == max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]  # the first line is probably cut
    kept = text.splitlines()
    return "\n".join(kept if lines is None else kept[-lines:])


# ---- helpers ----------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _saved_at(file: str, mtime_ns: int) -> tuple[int, int | None]:  # noqa: ARG001 - part of the cache key
    """(step, epoch) from a save's metadata (the trainer writes both); (-1, None) when absent."""
    from engine.lora import LoraFormatError, read_safetensors_header

    try:
        meta = read_safetensors_header(Path(file)).get("__metadata__") or {}
    except (OSError, LoraFormatError):
        return -1, None
    step, epoch = meta.get("step", ""), meta.get("epoch", "")
    return (int(step) if str(step).isdigit() else -1), (int(epoch) if str(epoch).isdigit() else None)


def _write_request(path: Path) -> str:
    request_id = os.urandom(6).hex()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{request_id}")
    tmp.write_text(json.dumps({"id": request_id, "time": time.time()}), encoding="utf-8")
    tmp.replace(path)  # the trainer never reads half a request
    return request_id


def _read_request(path: Path) -> dict[str, Any] | None:
    """A control file's request; None when there is none. A file without the studio's JSON (made
    by hand) is a request made at its mtime."""
    try:
        text = path.read_text(encoding="utf-8")
        made = path.stat().st_mtime
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("time"), (int, float)):
        return {"id": None, "time": made}
    return data


def _request_time(path: Path) -> float | None:
    request = _read_request(path)
    return float(request["time"]) if request else None


def _consume(path: Path) -> bool:
    request = _read_request(path)
    if request is None:
        return False
    path.unlink(missing_ok=True)
    logger.info("control request %s (id %s)", path.name, request.get("id"))
    return True
