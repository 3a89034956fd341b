"""GPU inventory from `nvidia-smi` (not pynvml: no driver library needed in our process).

`parse_nvidia_smi` is pure and tested on recorded outputs; `GpuInventory` runs the query at most
once per `ttl_s` so many UI polls cost one subprocess. No nvidia-smi (CPU machine) -> no GPUs.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

QUERY_FIELDS = ("index", "name", "uuid", "memory.total", "memory.used", "utilization.gpu",
                "temperature.gpu", "power.draw")
NVIDIA_SMI_ARGS = ["--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits"]
QUERY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: float | None
    memory_used_mib: float | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None


class NvidiaSmiError(RuntimeError):
    """nvidia-smi ran but did not give a GPU table (driver problem, no devices)."""


def _number(text: str) -> float | None:
    """'[N/A]', 'N/A', '[Not Supported]' and empty fields become None."""
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in {"N/A", "NA"}:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_nvidia_smi(output: str) -> list[GpuInfo]:
    """Parse `--format=csv,noheader,nounits` output of our query; raise NvidiaSmiError on other text."""
    gpus: list[GpuInfo] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(QUERY_FIELDS) or not cells[0].isdigit():
            raise NvidiaSmiError(f"unexpected nvidia-smi output: {output.strip()[:300]}")
        gpus.append(GpuInfo(
            index=int(cells[0]), name=cells[1], uuid=cells[2],
            memory_total_mib=_number(cells[3]), memory_used_mib=_number(cells[4]),
            utilization_pct=_number(cells[5]), temperature_c=_number(cells[6]), power_w=_number(cells[7]),
        ))
    return gpus


class GpuInventory:
    """Cached list of this machine's GPUs; empty on a machine without nvidia-smi."""

    def __init__(self, ttl_s: float = 2.0, command: str | None = None) -> None:
        self.ttl_s = ttl_s
        self._command = command
        self._lock = threading.Lock()
        self._cached: list[GpuInfo] = []
        self._cached_at = float("-inf")
        self.last_error: str | None = None

    def list(self) -> list[GpuInfo]:
        with self._lock:
            if time.monotonic() - self._cached_at >= self.ttl_s:
                self._cached = self._query()
                self._cached_at = time.monotonic()
            return list(self._cached)

    def _query(self) -> list[GpuInfo]:
        executable = self._command or shutil.which("nvidia-smi")
        if executable is None:
            self.last_error = None
            return []
        try:
            result = subprocess.run([executable, *NVIDIA_SMI_ARGS], capture_output=True, text=True,
                                    timeout=QUERY_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return self._failed(f"nvidia-smi did not run: {exc}")
        if result.returncode != 0:
            return self._failed(f"nvidia-smi exited {result.returncode}: "
                                f"{(result.stdout + result.stderr).strip()[:300]}")
        try:
            gpus = parse_nvidia_smi(result.stdout)
        except NvidiaSmiError as exc:
            return self._failed(str(exc))
        self.last_error = None
        return gpus

    def _failed(self, message: str) -> list[GpuInfo]:
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message
        return []


# ---- one device model for scheduler, launcher and inference ------------------------------------
# Jobs and holds store devices as integers (jobs.gpus_assigned, device_holds.device): a GPU by its
# nvidia-smi index (>= 0), CPU slot k (1-based) as -k. Only this type reads that encoding.
@dataclass(frozen=True)
class Device:
    """One schedulable place for a process: "GPU i" or "CPU slot k" (a machine without GPUs)."""

    index: int

    @classmethod
    def gpu(cls, index: int) -> "Device":
        if index < 0:
            raise ValueError(f"a GPU index is >= 0, got {index}")
        return cls(index)

    @classmethod
    def cpu_slot(cls, slot: int) -> "Device":
        if slot < 1:
            raise ValueError(f"CPU slots count from 1, got {slot}")
        return cls(-slot)

    @property
    def is_cpu(self) -> bool:
        return self.index < 0

    @property
    def label(self) -> str:
        return f"CPU slot {-self.index}" if self.is_cpu else f"GPU {self.index}"

    def __str__(self) -> str:
        return self.label


def cpu_pool(slots: int) -> list[int]:
    """The device numbers of `slots` CPU slots."""
    return [Device.cpu_slot(k).index for k in range(1, slots + 1)]


def on_cpu(devices: list[int] | tuple[int, ...]) -> bool:
    """Devices (as stored) that are CPU slots; an empty list means no GPU either."""
    return not devices or any(Device(d).is_cpu for d in devices)


def device_labels(devices: list[int] | tuple[int, ...]) -> str:
    return ", ".join(Device(d).label for d in devices)


def process_placement(devices: list[int] | tuple[int, ...]) -> tuple[str, str]:
    """(torch device, CUDA_VISIBLE_DEVICES) for a single process given these devices: a CPU slot
    hides every GPU, GPUs are listed by nvidia-smi index (with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    if on_cpu(devices):
        return "cpu", ""
    return "cuda", ",".join(str(Device.gpu(d).index) for d in devices)
