"""A generation request as the service tracks it, and what the service needs of a scheduler."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.inference.request import InferRequest

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RequestState = str  # one of: queued, waiting, loading, running, succeeded, failed, cancelled


class DeviceScheduler(Protocol):
    def acquire_devices(self, holder: str, count: int = 1) -> list[int] | None: ...

    def release_devices(self, holder: str) -> None: ...


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
    done: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "state": self.state, "step": self.step,
                "total_steps": self.total_steps, "eta_s": self.eta_s, "error": self.error,
                "error_kind": self.error_kind, "gallery_ids": list(self.gallery_ids), "timings": dict(self.timings),
                "seed": self.request.seed, "created_at": self.created_at, "started_at": self.started_at,
                "ended_at": self.ended_at, "worker": self.worker, "request": self.request.to_dict()}
