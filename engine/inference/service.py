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
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from engine.config import ConfigError
from engine.gallery import Gallery
from engine.inference.request import SPATIAL_MULTIPLE, TEMPORAL_STRIDE, InferRequest, resolve_lora_path
from engine.inference.speed import InferenceSpeed
from engine.models import ModelNotFoundError, resolve_model
from engine.paths import REPO_ROOT, DataLayout
from engine.rundir import read_log_tail
from engine.store.db import Database

log = logging.getLogger(__name__)

__all__ = ["InferenceService", "RequestState", "TERMINAL_STATES"]

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RequestState = str  # one of: queued, waiting, loading, running, succeeded, failed, cancelled
_WORKER_START_TIMEOUT_S = 300.0
_LOG_TAIL_LINES = 20


class DeviceScheduler(Protocol):
    def acquire_devices(self, holder: str, count: int = 1) -> list[int] | None: ...

    def release_devices(self, holder: str) -> None: ...


@dataclass
class _Tracked:
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


class _WorkerProcess:
    """One running worker program and a thread that turns its stdout lines into events."""

    def __init__(self, holder: str, devices: list[int], layout: DataLayout, idle_timeout_s: float,
                 python: str, speed: InferenceSpeed) -> None:
        import os

        from engine.launcher import gpu_order_env, spawn_process

        self.holder = holder
        self.devices = devices
        self.device = "?"  # what the worker reports when ready: cpu, cuda (its one visible GPU)
        self.log_path = layout.workers_dir / f"{holder}.log"
        env = gpu_order_env(dict(os.environ))
        on_cpu = devices == [-1] or not devices
        env["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else ",".join(str(d) for d in devices)
        env["PYTHONUNBUFFERED"] = "1"
        argv = [python, "-m", "engine.inference.worker", "--device", "cpu" if on_cpu else "cuda",
                "--idle-timeout", str(idle_timeout_s), *speed.to_argv()]
        self.process = spawn_process(argv, cwd=REPO_ROOT, env=env, log_path=self.log_path,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.events: queue.Queue[dict | None] = queue.Queue()
        self.last_active = time.monotonic()
        threading.Thread(target=self._pump, daemon=True, name=f"{holder}-events").start()

    def _pump(self) -> None:
        for raw in self.process.stdout:
            try:
                self.events.put(json.loads(raw))
            except json.JSONDecodeError:
                log.warning("%s: unreadable event line %r", self.holder, raw[:200])
        self.events.put(None)  # the worker exited

    def send(self, command: dict) -> None:
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return read_log_tail(self.log_path, _LOG_TAIL_LINES)

    def stop(self, grace_s: float = 10.0) -> None:
        from engine.launcher import stop_process_group

        if self.alive():
            try:
                self.send({"op": "shutdown"})
                self.process.stdin.close()
                self.process.wait(timeout=grace_s)
            except Exception:  # broken pipe or slow exit: fall back to signals
                stop_process_group(self.process.pid, grace_s=grace_s)
        self.process.wait()


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
        self._requests: dict[str, _Tracked] = {}
        self._order: deque[str] = deque()
        self._history = history
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        if max_workers is None:  # one worker per device the scheduler can hand out; idle slots hold nothing
            max_workers = _device_count(scheduler)
        self._slots = [_Slot(self, f"infer-{uuid.uuid4().hex[:6]}-{n}") for n in range(max(1, max_workers))]
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
            req = replace(req, flow_shift=_model_flow_shift(Path(model_path)))
        tracked = _Tracked(id=uuid.uuid4().hex[:12], owner=owner, request=req, model_path=str(model_path),
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
    def _next(self, timeout_s: float) -> _Tracked | None | bool:
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

    def _update(self, tracked: _Tracked, **values: Any) -> None:
        with self._lock:
            if tracked.state in TERMINAL_STATES:
                return
            for key, value in values.items():
                setattr(tracked, key, value)

    def _finish(self, tracked: _Tracked, state: str, error: str | None = None, kind: str | None = None) -> None:
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


class _Slot(threading.Thread):
    """One worker process (started on demand) and the loop that feeds it requests one at a time."""

    def __init__(self, service: InferenceService, holder: str) -> None:
        super().__init__(daemon=True, name=holder)
        self.service = service
        self.holder = holder
        self.worker: _WorkerProcess | None = None
        self.current: str | None = None

    def run(self) -> None:
        svc = self.service
        try:
            while True:
                tracked = svc._next(timeout_s=1.0)
                if tracked is None:
                    break
                if tracked is False:
                    self._stop_if_idle()
                    continue
                self.current = tracked.id
                try:
                    self._serve(tracked)
                except Exception as exc:  # never let one request kill the slot
                    log.exception("inference %s failed in the service", tracked.id)
                    with svc._lock:
                        svc._finish(tracked, "failed", f"{type(exc).__name__}: {exc}", "error")
                finally:
                    self.current = None
        finally:
            self._stop_worker()

    def cancel(self, request_id: str) -> None:
        worker = self.worker
        if worker is not None and worker.alive():
            try:
                worker.send({"op": "cancel", "id": request_id})
            except OSError:
                pass

    # ---- one request ---------------------------------------------------------------------------
    def _serve(self, tracked: _Tracked) -> None:
        svc = self.service
        if not self._ensure_worker(tracked):
            return
        worker = self.worker
        assert worker is not None
        with svc._lock:  # a cancel while the worker was starting ends the request here
            if tracked.state in TERMINAL_STATES:
                return
            tracked.state, tracked.started_at = "loading", time.time()
            tracked.worker = f"{self.holder} on {worker.device}"  # which card made the video
        staging = svc.gallery.staging_dir(tracked.id)
        worker.send({"op": "generate", "id": tracked.id, "request": tracked.request.to_dict(),
                     "model_path": tracked.model_path, "lora_files": tracked.lora_files, "out_dir": str(staging)})
        outcome = self._follow(tracked, worker)
        worker.last_active = time.monotonic()
        shutil.rmtree(staging, ignore_errors=True)  # before the request reads as ended
        with svc._lock:
            svc._finish(tracked, *outcome)

    def _follow(self, tracked: _Tracked, worker: _WorkerProcess) -> tuple[str, str | None, str | None]:
        """Relay the worker's events into the request until it ends; returns (state, error, kind)."""
        svc = self.service
        while True:
            event = worker.events.get()
            if event is None:
                message = f"the inference worker exited (code {worker.process.wait()})"
                tail = worker.log_tail()
                self._discard_worker()
                return "failed", message + (f"; log tail:\n{tail}" if tail else ""), "crash"
            if event.get("id") not in (tracked.id, None):
                continue  # a late event of an earlier request
            kind = event.get("event")
            if kind == "state":
                svc._update(tracked, state=event["state"])
            elif kind == "step":
                svc._update(tracked, step=event["step"], total_steps=event["total_steps"], eta_s=event["eta_s"])
            elif kind == "video":
                self._add_video(tracked, event)
            elif kind == "done":
                svc._update(tracked, timings=event.get("timings", {}))
                return "succeeded", None, None
            elif kind == "cancelled":
                return "cancelled", None, None
            elif kind == "error" and event.get("id") == tracked.id:
                return "failed", event.get("message"), event.get("kind")

    def _add_video(self, tracked: _Tracked, event: dict) -> None:
        item = self.service.gallery.add(
            owner=tracked.owner, params={**tracked.request.to_dict(), "model_path": tracked.model_path,
                    "lora_files": tracked.lora_files},
            seed=int(event["seed"]), media_dir=event["dir"], timings=event.get("timings", {}),
            digest=event.get("digest", ""), request_id=tracked.id,
        )
        with self.service._lock:
            tracked.gallery_ids.append(item.id)

    # ---- the worker process ----------------------------------------------------------------------
    def _ensure_worker(self, tracked: _Tracked) -> bool:
        """Start a worker on free devices if none runs; False if the request ended while waiting."""
        if self.worker is not None and self.worker.alive():
            return True
        self._discard_worker()
        svc = self.service
        devices = self._acquire(tracked)
        if devices is None:
            return False
        worker = _WorkerProcess(self.holder, devices, svc.layout, svc.idle_timeout_s, svc.python, svc.speed)
        self.worker = worker
        deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                event = worker.events.get(timeout=1.0)
            except queue.Empty:
                continue
            if event is None or event.get("event") == "fatal":
                reason = (event or {}).get("message") or worker.log_tail()
                with svc._lock:
                    svc._finish(tracked, "failed", f"the inference worker did not start: {reason}", "crash")
                self._discard_worker()
                return False
            if event.get("event") == "ready":
                worker.device = str(event.get("device"))
                log.info("%s: worker pid %s ready on %s", self.holder, event.get("pid"), worker.device)
                return True
        with svc._lock:
            svc._finish(tracked, "failed", "the inference worker did not start in time", "crash")
        self._discard_worker()
        return False

    def _acquire(self, tracked: _Tracked) -> list[int] | None:
        svc = self.service
        if svc.scheduler is None:
            return [-1] if not _cuda_available() else [0]
        while not svc._stopping.is_set():
            with svc._lock:
                if tracked.state in TERMINAL_STATES:
                    return None
            devices = svc.scheduler.acquire_devices(self.holder, 1)
            if devices is not None:
                return devices
            svc._update(tracked, state="waiting")
            time.sleep(1.0)
        return None

    def _stop_if_idle(self) -> None:
        worker = self.worker
        if worker is not None and time.monotonic() - worker.last_active >= self.service.idle_timeout_s:
            log.info("%s: idle for %.0f s, stopping the worker", self.holder, self.service.idle_timeout_s)
            self._stop_worker()

    def _stop_worker(self) -> None:
        if self.worker is not None:
            try:
                self.worker.stop()
            finally:
                self._discard_worker()

    def _discard_worker(self) -> None:
        self.worker = None
        if self.service.scheduler is not None:
            try:
                self.service.scheduler.release_devices(self.holder)
            except Exception:
                log.warning("%s: could not release devices", self.holder, exc_info=True)


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


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
