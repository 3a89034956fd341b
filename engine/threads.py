"""How many CPU threads a process of the studio computes with: the one policy for trainer ranks, the
inference worker and in-process generation (the demo CLI).

Why: the studio's processes share the machine's cores with each other. torch's default (one thread per
core in every process) oversubscribes them as soon as two processes compute at once, and oversubscribed
OpenMP threads spin and stall: on a busy 2-core machine a warm worker request took 49.5 s with 2
threads per process against 7.4 s with one (bench/RESULTS.md), a demo trainer forward 8.6 s against
1.0 s. So the cores, less one kept for the app, are split in two halves: one for a CPU training job
(divided among its local ranks), one for the inference worker (or in-process generation); every
process gets at least one thread. A training job and a generation at once then stay within the cores.
A trainer alone needs no half: while no other studio process computes on this machine's CPU, its ranks
share every core (the demo LoRA's step: 0.34-0.37 s with 2 threads against 0.47-0.52 s with one on 2
cores), and it drops back to its half between two steps once one does. Computing processes say so with
a file in a machine-wide folder (`ComputeMark`): cores belong to the machine, not to one studio.
OMP_NUM_THREADS, when set, wins (a person or a cluster script chose it).

Kept free of torch at import; `apply_thread_policy` imports it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Role = Literal["trainer", "inference"]


MARKS_DIR = Path(tempfile.gettempdir()) / "studio-cpu-compute"


def cpu_threads(role: Role, *, ranks: int = 1, cores: int | None = None, alone: bool = False) -> int:
    """Threads for one process of `role`: half of the cores less one, divided among a trainer's `ranks`
    local ranks, or whole for the inference process; a trainer `alone` on the CPU divides every core
    among its ranks; at least one."""
    cores = cores or os.cpu_count() or 1
    omp = _omp_setting()
    if omp:
        return omp
    half = (cores - 1) // 2
    if role == "trainer":
        return max(1, (cores if alone else half) // max(ranks, 1))
    return max(1, half)


def _omp_setting() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else 0


class ComputeMark:
    """While held, a file `{role}-{group}-{pid}` in `directory` says this process computes on the CPU;
    processes of one group (a training job's ranks) do not count each other."""

    def __init__(self, role: Role, group: str | None = None, directory: Path | None = None) -> None:
        directory = directory or MARKS_DIR
        self.path = directory / f"{role}-{group or os.getpid()}-{os.getpid()}"

    def __enter__(self) -> "ComputeMark":
        try:
            if not self.path.parent.is_dir():  # shared by every user of the machine, like /tmp itself
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(self.path.parent, 0o1777)
            self.path.touch()
        except OSError as exc:  # a read-only temp dir costs speed, never the job
            log.debug("no compute mark at %s: %s", self.path, exc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def others_computing(group: str, directory: Path | None = None) -> int:
    """Live processes outside `group` holding a compute mark; marks of dead processes are removed."""
    directory = directory or MARKS_DIR
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return 0
    count = 0
    for name in names:
        _, _, rest = name.partition("-")
        mark_group, _, pid = rest.rpartition("-")
        if mark_group == group or not pid.isdigit():
            continue
        if _alive(int(pid)):
            count += 1
        else:
            _remove_stale(directory / name)
    return count


def _remove_stale(mark: Path) -> None:
    """In the shared sticky folder only a mark's owner may remove it: another user's stale mark stays
    (it is skipped as dead on every read), and the trainer reading it carries on."""
    try:
        mark.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("stale compute mark %s left in place: %s", mark, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class TrainerThreads:
    """A CPU trainer rank's threads: every core (shared with its job's ranks) while no other studio
    process computes on the machine's CPU, its half while one does; `update` between steps."""

    def __init__(self, ranks: int, group: str, directory: Path | None = None) -> None:
        self.ranks, self.group, self.directory = ranks, group, directory
        self.mark = ComputeMark("trainer", group, directory).__enter__()
        self.threads = 0
        _one_interop_thread()
        self.update()

    def update(self) -> int:
        import torch

        alone = not others_computing(self.group, self.directory)
        threads = cpu_threads("trainer", ranks=self.ranks, alone=alone)
        if threads != self.threads:
            torch.set_num_threads(threads)
            log.info("trainer computes with %d CPU thread(s) of %s cores (%s)", threads, os.cpu_count(),
                     "alone on the CPU" if alone else "sharing it with another computing process")
            self.threads = threads
        return threads

    def close(self) -> None:
        self.mark.__exit__()


def apply_thread_policy(role: Role) -> int:
    """Set torch's intra-op threads (and one inter-op thread: nothing here runs ops concurrently) for
    this process; returns the intra-op count. CPU trainer ranks use `TrainerThreads` instead."""
    import torch

    threads = cpu_threads(role)
    torch.set_num_threads(threads)
    _one_interop_thread()
    log.info("%s process computes with %d CPU thread(s) of %s cores", role, threads, os.cpu_count())
    return threads


def _one_interop_thread() -> None:
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; the default then stays
        log.debug("inter-op threads already in use; left at %d", torch.get_num_interop_threads())
