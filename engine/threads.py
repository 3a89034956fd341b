"""How many CPU threads a process of the studio computes with: the one policy for trainer ranks, the
inference worker and in-process generation (the demo CLI).

Why: the studio's processes share the machine's cores with each other. torch's default (one thread per
core in every process) oversubscribes them as soon as two processes compute at once, and oversubscribed
OpenMP threads spin and stall: on a busy 2-core machine a warm worker request took 49.5 s with 2
threads per process against 7.4 s with one (bench/RESULTS.md), a demo trainer forward 8.6 s against
1.0 s. So the cores, less one kept for the app, are split in two halves: one for a CPU training job
(divided among its local ranks), one for the inference worker (or in-process generation); every
process gets at least one thread. A training job and a generation at once then stay within the cores.
OMP_NUM_THREADS, when set, wins (a person or a cluster script chose it).

Kept free of torch at import; `apply_thread_policy` imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

log = logging.getLogger(__name__)

Role = Literal["trainer", "inference"]


def cpu_threads(role: Role, *, ranks: int = 1, cores: int | None = None) -> int:
    """Threads for one process of `role`: half of the cores less one, divided among a trainer's `ranks`
    local ranks, or whole for the inference process; at least one."""
    cores = cores or os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    half = (cores - 1) // 2
    if role == "trainer":
        return max(1, half // max(ranks, 1))
    return max(1, half)


def apply_thread_policy(role: Role, *, ranks: int = 1) -> int:
    """Set torch's intra-op threads (and one inter-op thread: nothing here runs ops concurrently) for
    this process; returns the intra-op count."""
    import torch

    threads = cpu_threads(role, ranks=ranks)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; the default then stays
        log.debug("inter-op threads already in use; left at %d", torch.get_num_interop_threads())
    log.info("%s process computes with %d CPU thread(s) of %s cores", role, threads, os.cpu_count())
    return threads
