"""Inference worker slots: one worker process each (started on demand, kept warm while requests
come, stopped when idle) and the thread that feeds it one request at a time."""
from __future__ import annotations

import json
import logging
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engine.inference.speed import InferenceSpeed
from engine.inference.tracking import TERMINAL_STATES, Tracked
from engine.paths import REPO_ROOT, DataLayout
from engine.rundir import read_log_tail

if TYPE_CHECKING:
    from engine.inference.service import InferenceService

log = logging.getLogger(__name__)

_WORKER_START_TIMEOUT_S = 300.0
_LOG_TAIL_LINES = 20


class WorkerProcess:
    """One running worker program and a thread that turns its stdout lines into events."""

    def __init__(self, holder: str, devices: list[int], layout: DataLayout, idle_timeout_s: float,
                 python: str, speed: InferenceSpeed) -> None:
        from engine.launcher import spawn_process, worker_env

        self.holder = holder
        self.devices = devices
        self.device = "?"  # what the worker reports when ready: cpu, cuda (its one visible GPU)
        self.warm: set[str] = set()  # models the worker reported loaded (and not unloaded since)
        self.log_path = layout.workers_dir / f"{holder}.log"
        env, device = worker_env(devices)
        argv = [python, "-m", "engine.inference.worker", "--device", device,
                "--idle-timeout", str(idle_timeout_s), *speed.to_argv()]
        # A worker never outlives the app or CLI feeding it (a killed `studio infer` left one at 100% CPU).
        self.process = spawn_process(argv, cwd=REPO_ROOT, env=env, log_path=self.log_path,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, die_with_parent=True)
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


class Slot(threading.Thread):
    """One worker process (started on demand) and the loop that feeds it requests one at a time."""

    def __init__(self, service: InferenceService, holder: str) -> None:
        super().__init__(daemon=True, name=holder)
        self.service = service
        self.holder = holder
        self.worker: WorkerProcess | None = None
        self.current: str | None = None
        self.last_model: str | None = None  # the model of the last request this slot served
        self.rewarm: str | None = None  # set when the slot gave way to training: load it again once free

    def run(self) -> None:
        svc = self.service
        try:
            while True:
                if svc._defer_to_warm(self):  # an idle warm worker elsewhere serves the next request
                    self._stop_if_idle()
                    time.sleep(0.2)
                    continue
                tracked = svc._next(timeout_s=1.0)
                svc._poll_cancels()  # cancels asked by another process, while this slot is free
                if tracked is None:
                    break
                if tracked is False:
                    self._stop_if_idle()
                    continue
                self._yield_if_wanted()  # a queued training job goes before the next generation
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

    def kill_worker(self) -> None:
        """End the worker process now (a forced shutdown); the feeding thread then sees it exit."""
        from engine.launcher import stop_process_group

        worker = self.worker
        if worker is not None and worker.alive():
            stop_process_group(worker.process.pid, grace_s=2.0)

    def cancel(self, request_id: str) -> None:
        worker = self.worker
        if worker is not None and worker.alive():
            try:
                worker.send({"op": "cancel", "id": request_id})
            except OSError:
                pass

    # ---- one request ---------------------------------------------------------------------------
    def _serve(self, tracked: Tracked) -> None:
        svc = self.service
        if not self._ensure_worker(tracked):
            return
        worker = self.worker
        assert worker is not None
        with svc._lock:  # a cancel while the worker was starting ends the request here
            if tracked.state in TERMINAL_STATES:
                return
        # which card made the video
        svc._update(tracked, state="loading", started_at=time.time(), worker=f"{self.holder} on {worker.device}")
        self.last_model = tracked.model_path
        staging = svc.gallery.staging_dir(tracked.id)
        worker.send({"op": "generate", "id": tracked.id, "request": tracked.request.to_dict(),
                     "model_path": tracked.model_path, "lora_files": tracked.lora_files, "out_dir": str(staging)})
        outcome = self._follow(tracked, worker)
        worker.last_active = time.monotonic()
        shutil.rmtree(staging, ignore_errors=True)  # before the request reads as ended
        with svc._lock:
            svc._finish(tracked, *outcome)

    def _follow(self, tracked: Tracked, worker: WorkerProcess) -> tuple[str, str | None, str | None]:
        """Relay the worker's events into the request until it ends; returns (state, error, kind)."""
        svc = self.service
        while True:
            svc._poll_cancels()  # this or another request cancelled by another process (at most twice a second)
            try:
                event = worker.events.get(timeout=0.5)
            except queue.Empty:
                continue
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
            elif kind in ("loaded", "unloaded"):
                self._note_models(worker, event)
            elif kind == "done":
                worker.warm.add(str(Path(tracked.model_path).resolve()))
                svc._update(tracked, timings=event.get("timings", {}))
                return "succeeded", None, None
            elif kind == "cancelled":
                return "cancelled", None, None
            elif kind == "error" and event.get("id") == tracked.id:
                return "failed", event.get("message"), event.get("kind")

    def _add_video(self, tracked: Tracked, event: dict) -> None:
        item = self.service.gallery.add(
            owner=tracked.owner, params={**tracked.request.to_dict(), "model_path": tracked.model_path,
                    "lora_files": tracked.lora_files},
            seed=int(event["seed"]), media_dir=event["dir"], timings=event.get("timings", {}),
            digest=event.get("digest", ""), request_id=tracked.id,
        )
        # recorded (gallery row, then the request's list) before the request can read as succeeded
        self.service._update(tracked, gallery_ids=[*tracked.gallery_ids, item.id])

    # ---- the worker process ----------------------------------------------------------------------
    def _ensure_worker(self, tracked: Tracked) -> bool:
        """Start a worker on free devices if none runs; False if the request ended while waiting."""
        if self.worker is not None and self.worker.alive():
            return True
        self._discard_worker()
        svc = self.service
        devices = self._acquire(tracked)
        if devices is None:
            return False
        failure = self._start_worker(devices)
        if failure is not None:
            with svc._lock:
                svc._finish(tracked, "failed", failure, "crash")
            return False
        return True

    def _start_worker(self, devices: list[int]) -> str | None:
        """Start a worker on `devices` and wait until it is ready; None, or why it did not start
        (the devices are then given back)."""
        svc = self.service
        worker = WorkerProcess(self.holder, devices, svc.layout, svc.idle_timeout_s, svc.python, svc.speed)
        self.worker, self.rewarm = worker, None
        deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                event = worker.events.get(timeout=1.0)
            except queue.Empty:
                svc._poll_cancels()
                continue
            if event is None or event.get("event") == "fatal":
                reason = (event or {}).get("message") or worker.log_tail()
                self._discard_worker()
                return f"the inference worker did not start: {reason}"
            if event.get("event") == "ready":
                worker.device = str(event.get("device"))
                log.info("%s: worker pid %s ready on %s", self.holder, event.get("pid"), worker.device)
                return None
        self._discard_worker()
        return "the inference worker did not start in time"

    def _acquire(self, tracked: Tracked) -> list[int] | None:
        svc = self.service
        if svc.scheduler is None:
            return [-1] if not cuda_available() else [0]
        while not svc._stopping.is_set():
            with svc._lock:
                if tracked.state in TERMINAL_STATES:
                    return None
            devices = svc.scheduler.acquire_devices(self.holder, 1)
            if devices is not None:
                return devices
            svc._update(tracked, state="waiting", waiting_for=self._why_waiting(tracked.owner))
            time.sleep(1.0)
            svc._poll_cancels()
        return None

    def _why_waiting(self, owner: str) -> str:
        blockers = getattr(self.service.scheduler, "device_blockers", None)
        try:
            described = [b.describe(lambda o: o == owner) for b in blockers()] if callable(blockers) else []
        except Exception:  # an explanation must never stop the request from waiting
            log.debug("no explanation for the wait", exc_info=True)
            described = []
        return "; ".join(described) or "every device is in use"

    def _stop_if_idle(self) -> None:
        worker = self.worker
        if worker is None:
            self._come_back_warm()
            return
        self._read_idle_events(worker)
        if time.monotonic() - worker.last_active >= self.service.idle_timeout_s:
            log.info("%s: idle for %.0f s, stopping the worker", self.holder, self.service.idle_timeout_s)
            self._stop_worker()
        else:
            self._yield_if_wanted()

    def _yield_if_wanted(self) -> None:
        """Give the devices back at once when the head of the training queue needs them (the next
        request starts a worker again once a device is free)."""
        worker, scheduler = self.worker, self.service.scheduler
        reserved = getattr(scheduler, "reserved_for_queue", None)
        if worker is None or not callable(reserved):
            return
        try:
            wanted = set(worker.devices) & reserved()
        except Exception:  # a busy database: try again on the next pass
            log.debug("could not read the training queue", exc_info=True)
            return
        if wanted:
            log.info("%s: a queued training job needs %s; stopping the idle worker", self.holder, sorted(wanted))
            self._stop_worker()
            self.rewarm = self.last_model

    def _come_back_warm(self) -> None:
        """After giving way to training: once a device is free again (no queued job wants it), start a
        worker and load the last model, so the next generation finds it warm. Its idle timeout then
        applies as to any worker."""
        svc = self.service
        if self.rewarm is None or svc.scheduler is None or svc._stopping.is_set():
            return
        if svc._has_pending():  # a waiting request starts its own worker; never race it for the device
            self.rewarm = None
            return
        try:
            devices = svc.scheduler.acquire_devices(self.holder, 1)
        except Exception:  # a busy database: the next pass tries again
            log.debug("could not ask for a device", exc_info=True)
            return
        if devices is None:
            return
        model, self.rewarm = self.rewarm, None
        failure = self._start_worker(devices)
        if failure is not None:
            log.warning("%s: could not come back warm: %s", self.holder, failure)
            return
        log.info("%s: device %s free again; loading %s", self.holder, devices, model)
        try:
            self.worker.send({"op": "load", "model_path": model})
        except OSError:  # it died at once: the next request starts another
            log.warning("%s: the worker exited before loading %s", self.holder, model)
        self.worker.last_active = time.monotonic()

    def _read_idle_events(self, worker: WorkerProcess) -> None:
        """Events of an idle worker: models it loaded or freed, or its exit."""
        while True:
            try:
                event = worker.events.get_nowait()
            except queue.Empty:
                return
            if event is None:
                log.warning("%s: the idle worker exited (code %s)", self.holder, worker.process.wait())
                self._discard_worker()
                return
            self._note_models(worker, event)

    @staticmethod
    def _note_models(worker: WorkerProcess, event: dict) -> None:
        if event.get("event") == "loaded":
            worker.warm.add(str(Path(event["model_path"]).resolve()))
        elif event.get("event") == "unloaded":
            worker.warm.difference_update(str(Path(m).resolve()) for m in event.get("models", []))

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


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
