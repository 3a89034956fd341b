"""A generation request as the service tracks it, and what the service needs of a scheduler."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.inference.request import InferRequest

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "lost"})
# queued, waiting (for a device), loading, running, then one of TERMINAL_STATES; "lost": the
# service that ran it stopped mid-way (a crash or a restart) and nobody can finish it.
RequestState = str
# Fields written to the database on every change; step, total_steps and eta_s at most once a second.
DURABLE_FIELDS = ("state", "error", "error_kind", "gallery_ids", "timings", "started_at", "ended_at", "worker")


class DeviceScheduler(Protocol):
    def acquire_devices(self, holder: str, count: int = 1) -> list[int] | None: ...

    def release_devices(self, holder: str) -> None: ...

    def reserved_for_queue(self) -> set[int]: ...

    def device_blockers(self) -> list[Any]: ...


@dataclass
class Tracked:
    id: str
    owner: str
    request: InferRequest
    model_path: str
    lora_files: list[str]
    state: RequestState = "queued"
    step: int = 0
    total_steps: int = 0
    eta_s: float | None = None
    error: str | None = None
    error_kind: str | None = None
    gallery_ids: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    worker: str | None = None
    waiting_for: str | None = None  # while "waiting": what holds the devices
    cancel_requested: bool = False  # asked from another process; its service stops it within a second
    warning: str | None = None  # said before it starts: a long CPU estimate (engine.inference.estimate)
    done: threading.Event = field(default_factory=threading.Event)
    persisted_at: float = 0.0  # monotonic time of the last progress write

    def row(self) -> dict[str, Any]:
        """The database row of a new request (engine.store.requests)."""
        return {"id": self.id, "owner": self.owner, "request": self.request.to_dict(), "model_path": self.model_path,
                "lora_files": list(self.lora_files), "total_steps": self.total_steps, "created_at": self.created_at,
                "warning": self.warning, **{name: getattr(self, name) for name in DURABLE_FIELDS}}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Tracked":
        tracked = cls(id=row["id"], owner=row["owner"], request=InferRequest.from_dict(row["request"]),
                      model_path=row["model_path"], lora_files=list(row["lora_files"]))
        for name in ("step", "total_steps", "created_at", *DURABLE_FIELDS):
            setattr(tracked, name, row[name])
        tracked.cancel_requested = bool(row.get("cancel_requested"))
        tracked.warning = row.get("warning")
        if tracked.state in TERMINAL_STATES:
            tracked.done.set()
        return tracked

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "state": self.state, "step": self.step,
                "total_steps": self.total_steps, "eta_s": self.eta_s, "error": self.error,
                "error_kind": self.error_kind, "gallery_ids": list(self.gallery_ids), "timings": dict(self.timings),
                "seed": self.request.seed, "created_at": self.created_at, "started_at": self.started_at,
                "ended_at": self.ended_at, "worker": self.worker, "request": self.request.to_dict(),
                "waiting_for": self.waiting_for if self.state == "waiting" else None,
                "cancel_requested": self.cancel_requested and self.state not in TERMINAL_STATES,
                "warning": self.warning}
