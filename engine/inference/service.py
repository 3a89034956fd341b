"""InferenceService: queues generation requests and runs them on warm worker processes.

One worker slot per device the scheduler can hand out (`max_workers`). A slot holds devices from
the scheduler (`acquire_devices(holder, 1)`; `[-1]` = a CPU slot) only while its worker runs, so a
generation never lands on a GPU a training job holds. The worker process stays up while
requests keep coming and keeps its pipeline warm; after `idle_timeout_s` without work the slot stops
it and gives the devices back. Request states: queued, waiting (for a device), loading, running,
succeeded, failed, cancelled. Finished videos become gallery items.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from engine.config import ConfigError
from engine.gallery import Gallery
from engine.inference.request import SPATIAL_MULTIPLE, TEMPORAL_STRIDE, InferRequest, resolve_lora_path
from engine.inference.slots import Slot
from engine.inference.speed import InferenceSpeed
from engine.inference.tracking import TERMINAL_STATES, DeviceScheduler, RequestState, Tracked
from engine.models import ModelNotFoundError, resolve_model
from engine.paths import DataLayout
from engine.store.db import Database

log = logging.getLogger(__name__)

__all__ = ["InferenceService", "RequestState", "TERMINAL_STATES"]

class InferenceService:
    def __init__(self, store: Database, layout: DataLayout, scheduler: DeviceScheduler | None,
                 gallery: Gallery, *, idle_timeout_s: float = 600.0, max_workers: int | None = None,
                 python: str = sys.executable, history: int = 500,
                 speed: InferenceSpeed = InferenceSpeed()) -> None:
        self.store = store
        self.speed = speed
        self.layout = layout
        self.scheduler = scheduler
        self.gallery = gallery
        self.idle_timeout_s = idle_timeout_s
        self.python = python
        self._requests: dict[str, Tracked] = {}
        self._order: deque[str] = deque()
        self._history = history
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        if max_workers is None:  # one worker per device the scheduler can hand out; idle slots hold nothing
            max_workers = _device_count(scheduler)
        self._slots = [Slot(self, f"infer-{uuid.uuid4().hex[:6]}-{n}") for n in range(max(1, max_workers))]
        for slot in self._slots:
            slot.start()

    # ---- public API ----------------------------------------------------------------------------
    def submit(self, req: InferRequest, owner: str) -> str:
        """Validate, fill in the seed, queue; returns the request id. Bad input raises ConfigError."""
        if self._stopping.is_set():
            raise RuntimeError("the inference service is shut down")
        errors: list[tuple[str, str]] = []
        model_path, spatial, temporal = None, SPATIAL_MULTIPLE, TEMPORAL_STRIDE
        try:  # reads the model's config files only: sizes depend on its VAE stride and patch
            model_path, spatial, temporal = self._check_model(req)
        except ConfigError as exc:
            errors += exc.errors
        try:
            req.validate(spatial_multiple=spatial, temporal_stride=temporal)
        except ConfigError as exc:
            errors += exc.errors
        if errors:
            raise ConfigError(errors)
        lora_files = self._check_loras(req)
        req = req.with_seed()
        if req.flow_shift is None:
            req = req.model_copy(update={"flow_shift": _model_flow_shift(Path(model_path))})
        tracked = Tracked(id=uuid.uuid4().hex[:12], owner=owner, request=req, model_path=str(model_path),
                           lora_files=lora_files, total_steps=req.steps * req.num_videos)
        with self._lock:
            self._requests[tracked.id] = tracked
            self._order.append(tracked.id)
            self._forget_old()
        self._queue.put(tracked.id)
        log.info("queued inference %s for %s (seed %s)", tracked.id, owner, req.seed)
        return tracked.id

    def status(self, request_id: str) -> dict[str, Any]:
        with self._lock:
            tracked = self._requests.get(request_id)
            if tracked is None:
                raise KeyError(f"unknown inference request {request_id!r}")
            return tracked.snapshot()

    def wait(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the request ends (or the timeout passes); returns its status."""
        with self._lock:
            tracked = self._requests[request_id]
        tracked.done.wait(timeout_s)
        return self.status(request_id)

    def cancel(self, request_id: str) -> None:
        """A queued request never starts; a running one stops at its next denoising step."""
        with self._lock:
            tracked = self._requests.get(request_id)
            if tracked is None:
                raise KeyError(f"unknown inference request {request_id!r}")
            if tracked.state in TERMINAL_STATES:
                return
            if tracked.state in ("queued", "waiting"):
                self._finish(tracked, "cancelled")
                return
            slot = next((s for s in self._slots if s.current == request_id), None)
        if slot is not None:
            slot.cancel(request_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Cancel what is queued, stop the workers and give their devices back."""
        self._stopping.set()
        with self._lock:
            for tracked in self._requests.values():
                if tracked.state in ("queued", "waiting"):
                    self._finish(tracked, "cancelled", error="the service shut down")
        for slot in self._slots:
            if slot.current:
                slot.cancel(slot.current)
            self._queue.put(None)
        for slot in self._slots:
            slot.join(timeout_s)

    # ---- checks before anything is queued ---------------------------------------------------------
    def _check_model(self, req: InferRequest) -> tuple[Path, int, int]:
        try:
            path = resolve_model(req.model)
        except ModelNotFoundError as exc:
            raise ConfigError("model", str(exc)) from None
        try:
            from engine.families import get_family

            info = get_family("wan").describe(path)
            return path, info.spatial_multiple, info.temporal_stride
        except (ValueError, OSError) as exc:  # not a Wan pipeline, or its config files are unreadable
            raise ConfigError("model", f"{path}: {exc}") from None

    def _check_loras(self, req: InferRequest) -> list[str]:
        from engine.lora import LoraError, validate_lora

        files, errors = [], []
        for i, spec in enumerate(req.loras):
            try:
                file = resolve_lora_path(spec.path)
                validate_lora(file, family="wan")
                files.append(str(file))
            except (FileNotFoundError, LoraError) as exc:
                errors.append((f"loras[{i}].path", str(exc)))
        if errors:
            raise ConfigError(errors)
        return files

    # ---- bookkeeping used by the slots -----------------------------------------------------------
    def _next(self, timeout_s: float) -> Tracked | None | bool:
        """The next queued request; None on shutdown; False when nothing came within the timeout."""
        try:
            request_id = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return False
        if request_id is None:
            return None
        with self._lock:
            tracked = self._requests.get(request_id)
            return tracked if tracked is not None and tracked.state == "queued" else False

    def _update(self, tracked: Tracked, **values: Any) -> None:
        with self._lock:
            if tracked.state in TERMINAL_STATES:
                return
            for key, value in values.items():
                setattr(tracked, key, value)

    def _finish(self, tracked: Tracked, state: str, error: str | None = None, kind: str | None = None) -> None:
        # Caller may hold the lock (RLock-free: only plain assignments here).
        if tracked.state in TERMINAL_STATES:
            return
        tracked.state = state
        tracked.error = error
        tracked.error_kind = kind
        tracked.eta_s = 0.0 if state == "succeeded" else None
        tracked.ended_at = time.time()
        tracked.done.set()
        log.info("inference %s %s%s", tracked.id, state, f": {error}" if error else "")

    def _forget_old(self) -> None:
        while len(self._order) > self._history:
            oldest = self._order[0]
            if self._requests[oldest].state not in TERMINAL_STATES:
                break
            self._order.popleft()
            del self._requests[oldest]


def _device_count(scheduler: DeviceScheduler | None, cap: int = 8) -> int:
    pool = getattr(scheduler, "device_pool", None)
    try:
        return max(1, min(cap, len(pool()))) if callable(pool) else 1
    except Exception:  # no inventory right now: one worker is always safe
        return 1


def _model_flow_shift(model_path: Path, fallback: float = 3.0) -> float:
    """The flow shift a model ships with (scheduler/scheduler_config.json), Wan2.1's 3.0 if absent."""
    try:
        config = json.loads((model_path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        return float(config.get("flow_shift") or fallback)
    except (OSError, ValueError, TypeError):
        return fallback
