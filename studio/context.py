"""The composition root: builds the engine's services once and hands them to the tabs.

`StudioContext.create(settings)` makes the data directory, the database, the demo assets, the GPU
inventory, the scheduler (started), the gallery and the inference service; `close()` stops them in
reverse order (running trainers keep running: the next start re-attaches them).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from engine.inference.speed import flash_attention_3_installed
from engine.metrics import LossSeriesCache
from engine.paths import DataLayout
from engine.store import Database
from engine.gpus import Device, cpu_pool
from studio.auth import Accounts, UsersFile
from studio.files import FileLinks, redact_home
from studio.settings import StudioSettings

log = logging.getLogger(__name__)

GPU_HISTORY_SAMPLES = 300  # ~5 minutes at one sample per second


class GpuHistory:
    """Recent samples per GPU (utilization, memory, power) and of the host (CPU load, RAM) for the GPUs
    tab (in memory: a view, not a record)."""

    def __init__(self, max_samples: int = GPU_HISTORY_SAMPLES, min_interval_s: float = 1.0) -> None:
        self._samples: dict[int, deque[dict[str, float]]] = {}
        self._host: deque[dict[str, float]] = deque(maxlen=max_samples)
        self._max = max_samples
        self._min_interval = min_interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    def record(self, gpus: list[Any], now: float | None = None, host: dict[str, float] | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            if now - self._last < self._min_interval:
                return
            self._last = now
            for gpu in gpus:
                total = gpu.memory_total_mib or 0
                mem = 100.0 * (gpu.memory_used_mib or 0) / total if total else 0.0
                series = self._samples.setdefault(gpu.index, deque(maxlen=self._max))
                series.append({"time": now, "util": gpu.utilization_pct or 0.0, "mem": mem,
                               "power": gpu.power_w or 0.0})
            if host is not None:
                self._host.append({"time": now, **host})

    def snapshot(self) -> dict[int, list[dict[str, float]]]:
        with self._lock:
            return {index: list(samples) for index, samples in self._samples.items()}

    def host_snapshot(self) -> list[dict[str, float]]:
        with self._lock:
            return list(self._host)


@dataclass
class StudioContext:
    settings: StudioSettings
    layout: DataLayout
    db: Database
    accounts: Accounts
    gpus: Any  # engine.gpus.GpuInventory
    scheduler: Any  # engine.scheduler.Scheduler
    gallery: Any  # engine.gallery.Gallery
    inference: Any  # engine.inference.service.InferenceService
    gpu_history: GpuHistory = field(default_factory=GpuHistory)
    # parsed loss curves of recently viewed runs: each poll parses only new metrics lines
    loss_cache: LossSeriesCache = field(default_factory=LossSeriesCache)
    files: FileLinks | None = None  # expiring download links (set in create)

    @classmethod
    def create(cls, settings: StudioSettings, *, start: bool = True) -> "StudioContext":
        from engine.demo.setup import ensure_demo_assets
        from studio.services import open_services

        services = open_services(settings)
        ensure_demo_assets(services.layout.home)  # the demo preset's dataset (quick when already there)
        users = UsersFile(settings.auth_file) if settings.auth_file else None
        ctx = cls(settings=settings, layout=services.layout, db=services.db, accounts=Accounts(users),
                  gpus=services.gpus, scheduler=services.scheduler, gallery=services.gallery,
                  inference=services.inference(), files=FileLinks(services.layout.served_dir))
        if start:
            ctx.scheduler.start()
        return ctx

    def close(self) -> None:
        for name, stop in (("inference", self.inference.shutdown), ("scheduler", self.scheduler.shutdown)):
            try:
                stop()
            except Exception:  # keep closing the rest
                log.exception("stopping the %s failed", name)
        self.db.close()

    def redact(self, text: str | None) -> str | None:
        """A message for users: the data directory's location is not theirs to see."""
        return redact_home(text, self.layout.home)

    def file_link(self, path: str | Path) -> str:
        """An expiring link to a file whose owner the caller has checked."""
        return (self.files or FileLinks(self.layout.served_dir)).link(path)

    # ---- cheap reads for the GPUs tab ----------------------------------------------------------
    def machine_status(self) -> dict[str, Any]:
        """GPUs with the job on each, host RAM and free disk of the data directory."""
        gpus = self.gpus.list()
        memory = psutil.virtual_memory()
        cpu_load = psutil.cpu_percent(interval=None)  # since the previous call: no waiting here
        self.gpu_history.record(gpus, host={"cpu": cpu_load, "ram": memory.percent})
        holders: dict[int, dict[str, Any]] = {}
        for job in self.scheduler.list_jobs(statuses=["starting", "running", "stopping"], limit=200):
            for index in job.gpus_assigned:
                holders[index] = {"job": f"#{job.id} {job.name} ({job.owner})", "owner": job.owner}
        for hold in self.scheduler.store.holds():  # inference workers: the service's own account
            holders.setdefault(hold.device, {"job": f"inference worker (pid {hold.pid})", "owner": None})
        disk = shutil.disk_usage(self.layout.home)
        return {
            "gpus": [{
                "index": g.index, "name": g.name,
                "memory_used_mib": g.memory_used_mib, "memory_total_mib": g.memory_total_mib,
                "utilization_pct": g.utilization_pct, "temperature_c": g.temperature_c, "power_w": g.power_w,
                "job": holders.get(g.index, {}).get("job", ""), "job_owner": holders.get(g.index, {}).get("owner"),
            } for g in gpus],
            "cpu_jobs": [{**holder, "slot": Device(index).label} for index, holder in sorted(holders.items())
                         if Device(index).is_cpu],
            # Every CPU slot of a machine without GPUs, held or free (a job or an inference worker).
            "cpu_slots": [{"slot": Device(index).label, "job": holders.get(index, {}).get("job", ""),
                           "owner": holders.get(index, {}).get("owner")}
                          for index in (cpu_pool(self.settings.cpu_slots) if not gpus else [])],
            "cpu_load_pct": cpu_load,
            "cpu_count": psutil.cpu_count(),
            "host_ram_total_gib": memory.total / 2**30,
            "host_ram_used_gib": (memory.total - memory.available) / 2**30,
            "disk_free_gib": disk.free / 2**30,
            "disk_total_gib": disk.total / 2**30,
            "flash_attention_3": flash_attention_3_installed(),
        }
