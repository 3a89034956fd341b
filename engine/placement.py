"""Placement of queued jobs on devices, and why a queued job waits (pure functions over records).

The scheduler launches in strict queue order: a later job never overtakes a waiting one, so a big
job is never starved. Devices are stored as integers (`engine.gpus.Device`): GPUs >= 0, CPU slots < 0.
Inference workers hold devices through `device_holds`; the queue's head may reclaim them from an
idle worker (`reserved_for_head`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from engine.gpus import Device, on_cpu
from engine.jobs import Job


def choose_devices(job: Job, pool: Sequence[int], used: set[int]) -> list[int] | None:
    """The devices `job` starts on now, or None when they are not all free."""
    if job.gpus_explicit:
        wanted = job.requested_indices
        return wanted if not (set(wanted) & used) and set(wanted) <= set(pool) else None
    free = [d for d in pool if d not in used]
    return free[: job.requested_count] if len(free) >= job.requested_count else None


def job_devices(active: Iterable[Job]) -> dict[int, Job]:
    return {d: job for job in active for d in job.gpus_assigned}


def reserved_for_head(queued: Sequence[Job], pool: Sequence[int], active: Iterable[Job],
                      held: Iterable[int]) -> set[int]:
    """The devices the first queued job would start on if inference holds gave way (free devices
    preferred, so a worker yields only when the job needs its device). Empty when jobs, not holds,
    keep it waiting: then nothing is taken from a worker."""
    if not queued:
        return set()
    held_set = set(held)
    busy = set(job_devices(active))
    free_first = [d for d in pool if d not in held_set] + [d for d in pool if d in held_set]
    chosen = choose_devices(queued[0], free_first, busy)
    return set(chosen or ())


@dataclass(frozen=True)
class Blocker:
    """What occupies a device a queued job needs: a running job or an inference worker."""

    device: int
    job_id: int | None = None
    job_name: str = ""
    owner: str | None = None
    status: str = ""
    worker: str | None = None  # the holder name of an inference worker
    worker_pid: int | None = None

    def describe(self, can_see: Callable[[str | None], bool]) -> str:
        where = Device(self.device).label
        if self.job_id is not None:
            who = (f"job #{self.job_id} {self.job_name} ({self.owner}, {self.status})" if can_see(self.owner)
                   else f"job #{self.job_id} (another user's, {self.status})")
            verb = "is kept for" if self.status == "queued" else "is used by"  # the queue's head goes first
            return f"{where} {verb} {who}"
        return f"{where} is held by an inference worker (pid {self.worker_pid}; it gives way when idle)"


@dataclass(frozen=True)
class QueueWait:
    """Why one queued job has not started: its place, what it needs and what is in the way."""

    job_id: int
    position: int  # 1 = next to start
    queued: int
    needs: str
    behind: int | None = None  # an earlier queued job that waits first (strict order)
    blockers: tuple[Blocker, ...] = field(default_factory=tuple)

    def describe(self, can_see: Callable[[str | None], bool] = lambda owner: True) -> str:
        place = f"#{self.position} of {self.queued} in the queue, needs {self.needs}"
        if self.behind is not None:
            return f"{place}: waits behind job #{self.behind} (jobs start in queue order)"
        if not self.blockers:
            return f"{place}: starting"
        return f"{place}: " + "; ".join(b.describe(can_see) for b in self.blockers)


def _needs(job: Job, pool: Sequence[int]) -> str:
    if job.gpus_explicit:
        return ", ".join(Device(d).label for d in job.requested_indices)
    unit = "CPU slot" if on_cpu(list(pool)) else "GPU"
    return f"{job.requested_count} {unit}{'s' if job.requested_count != 1 else ''}"


def explain_queue(queued: Sequence[Job], pool: Sequence[int], active: Iterable[Job],
                  holds: Iterable[tuple[int, str, int]]) -> list[QueueWait]:
    """One QueueWait per queued job, in start order. `holds`: (device, holder, pid)."""
    by_job = job_devices(active)
    by_hold = {device: (holder, pid) for device, holder, pid in holds}
    used = set(by_job) | set(by_hold)
    starting: dict[int, Job] = {}  # devices an earlier queued job starts on at the next tick
    waits: list[QueueWait] = []
    first_blocked: int | None = None
    for position, job in enumerate(queued, 1):
        needs = _needs(job, pool)
        if first_blocked is not None:
            waits.append(QueueWait(job.id, position, len(queued), needs, behind=first_blocked))
            continue
        chosen = choose_devices(job, pool, used)
        if chosen is not None:
            used |= set(chosen)
            starting.update((device, job) for device in chosen)
            waits.append(QueueWait(job.id, position, len(queued), needs))
            continue
        first_blocked = job.id
        wanted = job.requested_indices if job.gpus_explicit else list(pool)
        blockers = [b for b in (_holder(device, by_job, by_hold, starting) for device in wanted) if b is not None]
        waits.append(QueueWait(job.id, position, len(queued), needs, blockers=tuple(blockers)))
    return waits


def occupants(pool: Sequence[int], active: Iterable[Job], holds: Iterable[tuple[int, str, int]],
              queued: Sequence[Job], reserved: set[int]) -> list[Blocker]:
    """What occupies each busy device of the pool: a job, an inference worker, or the head of the
    queue it is kept for."""
    by_job = job_devices(active)
    by_hold = {device: (holder, pid) for device, holder, pid in holds}
    found: list[Blocker] = []
    for device in pool:
        held = _holder(device, by_job, by_hold)
        if held is not None:
            found.append(held)
        elif device in reserved and queued:
            head = queued[0]
            found.append(Blocker(device, head.id, head.name, head.owner, "queued"))
    return found


def _holder(device: int, by_job: dict[int, Job], by_hold: dict[int, tuple[str, int]],
            starting: dict[int, Job] | None = None) -> Blocker | None:
    """The job or inference worker holding `device` (or the queued job about to start on it), or
    None when it is free."""
    if device in by_job:
        job = by_job[device]
        return Blocker(device, job.id, job.name, job.owner, str(job.status))
    if starting and device in starting:  # "kept for" it: an earlier queued job goes first
        job = starting[device]
        return Blocker(device, job.id, job.name, job.owner, "queued")
    if device in by_hold:
        holder, pid = by_hold[device]
        return Blocker(device, worker=holder, worker_pid=pid)
    return None
