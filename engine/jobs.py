"""Job records: the status enum and the `Job` dataclass the store, scheduler, CLI and UI share."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.numbers import SQLITE_INT_MAX, whole_number


class JobStatus(str, Enum):
    """Where a job is in its life. Terminal states never change except through `resume`."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """A process exists (or may exist) for the job and holds its devices."""
        return self in ACTIVE_STATUSES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.LOST})
ACTIVE_STATUSES = frozenset({JobStatus.STARTING, JobStatus.RUNNING, JobStatus.STOPPING})
RESUMABLE_STATUSES = frozenset({JobStatus.STOPPED, JobStatus.FAILED, JobStatus.LOST})


class JobError(ValueError):
    """A job operation that cannot be done (unknown id, wrong state, bad GPU request)."""


def parse_job_id(value: Any) -> int:
    """A job id from outside (API, form, CLI): a whole number >= 1, else a JobError that says so."""
    try:
        return whole_number(value, 1, SQLITE_INT_MAX)
    except ValueError as exc:
        raise JobError(f"job id {exc}") from None


@dataclass
class Job:
    """One row of the jobs table.

    `gpus_requested` is "2" (a count) or "0,1" (explicit indices, `gpus_explicit` True).
    `gpus_assigned` holds GPU indices, or negative numbers for CPU slots (-1, -2, ...).
    """

    id: int
    kind: str  # "train" | "infer"
    name: str
    owner: str
    status: JobStatus
    config_toml: str = ""
    gpus_requested: str = "1"
    gpus_explicit: bool = False
    gpus_assigned: list[int] = field(default_factory=list)
    master_port: int | None = None
    pid: int | None = None
    pid_start_time: float | None = None
    run_dir: str | None = None
    log_path: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    failure_reason: str | None = None
    failure_hint: str | None = None
    log_tail: str | None = None
    priority: int = 0
    queue_pos: float = 0.0
    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    eta_s: float | None = None
    phase: str | None = None  # "caching", "training", ... (from the trainer's events)
    resume: bool = False  # the next launch passes --resume
    attempts: int = 0  # launches so far (resumes included)
    stop_requested_at: float | None = None
    updated_at: float = 0.0

    @property
    def requested_count(self) -> int:
        return len(self.requested_indices) if self.gpus_explicit else int(self.gpus_requested)

    @property
    def requested_indices(self) -> list[int]:
        return [int(x) for x in self.gpus_requested.split(",") if x.strip()] if self.gpus_explicit else []

    @property
    def progress_text(self) -> str:
        """A short progress summary for lists: '120/400 loss 0.0312 ETA 3m20s'."""
        parts: list[str] = []
        if self.step is not None:
            parts.append(f"{self.step}/{self.total_steps}" if self.total_steps else str(self.step))
        if self.last_loss is not None:
            parts.append(f"loss {self.last_loss:.4g}")
        if self.eta_s is not None and self.status == JobStatus.RUNNING:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if not parts and self.phase:
            parts.append(self.phase)
        return " ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
