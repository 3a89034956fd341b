"""InferenceService: queues generation requests and runs them on warm worker processes.

One worker slot per device the scheduler can hand out (`max_workers`). A slot holds devices from
the scheduler (`acquire_devices(holder, 1)`; `[-1]` = a CPU slot) only while its worker runs, so a
generation never lands on a GPU a training job holds. The worker process stays up while
requests keep coming and keeps its pipeline warm; after `idle_timeout_s` without work the slot stops
it and gives the devices back, and an idle worker gives them back at once when the head of the
training queue needs them; that slot starts a worker again and preloads its last model as soon as a
device is free (the next generation finds it warm). Request states: queued, waiting (for a
device), loading, running, succeeded, failed, cancelled, lost. Finished videos become gallery items before the request reads as
succeeded.

Requests are durable (engine.store.requests): each change is written to SQLite, so a status call
after a restart answers. A new service adopts the queued requests of a service process that is
gone and marks the ones that process was running as lost. A cancel for a request another live
process runs (the CLI's, seen from the app, or the reverse) goes through the database: a flag the
owning service polls from its slots' loops.
"""

from __future__ import annotations

import json
import logging
import os
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
from engine.gpus import on_cpu
from engine.inference.estimate import cpu_warning
from engine.inference.request import SPATIAL_MULTIPLE, TEMPORAL_STRIDE, InferRequest, resolve_lora_path
from engine.inference.slots import Slot, cuda_available
from engine.inference.speed import InferenceSpeed
from engine.inference.tracking import DURABLE_FIELDS, TERMINAL_STATES, DeviceScheduler, RequestState, Tracked
from engine.launcher import is_same_process, process_identity
from engine.models import ModelNotFoundError, resolve_model
from engine.paths import DataLayout
from engine.store.db import Database
from engine.store.requests import RequestStore

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
        self._polled_at = 0.0
        self.requests = RequestStore(store)
        identity = process_identity(os.getpid())
        self._identity = (os.getpid(), identity.start_time if identity else None)
        self._recover()
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
                           lora_files=lora_files, total_steps=req.steps * req.num_videos,
                           warning=cpu_warning(Path(model_path), req) if self._on_cpu() else None)
        if tracked.warning:
            log.warning("inference %s: %s", tracked.id, tracked.warning)
        self.requests.insert(**tracked.row(), service_pid=self._identity[0], service_start_time=self._identity[1])
        with self._lock:
            self._requests[tracked.id] = tracked
            self._order.append(tracked.id)
            self._forget_old()
        self._queue.put(tracked.id)
        log.info("queued inference %s for %s (seed %s)", tracked.id, owner, req.seed)
        return tracked.id

    def status(self, request_id: str) -> dict[str, Any]:
        """Live progress of a request this process runs, else its record (any process, any time)."""
        with self._lock:
            tracked = self._requests.get(request_id)
            if tracked is not None:
                return tracked.snapshot()
        row = self.requests.get(str(request_id))
        if row is None:
            raise KeyError(f"unknown inference request {request_id!r}")
        return Tracked.from_row(row).snapshot()

    def list(self, owner: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Requests, newest first, with their owner (all owners when None)."""
        return [self.status(row["id"]) for row in self.requests.list(owner, limit, offset)]

    def wait(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the request ends (or the timeout passes); returns its status."""
        with self._lock:
            tracked = self._requests.get(request_id)
        if tracked is not None:
            tracked.done.wait(timeout_s)
        return self.status(request_id)

    def cancel(self, request_id: str) -> None:
        """A queued request never starts; a running one stops at its next denoising step. A request
        another live studio process runs is flagged in the database; that process cancels it."""
        with self._lock:
            tracked = self._requests.get(request_id)
            if tracked is None:
                self._cancel_elsewhere(request_id)
                return
            if tracked.state in TERMINAL_STATES:
                return
            if tracked.state in ("queued", "waiting"):
                self._finish(tracked, "cancelled")
                return
            slot = next((s for s in self._slots if s.current == request_id), None)
        if slot is not None:
            slot.cancel(request_id)

    def workers(self) -> list[dict[str, Any]]:
        """The live worker processes: slot, device, pid, the models they keep warm, what they serve."""
        found = []
        for slot in self._slots:
            worker = slot.worker
            if worker is not None and worker.alive():
                found.append({"holder": slot.holder, "devices": list(worker.devices), "device": worker.device,
                              "pid": worker.process.pid, "warm": sorted(worker.warm), "serving": slot.current})
        return found

    def shutdown(self, timeout_s: float = 30.0, *, force: bool = False) -> None:
        """Cancel what is queued, stop the workers and give their devices back. `force` (a second
        Ctrl-C, SIGTERM): running requests end as cancelled now and the workers are killed."""
        self._stopping.set()
        with self._lock:
            for tracked in self._requests.values():
                if tracked.state in ("queued", "waiting") or (force and tracked.state not in TERMINAL_STATES):
                    self._finish(tracked, "cancelled", error="the service shut down")
        for slot in self._slots:
            if force:
                slot.kill_worker()
            elif slot.current:
                slot.cancel(slot.current)
            self._queue.put(None)
        for slot in self._slots:
            slot.join(timeout_s)

    # ---- durability ------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Requests of a service process that is gone: queued ones run here, running ones are lost."""
        for row in self.requests.unfinished(("queued", "waiting", "loading", "running")):
            if is_same_process(row["service_pid"], row["service_start_time"]):
                continue  # another live studio process (app or CLI) runs it
            if row["state"] in ("queued", "waiting"):
                tracked = Tracked.from_row(row)
                tracked.state = "queued"
                self.requests.update(tracked.id, state="queued", service_pid=self._identity[0],
                                     service_start_time=self._identity[1])
                self._requests[tracked.id] = tracked
                self._order.append(tracked.id)
                self._queue.put(tracked.id)
                log.info("adopted queued inference %s of %s after a restart", tracked.id, tracked.owner)
            else:
                self.requests.update(row["id"], state="lost", ended_at=time.time(), error_kind="lost",
                                     error="the studio process running this generation stopped (crash or "
                                           "restart); videos it finished are in the gallery, generate again for the rest")
                log.info("inference %s was running when its service stopped: lost", row["id"])

    def _cancel_elsewhere(self, request_id: str) -> None:
        """Cancel a request this process does not run: only possible once its own process is gone."""
        row = self.requests.get(str(request_id))
        if row is None:
            raise KeyError(f"unknown inference request {request_id!r}")
        if row["state"] in TERMINAL_STATES:
            return
        if is_same_process(row["service_pid"], row["service_start_time"]):
            # another live studio process (app or CLI) runs it: it reads the flag within a second
            self.requests.update(str(request_id), unless_states=TERMINAL_STATES, cancel_requested=1)
            log.info("asked studio process %s to cancel inference %s", row["service_pid"], request_id)
            return
        self.requests.update(str(request_id), unless_states=TERMINAL_STATES, state="cancelled", ended_at=time.time())

    def _poll_cancels(self, every_s: float = 0.5) -> None:
        """Cancel the requests of this process that another process asked to cancel (through the
        database); the slots call this from their loops, so at most every `every_s` seconds."""
        now = time.monotonic()
        with self._lock:
            if now - self._polled_at < every_s:
                return
            self._polled_at = now
        try:
            asked = self.requests.cancels_asked(self._identity[0])
        except Exception:  # a busy database: the next pass reads again
            log.debug("could not read cancel requests", exc_info=True)
            return
        for request_id in asked:
            if request_id in self._requests:
                log.info("inference %s: cancelled from another process", request_id)
                self.cancel(request_id)

    def _persist(self, tracked: Tracked, progress: bool = False) -> None:
        """Write the request's durable fields (and its progress when asked) to the database."""
        values = {name: getattr(tracked, name) for name in DURABLE_FIELDS}
        if progress or tracked.state in TERMINAL_STATES:
            values.update(step=tracked.step, total_steps=tracked.total_steps)
            tracked.persisted_at = time.monotonic()
        try:
            self.requests.update(tracked.id, **values)
        except Exception:  # a locked or full database must not kill a generation; the next write retries
            log.exception("could not record inference %s", tracked.id)

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

    def _on_cpu(self) -> bool:
        """Whether requests run on CPU slots here (no GPUs), as the worker slots decide."""
        if self.scheduler is None:
            return not cuda_available()
        try:
            return on_cpu(self.scheduler.device_pool())
        except Exception:  # no inventory right now: say nothing rather than guess
            return False

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
    def _defer_to_warm(self, slot: Slot) -> bool:
        """True for a slot without a worker while another slot's worker is idle: the warm one takes the
        next request (a cold slot would load the model again, or wait for a device)."""
        if slot.worker is not None or self._stopping.is_set():  # on shutdown every slot reads its None
            return False
        return any(other is not slot and other.current is None and other.worker is not None
                   and other.worker.alive() for other in self._slots)

    def _has_pending(self) -> bool:
        """Whether a request of this service is queued or waiting for a device."""
        with self._lock:
            return any(t.state in ("queued", "waiting") for t in self._requests.values())

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
            changed = any(getattr(tracked, key) != value for key, value in values.items())
            for key, value in values.items():
                setattr(tracked, key, value)
            durable = changed and any(key in DURABLE_FIELDS for key in values)
            if durable or time.monotonic() - tracked.persisted_at >= 1.0:
                self._persist(tracked, progress=True)

    def _finish(self, tracked: Tracked, state: str, error: str | None = None, kind: str | None = None) -> None:
        # Caller may hold the lock (RLock-free: only plain assignments here).
        if tracked.state in TERMINAL_STATES:
            return
        tracked.state = state
        tracked.error = error
        tracked.error_kind = kind
        tracked.eta_s = 0.0 if state == "succeeded" else None
        tracked.ended_at = time.time()
        self._persist(tracked)  # recorded before anyone is told it ended
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
